"""``merge``: the exact weighted sum Σ wᵢ·ΔWᵢ per module, in factor space (docs/formats.md, "merge").

With ΔWᵢ = sᵢ·BᵢAᵢ, B = [w₁s₁B₁ … wₙsₙBₙ] (out × R, R = Σrᵢ) and A = [A₁; …; Aₙ] (R × in) give
B@A = Σ wᵢΔWᵢ exactly. QR of B and Aᵀ and an R×R SVD of the core R_b R_aᵀ give its singular values
and vectors without forming any dense ΔW (:func:`lora_inspect.spectrum.decompose`), cost
O((out + in)R² + R³) instead of PEFT's O(out·in·min(out, in)) dense SVD. A rank option keeps the k
largest triplets (Eckart–Young–Mirsky: the best rank-k approximation in Frobenius and spectral norm),
chosen per module by the same rules as ``truncate`` (:mod:`lora_inspect.rewrite.ranks`); without
one, the numerical rank is kept (σ > max(out, in)·ε·σ₁, the rule of ``numpy.linalg.matrix_rank``),
which is the concatenation itself up to rounding. DoRA is refused: a DoRA adapter's change is
m·(W + ΔW)/‖W + ΔW‖ − W, not a sum of updates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InspectError
from ..formats import MERGE_TARGETS, check_output, layout_for_target, layout_of
from ..formats.layout import Layout, Naming, WriteOptions
from ..kernels import row_form
from ..rewrite.ranks import TruncateSpec, choose_ranks
from ..spectrum import decompose, relative_error, retained_energy
from ..units import plural, verb
from .canon import Canon, CanonModule, from_adapter
from .flux import flux_for_target
from .results import MergeModule, MergeResult
from .run import DTYPES, default_dtype, named_file, write_canon

if TYPE_CHECKING:  # pragma: no cover
    from .dense_merge import DenseSpec

__all__ = ["merge", "merge_modules", "target_of", "keyed_modules", "check_row", "numerical_rank"]

_EPS = float(np.finfo(np.float64).eps)


def target_of(ad) -> str:
    """The convert target that writes an input's layout (a PEFT file → ``peft``; a LyCORIS file's merged
    LoRA is written as kohya, the naming LyCORIS files use): the layout's ``converts_to``."""
    layout = layout_of(ad)
    if layout.converts_to is None:
        raise InspectError(f"no writer for the layout {layout.name!r}")
    return layout.converts_to


def _target_layout(ads: list, target: str | None) -> Layout:
    """The layout a merge writes: ``target``, else the first input's (:func:`target_of`)."""
    layout = layout_for_target(target or target_of(ads[0]))
    if not layout.merge_target:
        raise InspectError(f"merge does not write {layout.label}: give --to, one of {', '.join(MERGE_TARGETS)}")
    return layout


@dataclass
class _Slot:
    dtype: str
    rank: int
    shape: tuple[int, int]


def keyed_modules(canons: list[Canon], paths: list[Path]) -> tuple[list[str], dict[str, list[CanonModule | None]]]:
    flat = all(len(c.components()) <= 1 for c in canons)
    table: dict[str, list[CanonModule | None]] = {}
    order: list[str] = []
    for i, c in enumerate(canons):
        for m in c.modules:
            key = m.path if flat else m.name
            if key not in table:
                table[key] = [None] * len(canons)
                order.append(key)
            table[key][i] = m
    for i, c in enumerate(canons[1:], 1):
        if not any(row[0] is not None and row[i] is not None for row in table.values()):
            a = canons[0].modules[0].source_name
            b = c.modules[0].source_name
            raise InspectError(f"{paths[i]}: no module maps onto one of {paths[0]}'s (e.g. {b!r} vs {a!r}): "
                               "the adapters are for different models or use names that cannot be matched")
    return order, table


def check_row(key: str, row: list[CanonModule | None], paths: list[Path]) -> CanonModule:
    present = [(i, m) for i, m in enumerate(row) if m is not None]
    for i, m in present:
        if m.magnitude is not None:
            raise InspectError(f"{paths[i]}: module {m.source_name!r} is DoRA: a DoRA merge is not a sum of updates")
    return row_form(key, present, paths)  # a conv's flattened and 4-D forms add up (lora_inspect/kernels.py)


def merge_modules(canons: list[Canon], weights: list[float], spec: TruncateSpec | None, paths: list[Path]
                  ) -> tuple[list[CanonModule], list[MergeModule]]:
    """The merged modules (scale 1, balanced √S split) and per-module facts."""
    order, table = keyed_modules(canons, paths)
    decs, firsts, spectra, slots = [], [], [], []
    for key in order:
        row = table[key]
        first = check_row(key, row, paths)
        b = np.concatenate([w * m.scale * m.b for w, m in zip(weights, row) if m is not None], axis=1)
        a = np.concatenate([m.a for m in row if m is not None], axis=0)
        d = decompose(b, a, 1.0)
        decs.append(d)
        firsts.append(first)
        spectra.append(np.array(d.s, dtype=np.float64))
        slots.append(_Slot("F32", int(b.shape[1]), first.shape))
    keep = [numerical_rank(sv, sl.shape) for sv, sl in zip(spectra, slots)]
    if spec is not None:
        choice = choose_ranks(slots, spectra, spec)  # type: ignore[arg-type]
        keep = [min(k, nk) for k, nk in zip(choice.keep, keep)]
    merged, facts = [], []
    for key, d, first, sv, sl, k in zip(order, decs, firsts, spectra, slots, keep):
        row = table[key]
        facts.append(MergeModule(key, first.kind, first.shape, [m.rank if m else 0 for m in row], sl.rank,
                                 numerical_rank(sv, sl.shape), k, retained_energy(sv, k), relative_error(sv, k),
                                 float(sv[0]) if len(sv) else 0.0, [float(x) for x in sv]))
        if k > 0:
            bk, ak = d.factors(k)
            merged.append(CanonModule(first.component, first.path, first.kind, bk.astype(np.float64),
                                      ak.astype(np.float64), 1.0, first.kernel, first.conv_ndim, None, key))
    return merged, facts


def numerical_rank(sv: np.ndarray, shape: tuple[int, int]) -> int:
    if not len(sv) or sv[0] <= 0:
        return 0
    return int((sv > max(shape) * _EPS * sv[0]).sum())


def _parse_weights(weights: list[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise InspectError(f"--weights has {plural(len(weights), 'weight')} for {plural(n, 'adapter')}: give one per adapter")
    if not all(np.isfinite(weights)):
        raise InspectError("weights must be finite numbers")
    return [float(w) for w in weights]


def merge(ads: list, out: Path, *, weights: list[float] | None = None, spec: TruncateSpec | None = None,
          target: str | None = None, dtype: str | None = None, force: bool = False,
          dense: DenseSpec | None = None) -> MergeResult:
    """Write Σ wᵢ·ΔWᵢ of the adapters ``ads`` to ``out`` (atomically, self-checked); with ``dense``, the
    dense merge it names instead (:mod:`lora_inspect.convert.dense_merge`)."""
    if len(ads) < 2:
        raise InspectError("merge needs at least two adapters")
    ws = _parse_weights(weights, len(ads))
    if spec is not None:
        spec.validate()
    if dense is not None:
        dense.validate()
    out = Path(out)
    for ad in ads:
        check_output(ad, out, force)
    paths = [Path(ad.path) for ad in ads]
    canons = _read_inputs(ads, out)
    layout = _target_layout(ads, target)
    dt = dtype or default_dtype(ads[0])
    with named_file(out, out):  # errors about the sum or its layout name OUT
        if dense is None:
            merged, facts = merge_modules(canons, ws, spec, paths)
        else:
            from .dense_merge import dense_merge_modules

            merged, facts = dense_merge_modules(canons, ws, spec, paths, dense)
        if not merged:
            raise InspectError("every merged module is zero: nothing to write")
        first = canons[0]  # the inputs were renamed to one (diffusers) naming: _read_inputs
        canon = Canon(merged, Naming.PIPELINE, first.base_model, first.fan_in_fan_out, first.config)
        done = write_canon(flux_for_target(canon, layout.naming), out, layout, WriteOptions(DTYPES[dt]))
    notes = done.notes
    partial = sum(1 for f in facts if 0 in f.inputs)
    if partial:
        notes.insert(0, f"{plural(partial, 'module')} {verb(partial, 'is')} present in only some inputs (absent terms are zero)")
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file()) if out.is_dir() else out.stat().st_size
    mode = ("exact" if dense is None else "rank max rᵢ") if spec is None else f"{spec.mode} {_value(spec):g}"
    res = MergeResult(paths, [ad.format for ad in ads], ws, mode, out, str(layout.target), dt, facts, done.records,
                      size, notes, done.worst, done.ratio)
    if dense is not None:
        res.method, res.density = dense.method, float(dense.density)
        res.seed = dense.seed if dense.random else None
        res.majority_sign = dense.majority_sign if dense.method.endswith("ties") else None
        res.precision = dense.precision
    return res


def _read_inputs(ads: list, out: Path) -> list[Canon]:
    canons = []
    for ad in ads:
        with named_file(ad.path, out):
            c = flux_for_target(from_adapter(ad), Naming.PIPELINE)  # kohya/BFL and diffusers Flux files meet here
        if c.extras:
            raise InspectError(f"{ad.path}: full tensors ({c.extras[0]!r} …, modules_to_save) cannot be summed")
        canons.append(c)
    return canons


def _value(spec: TruncateSpec) -> float:
    return next(float(x) for x in (spec.rank, spec.energy, spec.max_params, spec.max_bytes) if x is not None)


