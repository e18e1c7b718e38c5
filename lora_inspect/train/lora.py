"""Plain LoRA: ``y = W x + s · B A dropout(x)``.

- LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685),
  eq. (3): h = W₀x + ΔWx = W₀x + BAx with B ∈ ℝ^{out×r}, A ∈ ℝ^{r×in}, and ΔW scaled by α/r (§4.1).
  A starts random, B starts at zero, so ΔW = 0 at step 0.
- rsLoRA: Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA"
  (arXiv:2312.03732): scale α/√r keeps the update's magnitude stable as r grows.
- Initialisation as in PEFT (``peft/tuners/lora/layer.py``, ``reset_lora_parameters``):
  ``kaiming_uniform_(A, a=√5)`` — i.e. U(-1/√in, 1/√in), nn.Linear's default — and ``B = 0``.
- Module matching as in PEFT (``peft/tuners/tuners_utils.py``, ``check_target_module_exists``):
  a string target is a regular expression that must ``re.fullmatch`` the module path; a list
  matches a path equal to an entry or ending with ``"." + entry``.
- Saved layout as in PEFT (``peft/utils/save_and_load.py``): keys
  ``base_model.model.<path>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r) in
  ``adapter_model.safetensors`` with metadata ``{"format": "pt"}``, next to ``adapter_config.json``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import InspectError
from ..peft_rules import PEFT_PREFIX
from .io import atomic_save_safetensors, atomic_write_json

__all__ = [
    "LoRALinear",
    "lora_scale",
    "target_matches",
    "inject_lora",
    "mark_only_lora_trainable",
    "lora_modules",
    "lora_state_dict",
    "merge",
    "save_adapter",
]


def lora_scale(r: int, alpha: float, rslora: bool = False) -> float:
    """α/r (Hu et al. 2021) or α/√r for rsLoRA (Kalajdzievski 2023)."""
    if r <= 0:
        raise InspectError(f"rank must be positive, got {r}")
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoRALinear(nn.Module):
    """Wraps a frozen ``nn.Linear``: forward(x) = base(x) + s · lora_B(lora_A(dropout(x)))."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise InspectError(f"LoRA wraps nn.Linear only, got {type(base).__name__}")
        self.base = base
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scale = lora_scale(r, alpha, rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base.weight
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=w.device, dtype=w.dtype)  # weight (r, in)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=w.device, dtype=w.dtype)  # weight (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # so code that reads `.weight` still sees the base weight
        return self.base.weight

    def delta(self) -> torch.Tensor:
        """ΔW = s · B @ A, shape (out, in)."""
        return self.scale * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., in) → (..., out)
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scale


def target_matches(name: str, targets: str | Iterable[str]) -> bool:
    """PEFT's rule: str → ``re.fullmatch``; list → equal, or endswith ``"." + entry``."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_lora(
    model: nn.Module,
    targets: str | Iterable[str],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    rslora: bool = False,
) -> list[str]:
    """Replace every matching ``nn.Linear`` by a :class:`LoRALinear`; return the wrapped paths.

    Also freezes everything except the adapter (:func:`mark_only_lora_trainable`).
    """
    if not isinstance(targets, str):
        targets = list(targets)
        if not targets:
            raise InspectError("no target modules given")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n and target_matches(n, targets)]
    if not names:
        raise InspectError(f"no nn.Linear module matches targets {targets!r}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout, rslora))
    mark_only_lora_trainable(model)
    return names


def mark_only_lora_trainable(model: nn.Module) -> None:
    for n, p in model.named_parameters():
        p.requires_grad = ".lora_A." in n or ".lora_B." in n or n.startswith(("lora_A.", "lora_B."))


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """path → LoRALinear, in model order (paths are those of the wrapped nn.Linear)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter in PEFT's key layout (CPU, contiguous)."""
    out = {}
    for n, m in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{n}.lora_A.weight"] = m.lora_A.weight.detach().cpu().contiguous()
        out[f"{PEFT_PREFIX}{n}.lora_B.weight"] = m.lora_B.weight.detach().cpu().contiguous()
    return out


def merge(base_sd: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict with ``W ← W + ΔW`` for every ``path`` in ``deltas`` (key ``path.weight``).

    The sum is done in float64 and cast back to the base weight's dtype.
    """
    out = dict(base_sd)
    for path, d in deltas.items():
        key = f"{path}.weight"
        if key not in base_sd:
            raise InspectError(f"adapter module {path!r} is not a module of the base model")
        w = base_sd[key]
        if tuple(w.shape) != tuple(d.shape):
            raise InspectError(f"adapter module {path!r}: ΔW shape {tuple(d.shape)} does not match weight {tuple(w.shape)}")
        out[key] = (w.double() + d.to(device=w.device, dtype=torch.float64)).to(w.dtype)
    return out


def adapter_config(
    *,
    r: int,
    alpha: float,
    targets: str | Iterable[str],
    dropout: float = 0.0,
    rslora: bool = False,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> dict:
    """``adapter_config.json`` with the keys PEFT writes for a plain LoRA (sorted on save)."""
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_bias": False,
        "lora_dropout": dropout,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": targets if isinstance(targets, str) else sorted(set(targets)),
        "task_type": task_type,
        "use_dora": False,
        "use_rslora": rslora,
    }


def save_adapter(model: nn.Module, out_dir: str | Path, config: dict) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` at the top of ``out_dir``."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    sd = lora_state_dict(model)
    if not sd:
        raise InspectError("model has no LoRA modules to save")
    atomic_save_safetensors(sd, d / "adapter_model.safetensors", metadata={"format": "pt"})
    atomic_write_json(config, d / "adapter_config.json")
    return d
