"""α stored as one scalar tensor per module (kohya's and diffusers' ``.alpha`` keys): the rewrite
side shared by the layouts that store it so. s = α/r, a missing or zero ``.alpha`` meaning α = r."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ..arrays import encode, scaled
from ..errors import InspectError

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import Adapter, Module

__all__ = ["alphas_for_ranks", "alphas_scaled"]

# the storage dtypes a new α tensor takes from its module's factors (torch's dtypes); F32 for any other
_ALPHA_DTYPES = ("BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "I64", "F64")


def alphas_for_ranks(ad: "Adapter", tensors: dict[str, np.ndarray], ranks: dict[str, int]) -> None:
    """α = stored rank in every kept module that has an ``.alpha`` tensor, so that s = 1."""
    for m in ad.modules:
        if m.alpha_key and m.name in ranks:
            info = m.source.info(m.alpha_key)
            tensors[m.alpha_key] = encode(np.full(info.shape, float(ranks[m.name]), dtype=np.float64), info.dtype)


def alphas_scaled(ad: "Adapter", tensors: dict[str, np.ndarray], factor: float,
                  new_key: Callable[["Module"], str | None]) -> None:
    """Every ``.alpha`` tensor × F; a module without one gets ``new_key(m)`` = r·F (α = r was implied),
    or an error when the layout has no name for it."""
    for m in ad.modules:
        if m.alpha_key:
            tensors[m.alpha_key] = scaled(m.source.raw(m.alpha_key), factor)
            continue
        key = new_key(m)
        if key is None:
            raise InspectError(f"module {m.name!r}: no .alpha tensor to scale", hint="bake the factor into B instead",
                               option="bake")
        st = m.dtype if m.dtype in _ALPHA_DTYPES else "F32"
        tensors[key] = encode(np.array(float(m.rank) * factor, dtype=np.float64), st)
