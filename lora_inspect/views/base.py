"""The base-aware part of ``rank --base`` and ``report --base``: JSON fields, a table, finding lines.

Shown only when the report carries base metrics (:attr:`RankReport.base`); without ``--base`` the
``rank`` document is unchanged. Definitions and thresholds: :mod:`lora_inspect.basemetrics` and
``docs/metrics.md`` ("Base-aware metrics").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..defaults import FLAG_INTRUDERS, FLAG_LARGE_UPDATE
from ..naming import names_line
from .render import Table, fmt_float
from .words import plural, verb

if TYPE_CHECKING:  # pragma: no cover
    from ..analysis import RankReport
    from ..basemetrics import BaseAnalysis, BaseMetrics

__all__ = ["base_doc", "base_module_doc", "base_table", "base_lines", "BASE_OPTIONAL"]

BASE_OPTIONAL = ("in top-k", "‖W‖_F", "σ₁(W)", "overlap (random)")  # dropped in this order when narrow


def base_module_doc(m: BaseMetrics | None) -> dict[str, Any] | None:
    """The ``base`` field of one module in ``lora-inspect/rank/1`` (null when not measured)."""
    if m is None:
        return None
    return {
        "key": m.base_key, "w_fro": m.w_fro, "w_sigma1": m.w_sigma1, "delta_fro": m.delta_fro,
        "delta_sigma1": m.delta_sigma1, "relative_fro": m.relative_fro, "relative_spectral": m.relative_spectral,
        "projection": m.projection, "amplification": m.amplification, "overlap": m.overlap, "overlap_k": m.overlap_k,
        "overlap_random": m.overlap_random, "energy_in_top": m.energy_in_top, "intruders": m.intruders,
        "intruder_similarity": m.intruder_similarity, "effective_singular_values": m.effective_singular_values,
        "flags": list(m.flags),
    }


def base_doc(b: BaseAnalysis) -> dict[str, Any]:
    """The top-level ``base`` block: what was compared, the thresholds, and the flag counts."""
    return {
        "path": b.path,
        "intruders_computed": b.intruders,
        "thresholds": {"large_update_spectral": b.large_update, "intruder_k": b.intruder_k,
                       "intruder_epsilon": b.intruder_eps},
        "flags": b.flags,
        "skipped": list(b.skipped),
    }


def _row(name: str, m: BaseMetrics) -> tuple:
    intr = "-" if m.intruders is None else m.intruders
    return (name, fmt_float(m.w_fro), fmt_float(m.w_sigma1), fmt_float(m.relative_fro), fmt_float(m.relative_spectral),
            fmt_float(m.amplification), f"{fmt_float(m.overlap)} ({fmt_float(m.overlap_random)})",
            fmt_float(m.energy_in_top), intr)


def base_table(report: RankReport, max_rows: int | None = 40) -> Table:
    b = report.base
    assert b is not None
    names = [r.name for r in report.modules if r.name in b.modules]
    shown = names if max_rows is None else names[:max_rows]
    more = max_rows is not None and len(names) > max_rows
    k = f"k={b.intruder_k}, ε={b.intruder_eps:g}"
    return Table(
        f"against the base {b.path} (intruders: {k})" + (f" (first {max_rows}; --all for every module)" if more else ""),
        ["module", "‖W‖_F", "σ₁(W)", "‖ΔW‖/‖W‖", "σ₁ ratio", "amplif.", "overlap (random)", "in top-k",
         "intruders"],  # the flags are in the spectra table's flags column
        [_row(n, b.modules[n]) for n in shown],
        kinds=["name"] + ["fixed"] * 5 + ["text"] + ["fixed"] * 2,  # "0.0996 (0.0909)" wraps at its space
        optional=BASE_OPTIONAL,
    )


def base_lines(report: RankReport) -> list[tuple[str, str]]:
    """(severity, sentence) per base-aware finding (the thresholds are in the sentences)."""
    b = report.base
    if b is None:
        return []
    out: list[tuple[str, str]] = []
    large = [n for n, m in b.modules.items() if FLAG_LARGE_UPDATE in m.flags]
    if large:
        out.append(("!", f"{plural(len(large), 'module')} {verb(len(large), 'changes')} W strongly: σ₁(ΔW) ≥ {b.large_update:g}·σ₁(W) "
                         f"({names_line(large)})"))
    intr = [n for n, m in b.modules.items() if FLAG_INTRUDERS in m.flags]
    if intr:
        total = sum(b.modules[n].intruders or 0 for n in intr)
        out.append(("!", f"{plural(len(intr), 'module')} {verb(len(intr), 'has')} intruder dimensions ({total} in all; top-{b.intruder_k} "
                         f"singular vectors of W+ΔW with max |cos| < {b.intruder_eps:g} to every singular vector "
                         f"of W): {names_line(intr)}"))
    if not b.intruders:
        out.append(("·", "intruder dimensions not computed (--intruders: one dense SVD per base matrix, cached)"))
    return out
