"""How a layout stores a low-rank pair, as types: one class per orientation.

Each orientation knows three things about the stored factors (A_stored, B_stored):

- :meth:`Orientation.shapes` — from the stored shapes to (out, in, r, kind, kernel) of ΔW in linear
  orientation (B (out, r), A (r, in); a k×k convolution flattened to in·kh·kw);
- :meth:`Orientation.to_linear` — stored tensors → (B, A) in linear orientation;
- :meth:`Orientation.to_stored` — linear (B, A) of rank k → stored tensors, the inverse.

The orientations (see :mod:`lora_inspect.adapter` for the conventions):

- :data:`PEFT` — PEFT and kohya linear and conv: A (r, in[, kh, kw]), B (out, r[, 1, 1]);
- :data:`EMBEDDING` — PEFT ``lora_embedding_A`` (r, vocab), ``lora_embedding_B`` (dim, r); PEFT applies
  s·(B@A)ᵀ, so B = Aᵀ_stored and A = Bᵀ_stored and ΔW is (vocab, dim);
- :data:`MLX` — mlx-lm ``lora_a`` (in, r), ``lora_b`` (r, out): both transposed.
Tensors are numpy arrays (:mod:`lora_inspect.arrays`); reshapes and transposes are views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import InspectError
from .kinds import Choice, Kind

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = ["Orientation", "OrientName", "Shapes", "PeftOrientation", "EmbeddingOrientation", "MlxOrientation", "PEFT",
           "EMBEDDING",
           "MLX"]

Shape = tuple[int, ...]


class OrientName(Choice):
    """The name of an orientation (:attr:`Orientation.name`)."""

    PEFT = "peft"
    EMBEDDING = "embedding"
    MLX = "mlx"


@dataclass(frozen=True)
class Shapes:
    """ΔW's geometry read from the stored factor shapes."""

    out: int
    inp: int
    rank_a: int
    rank_b: int
    kind: Kind
    kernel: tuple[int, int] | None = None


class Orientation:
    """Base class; subclasses are stateless singletons."""

    name: OrientName

    def shapes(self, module: str, a_shape: Shape, b_shape: Shape) -> Shapes:  # pragma: no cover - interface
        raise NotImplementedError

    def to_linear(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def to_stored(self, b_lin: np.ndarray, a_lin: np.ndarray, a_shape: Shape,
                  b_shape: Shape) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError

    def magnitude_len(self, out: int, inp: int) -> int:
        """Entries of a DoRA magnitude: one per output feature of the base weight."""
        return out

    def __repr__(self) -> str:
        return f"<orientation {self.name}>"


def _two_d(module: str, what: str, a_shape: Shape, b_shape: Shape) -> None:
    if len(a_shape) != 2 or len(b_shape) != 2:
        raise InspectError(f"module {module!r}: {what} factors must be 2-D, found {a_shape} and {b_shape}")


class PeftOrientation(Orientation):
    """A (r, in[, kh, kw]), B (out, r[, 1, 1]) — PEFT and kohya, linear and conv."""

    name = OrientName.PEFT

    def shapes(self, module: str, a_shape: Shape, b_shape: Shape) -> Shapes:
        if len(a_shape) not in (2, 3, 4) or len(b_shape) != len(a_shape):
            raise InspectError(
                f"module {module!r}: factor shapes {a_shape} (A) and {b_shape} (B) do not form a LoRA pair"
            )
        if len(b_shape) > 2 and any(d != 1 for d in b_shape[2:]):
            raise InspectError(f"module {module!r}: up/B factor of a conv must be (out, r, 1, 1), found {b_shape}")
        kernel: tuple[int, int] | None = None
        if len(a_shape) == 4:
            kernel = (a_shape[2], a_shape[3])
        elif len(a_shape) == 3:
            kernel = (a_shape[2], 1)
        kind = Kind.LINEAR if len(a_shape) == 2 else Kind.CONV
        return Shapes(b_shape[0], math.prod(a_shape[1:]), a_shape[0], b_shape[1], kind, kernel)

    def to_linear(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1)

    def to_stored(self, b_lin: np.ndarray, a_lin: np.ndarray, a_shape: Shape,
                  b_shape: Shape) -> tuple[np.ndarray, np.ndarray]:
        k = b_lin.shape[1]
        return a_lin.reshape((k,) + tuple(a_shape[1:])), b_lin.reshape((b_shape[0], k) + tuple(b_shape[2:]))


class EmbeddingOrientation(Orientation):
    """A_stored (r, vocab), B_stored (dim, r); ΔW (vocab, dim) = s·(B_stored @ A_stored)ᵀ."""

    name = OrientName.EMBEDDING

    def shapes(self, module: str, a_shape: Shape, b_shape: Shape) -> Shapes:
        _two_d(module, "embedding", a_shape, b_shape)
        return Shapes(a_shape[1], b_shape[0], a_shape[0], b_shape[1], Kind.EMBEDDING)

    def to_linear(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return a.T, b.T

    def to_stored(self, b_lin: np.ndarray, a_lin: np.ndarray, a_shape: Shape,
                  b_shape: Shape) -> tuple[np.ndarray, np.ndarray]:
        return b_lin.T, a_lin.T

    def magnitude_len(self, out: int, inp: int) -> int:
        # DoRA normalises the weight's output features: for an embedding (ΔW (vocab, dim) here)
        # PEFT's lora_magnitude_vector has one entry per embedding dim, i.e. per column
        return inp


class MlxOrientation(Orientation):
    """lora_a (in, r), lora_b (r, out): PEFT's factors transposed."""

    name = OrientName.MLX

    def shapes(self, module: str, a_shape: Shape, b_shape: Shape) -> Shapes:
        _two_d(module, "mlx", a_shape, b_shape)
        return Shapes(b_shape[1], a_shape[0], a_shape[1], b_shape[0], Kind.LINEAR)

    def to_linear(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return b.T, a.T

    def to_stored(self, b_lin: np.ndarray, a_lin: np.ndarray, a_shape: Shape,
                  b_shape: Shape) -> tuple[np.ndarray, np.ndarray]:
        return a_lin.T, b_lin.T


PEFT = PeftOrientation()
EMBEDDING = EmbeddingOrientation()
MLX = MlxOrientation()
