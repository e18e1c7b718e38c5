"""torch's CPU random streams on numpy, so that seeded draws stay what they were under torch.

``torch.Generator().manual_seed(seed)`` is a 32-bit Mersenne Twister (MT19937) seeded with the low 32 bits
of ``seed`` by the reference ``init_genrand``, which is how numpy's legacy :class:`numpy.random.RandomState`
seeds the same engine, so both give the same 32-bit words (``randint(0, 2**32, dtype=uint32)`` returns them
unmasked). On these words torch builds (``ATen/core/DistributionsHelper.h``, ``TransformationHelper.h``,
``native/cpu/DistributionTemplates.h``, torch 2.x):

- a float32 uniform from one word: ``(w & 0xFFFFFF)·2⁻²⁴``; ``torch.bernoulli(p)`` on a float32 ``p`` is
  ``uniform < p``, one word per element in order (``bernoulli_kernel``);
- a float64 uniform from two words (the first the high half): ``(hi·2³² | lo) & (2⁵³ − 1))·2⁻⁵³``;
- ``torch.randn`` (float64, contiguous, ≥ 16 elements: ``normal_fill``): uniforms for every element, then
  Box–Muller on blocks of 16 (u₁ = 1 − x[j], u₂ = x[j + 8], √(−2 ln u₁)·cos/sin(2π u₂) into j and j + 8),
  and, when 16 does not divide the size, the last 16 redrawn and transformed again; fewer than 16
  elements: ``normal_distribution`` pairs (θ from the first uniform, √(−2 log1p(−u₂)) from the second),
  the sine kept for the next element.

The masks are bit-identical to torch's; the Gaussians agree to the last bits of numpy's log/cos/sin.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["CpuGenerator"]

_TWO_PI = 2.0 * math.pi
_MASK53 = np.uint64((1 << 53) - 1)


class CpuGenerator:
    """What ``torch.Generator().manual_seed(seed)`` draws for :meth:`bernoulli` and :meth:`randn`."""

    def __init__(self, seed: int) -> None:
        self._engine = np.random.RandomState(seed & 0xFFFFFFFF)
        self._normal: float | None = None  # the cached second Box–Muller sample of the scalar path

    def words(self, n: int) -> np.ndarray:
        """The next ``n`` 32-bit outputs of the engine."""
        return self._engine.randint(0, 2**32, size=n, dtype=np.uint32)

    def _uniform32(self, n: int) -> np.ndarray:
        return (self.words(n) & np.uint32(0xFFFFFF)).astype(np.float32) * np.float32(2.0**-24)

    def _uniform64(self, n: int) -> np.ndarray:
        w = self.words(2 * n).astype(np.uint64)
        return (((w[0::2] << np.uint64(32)) | w[1::2]) & _MASK53).astype(np.float64) * 2.0**-53

    def bernoulli(self, shape: tuple[int, ...], p: float) -> np.ndarray:
        """``torch.bernoulli(torch.full(shape, p, dtype=torch.float32), generator=g)`` as booleans."""
        n = math.prod(shape)
        return (self._uniform32(n) < np.float32(p)).reshape(shape)

    def randn(self, *shape: int) -> np.ndarray:
        """``torch.randn(*shape, generator=g, dtype=torch.float64)``."""
        n = math.prod(shape)
        if n < 16:
            return np.array([self._scalar_normal() for _ in range(n)], dtype=np.float64).reshape(shape)
        data = self._uniform64(n)
        full = n // 16 * 16
        data[:full] = _box_muller16(data[:full].reshape(-1, 16)).reshape(-1)
        if n % 16:
            data[n - 16:] = _box_muller16(self._uniform64(16).reshape(1, 16)).reshape(-1)
        return data.reshape(shape)

    def _scalar_normal(self) -> float:
        if self._normal is not None:
            x, self._normal = self._normal, None
            return x
        u1, u2 = self._uniform64(2)
        r = math.sqrt(-2.0 * math.log1p(-u2))
        theta = _TWO_PI * u1
        self._normal = r * math.sin(theta)
        return r * math.cos(theta)


def _box_muller16(x: np.ndarray) -> np.ndarray:
    """``NormalFill16`` on rows of 16 uniforms (mean 0, std 1)."""
    radius = np.sqrt(-2.0 * np.log(1.0 - x[:, :8]))
    theta = _TWO_PI * x[:, 8:]
    return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)], axis=1)
