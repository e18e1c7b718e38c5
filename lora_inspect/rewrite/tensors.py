"""Tensor helpers shared by ``truncate`` and ``rescale``: refusing corrupt data, carrying full tensors."""

from __future__ import annotations

import torch

from ..adapter import Adapter
from ..errors import InspectError
from ..formats.tensors import ST_TO_TORCH
from ..spectrum import all_finite

__all__ = ["check_finite", "torch_dtype", "extras_tensors", "header_reserve", "module_tensors"]


def check_finite(ad: Adapter, name: str, *ts: torch.Tensor) -> None:
    for t in ts:
        if t.is_floating_point() and not all_finite(t):
            raise InspectError(f"{ad.path}: module {name!r} holds NaN/inf values: refusing to rewrite a corrupt adapter")


def torch_dtype(st: str) -> torch.dtype:
    if st not in ST_TO_TORCH:
        raise InspectError(f"tensor dtype {st} cannot be rewritten")
    return ST_TO_TORCH[st]


def extras_tensors(ad: Adapter) -> dict[str, torch.Tensor]:
    """The full (non-low-rank) tensors, carried over unchanged; NaN/inf refused."""
    out = {}
    for k in ad.extras:
        t = ad.source.get(k)
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InspectError(f"{ad.path}: full tensor {k!r} holds NaN/inf values: refusing to rewrite a corrupt adapter")
        out[k] = t
    return out


def module_tensors(ad: Adapter) -> dict[str, torch.Tensor]:
    """Every module tensor as stored, in the input's module order."""
    return {key: m.source.get(key) for m in ad.modules for key in m.keys}


def header_reserve(ad: Adapter) -> int:
    """Bytes the output's container (header) can take: the input header is an upper bound for the same
    keys with smaller shapes and offsets (rank digits never grow), plus the config, if any."""
    data_start = getattr(ad.source, "data_start", None)  # safetensors: 8 + header length, from the reader
    if data_start is not None:
        return int(data_start) + 8
    return 4096  # a .bin's pickle overhead, roughly
