"""LyCORIS updates whose ΔW is a function of the base weight W: Diag-OFT, BOFT and (IA)³ (docs/formats.md,
"LyCORIS", "Base-dependent algorithms"). Reading and binding W: :mod:`.lycoris_bind`.

Each is read as a :class:`BaseDependentUpdate` (keys, parameter count, the rows or columns it fixes), which
has no spectrum, factors or dense ΔW: ``rank`` lists it as needing ``--base``, and rewrites refuse it in one
line. ``--base`` replaces it by a :class:`BoundUpdate`, whose ΔW is the dense ``delta(W)`` below and whose
spectrum is its dense SVD (O(out·in·min(out, in)), as for ``full``). W (out, in·kh·kw), float64; the
LyCORIS multiplier is 1 (the file's own ΔW), as for every other algorithm here.

- **Diag-OFT** (``lycoris/modules/diag_oft.py`` · ``DiagOFTModule``, ``lycoris/functional/diag_oft.py`` ·
  ``get_r``, ``_diff_weight``): ``oft_blocks`` (n, b, b), O = n·b. Q = blocks − blocksᵀ; with c = α·O
  (``self.constraint = constraint * out_dim``; the file's ``alpha`` is the constraint) and c > 0, Q ← Q·c/
  (‖Q‖_F + 1e-8) when ‖Q‖_F + 1e-8 > c (one norm over every block). R_k = (I + Q_k)(I − Q_k)⁻¹ (Cayley).
  Rows in blocks of b: W′_k = R_kᵀ·W_k (``einsum("k n m, k n ... -> k m ...", R, W)``); ``rescale`` (O, 1[, 1, 1])
  multiplies W′'s rows. ΔW = rescale ⊙ (blockdiag(R)ᵀ·W) − W.
- **BOFT** (``lycoris/modules/boft.py``, ``lycoris/functional/boft.py`` · ``_diff_weight``): ``oft_blocks``
  (m, n, b, b), O = n·b, the same Cayley transform and constraint over all m·n blocks. Stage i = 0…m−1 with
  k = 2ⁱ·b/2: the rows (c, 2, k) are regrouped to (c, k, 2), R_i (n blocks) multiplies each group of b rows
  from the left (``einsum("b i j, b j ... -> b i ...")``: R·W, not Rᵀ), and the grouping is undone.
  ΔW = rescale ⊙ (stages(W)) − W.
- **(IA)³** (``lycoris/modules/ia3.py`` · ``_ia3_weight``): ``weight`` (n,) for a Linear, (1, n, 1, 1) for a conv;
  ``on_input`` = 0: W′ = W ⊙ (1 + w) over the output rows, ΔW = diag(w)·W; ``on_input`` = 1: over the input
  channels, ΔW = W·diag(w ⊗ 1_{kh·kw}).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..adapter import Update
from ..errors import InspectError
from ..kinds import Algo
from .lycoris_updates import DenseDecomposition

if TYPE_CHECKING:  # pragma: no cover
    from .tensors import TensorSource

__all__ = ["BaseDependentUpdate", "OFTUpdate", "BOFTUpdate", "IA3Update", "BoundUpdate", "cayley", "CAYLEY_EPS",
           "rank_bound"]

CAYLEY_EPS = 1e-8  # LyCORIS adds it to ‖Q‖ before comparing with the constraint (get_r: torch.norm(q) + 1e-8)


def cayley(blocks: np.ndarray, constraint: float) -> np.ndarray:
    """R = (I + Q)(I − Q)⁻¹ per block (= (I − Q)⁻¹(I + Q): the two commute), Q = blocks − blocksᵀ, scaled to
    c/(‖Q‖_F + ε) when c > 0 and ‖Q‖_F + ε > c (LyCORIS ``get_r``; I − Q is invertible for a skew Q)."""
    q = blocks - np.swapaxes(blocks, -1, -2)
    if constraint > 0:
        norm = float(np.linalg.norm(q.reshape(-1))) + CAYLEY_EPS
        if norm > constraint:
            q = q * (constraint / norm)
    eye = np.eye(q.shape[-1], dtype=q.dtype)
    return np.linalg.solve(eye - q, eye + q)  # both (…, b, b): solved block by block


def _get(source: TensorSource, key: str) -> np.ndarray:
    return np.asarray(source.get(key), dtype=np.float64)


def _finite(*ts: np.ndarray) -> None:
    from ..spectrum import all_finite

    if not all(all_finite(t) for t in ts):
        raise ValueError("non-finite values")


@dataclass(eq=False)
class BaseDependentUpdate(Update):
    """An update whose ΔW needs W: ``side`` is the length its tensors fix (the output rows; the input channels
    for (IA)³ ``on_input``), ``rank`` the bound on rank(ΔW) the file gives, ``conv_hint`` whether its tensors
    are a conv's (True), a Linear's (False) or do not say (None)."""

    name: str
    roles: dict[str, str]
    rank: int
    side: int
    conv_hint: bool | None = None
    input_side: bool = field(default=False, kw_only=True)  # (IA)³ on_input: ``side`` counts input channels
    _numel: int = field(default=0, kw_only=True)
    needs_base: ClassVar[bool] = True
    label: ClassVar[str] = ""
    verb: ClassVar[str] = "rotates"
    role_order: ClassVar[tuple[str, ...]] = ()

    @property
    def keys(self) -> list[str]:
        return [self.roles[k] for k in self.role_order if k in self.roles]

    def params(self, shape: tuple[int, int]) -> int:
        return self._numel

    def lora_keys(self) -> tuple[str, str]:
        return f"{self.name}.lora_down.weight", f"{self.name}.lora_up.weight"

    def cause(self) -> str:
        return (f"{self.label} changes W through W itself: its ΔW needs the base weight "
                "(rank --base BASE, convert --base BASE with the base checkpoint)")

    def _refuse(self, source: TensorSource) -> InspectError:
        return InspectError(f"{source.path}: module {self.name!r}: {self.cause()}")

    @property
    def bake_key(self) -> str:
        raise InspectError(f"module {self.name!r}: {self.label}'s ΔW is not linear in any stored tensor, so no "
                           "factor or α scales it; convert --base BASE writes its exact LoRA, which can be rescaled")

    def factors(self, source: TensorSource, dtype: np.dtype | type) -> tuple[np.ndarray, np.ndarray]:
        raise self._refuse(source)

    def dense(self, source: TensorSource, dtype: np.dtype | type) -> np.ndarray:
        raise self._refuse(source)

    def singular_values(self, source: TensorSource, dtype: np.dtype | type, scale: float) -> Any:
        raise self._refuse(source)

    def decomposition(self, source: TensorSource, dtype: np.dtype | type, scale: float) -> Any:
        raise InspectError(self.cause())  # truncate names the file and module

    def misfit(self, shape: tuple[int, ...]) -> str | None:
        """Why a base weight of stored ``shape`` is not this module's (None: it fits)."""
        axis = 1 if self.input_side else 0
        what = "input channels" if self.input_side else "output rows"
        if shape[axis] != self.side:
            return f"{self.label} {self.verb} {self.side} {what}, the base weight has {shape[axis]}"
        if self.conv_hint is not None and self.conv_hint != (len(shape) > 2):
            return f"its tensors are a {'conv' if self.conv_hint else 'Linear'}'s, the base weight is {len(shape)}-D"
        return None

    def delta(self, w: np.ndarray, source: TensorSource) -> np.ndarray:  # pragma: no cover - interface
        """ΔW (out, in·kh·kw) float64 from W (out, in·kh·kw) float64, at multiplier 1."""
        raise NotImplementedError


@dataclass(eq=False)
class OFTUpdate(BaseDependentUpdate):
    """Diag-OFT: ΔW = rescale ⊙ (blockdiag(R)ᵀ·W) − W (module docstring)."""

    constraint: float = field(default=0.0, kw_only=True)  # c = α·O
    algo = Algo.OFT
    label = "OFT"
    role_order = ("oft_blocks", "rescale", "alpha")

    def _rotations(self, source: TensorSource) -> np.ndarray:
        blocks = _get(source, self.roles["oft_blocks"])
        _finite(blocks)
        return cayley(blocks, self.constraint)

    def _rescaled(self, new: np.ndarray, source: TensorSource) -> np.ndarray:
        if "rescale" not in self.roles:
            return new
        rescale = _get(source, self.roles["rescale"])
        _finite(rescale)
        return rescale.reshape(-1, 1) * new

    def delta(self, w: np.ndarray, source: TensorSource) -> np.ndarray:
        r = self._rotations(source)
        n, b = r.shape[-3], r.shape[-1]
        new = (np.swapaxes(r, -1, -2) @ w.reshape(n, b, -1)).reshape(w.shape)  # einsum("knm,kni->kmi", r, w)
        return self._rescaled(new, source) - w


@dataclass(eq=False)
class BOFTUpdate(OFTUpdate):
    """BOFT: m butterfly stages of n blocks each (module docstring)."""

    algo = Algo.BOFT
    label = "BOFT"

    def delta(self, w: np.ndarray, source: TensorSource) -> np.ndarray:
        r = self._rotations(source)  # (m, n, b, b)
        b = r.shape[-1]
        x, rest = w, w.shape[1:]
        for i in range(r.shape[0]):
            k = 2**i * (b // 2)
            x = x.reshape(-1, 2, k, *rest).swapaxes(1, 2).reshape(-1, b, *rest)
            x = r[i] @ x  # einsum("bij,bjn->bin", r[i], x)
            x = x.reshape(-1, k, 2, *rest).swapaxes(1, 2).reshape(-1, *rest)
        return self._rescaled(x, source) - w


@dataclass(eq=False)
class IA3Update(BaseDependentUpdate):
    """(IA)³: ΔW = diag(w)·W (output rows) or W·diag(w ⊗ 1_K) (``on_input``)."""

    algo = Algo.IA3
    label = "(IA)³"
    role_order = ("weight", "on_input")
    verb = "scales"

    def delta(self, w: np.ndarray, source: TensorSource) -> np.ndarray:
        v = _get(source, self.roles["weight"]).reshape(-1)
        _finite(v)
        if self.input_side:
            return w * np.repeat(v, w.shape[1] // v.shape[0]).reshape(1, -1)
        return v.reshape(-1, 1) * w


@dataclass(eq=False)
class BoundUpdate(Update):
    """A base-dependent update with its base weight (``--base``): the dense ΔW = ``inner.delta(W)``, spectra
    and truncations by a dense SVD (as ``full``), factors the full-rank SVD factors."""

    inner: BaseDependentUpdate
    weight: Callable[[], np.ndarray]  # W (out, in·kh·kw) as float64, read when needed
    rank: int

    def __post_init__(self) -> None:
        self.algo = self.inner.algo

    @property
    def keys(self) -> list[str]:
        return self.inner.keys

    def params(self, shape: tuple[int, int]) -> int:
        return self.inner.params(shape)

    def lora_keys(self) -> tuple[str, str]:
        return self.inner.lora_keys()

    @property
    def bake_key(self) -> str:
        return self.inner.bake_key

    def dense(self, source: TensorSource, dtype: np.dtype | type) -> np.ndarray:
        w = self.weight()
        _finite(w)
        return np.asarray(self.inner.delta(w, source), dtype=dtype)

    def singular_values(self, source: TensorSource, dtype: np.dtype | type, scale: float) -> Any:
        d = self.dense(source, np.dtype(np.float64))
        _finite(d)
        return abs(scale) * np.linalg.svd(d, compute_uv=False)

    def decomposition(self, source: TensorSource, dtype: np.dtype | type, scale: float) -> Any:
        return DenseDecomposition(scale * self.dense(source, np.dtype(np.float64)))

    def factors(self, source: TensorSource, dtype: np.dtype | type) -> tuple[np.ndarray, np.ndarray]:
        d = self.decomposition(source, dtype, 1.0)
        b, a = d.factors(d.s.shape[0])
        return b.astype(dtype), a.astype(dtype)


def rank_bound(blocks_shape: tuple[int, ...], rescaled: bool) -> int:
    """The bound on rank(ΔW) the file gives: O with a rescale or for BOFT; Σ rank(Q_k) ≤ n·2⌊b/2⌋ for Diag-OFT
    (R − I = 2Q(I − Q)⁻¹ has Q's rank, and a skew-symmetric Q has even rank)."""
    out = math.prod(blocks_shape[-3:-1])
    if rescaled or len(blocks_shape) == 4:
        return out
    n, b = blocks_shape[0], blocks_shape[1]
    return n * (b - b % 2)
