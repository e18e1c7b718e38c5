"""Exact spectra of low-rank updates, without forming them. Pure maths: no I/O.

For ΔW = s·B@A with B (out, r) and A (r, in), take reduced QR factorisations B = Q_b R_b and
Aᵀ = Q_a R_a. Then ΔW = Q_b (s·R_b R_aᵀ) Q_aᵀ with orthonormal Q's, so the singular values of ΔW are
those of the r×r core s·R_b R_aᵀ, and its singular vectors are U = Q_b U_core, V = Q_a V_core.
Cost O((out + in)·r²) instead of O(out·in·min(out, in)) for a dense SVD. The QR route keeps small
singular values that the Gram route (eigenvalues of BᵀB·AAᵀ) loses (``docs/metrics.md``).
The core is always decomposed in float64. numpy's LAPACK does the work (no torch): ``geqrf`` for
Householder QR, ``potrf`` for CholeskyQR, ``gesdd`` for the cores.

Rank metrics (σ₁ ≥ … ≥ σ_r ≥ 0):
- energy rank at τ: smallest k with Σ_{i≤k} σᵢ² ≥ τ·Σ σᵢ² (the Eckart–Young retained energy);
- stable rank: Σ σᵢ² / σ₁² (Rudelson & Vershynin 2007);
- entropy (effective) rank: exp(−Σ pᵢ ln pᵢ), pᵢ = σᵢ / Σ σⱼ (Roy & Vetterli 2007).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from .errors import NonFiniteUpdate

T = TypeVar("T")
R = TypeVar("R")

__all__ = [
    "compute_dtype",
    "parallel_map",
    "worker_count",
    "Decomposition",
    "decompose",
    "r_factor",
    "core_singular_values",
    "singular_values",
    "svd_factors",
    "truncate_factors",
    "energy_rank",
    "stable_rank",
    "entropy_rank",
    "retained_energy",
    "relative_error",
    "SpectrumStats",
    "spectrum_stats",
    "SPIKE_RATIO",
]

SPIKE_RATIO = 10.0  # σ₁/σ₂ at or above this is flagged as a dominant spike


def compute_dtype(stored: str, precision: str = "auto") -> np.dtype:
    """The dtype to decompose a factor stored as ``stored`` (safetensors name) in.

    auto: 16-bit data carries 8–11 significant bits, so float32 arithmetic is exact far beyond it;
    fp32/fp64 data is decomposed in float64. ``fp32``/``fp64`` force one."""
    if precision == "fp64":
        return np.dtype(np.float64)
    if precision == "fp32":
        return np.dtype(np.float32)
    return np.dtype(np.float32) if stored in ("BF16", "F16", "F8_E4M3", "F8_E5M2") else np.dtype(np.float64)


def worker_count() -> int:
    """Threads for per-module work: ``LORA_INSPECT_THREADS``, else the usable CPUs (at most 4)."""
    env = os.environ.get("LORA_INSPECT_THREADS")
    if env:
        return max(1, int(env))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cpus))


def parallel_map(
    fn: Callable[[T], R], items: Sequence[T], *, workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[R]:
    """``[fn(x) for x in items]`` over worker threads; order kept. numpy's LAPACK/BLAS calls and its
    large elementwise loops release the GIL, so modules are reduced in parallel."""
    workers = workers or worker_count()
    out: list[R] = []
    if workers > 1 and len(items) > 1:
        with ThreadPoolExecutor(workers) as pool:
            for res in pool.map(fn, items):
                out.append(res)
                if progress:
                    progress(1)
    else:
        for x in items:
            out.append(fn(x))
            if progress:
                progress(1)
    return out


def all_finite(x: np.ndarray) -> bool:
    """Exact, and cheap in the common case: a finite sum proves every element finite (NaN and ±inf
    always reach the sum); only a non-finite sum — NaN/inf present, or a huge-value overflow — pays
    for the elementwise check. (NaN does not always reach a Householder R: a 1-column factor with NaN
    on top came out finite.)"""
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(x.sum())) or bool(np.isfinite(x).all())


def r_factor(x: np.ndarray) -> np.ndarray:
    """R of the reduced QR of x (m, n): (min(m, n), n). Only R is needed for singular values."""
    r: np.ndarray = np.linalg.qr(x, mode="r")  # type: ignore[assignment]  # mode="r" returns R alone
    return r


def core_singular_values(
    rbs: list[np.ndarray], ras: list[np.ndarray], scales: list[float], r: int
) -> np.ndarray:
    """Singular values of the cores s·R_b R_aᵀ for many modules of one rank r, in one batched float64 SVD.

    R factors may have fewer than r rows (when out < r or in < r); they are zero-padded to r×r,
    which adds zero singular values only. Returns (N, r) descending.
    """
    n = len(rbs)
    pb = np.zeros((n, r, r))
    pa = np.zeros((n, r, r))
    for i, (rb, ra) in enumerate(zip(rbs, ras)):
        pb[i, : rb.shape[0]] = rb
        pa[i, : ra.shape[0]] = ra
    with np.errstate(over="ignore", invalid="ignore"):
        core = (pb @ pa.transpose(0, 2, 1)) * np.asarray(scales, dtype=np.float64).reshape(-1, 1, 1)
        finite = np.isfinite(core).reshape(n, -1).all(axis=1)
    out = np.full((n, r), np.nan)  # a core that overflows float64 (finite factors, huge values) stays NaN
    if finite.any():
        out[finite] = np.abs(np.linalg.svd(core[finite], compute_uv=False))
    return out


def singular_values(b: np.ndarray, a: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Singular values (length r, descending, float64) of s·B@A from the QR factors and an r×r SVD —
    the same route ``analysis.compute_spectra`` takes for a whole adapter, for one module."""
    return core_singular_values([r_factor(b)], [r_factor(a.T)], [float(scale)], b.shape[1])[0]


def svd_factors(b: np.ndarray, a: np.ndarray, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD of s·B@A in float64 without forming it: returns U (out, r'), S (r',), Vh (r', in)."""
    b = np.asarray(b, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    qb, rb = np.linalg.qr(b)  # (out, p), (p, r)
    qa, ra = np.linalg.qr(a.T)  # (in, q), (q, r)
    uc, s, vch = _core_svd(scale, rb, ra)
    return qb @ uc, s, vch @ qa.T


def truncate_factors(b: np.ndarray, a: np.ndarray, scale: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-k factors of s·B@A (Eckart–Young), scale baked in, split evenly:
    B' = Q_b U_k √S_k (out, k), A' = √S_k V_kᵀ Q_aᵀ (k, in), so B'@A' = the truncated ΔW. float64.

    k may exceed the numerical rank; the extra directions have σ = 0 (zero columns/rows)."""
    return decompose(np.asarray(b, dtype=np.float64), np.asarray(a, dtype=np.float64), scale).factors(k)


def _max_cond(table: dict[str, float], dtype: np.dtype) -> float:
    return table["f8" if np.dtype(dtype) == np.float64 else "f4"]


# CholeskyQR is used when κ(factor) is at most this (per compute dtype): its R then carries a relative
# error ≈ u_compute·κ² (Higham, "Accuracy and Stability of Numerical Algorithms", §19.8; Fukaya et al.
# 2014), below the rounding of the stored result (bf16/fp16 → float32 compute: 6e-8·100² = 6e-4 < 2^-8·…;
# fp32/fp64 → float64 compute: 1.1e-16·1e4² = 1e-8 < 2^-24). Otherwise Householder (geqrf) is used.
_CHOL_MAX_COND = {"f4": 1e2, "f8": 1e4}
# Up to this κ, R comes from Householder QR and Q = X R⁻¹ is applied by triangular solves: Q's
# orthogonality error is ≈ u·κ (Higham §19.8, "QR via R⁻¹"), below the stored result's rounding
# (float32 compute for 16-bit storage: 6e-8·1e3 = 6e-5 < fp16's 4.9e-4; float64: 1e-16·1e8 = 1e-8 < 2^-24).
# Beyond it, Householder's own orthonormal Q is formed and applied.
_SOLVE_MAX_COND = {"f4": 1e3, "f8": 1e8}


@dataclass
class Decomposition:
    """ΔW = s·B@A = (B M_b) diag(S) (N_a A) with B M_b = Q_b U and N_a A = Vᵀ Q_aᵀ orthonormal, from
    the float64 SVD U diag(S) Vh of the core s·R_b R_aᵀ (B = Q_b R_b, Aᵀ = Q_a R_a). Two routes reach
    the R factors — :class:`CholeskyDecomposition` and :class:`HouseholderDecomposition` — and differ
    only in how they map the kept directions back to factors (:meth:`factors`)."""

    u: np.ndarray  # (p, r') float64
    s: np.ndarray  # (r',) float64, descending
    vh: np.ndarray  # (r', q) float64

    @property
    def singular_values(self) -> np.ndarray:
        return self.s.copy()

    def _scaled(self, keep: int) -> tuple[np.ndarray, np.ndarray]:
        """U_k √S_k (p, k) and V_k √S_k (q, k), float64."""
        root = np.sqrt(self.s[:keep])
        return self.u[:, :keep] * root, self.vh[:keep].T * root

    def factors(self, keep: int, stored: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(B′ (out, stored), A′ (stored, in)) in the compute dtype: B′@A′ is the best rank-``keep``
        approximation of ΔW (scale included); columns/rows past ``keep`` are zero."""
        raise NotImplementedError  # pragma: no cover - interface


@dataclass
class CholeskyDecomposition(Decomposition):
    """CholeskyQR route (well-conditioned factors): R = chol(BᵀB)ᵀ; Q_b = B R_b⁻¹ is never formed,
    only the small r×k product R_b⁻¹ U_k √S_k."""

    b: np.ndarray  # set by decompose
    a: np.ndarray
    rb: np.ndarray  # float64 upper-triangular
    ra: np.ndarray

    def factors(self, keep: int, stored: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        from scipy.linalg import solve_triangular

        stored = keep if stored is None else stored
        keep = min(keep, self.s.shape[0])
        mb = np.zeros((self.rb.shape[0], stored))
        ma = np.zeros((self.ra.shape[0], stored))
        if keep:  # B′ = B R_b⁻¹ U_k √S_k, A′ = √S_k V_kᵀ R_a⁻ᵀ A
            us, vs = self._scaled(keep)
            mb[:, :keep] = solve_triangular(self.rb, us, lower=False)
            ma[:, :keep] = solve_triangular(self.ra, vs, lower=False)
        dt = self.b.dtype
        return self.b @ mb.astype(dt), ma.T.astype(dt) @ self.a


@dataclass
class HouseholderDecomposition(Decomposition):
    """Householder route: B = Q_b R_b and Aᵀ = Q_a R_a by reduced QR (``geqrf``/``orgqr``), Q kept to
    map the small (·, k) blocks back."""

    qb: np.ndarray  # set by decompose: (out, p), (in, q) orthonormal, compute dtype
    qa: np.ndarray
    out_dim: int
    in_dim: int

    def factors(self, keep: int, stored: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        stored = keep if stored is None else stored
        keep = min(keep, self.s.shape[0])
        dt = self.qb.dtype
        cb = np.zeros((self.qb.shape[1], stored), dtype=dt)
        ca = np.zeros((self.qa.shape[1], stored), dtype=dt)
        if keep:
            us, vs = self._scaled(keep)
            cb[: us.shape[0], :keep] = us
            ca[: vs.shape[0], :keep] = vs
        return self.qb @ cb, (self.qa @ ca).T


def _chol_r(x: np.ndarray, xt_first: bool) -> np.ndarray | None:
    """Upper R (float64) with RᵀR = XᵀX (X = x, or xᵀ when ``xt_first``) that is safe to invert, or
    None when X is too ill-conditioned (or rank deficient) for that in x's dtype.

    The Gram matrix's eigenvalues give κ(X) exactly (κ² = λmax/λmin) for the price of one syrk: up to
    ``_CHOL_MAX_COND`` R is its Cholesky factor (CholeskyQR); up to ``_SOLVE_MAX_COND`` it is taken
    from a Householder QR instead (accurate R, and X R⁻¹ still near-orthonormal)."""
    with np.errstate(over="ignore", invalid="ignore"):
        g = ((x @ x.T) if xt_first else (x.T @ x)).astype(np.float64)
    if not np.isfinite(g).all():  # the Gram overflows (huge values): Householder needs no Gram
        return None
    try:
        ev = np.linalg.eigvalsh(g)
    except np.linalg.LinAlgError:
        return None
    if not (np.isfinite(ev).all() and ev[0] > 0):
        return None
    kappa2 = float(ev[-1] / ev[0])
    if kappa2 <= _max_cond(_CHOL_MAX_COND, x.dtype) ** 2:
        try:
            return np.linalg.cholesky(g).T
        except np.linalg.LinAlgError:
            pass
    if kappa2 <= _max_cond(_SOLVE_MAX_COND, x.dtype) ** 2:
        return r_factor(x.T if xt_first else x).astype(np.float64)
    return None


def decompose(b: np.ndarray, a: np.ndarray, scale: float) -> Decomposition:
    """R factors of B and Aᵀ (CholeskyQR when well conditioned, else Householder) and the float64 SVD of
    the core s·R_b R_aᵀ. The factors must be finite (callers check with :func:`all_finite`, which is
    how they name the module); a non-finite core after the QR (an overflow) is an InspectError."""
    out_dim, r = b.shape
    in_dim = a.shape[1]
    rb = _chol_r(b, False) if out_dim >= r else None
    ra = _chol_r(a, True) if rb is not None and in_dim >= r else None
    if rb is not None and ra is not None:
        u, s, vh = _core_svd(scale, rb, ra)
        return CholeskyDecomposition(u, s, vh, b=b, a=a, rb=rb, ra=ra)
    qb, rb = np.linalg.qr(b)
    qa, ra = np.linalg.qr(np.ascontiguousarray(a.T))
    u, s, vh = _core_svd(scale, rb.astype(np.float64), ra.astype(np.float64))
    return HouseholderDecomposition(u, s, vh, qb=qb, qa=qa, out_dim=out_dim, in_dim=in_dim)


def _core_svd(scale: float, rb: np.ndarray, ra: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.errstate(over="ignore", invalid="ignore"):
        core = scale * (rb @ ra.T)
    if not np.isfinite(core).all():
        raise NonFiniteUpdate()
    u, s, vh = np.linalg.svd(core, full_matrices=False)
    return u, s, vh


def _energy(sv: np.ndarray) -> np.ndarray:
    return np.asarray(sv, dtype=np.float64) ** 2


def energy_rank(sv: np.ndarray, tau: float) -> int:
    """Smallest k with Σ_{i≤k} σᵢ² ≥ τ·Σ σᵢ²; 0 for an all-zero spectrum."""
    e = _energy(sv)
    total = e.sum()
    if not total > 0:
        return 0
    cum = np.cumsum(e)
    # the tiny slack keeps an exactly-met threshold from tipping over on rounding
    return int(min(np.searchsorted(cum, tau * total * (1 - 1e-12), side="left") + 1, len(e)))


def retained_energy(sv: np.ndarray, k: int) -> float:
    """Σ_{i≤k} σᵢ² / Σ σᵢ² — the fraction a rank-k truncation keeps (1 for a zero spectrum)."""
    e = _energy(sv)
    total = e.sum()
    return 1.0 if not total > 0 else float(min(e[:k].sum() / total, 1.0))


def relative_error(sv: np.ndarray, k: int) -> float:
    """‖ΔW − ΔW_k‖_F / ‖ΔW‖_F = √(Σ_{i>k} σᵢ² / Σ σᵢ²), computed from the tail so that it stays exact."""
    e = _energy(sv)
    total = e.sum()
    return 0.0 if not total > 0 else float(math.sqrt(e[k:].sum() / total))


def stable_rank(sv: np.ndarray) -> float:
    e = _energy(sv)
    return 0.0 if not e.size or e[0] <= 0 else float(e.sum() / e[0])


def entropy_rank(sv: np.ndarray) -> float:
    s = np.asarray(sv, dtype=np.float64)
    total = s.sum()
    if not total > 0:
        return 0.0
    p = s[s > 0] / total
    return float(math.exp(-(p * np.log(p)).sum()))


@dataclass
class SpectrumStats:
    singular_values: list[float]
    energy_rank: int
    stable_rank: float
    entropy_rank: float
    recommended_rank: int
    retained_energy: float
    relative_error: float
    spike: bool


def spectrum_stats(sv: np.ndarray, tau: float) -> SpectrumStats:
    k = energy_rank(sv, tau)
    spike = len(sv) > 1 and sv[0] > 0 and (sv[1] == 0 or sv[0] / sv[1] >= SPIKE_RATIO)
    return SpectrumStats(
        singular_values=[float(x) for x in sv],
        energy_rank=k,
        stable_rank=stable_rank(sv),
        entropy_rank=entropy_rank(sv),
        recommended_rank=k,
        retained_energy=retained_energy(sv, k),
        relative_error=relative_error(sv, k),
        spike=bool(spike),
    )
