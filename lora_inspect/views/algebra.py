"""Documents and views of ``convert`` and ``merge`` (results from :mod:`lora_inspect.convert.results`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from ..convert.results import ConvertResult, MergeResult
from ..ties import extreme_module
from ..units import fmt_bytes, fmt_float
from .render import Table, View
from .schemas import CONVERT_SCHEMA, MERGE_SCHEMA
from .words import plural

__all__ = ["convert_doc", "convert_view", "merge_doc", "merge_view"]


def _title(n: int, max_rows: int | None) -> str:
    return plural(n, "module") + (f" (first {max_rows}; --all for every module)" if max_rows is not None and n > max_rows
                             else "")


def convert_doc(res: ConvertResult) -> dict[str, Any]:
    return {
        "schema": CONVERT_SCHEMA,
        "source": {"path": str(res.source), "format": res.source_format},
        "output": {"path": str(res.output), "format": res.target, "dtype": res.dtype, "files": res.files,
                   "bytes": res.output_bytes},
        "modules": [{**asdict(m), "shape": list(m.shape)} for m in res.modules],
        "self_check": {"passed": True, "max_relative_error": res.max_check_error,
                       "max_error_over_tolerance": res.max_check_ratio, **_check_counts(res.modules)},
        "notes": list(res.notes),
    }


def _check_counts(mods: list) -> dict[str, int]:
    return {"identical_factors": sum(m.check == "identical" for m in mods),
            "sketched": sum(m.check == "sketched" for m in mods)}


def _check_line(mods: list, worst: float) -> str:
    c = _check_counts(mods)
    parts = [f"{c['identical_factors']} with bit-identical factors"] if c["identical_factors"] else []
    if c["sketched"]:
        parts.append(f"{c['sketched']} within rounding by a Gaussian sketch")
    return (f"self-check passed: every ΔW re-read equals the source's ({', '.join(parts) or 'no modules'}; worst "
            f"relative error {fmt_float(worst)})")


def convert_view(res: ConvertResult, max_rows: int | None = 40) -> View:
    doc = convert_doc(res)
    shown = res.modules if max_rows is None else res.modules[:max_rows]
    rows: list[Sequence[Any]] = [(m.source, m.target, m.rank_in, m.rank_out, "; ".join(m.how) or "-",
                                  fmt_float(m.check_error)) for m in shown]
    header = [f"wrote {res.output} ({res.target}, {res.dtype}, {fmt_bytes(res.output_bytes)}) from {res.source} "
              f"({res.source_format})"]
    footer = [f"note: {n}" for n in res.notes]
    footer.append(_check_line(res.modules, res.max_check_error))
    table = Table(_title(len(res.modules), max_rows), ["module", "written as", "r", "→ r", "how", "rel. error"], rows,
                  justify=["left", "left", "right", "right", "left", "right"],
                  kinds=["name", "name", "fixed", "fixed", "text", "fixed"])
    return View(doc, [table], header=header, footer=footer)


def merge_doc(res: MergeResult) -> dict[str, Any]:
    return {
        "schema": MERGE_SCHEMA,
        "inputs": [{"path": str(p), "format": f, "weight": w} for p, f, w in
                   zip(res.inputs, res.input_formats, res.weights)],
        "mode": res.mode,
        "method": {"name": res.method, "dense": res.method != "sum", "density": res.density,
                   "majority_sign": res.majority_sign, "seed": res.seed, "precision": res.precision},
        "output": {"path": str(res.output), "format": res.target, "dtype": res.dtype, "bytes": res.output_bytes},
        "modules": [{"name": m.name, "kind": m.kind, "shape": list(m.shape), "input_ranks": m.inputs,
                     "rank_concat": m.rank_concat, "numerical_rank": m.numerical_rank, "rank_out": m.rank_out,
                     "retained_energy": m.retained_energy, "relative_error": m.relative_error, "sigma1": m.sigma1}
                    for m in res.modules],
        "self_check": {"passed": True, "max_relative_error": res.max_check_error,
                       "max_error_over_tolerance": res.max_check_ratio},
        "notes": list(res.notes),
    }


def merge_view(res: MergeResult, max_rows: int | None = 40) -> View:
    doc = merge_doc(res)
    shown = res.modules if max_rows is None else res.modules[:max_rows]
    rows: list[Sequence[Any]] = [(m.name, "×".join(map(str, m.shape)), "+".join(map(str, m.inputs)),
                                  m.numerical_rank, m.rank_out, f"{m.retained_energy:.6f}", fmt_float(m.relative_error))
                                 for m in shown]
    # a near-tie goes to the lowest layer, then the name (ties.extreme_module), not to the floats' last bits
    _, worst_name = extreme_module(((m.relative_error, m.name) for m in res.modules), largest=True)
    worst = next(m for m in res.modules if m.name == worst_name)
    ws = ", ".join(f"{w:g}" for w in res.weights)
    header = [f"wrote {res.output} ({res.target}, {res.dtype}, {fmt_bytes(res.output_bytes)}): {_what(res)} of "
              f"{plural(len(res.inputs), 'adapter')} (weights {ws}), {res.mode}"]
    footer = [f"worst module: {worst.name} keeps {worst.retained_energy:.6f} of its energy (relative error "
              f"{fmt_float(worst.relative_error)})"]
    if res.method != "sum":
        footer.append(f"dense method: the result is not Σ wᵢ·ΔWᵢ; energy and error are against the dense "
                      f"{res.method} result before the SVD")
    footer += [f"note: {n}" for n in res.notes]
    footer.append(f"self-check passed: every written ΔW equals the intended one (worst relative error "
                  f"{fmt_float(res.max_check_error)})")
    table = Table(_title(len(res.modules), max_rows), ["module", "shape", "ranks in", "num. rank", "→ k",
                                                        "energy kept", "rel. error"], rows)
    return View(doc, [table], header=header, footer=footer)


def _what(res: MergeResult) -> str:
    if res.method == "sum":
        return "Σ wᵢ·ΔWᵢ"
    parts = [f"density {res.density:g}"]
    if res.majority_sign:
        parts.append(f"majority sign {res.majority_sign}")
    if res.seed is not None:
        parts.append(f"seed {res.seed}")
    parts.append(res.precision or "fp64")
    return f"{res.method} on the dense ΔWᵢ ({', '.join(parts)})"
