"""The self-check of ``convert`` and ``merge`` without forming ΔW.

After every write (:class:`Sketch`): for a fixed Gaussian X (in × p),
E‖D X‖_F² = p‖D‖_F² for any D (Halko, Martinsson & Tropp 2011, §4.3 and Lemma 4.1 on Gaussian
test matrices), so ‖D X‖_F/√p estimates ‖D‖_F for D = ΔW′ − ΔW. ‖D X‖_F² is Σᵢ σᵢ(D)²·χ²_p,ᵢ, a
weighted sum of independent χ²_p variables, whose tails are no heavier than one χ²_p's (Székely &
Bakirov 2003): with p = 8 the estimate falls below ‖D‖_F/4 with probability 1.3e-4 and above 3‖D‖_F
with probability 2e-12 (``scipy.stats.chi2``). The check passes when the estimate is ≤ 3× the
rounding bound, so rounding never fails it; a write that changed a ΔW beyond rounding (a wrong
transpose, permutation, scale or key changes it by ~‖ΔW‖, millions of times the bound for fp32) is
caught unless the estimate is ~10⁶ times too small, probability far below 1e-30. Cost O((out + in)·k·p): for
r = 64 about 16× fewer flops than an exact norm from QRs of the stacked factors [s′B′, −sB] and [A′; A]ᵀ
(O((out + in)(2k)²)), which tests/test_convert_matrix.py uses as the reference.
"""

from __future__ import annotations

import torch

from ..defaults import UNIT_ROUNDOFF

__all__ = ["tolerance", "unit_roundoff", "Sketch", "SKETCH_COLUMNS"]

_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
SKETCH_COLUMNS = 8


def unit_roundoff(dtype: torch.dtype) -> float:
    """u of a torch float dtype (:data:`lora_inspect.defaults.UNIT_ROUNDOFF`; fp32's for others)."""
    return UNIT_ROUNDOFF.get(_NAMES.get(dtype, "F32"), 2.0**-24)


def tolerance(b: torch.Tensor, a: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> float:
    """Rounding both stored factors to unit roundoff u changes s·B@A by ≤ (2u + u²)·|s|·‖B‖_F‖A‖_F; slack 8."""
    u = unit_roundoff(dtype)
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
