"""``convert --to kohya``: canonical modules → one kohya/sd-scripts ``.safetensors`` file
(:meth:`KohyaLayout.convert_tensors <lora_inspect.formats.kohya.KohyaLayout.convert_tensors>`; imported when a
conversion runs).

``lora_down``/``lora_up`` in PEFT's orientation (conv reshaped) and ``.alpha`` = s·r per module (fp32
scalar): nothing baked. Names: :func:`lora_inspect.convert.names.kohya_names` (``--unet-names``).
"""

from __future__ import annotations

import numpy as np

from ..convert.canon import Canon, CanonModule
from ..convert.names import kohya_names
from ..convert.writers import Written, alpha_of, record, stored_pair
from .layout import WriteOptions

__all__ = ["write_kohya"]


def _pair(m: CanonModule, name: str, dtype: str) -> dict[str, np.ndarray]:
    a, b = stored_pair(m, m.b, m.a, dtype)
    return {name + ".lora_down.weight": a, name + ".lora_up.weight": b,
            name + ".alpha": np.array(alpha_of(m), dtype=np.float32)}


def write_kohya(canon: Canon, opts: WriteOptions) -> Written:
    """``opts.unet_names``: auto | sgm | diffusers (:func:`lora_inspect.convert.names.kohya_names`)."""
    tensors: dict[str, np.ndarray] = {}
    records = []
    names, notes = kohya_names(canon, opts.unet_names)
    for m, name in zip(canon.modules, names):
        tensors.update(_pair(m, name, opts.dtype))
        records.append(record(m, name, m.rank, ["α = s·r stored (fp32)"]))
    return Written(tensors, None, None, {}, records, notes)
