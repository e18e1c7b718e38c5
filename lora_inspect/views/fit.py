"""Documents and views of ``fit`` (``lora-inspect/fit/1``) and ``check --applied`` (``lora-inspect/applied/1``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..checks.applied import AppliedReport, Fate
from ..fit import Action, FitResult
from ..units import fmt_float
from .render import Table, View
from .schemas import APPLIED_SCHEMA, FIT_SCHEMA
from .words import plural

__all__ = ["fit_doc", "fit_view", "applied_doc", "applied_view"]


def _share(x: float) -> str:
    return f"{x:.4%}"


def applied_doc(rep: AppliedReport) -> dict[str, Any]:
    return {
        "schema": APPLIED_SCHEMA, "engine": rep.engine, "adapter": rep.adapter, "against": rep.against, "ok": rep.ok,
        "applied_share": rep.applied_share, "total_energy": rep.total_energy,
        "modules": [{"name": m.name, "fate": m.fate, "reason": m.reason, "energy": m.energy,
                     "engine_name": m.engine_name} for m in rep.modules],
    }


def _applied_lines(rep: AppliedReport) -> list[str]:
    total = rep.total_energy
    lines = [f"{rep.engine} applies {_share(rep.applied_share)} of ‖ΔW‖² (names checked against {rep.against})"]
    for fate in (Fate.DROPPED, Fate.REFUSED, Fate.ALTERED, Fate.SKIPPED, Fate.UNVERIFIED):
        for m in rep.named(fate):
            share = "share unknown" if m.energy is None or not total > 0 else f"{_share(m.energy / total)} of ‖ΔW‖²"
            lines.append(f"{fate}: {m.name} ({share}): {m.reason}")
    return lines


def applied_view(rep: AppliedReport) -> View:
    counts = {f: len(rep.named(f)) for f in Fate}
    rows = [(str(f), counts[f]) for f in Fate if counts[f]]
    table = Table(f"{rep.adapter} under {rep.engine}: {plural(len(rep.modules), 'module')}", ["fate", "modules"],
                  rows, justify=["left", "right"], kinds=["text", "fixed"])
    verdict = ("✓ nothing is dropped silently" if rep.ok else
               f"✗ {plural(counts[Fate.DROPPED], 'module')} dropped silently, {counts[Fate.REFUSED]} refused"
               + (f", {counts[Fate.ALTERED]} altered" if counts[Fate.ALTERED] else ""))
    return View(applied_doc(rep), [table], header=[], footer=_applied_lines(rep) + [verdict])


def fit_doc(res: FitResult) -> dict[str, Any]:
    return {
        "schema": FIT_SCHEMA,
        "source": {"path": str(res.source), "format": res.source_format},
        "engine": res.engine, "max_rank": res.max_rank,
        "output": {"path": str(res.output), "format": res.target, "dtype": res.dtype},
        "modules": [{"name": m.name, "kind": m.kind, "algo": m.algo, "shape": list(m.shape), "rank_in": m.rank_in,
                     "rank_out": m.rank_out, "action": m.action, "energy": m.energy, "kept_energy": m.kept,
                     "relative_error": m.rel_error, "optimal_relative_error": m.optimum, "reason": m.reason,
                     "written_as": m.target} for m in res.modules],
        "total_energy": res.total_energy, "kept_energy": res.kept_energy, "kept_share": res.kept_share,
        "unknown_energy": res.unknown,
        "self_check": {"passed": True, "max_relative_error": res.check_error},
        "serving": [{"rule": r.rule, "ok": r.ok, "value": r.value, "limit": r.limit, "message": r.message}
                    for r in res.serving],
        "applied": None if res.applied is None else applied_doc(res.applied),
        "verify": None if res.verify is None else {
            "base": res.verify.base, "data": res.verify.data, "tokens": res.verify.tokens,
            "kl_to_original": res.verify.results[1].kl_to_first,
            "top1_agreement": res.verify.results[1].top1_agreement},
        "ok": res.ok, "notes": list(res.notes),
    }


def _rank(m) -> str:
    return "-" if m.action in (Action.DROPPED, Action.CARRIED) else f"{m.rank_in or 'full'}→{m.rank_out}"


def fit_view(res: FitResult, max_rows: int | None = 40) -> View:
    shown = res.modules if max_rows is None else res.modules[:max_rows]
    rows: list[Sequence[Any]] = [(m.name, str(m.action), _rank(m), fmt_float(m.rel_error)) for m in shown]
    n = len(res.modules)
    title = plural(n, "module") + (f" (first {max_rows}; --all for every module)" if max_rows is not None and n > max_rows
                                   else "")
    table = Table(title, ["module", "action", "r→k", "rel. error"], rows, justify=["left", "left", "right", "right"],
                  kinds=["name", "text", "fixed", "fixed"])
    header = [f"wrote {res.output} ({res.target}, {res.dtype}) for {res.engine}"
              + (f" at max rank {res.max_rank}" if res.max_rank else "") + f" from {res.source}"]
    footer = [f"kept {_share(res.kept_share)} of ‖ΔW‖²"
              + (f" ({len(res.unknown)} full tensors of unknown ΔW not counted: give --base)" if res.unknown else "")]
    for m in res.modules:
        if m.action == Action.DROPPED:
            share = ("share unknown" if m.energy is None or not res.total_energy > 0
                     else f"{_share(m.energy / res.total_energy)} of ‖ΔW‖²")
            footer.append(f"dropped: {m.name} ({share}): {m.reason}")
    if res.verify is not None:
        s = res.verify.results[1]
        footer.append(f"on {res.verify.data} ({plural(res.verify.tokens, 'token')}): KL to the original "
                      f"{fmt_float(s.kl_to_first)}, top-1 agreement {s.top1_agreement:.2%}")
    footer += [f"note: {x}" for x in res.notes]
    bad = [r for r in res.serving if not r.ok]
    footer.append(f"check --serving {res.engine}: " + ("passed" if not bad else f"FAILED ({bad[0].message})"))
    if res.applied is not None:
        footer += _applied_lines(res.applied)
    return View(fit_doc(res), [table], header=header, footer=footer)
