"""One tensor pair → its LoRA factors and what they cost in error.

B = U_k·diag(√σ), A = diag(√σ)·V_kᵀ (the singular values split evenly between the two factors, as
mergekit's ``--distribute-scale`` default does: both factors then have the same norms, which keeps
16-bit storage away from overflow and underflow), s = 1 (α = r). The error reported is that of the
factors *as written*: ‖ΔW − B̃·Ã‖_F with B̃, Ã rounded to the storage dtype, computed directly in
float64 block by block (not from the spectrum), so storage rounding is included.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

import numpy as np

from ..arrays import decode, encode
from ..convert.canon import CanonModule
from ..convert.run import DTYPES
from ..kinds import Kind
from . import delta as dw
from .factor import Decomposition, decompose
from .pairs import CheckpointPair, Role, TensorPair
from .results import ExtractedModule, ExtractSpec

__all__ = ["Factored", "factor_module", "canon_module", "seed_of", "written_residual", "decompose_pair"]


@dataclass
class Factored:
    pair: TensorPair
    module: CanonModule | None  # None: the budget kept no direction of it
    stats: ExtractedModule | None
    energy: float  # ‖ΔW‖²_F


def seed_of(key: str, seed: int) -> int:
    """The random start of one module: the same for the same tensor name and ``--seed`` on every run."""
    return zlib.crc32(key.encode()) ^ seed


def canon_module(p: TensorPair, b: np.ndarray, a: np.ndarray) -> CanonModule:
    """The factors of one tensor pair as a canonical module (s = 1: α = r)."""
    kind = {Role.CONV: Kind.CONV, Role.EMBEDDING: Kind.EMBEDDING}.get(p.role, Kind.LINEAR)
    ndim = len(p.shape) if kind == Kind.CONV else 4
    return CanonModule(p.component, p.path, kind, b, a, 1.0, p.kernel, ndim, None, p.kohya_name or p.name, None)


def written_residual(d: np.ndarray, b: np.ndarray, a: np.ndarray, dtype: str) -> float:
    """‖ΔW − B̃Ã‖²_F with B̃, Ã the factors rounded to the storage dtype ``dtype``, in float64 by row blocks."""
    bt = decode(encode(b, dtype)).astype(np.float64)
    at = decode(encode(a, dtype)).astype(np.float64)
    total = 0.0
    step = max(1, dw.BLOCK_BYTES // (8 * max(1, d.shape[1])))
    for i in range(0, d.shape[0], step):
        blk = bt[i:i + step] @ at
        np.subtract(d[i:i + step], blk, out=blk)  # float64 (a float32 ΔW block is widened by the ufunc)
        flat = blk.reshape(-1)
        total += float(np.dot(flat, flat))
    return total


def decompose_pair(d: np.ndarray, p: TensorPair, spec: ExtractSpec, rank: int | None, vectors: bool,
                   device: str) -> Decomposition:
    """The decomposition ``spec`` asks for (a budget's allocated ``rank`` wins) on ``device``."""
    seed = seed_of(p.key, spec.seed)
    want_rank = rank if rank is not None else spec.rank
    if device != "cpu":
        from .gpu import decompose_torch

        return decompose_torch(d, rank=want_rank, energy=None if want_rank else spec.energy, vectors=vectors,
                               device=device)
    if want_rank is not None:
        return decompose(d, rank=want_rank, vectors=vectors, seed=seed)
    return decompose(d, energy=spec.energy, vectors=vectors, seed=seed)


def factor_module(ck: CheckpointPair, p: TensorPair, spec: ExtractSpec, rank: int | None,
                  device: str) -> Factored:
    """ΔW of ``p``, its best rank-k factors (k from ``rank`` or the spec) and their errors."""
    t0 = time.perf_counter()
    d = dw.delta(ck, p, dw.delta_dtype(p, ck.largest_bytes))
    dec = decompose_pair(d, p, spec, rank, True, device)
    total = dec.total
    k = int(dec.sigma.shape[0])
    if k == 0 or total <= 0:
        return Factored(p, None, None, total)
    assert dec.u is not None and dec.vt is not None
    root = np.sqrt(dec.sigma)
    b = dec.u * root
    a = root[:, None] * dec.vt
    res = written_residual(d, b, a, DTYPES[spec.dtype])
    kept = float(np.sum(dec.sigma ** 2))
    optimum2 = max(0.0, dec.residual2 - dec.bound)
    stats = ExtractedModule(p.kohya_name or p.name, str(canon_module(p, b[:, :0], a[:0]).kind), p.matrix_shape, k,
                            kept / total, float(np.sqrt(res / total)), float(np.sqrt(optimum2 / total)), dec.route,
                            dec.ratio_bound(), 0.0, time.perf_counter() - t0)
    return Factored(p, canon_module(p, b, a), stats, total)
