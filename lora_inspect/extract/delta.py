"""ΔW = TUNED − BASE of one tensor pair, read from the two memory maps in row blocks.

The difference is formed in float64 (exact for bf16, fp16 and fp32 inputs: each is a float64 with
room to spare, and the difference of two such numbers rounds at most once, at float64's 2⁻⁵³) and
kept in float64 when that fits the memory plan, otherwise in float32 (:func:`delta_dtype`). Reading
goes block by block so that no decoded copy of a whole input is ever held; afterwards the two
tensors' pages are dropped from the maps (:meth:`~lora_inspect.formats.tensors.SafetensorsSource.release`),
so the resident set holds one ΔW, not the checkpoints.
"""

from __future__ import annotations

import numpy as np

from ..arrays import decode
from .pairs import CheckpointPair, TensorPair, raw

__all__ = ["delta", "unchanged", "delta_dtype", "BLOCK_BYTES", "release", "sum_squares", "vector_delta", "energy"]

BLOCK_BYTES = 32 << 20  # decoded bytes per block


def delta_dtype(p: TensorPair, largest_bytes: int) -> np.dtype:
    """float64 unless ΔW in float64 would exceed twice the largest stored tensor (then float32): the
    memory plan is ΔW plus the two inputs' pages, about 3× the largest tensor (docs/extract.md)."""
    return np.dtype(np.float64) if 8 * p.numel <= max(2 * largest_bytes, 64 << 20) else np.dtype(np.float32)


def _words(x: np.ndarray) -> np.ndarray:
    """The tensor's bytes as the widest unsigned integers that tile them (fewer elements to compare)."""
    flat = x.reshape(-1).view(np.uint8)
    for w in (np.uint64, np.uint32, np.uint16):
        size = np.dtype(w).itemsize
        if flat.size % size == 0 and flat.ctypes.data % size == 0:
            return flat.view(w)
    return flat


def unchanged(ck: CheckpointPair, p: TensorPair) -> bool:
    """The two tensors hold the same bytes (same dtype): nothing changed, nothing decoded."""
    b, t = raw(ck.base, p.base), raw(ck.tuned, p.tuned)
    if b.dtype != t.dtype:
        return False
    bb, tt = _words(b), _words(t)
    if bb.dtype != tt.dtype:
        bb, tt = b.reshape(-1).view(np.uint8), t.reshape(-1).view(np.uint8)
    step = max(1, BLOCK_BYTES // bb.dtype.itemsize)
    return all(np.array_equal(bb[i:i + step], tt[i:i + step]) for i in range(0, bb.size, step))


def _rows(x: np.ndarray) -> np.ndarray:
    if x.ndim == 0:
        return x.reshape(1, 1)
    return x.reshape(x.shape[0], -1) if x.ndim != 2 else x


def delta(ck: CheckpointPair, p: TensorPair, dtype: np.dtype) -> np.ndarray:
    """ΔW as the (out, in) matrix of :attr:`TensorPair.matrix_shape` (a Conv1D's transpose is a view)."""
    b, t = _rows(raw(ck.base, p.base)), _rows(raw(ck.tuned, p.tuned))
    out = np.empty(b.shape, dtype=dtype)
    step = max(1, BLOCK_BYTES // (8 * max(1, b.shape[1])))
    for i in range(0, b.shape[0], step):  # widened once, subtracted in float64 straight into OUT (no temporaries)
        np.subtract(decode(t[i:i + step]), decode(b[i:i + step]), out=out[i:i + step], dtype=np.float64,
                    casting="unsafe")
    return out.T if p.transposed else out


def sum_squares(x: np.ndarray) -> float:
    """Σx² accumulated in float64, block by block (no float64 copy of a float32 ΔW)."""
    flat = x.reshape(x.shape[0], -1) if x.flags.c_contiguous else np.ascontiguousarray(x.T)
    total = 0.0
    step = max(1, BLOCK_BYTES // (8 * max(1, flat.shape[1])))
    for i in range(0, flat.shape[0], step):
        blk = flat[i:i + step].astype(np.float64, copy=False).ravel()
        total += float(blk @ blk)
    return total


def vector_delta(ck: CheckpointPair, p: TensorPair) -> np.ndarray:
    """A small tensor's change (a norm, a bias) in float64."""
    return decode(raw(ck.tuned, p.tuned)).astype(np.float64) - decode(raw(ck.base, p.base))


def release(ck: CheckpointPair, p: TensorPair) -> None:
    """Drop both tensors' pages from the memory maps (the next tensor starts from an empty resident set)."""
    ck.base.source(p.base.path).release([p.base.key])
    ck.tuned.source(p.tuned.path).release([p.tuned.key])


def energy(ck: CheckpointPair, p: TensorPair) -> float:
    """‖TUNED − BASE‖²_F of one tensor, block by block in float64 (nothing the size of the tensor is held)."""
    b, t = _rows(raw(ck.base, p.base)), _rows(raw(ck.tuned, p.tuned))
    total = 0.0
    step = max(1, BLOCK_BYTES // (8 * max(1, b.shape[1])))
    for i in range(0, b.shape[0], step):
        blk = decode(t[i:i + step]).astype(np.float64)
        blk -= decode(b[i:i + step])
        total += float(np.einsum("ij,ij->", blk, blk))
    return total
