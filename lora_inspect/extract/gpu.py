"""``extract --device cuda``: the exact route on a GPU (torch is the engine here, imported inside).

On a GPU, float64 is fast enough to take the exact route for every module: the Gram matrix
G = ΔWᵀΔW in the smaller dimension n (one m·n² product), its eigen-decomposition (``torch.linalg.eigh``,
cuSOLVER ``syevd``), V_k its k leading eigenvectors, and B = ΔW·V_k, A = V_kᵀ: B·A = ΔW·V_k·V_kᵀ is the
orthogonal projection of ΔW's rows on span(V_k), so ‖ΔW − B·A‖²_F = ‖ΔW‖²_F − ‖ΔW·V_k‖²_F exactly,
and with V_k the leading eigenvectors of G this is the Eckart–Young optimum (Golub & Van Loan,
*Matrix Computations*, 4th ed., §8.6: the SVD from the eigen-decomposition of AᵀA). The Gram squares
the condition number: singular values below √(n·ε)·σ₁ are not resolved by it, so where the k-th
eigenvalue falls under n·ε·λ₁ the module is decomposed by ``torch.linalg.svd`` in float64 instead.
"""

from __future__ import annotations

import numpy as np

from .factor import Decomposition, decompose

__all__ = ["decompose_torch", "gram_floor"]


def gram_floor(lam_max: float, n: int) -> float:
    """Eigenvalues of a float64 Gram matrix below this are rounding (n·ε·λ₁)."""
    return n * float(np.finfo(np.float64).eps) * lam_max


def _energy_rank(sig2: np.ndarray, total: float, energy: float) -> int:
    if total <= 0:
        return 0
    cum = np.cumsum(sig2)
    return int(min(np.searchsorted(cum, energy * total * (1 - 1e-12)) + 1, sig2.shape[0]))


def decompose_torch(d: np.ndarray, *, rank: int | None, energy: float | None, vectors: bool = True,
                    device: str = "cuda") -> Decomposition:
    """The exact rank-k (or energy-rank) decomposition of ``d`` computed with torch on ``device``."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(d)).to(device=device, dtype=torch.float64)
    wide = x.shape[0] < x.shape[1]
    if wide:
        x = x.T  # Gram in the smaller dimension; transposed back at the end
    n = x.shape[1]
    total = float(torch.sum(x * x))
    lam, vec = torch.linalg.eigh(x.T @ x)
    lam, vec = lam.flip(0).clamp(min=0), vec.flip(1)
    sig2 = lam.cpu().numpy()
    k = min(rank, n) if rank is not None else _energy_rank(sig2, total, energy or 1.0)
    if k and sig2[k - 1] < gram_floor(float(sig2[0]), n):
        return decompose(d, rank=k, vectors=vectors)  # below the Gram's resolution: the dense float64 SVD
    y = x @ vec[:, :k]  # (m, k) = U_k Σ_k
    sigma = torch.linalg.vector_norm(y, dim=0)
    safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    u, v = (y / safe).cpu().numpy(), vec[:, :k].cpu().numpy()
    if wide:
        u, v = v, u
    s = sigma.cpu().numpy()
    return Decomposition(s, u if vectors else None, v.T.copy() if vectors else None, total, "exact", 0.0,
                         np.sqrt(sig2))
