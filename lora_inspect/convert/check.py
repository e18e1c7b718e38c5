"""Exactness checks without forming ΔW.

Exact, in factor space (``merge`` tests and small cores): ‖s′B′A′ − sBA‖_F. [s′B′, −sB] and [A′; A]
multiply to the difference; with Householder QR of both, [s′B′, −sB] = Q_b R_b and [A′; A]ᵀ = Q_a R_a,
the difference's Frobenius norm is ‖R_b R_aᵀ‖_F (the Q's have orthonormal columns), computed in
float64 with no cancellation between two large dense matrices. Cost O((out + in)(k′+k)²).

Sketched, for the self-check after every write (:func:`sketch`): for a fixed Gaussian X (in × p),
E‖D X‖_F² = p‖D‖_F² for any D (Halko, Martinsson & Tropp 2011, §4.3 and Lemma 4.1 on Gaussian
test matrices), so ‖D X‖_F/√p estimates ‖D‖_F for D = ΔW′ − ΔW. ‖D X‖_F² is Σᵢ σᵢ(D)²·χ²_p,ᵢ, a
weighted sum of independent χ²_p variables, whose tails are no heavier than one χ²_p's (Székely &
Bakirov 2003): with p = 8 the estimate falls below ‖D‖_F/4 with probability 1.3e-4 and above 3‖D‖_F
with probability 2e-12 (``scipy.stats.chi2``). The check passes when the estimate is ≤ 3× the
rounding bound, so rounding never fails it; a write that changed a ΔW beyond rounding (a wrong
transpose, permutation, scale or key changes it by ~‖ΔW‖, millions of times the bound for fp32) is
caught unless the estimate is ~10⁶ times too small, probability far below 1e-30. Cost O((out + in)·k·p): for
r = 64 about 16× fewer flops than the QR route, and no k×k factorisations.
"""

from __future__ import annotations

import torch

__all__ = ["diff_norm", "lowrank_norm", "tolerance", "UNIT_ROUNDOFF", "Sketch", "SKETCH_COLUMNS"]

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 2.0**-53}
SKETCH_COLUMNS = 8


def _r(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x, mode="r")[1]


def lowrank_norm(b: torch.Tensor, a: torch.Tensor) -> float:
    """‖B@A‖_F via the R factors of B and Aᵀ."""
    if b.shape[1] == 0:
        return 0.0
    return float(torch.linalg.matrix_norm(_r(b.double()) @ _r(a.double().T).T))


def diff_norm(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> float:
    """‖B1@A1 − B2@A2‖_F (scales already in the B's)."""
    b = torch.cat([b1.double(), -b2.double()], dim=1)
    a = torch.cat([a1.double(), a2.double()], dim=0)
    return lowrank_norm(b, a)


def tolerance(b: torch.Tensor, a: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> float:
    """Rounding both stored factors to unit roundoff u changes s·B@A by ≤ (2u + u²)·|s|·‖B‖_F‖A‖_F; slack 8."""
    u = UNIT_ROUNDOFF.get(dtype, 2.0**-24)
    nb = float(torch.linalg.vector_norm(b, dtype=torch.float64))
    na = float(torch.linalg.vector_norm(a, dtype=torch.float64))
    return 8 * 3 * u * abs(scale) * nb * na + 1e-300


class Sketch:
    """Gaussian test matrices X (in × p), one per input width, from one seed: the same X for the
    expected and the written ΔW of a module, so their difference is sketched exactly."""

    def __init__(self, seed: int = 0, columns: int = SKETCH_COLUMNS) -> None:
        self.seed, self.columns = seed, columns
        self._x: dict[int, torch.Tensor] = {}

    def probe(self, width: int) -> torch.Tensor:
        if width not in self._x:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + width)
            self._x[width] = torch.randn(width, self.columns, generator=g, dtype=torch.float64)
        return self._x[width]

    def apply(self, b: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
        """s·B@(A@X) in float64 (out × p); never forms B@A."""
        x = self.probe(int(a.shape[1]))
        return (b.double() @ (a.double() @ x)) * scale

    def norm(self, y: torch.Tensor) -> float:
        """‖Y‖_F/√p: the estimate of ‖ΔW‖_F from its sketch Y = ΔW·X."""
        return float(torch.linalg.vector_norm(y)) / self.columns**0.5
