"""Tensors as numpy arrays: the storage dtypes of safetensors, bfloat16 included, without torch.

Analysis, rewrites and conversions hold tensor data as numpy arrays; torch is the engine only of
training, verification, calibration and ``.bin`` pickles, and converts at its door (:func:`to_torch`,
:func:`from_torch`). numpy has no bfloat16, so a stored bf16 tensor is an array of the marker dtype
:data:`BF16` — its 16 raw bits, on which arithmetic and casts are refused — until :func:`decode` widens
it to float32 (exact: bf16 is the high half of an IEEE float32).

:func:`encode` narrows float data to a storage dtype as torch's ``Tensor.to`` does: float64 → float32 →
bfloat16 with round-to-nearest-even on the dropped 16 bits (c10's ``round_to_nearest_even``), and
numpy's IEEE casts for float16/float32 — float64 → float16 also through float32, as torch does (the two
roundings differ from one in one value in ~10⁵ of tests/test_arrays.py). A NaN becomes the quiet NaN 0x7FC0 (torch's NaN payload depends on
its code path; every rewrite refuses NaN before writing anyway). Storage dtypes are
named as safetensors names them (``"F32"``, ``"BF16"`` …: :data:`StDtype`); compute dtypes are
numpy's (``np.float32``, ``np.float64``).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["BF16", "StDtype", "NUMPY_OF", "st_dtype", "decode", "encode", "is_float", "compute_of", "to_torch",
           "from_torch", "storage_of", "float64_buffer", "scaled"]

StDtype = Literal["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "I64", "U64", "F64"]

# bfloat16 as stored: the raw 16 bits as an opaque 2-byte void, a dtype that numpy refuses to compute with or
# cast to a number (astype, asarray(dtype=…), norm all raise), so that nothing mistakes the bits for numbers
BF16 = np.dtype("V2")

NUMPY_OF: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype("u1"), "I8": np.dtype("i1"), "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"), "F16": np.dtype("<f2"), "BF16": BF16, "I32": np.dtype("<i4"), "U32": np.dtype("<u4"),
    "F32": np.dtype("<f4"), "I64": np.dtype("<i8"), "U64": np.dtype("<u8"), "F64": np.dtype("<f8"),
}
_ST_OF = {dt: name for name, dt in NUMPY_OF.items()}
_FLOATS = ("F16", "BF16", "F32", "F64")


def st_dtype(x: np.ndarray) -> str:
    """The safetensors name of an array's dtype (``BF16`` for the marker); ValueError for others."""
    name = _ST_OF.get(x.dtype.newbyteorder("<") if x.dtype.byteorder == ">" else x.dtype)
    if name is None:
        raise ValueError(f"dtype {x.dtype} has no safetensors name")
    return name


def is_float(st: str) -> bool:
    return st in _FLOATS


def compute_of(st: str) -> np.dtype:
    """The float dtype a stored dtype is read into: float64 stays, everything else is float32."""
    return np.dtype(np.float64) if st == "F64" else np.dtype(np.float32)


def decode(x: np.ndarray) -> np.ndarray:
    """Stored → numbers: bf16 bits widened to float32 (a new array); any other array as it is."""
    if x.dtype != BF16:
        return x
    bits = np.ascontiguousarray(x).view(np.uint16)  # (ascontiguousarray makes a 0-d array 1-d: shape restored)
    return np.left_shift(bits, 16, dtype=np.uint32).view(np.float32).reshape(x.shape)  # one pass, one array


def _to_bf16(x: np.ndarray) -> np.ndarray:
    """float → bf16 bits, round to nearest even (torch's rule), through float32 as torch goes."""
    with np.errstate(over="ignore"):  # past float32's range: ±inf, as torch gives
        f = np.ascontiguousarray(x, dtype=np.float32)
    u = f.view(np.uint32)
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)  # uint32 wraps only past 0xFFFF8000: NaN
    nan = np.isnan(f)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded.view(BF16).reshape(np.shape(x))


def encode(x: np.ndarray, st: str) -> np.ndarray:
    """Numbers → the storage dtype ``st`` (a safetensors name); bf16 as the :data:`BF16` marker."""
    if st == "BF16":
        return x if x.dtype == BF16 else _to_bf16(x)
    target = NUMPY_OF[st]
    if x.dtype == target:
        return x
    x = np.asarray(decode(x))
    with np.errstate(over="ignore"):
        if st == "F16" and x.dtype == np.float64:  # torch narrows float64 → float16 through float32 (two roundings)
            x = x.astype(np.float32)
        return x.astype(target)


def scaled(x: np.ndarray, factor: float) -> np.ndarray:
    """``x`` × ``factor``, computed in float64 and stored back in ``x``'s own storage dtype (bf16 bits included)."""
    return encode(np.asarray(decode(x), dtype=np.float64) * factor, st_dtype(x))


def storage_of(x: np.ndarray, like: str) -> np.ndarray:
    """``x`` in the storage dtype ``like`` when that is a float dtype; other dtypes are kept."""
    return encode(x, like) if is_float(like) else x


def to_torch(x: np.ndarray) -> "torch.Tensor":
    """An array as a torch tensor (bf16 bits → torch.bfloat16, the bits kept); a copy, writable."""
    import torch

    if x.dtype == BF16:
        return torch.from_numpy(np.ascontiguousarray(x).view(np.int16).reshape(x.shape).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(x, copy=True, order="C"))


def from_torch(t: Any) -> np.ndarray:
    """A CPU torch tensor as an array (torch.bfloat16 → the :data:`BF16` marker, the bits kept)."""
    import torch

    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


_BUFFERS = threading.local()


def _buffer(slot: int, n: int, dtype: type) -> np.ndarray:
    """This thread's reusable buffer ``slot`` of at least ``n`` elements (valid until the next call)."""
    bufs = getattr(_BUFFERS, "bufs", None)
    if bufs is None:
        bufs = _BUFFERS.bufs = {}
    buf = bufs.get((slot, dtype))
    if buf is None or buf.size < n:
        buf = bufs[(slot, dtype)] = np.empty(n, dtype=dtype)
    return buf[:n]


def float64_buffer(x: np.ndarray, slot: int) -> np.ndarray:
    """x (as stored, bf16 bits included) converted to float64 in this thread's reusable buffer ``slot``, valid
    until the thread's next call with that slot: decoding into memory already mapped is several times faster
    than fresh arrays per factor, whose pages the kernel must fault in and zero (reports/profile_rank.md).
    bf16 goes through a reused uint32 buffer: the bits shifted into the high half of a float32, then widened
    (both exact)."""
    if x.dtype == BF16:
        wide = _buffer(slot, x.size, np.uint32).reshape(x.shape)
        np.left_shift(x.view(np.uint16), 16, out=wide, dtype=np.uint32)
        x = wide.view(np.float32)
    out = _buffer(slot, x.size, np.float64).reshape(x.shape)
    np.copyto(out, x)
    return out
