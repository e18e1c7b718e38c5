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

import numpy as np

from ..arrays import decode
from ..cpu_random import CpuGenerator
from ..defaults import UNIT_ROUNDOFF

__all__ = ["tolerance", "unit_roundoff", "Sketch", "SKETCH_COLUMNS"]

SKETCH_COLUMNS = 8


def unit_roundoff(dtype: str) -> float:
    """u of a storage dtype, a safetensors name (:data:`lora_inspect.defaults.UNIT_ROUNDOFF`; fp32's for others)."""
    return UNIT_ROUNDOFF.get(dtype, UNIT_ROUNDOFF["F32"])


def _norm64(x: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(decode(x), dtype=np.float64).reshape(-1)))


def tolerance(b: np.ndarray, a: np.ndarray, dtype: str, scale: float = 1.0) -> float:
    """Rounding both stored factors to unit roundoff u changes s·B@A by ≤ (2u + u²)·|s|·‖B‖_F‖A‖_F; slack 8."""
    u = unit_roundoff(dtype)
    return 8 * 3 * u * abs(scale) * _norm64(b) * _norm64(a) + 1e-300


class Sketch:
    """Gaussian test matrices X (in × p), one per input width, from one seed: the same X for the
    expected and the written ΔW of a module, so their difference is sketched exactly."""

    def __init__(self, seed: int = 0, columns: int = SKETCH_COLUMNS) -> None:
        self.seed, self.columns = seed, columns
        self._x: dict[int, np.ndarray] = {}

    def probe(self, width: int) -> np.ndarray:
        """X (width × p), float64: ``torch.randn`` of a generator seeded with seed·1000003 + width, as drawn
        before the port to numpy (:class:`~lora_inspect.cpu_random.CpuGenerator`)."""
        if width not in self._x:
            self._x[width] = CpuGenerator(self.seed * 1_000_003 + width).randn(width, self.columns)
        return self._x[width]

    def apply(self, b: np.ndarray, a: np.ndarray, scale: float) -> np.ndarray:
        """s·B@(A@X) in float64 (out × p); never forms B@A."""
        x = self.probe(int(a.shape[1]))
        b64, a64 = (np.asarray(decode(f), dtype=np.float64) for f in (b, a))
        return (b64 @ (a64 @ x)) * scale

    def norm(self, y: np.ndarray) -> float:
        """‖Y‖_F/√p: the estimate of ‖ΔW‖_F from its sketch Y = ΔW·X."""
        return float(np.linalg.norm(y.reshape(-1))) / self.columns**0.5
