"""``fit`` (wiring only; the work lives in :mod:`lora_inspect.fit`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import EXIT_RULE_FAILED, InspectError
from ..fit.engines import ENGINE_NAMES
from ..formats import load_adapter
from ..views.render import emit
from ._options import output_options

__all__ = ["fit"]

_DTYPES = ("fp32", "bf16", "fp16")


@click.command(
    "fit",
    short_help="Make an adapter one a serving engine applies fully.",
    context_settings={"max_content_width": 80},
    epilog="""\b
Examples:
  lora-inspect fit ./my-adapter --for vllm -o ./served
  lora-inspect fit ./dora-adapter --for vllm --max-rank 32 \\
      --base ./llama-3-8b -o ./served
  lora-inspect fit ./my-adapter --for llama.cpp --base ./base -o lora.gguf
  lora-inspect fit lora.safetensors --for comfyui -o fitted.safetensors
\b
Exit codes: 0 written and fully applied, 1 written but check --serving
or check --applied fails on it, 2 bad input or usage (nothing written).
""",
)
@click.argument("adapter", type=click.Path())
@click.option("--for", "engine", required=True, type=click.Choice(ENGINE_NAMES, case_sensitive=False),
              help="The serving engine.")
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Where to write it.")
@click.option("--max-rank", type=int, default=None, metavar="R",
              help="Largest rank written (vLLM: one of its max_lora_rank values, default 16; others: keep ranks).")
@click.option("--base", type=click.Path(exists=True), default=None, metavar="DIR|FILE",
              help="The base checkpoint: needed to fold DoRA, factor modules_to_save deltas, and for GGUF.")
@click.option("--data", type=click.Path(exists=True, dir_okay=False), default=None, metavar="FILE",
              help="With --base (a Hugging Face model): KL and top-1 agreement against the original.")
@click.option("--dtype", type=click.Choice(_DTYPES), default=None, help="Dtype of the written factors.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--all", "show_all", is_flag=True, help="Show every module in the table (default: at most 40).")
@output_options
@click.pass_context
def fit(ctx: click.Context, adapter, engine, out, max_rank, base, data, dtype, force, show_all, fmt):
    """Turn ADAPTER into one ENGINE loads and applies fully, written to OUT in
    the engine's layout (a PEFT directory for vllm, lorax, sglang, ollama;
    GGUF for llama.cpp; an mlx-lm directory; a diffusers or kohya file).

    LoRA above the rank limit becomes its best rank-R approximation; LoHa,
    LoKr and Tucker become plain LoRA; DoRA becomes plain LoRA of its
    effective update (needs --base); modules_to_save become a LoRA of their
    delta (needs --base) or are dropped and named with their share of ‖ΔW‖².
    The output is then checked with check --serving and check --applied.
    """
    from ..errors import OptionError
    from ..fit import fit as do_fit
    from ..fit import verify_fit
    from ..views.fit import fit_view
    from .rewrite import as_usage

    if data is not None and base is None:
        raise click.UsageError("--data needs --base (the Hugging Face base model the text is run through)")
    ad = load_adapter(adapter)
    try:
        res = do_fit(ad, Path(out), engine, max_rank=max_rank, base=Path(base) if base else None, dtype=dtype,
                     force=force)
    except OptionError as e:
        raise as_usage(e) from e
    if data is not None:
        try:
            verify_fit(res, Path(base), Path(data))
        except (InspectError, ValueError) as e:
            res.notes.append(f"--data not run: {e}")
    emit(fit_view(res, max_rows=None if show_all or fmt != "table" else 40), fmt)
    if not res.ok:
        sys.stdout.flush()
        ctx.exit(EXIT_RULE_FAILED)
