"""The Gram/Cholesky reduction of a low-rank factor to its R factor (used by ``analysis.compute_spectra``).

For a well-conditioned factor X, R with RᵀR = XᵀX is the Cholesky factor of the float64 Gram matrix
(CholeskyQR): cheaper than Householder QR and, for κ(X) ≤ 1e4, at least as accurate as the float32 QR it
replaces for 16-bit factors. Ill-conditioned, rank-deficient or overflowing factors get None, and the
caller takes Householder QR (:func:`lora_inspect.spectrum.r_factor`). See ``docs/metrics.md``.
"""

from __future__ import annotations

import torch

__all__ = ["gram_r_factor", "GRAM_MAX_COND"]

# κ(X) up to which ``compute_spectra`` takes R from the float64 Gram's Cholesky factor: error ≈ u₆₄·κ² ≤ 1e-8
# (Higham §19.8; Fukaya et al. 2014), below float32 QR's 6e-8; beyond it, Householder QR (docs/metrics.md).
GRAM_MAX_COND = 1e4


def gram_r_factor(x: torch.Tensor, rows: bool = False) -> torch.Tensor | None:
    """R (float64, upper) with RᵀR = XᵀX, X = x (m, n) or xᵀ when ``rows``, from the float64 Gram's Cholesky
    factor; None when X is rank deficient, wider than tall, or κ(X) > :data:`GRAM_MAX_COND` (κ² = λmax/λmin)."""
    m, n = (x.shape[1], x.shape[0]) if rows else x.shape
    if m < n or n == 0:
        return None
    x64 = x if x.dtype == torch.float64 else x.to(torch.float64)
    g = x64 @ x64.T if rows else x64.T @ x64
    try:  # entries past ~1e154 overflow when squared (LinAlgError): QR handles them
        ev = torch.linalg.eigvalsh(g) if bool(torch.isfinite(g).all()) else None
    except RuntimeError:
        ev = None
    if ev is None:
        return None
    if not (bool(torch.isfinite(ev).all()) and ev[0] > 0 and ev[-1] <= GRAM_MAX_COND**2 * ev[0]):
        return None
    chol, info = torch.linalg.cholesky_ex(g)
    return None if int(info) else chol.T
