"""diffusers attention-processor LoRA files (``unet.save_attn_procs``, training scripts ≤ 0.13).

Keys: ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight`` (r, in)
and ``….to_q_lora.up.weight`` (out, r), no prefix and no alpha: ``LoRALinearLayer`` applies
up(down(x)) with scale 1. diffusers still loads them by renaming (``.processor.`` → ``.``,
``to_q_lora.down`` → ``to_q.lora_A``, ``to_out_lora`` → ``to_out.0``); the module names shown here
are those real modules (``…attn1.to_q``, ``…attn1.to_out.0``). Both ``.safetensors`` and ``.bin``.
A rewrite keeps the stored keys, so the output is in the same layout.
"""

from __future__ import annotations

from ..adapter import Adapter
from .common import build_module, group_keys
from .diffusers import PipelineNaming
from .kohya import check_lycoris, finish
from .layout import AlphaHome, Capabilities, Format, Found, Layout
from .tensors import TensorSource

__all__ = ["DiffusersAttnProcsLayout", "AttnProcsFormat", "looks_like_attn_procs"]


class AttnProcsFormat(Format):
    ATTN_PROCS = "diffusers-attn-procs"

ATTN_SUFFIXES = {"_lora.down.weight": "A", "_lora.up.weight": "B"}
PROCESSOR = ".processor."


def looks_like_attn_procs(keys: list[str]) -> bool:
    return any(PROCESSOR in k and k.endswith(("_lora.down.weight", "_lora.up.weight")) for k in keys)


def module_name(stored: str) -> str:
    """The module diffusers applies a stored name to: ``….attn1.processor.to_out`` → ``….attn1.to_out.0``."""
    name = stored.replace(PROCESSOR, ".")
    return name + ".0" if name.endswith(".to_out") else name


class DiffusersAttnProcsLayout(PipelineNaming, Layout):
    name = "diffusers-attn-procs"
    formats: tuple[Format, ...] = (AttnProcsFormat.ATTN_PROCS,)
    writes_as = "diffusers"  # convert and merge write its modules as diffusers LoRA
    caps = Capabilities(per_module_rank=True, per_module_alpha=False, dora=False, conv=False, embeddings=False,
                        alpha=AlphaHome.NONE)

    def matches(self, keys: list[str], found: Found) -> bool:
        return looks_like_attn_procs(keys)

    def read(self, source: TensorSource, found: Found) -> Adapter:
        check_lycoris(source)
        groups, rest = group_keys(source.keys(), ATTN_SUFFIXES)
        modules = []
        for stored in sorted(groups):
            mod, _ = build_module(module_name(stored), groups[stored], source)
            modules.append(mod)
        modules.sort(key=lambda m: m.name)
        notes = ["diffusers attention-processor layout: no alpha is stored, scale 1 (as LoRALinearLayer applies)"]
        return finish(found.shown, AttnProcsFormat.ATTN_PROCS, source, modules, rest, notes)
