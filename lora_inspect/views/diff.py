"""The ``diff`` document (``lora-inspect/diff/1``) and its tables."""

from __future__ import annotations

from typing import Any

from ..diff import STATUS_OK, DiffResult, ModuleDiff
from .inspect import adapter_summary
from .render import Table, View, fmt_float
from .schemas import DIFF_SCHEMA

__all__ = ["diff_view", "PHI_DEFINITION"]

PHI_DEFINITION = (
    "phi(i, i) = ||U_i^T U'_i||_F^2 / i over the top-i left singular vectors of each side "
    "(Hu et al. 2021, LoRA, section 7), at i = min(top, energy rank at tau of A, of B)"
)



def _num(x: float | None, digits: int = 4) -> str:
    return fmt_float(x, digits)


def _module_diff_doc(d) -> dict:
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


def _names_line(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


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
        "summary": s,
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
    title = f"{len(res.modules)} modules in both" + (
        f" (first {max_rows}; --all for every module)" if max_rows is not None and len(res.modules) > max_rows else ""
    )
    tables = [Table(
        title,
        ["module", "shape", "r A", "r B", "‖ΔW_A‖", "‖A−B‖/‖A‖", "cosine", "φ", "φ at i", "status"],
        rows,
        justify=["left"] + ["right"] * 8 + ["left"],
    )]
    trows = [
        (t, g["modules"], _num(g["mean_rel_distance"]), _num(g["max_rel_distance"]), _num(g["mean_cosine"]),
         _num(g["min_cosine"]), _num(g["mean_phi"]), _num(g["min_phi"]))
        for t, g in s["by_type"].items()
    ]
    tables.append(Table("by module type", ["type", "modules", "mean dist", "worst dist", "mean cos", "worst cos",
                                           "mean φ", "worst φ"], trows))
    header = [f"A: {res.a.path} ({res.a.format})", f"B: {res.b.path} ({res.b.format})"]
    footer = []
    if s["compared"]:
        footer.append(
            f"{s['compared']} compared: relative distance ‖ΔW_A−ΔW_B‖_F/‖ΔW_A‖_F mean {_num(s['mean_rel_distance'])}, "
            f"worst {_num(s['max_rel_distance'])} ({s['max_rel_distance_module']}); cosine mean {_num(s['mean_cosine'])}, "
            f"worst {_num(s['min_cosine'])} ({s['min_cosine_module']})"
        )
        footer.append(
            f"φ = subspace similarity of the top-i left singular vectors (LoRA §7), i = min(--top {res.top}, "
            f"rank@{res.energy:g} of A, of B): mean {_num(s['mean_phi'])}, worst {_num(s['min_phi'])}"
        )
    if s["shape_mismatches"]:
        footer.append(f"! {s['shape_mismatches']} modules differ in shape: not comparable")
    if s["non_finite"]:
        footer.append(f"! {s['non_finite']} modules hold NaN/inf values: not compared")
    if res.only_in_a:
        footer.append(f"only in A ({len(res.only_in_a)}): {_names_line(res.only_in_a)}")
    if res.only_in_b:
        footer.append(f"only in B ({len(res.only_in_b)}): {_names_line(res.only_in_b)}")
    return View(data, tables, header=header, footer=footer)
