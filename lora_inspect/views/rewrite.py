"""Documents and views of ``truncate`` and ``rescale``: the JSON schemas, the tables, header and footer.

Library results (:mod:`lora_inspect.rewrite.results`) in, a ``View`` (``render``) out; nothing here
reads files or computes spectra.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from ..rewrite.results import ModuleChange, RescaleResult, TruncateResult
from ..ties import extreme_module
from ..units import fmt_bytes, fmt_count, fmt_float
from .layout import glue
from .render import Table, View
from .schemas import RESCALE_SCHEMA, TRUNCATE_SCHEMA
from .words import plural

__all__ = ["TRUNCATE_SCHEMA", "RESCALE_SCHEMA", "truncate_doc", "truncate_view", "rescale_doc", "rescale_view"]



def worst_change(changes: Sequence[ModuleChange]) -> ModuleChange | None:
    """The module with the largest relative error (None for none); a near-tie (within
    :data:`~lora_inspect.ties.TIE_RTOL`) goes to the lowest layer, then the name, never to the last bits of
    the floats (:func:`~lora_inspect.ties.extreme_module`)."""
    _, name = extreme_module(((c.relative_error, c.name) for c in changes), largest=True)
    return next((c for c in changes if c.name == name), None)


def _group(changes: list[ModuleChange]) -> dict:
    e_total = sum(float(np.sum(np.square(c.singular_values))) for c in changes)
    e_kept = sum(float(np.sum(np.square(c.singular_values[: c.rank_after]))) for c in changes)
    e_lost = sum(float(np.sum(np.square(c.singular_values[c.rank_after:]))) for c in changes)
    worst = worst_change(changes)
    return {
        "modules": len(changes),
        "params_before": sum(c.params_before for c in changes),
        "params_after": sum(c.params_after for c in changes),
        "bytes_before": sum(c.bytes_before for c in changes),
        "bytes_after": sum(c.bytes_after for c in changes),
        "ranks_after": sorted({c.stored_rank for c in changes}),
        "retained_energy": 1.0 if not e_total > 0 else min(e_kept / e_total, 1.0),
        "relative_error": 0.0 if not e_total > 0 else math.sqrt(e_lost / e_total),
        "worst_module": None if worst is None else worst.name,
        "worst_relative_error": None if worst is None else worst.relative_error,
    }


def truncate_doc(res: TruncateResult, adapter_block: dict) -> dict:
    spec = res.spec
    by_type: dict[str, list[ModuleChange]] = defaultdict(list)
    for c in res.modules:
        by_type[c.type].append(c)
    worst = worst_change(res.modules)
    assert worst is not None  # a truncation writes at least one module
    return {
        "schema": TRUNCATE_SCHEMA,
        "adapter": adapter_block,
        "output": {"path": str(res.output), "format": res.output_format, "file_bytes": res.file_bytes_after,
                   "readme_copied": res.readme_copied},
        "request": {"mode": spec.mode, "rank": spec.rank, "energy": spec.energy, "max_params": spec.max_params,
                    "max_bytes": spec.max_bytes, "uniform": spec.uniform},
        "choice": res.choice,
        "ranks": res.ranks,
        "modules": [
            {"name": c.name, "type": c.type, "kind": c.kind, "shape": list(c.shape), "rank_before": c.rank_before,
             "rank_after": c.rank_after, "stored_rank": c.stored_rank, "params_before": c.params_before,
             "params_after": c.params_after, "bytes_before": c.bytes_before, "bytes_after": c.bytes_after,
             "retained_energy": c.retained_energy, "relative_error": c.relative_error, **_calibrated_fields(c)}
            for c in res.modules
        ],
        "by_type": {t: _group(v) for t, v in sorted(by_type.items())},
        "total": {**_group(res.modules), "file_bytes_before": res.file_bytes_before,
                  "file_bytes_after": res.file_bytes_after},
        "worst_module": {"name": worst.name, "retained_energy": worst.retained_energy,
                         "relative_error": worst.relative_error, "rank_after": worst.rank_after},
        "self_check": {"passed": True, "max_error_over_tolerance": res.max_check_error},
        "warnings": list(res.warnings),
        "notes": list(res.notes) + list(res.adapter.notes),
        **({"calibration": res.calibration} if res.calibration is not None else {}),
    }


def _calibrated_fields(c: ModuleChange) -> dict:
    """--calibrate: retained_energy/relative_error are of the output; these two are added."""
    if c.weight_error is None:
        return {}
    return {"output_error": c.relative_error, "weight_error": c.weight_error, "output_error_plain": c.output_error_plain}


def _tokens(n: Any) -> str:
    """``1 token``, ``2,048 tokens``; ``? tokens`` where the count is not known."""
    return plural(n, "token") if isinstance(n, int) else "? tokens"


def _calibrated_table(res: TruncateResult, max_rows: int | None) -> Table:
    shown = res.modules if max_rows is None else res.modules[:max_rows]
    rows = [(c.name, "×".join(map(str, c.shape)), c.rank_before, c.rank_after, fmt_count(c.params_after),
             fmt_float(c.relative_error), fmt_float(c.output_error_plain or 0.0), fmt_float(c.weight_error or 0.0))
            for c in shown]
    tokens = (res.calibration or {}).get("tokens")
    title = f"{plural(len(res.modules), 'module')}, calibrated on {_tokens(tokens)}" + (
        f" (first {max_rows}; --all for every module)" if max_rows is not None and len(res.modules) > max_rows else "")
    return Table(title, ["module", "shape", "r", "→ k", "params", "output error", "plain's output error",
                         "weight error"], rows, optional=["weight error"])


def _arrow(before: str, after: str) -> str:
    """``15.4 k → 1.92 k``: wraps after the arrow, never between a number and its unit."""
    return f"{glue(before)} {glue('→ ' + after)}"


def _ranks(ranks: list[int]) -> str:
    """The ranks chosen in a group: up to three listed, more as their range (the footer counts each)."""
    if not ranks:
        return "0"
    return ",".join(map(str, ranks)) if len(ranks) <= 3 else f"{ranks[0]}–{ranks[-1]}"


def _type_table(doc: dict) -> Table:
    """Per module type and in total: ranks chosen (a range when more than three), parameters and bytes before → after, energy kept,
    the group's relative error, its worst module and that module's error."""
    rows: list[Sequence[Any]] = []
    for t, g in list(doc["by_type"].items()) + [("total", doc["total"])]:
        rows.append((t, g["modules"], _ranks(g["ranks_after"]),
                     _arrow(fmt_count(g["params_before"]), fmt_count(g["params_after"])),
                     _arrow(fmt_bytes(g["bytes_before"]), fmt_bytes(g["bytes_after"])),
                     f"{g['retained_energy']:.4f}", fmt_float(g["relative_error"]),
                     fmt_float(g["worst_relative_error"]), g["worst_module"] or "-"))
    return Table("by module type", ["type", "modules", "k", "params", "bytes", "energy kept", "rel. error",
                                    "worst error", "worst module"], rows,
                 justify=["left", "right", "left", "right", "right", "right", "right", "right", "left"],
                 kinds=["name", "fixed", "fixed", "text", "text", "fixed", "fixed", "fixed", "name"],
                 optional=("bytes", "worst module", "worst error"))


def truncate_view(res: TruncateResult, adapter_block: dict, max_rows: int | None = 40):

    doc = truncate_doc(res, adapter_block)
    rows: list[Sequence[Any]] = []
    shown = res.modules if max_rows is None else res.modules[:max_rows]
    for c in shown:
        rows.append((c.name, "×".join(map(str, c.shape)), c.rank_before,
                     f"{c.rank_after}" + (f" (+{c.stored_rank - c.rank_after} pad)" if c.stored_rank > c.rank_after else ""),
                     fmt_count(c.params_after), f"{c.retained_energy:.4f}", fmt_float(c.relative_error)))
    title = plural(len(res.modules), "module") + (f" (first {max_rows}; --all for every module)"
                                              if max_rows is not None and len(res.modules) > max_rows else "")
    tables = [Table(title, ["module", "shape", "r", "→ k", "params", "energy kept", "rel. error"], rows,
                    kinds=["name"] + ["fixed"] * 6, optional=("shape",))]
    if res.calibration is not None:
        tables = [_calibrated_table(res, max_rows)]
    tables.append(_type_table(doc))
    w = doc["worst_module"]
    ranks = Counter(res.ranks.values())
    header = [f"wrote {res.output} ({res.output_format}, {fmt_bytes(res.file_bytes_after)}; "
              f"was {fmt_bytes(res.file_bytes_before)})"]
    footer = ["ranks chosen: " + ", ".join(f"k={k} ×{n}" for k, n in sorted(ranks.items())),
              f"worst module: {w['name']} keeps {w['retained_energy']:.4f} of its energy "
              f"(relative error {fmt_float(w['relative_error'])})"]
    if "chosen" in res.choice:
        footer.append(f"budget: per-direction greedy gives {res.choice['greedy_energy']:.6g} Σσ², the best single rank "
                      f"that fits (k={res.choice['uniform_rank_in_budget']}) {res.choice['uniform_energy']:.6g}: "
                      f"kept the {res.choice['chosen']} choice")
    footer += [f"note: {n}" for n in doc["notes"]]
    if res.calibration is not None:
        footer.append(f"calibrated on {_tokens(res.calibration.get('tokens'))} of {res.calibration.get('data')} "
                      f"(ridge {res.calibration.get('ridge'):g}): energies and errors are of the output ‖ΔW·X‖, "
                      "relative; plain truncation at the same k beside it")
        kl = res.calibration.get("held_out_kl")
        if isinstance(kl, dict):
            z = res.calibration.get("z_score")
            footer.append(f"held-out check on {_tokens(res.calibration.get('held_out_tokens'))}: KL to the adapter "
                          f"{fmt_float(kl['calibrated'])} calibrated, {fmt_float(kl['plain'])} plain"
                          + (f" (z = {z:.1f})" if isinstance(z, float) else "")
                          + f": wrote the {res.calibration.get('chosen')} factors")
    footer.append("self-check passed: the written adapter re-reads with the intended spectrum")
    return View(doc, tables, header=header, footer=footer)


def rescale_doc(res: RescaleResult, adapter_block: dict) -> dict:
    return {
        "schema": RESCALE_SCHEMA,
        "adapter": adapter_block,
        "output": {"path": str(res.output), "readme_copied": res.readme_copied},
        "factor": res.factor,
        "method": res.method,
        "alpha_before": res.alpha_before,
        "alpha_after": res.alpha_after,
        "modules": [asdict(d) for d in res.modules],
        "self_check": {"passed": True, "max_error_over_tolerance": res.max_check_error},
        "warnings": list(res.warnings),
        "notes": list(res.notes) + list(res.adapter.notes),
    }


def rescale_view(res: RescaleResult, adapter_block: dict, max_rows: int | None = 40):

    doc = rescale_doc(res, adapter_block)
    shown = res.modules if max_rows is None else res.modules[:max_rows]
    rows: list[Sequence[Any]] = [(d.name, d.rank, f"{d.alpha_before:g} → {d.alpha_after:g}",
             f"{fmt_float(d.scale_before, 4)} → {fmt_float(d.scale_after, 4)}",
             f"{fmt_float(d.sigma1_before, 4)} → {fmt_float(d.sigma1_after, 4)}") for d in shown]
    title = plural(len(res.modules), "module") + (f" (first {max_rows}; --all for every module)"
                                              if max_rows is not None and len(res.modules) > max_rows else "")
    how = "B multiplied (config unchanged)" if res.method == "bake" else "alphas scaled"
    header = [f"wrote {res.output}: every ΔW × {res.factor:g} ({how})"
              + (f"; lora_alpha {res.alpha_before:g} → {res.alpha_after:g}" if res.alpha_before is not None and res.method == "config" else "")]
    footer = [f"note: {n}" for n in doc["notes"]]
    footer.append("self-check passed: the written adapter re-reads with σ × |F| in every module")
    return View(doc, [Table(title, ["module", "r", "alpha", "scale", "σ₁"], rows)], header=header, footer=footer)
