"""Apply an adapter to a loaded Hugging Face model by an exact merge, W ← W₀ + ΔW, module by module.

Every layout the project reads (PEFT, kohya, mlx-lm, bare files) goes through the same route: the
adapter is read with ``load_adapter``, each module's name is mapped to a layer of the model and its
ΔW = s·B@A formed from the factors (float64, then the model's dtype; for GPT-2's Conv1D, whose weight
is stored (in, out), ΔWᵀ is added). This is PEFT's own merge (``merge_and_unload``:
W + scale·B@A, transposed for ``fan_in_fan_out``); the tests compare the two.

Names map as PEFT's (``base_model.model.`` + the module path), as-is (mlx-lm, bare files), or as
kohya's (one of :data:`~lora_inspect.formats.kohya.KOHYA_PREFIXES`, the prefixes the reader accepts, +
the path with ``.`` → ``_``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn as nn

from ..adapter import require_mergeable
from ..arrays import to_torch
from ..errors import InspectError
from ..formats.kohya import KOHYA_PREFIXES
from ..peft_rules import strip_prefix
from .model import linear_modules, linear_shape

__all__ = ["Bound", "bind_adapter", "merged"]


@dataclass
class Bound:
    """An adapter bound to a model: per model layer path, the linear-orientation factors (B·s, A)."""

    label: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    modules: dict[str, str]  # layer path → the adapter's module name


def _target(name: str, layers: dict, kohya: dict[str, str]) -> str | None:
    for cand in (name, strip_prefix(name)):
        if cand in layers:
            return cand
    return kohya.get(name)


def bind_adapter(path: str | Path, model: nn.Module, adapter=None) -> Bound:
    """Read ``path`` (or use the already-read ``adapter``) and map each module to a layer of ``model``.
    A module the model lacks, a shape that differs, DoRA, biases or full tensors: one line, refused."""
    from ..formats import load_adapter

    ad = adapter if adapter is not None else load_adapter(path)
    require_mergeable(ad, path, "verify")
    layers = linear_modules(model)
    kohya = {p + n.replace(".", "_"): n for p in KOHYA_PREFIXES for n in layers}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    names: dict[str, str] = {}
    for m in ad.modules:
        if m.kind == "conv" or m.bias_key is not None:
            raise InspectError(f"{path}: module {m.name} is a convolution or has a LoRA bias; only linear LoRA is merged")
        target = _target(m.name, layers, kohya)
        if target is None:
            raise InspectError(f"{path}: module {m.name!r} is not a linear layer of the base model (made for another base?)")
        if target in factors:
            raise InspectError(f"{path}: two modules map onto {target!r}")
        want = linear_shape(*layers[target])
        if tuple(m.shape) != want:
            raise InspectError(f"{path}: module {m.name!r} has ΔW shape {tuple(m.shape)} but the base layer is {want} "
                               "(made for another base?)")
        b, a = m.factors(np.dtype(np.float64))  # numpy: torch from here on
        factors[target] = (to_torch(b) * m.scale, to_torch(a))
        names[target] = m.name
    return Bound(str(path), factors, names)


@contextmanager
def merged(model: nn.Module, bound: Bound | None) -> Iterator[nn.Module]:
    """``model`` with ``bound`` merged into its weights for the duration; the original weights are
    restored bit for bit afterwards (kept aside, not subtracted)."""
    if bound is None:
        yield model
        return
    layers = linear_modules(model)
    saved: dict[str, torch.Tensor] = {}
    try:
        for name, (b, a) in bound.factors.items():
            mod, transposed = layers[name]
            w = cast(torch.Tensor, mod.weight)
            saved[name] = w.data.clone()
            delta = (b.to(w.device) @ a.to(w.device)).to(torch.float32)
            w.data = (w.data.float() + (delta.T if transposed else delta)).to(w.dtype)
        yield model
    finally:
        for name, w0 in saved.items():
            layers[name][0].weight.data = w0
