"""PEFT configs as the layouts read and rewrite them: the ``lora_adapter_metadata`` header entry
(one home for parsing it), α from header entries, and the config a truncation or a rescale writes.
"""

from __future__ import annotations

import copy
import math
import re
from collections import Counter
from typing import Any

from .. import validate as v
from ..errors import InspectError
from .tensors import TensorSource

__all__ = ["config_in_metadata", "metadata_alpha", "truncated_config", "rescaled_config", "COMPONENTS"]

META_KEY = "lora_adapter_metadata"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "prior")


def config_in_metadata(source: TensorSource, *, for_rewrite: bool = False) -> dict[str, Any] | None:
    """The PEFT config diffusers stores in the ``lora_adapter_metadata`` header entry, or None.
    ``for_rewrite``: refuse per-component configs (``"unet.lora_alpha"`` …), which a rewrite cannot
    update yet."""
    raw = source.metadata.get(META_KEY)
    if not raw:
        return None
    where = f"{source.path}: header entry {META_KEY}"
    cfg = v.parse_json(raw, where)
    if not isinstance(cfg, dict):
        raise InspectError(f"{where} is not a JSON object")
    if for_rewrite and any(k.split(".", 1)[0] in COMPONENTS and "." in k for k in cfg):
        raise InspectError(f"{source.path}: per-component configs in {META_KEY} are not supported for rewriting",
                           hint="a rescale can bake the factor into B instead", option="bake")
    return cfg


def metadata_alpha(source: TensorSource, notes: list[str]) -> float | None:
    """α from a ``lora_alpha`` / ``alpha`` header entry (text), validated as a finite number."""
    for k in ("lora_alpha", "alpha"):
        if k in source.metadata:
            try:
                alpha = float(source.metadata[k])
            except ValueError:
                continue
            if not math.isfinite(alpha):
                raise InspectError(f"{source.path}: header entry {k} must be finite, found {source.metadata[k]!r}")
            notes.append(f"alpha {alpha:g} read from the safetensors header entry {k!r}")
            return alpha
    return None


def truncated_config(cfg: dict, ranks: dict[str, int], dropped: list[str]) -> dict:
    """PEFT config for baked-in scales: α = k per module (s = 1), rsLoRA off, per-module ranks in
    ``rank_pattern``/``alpha_pattern`` under *full* module names; dropped modules in ``exclude_modules``."""
    new = copy.deepcopy(cfg)
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))
    new["r"] = int(r)
    new["lora_alpha"] = int(r)
    new["use_rslora"] = False
    new["rank_pattern"] = {n: int(k) for n, k in sorted(ranks.items()) if k != r}
    new["alpha_pattern"] = {n: int(k) for n, k in sorted(ranks.items()) if k != r}
    if dropped:
        old = new.get("exclude_modules")
        if isinstance(old, str) and old:
            new["exclude_modules"] = f"(?:{old})|" + "|".join(re.escape(n) for n in sorted(dropped))
        else:
            new["exclude_modules"] = sorted(set(old or []) | set(dropped))
    return new


def rescaled_config(cfg: dict, factor: float, where: str) -> dict:
    """``lora_alpha`` and every ``alpha_pattern`` value × F (PEFT's s is linear in α)."""
    new = copy.deepcopy(cfg)
    a = new.get("lora_alpha")
    if not isinstance(a, (int, float)) or isinstance(a, bool):
        raise InspectError(f"{where}: the config has no numeric lora_alpha to scale",
                           hint="bake the factor into B instead", option="bake")
    new["lora_alpha"] = _num(a * factor)
    if new.get("alpha_pattern"):
        new["alpha_pattern"] = {k: _num(x * factor) for k, x in new["alpha_pattern"].items()}
    return new


def _num(x: float) -> int | float:
    """Integers stay integers in the JSON when the product is whole (PEFT accepts floats too)."""
    return int(x) if float(x).is_integer() and abs(x) < 2**53 else float(x)
