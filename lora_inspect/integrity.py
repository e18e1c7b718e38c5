"""NaN/±inf and all-zero tests on the raw bits of a memory-mapped safetensors tensor: numpy only, no torch,
at the speed of reading the file.

IEEE formats (and bfloat16, the top half of a float32) store a non-finite value as an all-ones exponent:
a value is finite exactly when ``bits & EXP != EXP``. A value is zero (+0.0 or -0.0) exactly when every
bit but the sign is clear, so a tensor is all zero when no element has ``bits & ~SIGN``; a NaN is not zero,
as ``torch.Tensor.any`` counts it. Other dtypes (integers, bool, 8-bit floats) and tensors not in a
safetensors file are not handled here: :func:`bit_view` returns None and the caller reads them through
torch.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .errors import InspectError
from .formats.tensors import SafetensorsSource, TensorSource

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
    """The raw bits of ``key`` when it is an IEEE or bfloat16 tensor in a safetensors file, else None.
    The offsets were validated against the file's size when its header was read."""
    if not isinstance(source, SafetensorsSource):
        return None
    info = source.tensors[key]
    spec = _FLOATS.get(info.dtype)
    if spec is None or info.numel == 0:
        return None
    uint, exp, sign = spec
    try:
        bits = np.memmap(source.path, dtype=uint, mode="r", offset=source.data_start + info.offset,
                         shape=(info.numel,))
    except (OSError, ValueError) as e:
        raise InspectError(f"{source.path}: cannot read tensor {key!r}: {e}") from e
    return BitView(bits, exp, sign)


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
