"""Compare two adapters module by module without forming a dense ΔW. Pure maths: no files opened or
written (factors come through :meth:`Module.factors` of adapters the caller has loaded).

For X = s₁B₁A₁ and Y = s₂B₂A₂ (B (out, r), A (r, in)):

- inner product from r×r cores: ⟨X, Y⟩_F = tr(XᵀY) = s₁s₂·tr((B₁ᵀB₂)(A₂A₁ᵀ)) — an (r₁×r₂)(r₂×r₁)
  product, cost O((out + in)·r₁r₂);
- norms ‖X‖_F = ‖σ(X)‖₂ from the QR-route singular values (:func:`spectrum.svd_factors`);
- the distance ‖X − Y‖_F is *not* taken as √(‖X‖² + ‖Y‖² − 2⟨X, Y⟩), which loses half the digits when
  X ≈ Y (cancellation: a 1e-9 relative distance would come out as ~1e-8 noise). X − Y is itself a
  low-rank product, [s₁B₁, −s₂B₂] @ [A₁; A₂] of rank ≤ r₁ + r₂, so its Frobenius norm is the 2-norm of
  its singular values from the same QR route (:func:`spectrum.singular_values`), accurate to
  O(eps·‖X‖). Its spectral norm comes for free;
- cosine similarity ⟨X, Y⟩ / (‖X‖‖Y‖);
- subspace similarity (Hu et al. 2021, "LoRA", §7): φ(i, j) = ‖U_iᵀ U'_j‖_F² / min(i, j) over the top-i
  and top-j *left* singular vectors (the output space; ``docs/metrics.md``). It lies in
  [0, 1], is 1 when one subspace contains the other and does not depend on the vectors' signs. We
  report φ(i, i) at i = min(top, k₁, k₂), kᵢ the energy rank at τ of each side, so that directions with
  (near-)zero σ — whose vectors are arbitrary — never enter it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from .adapter import Adapter, module_layer, module_type
from .analysis import SAFE_SIGMA, unit_spectrum
from .errors import InspectError, NonFiniteUpdate
from .naming import natural_sorted
from .spectrum import energy_rank, singular_values, svd_factors
from .ties import extreme_module

__all__ = [
    "ModuleDiff",
    "DiffResult",
    "DiffStats",
    "DiffSummary",
    "factor_inner",
    "factor_distance",
    "subspace_similarity",
    "compare_factors",
    "diff_adapters",
    "STATUS_OK",
    "STATUS_SHAPE",
    "STATUS_NON_FINITE",
]

STATUS_OK = "ok"
STATUS_SHAPE = "shape_mismatch"
STATUS_NON_FINITE = "non_finite"


def _norm(sv: np.ndarray) -> float:
    """‖σ‖₂; through ``math.hypot`` (which scales) when σ₁ is outside ``analysis.SAFE_SIGMA``, where
    σ² of float64 weights would overflow (or underflow) a plain sum of squares."""
    s = np.asarray(sv, dtype=np.float64)
    top = float(np.max(np.abs(s))) if s.size else 0.0
    if SAFE_SIGMA[0] <= top <= SAFE_SIGMA[1] or top == 0:
        return float(np.sqrt(np.sum(s**2)))
    return math.hypot(*(float(x) for x in s))


def factor_inner(b1: np.ndarray, a1: np.ndarray, s1: float, b2: np.ndarray, a2: np.ndarray, s2: float) -> float:
    """⟨s₁B₁A₁, s₂B₂A₂⟩_F = s₁s₂·tr((B₁ᵀB₂)(A₂A₁ᵀ)) in float64, from r₁×r₂ products only."""
    b1, a1, b2, a2 = (np.asarray(t, dtype=np.float64) for t in (b1, a1, b2, a2))
    return float(s1 * s2 * np.trace((b1.T @ b2) @ (a2 @ a1.T)))


def factor_distance(
    b1: np.ndarray, a1: np.ndarray, s1: float, b2: np.ndarray, a2: np.ndarray, s2: float
) -> tuple[float, float]:
    """(‖X − Y‖_F, ‖X − Y‖₂) for X = s₁B₁A₁, Y = s₂B₂A₂, via the spectrum of the stacked product
    [s₁B₁, −s₂B₂] @ [A₁; A₂] (QR route, no dense out×in matrix, no cancellation)."""
    b = np.concatenate([s1 * np.asarray(b1, dtype=np.float64), -s2 * np.asarray(b2, dtype=np.float64)], axis=1)
    a = np.concatenate([np.asarray(a1, dtype=np.float64), np.asarray(a2, dtype=np.float64)], axis=0)
    if b.shape[1] == 0:
        return 0.0, 0.0
    sv = singular_values(b, a, 1.0)
    return _norm(sv), float(sv[0]) if len(sv) else 0.0


def subspace_similarity(u1: np.ndarray, u2: np.ndarray, i: int, j: int | None = None) -> float:
    """φ(i, j) = ‖U_iᵀ U'_j‖_F² / min(i, j) (LoRA paper §7) for column-orthonormal U (n, ≥i), U' (n, ≥j)."""
    j = i if j is None else j
    if i <= 0 or j <= 0:
        raise ValueError("subspace_similarity needs i, j ≥ 1")
    g = u1[:, :i].T @ u2[:, :j]
    return min(1.0, float((g**2).sum()) / min(i, j))  # ≤ 1 in exact arithmetic; rounding can exceed it


@dataclass
class ModuleDiff:
    """One module compared: every number is None where it is undefined (see ``status``/``notes``)."""

    name: str
    shape_a: tuple[int, int]
    shape_b: tuple[int, int]
    rank_a: int
    rank_b: int
    status: str = STATUS_OK
    norm_a: float | None = None  # ‖ΔW_A‖_F
    norm_b: float | None = None
    distance: float | None = None  # ‖ΔW_A − ΔW_B‖_F
    spectral_distance: float | None = None  # ‖ΔW_A − ΔW_B‖₂
    rel_distance: float | None = None  # ‖ΔW_A − ΔW_B‖_F / ‖ΔW_A‖_F
    cosine: float | None = None
    phi: float | None = None  # φ(phi_dim, phi_dim)
    phi_dim: int | None = None
    energy_rank_a: int | None = None
    energy_rank_b: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def type(self) -> str:
        return module_type(self.name)

    @property
    def layer(self) -> str:
        return module_layer(self.name)


def compare_factors(
    name: str,
    b1: np.ndarray, a1: np.ndarray, s1: float,
    b2: np.ndarray, a2: np.ndarray, s2: float,
    *,
    top: int = 1,
    energy: float = 0.95,
) -> ModuleDiff:
    """Every per-module number of ``diff`` for ΔW_A = s₁B₁A₁ and ΔW_B = s₂B₂A₂ (linear orientation)."""
    shape_a = (b1.shape[0], a1.shape[1])
    shape_b = (b2.shape[0], a2.shape[1])
    d = ModuleDiff(name, shape_a, shape_b, a1.shape[0], a2.shape[0])
    if shape_a != shape_b:
        d.status = STATUS_SHAPE
        return d
    b1, a1, b2, a2 = (np.asarray(t, dtype=np.float64) for t in (b1, a1, b2, a2))
    if not all(bool(np.isfinite(t).all()) for t in (b1, a1, b2, a2)) or not (math.isfinite(s1) and math.isfinite(s2)):
        d.status = STATUS_NON_FINITE
        return d
    try:
        u1, sv1, _ = svd_factors(b1, a1, s1)
        u2, sv2, _ = svd_factors(b2, a2, s2)
    except NonFiniteUpdate:  # finite factors, but ΔW overflows float64
        d.status = STATUS_NON_FINITE
        return d
    sv1n, sv2n = np.asarray(sv1), np.asarray(sv2)
    d.norm_a = _norm(sv1n)
    d.norm_b = _norm(sv2n)
    d.energy_rank_a = energy_rank(unit_spectrum(sv1n), energy)
    d.energy_rank_b = energy_rank(unit_spectrum(sv2n), energy)
    if np.array_equal(b1, b2) and np.array_equal(a1, a2) and s1 == s2:
        d.distance = d.spectral_distance = 0.0  # the same factors: exactly the same ΔW
    else:
        d.distance, d.spectral_distance = factor_distance(b1, a1, s1, b2, a2, s2)
        if not math.isfinite(d.distance):
            d.notes.append("ΔW_A − ΔW_B overflows float64: distance unknown")
            d.distance = d.spectral_distance = None
    if d.norm_a > 0:
        d.rel_distance = None if d.distance is None else d.distance / d.norm_a
    else:
        d.notes.append("ΔW_A is zero: relative distance undefined")
    if d.norm_a > 0 and d.norm_b > 0:
        c = factor_inner(b1, a1, s1, b2, a2, s2) / (d.norm_a * d.norm_b)
        d.cosine = float(min(1.0, max(-1.0, c)))
        d.phi_dim = max(1, min(top, d.energy_rank_a, d.energy_rank_b))
        d.phi = subspace_similarity(u1, u2, d.phi_dim)
    else:
        d.notes.append("a zero ΔW: cosine and φ undefined")
    return d


@dataclass
class DiffStats:
    """Mean and worst of each metric over a group of modules (None where no module defines it).

    ``max_rel_distance``, ``min_cosine`` and ``min_phi`` are the exact extremes; the ``*_module`` next to
    each names the module that holds it, and when several modules hold it to within
    ``ties.TIE_RTOL`` (1e-12, e.g. an adapter diffed with itself: every φ is 1 up to rounding)
    the one in the lowest layer, then by name in natural order (:func:`ties.extreme_module`) —
    never whichever rounding made smallest."""

    modules: int
    compared: int
    mean_rel_distance: float | None
    max_rel_distance: float | None
    max_rel_distance_module: str | None
    mean_cosine: float | None
    min_cosine: float | None
    min_cosine_module: str | None
    mean_phi: float | None
    min_phi: float | None
    min_phi_module: str | None


@dataclass
class DiffSummary(DiffStats):
    """Overall statistics, counts of modules not compared, and the same statistics by module type.
    ``zero_a``/``zero_b`` name the compared modules whose ΔW is exactly zero on that side (there the
    relative distance (A zero), cosine and φ are undefined)."""

    shape_mismatches: int = 0
    non_finite: int = 0
    by_type: dict[str, DiffStats] = field(default_factory=dict)
    only_in_a: int = 0
    only_in_b: int = 0
    zero_a: list[str] = field(default_factory=list)
    zero_b: list[str] = field(default_factory=list)


@dataclass
class DiffResult:
    a: Adapter
    b: Adapter
    top: int
    energy: float
    modules: list[ModuleDiff]
    only_in_a: list[str]
    only_in_b: list[str]
    summary: DiffSummary


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def _stats(ds: list[ModuleDiff]) -> DiffStats:
    dist = [(d.rel_distance, d.name) for d in ds if d.rel_distance is not None]
    cos = [(d.cosine, d.name) for d in ds if d.cosine is not None]
    phi = [(d.phi, d.name) for d in ds if d.phi is not None]
    worst_d = extreme_module(dist, largest=True)
    worst_c = extreme_module(cos, largest=False)
    worst_p = extreme_module(phi, largest=False)
    return DiffStats(
        modules=len(ds),
        compared=sum(d.status == STATUS_OK for d in ds),
        mean_rel_distance=_mean([x for x, _ in dist]),
        max_rel_distance=worst_d[0],
        max_rel_distance_module=worst_d[1],
        mean_cosine=_mean([x for x, _ in cos]),
        min_cosine=worst_c[0],
        min_cosine_module=worst_c[1],
        mean_phi=_mean([x for x, _ in phi]),
        min_phi=worst_p[0],
        min_phi_module=worst_p[1],
    )


def summarise(diffs: list[ModuleDiff], only_in_a: int = 0, only_in_b: int = 0) -> DiffSummary:
    """Mean and worst relative distance / cosine / φ, overall and by module type."""
    by_type: dict[str, list[ModuleDiff]] = defaultdict(list)
    for d in diffs:
        by_type[d.type].append(d)
    overall = _stats(diffs)
    return DiffSummary(
        **vars(overall),
        shape_mismatches=sum(d.status == STATUS_SHAPE for d in diffs),
        non_finite=sum(d.status == STATUS_NON_FINITE for d in diffs),
        by_type={t: _stats(by_type[t]) for t in natural_sorted(by_type)},
        only_in_a=only_in_a,
        only_in_b=only_in_b,
        zero_a=[d.name for d in diffs if d.norm_a == 0],
        zero_b=[d.name for d in diffs if d.norm_b == 0],
    )


def diff_adapters(a: Adapter, b: Adapter, *, top: int = 1, energy: float = 0.95) -> DiffResult:
    """Pair modules by name and compare each pair (:func:`compare_factors`), in layer order."""
    if top < 1:
        raise InspectError(f"top (the number of singular directions φ compares) must be ≥ 1, got {top}")
    if not 0 < energy <= 1:
        raise InspectError(f"energy τ must be in (0, 1], got {energy}")
    names_b = {m.name: m for m in b.modules}
    names_a = {m.name for m in a.modules}
    mods_a = a.modules  # in layer order (Adapter keeps them so)
    common = [m for m in mods_a if m.name in names_b]
    only_a = [m.name for m in mods_a if m.name not in names_b]
    only_b = natural_sorted(m.name for m in b.modules if m.name not in names_a)
    if not common:
        ex_a = a.modules[0].name if a.modules else "(none)"
        ex_b = b.modules[0].name if b.modules else "(none)"
        raise InspectError(
            f"no module names in common ({a.format} {ex_a!r}… vs {b.format} {ex_b!r}…)",
            hint="diff pairs modules by name: compare PEFT with PEFT, kohya with kohya",
        )
    diffs = []
    for ma in common:
        mb = names_b[ma.name]
        b1, a1 = ma.factors(np.float64)
        b2, a2 = mb.factors(np.float64)
        diffs.append(compare_factors(ma.name, b1, a1, ma.scale, b2, a2, mb.scale, top=top, energy=energy))
    return DiffResult(a, b, top, energy, diffs, only_a, only_b, summarise(diffs, len(only_a), len(only_b)))
