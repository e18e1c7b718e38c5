"""Tensor helpers shared by ``truncate`` and ``rescale``: refusing corrupt data, carrying full tensors."""

from __future__ import annotations

import numpy as np

from ..adapter import Adapter
from ..arrays import decode
from ..errors import InspectError
from ..spectrum import all_finite

__all__ = ["check_finite", "storage_dtype", "extras_tensors", "header_reserve", "module_tensors"]


def _is_float(x: np.ndarray) -> bool:
    return bool(np.issubdtype(x.dtype, np.floating))


def check_finite(ad: Adapter, name: str, *xs: np.ndarray) -> None:
    for x in xs:
        x = decode(x)
        if _is_float(x) and not all_finite(x):
            raise InspectError(f"{ad.path}: module {name!r} holds NaN/inf values: refusing to rewrite a corrupt adapter")


# the stored dtypes a rewrite writes back (no 8-bit floats, no unsigned integers past U8)
_REWRITABLE = frozenset({"BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "I64", "F64"})


def storage_dtype(st: str) -> str:
    """``st`` when a rewrite can write tensors of that safetensors dtype; an InspectError otherwise."""
    if st not in _REWRITABLE:
        raise InspectError(f"tensor dtype {st} cannot be rewritten")
    return st


def extras_tensors(ad: Adapter) -> dict[str, np.ndarray]:
    """The full (non-low-rank) tensors, carried over unchanged (as stored, bit for bit); NaN/inf refused."""
    out = {}
    for k in ad.extras:
        raw = ad.source.raw(k)
        x = decode(raw)
        if _is_float(x) and not np.isfinite(x).all():
            raise InspectError(f"{ad.path}: full tensor {k!r} holds NaN/inf values: refusing to rewrite a corrupt adapter")
        out[k] = raw
    return out


def module_tensors(ad: Adapter) -> dict[str, np.ndarray]:
    """Every module tensor as stored (bf16 as its bits), in the input's module order."""
    return {key: m.source.raw(key) for m in ad.modules for key in m.keys}


def header_reserve(ad: Adapter) -> int:
    """Bytes the output's container (header) can take: the input header is an upper bound for the same
    keys with smaller shapes and offsets (rank digits never grow), plus the config, if any."""
    data_start = getattr(ad.source, "data_start", None)  # safetensors: 8 + header length, from the reader
    if data_start is not None:
        return int(data_start) + 8
    return 4096  # a .bin's pickle overhead, roughly
