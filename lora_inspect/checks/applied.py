"""``check --applied ENGINE ADAPTER``: a dry run of the engine's own key mapping. Per module: applied,
dropped silently, refused (the whole load fails), skipped on purpose, or unverified; in total the share of
‖ΔW‖²_F that lands on real model weights (float64, from each module's exact spectrum). The rules are in
:mod:`.applied_rules` (sources in docs/serving.md); the model's names come from ``--base`` (a base
checkpoint's weights) or, without it, from the architecture's known names.

Policy: the report fails (``ok`` false: ``check`` exits 1) when any module is dropped silently or refused;
unverified modules do not fail it, they are said, and the applied share is then a lower bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InspectError
from .applied_rules import (
    Fate,
    Names,
    Verdict,
    comfy_verdict,
    gguf_verdict,
    known_names,
    mlx_verdict,
    names_verdict,
    peft_verdicts,
)
from .serving import LORAX_TARGETS, extra_module

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import Adapter, Module
    from ..basecheckpoint import BaseCheckpoint

__all__ = ["Fate", "ModuleFate", "AppliedReport", "applied_report"]


@dataclass
class ModuleFate:
    name: str  # as the adapter names it (a tensor key for keys that belong to no module)
    fate: Fate
    reason: str
    energy: float | None  # ‖ΔW‖²_F (None: unknown, a full tensor)
    engine_name: str = ""


@dataclass
class AppliedReport:
    engine: str
    adapter: str
    against: str  # what the names were checked against
    modules: list[ModuleFate] = field(default_factory=list)

    def _sum(self, fates: tuple[Fate, ...]) -> float:
        return sum(m.energy or 0.0 for m in self.modules if m.fate in fates)

    @property
    def total_energy(self) -> float:
        return self._sum(tuple(Fate))

    @property
    def applied_share(self) -> float:
        """Share of ‖ΔW‖² on real weights (unverified modules not counted: a lower bound then)."""
        t = self.total_energy
        if any(m.fate == Fate.REFUSED for m in self.modules):
            return 0.0  # the engine refuses the adapter: nothing is applied
        return 1.0 if not t > 0 else self._sum((Fate.APPLIED,)) / t

    def named(self, fate: Fate) -> list[ModuleFate]:
        return [m for m in self.modules if m.fate == fate]

    @property
    def ok(self) -> bool:
        return not self.named(Fate.DROPPED) and not self.named(Fate.REFUSED)


def _energy(m: "Module") -> float | None:
    """‖ΔW‖²_F from the exact spectrum; a GGUF's Q/K pair (rows permuted until --base un-permutes them) from its
    stored factors: a row permutation leaves the singular values unchanged."""
    from ..adapter import LowRankUpdate
    from ..spectrum import singular_values

    try:
        b, a = m.factors(np.float64)
    except (InspectError, ValueError, NotImplementedError):
        u = m.update
        if not isinstance(u, LowRankUpdate):
            return None
        a, b = (m.source.get(k).astype(np.float64).reshape(m.source.get(k).shape[0], -1) for k in (u.a_key, u.b_key))
        if b.shape[1] != a.shape[0]:
            b, a = b.T, a.T
        if b.shape[1] != a.shape[0]:
            return None
    return float((singular_values(b, a, m.scale) ** 2).sum())


def _names(ad: "Adapter", base: "BaseCheckpoint | None") -> Names:
    if base is None:
        return known_names([m.name for m in ad.modules], ad.base_model)
    exact, sfx = set(), set()
    for key, (p, file_key) in base.files.items():
        if key.endswith(".weight") and len(base.source(p).tensors[file_key].shape) >= 2:
            exact.add(key[: -len(".weight")])
            sfx.add(key[: -len(".weight")].rsplit(".", 1)[-1])
    return Names(frozenset(exact), base.model_type, f"the weights of {base.path}", frozenset(sfx))


def _peft(engine: str, ad: "Adapter", names: Names) -> dict[str, Verdict]:
    saved = (ad.config or {}).get("modules_to_save") or []
    out = peft_verdicts(ad.source.keys(), names, saved, engine)
    if engine == "lorax":
        fam = "gpt2" if names.family == "gpt2" else "llama"
        for mod, v in out.items():
            if v.fate == Fate.APPLIED and mod.rsplit(".", 1)[-1] not in LORAX_TARGETS[fam]:
                out[mod] = Verdict(Fate.DROPPED, "not a LoRAX target module: ignored with a warning", mod)
    return out


def _per_module(engine: str, ad: "Adapter", base: "BaseCheckpoint | None", names: Names) -> dict[str, Verdict]:
    if engine == "mlx-lm":
        lp = (ad.config or {}).get("lora_parameters") or {}
        nl = (ad.config or {}).get("num_layers")
        n_layers = len({n.split(".")[2] for n in (names.exact or ()) if n.startswith("model.layers.")}) or None
        return {m.name: mlx_verdict(m.name, lp.get("keys"), nl if isinstance(nl, int) else None, n_layers, names)
                for m in ad.modules}
    if engine == "llama.cpp":  # the tensor names in the file (the reader reports the Hugging Face names)
        return {m.name: gguf_verdict(m.a_key.removesuffix(".lora_a")) for m in ad.modules}
    if engine == "comfyui":
        return {m.name: comfy_verdict(m.name, base.key_for(m.name) if base else None, base is not None)
                for m in ad.modules}
    out = {}
    for m in ad.modules:  # diffusers: the module's pipeline name against the base's weights
        comp, path = ad.layout.canonical_name(m) if ad.layout is not None else (None, m.name)
        full = f"{comp}.{path}" if comp else path
        out[m.name] = names_verdict(full, names, engine) if base is not None else Verdict(
            Fate.UNVERIFIED, "no --base: the pipeline's names are not checked", full)
    return out


def applied_report(engine: str, ad: "Adapter", base: "BaseCheckpoint | None" = None) -> AppliedReport:
    """What ``engine`` (a :data:`lora_inspect.fit.ENGINE_NAMES` name) applies of ``ad``."""
    names = _names(ad, base)
    peft_like = engine in ("vllm", "lorax", "sglang", "ollama")
    verdicts = _peft(engine, ad, names) if peft_like else _per_module(engine, ad, base, names)
    energies = {m.name: _energy(m) for m in ad.modules}
    mods = []
    for name, v in verdicts.items():
        e = energies.get(name)
        if name not in energies:  # a key of no module: a full tensor (energy unknown)
            e = None
        mods.append(ModuleFate(name, v.fate, v.reason, e, v.engine_name))
    seen = set(verdicts)
    for key in ad.extras:
        mod = extra_module(key)
        if key not in seen and mod not in seen and not peft_like:
            mods.append(ModuleFate(key, Fate.DROPPED, f"a full tensor: {engine} loads LoRA pairs only", None))
    return AppliedReport(engine, str(ad.path), names.source, mods)
