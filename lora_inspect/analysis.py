"""Per-module spectra and the summary a user acts on (``lora-inspect rank``).

Reads each module's factors once (memory-mapped), batches same-shaped modules into one QR call,
and turns singular values into metrics (:mod:`lora_inspect.spectrum`). Returns dataclasses (:class:`RankReport`,
:class:`RankSummary`); the documents and tables live in :mod:`lora_inspect.views.inspect`.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .adapter import Adapter, LowRankUpdate, Module, module_layer, module_type
from .arrays import float64_buffer
from .basemetrics import BaseAnalysis, BasisCache, analyse_base
from .cholesky import gram_r_factor
from .defaults import DEFAULT_ENERGY
from .errors import InspectError
from .formats.lycoris_bind import NEEDS_BASE, analysable
from .formats.tensors import DTYPE_SIZES
from .naming import natural_sorted
from .spectrum import (
    SpectrumStats,
    all_finite,
    compute_dtype,
    core_singular_values,
    parallel_map,
    r_factor,
    retained_energy,
    spectrum_stats,
)
from .units import plural

if TYPE_CHECKING:  # pragma: no cover
    from .basecheckpoint import BaseCheckpoint, BaseTensor

__all__ = [
    "ModuleResult", "RankReport", "RankSummary", "GroupSummary", "Sizes", "analyse", "summarise",
    "DEFAULT_ENERGY", "uniform_rank", "compute_spectra", "unit_spectrum", "FLAG_NON_FINITE", "FLAG_ZERO_B", "FLAG_SPIKE",
]

FLAG_NON_FINITE = "non_finite"
FLAG_ZERO_B = "zero_b"
FLAG_SPIKE = "spike"


@dataclass
class ModuleResult:
    """One module's spectrum: ``singular_values`` is None when the factors hold NaN/inf (then
    ``stats`` is None too); an empty array for a rank-0 module."""

    module: Module
    singular_values: np.ndarray | None
    flags: list[str]
    stats: SpectrumStats | None = None

    @property
    def name(self) -> str:
        return self.module.name

    @property
    def energy_rank(self) -> int | None:
        return None if self.stats is None else self.stats.energy_rank

    @property
    def stable_rank(self) -> float | None:
        return None if self.stats is None else self.stats.stable_rank

    @property
    def entropy_rank(self) -> float | None:
        return None if self.stats is None else self.stats.entropy_rank

    @property
    def retained_energy(self) -> float | None:
        return None if self.stats is None else self.stats.retained_energy

    @property
    def relative_error(self) -> float | None:
        return None if self.stats is None else self.stats.relative_error

    @property
    def sigma1(self) -> float | None:
        sv = self.singular_values
        return float(sv[0]) if sv is not None and len(sv) else None


@dataclass(frozen=True)
class Sizes:
    """A count now, with every module cut to min(uniform rank, r), and at per-module energy ranks."""

    now: int
    uniform: int
    pattern: int


@dataclass
class GroupSummary:
    """The modules of one type (or one layer). The recommended rank of a group is its largest
    energy rank (:attr:`max_energy_rank`)."""

    modules: int
    rank: list[int]
    params: int
    params_uniform: int
    params_pattern: int
    bytes_uniform: int
    bytes_pattern: int
    max_energy_rank: int | None
    mean_energy_rank: float | None
    mean_stable_rank: float | None
    max_sigma1: float | None


@dataclass
class RankSummary:
    """What ``rank`` recommends for the whole adapter. Modules whose spectrum is unknown (non-finite)
    keep their rank in every estimate; :attr:`non_finite` names them."""

    modules: int
    analysed: int
    max_rank: int
    uniform_rank: int
    uniform_min_retained_energy: float
    rank_pattern: dict[str, int]
    params: Sizes
    bytes: Sizes
    by_type: dict[str, GroupSummary]
    by_layer: dict[str, GroupSummary]
    flags: dict[str, int]
    non_finite: list[str] = field(default_factory=list)
    zero_b: list[str] = field(default_factory=list)


@dataclass
class RankReport:
    adapter: Adapter
    energy: float
    modules: list[ModuleResult]
    summary: RankSummary
    base: BaseAnalysis | None = None  # base-aware metrics (``rank --base``), :mod:`lora_inspect.basemetrics`


SAFE_SIGMA = (1e-100, 1e100)  # σ₁ in this range: σ² and Σσ² are far from float64's limits


def unit_spectrum(sv: np.ndarray) -> np.ndarray:
    """σ scaled by 1/σ₁ when σ₁ lies outside :data:`SAFE_SIGMA`; otherwise σ itself (bit-for-bit the
    same metrics as before). Every metric of :mod:`lora_inspect.spectrum` (energy rank, retained
    energy, relative error, stable and entropy rank) is scale-invariant, and on σ/σ₁ none of them
    overflows: σ² of float64 weights near 1e155 would (inf/inf → NaN metrics and a RuntimeWarning)."""
    s = np.asarray(sv, dtype=np.float64)
    top = float(s[0]) if s.size else 0.0
    if top > 0 and np.isfinite(top) and not SAFE_SIGMA[0] <= top <= SAFE_SIGMA[1]:
        return s / top
    return s


def _factors64(m: Module) -> tuple[np.ndarray, np.ndarray]:
    """(B, A) in float64, linear orientation, as ``m.factors(np.float64)`` but read as stored and
    converted once, into per-thread buffers."""
    u = m.update
    if not isinstance(u, LowRankUpdate) or u.e_key is not None:
        return m.factors(np.float64)
    b, a = u.orient.to_linear(m.source.raw(u.a_key), m.source.raw(u.b_key))
    return float64_buffer(b, 0), float64_buffer(a, 1)


def _reduce(m: Module, precision: str, gram: bool) -> tuple[Module, Any, Any, list[str]]:
    """One module read once: R factors for the batched core SVD, or a direct spectrum, plus flags."""
    dtype = compute_dtype(m.dtype, precision)
    if m.rank == 0:
        return m, None, None, []
    try:  # update types with a direct spectrum (LoKr products, dense SVD); None: the factor route
        direct = m.update.singular_values(m.source, dtype, m.scale)
    except ValueError:
        return m, None, None, [FLAG_NON_FINITE]
    if direct is not None:
        return m, direct, None, [] if direct.any() else [FLAG_ZERO_B]
    b, a = _factors64(m) if gram else m.factors(dtype)
    m.source.release(m.update.keys)  # read once: stream module by module (the copies above are ours)
    if not (all_finite(b) and all_finite(a)):
        return m, None, None, [FLAG_NON_FINITE]
    rb = gram_r_factor(b) if gram else None
    ra = gram_r_factor(a, rows=True) if gram else None
    # ill-conditioned or rank-deficient: Householder QR in the compute dtype (exact: bf16 → f64 → f32)
    rb = r_factor(b.astype(dtype)) if rb is None else rb
    ra = r_factor(a.T.astype(dtype)) if ra is None else ra
    # R_b = 0 exactly when B = 0; a product update (LoHa's face-split factors) is also zero when its A side is
    zero = not rb.any() or (not isinstance(m.update, LowRankUpdate) and not ra.any())
    return m, rb, ra, [FLAG_ZERO_B] if zero else []


def compute_spectra(
    modules: list[Module],
    *,
    precision: str = "auto",
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
) -> dict[str, tuple[np.ndarray | None, list[str]]]:
    """Singular values and integrity flags per module name.

    Each module's factors are read once and reduced to their R factors (QR of B and Aᵀ, in worker
    threads); the r×r cores of same-rank modules are then decomposed in one batched float64 SVD.
    Measured on the Llama-3-8B-shaped r=64 adapter: stacking whole factors of same-shaped modules
    into one batched QR was 2.4× *slower* than per-module QRs (the stacking copy costs more than it
    saves), so batching happens at the core, where it pays.

    Reduction route (``precision="auto"``): R from the Cholesky factor of the float64 Gram matrix when
    the factor is well conditioned (:func:`cholesky.gram_r_factor`, κ ≤ 1e4), else Householder QR as
    before; ``LORA_INSPECT_REDUCTION=qr`` forces QR (benchmarks compare the two, reports/scan.md).
    """
    gram = precision == "auto" and os.environ.get("LORA_INSPECT_REDUCTION", "auto") != "qr"
    reduced = parallel_map(lambda m: _reduce(m, precision, gram), modules, workers=workers, progress=progress)
    out: dict[str, tuple[np.ndarray | None, list[str]]] = {}
    by_rank: dict[int, list] = defaultdict(list)
    for m, rb, ra, flags in reduced:
        if FLAG_NON_FINITE in flags:
            out[m.name] = (None, flags)
        elif rb is None:
            out[m.name] = (np.zeros(0), flags)
        elif ra is None:  # a direct spectrum
            out[m.name] = (rb, flags)
        else:  # cores batched by factor width (m.rank, except LoHa's r₁r₂-wide face-split factors)
            by_rank[rb.shape[1]].append((m, rb, ra, flags))
    for r, items in by_rank.items():
        sv = core_singular_values(
            [rb for _, rb, _, _ in items], [ra for _, _, ra, _ in items], [m.scale for m, _, _, _ in items], r
        )
        for (m, _, _, flags), s in zip(items, sv):
            # NaN: finite factors whose product overflows float64 — ΔW cannot be applied either
            out[m.name] = (None, [*flags, FLAG_NON_FINITE]) if np.isnan(s).any() else (s, flags)
    return out


def uniform_rank(ranks: Iterable[int], cap: int) -> int:
    """Smallest power of two ≥ every module's rank, but never above the adapter's own largest r."""
    k = max(list(ranks) or [0])
    if k <= 0:
        return 1
    p = 1
    while p < k:
        p *= 2
    return min(p, max(cap, 1))


def _params_at(modules: list[Module], ranks: dict[str, int]) -> tuple[int, int]:
    params = nbytes = 0
    for m in modules:
        k = ranks.get(m.name)  # no new rank: as stored (a LoHa/LoKr module's own count, not r·(out + in))
        p = m.params if k is None else k * (m.shape[0] + m.shape[1])
        params += p
        nbytes += p * DTYPE_SIZES.get(m.dtype, 4)
    return params, nbytes


def analyse(
    adapter: Adapter,
    energy: float = DEFAULT_ENERGY,
    *,
    module_regex: str | None = None,
    precision: str = "auto",
    progress: Callable[[int], None] | None = None,
    base: BaseCheckpoint | None = None,
    intruders: bool = False,
    basis_cache: BasisCache | None = None,
) -> RankReport:
    """Spectra of every module (in layer order) and the summary; ``module_regex`` keeps the modules
    whose name it matches (``re.search``). With ``base`` (a :class:`~lora_inspect.basecheckpoint.BaseCheckpoint`),
    the base-aware metrics too (:func:`lora_inspect.basemetrics.analyse_base`; ``intruders`` adds intruder
    dimensions, whose bases ``basis_cache`` keeps); adapter/base mismatches are refused before any work."""
    if not 0 < energy <= 1:
        raise InspectError(f"energy τ must be in (0, 1], got {energy}")
    modules = adapter.modules  # in layer order (Adapter keeps them so)
    if module_regex:
        try:
            rx = re.compile(module_regex)
        except re.error as e:
            raise InspectError(f"module pattern {module_regex!r} is not a valid regular expression ({e})") from e
        modules = [m for m in modules if rx.search(m.name)]
        if not modules:
            raise InspectError(f"module pattern {module_regex!r} matches none of the adapter's {plural(len(adapter.modules), 'module')}")
    todo, base_tensors = analysable(adapter, modules, base)  # --base completes OFT/BOFT/(IA)³ and conv kernels
    spectra = compute_spectra(todo, precision=precision, progress=progress)
    results = []
    for m in modules:
        sv, flags = spectra.get(m.name, (None, [NEEDS_BASE]))
        res = ModuleResult(module=m, singular_values=sv, flags=list(flags))
        if sv is not None:
            res.stats = spectrum_stats(unit_spectrum(sv), energy)
            res.stats.singular_values = [float(x) for x in sv]  # the real values, not the scaled ones
            if res.stats.spike and FLAG_ZERO_B not in flags:
                res.flags.append(FLAG_SPIKE)
        results.append(res)
    part = _with_base(results, base, base_tensors, intruders, basis_cache, progress) if base and base_tensors else None
    return RankReport(adapter=adapter, energy=energy, modules=results, summary=summarise(results), base=part)


def _with_base(results: list[ModuleResult], base: BaseCheckpoint, tensors: list[BaseTensor], intruders: bool,
               cache: BasisCache | None, progress: Callable[[int], None] | None) -> BaseAnalysis:
    """Base-aware metrics of the modules with a finite, non-zero spectrum; their flags join the module's."""
    keep = [i for i, r in enumerate(results) if r.singular_values is not None and r.sigma1]
    part = analyse_base([results[i].module for i in keep], base, [tensors[i] for i in keep],
                        intruders=intruders, cache=cache, progress=progress)
    part.skipped = [r.name for r in results if r.name not in part.modules]
    for r in results:
        got = part.modules.get(r.name)
        if got is not None:
            r.flags.extend(got.flags)
    return part


def _group_stats(results: list[ModuleResult], uniform: dict[str, int], pattern: dict[str, int]) -> GroupSummary:
    ok = [r.stats for r in results if r.stats is not None]
    mods = [r.module for r in results]
    params_uni, bytes_uni = _params_at(mods, uniform)
    params_pat, bytes_pat = _params_at(mods, pattern)
    sigmas = [s for s in (r.sigma1 for r in results if r.stats is not None) if s is not None]
    return GroupSummary(
        modules=len(results),
        rank=sorted({r.module.rank for r in results}),
        params=sum(r.module.params for r in results),
        params_uniform=params_uni,
        params_pattern=params_pat,
        bytes_uniform=bytes_uni,
        bytes_pattern=bytes_pat,
        max_energy_rank=max((s.energy_rank for s in ok), default=None),
        mean_energy_rank=(sum(s.energy_rank for s in ok) / len(ok)) if ok else None,
        mean_stable_rank=(sum(s.stable_rank for s in ok) / len(ok)) if ok else None,
        max_sigma1=max(sigmas, default=None),
    )


def _groups(results: list[ModuleResult], key: Callable[[str], str], order: bool) -> dict[str, list[ModuleResult]]:
    """Results grouped by ``key`` of their name; keys in natural order (``order``) or in the order
    they first appear (modules are in layer order already)."""
    out: dict[str, list[ModuleResult]] = defaultdict(list)
    for r in results:
        out[key(r.name)].append(r)
    return {k: out[k] for k in natural_sorted(out)} if order else dict(out)


def summarise(results: list[ModuleResult]) -> RankSummary:
    """The recommendation for a list of module results (see :class:`RankSummary`)."""
    mods = [r.module for r in results]
    ok = [r for r in results if r.stats is not None]
    max_r = max((m.rank for m in mods), default=0)
    uni = uniform_rank((r.stats.energy_rank for r in ok if r.stats), max_r)
    pattern = {r.name: r.stats.energy_rank for r in ok if r.stats}
    # modules we could not analyse keep their rank in every estimate
    params_now, bytes_now = _params_at(mods, {})
    uniform = {r.name: min(uni, r.module.rank) for r in ok}
    params_uni, bytes_uni = _params_at(mods, uniform)
    params_pat, bytes_pat = _params_at(mods, pattern)
    flags: dict[str, int] = defaultdict(int)
    for r in results:
        for f in r.flags:
            flags[f] += 1
    min_kept = min((_retained(r, uni) for r in ok), default=1.0)
    return RankSummary(
        modules=len(results),
        analysed=len(ok),
        max_rank=max_r,
        uniform_rank=uni,
        uniform_min_retained_energy=min_kept,
        rank_pattern=pattern,
        params=Sizes(params_now, params_uni, params_pat),
        bytes=Sizes(bytes_now, bytes_uni, bytes_pat),
        by_type={k: _group_stats(v, uniform, pattern) for k, v in _groups(results, module_type, True).items()},
        by_layer={k: _group_stats(v, uniform, pattern) for k, v in _groups(results, module_layer, False).items()},
        flags=dict(sorted(flags.items())),
        non_finite=[r.name for r in results if FLAG_NON_FINITE in r.flags],
        zero_b=[r.name for r in results if FLAG_ZERO_B in r.flags],
    )


def _retained(r: ModuleResult, k: int) -> float:
    sv = r.singular_values if r.singular_values is not None else np.zeros(0)
    return retained_energy(unit_spectrum(sv), min(k, len(sv)))
