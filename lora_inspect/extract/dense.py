"""Small dense kernels of the extraction's numerical core (:mod:`.factor`), float64: a thin QR that stays
BLAS-3 (CholeskyQR2, Householder when the input is ill-conditioned), an orthonormal basis, and a thin SVD
that falls back to ``gesvd`` when ``gesdd`` does not converge."""

from __future__ import annotations

import numpy as np
import scipy.linalg as sla
from scipy.linalg import blas, lapack

__all__ = ["thin_qr", "orth", "thin_svd"]


def thin_qr(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Thin QR of y (M×l) in float64: CholeskyQR2 (Fukaya, Nakatsukasa, Yanagisawa & Yamamoto 2014: two
    Cholesky-based passes, BLAS-3, orthogonal to O(u) while κ(y) ≤ 1e6 ≪ u^(-1/2)); Householder (``geqrf``,
    third item False) when the first Cholesky factor shows κ > 1e6 or fails: then Q completes a
    rank-deficient y with arbitrary directions."""
    q = np.array(y, dtype=np.float64, order="F")
    r = np.eye(q.shape[1])
    for sweep in range(2):
        c, info = lapack.dpotrf(blas.dsyrk(1.0, q, trans=1), lower=0, clean=1)
        d = np.abs(np.diagonal(c))
        if info != 0 or not np.isfinite(c).all() or (sweep == 0 and d.size and d.max() > 1e6 * d.min()):
            qh, rh = sla.qr(np.asarray(y, dtype=np.float64), mode="economic", check_finite=False)
            return qh, rh, False
        q = blas.dtrsm(1.0, c, q, side=1, lower=0, overwrite_b=1)
        r = c @ r
    return q, r, True


def orth(y: np.ndarray, against: np.ndarray | None = None) -> np.ndarray:
    """An orthonormal basis of range(y); with ``against`` (orthonormal, y already projected off it), a
    Householder completion of a rank-deficient y is projected off it once more and orthonormalised again."""
    q, _, clean = thin_qr(y)
    if clean or against is None:
        return q
    q -= against @ (against.T @ q)
    return thin_qr(q)[0]


def thin_svd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD (gesdd; gesvd when gesdd does not converge)."""
    try:
        u, s, vt = np.linalg.svd(x, full_matrices=False)
    except np.linalg.LinAlgError:
        u, s, vt = sla.svd(x, full_matrices=False, lapack_driver="gesvd")
    return u, s, vt
