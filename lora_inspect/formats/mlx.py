"""mlx-lm adapter directories: ``adapters.safetensors`` + ``adapter_config.json``.

mlx-lm (``mlx_lm/tuner/lora.py``) stores ``lora_a`` (in, r) and ``lora_b`` (r, out) — PEFT's factors
transposed — and applies ``scale · (x @ lora_a) @ lora_b`` with an *absolute* scale (default 20, no
division by r). DoRA adds ``.m``. One rank for all modules (``lora_parameters.rank``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..adapter import ORIENT_MLX, Adapter
from ..errors import InspectError
from .common import build_module, group_keys
from .tensors import TensorSource

__all__ = ["read_mlx", "looks_like_mlx"]

MLX_SUFFIXES = {".lora_a": "A", ".lora_b": "B", ".m": "m"}
MLX_DEFAULT_SCALE = 20.0


def looks_like_mlx(keys: list[str]) -> bool:
    return any(k.endswith(".lora_a") for k in keys)


def read_mlx(source: TensorSource, path: Path, config: dict | None, config_path: Path | None) -> Adapter:
    cfg = config or {}
    notes = []
    ftt = cfg.get("fine_tune_type", "lora")
    if ftt == "full":
        raise InspectError(f"{config_path}: fine_tune_type is 'full': this is a full fine-tune, not an adapter")
    params = cfg.get("lora_parameters") or {}
    if not isinstance(params, dict):
        raise InspectError(f"{config_path}: lora_parameters must be an object")
    scale = params.get("scale")
    if scale is None:
        scale = MLX_DEFAULT_SCALE
        notes.append(f"no lora_parameters.scale: mlx-lm's default {MLX_DEFAULT_SCALE:g} assumed")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise InspectError(f"{config_path}: lora_parameters.scale must be a number, found {scale!r}")
    groups, rest = group_keys(source.keys(), MLX_SUFFIXES)
    if not groups:
        raise InspectError(f"{source.path}: no lora_a/lora_b pairs found")
    modules = []
    for name in sorted(groups):
        # mlx's scale is absolute: express it as PEFT's α = scale·r so that α/r = scale
        r = source.info(groups[name]["A"]).shape[-1] if "A" in groups[name] else 0
        mod, _ = build_module(name, groups[name], source, orient=ORIENT_MLX, alpha=float(scale) * max(r, 1))
        mod.scale = float(scale)
        modules.append(mod)
    want = params.get("rank")
    ranks = Counter(m.rank for m in modules)
    if want is not None and set(ranks) != {want}:
        raise InspectError(f"{config_path}: lora_parameters.rank is {want} but the tensors have ranks {sorted(ranks)}")
    return Adapter(
        path=path,
        format="mlx",
        weights_path=source.path,
        source=source,
        modules=modules,
        extras=sorted(rest),
        config=config,
        config_path=config_path,
        r=ranks.most_common(1)[0][0],
        alpha=None,
        use_dora=ftt == "dora" or any(m.is_dora for m in modules),
        base_model=cfg.get("model"),
        notes=notes,
    )
