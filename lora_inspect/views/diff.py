"""The ``diff`` document (``lora-inspect/diff/1``) and its tables."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from ..diff import STATUS_OK, DiffResult, DiffStats, DiffSummary, ModuleDiff
from ..naming import names_line
from .inspect import adapter_summary
from .render import Table, View, fmt_float
from .schemas import DIFF_SCHEMA
from .words import plural, verb

__all__ = ["diff_view", "PHI_DEFINITION"]

PHI_DEFINITION = (
    "phi(i, i) = ||U_i^T U'_i||_F^2 / i over the top-i left singular vectors of each side "
    "(Hu et al. 2021, LoRA, section 7), at i = min(top, energy rank at tau of A, of B)"
)



def _num(x: float | None, digits: int = 4) -> str:
    return fmt_float(x, digits)


def _module_diff_doc(d: ModuleDiff) -> dict[str, Any]:
    return {
        "name": d.name,
        "type": d.type,
        "layer": d.layer,
        "status": d.status,
        "shape_a": list(d.shape_a),
        "shape_b": list(d.shape_b),
        "rank_a": d.rank_a,
        "rank_b": d.rank_b,
        "norm_a": d.norm_a,
        "norm_b": d.norm_b,
        "distance": d.distance,
        "spectral_distance": d.spectral_distance,
        "rel_distance": d.rel_distance,
        "cosine": d.cosine,
        "phi": d.phi,
        "phi_dim": d.phi_dim,
        "energy_rank_a": d.energy_rank_a,
        "energy_rank_b": d.energy_rank_b,
        "notes": list(d.notes),
    }


def _stats_doc(g: DiffStats) -> dict[str, Any]:
    return {f.name: getattr(g, f.name) for f in fields(DiffStats)}


def summary_doc(s: DiffSummary) -> dict[str, Any]:
    """The ``summary`` block of ``lora-inspect/diff/1``."""
    return {**_stats_doc(s), "shape_mismatches": s.shape_mismatches, "non_finite": s.non_finite,
            "by_type": {t: _stats_doc(g) for t, g in s.by_type.items()},
            "only_in_a": s.only_in_a, "only_in_b": s.only_in_b}


def _worst(value: float | None, module: str | None) -> str:
    return "undefined" if value is None else f"{_num(value)} ({module})"


def _summary_lines(res: DiffResult) -> list[str]:
    s = res.summary
    out = []
    if s.compared:
        dist = ("undefined (ΔW_A is zero)" if s.mean_rel_distance is None
                else f"mean {_num(s.mean_rel_distance)}, worst {_worst(s.max_rel_distance, s.max_rel_distance_module)}")
        cos = ("undefined (a zero ΔW)" if s.mean_cosine is None
               else f"mean {_num(s.mean_cosine)}, worst {_worst(s.min_cosine, s.min_cosine_module)}")
        out.append(f"{s.compared} compared: relative distance ‖ΔW_A−ΔW_B‖_F/‖ΔW_A‖_F {dist}; cosine {cos}")
        phi = ("undefined (a zero ΔW)" if s.mean_phi is None
               else f"mean {_num(s.mean_phi)}, worst {_worst(s.min_phi, s.min_phi_module)}")
        out.append(f"φ = subspace similarity of the top-i left singular vectors (LoRA §7), i = min(--top {res.top}, "
                   f"rank@{res.energy:g} of A, of B): {phi}")
    for side, names in (("A", s.zero_a), ("B", s.zero_b)):
        if names:
            out.append(f"! ΔW_{side} is zero (untrained?) in {len(names):,} of {plural(s.compared, 'compared module')}, "
                       f"where cosine and φ{' and the relative distance' if side == 'A' else ''} are undefined: "
                       f"{names_line(names)}")
    return out


def diff_view(res: DiffResult, max_rows: int | None = 40) -> View:
    """The ``diff`` document (schema ``lora-inspect/diff/1``) and its tables."""
    s = res.summary
    data = {
        "schema": DIFF_SCHEMA,
        "a": adapter_summary(res.a),
        "b": adapter_summary(res.b),
        "top": res.top,
        "energy": res.energy,
        "phi_definition": PHI_DEFINITION,
        "modules": [_module_diff_doc(d) for d in res.modules],
        "only_in_a": list(res.only_in_a),
        "only_in_b": list(res.only_in_b),
        "summary": summary_doc(s),
    }
    shown = res.modules if max_rows is None else res.modules[:max_rows]
    rows = []
    for d in shown:
        shape = "×".join(map(str, d.shape_a)) + ("" if d.shape_a == d.shape_b else " vs " + "×".join(map(str, d.shape_b)))
        rows.append((
            d.name, shape, d.rank_a, d.rank_b, _num(d.norm_a, 3), _num(d.rel_distance), _num(d.cosine),
            _num(d.phi), d.phi_dim if d.phi_dim is not None else "-",
            d.status if d.status != STATUS_OK else ("zero ΔW" if d.notes else ""),
        ))
    title = f"{plural(len(res.modules), 'module')} in both" + (
        f" (first {max_rows}; --all for every module)" if max_rows is not None and len(res.modules) > max_rows else ""
    )
    tables = [Table(
        title,
        ["module", "shape", "r A", "r B", "‖ΔW_A‖", "‖A−B‖/‖A‖", "cosine", "φ", "φ at i", "status"],
        rows,
        justify=["left"] + ["right"] * 8 + ["left"],
        optional=("φ at i", "‖ΔW_A‖", "r B", "r A"),
    )]
    trows = [
        (t, g.modules, _num(g.mean_rel_distance), _num(g.max_rel_distance), _num(g.mean_cosine),
         _num(g.min_cosine), _num(g.mean_phi), _num(g.min_phi))
        for t, g in s.by_type.items()
    ]
    tables.append(Table("by module type", ["type", "modules", "mean dist", "worst dist", "mean cos", "worst cos",
                                           "mean φ", "worst φ"], trows,
                        optional=("mean φ", "mean cos", "mean dist")))  # the means over all are in the footer
    header = [f"A: {res.a.path} ({res.a.format})", f"B: {res.b.path} ({res.b.format})"]
    footer = _summary_lines(res)
    if s.shape_mismatches:
        n = s.shape_mismatches
        footer.append(f"! {plural(n, 'module')} {verb(n, 'differs')} in shape: not comparable")
    if s.non_finite:
        bad = [d.name for d in res.modules if d.status == "non_finite"]
        footer.append(f"! {plural(s.non_finite, 'module')} {verb(s.non_finite, 'has')} a non-finite ΔW (NaN/inf weights, "
                      f"or a product that overflows float64), not compared: {names_line(bad)}")
    if res.only_in_a:
        footer.append(f"only in A ({len(res.only_in_a)}): {names_line(res.only_in_a, 8)}")
    if res.only_in_b:
        footer.append(f"only in B ({len(res.only_in_b)}): {names_line(res.only_in_b, 8)}")
    return View(data, tables, header=header, footer=footer)
