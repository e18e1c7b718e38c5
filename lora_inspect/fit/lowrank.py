"""The numbers ``fit`` needs, in float64, never forming a dense ΔW of a low-rank module (numpy only).

- A low-rank update s·B@A is cut to its best rank k from the factor-space SVD
  (:func:`lora_inspect.spectrum.decompose`: QR of B and Aᵀ, SVD of the r×r core). By Eckart–Young
  (Eckart & Young 1936) the error ‖ΔW − ΔW_k‖_F = √(Σ_{i>k} σᵢ²) is the least any rank-k matrix attains.
- A dense update (a DoRA effective update, a full tensor's delta) is cut by a dense float64 SVD.
- The error actually written is measured, not assumed: ΔW − ΔW′ = [s·B, −s′·B′]·[A; A′] is itself low
  rank, so its Frobenius norm is that of the core R_b R_aᵀ of the stacked factors (:func:`difference`).
"""

from __future__ import annotations

import math

import numpy as np

from ..basemetrics import dora_effective_delta
from ..spectrum import decompose, singular_values

__all__ = ["Cut", "cut_lowrank", "cut_dense", "difference", "energy", "optimum", "dora_delta"]


class Cut:
    """A rank-k approximation: factors (B′ (out, k), A′ (k, in)) with every scale baked in (s′ = 1), and the
    singular values σ of the update it approximates (all of them, descending)."""

    def __init__(self, b: np.ndarray, a: np.ndarray, sv: np.ndarray):
        self.b, self.a, self.sv = b, a, sv

    @property
    def rank(self) -> int:
        return int(self.b.shape[1])


def energy(sv: np.ndarray) -> float:
    """‖ΔW‖²_F = Σσᵢ²."""
    return float((np.asarray(sv, dtype=np.float64) ** 2).sum())


def optimum(sv: np.ndarray, k: int) -> float:
    """The Eckart–Young relative error at rank k: √(Σ_{i>k} σᵢ² / Σσᵢ²); 0 for a zero update."""
    e = np.asarray(sv, dtype=np.float64) ** 2
    total = float(e.sum())
    return 0.0 if not total > 0 else math.sqrt(float(e[k:].sum()) / total)


def cut_lowrank(b: np.ndarray, a: np.ndarray, scale: float, k: int) -> Cut:
    """Best rank-k factors of s·B@A (float64 factor-space SVD)."""
    dec = decompose(np.asarray(b, dtype=np.float64), np.asarray(a, dtype=np.float64), scale)
    nb, na = dec.factors(k)
    return Cut(nb, na, dec.s)


def cut_dense(d: np.ndarray, k: int) -> Cut:
    """Best rank-k factors of a dense ΔW (float64 SVD), split evenly: B′ = U_k√S_k, A′ = √S_k V_kᵀ."""
    u, s, vh = np.linalg.svd(np.asarray(d, dtype=np.float64), full_matrices=False)
    k = min(k, s.shape[0])
    root = np.sqrt(s[:k])
    return Cut(u[:, :k] * root, root[:, None] * vh[:k], s)


def difference(b: np.ndarray, a: np.ndarray, scale: float, b2: np.ndarray, a2: np.ndarray, scale2: float) -> float:
    """‖s·B@A − s′·B′@A′‖_F from the stacked factors (never the dense product)."""
    bb = np.concatenate([np.asarray(b, dtype=np.float64) * scale, -np.asarray(b2, dtype=np.float64) * scale2], axis=1)
    aa = np.concatenate([np.asarray(a, dtype=np.float64), np.asarray(a2, dtype=np.float64)], axis=0)
    return math.sqrt(energy(singular_values(bb, aa)))


def dora_delta(w: np.ndarray, b: np.ndarray, a: np.ndarray, scale: float, magnitude: np.ndarray) -> np.ndarray:
    """DoRA's effective update ΔW_eff = m ⊙ (W + s·BA)/‖W + s·BA‖_row − W in float64 (PEFT
    ``peft/tuners/lora/dora.py`` ``DoraLinearLayer.get_weight_norm``: ``torch.linalg.norm(W + s·BA, dim=1)``,
    one norm per output row over the input dimension; conv kernels flattened the same way)."""
    w64 = np.asarray(w, dtype=np.float64)
    delta = scale * (np.asarray(b, dtype=np.float64) @ np.asarray(a, dtype=np.float64))
    return dora_effective_delta(w64, delta, np.asarray(magnitude, dtype=np.float64))
