"""Stable Diffusion adapters: kohya / sd-scripts files and diffusers ``pytorch_lora_weights`` files.

kohya (sd-scripts ``networks/lora.py``): ``lora_unet_…`` / ``lora_te[12]_…`` + ``.lora_down.weight``
(r, in[, kh, kw]), ``.lora_up.weight`` (out, r[, 1, 1]), ``.alpha`` (scalar); ΔW = (α/r)·up@down, a
missing or zero alpha meaning α = r. diffusers: ``unet.`` / ``text_encoder.`` / ``transformer.`` +
``.lora_A.weight`` / ``.lora_B.weight`` (older ``.lora.down/.lora.up``), alphas from ``.alpha`` keys or a
PEFT config in the ``lora_adapter_metadata`` header entry, else α = r.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ..adapter import Adapter
from ..errors import InspectError
from .common import build_module, group_keys, pattern_lookup
from .tensors import TensorSource

__all__ = ["read_kohya", "read_diffusers", "looks_like_kohya", "looks_like_diffusers", "KOHYA_PREFIXES"]

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_transformer_")
KOHYA_SUFFIXES = {".lora_down.weight": "A", ".lora_up.weight": "B", ".alpha": "alpha"}
LYCORIS_MARKERS = (".hada_w1_a", ".lokr_w1", ".lokr_w1_a", ".oft_diag", ".oft_blocks", ".a1.weight")
DIFFUSERS_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.", "text_encoder_3.", "transformer.", "prior.")
DIFFUSERS_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "bias",
    ".lora.down.weight": "A",
    ".lora.up.weight": "B",
    "_lora.down.weight": "A",
    "_lora.up.weight": "B",
    ".lora_magnitude_vector": "m",
    ".alpha": "alpha",
}


def _check_lycoris(source: TensorSource) -> None:
    for k in source.keys():
        if any(m in k for m in LYCORIS_MARKERS):
            raise InspectError(
                f"{source.path}: {k!r} is a LyCORIS (LoHa/LoKr/OFT) tensor; only plain LoRA (lora_down/lora_up) is supported"
            )


def looks_like_kohya(keys: list[str]) -> bool:
    return any(k.startswith(KOHYA_PREFIXES) for k in keys)


def looks_like_diffusers(keys: list[str]) -> bool:
    return any(k.startswith(DIFFUSERS_PREFIXES) and (".lora" in k or "_lora." in k) for k in keys)


def _finish(path, fmt, source, modules, rest, notes, config=None) -> Adapter:
    if not modules:
        raise InspectError(f"{source.path}: no LoRA factor pairs found")
    ranks = Counter(m.rank for m in modules)
    alphas = Counter(m.alpha for m in modules)
    return Adapter(
        path=path,
        format=fmt,
        weights_path=source.path,
        source=source,
        modules=modules,
        extras=sorted(rest),
        config=config,
        r=ranks.most_common(1)[0][0],
        alpha=alphas.most_common(1)[0][0] if len(alphas) == 1 else None,
        use_dora=any(m.is_dora for m in modules),
        base_model=source.metadata.get("ss_sd_model_name") or source.metadata.get("ss_base_model_version"),
        notes=notes,
    )


def read_kohya(source: TensorSource, path: Path) -> Adapter:
    _check_lycoris(source)
    groups, rest = group_keys(source.keys(), KOHYA_SUFFIXES)
    modules, notes, missing = [], [], 0
    for name in sorted(groups):
        mod, known = build_module(name, groups[name], source)
        missing += not known
        modules.append(mod)
    if missing:
        notes.append(f"{missing} modules have no .alpha tensor: α = r (scale 1) assumed, as kohya does")
    return _finish(path, "kohya", source, modules, rest, notes)


def read_diffusers(source: TensorSource, path: Path) -> Adapter:
    _check_lycoris(source)
    config = None
    raw = source.metadata.get("lora_adapter_metadata")
    if raw:
        try:
            config = json.loads(raw)
        except json.JSONDecodeError as e:
            raise InspectError(f"{source.path}: header entry lora_adapter_metadata is not valid JSON ({e.msg})") from e
        if not isinstance(config, dict):
            raise InspectError(f"{source.path}: header entry lora_adapter_metadata is not a JSON object")
    groups, rest = group_keys(source.keys(), DIFFUSERS_SUFFIXES)
    modules, notes, missing = [], [], 0
    for name in sorted(groups):
        roles = groups[name]
        alpha = None
        rslora = False
        if config and "alpha" not in roles:
            comp, _, inner = name.partition(".")
            # diffusers packs per-component configs as "<component>.<field>"; a plain PEFT config applies to all
            cfg = {k[len(comp) + 1 :]: v for k, v in config.items() if k.startswith(comp + ".")} or config
            if "lora_alpha" in cfg:
                alpha = pattern_lookup(cfg.get("alpha_pattern") or {}, inner, cfg["lora_alpha"])
                rslora = bool(cfg.get("use_rslora", False))
        mod, known = build_module(name, roles, source, alpha=alpha, rslora=rslora)
        missing += not known
        modules.append(mod)
    if missing:
        notes.append(f"{missing} modules have no alpha (.alpha key or lora_adapter_metadata): α = r assumed")
    return _finish(path, "diffusers", source, modules, rest, notes, config)
