"""The LyCORIS update types: one :class:`~lora_inspect.adapter.Update` per algorithm, with the exact
spectrum of each without the dense ΔW where one exists (docs/formats.md, "LyCORIS").

ΔW is in linear orientation (out, in·kh·kw), before the module's scale s (applied once, as LyCORIS
``forward``, ComfyUI and A1111 do — LyCORIS's own ``get_diff_weight`` applies it twice for LoHa/LoKr):

- LoCon Tucker: ΔW = up₂d · M, M = einsum("a b k l, b i -> a i k l", mid, down₂d).reshape(r, I·K).
- LoHa: ΔW = (U₁V₁) ⊙ (U₂V₂) = (U₁ •ᵣ U₂)(V₁ •ᶜ V₂) (face-splitting product: column a·r₂+b of the left
  factor is U₁[:, a]·U₂[:, b], row a·r₂+b of the right one V₁[a]·V₂[b]), a pair of rank ≤ r₁r₂ that the
  QR/core-SVD route decomposes exactly; when r₁r₂ ≥ min(out, in)/2 the dense SVD is cheaper
  (O((out+in)·r⁴ + r⁶) against O(out·in·min(out, in))). Tucker: Uᵢ = hada_wi_aᵀ,
  Vᵢ = einsum("i j k l, j q -> i q k l", hada_ti, hada_wi_b).reshape(r, I·K).
- LoKr: ΔW = kron(W₁, W₂₂d) (conv: reshape(kron(w1[..., None, None], w2)) = kron(w1, w2.reshape(b, -1))),
  so σ(ΔW) = {σᵢ(W₁)·σⱼ(W₂)} with singular vectors u₁ᵢ⊗u₂ⱼ, v₁ᵢ⊗v₂ⱼ (mixed-product property).
- full/diff: ΔW = diff; dense SVD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..adapter import Update
from ..kinds import Algo

if TYPE_CHECKING:  # pragma: no cover
    from .tensors import TensorSource

__all__ = ["LoConUpdate", "LoHaUpdate", "LoKrUpdate", "FullUpdate", "DenseDecomposition", "KronDecomposition"]


def _finite(*ts: np.ndarray) -> None:
    from ..spectrum import all_finite

    for t in ts:
        if not all_finite(t):
            raise ValueError("non-finite factors")


def _get(source: "TensorSource", key: str, dtype: np.dtype | type) -> np.ndarray:
    """A tensor in the compute dtype (read-only when the source's array already is one: never written into)."""
    return np.asarray(source.get(key), dtype=dtype)


def _tucker_right(t: np.ndarray, wb: np.ndarray) -> np.ndarray:
    """einsum("i j k l, j q -> i q k l", t, wb) flattened to (r, q·K)."""
    return np.einsum("ijkl,jq->iqkl", t, wb.reshape(wb.shape[0], -1), optimize=True).reshape(t.shape[0], -1)


class _Truncatable:
    """The truncation interface of ``spectrum.Decomposition`` for an SVD held in another form: subclasses
    give σ (``self.s``, descending, float64) and the top-k scaled singular vectors (:meth:`_top`)."""

    s: np.ndarray
    dtype: np.dtype | type

    @property
    def singular_values(self) -> np.ndarray:
        return self.s.copy()

    def _top(self, keep: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError

    def factors(self, keep: int, stored: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """B (out × stored), A (stored × in) with B@A the best rank-``keep`` approximation (√σ on each side);
        columns past ``keep`` are zero."""
        stored = keep if stored is None else stored
        keep = min(keep, self.s.shape[0])
        bk, ak = self._top(keep)
        b = np.zeros((bk.shape[0], stored), dtype=np.float64)
        a = np.zeros((stored, ak.shape[1]), dtype=np.float64)
        b[:, :keep], a[:keep] = bk, ak
        return b.astype(self.dtype), a.astype(self.dtype)


class DenseDecomposition(_Truncatable):
    """Full SVD of a dense ΔW (scale included)."""

    def __init__(self, delta: np.ndarray, rank: int | None = None) -> None:
        _finite(delta)
        u, s, vh = np.linalg.svd(np.asarray(delta, dtype=np.float64), full_matrices=False)
        keep = s.shape[0] if rank is None else rank  # LoHa: σ past r₁r₂ are rounding
        self.u, self.s, self.vh = u[:, :keep], s[:keep], vh[:keep]
        self.dtype = delta.dtype

    def _top(self, keep: int) -> tuple[np.ndarray, np.ndarray]:
        root = np.sqrt(self.s[:keep])
        return self.u[:, :keep] * root, self.vh[:keep] * root[:, None]


class KronDecomposition(_Truncatable):
    """SVD of s·kron(W₁, W₂) from the SVDs of W₁ and W₂: σ = s·σ₁ᵢσ₂ⱼ (sorted descending), and the
    rank-k truncation keeps the k largest products with vectors kron(u₁ᵢ, u₂ⱼ), kron(v₁ᵢ, v₂ⱼ)."""

    def __init__(self, svd1: tuple, svd2: tuple, scale: float, dtype: np.dtype | type) -> None:
        (self.u1, s1, self.v1h), (self.u2, s2, self.v2h) = svd1, svd2
        prod = abs(scale) * (s1[:, None] * s2[None, :]).reshape(-1)
        order = np.argsort(-prod, kind="stable")
        self.s = prod[order]
        self.i, self.j = order // s2.shape[0], order % s2.shape[0]
        self.sign = -1.0 if scale < 0 else 1.0
        self.dtype = dtype

    def _top(self, keep: int) -> tuple[np.ndarray, np.ndarray]:
        i, j, root = self.i[:keep], self.j[:keep], np.sqrt(self.s[:keep])
        out, inp = self.u1.shape[0] * self.u2.shape[0], self.v1h.shape[1] * self.v2h.shape[1]
        b = (self.u1[:, i][:, None, :] * self.u2[:, j][None, :, :]).reshape(out, keep) * root * self.sign
        a = (self.v1h[i][:, :, None] * self.v2h[j][:, None, :]).reshape(keep, inp) * root[:, None]
        return b, a


@dataclass(eq=False)
class _LyUpdate(Update):
    """Common parts: the module's name (for the LoRA keys a rewrite writes), its key roles, LyCORIS's
    ``lora_dim`` and the bound on rank(ΔW); ``numel`` is the parameter count as stored."""

    name: str
    roles: dict[str, str]
    dim: int  # LyCORIS's lora_dim (the r of s = α/r), 0 when there is none
    rank: int
    _numel: int = field(default=0, kw_only=True)
    role_order: ClassVar[tuple[str, ...]] = ()

    @property
    def keys(self) -> list[str]:
        return [self.roles[k] for k in self.role_order if k in self.roles]

    def lora_keys(self) -> tuple[str, str]:
        return f"{self.name}.lora_down.weight", f"{self.name}.lora_up.weight"

    def params(self, shape: tuple[int, int]) -> int:
        return self._numel

    def dense(self, source: "TensorSource", dtype: np.dtype | type) -> np.ndarray:
        b, a = self.factors(source, dtype)
        return b @ a


@dataclass(eq=False)
class LoConUpdate(_LyUpdate):
    """LoCon with a Tucker middle factor (plain LoCon is read as a :class:`~lora_inspect.adapter.LowRankUpdate`):
    B = up₂d, A = einsum("a b k l, b i -> a i k l", mid, down₂d).reshape(r, I·K)."""

    algo = Algo.LOCON
    role_order = ("lora_down.weight", "lora_mid.weight", "lora_up.weight")

    @property
    def bake_key(self) -> str:
        return self.roles["lora_up.weight"]

    def factors(self, source: "TensorSource", dtype: np.dtype | type) -> tuple[np.ndarray, np.ndarray]:
        up = _get(source, self.roles["lora_up.weight"], dtype)
        down = _get(source, self.roles["lora_down.weight"], dtype)
        mid = _get(source, self.roles["lora_mid.weight"], dtype)
        return up.reshape(up.shape[0], -1), _mid_down(mid, down)


def _mid_down(mid: np.ndarray, down: np.ndarray) -> np.ndarray:
    return np.einsum("abkl,bi->aikl", mid, down.reshape(down.shape[0], -1), optimize=True).reshape(mid.shape[0], -1)


@dataclass(eq=False)
class LoHaUpdate(_LyUpdate):
    """ΔW = (U₁V₁) ⊙ (U₂V₂) through the face-splitting factors (B₁ •ᵣ B₂, A₁ •ᶜ A₂)."""

    widths: tuple[int, int]  # r₁, r₂
    out_in: tuple[int, int]
    algo = Algo.LOHA
    role_order = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    @property
    def tucker(self) -> bool:
        return "hada_t1" in self.roles

    @property
    def bake_key(self) -> str:
        return self.roles["hada_w1_a"]

    @property
    def dense_route(self) -> bool:
        """Dense SVD when r₁r₂ ≥ min(out, in)/2 (cheaper than QR of r₁r₂-wide factors then)."""
        return self.widths[0] * self.widths[1] >= min(self.out_in) / 2

    def pairs(self, source: "TensorSource", dtype: np.dtype | type) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(U₁, V₁), (U₂, V₂)] with ΔW = (U₁V₁) ⊙ (U₂V₂)."""
        out = []
        for i in ("1", "2"):
            wa, wb = _get(source, self.roles[f"hada_w{i}_a"], dtype), _get(source, self.roles[f"hada_w{i}_b"], dtype)
            if self.tucker:
                out.append((wa.T, _tucker_right(_get(source, self.roles[f"hada_t{i}"], dtype), wb)))
            else:
                out.append((wa.reshape(wa.shape[0], -1), wb.reshape(wb.shape[0], -1)))
        return out

    def factors(self, source: "TensorSource", dtype: np.dtype | type) -> tuple[np.ndarray, np.ndarray]:
        (u1, v1), (u2, v2) = self.pairs(source, dtype)
        b = (u1[:, :, None] * u2[:, None, :]).reshape(u1.shape[0], -1)
        a = (v1[:, None, :] * v2[None, :, :]).reshape(-1, v1.shape[1])
        return b, a

    def dense(self, source: "TensorSource", dtype: np.dtype | type) -> np.ndarray:
        (u1, v1), (u2, v2) = self.pairs(source, dtype)
        return (u1 @ v1) * (u2 @ v2)

    def singular_values(self, source: "TensorSource", dtype: np.dtype | type, scale: float) -> Any:
        if not self.dense_route:
            return None
        d = self.dense(source, dtype)
        _finite(d)
        return (abs(scale) * np.linalg.svd(np.asarray(d, dtype=np.float64), compute_uv=False))[: self.rank]

    def decomposition(self, source: "TensorSource", dtype: np.dtype | type, scale: float) -> Any:
        if self.dense_route:
            return DenseDecomposition(scale * self.dense(source, dtype), self.rank)
        return super().decomposition(source, dtype, scale)


@dataclass(eq=False)
class LoKrUpdate(_LyUpdate):
    """ΔW = kron(W₁, W₂₂d); W₁ full (``lokr_w1``) or w1a@w1b, W₂ full, w2a@w2b or Tucker."""

    algo = Algo.LOKR
    role_order = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    @property
    def full_full(self) -> bool:
        """Both W₁ and W₂ stored whole: LyCORIS ignores α then (s = 1)."""
        return "lokr_w1" in self.roles and "lokr_w2" in self.roles

    @property
    def bake_key(self) -> str:
        return self.roles.get("lokr_w1") or self.roles["lokr_w1_a"]

    def w1_pair(self, source: "TensorSource", dtype: np.dtype | type) -> tuple[np.ndarray, np.ndarray] | None:
        if "lokr_w1" in self.roles:
            return None
        return _get(source, self.roles["lokr_w1_a"], dtype), _get(source, self.roles["lokr_w1_b"], dtype)

    def w2_pair(self, source: "TensorSource", dtype: np.dtype | type) -> tuple[np.ndarray, np.ndarray] | None:
        if "lokr_w2" in self.roles:
            return None
        wa, wb = _get(source, self.roles["lokr_w2_a"], dtype), _get(source, self.roles["lokr_w2_b"], dtype)
        if "lokr_t2" in self.roles:
            return wa.T, _tucker_right(_get(source, self.roles["lokr_t2"], dtype), wb)
        return wa, wb.reshape(wb.shape[0], -1)

    def w1(self, source: "TensorSource", dtype: np.dtype | type) -> np.ndarray:
        p = self.w1_pair(source, dtype)
        return _get(source, self.roles["lokr_w1"], dtype) if p is None else p[0] @ p[1]

    def w2(self, source: "TensorSource", dtype: np.dtype | type) -> np.ndarray:
        p = self.w2_pair(source, dtype)
        if p is None:
            w = _get(source, self.roles["lokr_w2"], dtype)
            return w.reshape(w.shape[0], -1)
        return p[0] @ p[1]

    def dense(self, source: "TensorSource", dtype: np.dtype | type) -> np.ndarray:
        return np.kron(self.w1(source, dtype), self.w2(source, dtype))

    def _svd(self, full: np.ndarray | None, pair: tuple | None) -> tuple:
        if pair is not None:
            from ..spectrum import svd_factors

            _finite(*pair)
            return svd_factors(pair[0], pair[1], 1.0)
        assert full is not None
        _finite(full)
        u, s, vh = np.linalg.svd(np.asarray(full, dtype=np.float64), full_matrices=False)
        return u, s, vh

    def _sv(self, full: np.ndarray | None, pair: tuple | None) -> np.ndarray:
        if pair is not None:
            from ..spectrum import singular_values as lowrank_sv

            _finite(*pair)
            return lowrank_sv(pair[0], pair[1], 1.0)
        assert full is not None
        _finite(full)
        return np.linalg.svd(np.asarray(full, dtype=np.float64), compute_uv=False)

    def singular_values(self, source: "TensorSource", dtype: np.dtype | type, scale: float) -> Any:
        p1, p2 = self.w1_pair(source, dtype), self.w2_pair(source, dtype)
        s1 = self._sv(None if p1 else self.w1(source, dtype), p1)
        s2 = self._sv(None if p2 else self.w2(source, dtype), p2)
        return np.sort(abs(scale) * np.outer(s1, s2).reshape(-1))[::-1].copy()

    def decomposition(self, source: "TensorSource", dtype: np.dtype | type, scale: float) -> Any:
        p1, p2 = self.w1_pair(source, dtype), self.w2_pair(source, dtype)
        svd1 = self._svd(None if p1 else self.w1(source, dtype), p1)
        svd2 = self._svd(None if p2 else self.w2(source, dtype), p2)
        return KronDecomposition(svd1, svd2, scale, dtype)

    def factors(self, source: "TensorSource", dtype: np.dtype | type) -> tuple[np.ndarray, np.ndarray]:
        """Exact factors of the unscaled ΔW: every product direction (width rank(W₁)·rank(W₂))."""
        d = self.decomposition(source, dtype, 1.0)
        return d.factors(d.s.shape[0])


@dataclass(eq=False)
class FullUpdate(_LyUpdate):
    """``diff``: the dense ΔW itself (no α, s = 1); spectra by dense SVD."""

    algo = Algo.FULL
    role_order = ("diff",)

    @property
    def bake_key(self) -> str:
        return self.roles["diff"]

    def dense(self, source: "TensorSource", dtype: np.dtype | type) -> np.ndarray:
        d = _get(source, self.roles["diff"], dtype)
        return d.reshape(d.shape[0], -1)

    def singular_values(self, source: "TensorSource", dtype: np.dtype | type, scale: float) -> Any:
        d = self.dense(source, dtype)
        _finite(d)
        return abs(scale) * np.linalg.svd(np.asarray(d, dtype=np.float64), compute_uv=False)

    def decomposition(self, source: "TensorSource", dtype: np.dtype | type, scale: float) -> Any:
        return DenseDecomposition(scale * self.dense(source, dtype))

    def factors(self, source: "TensorSource", dtype: np.dtype | type) -> tuple[np.ndarray, np.ndarray]:
        d = self.decomposition(source, dtype, 1.0)
        return d.factors(d.s.shape[0])


def numel(shapes: list[tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes)
