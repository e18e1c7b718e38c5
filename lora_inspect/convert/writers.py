"""What every ``convert`` writer shares: :class:`Written` (what a writer returns), per-module records, the
stored orientation of a pair, and :func:`dispatch` over an ordered list of per-module handlers.

The writers themselves belong to their layouts (``Layout.convert_tensors`` in ``lora_inspect/formats``):
which layouts are targets, and what each can hold (``Layout.caps``), is the registry's
(``lora_inspect.formats.LAYOUTS``). How each stores the scale s (docs/formats.md, "convert", capability
matrix):

- ``peft``: α per module, α_m = s_m·r_m (rsLoRA: α·√r, written with use_rslora false), patterns with
  the full escaped module path (``peft.utils.other.get_pattern_key``); nothing baked.
- ``kohya``: ``.alpha`` = s·r per module (fp32 scalar), nothing baked.
- ``diffusers``: s baked into ``lora_B`` (no α anywhere ⇒ α = r, s = 1: ``diffusers · get_peft_kwargs``).
- ``mlx``: one absolute ``scale`` (the common s, else 1) with any other s baked into B; one rank
  (zero-padded: padded rows/columns add nothing to B@A); factors transposed (``mlx_lm/tuner/lora.py``).
- ``gguf``: one α in the header, s·r/α baked into each B (:mod:`lora_inspect.convert.gguf_out`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..arrays import encode
from ..errors import InspectError
from ..kinds import Algo, Kind
from .canon import CanonModule
from .results import ModuleOut

__all__ = ["Written", "refuse", "record", "stored", "stored_pair", "peft_magnitude", "alpha_of", "Handler", "dispatch"]


@dataclass
class Written:
    tensors: dict[str, np.ndarray]  # in storage dtypes (bf16 as arrays.BF16 bits)
    weights_name: str | None  # None: a single file at OUT
    config: dict[str, Any] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    records: list[ModuleOut] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def refuse(target: str, m: CanonModule, why: str) -> InspectError:
    return InspectError(f"module {m.source_name or m.name!r}: {target} cannot hold it: {why}")


_AS_LORA = {Algo.LOCON: "LoCon Tucker core folded into A",
            Algo.LOHA: "LoHa as its exact LoRA (rank r₁·r₂, face-split)",
            Algo.LOKR: "LoKr as its exact LoRA (rank = product of the factor ranks)",
            Algo.FULL: "full ΔW as its exact LoRA (rank = min(out, in))",
            Algo.OFT: "OFT ΔW from the base weight as its exact LoRA (rank ≤ min(out, in))",
            Algo.BOFT: "BOFT ΔW from the base weight as its exact LoRA (rank ≤ min(out, in))",
            Algo.IA3: "(IA)³ ΔW from the base weight as its exact LoRA (rank ≤ min(out, in))"}


def record(m: CanonModule, target: str, k: int, how: list[str]) -> ModuleOut:
    pre = [_AS_LORA[m.algo]] if m.algo in _AS_LORA else []
    return ModuleOut(m.source_name or m.name, target, m.kind, m.shape, m.rank, k, m.scale, pre + how)


def _conv_shapes(m: CanonModule, k: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    out, inp = m.shape
    kh, kw = m.kernel or (1, 1)
    if m.conv_ndim == 3:
        return (k, inp // kh, kh), (out, k, 1)
    return (k, inp // (kh * kw), kh, kw), (out, k, 1, 1)


def stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` in the storage dtype ``dtype`` (a safetensors name), C-contiguous; ``x`` itself when it already is."""
    y = encode(x, dtype)
    return y if y.flags.c_contiguous else np.ascontiguousarray(y)  # (ascontiguousarray makes a 0-d array 1-d)


def stored_pair(m: CanonModule, b: np.ndarray, a: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Linear (B, A) → stored (A, B) in PEFT/kohya orientation (conv reshaped), in storage dtype ``dtype``."""
    if m.kind == Kind.CONV:
        a_sh, b_sh = _conv_shapes(m, b.shape[1])
        a, b = a.reshape(a_sh), b.reshape(b_sh)
    return stored(a, dtype), stored(b, dtype)


def alpha_of(m: CanonModule) -> float:
    """The α that gives the module's scale as α/r."""
    return m.scale * m.rank


def peft_magnitude(m: CanonModule, dtype: str) -> np.ndarray:
    """PEFT's (and diffusers') DoRA magnitude: (out,) for linear, (1, out, 1, 1) for Conv2d, (1, out, 1) for
    Conv1d (``peft/tuners/lora/dora.py · _DoraConvNdLayer``: weight norm kept with keepdim)."""
    assert m.magnitude is not None
    shape = {3: (1, -1, 1), 4: (1, -1, 1, 1)}.get(m.conv_ndim, (1, -1, 1, 1)) if m.kind == Kind.CONV else (-1,)
    return stored(m.magnitude.reshape(shape), dtype)


# one module's tensors (key → array in the storage dtype named by the str) in a layout, or None when the
# handler does not take the module
Handler = Callable[[CanonModule, str], "dict[str, np.ndarray] | None"]


def dispatch(handlers: Sequence[Handler], m: CanonModule, dtype: str) -> dict[str, np.ndarray]:
    """The tensors of ``m`` from the first handler that takes it (PEFT's dispatchers: an ordered list of
    small handlers, first match wins). Capabilities were checked before: a module no handler takes is a bug."""
    for handler in handlers:
        got = handler(m, dtype)
        if got is not None:
            return got
    raise InspectError(f"module {m.source_name or m.name!r}: no writer takes a {m.kind} module")  # pragma: no cover
