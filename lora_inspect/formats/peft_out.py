"""``convert --to peft``: canonical modules → a PEFT LoRA directory (:meth:`PeftLayout.convert_tensors
<lora_inspect.formats.peft.PeftLayout.convert_tensors>`; imported when a conversion runs).

α per module, α_m = s_m·r_m (rsLoRA: α·√r, written with use_rslora false), r and α of the most common
module as ``r``/``lora_alpha`` and the others as ``rank_pattern``/``alpha_pattern`` with the full escaped
module path (``peft.utils.other.get_pattern_key``); nothing baked. The source's PEFT config (task_type,
modules_to_save …) is carried where there is one.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from ..convert.canon import Canon, CanonModule
from ..convert.writers import Handler, Written, alpha_of, dispatch, peft_magnitude, record, stored, stored_pair
from ..kinds import Kind
from ..peft_rules import PEFT_PREFIX
from .layout import WriteOptions

__all__ = ["write_peft"]


def _embedding(m: CanonModule, dtype: str) -> dict[str, np.ndarray] | None:
    """PEFT applies s·(B_st@A_st)ᵀ to an embedding: A_st = Bᵀ (k, vocab), B_st = Aᵀ (dim, k)."""
    if m.kind != Kind.EMBEDDING:
        return None
    key = PEFT_PREFIX + m.path
    return {key + ".lora_embedding_A": stored(m.b.T, dtype), key + ".lora_embedding_B": stored(m.a.T, dtype)}


def _pair(m: CanonModule, dtype: str) -> dict[str, np.ndarray] | None:
    key = PEFT_PREFIX + m.path
    a, b = stored_pair(m, m.b, m.a, dtype)
    out = {key + ".lora_A.weight": a, key + ".lora_B.weight": b}
    if m.magnitude is not None:
        out[key + ".lora_magnitude_vector"] = peft_magnitude(m, dtype)
    return out


HANDLERS: tuple[Handler, ...] = (_embedding, _pair)


def _config(canon: Canon, r: int, alpha: float, rp: dict, ap: dict, targets: list[str], dora: bool) -> dict:
    src = canon.config or {}
    return {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "rank_pattern": rp, "alpha_pattern": ap,
        "target_modules": targets, "use_rslora": False, "use_dora": dora, "fan_in_fan_out": canon.fan_in_fan_out,
        "bias": "none", "lora_dropout": 0.0, "init_lora_weights": True, "inference_mode": True,
        "layers_to_transform": None, "layers_pattern": None, "modules_to_save": src.get("modules_to_save"),
        "task_type": src.get("task_type"), "base_model_name_or_path": canon.base_model or src.get("base_model_name_or_path"),
        "revision": src.get("revision"),
    }


def write_peft(canon: Canon, opts: WriteOptions) -> Written:
    tensors: dict[str, np.ndarray] = {}
    records = []
    r = Counter(m.rank for m in canon.modules).most_common(1)[0][0]
    alpha = Counter(alpha_of(m) for m in canon.modules).most_common(1)[0][0]
    rp, ap = {}, {}
    for m in canon.modules:
        tensors.update(dispatch(HANDLERS, m, opts.dtype))
        if m.rank != r:
            rp[re.escape(m.path)] = m.rank
        if alpha_of(m) != alpha:
            ap[re.escape(m.path)] = alpha_of(m)
        how = ["α kept" if not m.rslora else "rsLoRA: α·√r written (use_rslora off)"]
        records.append(record(m, PEFT_PREFIX + m.path, m.rank, how))
    tensors.update(opts.extras)
    dora = any(m.magnitude is not None for m in canon.modules)
    targets = sorted({m.path for m in canon.modules})
    cfg = _config(canon, r, alpha, rp, ap, targets, dora)
    return Written(tensors, "adapter_model.safetensors", cfg, {"format": "pt"}, records)
