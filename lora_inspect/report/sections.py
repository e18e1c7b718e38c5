"""The report's content, once: a list of :class:`Section` built from the typed results, which the
HTML writer (:mod:`.html`) and the Markdown writer (:mod:`.markdown`) both render block by block.

A section holds ``intro`` blocks and ``grids``; a grid is a row of cells (one per adapter, side by
side in HTML), each a list of blocks. Blocks are small dataclasses (:data:`Block`): text, bullets,
a table, footprint bars, an image, command lines, or a collapsed group.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from ..analysis import RankReport
from ..naming import natural_sorted
from ..units import fmt_bytes, plural
from ..views.base import base_lines, base_table
from ..views.inspect import action_line, info_view, integrity_lines, rank_view
from ..views.render import Table, fmt_count
from .figures import AdapterFigures, Figure

__all__ = ["SECTIONS", "Section", "Grid", "Cell", "Text", "Bullets", "TableBlock", "Bars", "Image", "Commands",
           "Details", "Block", "build_sections", "truncate_commands", "labels_for"]

SECTIONS = [
    ("overview", "Overview"),
    ("info", "Adapter"),
    ("heatmap", "Energy rank and σ₁ by layer × module type"),
    ("spectra", "Singular values and cumulative energy by module type"),
    ("footprint", "Footprint now and at the recommendation"),
    ("integrity", "Integrity"),
    ("apply", "Apply the recommendation"),
    ("modules", "Every module"),
]


@dataclass
class Text:
    text: str
    style: str = ""  # "" | "meta" (a caption) | "empty" (nothing to show) | "strong-label" (label: text)
    label: str | None = None


@dataclass
class Bullets:
    items: list[tuple[str, str]]  # (severity "!" / "·" / "note", sentence)


@dataclass
class TableBlock:
    table: Table
    key_column: bool = False  # the first column names fields (info)


@dataclass
class Bars:
    rows: list[tuple[str, int, int, float]]  # (label, params, bytes, fraction of now)
    caption: str


@dataclass
class Image:
    figure: Figure
    kind: str  # "heatmap" | "spectrum"
    label: str  # the adapter's label
    index: int  # the adapter's position (Markdown image file names)


@dataclass
class Commands:
    items: list[tuple[str, str]]  # (comment, command line)


@dataclass
class Details:
    summary: str
    blocks: Sequence["Block"]


Block = Union[Text, Bullets, TableBlock, Bars, Image, Commands, Details]  # noqa: UP007 (a runtime alias)


@dataclass
class Cell:
    label: str | None
    blocks: Sequence[Block]


@dataclass
class Grid:
    heading: str | None
    cells: list[Cell]


@dataclass
class Section:
    sid: str
    title: str
    intro: Sequence[Block] = field(default_factory=list)
    grids: list[Grid] = field(default_factory=list)


def _suggested_out(path: Path, tag: str) -> str:
    if path.suffix in (".safetensors", ".bin"):
        return str(path.with_name(f"{path.stem}-{tag}{path.suffix}"))
    return str(path.with_name(f"{path.name.rstrip('/')}-{tag}"))


def truncate_commands(report: RankReport) -> list[tuple[str, str]]:
    """(comment, command line) pairs that apply the recommendation with ``lora-inspect truncate``;
    none when a module holds NaN/inf (truncate refuses such an adapter)."""
    s = report.summary
    p = report.adapter.path
    out: list[tuple[str, str]] = []
    if s.analysed == 0 or s.non_finite:
        return out
    if s.uniform_rank < s.max_rank:
        k = s.uniform_rank
        out.append((
            f"one rank for all modules: {fmt_count(s.params.now)} → {fmt_count(s.params.uniform)} parameters, "
            f"each keeps ≥ {s.uniform_min_retained_energy:.4f} of its energy",
            f"lora-inspect truncate {shlex.quote(str(p))} -o {shlex.quote(_suggested_out(p, f'r{k}'))} --rank {k}",
        ))
    if s.params.pattern < s.params.now:
        out.append((
            f"per-module ranks (energy rank at τ = {report.energy:g}): "
            f"{fmt_count(s.params.now)} → {fmt_count(s.params.pattern)} parameters",
            f"lora-inspect truncate {shlex.quote(str(p))} -o {shlex.quote(_suggested_out(p, f'e{report.energy:g}'))} "
            f"--energy {report.energy:g}",
        ))
    return out


def labels_for(reports: list[RankReport]) -> list[str]:
    names = [r.adapter.path.name or str(r.adapter.path) for r in reports]
    return [n if names.count(n) == 1 else f"{n} [{i + 1}]" for i, n in enumerate(names)]


def _overview(reports: list[RankReport], labels: list[str]) -> Table:
    rows = []
    for lab, r in zip(labels, reports):
        s, ad = r.summary, r.adapter
        rows.append((
            lab, ad.format, len(ad.modules), ", ".join(map(str, sorted({m.rank for m in ad.modules}))),
            fmt_count(s.params.now), s.uniform_rank, fmt_count(s.params.uniform),
            fmt_count(s.params.pattern), sum(s.flags.values()),
        ))
    return Table(None, ["adapter", "format", "modules", "r", "params", "uniform rank", "params at uniform",
                        "params per-module", "flags"], rows,
                 justify=["left", "left"] + ["right"] * 7)


def _footprint(report: RankReport) -> Bars:
    s = report.summary
    now = max(s.params.now, 1)
    ranks = ", ".join(map(str, sorted({m.rank for m in report.adapter.modules})))
    rows = [(label, p, b, p / now) for label, p, b in (
        (f"now (r = {ranks})", s.params.now, s.bytes.now),
        (f"uniform rank {s.uniform_rank}", s.params.uniform, s.bytes.uniform),
        (f"per-module ranks at τ = {report.energy:g}", s.params.pattern, s.bytes.pattern),
    )]
    caption = (f"Bytes of the low-rank factors at their stored dtype; full tensors (modules_to_save) add "
               f"{fmt_bytes(report.adapter.extra_bytes)}. Uniform rank keeps ≥ "
               f"{s.uniform_min_retained_energy:.4f} of every module's energy.")
    return Bars(rows, caption)


def _integrity(report: RankReport) -> list[Block]:
    """Findings from the typed results (never from another view's text), then the flagged modules."""
    items = integrity_lines(report)
    items += [("note", n) for n in report.adapter.notes]
    if report.adapter.use_dora:
        items.append(("note", "DoRA adapter — spectra describe the low-rank part s·B@A; the magnitude "
                              "rescaling is not low rank"))
    mods = [(r.name, ", ".join(r.flags)) for r in report.modules if r.flags]
    if not items and not mods:
        return [Text("no flags: every module is finite, non-zero and not dominated by one direction", "empty")]
    out: list[Block] = [Bullets(items)] if items else []
    if mods:
        out.append(TableBlock(Table(plural(len(mods), "flagged module"), ["module", "flags"], mods[:200],
                                    justify=["left", "left"])))
    return out


def _apply(report: RankReport) -> list[Block]:
    cmds = truncate_commands(report)
    out: list[Block] = [Text(action_line(report))]
    return out + ([Commands(cmds)] if cmds else [])


SPECTRA_CAPTION = (
    "Left: σᵢ of each module's ΔW on a log scale, one line per module coloured by layer, dots at each "
    "module's energy rank. Right: Σᵢ₌₁ᵏ σᵢ² / Σᵢ σᵢ², the fraction of ‖ΔW‖²_F a rank-k truncation keeps "
    "(Eckart–Young); dotted: τ; dashed: the type's recommended rank."
)
HEATMAP_CAPTION = "Both adapters' heatmaps share one colour scale per panel: equal colours are equal values."


def _per_adapter(labels: list[str], blocks: Sequence[Sequence[Block]]) -> Grid:
    return Grid(None, [Cell(lab, b) for lab, b in zip(labels, blocks)])


def _spectra(labels: list[str], figs: list[AdapterFigures]) -> list[Grid]:
    grids = []
    for t in natural_sorted({t for f in figs for t in f.types}):
        cells = []
        for i, (lab, f) in enumerate(zip(labels, figs)):
            body: list[Block] = ([Image(f.types[t], "spectrum", lab, i)] if t in f.types
                                 else [Text("not adapted", "empty")])
            cells.append(Cell(lab if len(labels) > 1 else None, body))
        grids.append(Grid(t, cells))
    return grids


BASE_SECTION = ("base", "Against the base model")  # only with report --base
BASE_CAPTION = (
    "‖ΔW‖/‖W‖ and σ₁(ΔW)/σ₁(W): how large the update is next to the base weight (flag: σ₁ ratio ≥ 0.5). "
    "Amplification ‖ΔW‖_F / ‖U_ΔᵀWV_Δ‖_F (Hu et al. 2021, §7.3): how much ΔW amplifies directions W does not "
    "emphasise. Overlap: normalised subspace similarity of ΔW's directions with W's top-k (k = its rank), beside "
    "a random subspace's k/out. Intruders: top-10 singular vectors of W+ΔW with |cos| < 0.5 to every singular "
    "vector of W (Shuttleworth et al. 2024). Definitions: docs/metrics.md."
)


def _base_blocks(report: RankReport) -> list[Block]:
    if report.base is None:
        return [Text("no base given", "empty")]
    out: list[Block] = []
    items = base_lines(report)
    if items:
        out.append(Bullets(items))
    out.append(TableBlock(base_table(report, max_rows=None)))
    return out


def _base_sections(reports: list[RankReport], labels: list[str]) -> list[Section]:
    if all(r.base is None for r in reports):
        return []
    return [Section(BASE_SECTION[0], BASE_SECTION[1], [Text(BASE_CAPTION, "meta")],
                    [_per_adapter(labels, [_base_blocks(r) for r in reports])])]


def build_sections(reports: list[RankReport], figs: list[AdapterFigures]) -> list[Section]:
    """Every section of the page, in :data:`SECTIONS` order."""
    labels = labels_for(reports)
    title = dict(SECTIONS)
    heat = [[Image(f.heatmap, "heatmap", lab, i)] if f.heatmap else [Text("nothing to plot", "empty")]
            for i, (lab, f) in enumerate(zip(labels, figs))]
    return [
        Section("overview", title["overview"], [TableBlock(_overview(reports, labels))]
                + [Text(action_line(r), label=lab) for lab, r in zip(labels, reports)]),
        Section("info", title["info"], grids=[_per_adapter(labels, [
            [TableBlock(t, key_column=True) for t in info_view(r.adapter).tables] for r in reports])]),
        Section("heatmap", title["heatmap"], [Text(HEATMAP_CAPTION, "meta")] if len(reports) > 1 else [],
                [_per_adapter(labels, heat)]),
        Section("spectra", title["spectra"], [Text(SPECTRA_CAPTION, "meta")], _spectra(labels, figs)),
        Section("footprint", title["footprint"], grids=[_per_adapter(labels, [[_footprint(r)] for r in reports])]),
        Section("integrity", title["integrity"], grids=[_per_adapter(labels, [_integrity(r) for r in reports])]),
        *_base_sections(reports, labels),
        Section("apply", title["apply"], grids=[_per_adapter(labels, [_apply(r) for r in reports])]),
        Section("modules", title["modules"], grids=[_per_adapter(labels, [
            [Details("show the table", [TableBlock(t) for t in rank_view(r, max_rows=None).tables])]
            for r in reports])]),
    ]
