"""``info`` and ``rank``: what an adapter is, and how much rank it really uses."""

from __future__ import annotations

import click

from ..defaults import DEFAULT_ENERGY
from ..formats import load_adapter
from ..views.inspect import info_view, rank_view
from ..views.render import emit, progress
from ._options import ENERGY, base_options, open_base, output_options

__all__ = ["info", "rank"]


@click.command(
    short_help="Show an adapter's layout, settings, modules and sizes.",
    epilog="""\b
Examples:
  lora-inspect info ./my-adapter
  lora-inspect info adapter_model.safetensors --json
"""
)
@click.argument("adapter", type=click.Path())
@output_options
def info(adapter: str, fmt: str) -> None:
    """Layout, settings, modules and sizes of ADAPTER — from the file header alone.

    ADAPTER is a PEFT directory, an mlx-lm directory, or a .safetensors/.bin file (PEFT keys,
    kohya, diffusers).
    """
    emit(info_view(load_adapter(adapter)), fmt)


@click.command(
    short_help="Measure the rank each module really uses; recommend one.",
    epilog="""\b
Examples:
  lora-inspect rank ./my-adapter
  lora-inspect rank lora.safetensors --energy 0.99 --module 'q_proj|v_proj'
  lora-inspect rank ./my-adapter --json | jq .summary.uniform_rank
  lora-inspect rank ./my-adapter --base ./Llama-3.2-1B --intruders
"""
)
@click.argument("adapter", type=click.Path())
@click.option(
    "--energy", type=ENERGY, default=DEFAULT_ENERGY, show_default=True,
    help="τ: keep this fraction of Σσ² (the squared Frobenius norm of ΔW) when recommending a rank.",
)
@click.option("--module", "module_regex", default=None, help="Only modules whose name matches this regex (re.search).")
@click.option(
    "--precision", type=click.Choice(["auto", "fp32", "fp64"]), default="auto", show_default=True,
    help="QR precision; auto = fp32 for 16-bit tensors, fp64 otherwise. The r×r core is always fp64.",
)
@click.option("--all", "show_all", is_flag=True, help="Show every module in the table (default: at most 40).")
@base_options
@output_options
def rank(adapter: str, energy: float, module_regex: str | None, precision: str, show_all: bool, fmt: str,
         base: str | None, intruders: bool, basis_cache: str | None) -> None:
    """Exact singular values of every module's ΔW = scale·B·A, and the rank it really needs.

    Spectra come from QR factors of B and Aᵀ and an r×r SVD — never the dense out×in product.
    """
    from ..analysis import analyse

    ad = load_adapter(adapter)
    ck, cache = open_base(base, intruders, basis_cache)
    n = len(ad.modules) * (2 if ck is not None else 1)
    with progress(n, "spectra", enabled=fmt == "table") as advance:
        report = analyse(ad, energy, module_regex=module_regex, precision=precision, progress=advance,
                         base=ck, intruders=intruders, basis_cache=cache)
    emit(rank_view(report, max_rows=None if show_all or fmt != "table" else 40), fmt)
