"""``check --applied ENGINE ADAPTER``: a dry run of the engine's own key mapping. Per module: applied,
dropped silently, refused (the whole load fails), skipped on purpose, or unverified; in total the share of
‖ΔW‖²_F that lands on real model weights (float64, from each module's exact spectrum). The rules are in
:mod:`.applied_rules` (sources in docs/serving.md); the model's names come from ``--base`` (a base
checkpoint's weights) or, without it, from the architecture's known names.

diffusers: when diffusers (and peft) import, the adapter goes through diffusers' own converters and loader
renaming (:mod:`.applied_diffusers`); without them, the key rules, and the report says so.

Policy: the report fails (``ok`` false: ``check`` exits 1) when any module is dropped silently, refused or
altered (loaded otherwise than the file says); unverified modules do not fail it, they are said, and the
applied share is then a lower bound.
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
    from .applied_diffusers import BaseNames, Converted, LoadedModule

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
        """Share of ‖ΔW‖² on real weights as the file says (unverified and altered modules not counted)."""
        t = self.total_energy
        if any(m.fate == Fate.REFUSED for m in self.modules):
            return 0.0  # the engine refuses the adapter: nothing is applied
        return 1.0 if not t > 0 else self._sum((Fate.APPLIED,)) / t

    def named(self, fate: Fate) -> list[ModuleFate]:
        return [m for m in self.modules if m.fate == fate]

    @property
    def ok(self) -> bool:
        return not any(self.named(f) for f in (Fate.DROPPED, Fate.REFUSED, Fate.ALTERED))


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


def _comfy_key(name: str, base: "BaseCheckpoint") -> str | None:
    """The base weight a ComfyUI key names. ComfyUI's CLIP always has ``text_model`` (``clip_l.transformer.
    text_model.…``), while a text encoder saved by transformers ≥ 5 stores its keys without it: both match."""
    key = base.key_for(name)
    if key is None and name.startswith("lora_te") and "_text_model_" in name:
        key = base.key_for(name.replace("_text_model_", "_", 1))
    return key


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
        return {m.name: comfy_verdict(m.name, _comfy_key(m.name, base) if base else None, base is not None)
                for m in ad.modules}
    out = {}
    for m in ad.modules:  # diffusers: the module's pipeline name against the base's weights
        comp, path = ad.layout.canonical_name(m) if ad.layout is not None else (None, m.name)
        full = f"{comp}.{path}" if comp else path
        if comp is not None and comp.startswith("text_encoder"):  # CLIP with or without text_model. (transformers 5)
            other = path.removeprefix("text_model.") if path.startswith("text_model.") else "text_model." + path
            full = next((n for n in (full, f"{comp}.{other}") if names.has(n)), full)
        out[m.name] = names_verdict(full, names, engine) if base is not None else Verdict(
            Fate.UNVERIFIED, "no --base: the pipeline's names are not checked", full)
    return out


# diffusers: what its conversion and loaders make of each source module (:mod:`.applied_diffusers`)
_STRENGTH_TOL = 1e-3  # relative, on ‖ΔW‖_F: float32 rounding in diffusers' converters stays far below it


def _shape_error(m: "LoadedModule", w: tuple[int, ...]) -> str | None:
    """PEFT's layer for a base weight ``w`` holds lora_A (r, in[, kh, kw]) and lora_B (out, r[, 1, 1])
    (``peft/tuners/lora/layer.py``: Linear, Conv2d); other shapes fail ``load_state_dict`` (size mismatch)."""
    a, b = m.tensors.get("lora_A.weight"), m.tensors.get("lora_B.weight")
    if a is None or b is None or len(w) < 2:
        return None
    r = a.shape[0]
    want_a, want_b = (r, *w[1:]), (w[0], r, *([1] * (len(w) - 2)))
    if tuple(a.shape) == want_a and tuple(b.shape) == want_b:
        return None
    return (f"size mismatch for {m.full_name}: lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)} on a weight "
            f"{w} (the load fails)")


def _found(names: dict[str, tuple[int, ...]], m: "LoadedModule") -> bool:
    return any(n == m.name or n.endswith("." + m.name) for n in names)


def _refusal(conv: "Converted", base_names: "BaseNames | None") -> str | None:
    """Why the whole load fails: the conversion, a rank PEFT builds differently, or a component where PEFT
    finds none of the target modules (``BaseTuner.inject_adapter`` raises "Target modules … not found")."""
    if conv.refused is not None:
        return conv.refused
    bad = next((m.rank_error for m in conv.modules if m.rank_error), None)
    if bad is not None:
        return bad
    for m in conv.modules:
        w = (base_names or {}).get(m.component, {}).get(m.name)
        why = _shape_error(m, w) if w is not None else None
        if why is not None:
            return why
    for comp in {m.component for m in conv.modules}:
        names = (base_names or {}).get(comp)
        mods = [m for m in conv.modules if m.component == comp]
        if names is not None and not any(_found(names, m) for m in mods):
            return f"PEFT finds none of {comp}'s {len(mods)} target modules in the base: the load fails"
    return None


def _shown(mods: list["LoadedModule"]) -> str:
    shown = ", ".join(m.full_name for m in mods[:3])
    return shown + (f" (+{len(mods) - 3})" if len(mods) > 3 else "")


def _strength(mods: list["LoadedModule"], energy: float | None, shared: bool) -> str | None:
    """Why what PEFT applies differs in strength from the file's ΔW (None: it does not, or cannot be told)."""
    got = [m.energy() for m in mods]
    if energy is None or not energy > 0 or shared or any(e is None for e in got):
        return None
    ratio = (sum(e for e in got if e is not None) / energy) ** 0.5
    if abs(ratio - 1.0) <= _STRENGTH_TOL:
        return None
    return f"applied at {ratio:.4g}× its ‖ΔW‖_F (the α/r PEFT uses is not the file's)"


def _first_by_key(found: dict[str, frozenset[str]]) -> dict[str, str]:
    """Source key → the first converted key made from it."""
    out: dict[str, str] = {}
    for key, src in found.items():
        for k in src:
            out.setdefault(k, key)
    return out


def _source_verdicts(entries: dict[str, tuple[list[str], float | None]], conv: "Converted",
                     base_names: "BaseNames | None") -> dict[str, Verdict]:
    """Per source entry (name → (its tensor keys, α excluded; its ‖ΔW‖²)), what diffusers does with it
    (:mod:`.applied_diffusers`: the converted modules carry the source keys they were made from)."""
    refusal = _refusal(conv, base_names)
    if refusal is not None:
        return {name: Verdict(Fate.REFUSED, refusal) for name in entries}
    entry_of = {k: name for name, (keys, _) in entries.items() for k in keys}
    owners = [{entry_of[k] for k in m.sources if k in entry_of} for m in conv.modules]
    mods_of: dict[str, list[int]] = {}
    for i, names in enumerate(owners):
        for name in names:
            mods_of.setdefault(name, []).append(i)
    left = (_first_by_key(conv.stray), _first_by_key(conv.odd))
    out = {}
    for name, (keys, energy) in entries.items():
        idx = mods_of.get(name, [])
        shared = any(len(owners[i]) > 1 for i in idx)
        out[name] = _verdict(keys, energy, [conv.modules[i] for i in idx], shared, conv, base_names, left)
    return out


def _verdict(keys: list[str], energy: float | None, mods: list["LoadedModule"], shared: bool, conv: "Converted",
             base_names: "BaseNames | None", left: tuple[dict[str, str], dict[str, str]]) -> Verdict:
    carried = frozenset().union(*(m.sources for m in mods))
    lost = [k for k in keys if k not in carried]
    if not mods:
        stray = next((left[0][k] for k in keys if k in left[0]), None)
        if stray is not None:
            return Verdict(Fate.DROPPED, f"left as {stray!r} by diffusers' conversion: no component of "
                                         f"{conv.pipeline} loads it", stray)
        odd = next((left[1][k] for k in keys if k in left[1]), None)
        if odd is not None:
            return Verdict(Fate.DROPPED, f"left as {odd!r} by diffusers' conversion: PEFT finds no LoRA layer "
                                         "in that name and ignores it", odd)
        return Verdict(Fate.DROPPED, f"diffusers' conversion drops {', '.join(lost[:3])}")
    engine_name = _shown(mods)
    known = base_names or {}
    missing = [m for m in mods if m.component in known and m.name not in known[m.component]]
    if missing:
        return Verdict(Fate.DROPPED, f"converted to {_shown(missing)}: the base has no such module (PEFT "
                                     "leaves it out with a warning)", engine_name)
    if lost:
        return Verdict(Fate.ALTERED, f"diffusers drops {', '.join(lost[:3])}: the rest loads as {engine_name}",
                       engine_name)
    why = _strength(mods, energy, shared)
    if why is not None:
        return Verdict(Fate.ALTERED, why, engine_name)
    unknown = sorted({m.component for m in mods if m.component not in known})
    if unknown:
        where = "no --base" if base_names is None else f"the base has no {'/'.join(unknown)} weights"
        return Verdict(Fate.UNVERIFIED, f"converted to {engine_name}; {where}: names not checked", engine_name)
    return Verdict(Fate.APPLIED, "", engine_name)


def _diffusers(ad: "Adapter", base: "BaseCheckpoint | None") -> AppliedReport | None:
    """diffusers' own conversion of ``ad`` (:mod:`.applied_diffusers`); None when diffusers is not installed."""
    from .applied_diffusers import base_module_names, convert_like_diffusers, diffusers_version

    version = diffusers_version()
    if version is None:
        return None
    conv = convert_like_diffusers(ad, base)
    entries: dict[str, tuple[list[str], float | None]] = {}
    owned = set()
    for m in ad.modules:
        entries[m.name] = ([k for k in m.keys if k != m.alpha_key], _energy(m))
        owned.update(m.keys)
    for key in ad.source.tensors:  # full tensors and keys of no module: each its own entry, share unknown
        if key not in owned and not key.endswith(".alpha"):
            entries[key] = ([key], None)
    verdicts = _source_verdicts(entries, conv, base_module_names(base) if base is not None else None)
    mods = [ModuleFate(n, v.fate, v.reason, entries[n][1], v.engine_name) for n, v in verdicts.items()]
    against = (f"diffusers {version}'s own conversion ({conv.how})"
               + (f" and the weights of {base.path}" if base is not None else "; no --base"))
    return AppliedReport("diffusers", str(ad.path), against, mods)


def applied_report(engine: str, ad: "Adapter", base: "BaseCheckpoint | None" = None) -> AppliedReport:
    """What ``engine`` (a :data:`lora_inspect.fit.ENGINE_NAMES` name) applies of ``ad``."""
    if engine == "diffusers":
        rep = _diffusers(ad, base)
        if rep is not None:
            return rep
    names = _names(ad, base)
    if engine == "diffusers":
        names.source += "; diffusers is not installed: key rules only, its converters not run"
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
