"""NaN/±inf and all-zero tests on the raw bits of a tensor as stored (a memory map for safetensors): numpy
only, no torch, at the speed of reading the file.

IEEE formats (and bfloat16, the top half of a float32) store a non-finite value as an all-ones exponent:
a value is finite exactly when ``bits & EXP != EXP``. A value is zero (+0.0 or -0.0) exactly when every
bit but the sign is clear, so a tensor is all zero when no element has ``bits & ~SIGN``; a NaN is not zero,
as ``torch.Tensor.any`` counts it. Other dtypes (integers, bool) are not handled here: :func:`bit_view`
returns None and the caller reads their values.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .errors import InspectError
from .formats.tensors import TensorSource

__all__ = ["BitView", "bit_view", "all_finite_bits", "all_zero_bits", "nonfinite_and_zero"]

CHUNK = 1 << 22  # elements per step: bounds the temporaries to a few tens of MB, whatever the tensor


class BitView(NamedTuple):
    bits: np.ndarray  # the tensor's elements as unsigned integers of its width (a read-only memory map)
    exp: int  # the exponent mask: all ones means NaN or ±inf
    sign: int  # the sign bit


# safetensors dtype → (unsigned integer of the same width, exponent mask, sign bit)
_FLOATS: dict[str, tuple[type, int, int]] = {
    "F64": (np.uint64, 0x7FF0_0000_0000_0000, 0x8000_0000_0000_0000),
    "F32": (np.uint32, 0x7F80_0000, 0x8000_0000),
    "F16": (np.uint16, 0x7C00, 0x8000),
    "BF16": (np.uint16, 0x7F80, 0x8000),
}


def bit_view(source: TensorSource, key: str) -> BitView | None:
    """The raw bits of ``key`` when it is an IEEE or bfloat16 tensor, else None: a view of the tensor as
    stored (:meth:`TensorSource.raw`; for safetensors, of the memory map, no copy)."""
    info = source.tensors[key]
    spec = _FLOATS.get(info.dtype)
    if spec is None or info.numel == 0:
        return None
    uint, exp, sign = spec
    raw = source.raw(key)
    if not raw.flags.c_contiguous:
        raise InspectError(f"{source.path}: tensor {key!r}: not contiguous")  # pragma: no cover - sources hand out C order
    return BitView(raw.reshape(-1).view(uint), exp, sign)


def _chunks(bits: np.ndarray):
    for start in range(0, bits.size, CHUNK):
        yield bits[start:start + CHUNK]


def nonfinite_and_zero(view: BitView) -> tuple[bool, bool]:
    """(holds NaN or ±inf, is all zero) in one pass over the memory map."""
    exp = view.bits.dtype.type(view.exp)
    rest = view.bits.dtype.type(((1 << (8 * view.bits.dtype.itemsize)) - 1) ^ view.sign)
    nonfinite, nonzero = False, False
    for c in _chunks(view.bits):
        nonfinite = nonfinite or bool(np.any((c & exp) == exp))
        nonzero = nonzero or bool(np.any(c & rest))
        if nonfinite and nonzero:
            break
    return nonfinite, not nonzero


def all_finite_bits(view: BitView) -> bool:
    """No element is NaN or ±inf."""
    exp = view.bits.dtype.type(view.exp)
    return not any(bool(np.any((c & exp) == exp)) for c in _chunks(view.bits))


def all_zero_bits(view: BitView) -> bool:
    """Every element is +0.0 or -0.0 (a NaN is not zero)."""
    ones = (1 << (8 * view.bits.dtype.itemsize)) - 1
    rest = view.bits.dtype.type(ones ^ view.sign)  # every bit but the sign
    return not any(bool(np.any(c & rest)) for c in _chunks(view.bits))
