"""α stored as one scalar tensor per module (kohya's and diffusers' ``.alpha`` keys): the rewrite
side shared by the layouts that store it so. s = α/r, a missing or zero ``.alpha`` meaning α = r."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import InspectError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..adapter import Adapter, Module

__all__ = ["alphas_for_ranks", "alphas_scaled"]


def alphas_for_ranks(ad: "Adapter", tensors: dict[str, "torch.Tensor"], ranks: dict[str, int]) -> None:
    """α = stored rank in every kept module that has an ``.alpha`` tensor, so that s = 1."""
    import torch

    for m in ad.modules:
        if m.alpha_key and m.name in ranks:
            tensors[m.alpha_key] = torch.full_like(m.source.get(m.alpha_key), float(ranks[m.name]))


def alphas_scaled(ad: "Adapter", tensors: dict[str, "torch.Tensor"], factor: float,
                  new_key: Callable[["Module"], str | None]) -> None:
    """Every ``.alpha`` tensor × F; a module without one gets ``new_key(m)`` = r·F (α = r was implied),
    or an error when the layout has no name for it."""
    import torch

    from ..formats.tensors import ST_TO_TORCH

    for m in ad.modules:
        if m.alpha_key:
            at = m.source.get(m.alpha_key)
            tensors[m.alpha_key] = (at.to(torch.float64) * factor).to(at.dtype)
            continue
        key = new_key(m)
        if key is None:
            raise InspectError(f"module {m.name!r}: no .alpha tensor to scale", hint="bake the factor into B instead",
                               option="bake")
        tensors[key] = torch.tensor(float(m.rank) * factor, dtype=ST_TO_TORCH.get(m.dtype, torch.float32))
