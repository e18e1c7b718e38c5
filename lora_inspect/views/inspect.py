"""Documents and tables for ``info`` and ``rank`` (schema ids in :mod:`.schemas`)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from ..adapter import Adapter
from ..defaults import FLAG_INTRUDERS, FLAG_LARGE_UPDATE
from ..formats import layout_of, writer_of
from ..formats.capabilities import AlphaHome
from ..naming import names_line
from .base import base_doc, base_lines, base_module_doc, base_table
from .render import Table, View, fmt_bytes, fmt_count, fmt_float, sparkline
from .schemas import INFO_SCHEMA, RANK_SCHEMA
from .words import plural, verb

__all__ = ["info_view", "rank_view", "adapter_summary", "action_line", "summary_doc", "group_doc",
           "integrity_lines", "largest_recommended"]

if TYPE_CHECKING:  # pragma: no cover
    from ..analysis import GroupSummary, ModuleResult, RankReport, RankSummary


def adapter_summary(ad: Adapter) -> dict:
    """The adapter block shared by every JSON document."""
    return {
        "path": str(ad.path),
        "format": ad.format,
        "peft_type": ad.peft_type,
        "base_model": ad.base_model,
        "r": ad.r,
        "alpha": ad.alpha,
        "use_rslora": ad.use_rslora,
        "use_dora": ad.use_dora,
    }


def _target_list(t) -> str:
    if t is None:
        return "-"
    if isinstance(t, str):
        return t
    return ", ".join(sorted(t))


def info_view(ad: Adapter) -> View:
    kinds = Counter(m.kind for m in ad.modules)
    algos = Counter(m.algo for m in ad.modules)
    ranks = Counter(m.rank for m in ad.modules)
    alphas = Counter(m.alpha for m in ad.modules)
    extras: list[dict[str, Any]] = [
        {"key": k, "shape": list(ad.source.info(k).shape), "dtype": ad.source.info(k).dtype,
         "params": ad.source.info(k).numel, "bytes": ad.source.info(k).nbytes}
        for k in ad.extras
    ]
    data = {
        "schema": INFO_SCHEMA,
        "adapter": adapter_summary(ad),
        "target_modules": sorted(ad.target_modules) if isinstance(ad.target_modules, (list, set)) else ad.target_modules,
        "modules": len(ad.modules),
        "kinds": dict(sorted(kinds.items())),
        "algos": dict(sorted(algos.items())),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "alphas": {f"{k:g}": v for k, v in sorted(alphas.items())},
        "params": ad.params,
        "extra_params": ad.extra_params,
        "lora_bytes": sum(m.nbytes for m in ad.modules),
        "extra_bytes": ad.extra_bytes,
        "tensor_bytes": ad.tensor_bytes,
        "file_bytes": ad.file_bytes,
        "dtypes": ad.dtypes(),
        "extras": extras,
        "notes": list(ad.notes),
    }
    rank_txt = ", ".join(f"r={k} ×{v}" for k, v in sorted(ranks.items()))
    alpha_txt = ", ".join(f"{k:g} ×{v}" for k, v in sorted(alphas.items()))
    rows = [
        ("path", str(ad.path)),
        ("format", ad.format + (f" ({ad.peft_type})" if ad.peft_type else "")),
        ("base model", ad.base_model or "-"),
        ("rank", rank_txt or "-"),
        ("alpha", (f"{ad.alpha:g}" if ad.alpha is not None else "unknown") + (f"  (per module: {alpha_txt})" if len(alphas) > 1 else "")),
        ("scale", "α/√r (rsLoRA)" if ad.use_rslora else (f"absolute ({layout_of(ad).label})"
                                                          if layout_of(ad).caps.alpha == AlphaHome.SCALE else "α/r")),
        ("DoRA", "yes" if ad.use_dora else "no"),
        ("targets", _target_list(ad.target_modules)),
        ("modules", f"{len(ad.modules)} (" + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) + ")"),
        *([("algorithms", ", ".join(f"{k} {v}" for k, v in sorted(algos.items())))] if set(algos) - {"lora"} else []),
        ("LoRA params", f"{ad.params:,} ({fmt_count(ad.params)})"),
        ("full-tensor params", f"{ad.extra_params:,} in {plural(len(ad.extras), 'tensor')} ({fmt_bytes(ad.extra_bytes)})"),
        ("tensor bytes", fmt_bytes(ad.tensor_bytes)),
        ("file size", fmt_bytes(ad.file_bytes)),
        ("dtypes", ", ".join(f"{k} ×{v}" for k, v in ad.dtypes().items())),
    ]
    tables = [Table(None, ["field", "value"], rows, justify=["left", "left"], kinds=["fixed", "text"])]
    if extras:
        tables.append(Table("full tensors (not low rank)", ["key", "shape", "dtype", "params", "bytes"],
                            [(e["key"], "×".join(map(str, e["shape"])), e["dtype"], fmt_count(e["params"]), fmt_bytes(e["bytes"])) for e in extras]))
    footer = [f"note: {n}" for n in ad.notes]
    return View(data, tables, footer=footer)


def _module_doc(r: ModuleResult) -> dict[str, Any]:
    m = r.module
    return {
        "name": m.name,
        "kind": m.kind,
        "algo": m.algo,
        "shape": list(m.shape),  # 0 where only the base weight knows it (OFT/BOFT/(IA)³ without --base)
        "rank": m.rank,
        "alpha": m.alpha,
        "scale": m.scale,
        "dtype": m.dtype,
        "singular_values": None if r.singular_values is None else [float(x) for x in r.singular_values],
        "energy_rank": r.energy_rank,
        "stable_rank": r.stable_rank,
        "entropy_rank": r.entropy_rank,
        "recommended_rank": r.energy_rank,  # the recommendation is the energy rank (one number, two names)
        "retained_energy": r.retained_energy,
        "relative_error": r.relative_error,
        "flags": list(r.flags),
    }


def group_doc(g: GroupSummary) -> dict[str, Any]:
    return {
        "modules": g.modules, "rank": list(g.rank), "params": g.params,
        "params_uniform": g.params_uniform, "params_pattern": g.params_pattern,
        "bytes_uniform": g.bytes_uniform, "bytes_pattern": g.bytes_pattern,
        "max_energy_rank": g.max_energy_rank, "mean_energy_rank": g.mean_energy_rank,
        "mean_stable_rank": g.mean_stable_rank, "recommended_rank": g.max_energy_rank, "max_sigma1": g.max_sigma1,
    }


def summary_doc(s: RankSummary) -> dict[str, Any]:
    """The ``summary`` block of ``lora-inspect/rank/1``."""
    return {
        "modules": s.modules,
        "analysed": s.analysed,
        "max_rank": s.max_rank,
        "uniform_rank": s.uniform_rank,
        "uniform_min_retained_energy": s.uniform_min_retained_energy,
        "rank_pattern": dict(s.rank_pattern),
        "params": {"now": s.params.now, "uniform": s.params.uniform, "pattern": s.params.pattern},
        "bytes": {"now": s.bytes.now, "uniform": s.bytes.uniform, "pattern": s.bytes.pattern},
        "by_type": {k: group_doc(g) for k, g in s.by_type.items()},
        "by_layer": {k: group_doc(g) for k, g in s.by_layer.items()},
        "flags": dict(s.flags),
    }


def largest_recommended(report: RankReport) -> int | None:
    """The largest per-module recommended rank (the ``rec r`` column), or None when none was found."""
    ranks = [r.energy_rank for r in report.modules if r.energy_rank is not None]
    return max(ranks) if ranks else None


def _uniform_why(uniform: int, largest: int | None) -> str:
    """Why ``--rank uniform``: every module's ``rec r`` is at most it, or rounded up to it (a power of two)."""
    if largest is None or largest == uniform:
        return f"rec r ≤ {uniform} everywhere"
    return f"rec r ≤ {largest} everywhere, rounded up to a power of two"


def action_line(report: RankReport) -> str:
    """The one thing to do next, as a sentence (never a command that would refuse). The uniform rank it
    names is the largest ``rec r`` of the table rounded up to a power of two, and it says so."""
    s = report.summary
    pct = f"{report.energy * 100:g}%"
    now, uni, pat = s.params.now, s.params.uniform, s.params.pattern
    if s.non_finite:
        return (f"{plural(len(s.non_finite), 'module')} with a non-finite ΔW "
                f"({names_line(s.non_finite)}): retrain or repair the adapter before truncating it")
    dependent = [m.name for m in report.adapter.modules if m.algo in ("oft", "boft", "ia3")]  # ΔW from the base W
    if dependent:
        one = len(dependent) == 1
        return (f"{plural(len(dependent), 'OFT/BOFT/(IA)³ module')} ({names_line(dependent)}): truncate reads no base "
                f"weight and refuses {'it' if one else 'them'}; convert --base BASE --to kohya writes "
                f"{'its' if one else 'their'} exact LoRA, then truncate that")
    if s.analysed == 0:
        return "no module could be analysed: nothing to recommend"
    if any(m.algo not in ("lora",) for m in report.adapter.modules):  # LyCORIS: a rewrite is a conversion
        more = " (larger than the file as stored)" if pat > now else ""
        target = writer_of(report.adapter).label  # PEFT LoHa/LoKr → PEFT LoRA, LyCORIS → kohya
        return (f"truncate --energy {report.energy:g} writes a {target} LoRA keeping ≥ {pct} energy in every module: "
                f"{fmt_count(now)} → {fmt_count(pat)} parameters{more}")
    largest = largest_recommended(report)
    if s.uniform_rank < s.max_rank:
        return (
            f"truncate --rank {s.uniform_rank} keeps ≥ {pct} energy in every module "
            f"({_uniform_why(s.uniform_rank, largest)}): {fmt_count(now)} → {fmt_count(uni)} parameters"
            + (f" (per module, truncate --energy {report.energy:g}: {fmt_count(pat)})" if pat < uni else "")
        )
    if pat < now:
        why = (f"rec r ≤ {largest} everywhere, and rounded up to a power of two that is r={s.max_rank} already"
               if largest is not None and largest < s.max_rank else f"a module needs its full r={s.max_rank} (rec r)")
        return (f"{why}; per-module ranks (truncate --energy {report.energy:g}) would give "
                f"{fmt_count(now)} → {fmt_count(pat)} parameters")
    return f"every module needs its full rank to keep {pct} energy: nothing to truncate"


def integrity_lines(report: RankReport) -> list[tuple[str, str]]:
    """(severity, sentence) per integrity finding: "!" for a broken module, "·" for a remark."""
    s = report.summary
    out: list[tuple[str, str]] = []
    if s.non_finite:
        n = len(s.non_finite)
        out.append(("!", f"{plural(n, 'module')} {verb(n, 'has')} a non-finite ΔW (NaN/inf weights, or a product that "
                         f"overflows float64), {'its spectrum is' if n == 1 else 'their spectra are'} unknown: "
                         f"{names_line(s.non_finite)}"))
    if s.zero_b:
        n = len(s.zero_b)
        out.append(("!", f"{plural(n, 'module')} {verb(n, 'has')} an all-zero B, {'it changes' if n == 1 else 'they change'} "
                         f"nothing (untrained?): {names_line(s.zero_b)}"))
    for f, n in s.flags.items():
        if f == "spike":
            out.append(("·", f"{plural(n, 'module')} {verb(n, 'is')} dominated by one direction (σ₁ ≥ 10·σ₂)"))
        elif f not in ("non_finite", "zero_b", FLAG_LARGE_UPDATE, FLAG_INTRUDERS):  # base flags: base_lines
            out.append(("·", f"{plural(n, 'module')} flagged {f}"))
    return out


RANK_OPTIONAL = ("spectrum (log)", "entropy", "stable", "σ₁", "scale")  # dropped in this order when narrow


def _rank_row(r: ModuleResult) -> tuple:
    m = r.module
    sv = r.singular_values
    return (
        m.name, "×".join(str(d) if d else "?" for d in m.shape), m.rank, fmt_float(m.scale), fmt_float(r.sigma1),
        r.energy_rank if r.energy_rank is not None else "-",
        fmt_float(r.stable_rank), fmt_float(r.entropy_rank),
        r.energy_rank if r.energy_rank is not None else "-",
        sparkline(sv) if sv is not None else "",
        ",".join(r.flags),
    )


def _type_table(s: RankSummary, pct: str) -> Table:
    rows = [(t, g.modules, ",".join(map(str, g.rank)), fmt_count(g.params),
             g.max_energy_rank if g.max_energy_rank is not None else "-",
             fmt_float(g.mean_energy_rank), fmt_float(g.mean_stable_rank), fmt_float(g.max_sigma1))
            for t, g in s.by_type.items()]
    return Table("by module type", ["type", "modules", "r", "params", f"max rank@{pct}", "mean rank", "mean stable",
                                    "max σ₁"], rows, kinds=["name"] + ["fixed"] * 7,
                 optional=("max σ₁", "mean stable", "mean rank", "params"))


def rank_view(report: RankReport, max_rows: int | None = 40) -> View:
    s = report.summary
    modules = [_module_doc(r) for r in report.modules]
    data: dict[str, Any] = {
        "schema": RANK_SCHEMA,
        "adapter": adapter_summary(report.adapter),
        "energy": report.energy,
        "modules": modules,
        "summary": {**summary_doc(s), "max_recommended_rank": largest_recommended(report)},
        "notes": list(report.adapter.notes),
    }
    if report.base is not None:  # additive: only with --base
        data["base"] = base_doc(report.base)
        for doc in modules:
            doc["base"] = base_module_doc(report.base.modules.get(doc["name"]))
    shown = report.modules if max_rows is None else report.modules[:max_rows]
    pct = f"{report.energy * 100:g}%"
    more = max_rows is not None and len(report.modules) > max_rows
    cols = ["module", "shape", "r", "scale", "σ₁", f"rank@{pct}", "stable", "entropy", "rec r", "spectrum (log)", "flags"]
    rows = [_rank_row(r) for r in shown]
    justify = ["left", "right", "right", "right", "right", "right", "right", "right", "right", "left", "left"]
    if any(r.module.algo != "lora" for r in report.modules):  # LyCORIS: the algorithm per module
        cols.insert(1, "algo")
        justify.insert(1, "left")
        rows = [(row[0], r.module.algo, *row[1:]) for row, r in zip(rows, shown)]
    tables = [Table(
        f"{plural(len(report.modules), 'module')}, energy τ = {report.energy:g}" + (f" (first {max_rows}; --all for every module)" if more else ""),
        cols, rows, justify=justify, kinds=["name"] + ["fixed"] * (len(cols) - 1), optional=RANK_OPTIONAL,
    ), _type_table(s, pct)]
    if report.base is not None:
        tables.append(base_table(report, max_rows))
    footer = [f"{sev} {text}" for sev, text in integrity_lines(report) + base_lines(report)]
    footer += [f"note: {n}" for n in report.adapter.notes]
    footer.append(action_line(report))
    return View(data, tables, footer=footer)
