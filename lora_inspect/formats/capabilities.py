"""What a layout can express, and the one-line refusal of what it cannot.

:class:`Capabilities` is declared by each layout (``caps``) and read wherever a write is planned:
``convert`` and ``merge`` check every module against the target's capabilities before a byte is
written (:func:`refusal`, called by :func:`lora_inspect.convert.run.write_canon`); ``truncate`` checks
the adapter against the layout it writes (:mod:`lora_inspect.rewrite.truncation`) and pads ranks where
``per_module_rank`` is false; writers bake the scale into B where ``per_module_alpha`` is false.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..kinds import Choice, Kind

__all__ = ["AlphaHome", "Models", "Rule", "Capabilities", "Held", "refusal"]


class AlphaHome(Choice):
    """Where a layout stores α (what a rescale edits)."""

    CONFIG = "config"  # adapter_config.json (PEFT)
    TENSORS = "tensors"  # one scalar ``.alpha`` tensor per module (kohya, diffusers, LyCORIS)
    HEADER = "header"  # the file's header (GGUF's adapter.lora.alpha: one α for every module)
    SCALE = "scale"  # an absolute scale, no α (mlx-lm's lora_parameters.scale)
    NONE = "none"  # nowhere: α = r, s = 1 (diffusers attention processors)


class Models(Choice):
    """How many models an adapter of the layout adapts."""

    ONE = "one"  # one model: names carry no pipeline component (PEFT, mlx-lm, GGUF)
    PIPELINE = "pipeline"  # every module names its pipeline component (diffusers: unet., text_encoder. …)
    ANY = "any"  # either (kohya: lora_unet_/lora_te_ prefixes, lora_te_ for a one-model adapter)


# the rules a refusal cites; why a module is refused under each: the defaults, which a layout overrides in
# ``Capabilities.why`` ({label} is the layout's label, {kind} the module's kind)
Rule = Literal["pipeline", "component", "dora", "dora_embedding", "dora_partial", "conv", "embedding"]
_WHY: dict[Rule, str] = {
    "pipeline": "write diffusers or kohya instead",
    "component": "{label} files name a pipeline component (unet, transformer, text_encoder …) and this module has "
                 "none: name it, or write peft",
    "dora": "DoRA magnitudes",
    "dora_embedding": "DoRA on an embedding",
    "dora_partial": "it has no DoRA magnitude while other modules do",
    "conv": "{kind} LoRA",
    "embedding": "{kind} LoRA",
}


@dataclass(frozen=True)
class Capabilities:
    """What a layout can express, and so what a rewrite, a conversion or a merge may write in it."""

    per_module_rank: bool = True  # False: one rank for every module (mlx-lm's lora_parameters.rank); padded
    per_module_alpha: bool = True  # False: one α or scale for all (mlx-lm, GGUF); other scales baked into B
    dora: bool = False  # DoRA magnitudes
    dora_embeddings: bool = False  # DoRA on an embedding module
    dora_all_or_none: bool = False  # DoRA is a setting of the whole adapter (mlx-lm's fine_tune_type dora)
    conv: bool = False  # convolution modules
    embeddings: bool = False  # embedding modules
    full_tensors: bool = False  # full tensors beside the modules (PEFT's modules_to_save)
    models: Models = Models.ANY
    alpha: AlphaHome = AlphaHome.CONFIG
    why: tuple[tuple[Rule, str], ...] = ()  # (rule, reason) overriding the default reasons of refusals
    one_rank_only: bool = False  # always ``not per_module_rank`` (given True, it sets per_module_rank False)

    def __post_init__(self) -> None:
        if self.one_rank_only:
            object.__setattr__(self, "per_module_rank", False)
        object.__setattr__(self, "one_rank_only", not self.per_module_rank)
        object.__setattr__(self, "alpha", AlphaHome(self.alpha))

    def reason(self, rule: Rule, label: str, kind: str = "") -> str:
        return dict(self.why).get(rule, _WHY[rule]).format(label=label, kind=kind)


@dataclass(frozen=True)
class Held:
    """What a module asks of a layout that is to hold it."""

    name: str  # as the user knows it (the source's module name)
    kind: Kind
    dora: bool
    component: str | None = None  # its pipeline component (unet, text_encoder …), None for one model


def _module_refusal(caps: Capabilities, label: str, m: Held, need_component: bool) -> str | None:
    if need_component and m.component is None:
        return caps.reason("component", label)
    if m.dora and not caps.dora:
        return caps.reason("dora", label)
    if m.kind in (Kind.CONV, Kind.CONV_UNKNOWN) and not caps.conv:  # conv?: a conv whose kernel is unknown
        return caps.reason("conv", label, m.kind)
    if m.kind == Kind.EMBEDDING and not caps.embeddings:
        return caps.reason("embedding", label, m.kind)
    if m.kind == Kind.EMBEDDING and m.dora and not caps.dora_embeddings:
        return caps.reason("dora_embedding", label)
    return None


def refusal(caps: Capabilities, label: str, mods: Sequence[Held], extras: Sequence[str] = (),
            carry_extras: bool = False, models: bool = True) -> str | None:
    """Why a layout with ``caps`` (called ``label`` in messages) cannot hold ``mods`` (and the full tensors
    ``extras``; ``carry_extras``: the source's full tensors are of a kind the layout stores), as one line;
    None when it can. ``models``: check the pipeline components too (a rewrite keeps its own)."""
    comps = sorted({m.component for m in mods if m.component is not None})
    if models and caps.models == Models.ONE and len(comps) > 1:
        return (f"a {label} adapter holds one model; this one has modules of {', '.join(comps)} (a pipeline): "
                + caps.reason("pipeline", label))
    for m in mods:
        why = _module_refusal(caps, label, m, models and caps.models == Models.PIPELINE)
        if why is not None:
            return f"module {m.name!r}: {label} cannot hold it: {why}"
    dora = [m.dora for m in mods]
    if caps.dora_all_or_none and any(dora) and not all(dora):
        return f"module {mods[dora.index(False)].name!r}: {label} cannot hold it: {caps.reason('dora_partial', label)}"
    if extras and not (caps.full_tensors and carry_extras):
        return f"full tensors ({extras[0]!r} …, modules_to_save) cannot be written to {label}"
    return None
