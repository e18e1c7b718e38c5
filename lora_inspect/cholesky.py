"""The Gram/Cholesky reduction of a low-rank factor to its R factor (used by ``analysis.compute_spectra``).

For a well-conditioned factor X, R with RᵀR = XᵀX is the Cholesky factor of the float64 Gram matrix
(CholeskyQR): cheaper than Householder QR and, for κ(X) ≤ 1e4, at least as accurate as the float32 QR it
replaces for 16-bit factors. Ill-conditioned, rank-deficient or overflowing factors get None, and the
caller takes Householder QR (:func:`lora_inspect.spectrum.r_factor`). See ``docs/metrics.md``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["gram_r_factor", "GRAM_MAX_COND"]

# κ(X) up to which ``compute_spectra`` takes R from the float64 Gram's Cholesky factor: error ≈ u₆₄·κ² ≤ 1e-8
# (Higham §19.8; Fukaya et al. 2014), below float32 QR's 6e-8; beyond it, Householder QR (docs/metrics.md).
GRAM_MAX_COND = 1e4


def gram_r_factor(x: np.ndarray, rows: bool = False) -> np.ndarray | None:
    """R (float64, upper) with RᵀR = XᵀX, X = x (m, n) or xᵀ when ``rows``, from the float64 Gram's Cholesky
    factor; None when X is rank deficient, wider than tall, or κ(X) > :data:`GRAM_MAX_COND` (κ² = λmax/λmin)."""
    m, n = (x.shape[1], x.shape[0]) if rows else x.shape
    if m < n or n == 0:
        return None
    x64 = x if x.dtype == np.float64 else x.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # entries past ~1e154 overflow when squared: QR handles them
        g = x64 @ x64.T if rows else x64.T @ x64
    if not np.isfinite(g).all():
        return None
    try:
        ev = np.linalg.eigvalsh(g)
    except np.linalg.LinAlgError:  # no convergence (pathological input): Householder QR needs no Gram
        return None
    if not (np.isfinite(ev).all() and ev[0] > 0 and ev[-1] <= GRAM_MAX_COND**2 * ev[0]):
        return None
    try:
        return np.linalg.cholesky(g).T
    except np.linalg.LinAlgError:
        return None
