"""Base models as a few numbers: read a Hugging Face ``config.json`` or a built-in preset.

A :class:`BaseModel` knows what footprints and ``check --base`` need — hidden size, MLP width,
layers, heads, KV heads, vocabulary, tied embeddings — and derives from them every adaptable
module's name and ΔW shape (out, in), and exact parameter counts. Layouts follow transformers'
modelling code (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
``GemmaForCausalLM``, ``GPT2LMHeadModel``) and this project's training model (``lora_inspect.train.model``,
Llama's layout); the counts are checked in the tests against those classes
built on the meta device.

Presets live in ``lora_inspect/data/presets.json`` as the public Hugging Face ``config.json`` fields
(their sources are named there), so a preset and a downloaded config go through the same reader.
This module does no I/O except :func:`load_base`, which reads the named file or the preset data.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import InspectError

__all__ = [
    "BaseModel", "ModuleShape", "from_hf_config", "from_own_config", "load_base", "preset_names", "presets",
    "lora_params_for", "target_matches", "LLAMA_FAMILY", "SUPPORTED_MODEL_TYPES",
]

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "gemma")
SUPPORTED_MODEL_TYPES = LLAMA_FAMILY + ("gpt2",)


@dataclass(frozen=True)
class ModuleShape:
    """One adaptable module: ΔW shape (out, in) in linear orientation, as :class:`~lora_inspect.adapter.Module`.

    Embeddings use the embedding weight's orientation (num_embeddings, dim), as the adapter model does.
    """

    out: int
    inp: int
    kind: str  # "linear" | "embedding"
    mtype: str  # "q_proj", "c_attn", "embed_tokens", "lm_head" …
    layer: int | None  # decoder layer index, None outside the layers


@dataclass(frozen=True)
class BaseModel:
    name: str
    model_type: str  # llama | mistral | qwen2 | gemma | gpt2 | lora-inspect (our training model: Llama layout)
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool
    head_dim: int
    max_positions: int | None = None
    qkv_bias: bool = False  # Qwen2: biases on q, k, v
    attention_bias: bool = False  # Llama `attention_bias`: biases on q, k, v, o
    mlp_bias: bool = False

    @property
    def family(self) -> str:
        return "gpt2" if self.model_type == "gpt2" else "llama"

    @property
    def kv_dim(self) -> int:
        """Width of K (and of V): kv_heads · head_dim."""
        return self.kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    def layer_linears(self) -> dict[str, tuple[int, int]]:
        """Per-layer linear modules, path inside the layer → weight (out, in)."""
        h, f = self.hidden, self.intermediate
        if self.family == "gpt2":  # Conv1D weights are stored (in, out); ΔW is (out, in)
            return {"attn.c_attn": (3 * h, h), "attn.c_proj": (h, h), "mlp.c_fc": (f, h), "mlp.c_proj": (h, f)}
        return {
            "self_attn.q_proj": (self.q_dim, h), "self_attn.k_proj": (self.kv_dim, h),
            "self_attn.v_proj": (self.kv_dim, h), "self_attn.o_proj": (h, self.q_dim),
            "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f),
        }

    @property
    def layer_prefix(self) -> str:
        return "transformer.h." if self.family == "gpt2" else "model.layers."

    @cached_property
    def modules(self) -> dict[str, ModuleShape]:
        """Every module an adapter can target, by its full name (PEFT name without ``base_model.model.``)."""
        out: dict[str, ModuleShape] = {}
        if self.family == "gpt2":
            out["transformer.wte"] = ModuleShape(self.vocab, self.hidden, "embedding", "wte", None)
            if self.max_positions:
                out["transformer.wpe"] = ModuleShape(self.max_positions, self.hidden, "embedding", "wpe", None)
        else:
            out["model.embed_tokens"] = ModuleShape(self.vocab, self.hidden, "embedding", "embed_tokens", None)
        for i in range(self.layers):
            for path, (o, n) in self.layer_linears().items():
                out[f"{self.layer_prefix}{i}.{path}"] = ModuleShape(o, n, "linear", path.split(".")[-1], i)
        out["lm_head"] = ModuleShape(self.vocab, self.hidden, "linear", "lm_head", None)
        return out

    # ---- parameter counts (exact; transformers' modelling code) ----
    def param_counts(self) -> dict[str, int]:
        """Parameters by group: ``linear`` (decoder-layer weight matrices: what NF4/int8 quantize),
        ``embedding`` (token and position embeddings), ``lm_head`` (0 when tied), ``other`` (norms, biases),
        and ``total`` — equal to ``sum(p.numel() for p in model.parameters())`` in transformers."""
        h, L = self.hidden, self.layers
        linear = L * sum(o * n for o, n in self.layer_linears().values())
        if self.family == "gpt2":
            embedding = self.vocab * h + (self.max_positions or 0) * h
            # LayerNorm weight+bias ×2 per layer, ln_f; Conv1D biases
            other = L * (4 * h + 3 * h + h + self.intermediate + h) + 2 * h
        else:
            embedding = self.vocab * h
            other = L * 2 * h + h  # input/post-attention RMSNorm, final norm
            if self.qkv_bias:
                other += L * (self.q_dim + 2 * self.kv_dim)
            if self.attention_bias:
                other += L * (self.q_dim + 2 * self.kv_dim + h)
            if self.mlp_bias:
                other += L * (2 * self.intermediate + h)
        lm_head = 0 if self.tied_embeddings else self.vocab * h
        return {"linear": linear, "embedding": embedding, "lm_head": lm_head, "other": other,
                "total": linear + embedding + lm_head + other}

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name, "model_type": self.model_type, "hidden": self.hidden,
            "intermediate": self.intermediate, "layers": self.layers, "heads": self.heads,
            "kv_heads": self.kv_heads, "head_dim": self.head_dim, "vocab": self.vocab,
            "tied_embeddings": self.tied_embeddings, "params": self.param_counts()["total"],
        }


def _int(cfg: dict, where: str, *names: str, default: Any = None) -> Any:
    for n in names:
        v = cfg.get(n)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InspectError(f"{where}: {n} must be a positive integer, found {v!r}")
            return v
    if default is not None:
        return default
    raise InspectError(f"{where}: missing {names[0]} (is this a model's config.json?)")


def from_hf_config(cfg: dict, name: str = "config.json") -> BaseModel:
    """A :class:`BaseModel` from the fields of a Hugging Face ``config.json`` (a dict)."""
    if not isinstance(cfg, dict):
        raise InspectError(f"{name}: expected a JSON object")
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise InspectError(
            f"{name}: model_type {mt!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if mt == "gpt2":
        h = _int(cfg, name, "n_embd", "hidden_size")
        heads = _int(cfg, name, "n_head", "num_attention_heads")
        return BaseModel(
            name=name, model_type=mt, hidden=h, intermediate=_int(cfg, name, "n_inner", default=4 * h),
            layers=_int(cfg, name, "n_layer", "num_hidden_layers"), heads=heads, kv_heads=heads,
            vocab=_int(cfg, name, "vocab_size"), tied_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            head_dim=h // heads, max_positions=_int(cfg, name, "n_positions", "max_position_embeddings", default=1024),
        )
    h = _int(cfg, name, "hidden_size")
    heads = _int(cfg, name, "num_attention_heads")
    # transformers' defaults: Llama/Mistral/Qwen2 untied unless told; Gemma ties
    tied_default = mt == "gemma"
    return BaseModel(
        name=name, model_type=mt, hidden=h, intermediate=_int(cfg, name, "intermediate_size"),
        layers=_int(cfg, name, "num_hidden_layers"), heads=heads,
        kv_heads=_int(cfg, name, "num_key_value_heads", default=heads), vocab=_int(cfg, name, "vocab_size"),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", tied_default)),
        head_dim=_int(cfg, name, "head_dim", default=h // heads),
        max_positions=cfg.get("max_position_embeddings"),
        qkv_bias=mt == "qwen2",
        attention_bias=bool(cfg.get("attention_bias", False)) and mt != "qwen2",
        mlp_bias=bool(cfg.get("mlp_bias", False)),
    )


def presets() -> dict[str, dict]:
    """The built-in presets as stored (``source``, ``params``, ``config``)."""
    text = resources.files("lora_inspect").joinpath("data/presets.json").read_text(encoding="utf-8")
    return json.loads(text)["presets"]


def preset_names() -> list[str]:
    return sorted(presets())


OWN_MODEL_FORMAT = "lora-inspect/model/1"  # ``format`` in the config.json of this project's training models


def from_own_config(cfg: dict, name: str = "config.json") -> BaseModel:
    """A :class:`BaseModel` for this project's training model (``lora_inspect.train.model``): a Llama
    layout (RMSNorm, RoPE, SwiGLU, no biases) whose ``config.json`` names its fields ``dim``,
    ``hidden_dim``, ``n_layers``, ``n_heads``, ``n_kv_heads``, ``max_seq_len`` (as ``ModelConfig``)."""
    from .validate import boolean, integer

    dim = integer(cfg, "dim", name, minimum=1)
    heads = integer(cfg, "n_heads", name, minimum=1)
    kv = integer(cfg, "n_kv_heads", name, default=heads, minimum=1)
    if dim % heads or heads % kv:
        raise InspectError(f"{name}: dim {dim}, n_heads {heads} and n_kv_heads {kv} do not divide evenly")
    return BaseModel(
        name=name, model_type="lora-inspect", hidden=dim, intermediate=integer(cfg, "hidden_dim", name, minimum=1),
        layers=integer(cfg, "n_layers", name, minimum=1), heads=heads, kv_heads=kv,
        vocab=integer(cfg, "vocab_size", name, minimum=1), tied_embeddings=boolean(cfg, "tie_word_embeddings", name),
        head_dim=dim // heads, max_positions=integer(cfg, "max_seq_len", name, default=None, minimum=1),
    )


def load_base(spec: str | Path) -> BaseModel:
    """``spec`` is a preset name (``llama-3-8b``), a ``config.json`` path, or a directory holding one.

    A ``config.json`` is a Hugging Face model's or one of this project's training models
    (``format`` = ``lora-inspect/model/1``, e.g. ``samples/planted/base``). A training output directory
    (``lora-inspect train --out DIR``) stands for its base: ``DIR/base`` or the Hugging Face directory
    that ``DIR/base.json`` names.
    """
    s = str(spec)
    table = presets()
    if s.lower() in table:
        return from_hf_config(table[s.lower()]["config"], name=s.lower())
    p = Path(s)
    if p.is_dir():
        p = _config_in(p)
    if not p.is_file():
        raise InspectError(f"base model {s}: neither a preset ({', '.join(sorted(table))}) nor a config.json file")
    from .validate import read_json_object

    cfg = read_json_object(p)
    if cfg.get("format") == OWN_MODEL_FORMAT:
        return from_own_config(cfg, name=str(p))
    return from_hf_config(cfg, name=str(p))


def _config_in(d: Path) -> Path:
    """The config.json that a directory stands for (itself, or a training output's base)."""
    if (d / "config.json").exists() or not (d / "task.json").is_file():
        return d / "config.json"
    if (d / "base" / "config.json").is_file():
        return d / "base" / "config.json"
    if (d / "base.json").is_file():
        from .validate import read_json_object, string

        path = string(read_json_object(d / "base.json"), "path", str(d / "base.json"))
        if path:
            return Path(path) / "config.json"
    return d / "config.json"


# ---- adapter parameters from a LoRA config, without tensors ----
def target_matches(name: str, targets: str | Iterable[str] | None) -> bool:
    """PEFT's ``check_target_module_exists``: a string is ``re.fullmatch``-ed against the full name;
    a list matches a name equal to an entry or ending in ``"." + entry``."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _pattern_value(pattern: dict | None, name: str, default):
    from .formats.common import pattern_lookup

    return pattern_lookup(pattern, name, default)


def lora_params_for(
    base: BaseModel,
    target_modules: str | Iterable[str],
    r: int,
    rank_pattern: dict[str, int] | None = None,
    layers_to_transform: Iterable[int] | int | None = None,
) -> dict[str, Any]:
    """LoRA parameters a PEFT ``LoraConfig`` would create on ``base``: Σ r_m·(out_m + in_m) over matched modules.

    Follows peft 0.21: ``target_modules`` matching as :func:`target_matches`; ``"all-linear"`` means every
    linear layer except the output layer (``lm_head``); ``rank_pattern`` lookup as ``get_pattern_key``;
    ``layers_to_transform`` keeps only those decoder layers. Returns ``{"params", "by_type", "modules"}``.
    """
    if isinstance(layers_to_transform, int):
        layers_to_transform = [layers_to_transform]
    keep_layers = set(layers_to_transform) if layers_to_transform is not None else None
    all_linear = isinstance(target_modules, str) and target_modules.lower() == "all-linear"
    total = 0
    by_type: dict[str, int] = {}
    n = 0
    for name, ms in base.modules.items():
        if all_linear:
            hit = ms.kind == "linear" and ms.mtype != "lm_head"
        else:
            hit = target_matches(name, target_modules)
        if not hit:
            continue
        if keep_layers is not None and (ms.layer is None or ms.layer not in keep_layers):
            continue
        k = int(_pattern_value(rank_pattern, name, r))
        p = k * (ms.out + ms.inp)
        total += p
        by_type[ms.mtype] = by_type.get(ms.mtype, 0) + p
        n += 1
    return {"params": total, "by_type": dict(sorted(by_type.items())), "modules": n}
