"""Exact spectra of low-rank updates, without forming them. Pure maths: no I/O.

For ΔW = s·B@A with B (out, r) and A (r, in), take reduced QR factorisations B = Q_b R_b and
Aᵀ = Q_a R_a. Then ΔW = Q_b (s·R_b R_aᵀ) Q_aᵀ with orthonormal Q's, so the singular values of ΔW are
those of the r×r core s·R_b R_aᵀ, and its singular vectors are U = Q_b U_core, V = Q_a V_core.
Cost O((out + in)·r²) instead of O(out·in·min(out, in)) for a dense SVD. The QR route keeps small
singular values that the Gram route (eigenvalues of BᵀB·AAᵀ) loses (``../shared/docs/metrics.md``).
The core is always decomposed in float64.

Rank metrics (σ₁ ≥ … ≥ σ_r ≥ 0):
- energy rank at τ: smallest k with Σ_{i≤k} σᵢ² ≥ τ·Σ σᵢ² (the Eckart–Young retained energy);
- stable rank: Σ σᵢ² / σ₁² (Rudelson & Vershynin 2007);
- entropy (effective) rank: exp(−Σ pᵢ ln pᵢ), pᵢ = σᵢ / Σ σⱼ (Roy & Vetterli 2007).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "r_factor",
    "core_singular_values",
    "singular_values",
    "batched_singular_values",
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


def r_factor(x: torch.Tensor) -> torch.Tensor:
    """R of the reduced QR of x (…, m, n): (…, min(m, n), n). Only R is needed for singular values."""
    return torch.linalg.qr(x, mode="r")[1]


def core_singular_values(
    rbs: list[torch.Tensor], ras: list[torch.Tensor], scales: list[float], r: int
) -> np.ndarray:
    """Singular values of the cores s·R_b R_aᵀ for many modules of one rank r, in one batched float64 SVD.

    R factors may have fewer than r rows (when out < r or in < r); they are zero-padded to r×r,
    which adds zero singular values only. Returns (N, r) descending.
    """
    n = len(rbs)
    pb = torch.zeros(n, r, r, dtype=torch.float64)
    pa = torch.zeros(n, r, r, dtype=torch.float64)
    for i, (rb, ra) in enumerate(zip(rbs, ras)):
        pb[i, : rb.shape[0]] = rb
        pa[i, : ra.shape[0]] = ra
    core = (pb @ pa.transpose(-1, -2)) * torch.tensor(scales, dtype=torch.float64).reshape(-1, 1, 1)
    return torch.linalg.svdvals(core).abs().numpy()


def batched_singular_values(b: torch.Tensor, a: torch.Tensor, scale: torch.Tensor | float) -> np.ndarray:
    """Singular values of s·B@A for a batch: b (N, out, r), a (N, r, in), scale scalar or (N,).

    Returns (N, r) float64, descending, zero-padded to r when r > min(out, in).
    """
    n, _, r = b.shape
    rb = r_factor(b)  # (N, min(out, r), r)
    ra = r_factor(a.transpose(-1, -2))  # (N, min(in, r), r)
    core = rb.to(torch.float64) @ ra.to(torch.float64).transpose(-1, -2)
    s = torch.as_tensor(scale, dtype=torch.float64).reshape(-1, 1, 1) if not isinstance(scale, float) else scale
    core = core * s
    sv = torch.linalg.svdvals(core).abs()
    out = np.zeros((n, r), dtype=np.float64)
    out[:, : sv.shape[-1]] = sv.numpy()
    return out


def singular_values(b: torch.Tensor, a: torch.Tensor, scale: float = 1.0) -> np.ndarray:
    """Singular values (length r, descending, float64) of s·B@A from the QR factors and an r×r SVD."""
    return batched_singular_values(b.unsqueeze(0), a.unsqueeze(0), float(scale))[0]


def svd_factors(
    b: torch.Tensor, a: torch.Tensor, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of s·B@A in float64 without forming it: returns U (out, r'), S (r',), Vh (r', in)."""
    b = b.to(torch.float64)
    a = a.to(torch.float64)
    qb, rb = torch.linalg.qr(b)  # (out, p), (p, r)
    qa, ra = torch.linalg.qr(a.T)  # (in, q), (q, r)
    uc, s, vch = torch.linalg.svd(scale * (rb @ ra.T), full_matrices=False)
    return qb @ uc, s, vch @ qa.T


def truncate_factors(
    b: torch.Tensor, a: torch.Tensor, scale: float, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-k factors of s·B@A (Eckart–Young), scale baked in, split evenly:
    B' = Q_b U_k √S_k (out, k), A' = √S_k V_kᵀ Q_aᵀ (k, in), so B'@A' = the truncated ΔW. float64.

    k may exceed the numerical rank; the extra directions have σ = 0 (zero columns/rows)."""
    u, s, vh = svd_factors(b, a, scale)
    k_avail = min(k, s.shape[0])
    root = s[:k_avail].sqrt()
    bk = torch.zeros(u.shape[0], k, dtype=torch.float64)
    ak = torch.zeros(k, vh.shape[1], dtype=torch.float64)
    bk[:, :k_avail] = u[:, :k_avail] * root
    ak[:k_avail] = root[:, None] * vh[:k_avail]
    return bk, ak


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
