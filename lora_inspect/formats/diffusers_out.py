"""``convert --to diffusers``: canonical modules → one diffusers ``pytorch_lora_weights`` file
(:meth:`DiffusersLayout.convert_tensors <lora_inspect.formats.diffusers.DiffusersLayout.convert_tensors>`;
imported when a conversion runs).

``<component>.<path>.lora_A/lora_B.weight`` with s baked into ``lora_B``: no α anywhere means α = r, s = 1 to
diffusers (``diffusers · get_peft_kwargs``); DoRA magnitudes as PEFT stores them.
"""

from __future__ import annotations

import numpy as np

from ..convert.canon import Canon, CanonModule, times
from ..convert.writers import Written, peft_magnitude, record, stored_pair
from .layout import WriteOptions

__all__ = ["write_diffusers"]


def _pair(m: CanonModule, dtype: str) -> dict[str, np.ndarray]:
    a, b = stored_pair(m, times(m.b, m.scale), m.a, dtype)
    out = {m.name + ".lora_A.weight": a, m.name + ".lora_B.weight": b}
    if m.magnitude is not None:
        out[m.name + ".lora_magnitude_vector"] = peft_magnitude(m, dtype)
    return out


def write_diffusers(canon: Canon, opts: WriteOptions) -> Written:
    tensors: dict[str, np.ndarray] = {}
    records = []
    for m in canon.modules:
        tensors.update(_pair(m, opts.dtype))
        how = [] if m.scale == 1.0 else [f"s = {m.scale:.6g} baked into B (no α: s = 1)"]
        records.append(record(m, m.name, m.rank, how))
    return Written(tensors, None, None, {}, records)
