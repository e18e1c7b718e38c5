"""Writers from the canonical form (:mod:`lora_inspect.convert.canon`) to each layout.

Each writer returns :class:`Written`: files to create (name → tensors / JSON text) and what it did
per module. How each stores the scale s (docs/formats.md, "convert", capability matrix):

- ``peft``: α per module, α_m = s_m·r_m (rsLoRA: α·√r, written with use_rslora false), patterns with
  the full escaped module path (``peft.utils.other.get_pattern_key``); nothing baked.
- ``kohya``: ``.alpha`` = s·r per module (fp32 scalar), nothing baked.
- ``diffusers``: s baked into ``lora_B`` (no α anywhere ⇒ α = r, s = 1: ``diffusers · get_peft_kwargs``).
- ``mlx``: one absolute ``scale`` (the common s, else 1) with any other s baked into B; one rank
  (zero-padded: padded rows/columns add nothing to B@A); factors transposed (``mlx_lm/tuner/lora.py``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InspectError
from ..peft_rules import PEFT_PREFIX
from .canon import Canon, CanonModule, times
from .names import kohya_names
from .results import ModuleOut

__all__ = ["Written", "write_peft", "write_kohya", "write_diffusers", "write_mlx", "WRITERS", "refuse", "record"]


@dataclass
class Written:
    tensors: dict[str, torch.Tensor]
    weights_name: str | None  # None: a single file at OUT
    config: dict[str, Any] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    records: list[ModuleOut] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def refuse(target: str, m: CanonModule, why: str) -> InspectError:
    return InspectError(f"module {m.source_name or m.name!r}: {target} cannot hold it: {why}")


_AS_LORA = {"locon": "LoCon Tucker core folded into A", "loha": "LoHa as its exact LoRA (rank r₁·r₂, face-split)",
            "lokr": "LoKr as its exact LoRA (rank = product of the factor ranks)",
            "full": "full ΔW as its exact LoRA (rank = min(out, in))"}


def record(m: CanonModule, target: str, k: int, how: list[str]) -> ModuleOut:
    pre = [_AS_LORA[m.algo]] if m.algo in _AS_LORA else []
    return ModuleOut(m.source_name or m.name, target, m.kind, m.shape, m.rank, k, m.scale, pre + how)


def _conv_shapes(m: CanonModule, k: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    out, inp = m.shape
    kh, kw = m.kernel or (1, 1)
    if m.conv_ndim == 3:
        return (k, inp // kh, kh), (out, k, 1)
    return (k, inp // (kh * kw), kh, kw), (out, k, 1, 1)


def _stored(m: CanonModule, b: torch.Tensor, a: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear (B, A) → stored (A, B) in PEFT/kohya orientation (conv reshaped)."""
    if m.kind == "conv":
        a_sh, b_sh = _conv_shapes(m, b.shape[1])
        a, b = a.reshape(a_sh), b.reshape(b_sh)
    return a.to(dtype).contiguous(), b.to(dtype).contiguous()


def _alpha(m: CanonModule) -> float:
    return m.scale * m.rank


def _single_model(canon: Canon, target: str) -> None:
    comps = {c for c in canon.components() if c is not None}
    if len(comps) > 1:
        raise InspectError(f"a {target} adapter holds one model; this one has modules of {', '.join(sorted(comps))} "
                           "(a pipeline): write diffusers or kohya instead")


def _peft_config(canon: Canon, r: int, alpha: float, rp: dict, ap: dict, targets: list[str], dora: bool) -> dict:
    src = canon.config or {}
    return {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "rank_pattern": rp, "alpha_pattern": ap,
        "target_modules": targets, "use_rslora": False, "use_dora": dora, "fan_in_fan_out": canon.fan_in_fan_out,
        "bias": "none", "lora_dropout": 0.0, "init_lora_weights": True, "inference_mode": True,
        "layers_to_transform": None, "layers_pattern": None, "modules_to_save": src.get("modules_to_save"),
        "task_type": src.get("task_type"), "base_model_name_or_path": canon.base_model or src.get("base_model_name_or_path"),
        "revision": src.get("revision"),
    }


def _peft_magnitude(m: CanonModule, dtype: torch.dtype) -> torch.Tensor:
    """PEFT's (and diffusers') DoRA magnitude: (out,) for linear, (1, out, 1, 1) for Conv2d, (1, out, 1) for
    Conv1d (``peft/tuners/lora/dora.py · _DoraConvNdLayer``: weight norm kept with keepdim)."""
    assert m.magnitude is not None
    shape = {3: (1, -1, 1), 4: (1, -1, 1, 1)}.get(m.conv_ndim, (1, -1, 1, 1)) if m.kind == "conv" else (-1,)
    return m.magnitude.reshape(shape).to(dtype).contiguous()


def _peft_module(m: CanonModule, dtype: torch.dtype, tensors: dict) -> None:
    key = PEFT_PREFIX + m.path
    if m.kind == "embedding":  # PEFT applies s·(B_st@A_st)ᵀ: A_st = Bᵀ (k, vocab), B_st = Aᵀ (dim, k)
        tensors[key + ".lora_embedding_A"] = m.b.T.to(dtype).contiguous()
        tensors[key + ".lora_embedding_B"] = m.a.T.to(dtype).contiguous()
        return
    a, b = _stored(m, m.b, m.a, dtype)
    tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = a, b
    if m.magnitude is not None:
        tensors[key + ".lora_magnitude_vector"] = _peft_magnitude(m, dtype)


def write_peft(canon: Canon, dtype: torch.dtype, extras: dict[str, torch.Tensor]) -> Written:
    _single_model(canon, "PEFT")
    if any(m.magnitude is not None and m.kind == "embedding" for m in canon.modules):
        raise InspectError("DoRA on an embedding is not written")
    tensors: dict[str, torch.Tensor] = {}
    records = []
    r = Counter(m.rank for m in canon.modules).most_common(1)[0][0]
    alpha = Counter(_alpha(m) for m in canon.modules).most_common(1)[0][0]
    rp, ap = {}, {}
    for m in canon.modules:
        _peft_module(m, dtype, tensors)
        if m.rank != r:
            rp[re.escape(m.path)] = m.rank
        if _alpha(m) != alpha:
            ap[re.escape(m.path)] = _alpha(m)
        how = ["α kept" if not m.rslora else "rsLoRA: α·√r written (use_rslora off)"]
        records.append(record(m, PEFT_PREFIX + m.path, m.rank, how))
    tensors.update(extras)
    dora = any(m.magnitude is not None for m in canon.modules)
    targets = sorted({m.path for m in canon.modules})
    cfg = _peft_config(canon, r, alpha, rp, ap, targets, dora)
    return Written(tensors, "adapter_model.safetensors", cfg, {"format": "pt"}, records)


def write_kohya(canon: Canon, dtype: torch.dtype, extras: dict[str, torch.Tensor], unet_names: str = "auto") -> Written:
    """``unet_names``: auto | sgm | diffusers (:func:`lora_inspect.convert.names.kohya_names`)."""
    tensors: dict[str, torch.Tensor] = {}
    records = []
    for m in canon.modules:
        if m.magnitude is not None:
            raise refuse("kohya", m, "DoRA magnitudes (kohya's dora_scale axis is ambiguous)")
        if m.kind == "embedding":
            raise refuse("kohya", m, "embedding LoRA has no kohya form")
    names, notes = kohya_names(canon, unet_names)
    for m, name in zip(canon.modules, names):
        a, b = _stored(m, m.b, m.a, dtype)
        tensors[name + ".lora_down.weight"], tensors[name + ".lora_up.weight"] = a, b
        tensors[name + ".alpha"] = torch.tensor(_alpha(m), dtype=torch.float32)
        records.append(record(m, name, m.rank, ["α = s·r stored (fp32)"]))
    return Written(tensors, None, None, {}, records, notes)


def write_diffusers(canon: Canon, dtype: torch.dtype, extras: dict[str, torch.Tensor]) -> Written:
    tensors: dict[str, torch.Tensor] = {}
    records = []
    for m in canon.modules:
        if m.component is None:
            raise refuse("diffusers", m, "diffusers files name a pipeline component (unet, transformer, "
                         "text_encoder …) and this module has none: name it, or write peft")
        if m.kind == "embedding":
            raise refuse("diffusers", m, "embedding LoRA is not written to diffusers files")
        a, b = _stored(m, times(m.b, m.scale), m.a, dtype)
        key = m.name
        tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = a, b
        if m.magnitude is not None:
            tensors[key + ".lora_magnitude_vector"] = _peft_magnitude(m, dtype)
        how = [] if m.scale == 1.0 else [f"s = {m.scale:.6g} baked into B (no α: s = 1)"]
        records.append(record(m, key, m.rank, how))
    return Written(tensors, None, None, {}, records)


_LAYER = re.compile(r"^(?:model\.)?layers\.\d+\.")


def _mlx_keys(paths: list[str]) -> list[str]:
    keys = set()
    for p in paths:
        mt = _LAYER.match(p)
        keys.add(p[mt.end():] if mt else p)
    return sorted(keys)


def _mlx_dora(canon: Canon) -> bool:
    """mlx-lm's ``fine_tune_type: dora`` makes every adapted layer a DoRALinear (``mlx_lm/tuner/dora.py``:
    W′ = m/‖W + s·BA‖_row · (W + s·BA), PEFT's formula), so DoRA is all modules or none."""
    dora = [m.magnitude is not None for m in canon.modules]
    if any(dora) and not all(dora):
        m = canon.modules[dora.index(False)]
        raise refuse("mlx-lm", m, "it has no DoRA magnitude while other modules do (mlx-lm's fine_tune_type dora "
                     "applies to every adapted layer)")
    return all(dora)


def write_mlx(canon: Canon, dtype: torch.dtype, extras: dict[str, torch.Tensor]) -> Written:
    _single_model(canon, "mlx-lm")
    for m in canon.modules:
        if m.kind != "linear":
            raise refuse("mlx-lm", m, f"{m.kind} LoRA (mlx-lm adapts Linear layers here)")
    dora = _mlx_dora(canon)
    rank = max(m.rank for m in canon.modules)
    scales = Counter(m.scale for m in canon.modules)
    scale = scales.most_common(1)[0][0] if len(scales) == 1 else 1.0
    tensors: dict[str, torch.Tensor] = {}
    records = []
    for m in canon.modules:
        f = m.scale / scale
        b, a = times(m.b, f), m.a
        if m.rank < rank:  # zero rows/columns add nothing to B@A
            b = torch.cat([b.double(), b.new_zeros(m.shape[0], rank - m.rank, dtype=torch.float64)], dim=1)
            a = torch.cat([a.double(), a.new_zeros(rank - m.rank, m.shape[1], dtype=torch.float64)], dim=0)
        tensors[m.path + ".lora_a"] = a.T.to(dtype).contiguous()
        tensors[m.path + ".lora_b"] = b.T.to(dtype).contiguous()
        if m.magnitude is not None:
            tensors[m.path + ".m"] = m.magnitude.reshape(-1).to(dtype).contiguous()
        how = [] if f == 1.0 else [f"s = {m.scale:.6g} baked into B (scale {scale:g})"]
        if m.rank < rank:
            how.append(f"zero-padded {m.rank} → {rank}")
        records.append(record(m, m.path, rank, how))
    cfg = {"fine_tune_type": "dora" if dora else "lora", "num_layers": -1, "model": canon.base_model,
           "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": _mlx_keys([m.path for m in canon.modules])}}
    notes = ["num_layers = -1 (every layer): layers without tensors here keep lora_b = 0, i.e. ΔW = 0"]
    return Written(tensors, "adapters.safetensors", cfg, {}, records, notes)


WRITERS = {"peft": write_peft, "kohya": write_kohya, "diffusers": write_diffusers, "mlx": write_mlx}
