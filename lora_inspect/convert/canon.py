"""The canonical in-memory form of an adapter, the same for every layout (docs/formats.md, "convert").

Per module: its canonical name (component, dotted path; :mod:`lora_inspect.convert.names`), kind,
B (out × k) and A (k × in·kh·kw) in linear orientation and float64, the true scale s (ΔW = s·B@A:
α/r, α/√r with rsLoRA, mlx-lm's absolute scale, AdaLoRA's α/(r + 1e-5) with E folded into A), the
conv kernel, a DoRA magnitude, and where it came from. Writers decide how to store s (an α per
module, a global α with the rest baked into B, or all of it baked into B).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..errors import InspectError
from .names import full_name, kohya_to_dotted, split_component

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import Adapter, Module

__all__ = ["CanonModule", "Canon", "from_adapter"]


@dataclass
class CanonModule:
    component: str | None
    path: str
    kind: str  # "linear" | "conv" | "embedding"
    b: torch.Tensor  # (out, k) float64
    a: torch.Tensor  # (k, in·kh·kw) float64
    scale: float
    kernel: tuple[int, int] | None = None
    conv_ndim: int = 4  # stored A dims for a conv (3 = Conv1d, 4 = Conv2d)
    magnitude: torch.Tensor | None = None
    source_name: str = ""
    alpha: float | None = None  # the source's α (s = α/r or α/√r) where one was stored
    rslora: bool = False

    @property
    def name(self) -> str:
        return full_name(self.component, self.path)

    @property
    def rank(self) -> int:
        return int(self.b.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.b.shape[0]), int(self.a.shape[1])

    def delta(self) -> torch.Tensor:
        """Dense ΔW (tests and small modules only)."""
        return self.scale * (self.b @ self.a)


@dataclass
class Canon:
    """A whole adapter in canonical form."""

    modules: list[CanonModule]
    source_format: str
    base_model: str | None = None
    fan_in_fan_out: bool = False
    config: dict | None = None  # the source PEFT config (task_type, target_modules …), if any
    extras: list[str] = field(default_factory=list)  # full tensors of the source (modules_to_save …)
    notes: list[str] = field(default_factory=list)

    def components(self) -> set[str | None]:
        return {m.component for m in self.modules}


def _name(ad: "Adapter", m: "Module") -> tuple[str | None, str]:
    if ad.format == "kohya":
        return kohya_to_dotted(m.name)
    if ad.format.startswith("diffusers"):
        return split_component(m.name)
    return None, m.name  # one model (PEFT, mlx-lm): GPT-2's "transformer.h.0…" is a path, not a component


def _module(ad: "Adapter", m: "Module") -> CanonModule:
    if m.bias_key is not None:
        raise InspectError(f"{ad.path}: module {m.name!r} has a LoRA bias (lora_bias): convert and merge do not carry "
                           "it yet")
    b, a = m.factors(torch.float64)
    comp, path = _name(ad, m)
    ndim = len(m.source.info(m.a_key).shape) if m.kind == "conv" else 4
    rs = bool(ad.use_rslora)
    return CanonModule(comp, path, m.kind, b, a, float(m.scale), m.kernel, ndim, m.magnitude(), m.name,
                       float(m.alpha), rs)


def from_adapter(ad: "Adapter") -> Canon:
    """Read every module's factors (float64) into the canonical form."""
    if ad.peft_type not in (None, "LORA", "ADALORA"):
        raise InspectError(f"{ad.path}: peft_type {ad.peft_type}: only LoRA adapters are converted")
    mods = [_module(ad, m) for m in ad.modules]
    for m in mods:
        if not (torch.isfinite(m.b).all() and torch.isfinite(m.a).all()):
            raise InspectError(f"{ad.path}: module {m.source_name!r} holds NaN or inf")
    seen: dict[str, str] = {}
    for m in mods:
        if m.name in seen:
            raise InspectError(f"{ad.path}: modules {seen[m.name]!r} and {m.source_name!r} map to the same name "
                               f"{m.name!r}")
        seen[m.name] = m.source_name
    cfg = ad.config if ad.format.startswith("peft") else None
    fifo = bool(cfg.get("fan_in_fan_out")) if isinstance(cfg, dict) else False
    notes = []
    if ad.peft_type == "ADALORA":
        notes.append("AdaLoRA: lora_E folded into A and s = α/(r + 1e-5) kept exactly; written as plain LoRA")
    return Canon(mods, ad.format, ad.base_model, fifo, cfg, list(ad.extras), notes)
