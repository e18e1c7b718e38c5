"""``convert`` and ``merge`` (wiring only; the work lives in :mod:`lora_inspect.convert`)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import InspectError, OptionError
from ..formats import load_adapter
from ..rewrite import TruncateSpec
from ..views.render import emit, warn
from ._options import output_options
from .rewrite import _as_usage, _count, _size, _with_flag

__all__ = ["convert", "merge"]

_TARGETS = ("peft", "kohya", "diffusers", "mlx", "gguf")
_DTYPES = ("fp32", "bf16", "fp16")
_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


@click.command(
    "convert",
    epilog="""\b
Examples:
  lora-inspect convert ./my-adapter --to mlx -o ./my-adapter-mlx
  lora-inspect convert ./my-adapter --to gguf -o lora.gguf --base ./base-model --dtype fp16
  lora-inspect convert ./my-adapter --to kohya -o lora.safetensors
  lora-inspect convert lora.safetensors --to diffusers -o pytorch_lora_weights.safetensors
  lora-inspect convert ./mlx-adapter --to peft -o ./peft-adapter --json
  lora-inspect convert ./peft-unet-adapter --component unet --to kohya -o lora.safetensors
""",
)
@click.argument("adapter", type=click.Path())
@click.option("--to", "target", required=True, type=click.Choice(_TARGETS), help="The layout to write.")
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Where to write it.")
@click.option("--dtype", type=click.Choice(_DTYPES), default=None,
              help="Dtype of the written factors (default: the source's 16-bit dtype, else fp32).")
@click.option("--arch", default=None, help="GGUF: the base's llama.cpp architecture (llama, qwen2 …).")
@click.option("--base", type=click.Path(exists=True), default=None,
              help="GGUF: the base model directory or its config.json (architecture, head counts).")
@click.option("--component", type=click.Choice(_COMPONENTS), default=None,
              help="A one-model adapter (PEFT, mlx-lm) trained on this pipeline part, for diffusers/kohya output.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--all", "show_all", is_flag=True, help="Show every module in the table (default: at most 40).")
@output_options
def convert(adapter, target, out, dtype, arch, base, component, force, show_all, fmt):
    """Write ADAPTER in another layout with every ΔW unchanged.

    What the target cannot express is handled explicitly and listed per module: per-module α or
    rsLoRA baked into B, unequal ranks zero-padded (mlx-lm), Q/K rows permuted (llama GGUF).
    A module the target cannot hold at all (DoRA or conv to GGUF, conv to mlx-lm) is refused in
    one line. OUT is written atomically and re-read (GGUF: with gguf.GGUFReader) before it appears.
    """
    from ..convert.run import convert as do_convert
    from ..views.algebra import convert_view

    ad = load_adapter(adapter)
    try:
        res = do_convert(ad, Path(out), target, dtype=dtype, arch=arch, base=Path(base) if base else None,
                         force=force, component=component)
    except InspectError as e:
        raise _with_flag(e) from e
    emit(convert_view(res, max_rows=None if show_all or fmt != "table" else 40), fmt)


def _weights(_ctx, _param, value):
    if value is None:
        return None
    try:
        return [float(x) for x in value.split(",")]
    except ValueError as e:
        raise click.BadParameter(f"expected numbers separated by commas, got {value!r}") from e


@click.command(
    "merge",
    epilog="""\b
Examples:
  lora-inspect merge ./style ./subject -o ./both                       # exact: rank r1 + r2
  lora-inspect merge ./style ./subject --weights 0.7,0.3 --rank 64 -o ./both
  lora-inspect merge ./a ./b ./c --energy 0.99 -o ./abc --json
  lora-inspect merge ./peft-adapter kohya.safetensors --to kohya -o merged.safetensors
""",
)
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Where to write the merged adapter.")
@click.option("--weights", callback=_weights, default=None, help="One weight per adapter, e.g. 0.7,0.3 (default: 1 each).")
@click.option("--rank", type=int, default=None, help="Keep the best rank-K approximation of each merged ΔW.")
@click.option("--energy", type=float, default=None, help="Each module to its energy rank at τ.")
@click.option("--max-params", callback=_count, default=None, help="Budget of factor parameters (20M …).")
@click.option("--max-size", callback=_size, default=None, help="Budget for the weight file (512MiB …).")
@click.option("--to", "target", type=click.Choice(_TARGETS[:4]), default=None,
              help="Output layout (default: the first adapter's).")
@click.option("--dtype", type=click.Choice(_DTYPES), default=None, help="Dtype of the written factors.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--all", "show_all", is_flag=True, help="Show every module in the table (default: at most 40).")
@output_options
def merge(adapters, out, weights, rank, energy, max_params, max_size, target, dtype, force, show_all, fmt):
    """Write the exact weighted sum Σ wᵢ·ΔWᵢ of ADAPTERS to OUT.

    Computed per module in factor space (scaled B's side by side, A's stacked, QR of both, a small
    SVD): never a dense ΔW. Without a rank option the result is exact (rank Σrᵢ, less where the
    updates are linearly dependent); --rank/--energy/--max-params/--max-size keep the best
    approximation (Eckart–Young), chosen as truncate does. Works across ranks, rsLoRA, patterns and
    layouts (module names must map onto each other); DoRA is refused. Atomic and self-checked.
    """
    from ..convert.merge import merge as do_merge
    from ..views.algebra import merge_view

    given = [x for x in (rank, energy, max_params, max_size) if x is not None]
    if len(given) > 1:
        raise click.UsageError("give at most one of --rank, --energy, --max-params, --max-size")
    spec = None
    if given:
        spec = TruncateSpec(rank=rank, energy=energy, max_params=max_params, max_bytes=max_size)
        try:
            spec.validate()
        except OptionError as e:
            raise _as_usage(e) from e
    if len(adapters) < 2:
        raise click.UsageError("merge needs at least two adapters")
    ads = [load_adapter(a) for a in adapters]
    try:
        res = do_merge(ads, Path(out), weights=weights, spec=spec, target=target, dtype=dtype, force=force)
    except OptionError as e:
        raise _as_usage(e) from e
    except InspectError as e:
        raise _with_flag(e) from e
    for n in res.notes:
        if n.startswith("removed "):
            warn(n)
    emit(merge_view(res, max_rows=None if show_all or fmt != "table" else 40), fmt)
