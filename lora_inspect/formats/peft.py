"""PEFT adapters: ``save_pretrained`` directories and bare safetensors/.bin files with PEFT keys.

Key conventions (peft 0.21, ``get_peft_model_state_dict``): ``base_model.model.<module>.<suffix>`` with
the adapter name removed. Scale and pattern rules follow ``peft.tuners.lora`` (see
``../shared/docs/formats.md``): s = α/r or α/√r (rsLoRA); r and α per module via ``rank_pattern`` /
``alpha_pattern`` matched with ``peft.utils.other.get_pattern_key``; AdaLoRA s = α/(r + 1e-5).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from ..adapter import ORIENT_EMBEDDING, ORIENT_PEFT, Adapter
from ..errors import InspectError
from .common import build_module, group_keys, pattern_lookup
from .tensors import TensorSource

__all__ = ["read_peft", "read_config", "PEFT_PREFIX", "PEFT_SUFFIXES", "looks_like_peft"]

PEFT_PREFIX = "base_model.model."
PEFT_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "A",
    ".lora_embedding_B": "B",
    ".lora_magnitude_vector": "m",
    ".lora_magnitude_vector.weight": "m",
    ".lora_A": "A",  # AdaLoRA (parameters, no .weight)
    ".lora_B": "B",
    ".lora_E": "E",
}
LOW_RANK_TYPES = {"LORA", "ADALORA"}
PEFT_DEFAULT_ALPHA = 8  # peft.LoraConfig.lora_alpha (AdaLoraConfig inherits it)


def looks_like_peft(keys: list[str]) -> bool:
    return any(k.endswith((".lora_A.weight", ".lora_embedding_A", ".lora_A")) for k in keys)


def read_config(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InspectError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise InspectError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from e
    if not isinstance(cfg, dict):
        raise InspectError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
    return cfg


def _num(cfg: dict, field: str, path: Path, default=None):
    v = cfg.get(field, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InspectError(f"{path}: {field} must be a number, found {v!r}")
    return v


def _pattern(cfg: dict, field: str, path: Path) -> dict:
    v = cfg.get(field) or {}
    if not isinstance(v, dict):
        raise InspectError(f"{path}: {field} must be an object mapping module patterns to values")
    return v


def read_peft(
    source: TensorSource,
    *,
    path: Path,
    config: dict[str, Any] | None,
    config_path: Path | None,
    fmt: str,
) -> Adapter:
    """Build an Adapter from PEFT-keyed tensors and (optionally) the adapter_config.json."""
    notes: list[str] = []
    cfg_where = config_path or path
    peft_type = None
    if config is not None:
        peft_type = str(config.get("peft_type", "LORA")).upper()
        if peft_type not in LOW_RANK_TYPES:
            raise InspectError(
                f"{cfg_where}: peft_type {peft_type} is not a low-rank LoRA adapter (lora-inspect reads LORA and ADALORA)"
            )
    else:
        # bare file: the metadata may carry a PEFT config (diffusers' lora_adapter_metadata)
        raw = source.metadata.get("lora_adapter_metadata")
        if raw:
            try:
                config = json.loads(raw)
                notes.append("config read from the safetensors header (lora_adapter_metadata)")
            except json.JSONDecodeError as e:
                raise InspectError(f"{path}: header entry lora_adapter_metadata is not valid JSON ({e.msg})") from e
            if not isinstance(config, dict):
                raise InspectError(f"{path}: header entry lora_adapter_metadata is not a JSON object")
    cfg = config or {}
    adalora = str(cfg.get("peft_type", "")).upper() == "ADALORA" or any(k.endswith(".lora_E") for k in source.keys())
    if adalora:
        peft_type = "ADALORA"
    rslora = bool(cfg.get("use_rslora", False))
    r_cfg = _num(cfg, "r", cfg_where)
    if adalora:
        r_cfg = _num(cfg, "init_r", cfg_where, r_cfg)
    alpha_cfg = _num(cfg, "lora_alpha", cfg_where)
    if alpha_cfg is None and config_path is not None:  # PEFT builds LoraConfig(**json): its default applies
        alpha_cfg = PEFT_DEFAULT_ALPHA
        notes.append(f"{config_path.name} has no lora_alpha: PEFT's default {PEFT_DEFAULT_ALPHA} applies")
    if alpha_cfg is None:
        for k in ("lora_alpha", "alpha"):
            if k in source.metadata:
                try:
                    alpha_cfg = float(source.metadata[k])
                    notes.append(f"alpha {alpha_cfg:g} read from the safetensors header entry {k!r}")
                    break
                except ValueError:
                    pass
    rank_pattern = {} if adalora else _pattern(cfg, "rank_pattern", cfg_where)
    alpha_pattern = _pattern(cfg, "alpha_pattern", cfg_where)

    keys = source.keys()
    if not keys:
        raise InspectError(f"{source.path}: the file holds no tensors")
    groups, rest = group_keys(keys, PEFT_SUFFIXES)
    if not groups:
        raise InspectError(
            f"{source.path}: no LoRA factor pairs found (expected keys ending in .lora_A.weight / .lora_B.weight)"
        )
    modules = []
    unknown_alpha = False
    prefixed = 0
    for raw_name in sorted(groups):
        roles = groups[raw_name]
        name = raw_name[len(PEFT_PREFIX) :] if raw_name.startswith(PEFT_PREFIX) else raw_name
        prefixed += raw_name.startswith(PEFT_PREFIX)
        orient = ORIENT_EMBEDDING if roles.get("A", "").endswith("lora_embedding_A") else ORIENT_PEFT
        if adalora:
            alpha = alpha_cfg if alpha_cfg else None  # AdaLoRA: scaling = α if α > 0 else r
        else:
            alpha = pattern_lookup(alpha_pattern, name, alpha_cfg)
        mod, known = build_module(name, roles, source, orient=orient, alpha=alpha, rslora=rslora, adalora=adalora)
        unknown_alpha |= not known
        if r_cfg is not None and not adalora:
            want = pattern_lookup(rank_pattern, name, r_cfg)
            if want != mod.rank and cfg.get("target_parameters") and mod.rank % want == 0:
                # peft ParamWrapper: lora_A (r·experts, in), lora_B (out, r·experts) — a valid adapter, not ours
                raise InspectError(
                    f"module {name!r}: stored rank {mod.rank} = r {want} × {mod.rank // want} experts — adapters on "
                    f"target_parameters ({', '.join(map(str, cfg['target_parameters']))}: MoE expert weights) are "
                    "not supported"
                )
            if want != mod.rank:
                raise InspectError(
                    f"module {name!r}: stored rank {mod.rank} but the config gives r={want}"
                    + (" (rank_pattern)" if want != r_cfg else "")
                    + " — PEFT would refuse to load it with a size mismatch"
                )
        modules.append(mod)
    if unknown_alpha:
        notes.append("alpha unknown (no config, no header entry): assumed α = r, scale 1")
    if prefixed and prefixed < len(groups):
        notes.append(f"{len(groups) - prefixed} modules lack the {PEFT_PREFIX!r} prefix the others have")
    elif not prefixed and fmt.startswith("peft") and config is not None:
        notes.append(f"keys lack the {PEFT_PREFIX!r} prefix: PEFT would load this adapter as a silent no-op")

    ranks = Counter(m.rank for m in modules)
    use_dora = bool(cfg.get("use_dora", False)) or any(m.is_dora for m in modules)
    return Adapter(
        path=path,
        format=fmt,
        weights_path=source.path,
        source=source,
        modules=modules,
        extras=sorted(rest),
        config=config,
        config_path=config_path,
        peft_type=peft_type or ("LORA" if config is not None else None),
        r=int(r_cfg) if r_cfg is not None else ranks.most_common(1)[0][0],
        alpha=float(alpha_cfg) if alpha_cfg is not None else None,
        use_rslora=rslora,
        use_dora=use_dora,
        base_model=cfg.get("base_model_name_or_path"),
        target_modules=cfg.get("target_modules"),
        notes=notes,
    )
