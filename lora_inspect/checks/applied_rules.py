"""How each engine maps an adapter's keys onto model weights (the rules of ``check --applied``; sources
and line numbers in docs/serving.md, "What the engine really applies").

A rule takes the module names (and, for vLLM, every tensor key) and a :class:`Names` of the model's
real module names, and says per module what the engine does: applies it, drops it silently, refuses the
whole adapter (a loud failure), skips it on purpose, cannot tell (no base, unknown architecture), or applies
it otherwise than the file says (diffusers, :mod:`.applied_diffusers`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..kinds import Choice
from ..peft_rules import strip_prefix

__all__ = ["Fate", "Verdict", "Names", "known_names", "vllm_key", "peft_verdicts", "mlx_verdict", "gguf_verdict",
           "comfy_verdict", "names_verdict", "FAMILY_PATTERNS", "VLLM_EMBEDDING_MODULES"]


class Fate(Choice):
    APPLIED = "applied"
    DROPPED = "dropped"  # loads, and silently does nothing
    REFUSED = "refused"  # the engine refuses the whole adapter (loud)
    SKIPPED = "skipped"  # skipped on purpose (vLLM: the whole base embedding PEFT saves beside an embedding LoRA)
    UNVERIFIED = "unverified"  # no base and no known names to check it against
    ALTERED = "altered"  # loads, but not as the file says: another strength, or its DoRA magnitude dropped


@dataclass(frozen=True)
class Verdict:
    fate: Fate
    reason: str = ""
    engine_name: str = ""  # the name the engine resolves it to


# the known module names of an architecture without --base (HF transformers names)
FAMILY_PATTERNS: dict[str, re.Pattern[str]] = {
    "llama": re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$"
                        r"|^model\.embed_tokens$|^lm_head$"),
    "gpt2": re.compile(r"^transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)$"),
}
# vLLM 0.33 model_executor/models/llama.py: embedding_modules = {"embed_tokens", "lm_head"}
VLLM_EMBEDDING_MODULES = {"llama": frozenset({"embed_tokens", "lm_head"}), "gpt2": frozenset()}
_LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "granite", "lora-inspect")


@dataclass
class Names:
    """The model's module names: exact (from a base checkpoint) or a family's pattern; ``None`` family and no
    exact names: unknown."""

    exact: frozenset[str] | None = None
    family: str | None = None
    source: str = ""  # how the names were found, for the report
    suffixes: frozenset[str] = field(default_factory=frozenset)  # last components of the LoRA-able modules

    @property
    def known(self) -> bool:
        return self.exact is not None or self.family in FAMILY_PATTERNS

    def has(self, name: str) -> bool | None:
        if self.exact is not None:
            return name in self.exact
        pat = FAMILY_PATTERNS.get(self.family or "")
        return None if pat is None else bool(pat.match(name))


def known_names(names: Iterable[str], hint: str | None) -> Names:
    """A family's names for adapter module ``names`` (``hint``: model_type or base model id, if any)."""
    text = (hint or "").lower()
    fam = "gpt2" if "gpt2" in text else ("llama" if any(f in text for f in _LLAMA_FAMILY) else None)
    if fam is None:
        names = list(names)
        if any(FAMILY_PATTERNS["llama"].match(n) for n in names):  # one module named as Llama's says the family
            fam = "llama"
        elif any(FAMILY_PATTERNS["gpt2"].match(n) for n in names):
            fam = "gpt2"
    if fam is None:
        return Names(source="unknown architecture (give --base)")
    sfx = {"llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
           "gpt2": {"c_attn", "c_proj", "c_fc"}}[fam] | VLLM_EMBEDDING_MODULES[fam]
    return Names(None, fam, f"known {fam} module names", frozenset(sfx))


def vllm_key(key: str) -> tuple[str, bool] | None:
    """vLLM's ``parse_fine_tuned_lora_name`` (vllm/lora/utils.py): the module a tensor key belongs to, and
    whether it is a classifier/score full tensor; None for a key vLLM calls "unsupported LoRA weight"."""
    name = strip_prefix(key)
    parts = name.split(".")
    if len(parts) >= 2 and parts[-1] in ("weight", "bias"):
        if parts[-2] in ("lora_A", "lora_B") and parts[-1] == "weight":
            return ".".join(parts[:-2]), False
        if parts[-2] in ("score", "classifier"):
            return parts[-2], True
    if parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
        return ".".join(parts[:-1]), False
    return None


def _base_embedding(key: str) -> bool:
    """vLLM's ``is_base_embedding_weights``: the base embedding PEFT saves beside an embedding LoRA."""
    return key.endswith((".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight"))


def names_verdict(name: str, names: Names, engine: str) -> Verdict:
    """Applied when the model has a module called ``name``; else dropped silently; unverified when unknown."""
    has = names.has(name)
    if has is None:
        return Verdict(Fate.UNVERIFIED, f"{names.source}: not checked", name)
    if has:
        return Verdict(Fate.APPLIED, "", name)
    return Verdict(Fate.DROPPED, f"the model has no module {name!r}: {engine} ignores it", name)


def peft_verdicts(keys: Iterable[str], names: Names, saved: Iterable[str], engine: str) -> dict[str, Verdict]:
    """Module name (or key) → verdict, by vLLM 0.33's loader (``lora_model.py`` ``from_local_checkpoint``:
    unsupported keys and modules outside the model's LoRA modules fail the load; ``model_manager.py``
    ``activate_adapter`` looks LoRAs up by the model's own module names, so any other name does nothing)."""
    out: dict[str, Verdict] = {}
    saved = set(saved)
    for key in keys:
        if _base_embedding(key):
            out[key] = Verdict(Fate.SKIPPED, "the whole base embedding PEFT saves: vLLM skips it")
            continue
        parsed = vllm_key(key)
        if parsed is None:
            out[key] = Verdict(Fate.REFUSED, f"{key} is an unsupported LoRA weight (the load fails)")
            continue
        module, full = parsed
        if module in out:
            continue
        base_name = module.rsplit(".", 1)[-1]
        if full:
            out[module] = Verdict(Fate.APPLIED, "full classifier/score tensor", module)
        elif names.known and base_name not in names.suffixes and base_name not in saved:
            out[module] = Verdict(Fate.REFUSED, f"{base_name} is not a LoRA module of this model (the load fails)",
                                  module)
        else:
            out[module] = names_verdict(module, names, engine)
    return out


def mlx_verdict(name: str, keys: Iterable[str] | None, num_layers: int | None, n_layers: int | None,
                names: Names) -> Verdict:
    """mlx-lm (``mlx_lm/tuner/utils.py`` ``linear_to_lora_layers``, ``load_adapters``): LoRA layers are made
    for ``lora_parameters.keys`` in the last ``num_layers`` layers, then the weights are loaded with
    ``strict=False`` — a tensor for any other module is dropped without a word."""
    m = re.match(r"^(?:model\.)?layers\.(\d+)\.(.+)$", name)
    if m and keys is not None and m.group(2) not in set(keys):
        return Verdict(Fate.DROPPED, f"{m.group(2)} is not in lora_parameters.keys: no LoRA layer is made", name)
    if m and num_layers is not None and num_layers >= 0 and n_layers is not None and int(m.group(1)) < n_layers - num_layers:
        return Verdict(Fate.DROPPED, f"layer {m.group(1)} is outside the last num_layers = {num_layers}", name)
    return names_verdict(name, names, "mlx-lm")


_GGUF = re.compile(r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|attn_qkv|ffn_gate|ffn_up|ffn_down)\.weight$"
                   r"|^token_embd\.weight$|^output\.weight$")


def gguf_verdict(name: str) -> Verdict:
    """llama.cpp (``src/llama-adapter.cpp``): every adapter tensor names a model tensor, else the load fails."""
    if _GGUF.match(name) or _GGUF.match(name + ".weight"):
        return Verdict(Fate.APPLIED, "", name)
    return Verdict(Fate.REFUSED, f"{name} is no llama.cpp model tensor (the load fails)", name)


_COMFY_CLIP = re.compile(r"^lora_te[12]?_text_model_encoder_layers_(\d+)_(mlp_fc1|mlp_fc2|self_attn_[qkv]_proj"
                         r"|self_attn_out_proj)$")


def comfy_verdict(name: str, base_key: str | None, have_base: bool) -> Verdict:
    """ComfyUI (``comfy/lora.py`` ``model_lora_keys_unet``/``model_lora_keys_clip``, ``load_lora``): a key is
    applied only when the model's key map holds it; any other is logged "lora key not loaded" and ignored.
    Text encoders: only layers 0–31 of ``LORA_CLIP_MAP`` (mlp.fc1/fc2, q/k/v/out_proj) under lora_te names."""
    if name.startswith("lora_te"):
        m = _COMFY_CLIP.match(name)
        if m is None or int(m.group(1)) >= 32:
            return Verdict(Fate.DROPPED, "not in ComfyUI's CLIP key map (LORA_CLIP_MAP): 'lora key not loaded'", name)
    if have_base:
        return (Verdict(Fate.APPLIED, "", base_key or name) if base_key is not None else
                Verdict(Fate.DROPPED, "the base has no such weight: 'lora key not loaded'", name))
    if name.startswith("lora_te"):
        return Verdict(Fate.APPLIED, "", name)
    return Verdict(Fate.UNVERIFIED, "no --base: UNet/DiT names not checked", name)
