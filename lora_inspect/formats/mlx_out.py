"""``convert --to mlx``: canonical modules → an mlx-lm adapter directory
(:meth:`MlxLayout.convert_tensors <lora_inspect.formats.mlx.MlxLayout.convert_tensors>`; imported when a
conversion runs).

mlx-lm holds one absolute ``scale`` and one ``rank`` (its capabilities: no per-module α or rank): the common
s is written as ``scale`` (else 1) and any other s baked into B; a smaller rank is zero-padded (padded
rows/columns add nothing to B@A); factors transposed (``mlx_lm/tuner/lora.py``); DoRA as ``.m`` with
``fine_tune_type: dora`` (every adapted layer a DoRALinear, ``mlx_lm/tuner/dora.py``).
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from ..arrays import decode
from ..convert.canon import Canon, CanonModule, times
from ..convert.writers import Written, record, stored
from .capabilities import Capabilities
from .layout import WriteOptions

__all__ = ["write_mlx"]

_LAYER = re.compile(r"^(?:model\.)?layers\.\d+\.")


def _keys(paths: list[str]) -> list[str]:
    keys = set()
    for p in paths:
        mt = _LAYER.match(p)
        keys.add(p[mt.end():] if mt else p)
    return sorted(keys)


def _padded(m: CanonModule, b: np.ndarray, a: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero rows/columns up to ``rank`` (float64): they add nothing to B@A."""
    if m.rank >= rank:
        return b, a
    b = np.concatenate([decode(b).astype(np.float64), np.zeros((m.shape[0], rank - m.rank))], axis=1)
    a = np.concatenate([decode(a).astype(np.float64), np.zeros((rank - m.rank, m.shape[1]))], axis=0)
    return b, a


def _scale(canon: Canon, caps: Capabilities) -> float:
    """The one scale written: the common s, else 1 (per-module scales are baked into B)."""
    scales = Counter(m.scale for m in canon.modules)
    return scales.most_common(1)[0][0] if caps.per_module_alpha or len(scales) == 1 else 1.0


def write_mlx(canon: Canon, opts: WriteOptions, caps: Capabilities) -> Written:
    rank = max(m.rank for m in canon.modules)
    scale = _scale(canon, caps)
    tensors: dict[str, np.ndarray] = {}
    records = []
    for m in canon.modules:
        f = m.scale / scale
        b, a = _padded(m, times(m.b, f), m.a, rank if caps.one_rank_only else m.rank)
        tensors[m.path + ".lora_a"] = stored(a.T, opts.dtype)
        tensors[m.path + ".lora_b"] = stored(b.T, opts.dtype)
        if m.magnitude is not None:
            tensors[m.path + ".m"] = stored(m.magnitude.reshape(-1), opts.dtype)
        how = [] if f == 1.0 else [f"s = {m.scale:.6g} baked into B (scale {scale:g})"]
        if m.rank < rank:
            how.append(f"zero-padded {m.rank} → {rank}")
        records.append(record(m, m.path, rank, how))
    dora = bool(canon.modules) and all(m.magnitude is not None for m in canon.modules)
    cfg = {"fine_tune_type": "dora" if dora else "lora", "num_layers": -1, "model": canon.base_model,
           "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0,
                               "keys": _keys([m.path for m in canon.modules])}}
    notes = ["num_layers = -1 (every layer): layers without tensors here keep lora_b = 0, i.e. ΔW = 0"]
    return Written(tensors, "adapters.safetensors", cfg, {}, records, notes)
