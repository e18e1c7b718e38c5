"""``extract``: a LoRA from a fine-tuned checkpoint (wiring only; the work lives in
:mod:`lora_inspect.extract`)."""

from __future__ import annotations

import os

import click

from ..convert.run import DTYPES
from ..errors import OptionError
from ..formats import TARGETS
from ..views.extract import extract_view, stage_progress
from ..views.render import emit
from ._options import ENERGY, output_options
from .rewrite import as_usage, max_size_callback

__all__ = ["extract", "pick_device"]

EMBEDDINGS = ("save", "lora", "skip")


def pick_device(device: str) -> str:
    """``auto``: cuda where an NVIDIA device is present (checked without importing torch), else cpu."""
    if device != "auto":
        return device
    return "cuda" if os.path.exists("/dev/nvidiactl") and _cuda() else "cpu"


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@click.command(
    "extract",
    short_help="Extract a LoRA from a fine-tuned checkpoint (best rank-k ΔW).",
    epilog="""\b
Examples:
  lora-inspect extract ./Llama-3.2-1B ./my-finetune -o ./lora --rank 16
  lora-inspect extract ./base ./tuned -o ./lora --energy 0.9
  lora-inspect extract ./base ./tuned -o ./lora --max-size 64MB --json
  lora-inspect extract sd15.safetensors tuned.safetensors \\
      -o lora.safetensors --rank 32
  lora-inspect extract ./sdxl-base ./sdxl-tuned -o lora.safetensors \\
      --rank 64 --dtype bf16

BASE and TUNED: Hugging Face model directories (sharded or not), diffusers
pipelines, or single .safetensors checkpoints, with the same tensors.
Output: PEFT for transformers models, kohya for image models (--to).
""",
)
@click.argument("base", type=click.Path())
@click.argument("tuned", type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Where to write the adapter.")
@click.option("--rank", type=click.IntRange(min=1), default=None, help="Every module at rank min(K, out, in).")
@click.option("--energy", type=ENERGY, default=None, help="Each module at its energy rank: keeps ≥ τ of ‖ΔW‖².")
@click.option("--max-size", callback=max_size_callback, default=None,
              help="Budget for the output (20MB, 512MiB): ranks allocated by σ² per byte.")
@click.option("--to", "to", type=click.Choice(TARGETS), default=None,
              help="Output layout (default: peft for transformers models, kohya for image models).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True,
              help="Factor dtype; its rounding is included in the reported error.")
@click.option("--embeddings", type=click.Choice(EMBEDDINGS), default="save", show_default=True,
              help="Changed embeddings and lm_head: save whole (modules_to_save), as LoRA, or skip.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="cuda: the exact float64 route on a GPU (torch).")
@click.option("--seed", type=int, default=0, show_default=True, help="Start of the randomised range finder.")
@click.option("--calibrate", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Text (.txt, .jsonl): least output error on it (transformers BASE; needs torch).")
@click.option("--reference-rank", type=click.IntRange(min=1), default=None,
              help="With --calibrate: the rank of the reference extraction (default max(64, 4K)).")
@click.option("--ridge", type=float, default=1e-2, show_default=True, help="With --calibrate: λ = ridge·tr(Σ)/in.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="With --calibrate: at most N tokens.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--all", "show_all", is_flag=True, help="Show every module in the table (default: at most 40).")
@output_options
def extract_cmd(base, tuned, out, rank, energy, max_size, to, dtype, embeddings, device, seed, calibrate,
                reference_rank, ridge, max_tokens, force, show_all, fmt):
    """Extract a LoRA adapter of TUNED − BASE into OUT.

    Every changed linear and conv weight becomes a LoRA module: the best rank-k approximation of
    ΔW = TUNED − BASE (Eckart–Young, float64, with a certificate). Unchanged tensors are skipped;
    changed norms, biases and embeddings are listed with their share of the change. OUT is written
    atomically, re-read and checked before it appears.
    """
    from ..extract.results import ExtractSpec
    from ..extract.run import extract

    given = [f for f, v in (("--rank", rank), ("--energy", energy), ("--max-size", max_size)) if v is not None]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --rank, --energy, --max-size"
                               + (f" (got {', '.join(given)})" if given else ""))
    spec = ExtractSpec(rank=rank, energy=energy, max_bytes=max_size, to=to, dtype=dtype, embeddings=embeddings,
                       seed=seed)
    if calibrate is not None:
        _calibrated(base, tuned, out, spec, calibrate, reference_rank, ridge, max_tokens, pick_device(device), force,
                    fmt, show_all)
        return
    if reference_rank is not None:
        raise click.UsageError("--reference-rank goes with --calibrate FILE")
    with stage_progress(fmt == "table") as on_step:
        try:
            res = extract(base, tuned, out, spec, force=force, on_step=on_step, device=pick_device(device))
        except OptionError as e:
            raise as_usage(e) from e
    emit(extract_view(res, max_rows=None if show_all or fmt != "table" else 40), fmt)


def _calibrated(base, tuned, out, spec, calibrate, reference_rank, ridge, max_tokens, device, force, fmt,
                show_all) -> None:
    """``--calibrate``: extract a reference adapter (PEFT, float32, rank R = ``--reference-rank``, default
    max(64, 4K)) into a scratch directory beside OUT (:class:`~lora_inspect.files.AtomicOutput`, never committed), then run the calibrated truncation of
    ``truncate --calibrate`` on it against BASE: the propagated fit, and the held-out check that writes the
    calibrated factors only where they beat plain truncation (docs/calibrate.md)."""
    from dataclasses import replace
    from pathlib import Path

    from ..extract.run import extract
    from ..formats import load_adapter
    from ..rewrite import TruncateSpec
    from ..views import adapter_summary
    from ..views.extract import calibrated_extract_view
    from ..views.rewrite import truncate_view
    from .calibrate import calibrated

    if spec.to not in (None, "peft") or spec.dtype != "fp32":
        raise click.UsageError("--calibrate writes a float32 PEFT adapter: drop --to and --dtype")
    from ..files import AtomicOutput, check_output_path
    from ..formats import ADAPTER_MARKERS

    for inp in (Path(base), Path(tuned)):
        if inp.exists():
            check_output_path(inp, inp, Path(out), force, ADAPTER_MARKERS)
    ref_rank = reference_rank or max(64, 4 * (spec.rank or 16))
    parent = Path(out).resolve().parent
    if not parent.is_dir():
        raise click.UsageError(f"{parent}: no such directory for OUT")
    # a scratch directory beside OUT that is never committed: removed on leaving, found as stale if killed
    with AtomicOutput(Path(out), suffix="-reference") as scratch:
        reference = scratch.mkdir() / "reference"
        ref_spec = replace(spec, rank=ref_rank, energy=None, max_bytes=None, to="peft")
        try:
            with stage_progress(fmt == "table") as on_step:
                ref = extract(base, tuned, reference, ref_spec, force=force, on_step=on_step, device=device)
            ad = load_adapter(reference)
            tspec = TruncateSpec(rank=spec.rank, energy=spec.energy, max_bytes=spec.max_bytes)
            res = calibrated(ad, out, tspec, calibrate, str(base), ridge, max_tokens, None, device, force,
                             fmt == "table")
        except OptionError as e:
            raise as_usage(e) from e
        view = truncate_view(res, adapter_summary(ad), max_rows=None if show_all or fmt != "table" else 40)
    spectra = [m.singular_values for m in res.modules]
    emit(calibrated_extract_view(view, ref, spectra, ref_rank), fmt)


extract = extract_cmd
