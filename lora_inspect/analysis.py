"""Per-module spectra and the summary a user acts on (``lora-inspect rank``).

Reads each module's factors once (memory-mapped), batches same-shaped modules into one QR call,
and turns singular values into metrics (:mod:`lora_inspect.spectrum`). Returns plain data; the
rendering lives in :mod:`lora_inspect.render`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from .adapter import Adapter, Module, module_layer, module_type
from .errors import InspectError
from .formats.tensors import DTYPE_SIZES
from .spectrum import all_finite, compute_dtype, core_singular_values, parallel_map, r_factor, retained_energy, spectrum_stats

__all__ = ["ModuleResult", "RankReport", "analyse", "DEFAULT_ENERGY", "uniform_rank", "compute_spectra"]

DEFAULT_ENERGY = 0.95  # fraction of Σσ² a recommendation keeps (the τ of --energy)
FLAG_NON_FINITE = "non_finite"
FLAG_ZERO_B = "zero_b"
FLAG_SPIKE = "spike"


@dataclass
class ModuleResult:
    module: Module
    singular_values: np.ndarray | None  # None when the factors hold NaN/inf
    flags: list[str]
    energy_rank: int | None = None
    stable_rank: float | None = None
    entropy_rank: float | None = None
    recommended_rank: int | None = None
    retained_energy: float | None = None
    relative_error: float | None = None

    @property
    def name(self) -> str:
        return self.module.name


@dataclass
class RankReport:
    adapter: Adapter
    energy: float
    modules: list[ModuleResult]
    summary: dict = field(default_factory=dict)


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
    """
    def reduce(m: Module):
        dtype = compute_dtype(m.dtype, precision)
        if m.rank == 0:
            return m, None, None, []
        b, a = m.factors(dtype)
        if not (all_finite(b) and all_finite(a)):
            return m, None, None, [FLAG_NON_FINITE]
        rb = r_factor(b)
        return m, rb, r_factor(a.T), [] if rb.any() else [FLAG_ZERO_B]  # R_b = 0 exactly when B = 0

    reduced = parallel_map(reduce, modules, workers=workers, progress=progress)
    out: dict[str, tuple[np.ndarray | None, list[str]]] = {}
    by_rank: dict[int, list] = defaultdict(list)
    for m, rb, ra, flags in reduced:
        if FLAG_NON_FINITE in flags:
            out[m.name] = (None, flags)
        elif rb is None:
            out[m.name] = (np.zeros(0), flags)
        else:
            by_rank[m.rank].append((m, rb, ra, flags))
    for r, items in by_rank.items():
        sv = core_singular_values(
            [rb for _, rb, _, _ in items], [ra for _, _, ra, _ in items], [m.scale for m, _, _, _ in items], r
        )
        for (m, _, _, flags), s in zip(items, sv):
            out[m.name] = (s, flags)
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
        k = ranks.get(m.name, m.rank)
        p = k * (m.shape[0] + m.shape[1])
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
) -> RankReport:
    if not 0 < energy <= 1:
        raise InspectError(f"--energy must be in (0, 1], got {energy}")
    modules = adapter.modules
    if module_regex:
        try:
            rx = re.compile(module_regex)
        except re.error as e:
            raise InspectError(f"--module {module_regex!r} is not a valid regular expression ({e})") from e
        modules = [m for m in modules if rx.search(m.name)]
        if not modules:
            raise InspectError(f"--module {module_regex!r} matches none of the {len(adapter.modules)} modules")
    spectra = compute_spectra(modules, precision=precision, progress=progress)
    results = []
    for m in modules:
        sv, flags = spectra[m.name]
        res = ModuleResult(module=m, singular_values=sv, flags=list(flags))
        if sv is not None:
            st = spectrum_stats(sv, energy)
            if st.spike and FLAG_ZERO_B not in flags:
                res.flags.append(FLAG_SPIKE)
            res.energy_rank = st.energy_rank
            res.stable_rank = st.stable_rank
            res.entropy_rank = st.entropy_rank
            res.recommended_rank = st.recommended_rank
            res.retained_energy = st.retained_energy
            res.relative_error = st.relative_error
        results.append(res)
    report = RankReport(adapter=adapter, energy=energy, modules=results)
    report.summary = summarise(results, energy)
    return report


def _group_stats(results: list[ModuleResult], uniform: dict[str, int], pattern: dict[str, int]) -> dict:
    ok = [r for r in results if r.energy_rank is not None]
    mods = [r.module for r in results]
    params_uni, bytes_uni = _params_at(mods, uniform)
    params_pat, bytes_pat = _params_at(mods, pattern)
    return {
        "modules": len(results),
        "rank": sorted({r.module.rank for r in results}),
        "params": sum(r.module.params for r in results),
        "params_uniform": params_uni,
        "params_pattern": params_pat,
        "bytes_uniform": bytes_uni,
        "bytes_pattern": bytes_pat,
        "max_energy_rank": max((r.energy_rank for r in ok), default=None),
        "mean_energy_rank": (sum(r.energy_rank for r in ok) / len(ok)) if ok else None,
        "mean_stable_rank": (sum(r.stable_rank for r in ok) / len(ok)) if ok else None,
        "recommended_rank": max((r.recommended_rank for r in ok), default=None),
        "max_sigma1": max((float(r.singular_values[0]) for r in ok if len(r.singular_values)), default=None),
    }


def summarise(results: list[ModuleResult], energy: float) -> dict:
    mods = [r.module for r in results]
    ok = [r for r in results if r.energy_rank is not None]
    max_r = max((m.rank for m in mods), default=0)
    uni = uniform_rank((r.energy_rank for r in ok), max_r)
    pattern = {r.name: r.energy_rank for r in ok}
    # modules we could not analyse keep their rank in every estimate
    params_now, bytes_now = _params_at(mods, {})
    uniform = {r.name: min(uni, r.module.rank) for r in ok}
    params_uni, bytes_uni = _params_at(mods, uniform)
    params_pat, bytes_pat = _params_at(mods, pattern)
    by_type: dict[str, list[ModuleResult]] = defaultdict(list)
    by_layer: dict[str, list[ModuleResult]] = defaultdict(list)
    for r in results:
        by_type[module_type(r.name)].append(r)
        by_layer[module_layer(r.name)].append(r)
    flags: dict[str, int] = defaultdict(int)
    for r in results:
        for f in r.flags:
            flags[f] += 1
    min_kept = min((_retained(r, uni) for r in ok), default=1.0)
    return {
        "modules": len(results),
        "analysed": len(ok),
        "max_rank": max_r,
        "uniform_rank": uni,
        "uniform_min_retained_energy": min_kept,
        "rank_pattern": pattern,
        "params": {"now": params_now, "uniform": params_uni, "pattern": params_pat},
        "bytes": {"now": bytes_now, "uniform": bytes_uni, "pattern": bytes_pat},
        "by_type": {k: _group_stats(v, uniform, pattern) for k, v in sorted(by_type.items())},
        "by_layer": {k: _group_stats(v, uniform, pattern) for k, v in by_layer.items()},
        "flags": dict(sorted(flags.items())),
    }


def _retained(r: ModuleResult, k: int) -> float:
    return retained_energy(r.singular_values, min(k, len(r.singular_values)))
