"""``footprint``: what an adapter costs — parameters, bytes, serving memory, training and inference VRAM."""

from __future__ import annotations

import click

from ..analysis import analyse
from ..basemodels import load_base
from ..defaults import DEFAULT_ENERGY
from ..footprint import ADAPTER_DTYPE_BYTES, DEFAULTS, QUANT_BYTES, SERVING_DTYPE_BYTES
from ..footprint import footprint as estimate_footprint
from ..formats import load_adapter
from ..views.footprint import footprint_view
from ..views.inspect import adapter_summary
from ..views.render import emit, progress
from ._options import ENERGY, output_options

__all__ = ["footprint_cmd", "footprint"]


@click.command(
    "footprint",
    short_help="Estimate what an adapter costs: bytes, serving memory, VRAM.",
    epilog="""\b
Examples:
  lora-inspect footprint ./my-adapter
  lora-inspect footprint ./my-adapter --base llama-3-8b --quant nf4 \\
      --batch 4 --seq 2048 --grad-checkpointing
  lora-inspect footprint ./my-adapter --base ./Llama-2-7b-hf/config.json \\
      --max-loras 8 --max-lora-rank 64
  lora-inspect footprint ./my-adapter --base mistral-7b --json \\
      | jq .vram.training.total_bytes

Presets: llama-2-7b, llama-2-13b, llama-3-8b, llama-3-70b, llama-3.2-1b,
mistral-7b, qwen2.5-7b, qwen2.5-0.5b, gpt2, tiny-llama, tiny-gpt2.
""",
)
@click.argument("adapter", type=click.Path())
@click.option("--base", default=None, metavar="NAME|CONFIG.json", help="Base model: a preset name or a Hugging Face config.json (enables VRAM estimates).")
@click.option("--quant", type=click.Choice(sorted(QUANT_BYTES)), default=DEFAULTS["quant"], show_default=True, help="Base weights: bf16/fp16 2 B, int8 1 B, nf4 ≈ 0.516 B per linear-layer param.")
@click.option("--batch", type=click.IntRange(min=1), default=DEFAULTS["batch"], show_default=True, help="Sequences per step.")
@click.option("--seq", type=click.IntRange(min=1), default=DEFAULTS["seq"], show_default=True, help="Tokens per sequence.")
@click.option("--grad-checkpointing", is_flag=True, help="Activations with gradient checkpointing.")
@click.option("--optimizer", type=click.Choice(["adamw", "adamw8bit", "sgd"]), default=DEFAULTS["optimizer"], show_default=True)
@click.option("--adapter-dtype", type=click.Choice(sorted(ADAPTER_DTYPE_BYTES)), default=DEFAULTS["adapter_dtype"], show_default=True, help="Dtype adapters train in (PEFT: fp32).")
@click.option("--serving-dtype", type=click.Choice(sorted(SERVING_DTYPE_BYTES)), default=DEFAULTS["serving_dtype"], show_default=True, help="Dtype a server holds adapters in.")
@click.option("--max-loras", type=click.IntRange(min=1), default=DEFAULTS["max_loras"], show_default=True, help="vLLM --max-loras (adapter slots per batch).")
@click.option("--max-lora-rank", type=click.IntRange(min=1), default=DEFAULTS["max_lora_rank"], show_default=True, help="vLLM --max-lora-rank (every slot is padded to it).")
@click.option("--energy", type=ENERGY, default=DEFAULT_ENERGY, show_default=True, help="τ for the recommended rank (as `rank`).")
@output_options
def footprint_cmd(adapter: str, base: str | None, quant: str, batch: int, seq: int, grad_checkpointing: bool,
                  optimizer: str, adapter_dtype: str, serving_dtype: str, max_loras: int, max_lora_rank: int,
                  energy: float, fmt: str) -> None:
    """What ADAPTER costs: exact parameters and bytes (now and at the recommended rank), serving memory,
    and — with --base — training and inference VRAM, term by term with each formula.
    """
    ad = load_adapter(adapter)
    bm = load_base(base) if base else None
    with progress(len(ad.modules), "spectra", enabled=fmt == "table") as advance:
        report = analyse(ad, energy, progress=advance)
    doc = estimate_footprint(ad, report, bm, quant=quant, batch=batch, seq=seq, grad_checkpointing=grad_checkpointing,
                    optimizer=optimizer, adapter_dtype=adapter_dtype, serving_dtype=serving_dtype,
                    max_loras=max_loras, max_lora_rank=max_lora_rank)
    emit(footprint_view(doc, adapter_summary(ad)), fmt)


footprint = footprint_cmd  # the name commands/__init__.py registers
