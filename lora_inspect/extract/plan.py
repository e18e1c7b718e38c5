"""Which changed tensors become LoRA modules, which are carried whole, which are dropped — and why.

- A changed 2-D linear or 3-D/4-D conv weight with a module name is a LoRA module.
- Embeddings and the output head (``--embeddings``): ``save`` (default, as mergekit's
  ``--no-embed-lora``): the tuned tensor carried whole as PEFT ``modules_to_save``; ``lora``: a LoRA
  module like the others (PEFT's ``lora_embedding_A/B``; the head as a linear); ``skip``: dropped.
- A changed 1-D tensor (a norm's scale, a bias) of a module that is not a LoRA module is carried whole
  (``modules_to_save`` of its module: all of its tensors) where the layout can hold full tensors
  (PEFT); otherwise dropped. The bias of a LoRA module is dropped: a LoRA has no bias (PEFT's
  ``lora_bias`` is not written), and the output says so.
- Everything else that changed (integer buffers, weights the output's naming cannot name) is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..peft_rules import PEFT_PREFIX
from .pairs import Family, Role, TensorPair
from .results import Embeddings, SetAside

__all__ = ["Plan", "plan_tensors"]


@dataclass
class Plan:
    lora: list[TensorPair] = field(default_factory=list)
    saved_modules: list[str] = field(default_factory=list)  # modules_to_save (module paths)
    saved_keys: dict[str, TensorPair] = field(default_factory=dict)  # output key → the tuned tensor carried
    set_aside: list[SetAside] = field(default_factory=list)


def _module_of(p: TensorPair) -> str:
    return p.key.rpartition(".")[0]


def _save_or_drop(plan: Plan, p: TensorPair, energy: float, can_save: bool, family: Family, why_saved: str,
                  why_dropped: str) -> None:
    if can_save and family is Family.TRANSFORMERS:
        module = _module_of(p)
        if module not in plan.saved_modules:
            plan.saved_modules.append(module)
        plan.set_aside.append(SetAside(p.key, p.role, "saved", why_saved, energy, p.numel))
    else:
        plan.set_aside.append(SetAside(p.key, p.role, "dropped", why_dropped, energy, p.numel))


def plan_tensors(changed: list[tuple[TensorPair, float]], family: Family, can_save: bool, target: str,
                 embeddings: Embeddings, all_pairs: list[TensorPair]) -> Plan:
    """``changed``: every changed tensor with its ‖Δ‖²_F (shares are filled in later)."""
    plan = Plan()
    layout_says = f"{target} cannot hold full tensors" if not can_save else "an image checkpoint's LoRA carries none"
    for p, e in changed:
        if p.role in (Role.LINEAR, Role.CONV) and p.path:
            plan.lora.append(p)
        elif p.role in (Role.LINEAR, Role.CONV):
            plan.set_aside.append(SetAside(p.key, p.role, "dropped", f"no {target} module name: {p.why_unnamed}", e,
                                           p.numel))
        elif p.role in (Role.EMBEDDING, Role.HEAD) and p.path:
            if embeddings == "lora":
                plan.lora.append(p)
            elif embeddings == "save":
                _save_or_drop(plan, p, e, can_save, family, "modules_to_save (--embeddings save)",
                              f"--embeddings save, but {layout_says}")
            else:
                plan.set_aside.append(SetAside(p.key, p.role, "dropped", "--embeddings skip", e, p.numel))
        elif p.role == Role.VECTOR:
            _vector(plan, p, e, can_save, family, layout_says)
        else:
            plan.set_aside.append(SetAside(p.key, p.role, "dropped", "not a float weight a LoRA can carry", e,
                                           p.numel))
    lora_modules = {_module_of(p) for p in plan.lora}
    _drop_biases_of_lora(plan, lora_modules)
    _carry_whole_modules(plan, all_pairs)
    return plan


def _vector(plan: Plan, p: TensorPair, e: float, can_save: bool, family: Family, layout_says: str) -> None:
    _save_or_drop(plan, p, e, can_save, family, "modules_to_save (a norm or bias: carried whole)",
                  f"a norm or bias, and {layout_says}")


def _drop_biases_of_lora(plan: Plan, lora_modules: set[str]) -> None:
    """A saved vector whose module is a LoRA module (its bias) cannot be carried: PEFT would replace the
    whole adapted layer. Dropped and said."""
    for i, s in enumerate(plan.set_aside):
        module = s.name.rpartition(".")[0]
        if s.action == "saved" and module in lora_modules:
            plan.set_aside[i] = SetAside(s.name, s.role, "dropped", "the bias of a LoRA module (a LoRA has no bias)",
                                         s.share, s.numel)
            if module in plan.saved_modules:
                plan.saved_modules.remove(module)


def _carry_whole_modules(plan: Plan, all_pairs: list[TensorPair]) -> None:
    """A module in ``modules_to_save`` is replaced whole: every tensor of it is written (changed or not)."""
    saved = set(plan.saved_modules)
    for p in all_pairs:
        module = _module_of(p)
        if module in saved:
            plan.saved_keys[PEFT_PREFIX + p.key] = p
