"""PEFT LoHa and LoKr adapters: ``save_pretrained`` directories whose ``adapter_config.json`` has
``peft_type`` ``LOHA`` or ``LOKR`` (keys ``base_model.model.<module>.hada_w1_a`` … / ``.lokr_w1`` …, the same
names and shapes as LyCORIS files, docs/formats.md "PEFT LoHa / LoKr").

ΔW is LyCORIS's (the update types of :mod:`.lycoris_updates`); the scale is PEFT's, which differs:
``peft/tuners/loha/layer.py · LoHaLayer.update_layer`` and ``peft/tuners/lokr/layer.py ·
LoKrLayer.update_layer`` both set ``scaling = alpha / r`` with r and α of the module from the config
(``rank_pattern``/``alpha_pattern`` by ``peft.utils.other.get_pattern_key``, in ``LoHaModel``/``LoKrModel
._create_and_replace``; defaults r = 8, α = 8). For LoKr this holds **always**, also when both Kronecker
factors are stored whole (LyCORIS uses s = 1 there): the r of the scale is the config's, never read from
the tensors. ``decompose_both``, ``use_effective_conv2d`` and ``decompose_factor`` only change which
tensors are stored (the reader follows the shapes); ``rank_dropout``/``rank_dropout_scale``/
``module_dropout`` act in training only (``get_delta_weight(apply_rank_dropout=False)`` at inference).

Rewrites: ``truncate`` writes a PEFT **LoRA** directory (the Eckart–Young truncation of the true ΔW,
scale baked, α = r per module); ``rescale`` multiplies ``alpha`` and every ``alpha_pattern`` value (s is
linear in α for every module), ``--bake`` multiplies W₁'s first factor. Both load with ``PeftModel``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from .. import validate as v
from ..adapter import Adapter, Module
from ..errors import InspectError
from ..kernels import recover_kernels
from ..kinds import Kind
from ..peft_rules import PEFT_PREFIX, compiled_patterns, lookup_compiled
from ..units import plural, verb
from .layout import AlphaHome, Capabilities, Format, Found, Models, Rewrite
from .lycoris import ReadContext, read_loha, read_lokr
from .lycoris_bind import adapter_with_base
from .lycoris_updates import LoHaUpdate, LoKrUpdate
from .peft import PeftFormat, PeftLayout, peft_format
from .peft_config import truncated_config
from .tensors import TensorSource

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    import numpy as np

__all__ = ["PeftLycorisLayout", "PEFT_LYCORIS_TYPES"]

PEFT_LYCORIS_TYPES = {"LOHA": "loha", "LOKR": "lokr"}
_ROLES = {
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
PEFT_DEFAULT_R = 8  # peft LoHaConfig.r / LoKrConfig.r
PEFT_DEFAULT_LYCORIS_ALPHA = 8  # peft LoHaConfig.alpha / LoKrConfig.alpha


class _PeftKeys:
    """A truncation of a PEFT LoHa/LoKr module is written as a PEFT LoRA pair under the module's own prefix."""

    name: str

    def lora_keys(self) -> tuple[str, str]:
        return f"{self.name}.lora_A.weight", f"{self.name}.lora_B.weight"


@dataclass(eq=False)
class PeftLoHaUpdate(_PeftKeys, LoHaUpdate):
    """LoHa as PEFT stores it (``update.name`` is the key prefix, ``base_model.model.…``)."""


@dataclass(eq=False)
class PeftLoKrUpdate(_PeftKeys, LoKrUpdate):
    """LoKr as PEFT stores it; :attr:`full_full` changes nothing here (PEFT: s = α/r always)."""


_PEFT_UPDATE = {LoHaUpdate: PeftLoHaUpdate, LoKrUpdate: PeftLoKrUpdate}


def _as_peft(upd: Any) -> Any:
    cls = _PEFT_UPDATE[type(upd)]
    return cls(**{f.name: getattr(upd, f.name) for f in fields(upd)})


def peft_lycoris_type(cfg: dict | None, where: str) -> str | None:
    """``loha``/``lokr`` when the config's peft_type names one, else None."""
    if cfg is None:
        return None
    t = v.string(cfg, "peft_type", where)
    return PEFT_LYCORIS_TYPES.get(str(t).upper()) if t else None


@dataclass
class _Settings:
    algo: str
    r: int
    alpha: float
    rank_pattern: Any
    alpha_pattern: Any


def _settings(cfg: dict, where: str, algo: str) -> _Settings:
    def non_negative(x: Any) -> bool:
        return v.is_number(x) and x >= 0

    r = v.integer(cfg, "r", where, default=PEFT_DEFAULT_R, minimum=1)
    alpha = v.number(cfg, "alpha", where, default=PEFT_DEFAULT_LYCORIS_ALPHA, minimum=0)
    rp = v.mapping(cfg, "rank_pattern", where, values=v.is_count, what="a positive integer")
    ap = v.mapping(cfg, "alpha_pattern", where, values=non_negative,
                   what=f"a finite number ≥ 0 of magnitude ≤ {v.MAX_NUMBER}")
    for key in ("use_effective_conv2d", "decompose_both", "rank_dropout_scale"):
        v.boolean(cfg, key, where)  # validated: they change only what is stored (or training)
    if algo == "lokr":
        v.integer(cfg, "decompose_factor", where, default=-1, minimum=-1)
    return _Settings(algo, int(r), float(alpha), compiled_patterns(rp, f"{where}: rank_pattern"),
                     compiled_patterns(ap, f"{where}: alpha_pattern"))


def _group(keys: list[str], algo: str) -> tuple[dict[str, dict[str, str]], list[str]]:
    """``{key prefix: {role: key}}`` for this peft_type's roles; other keys (modules_to_save …) are extras."""
    roles = sorted(_ROLES[algo], key=len, reverse=True)
    mods: dict[str, dict[str, str]] = {}
    rest = []
    for key in keys:
        role = next((r for r in roles if key.endswith("." + r) and len(key) > len(r) + 1), None)
        if role is None:
            rest.append(key)
        else:
            mods.setdefault(key[: -len(role) - 1], {})[role] = key
    return mods, rest


def _stored_ranks(c: ReadContext, algo: str) -> list[int]:
    """The r each decomposed factor was created with (PEFT: every one is the module's config r)."""
    if algo == "loha":
        return [c.shape("hada_w1_b")[0], c.shape("hada_w2_b")[0]] + (
            [c.shape("hada_w1_a")[1]] if "hada_t1" not in c.roles else [c.shape("hada_w1_a")[0]])
    out = [c.shape("lokr_w1_b")[0]] if "lokr_w1_b" in c.roles else []
    return out + ([c.shape("lokr_w2_b")[0]] if "lokr_w2_b" in c.roles else [])


def _module(c: ReadContext, name: str, s: _Settings, where: str) -> Module:
    if c.algo != s.algo:
        raise InspectError(f"{where}: module {name!r}: {c.algo} keys in a PEFT {s.algo.upper()} adapter")
    if "lokr_w2" in c.roles and len(c.shape("lokr_w2")) == 3:
        raise c.fail("a Conv1d LoKr with lokr_w2 stored whole: PEFT applies torch.kron to a 2-D and a 3-D tensor "
                     "there, which is not kron(W₁, W₂); not read")
    upd, shape, kernel, _ = (read_loha if s.algo == "loha" else read_lokr)(c)
    r = lookup_compiled(s.rank_pattern, name, s.r)
    alpha = float(lookup_compiled(s.alpha_pattern, name, s.alpha))
    bad = [k for k in _stored_ranks(c, s.algo) if k != r]
    if bad:
        raise c.fail(f"stored rank {bad[0]} but the config gives r={r} — PEFT would refuse to load it")
    upd = _as_peft(upd)
    first = next(iter(upd.keys))
    return Module(name=name, kind=Kind.CONV if kernel else Kind.LINEAR, shape=shape, rank=upd.rank, alpha=alpha,
                  scale=alpha / r, update=upd, source=c.source, kernel=kernel, dtype=c.source.info(first).dtype)


def read_peft_lycoris(source: TensorSource, found: Found, fmt: Format) -> Adapter:
    cfg, where = found.config or {}, str(found.config_path or found.shown)
    algo = peft_lycoris_type(cfg, where)
    assert algo is not None
    s = _settings(cfg, where, algo)
    groups, rest = _group(source.keys(), algo)
    if not groups:
        want = "hada_w1_a/hada_w1_b/hada_w2_a/hada_w2_b" if algo == "loha" else "lokr_w1/lokr_w2 (or _a/_b)"
        raise InspectError(f"{source.path}: peft_type {algo.upper()} but no {want} tensors")
    modules, prefixed = [], 0
    for raw in sorted(groups):
        name = raw[len(PEFT_PREFIX):] if raw.startswith(PEFT_PREFIX) else raw
        prefixed += raw.startswith(PEFT_PREFIX)
        modules.append(_module(ReadContext(raw, groups[raw], source), name, s, where))
    notes = []
    if prefixed < len(groups):
        lacking = len(groups) - prefixed
        notes.append(f"{plural(lacking, 'module')} {verb(lacking, 'lacks')} the {PEFT_PREFIX!r} prefix: PEFT would not "
                     f"load {'it' if lacking == 1 else 'them'}")
    full = sum(isinstance(m.update, LoKrUpdate) and m.update.full_full for m in modules)
    if full:
        notes.append(f"{plural(full, 'LoKr module')} {verb(full, 'stores')} both Kronecker factors whole: PEFT scales "
                     f"{'it' if full == 1 else 'them'} by α/r = "
                     "alpha/r of the config (LyCORIS files would use 1)")
    return Adapter(
        path=found.shown, format=fmt, weights_path=source.path, source=source, modules=modules, extras=sorted(rest),
        config=found.config, config_path=found.config_path, peft_type=algo.upper(), r=s.r, alpha=s.alpha,
        base_model=v.string(cfg, "base_model_name_or_path", where),
        target_modules=v.string_list(cfg, "target_modules", where), notes=notes,
    )


def _lora_config(cfg: dict) -> dict:
    """A PEFT LoRA config with the source's targets and task (LoHa/LoKr-only keys dropped)."""
    keep = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save",
            "task_type", "base_model_name_or_path", "revision", "auto_mapping")
    base = {k: copy.deepcopy(cfg[k]) for k in keep if k in cfg}
    base.update({"peft_type": "LORA", "use_dora": False, "fan_in_fan_out": False, "bias": "none",
                 "lora_dropout": 0.0, "init_lora_weights": True, "inference_mode": True})
    return base


def _times(x: float, f: float) -> int | float:
    y = x * f
    return int(y) if float(y).is_integer() and abs(y) < 2**53 else float(y)


class PeftLycorisLayout(PeftLayout):
    """PEFT LoHa/LoKr: a ``save_pretrained`` directory (or its weight file with the config beside it)."""

    name = "peft-lycoris"
    # none of its own: its adapters report PEFT's formats ("peft", "peft-safetensors", "peft-bin"; the peft_type
    # says LOHA/LOKR), which keep naming the PEFT LoRA layout (layout_named)
    formats: tuple[Format, ...] = ()
    target = None
    writes_as = "peft"  # a truncation or conversion writes PEFT LoRA
    caps = Capabilities(per_module_rank=True, per_module_alpha=True, dora=False, conv=True, embeddings=False,
                        full_tensors=True, models=Models.ONE, alpha=AlphaHome.CONFIG)

    def matches(self, keys: list[str], found: Found) -> bool:
        return peft_lycoris_type(found.config, str(found.config_path or found.shown)) is not None

    def read(self, source: TensorSource, found: Found) -> Adapter:
        ad = read_peft_lycoris(source, found, peft_format(source, found))
        ad.notes += recover_kernels(ad.modules, self.canonical_name)  # flattened convs: kernels from UNet names
        return ad

    def with_base(self, ad: Adapter, base: Path | None) -> Adapter:
        """Flattened convs given the kernel of their 4-D base weights (``convert --base``)."""
        return adapter_with_base(ad, base)

    def global_alpha(self, ad: Adapter) -> float | None:
        return ad.alpha

    def truncated(self, ad: Adapter, out_fmt: Format, tensors: dict[str, np.ndarray], ranks: dict[str, int],
                  dropped: list[str]) -> Rewrite:
        """A PEFT LoRA directory: the truncated pairs with s baked in, α = r for each module."""
        return Rewrite(PeftFormat.DIR, tensors, dict(ad.metadata),
                       truncated_config(_lora_config(ad.config or {}), ranks, dropped))

    def rescaled(self, ad: Adapter, out_fmt: Format, tensors: dict[str, np.ndarray], factor: float) -> Rewrite:
        """``alpha`` and every ``alpha_pattern`` value × F (PEFT: s = α/r for every LoHa/LoKr module)."""
        cfg = copy.deepcopy(ad.config or {})
        cfg["alpha"] = _times(ad.alpha if ad.alpha is not None else PEFT_DEFAULT_LYCORIS_ALPHA, factor)
        if cfg.get("alpha_pattern"):
            cfg["alpha_pattern"] = {k: _times(x, factor) for k, x in cfg["alpha_pattern"].items()}
        return Rewrite(PeftFormat.DIR, tensors, dict(ad.metadata), cfg)

    def baked(self, ad: Adapter, out_fmt: Format, tensors: dict[str, np.ndarray]) -> Rewrite:
        return Rewrite(PeftFormat.DIR, tensors, dict(ad.metadata), ad.config)

