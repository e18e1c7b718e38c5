"""``report`` (an HTML page or Markdown with PNGs for one or more adapters) and ``diff`` (two adapters,
module by module). Wiring only: the maths lives in :mod:`lora_inspect.diff` / :mod:`lora_inspect.analysis`,
the pages in :mod:`lora_inspect.report`."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import click

from ..analysis import analyse
from ..defaults import DEFAULT_ENERGY
from ..diff import diff_adapters
from ..errors import InspectError
from ..files import AtomicOutput, write_bytes
from ..formats import load_adapter
from ..report import REPORT_FORMATS, build_report, require_matplotlib
from ..views.diff import diff_view
from ..views.render import emit, progress, say
from ..views.words import plural
from ._options import ENERGY, base_options, heads_option, open_base, output_options, with_heads

__all__ = ["report", "diff"]


def _inputs(adapters) -> list[Path]:
    """Every path an adapter argument covers (its directory, or the file and a sidecar config).
    ``realpath``, not ``Path.resolve``: a symlink loop is then an unreadable input, not a crash."""
    return [Path(os.path.realpath(a)) for a in adapters]


def _check_target(path: Path, inputs: list[Path], force: bool) -> None:
    rp = Path(os.path.realpath(path))
    for src in inputs:
        if rp == src or (src.is_dir() and src in rp.parents):
            raise InspectError(f"{path}: refusing to write into the input adapter {src}")
    if path.exists() and not force:
        raise InspectError(f"{path}: already exists", hint="use --force to overwrite")
    if path.exists() and path.is_dir():
        raise InspectError(f"{path}: is a directory")
    if not path.parent.is_dir():
        raise InspectError(f"{path.parent}: no such directory")


def _write_atomic(path: Path, data: bytes) -> None:
    """Write beside the target and rename over it: readers never see a half-written file; an OS
    error is one line, and the temporary is removed."""
    with AtomicOutput(path, suffix=path.suffix) as atomic:
        write_bytes(atomic.tmp, data)
        atomic.commit()


def _report_format(out: Path, fmt: str | None) -> str:
    """The page format: from --format or the suffix; an output named for another format (x.pdf) is
    refused rather than silently written as HTML."""
    by_suffix = REPORT_FORMATS.get(out.suffix.lower())
    if by_suffix is None:
        raise InspectError(f"{out}: report writes .html or .md pages, not {out.suffix or 'a file without a suffix'}",
                           hint="name the output report.html or report.md")
    if fmt is not None and fmt != by_suffix:
        raise InspectError(f"{out}: --format {fmt} contradicts the {out.suffix} suffix")
    return by_suffix


@click.command(
    short_help="Write an HTML or Markdown report page with plots.",
    epilog="""\b
Examples:
  lora-inspect report ./my-adapter -o report.html
  lora-inspect report ./run-r8 ./run-r64 -o compare.html --energy 0.99
  lora-inspect report ./my-adapter -o report.md    # Markdown + PNGs beside it
  lora-inspect report ./my-adapter --base ./base-model --intruders \\
      -o report.html
"""
)
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", "output", required=True, type=click.Path(), help="The page to write (.html or .md).")
@click.option(
    "--format", "fmt", type=click.Choice(["html", "md"]), default=None,
    help="html: one self-contained file (images inline); md: Markdown with PNG files beside it. "
    "Default: from the --output suffix (.html/.htm → html, .md/.markdown → md; other suffixes are refused).",
)
@click.option(
    "--energy", type=ENERGY, default=DEFAULT_ENERGY, show_default=True,
    help="τ: keep this fraction of Σσ² when recommending a rank.",
)
@click.option(
    "--precision", type=click.Choice(["auto", "fp32", "fp64"]), default="auto", show_default=True,
    help="QR precision (as for `rank`).",
)
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@base_options
def report(adapters: tuple[str, ...], output: str, fmt: str | None, energy: float, precision: str, force: bool,
           base: str | None, intruders: bool, basis_cache: str | None) -> None:
    """A report page for one or more ADAPTERS, side by side: the `info` summary, heatmaps of energy rank
    and σ₁ (layers × module types), singular-value and cumulative-energy curves per module type, the
    footprint now and at the recommendation, integrity flags, and the `truncate` command lines.

    Needs matplotlib (pip install 'lora-inspect[plot]').
    """
    out = Path(output)
    inputs = _inputs(adapters)
    _check_target(out, inputs, force)
    fmt = _report_format(out, fmt)
    require_matplotlib()  # before any work
    loaded = [load_adapter(a) for a in adapters]
    ck, cache = open_base(base, intruders, basis_cache)
    total = sum(len(ad.modules) for ad in loaded) * (2 if ck is not None else 1)
    reports = []
    with progress(total, "spectra") as advance:
        for ad in loaded:
            reports.append(analyse(ad, energy, precision=precision, progress=advance, base=ck, intruders=intruders,
                                   basis_cache=cache))
    command = "lora-inspect report " + " ".join(shlex.quote(a) for a in adapters) + f" -o {shlex.quote(out.name)}"
    if energy != DEFAULT_ENERGY:
        command += f" --energy {energy:g}"
    if base is not None:
        command += f" --base {shlex.quote(base)}" + (" --intruders" if intruders else "")
    result = build_report(reports, fmt, image_prefix=out.stem, command=command)
    images = {out.parent / name: data for name, data in result.images.items()}
    for p in images:
        _check_target(p, inputs, force)
    for p, data in images.items():
        _write_atomic(p, data)
    _write_atomic(out, result.text.encode("utf-8"))
    extra = f" and {plural(len(images), 'image')} beside it" if images else ""
    say(f"wrote {out} ({fmt}, {plural(len(reports), 'adapter')}){extra}")


@click.command(
    short_help="Compare two adapters module by module (distance, cosine, φ).",
    epilog="""\b
Examples:
  lora-inspect diff ./run-seed0 ./run-seed1
  lora-inspect diff ./adapter ./adapter-r4 --top 4
  lora-inspect diff ckpt-1000/ ckpt-2000/ --json | jq .summary.mean_cosine
  lora-inspect diff a.gguf ./peft-adapter --base ./Llama-3.2-1B
"""
)
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option(
    "--energy", type=ENERGY, default=DEFAULT_ENERGY, show_default=True,
    help="τ for each side's energy rank; φ uses at most that many directions.",
)
@click.option(
    "--top", type=click.IntRange(min=1), default=1, show_default=True,
    help="K: subspace similarity φ(i, i) over the top i = min(K, rank@τ of A, rank@τ of B) singular directions.",
)
@heads_option
@click.option("--all", "show_all", is_flag=True, help="Show every module in the table (default: at most 40).")
@output_options
def diff(a: str, b: str, energy: float, top: int, base: str | None, show_all: bool, fmt: str) -> None:
    """Compare adapters A and B module by module: relative distance ‖ΔW_A − ΔW_B‖_F / ‖ΔW_A‖_F,
    cosine similarity, and subspace similarity φ of the top singular directions (LoRA paper §7).

    Exact, from the factors' small cores — no dense ΔW is formed. Modules are paired by name (PEFT
    with PEFT, kohya with kohya); modules on one side only, and shape mismatches, are listed. A
    llama-family GGUF stores Q/K rows permuted per head: --base gives the head counts.
    """
    ad_a, ad_b = with_heads([load_adapter(a), load_adapter(b)], base)
    res = diff_adapters(ad_a, ad_b, top=top, energy=energy)
    emit(diff_view(res, max_rows=None if show_all or fmt != "table" else 40), fmt)
