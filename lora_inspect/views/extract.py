"""The document and view of ``extract``: the JSON schema, the table of modules, what was set aside.

Library results (:mod:`lora_inspect.extract.results`) in, a ``View`` out; nothing here reads files.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

from ..extract.results import ExtractResult
from ..ties import extreme_module
from ..units import fmt_bytes, fmt_float
from .render import Table, View
from .schemas import EXTRACT_SCHEMA
from .words import plural

__all__ = ["EXTRACT_SCHEMA", "extract_doc", "extract_view", "stage_progress", "forecast_rows", "calibrated_extract_view"]


def extract_doc(res: ExtractResult) -> dict[str, Any]:
    return {
        "schema": EXTRACT_SCHEMA,
        "base": str(res.base),
        "tuned": str(res.tuned),
        "family": res.family,
        "output": {"path": str(res.out), "layout": res.target, "dtype": res.dtype, "bytes": res.size,
                   "files": res.files},
        "mode": res.mode,
        "budget": res.budget or None,
        "modules": [asdict(m) for m in res.modules],
        "set_aside": [asdict(s) for s in res.set_aside],
        "unchanged_tensors": res.unchanged,
        "total_change": res.total_energy,
        "kept_share": res.kept_share,
        "memory": {"peak_rss_bytes": res.peak_rss, "largest_tensor_bytes": res.largest_tensor},
        "seconds": res.seconds,
        "self_check": {"passed": True, "worst_relative_error": res.check_error},
        "notes": list(res.notes),
    }


def _module_rows(res: ExtractResult, shown: Sequence) -> list[Sequence[Any]]:
    return [(m.name, "×".join(map(str, m.shape)), m.rank, f"{m.energy:.4f}", fmt_float(m.rel_error),
             fmt_float(m.rel_optimum), f"{m.share:.3f}", m.route) for m in shown]


def _aside_table(res: ExtractResult, max_rows: int | None) -> Table | None:
    if not res.set_aside:
        return None
    shown = res.set_aside if max_rows is None else res.set_aside[:max_rows]
    rows = [(s.name, s.role, s.action, f"{s.share:.3g}", s.why) for s in shown]
    title = plural(len(res.set_aside), "changed tensor") + " not made LoRA modules" + (
        f" (first {max_rows}; --all for every one)" if max_rows is not None and len(res.set_aside) > max_rows else "")
    return Table(title, ["tensor", "role", "action", "share", "why"], rows,
                 kinds=["name", "fixed", "fixed", "fixed", "text"])


def extract_view(res: ExtractResult, max_rows: int | None = 40) -> View:
    doc = extract_doc(res)
    shown = res.modules if max_rows is None else res.modules[:max_rows]
    title = plural(len(res.modules), "LoRA module") + (
        f" (first {max_rows}; --all for every module)" if max_rows is not None and len(res.modules) > max_rows else "")
    tables = [Table(title, ["module", "shape", "k", "energy kept", "rel. error", "optimum", "share", "route"],
                    _module_rows(res, shown), kinds=["name"] + ["fixed"] * 7, optional=("route", "shape", "share"))]
    aside = _aside_table(res, max_rows)
    if aside is not None:
        tables.append(aside)
    header = [f"wrote {res.out} ({res.target}, {res.dtype}, {fmt_bytes(res.size)}) from {res.tuned} − {res.base}"]
    ranks = Counter(m.rank for m in res.modules)
    footer = ["ranks: " + ", ".join(f"k={k} ×{n}" for k, n in sorted(ranks.items()))] if ranks else []
    footer.append(f"kept {res.kept_share:.4f} of the checkpoint's change ‖TUNED − BASE‖²; "
                  f"{plural(res.unchanged, 'tensor')} unchanged")
    _, worst = extreme_module(((m.rel_error, m.name) for m in res.modules), largest=True)
    w = next((m for m in res.modules if m.name == worst), None)
    if w is not None:
        footer.append(f"worst module: {w.name} (relative error {fmt_float(w.rel_error)}, optimum "
                      f"{fmt_float(w.rel_optimum)})")
    if res.budget:
        footer.append(f"budget {fmt_bytes(res.budget['bytes'])}: {fmt_bytes(res.budget['for_factors'])} for factors "
                      f"after {fmt_bytes(res.budget['fixed_bytes'])} of header and full tensors; kept the "
                      f"{res.budget['chosen']} allocation")
    footer += [f"note: {n}" for n in res.notes]
    footer.append("self-check passed: the written adapter re-reads with every module's ΔW as computed")
    return View(doc, tables, header=header, footer=footer)


@contextmanager
def stage_progress(enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress bar on stderr (on a terminal only), one line per stage (reading, spectra, factors), with
    the time left; yields the ``on_step(stage, done, total)`` callback :func:`lora_inspect.extract.run.extract` takes."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .render import stderr_console

    console = stderr_console()
    if not enabled or not console.is_terminal:
        yield lambda stage, done, total: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def on_step(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        yield on_step


FORECAST_RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def forecast_rows(spectra: Sequence[Any], upto: int) -> list[tuple[int, str]]:
    """(k, relative output error if every module kept k directions) from the whitened spectra σ̃ of the
    calibrated truncation (Eckart–Young on ΔW·L: the error of rank k is √(Σ_{i>k} σ̃ᵢ² / Σ σ̃ᵢ²), summed
    over modules)."""
    import numpy as np

    sq = [np.asarray(s, dtype=np.float64) ** 2 for s in spectra]
    total = sum(float(s.sum()) for s in sq)
    rows = []
    for k in [k for k in FORECAST_RANKS if k <= upto]:
        lost = sum(float(s[k:].sum()) for s in sq)
        rows.append((k, fmt_float(float(np.sqrt(lost / total)) if total > 0 else 0.0)))
    return rows


def calibrated_extract_view(view: View, ref: ExtractResult, spectra: Sequence[Any], ref_rank: int) -> View:
    """``extract --calibrate``: the calibrated truncation's view of the reference extraction, with the
    reference said first and the forecast of the output error per rank."""
    view.data = dict(view.data, extract_reference=extract_doc(ref))
    view.header.insert(0, f"reference: {ref.tuned} − {ref.base} extracted at rank ≤ {ref_rank} (keeps "
                          f"{ref.kept_share:.4f} of the change); calibrated from it:")
    view.tables.insert(0, Table("forecast: relative output error on the calibration text if every module kept k",
                                ["k", "output error"], forecast_rows(spectra, ref_rank), kinds=["fixed", "fixed"]))
    return view
