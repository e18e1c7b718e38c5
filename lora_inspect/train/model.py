"""A small decoder-only transformer, readable top to bottom (in the spirit of nanoGPT).

Architecture (Llama, Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models"):

- token embedding ``model.embed_tokens`` → N blocks → RMSNorm ``model.norm`` → ``lm_head``;
- each block is pre-norm: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``;
- RMSNorm (Zhang & Sennrich 2019): ``x / sqrt(mean(x²) + eps) · g``;
- rotary position embedding, RoPE (Su et al. 2021, "RoFormer"), in the "rotate half" layout that
  Hugging Face's Llama uses: channel i pairs with channel i + head_dim/2;
- SwiGLU MLP (Shazeer 2020, "GLU Variants Improve Transformer"): ``down(silu(gate(x)) * up(x))``;
- causal scaled-dot-product attention (``F.scaled_dot_product_attention(is_causal=True)``).

Module names are Llama's (``model.layers.N.self_attn.q_proj`` …) so that PEFT's ``target_modules``
and adapters trained here mean the same thing on this model and on a Hugging Face Llama.

A model is stored as a directory with ``config.json`` + ``model.safetensors``. When
``transformers`` is installed, a local Hugging Face causal-LM directory can be used as the base
instead (:func:`load_base`); it is only ever read from disk, never downloaded.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InspectError
from .io import atomic_save_safetensors, atomic_write_json, load_safetensors

__all__ = ["ModelConfig", "CausalLM", "PRESETS", "build_model", "save_model", "load_model", "load_base", "logits_of"]

FORMAT_TAG = "lora-inspect/model/1"


@dataclass
class ModelConfig:
    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention when < n_heads
    hidden_dim: int = 176  # SwiGLU inner width (≈ 8/3 · dim, rounded to a multiple of 16)
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    model_type: str = "lora-inspect"

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise InspectError(f"model dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise InspectError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {kv}")
        if (self.dim // self.n_heads) % 2:
            raise InspectError("head dim must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"format"})
        if unknown:
            raise InspectError(f"model config has unknown keys {unknown}")
        return cls(**{k: v for k, v in d.items() if k in known})


# Named sizes. "tiny" is what the samples and tests use; "base100m" is ≈ 100 M parameters.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),
    "small": ModelConfig(dim=128, n_layers=4, n_heads=4, hidden_dim=352),
    "medium": ModelConfig(vocab_size=8192, dim=384, n_layers=6, n_heads=6, hidden_dim=1024),
    "base100m": ModelConfig(vocab_size=32000, dim=640, n_layers=12, n_heads=10, hidden_dim=1728, max_seq_len=2048),
}


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · weight  (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_cache(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, head_dim) for RoPE: angle(t, i) = t · theta^(-2i/head_dim) (RoFormer eq. 34)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, hd), "rotate half" layout
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd) rotated by position: x·cos + rotate_half(x)·sin."""
    x1, x2 = x.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rot.float() * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv = cfg.n_kv_heads or cfg.n_heads
        self.hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, self.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.dim, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.dim, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, Hkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv != self.n_heads:  # grouped-query attention: repeat each kv head
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))  # (B, T, D)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) ⊙ up(x))  (Shazeer 2020)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class CausalLM(nn.Module):
    """Token ids (B, T) → logits (B, T, V)."""

    rope_cos: torch.Tensor  # (max_seq_len, head_dim) buffers, not saved
    rope_sin: torch.Tensor

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init)
        # residual projections scaled by 1/sqrt(2·n_layers) (GPT-2, Radford et al. 2019, §2.3)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.data.mul_(1.0 / math.sqrt(2 * cfg.n_layers))
        cos, sin = rope_cache(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @staticmethod
    def _init(m: nn.Module) -> None:
        """Variance-preserving init (std 1/√fan_in, embeddings std 1), so that an untrained model
        already has O(1) activations, attention scores and logits: a random base that behaves like a
        trained one as far as the planted task cares (every direction of every weight matters)."""
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=m.in_features**-0.5)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=1.0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        if t > self.config.max_seq_len:
            raise InspectError(f"sequence length {t} exceeds max_seq_len {self.config.max_seq_len}")
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]  # (T, hd)
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        for block in self.model.layers:
            x = block(x, cos, sin)  # (B, T, D)
        return self.lm_head(self.model.norm(x))  # (B, T, V)


def build_model(cfg: ModelConfig | str, seed: int = 0) -> CausalLM:
    """A freshly initialised model; the same seed gives the same weights on every machine (CPU init)."""
    if isinstance(cfg, str):
        if cfg not in PRESETS:
            raise InspectError(f"unknown model size {cfg!r}", hint=f"one of {', '.join(PRESETS)} or a model directory")
        cfg = PRESETS[cfg]
    g = torch.random.fork_rng(devices=[])
    with g:
        torch.manual_seed(seed)
        return CausalLM(cfg)


def save_model(model: CausalLM, directory: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (atomically) into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    atomic_save_safetensors(sd, d / "model.safetensors", metadata={"format": "pt"})
    atomic_write_json({"format": FORMAT_TAG, **model.config.to_dict()}, d / "config.json")
    return d


def load_model(directory: str | Path) -> CausalLM:
    """Read a model written by :func:`save_model`."""
    d = Path(directory)
    cfg_path, w_path = d / "config.json", d / "model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise InspectError(f"{d}: not a model directory (needs config.json and model.safetensors)")
    try:
        cfg = ModelConfig.from_dict(json.loads(cfg_path.read_text()))
    except (ValueError, TypeError) as e:
        raise InspectError(f"{cfg_path}: bad model config ({e})") from None
    model = CausalLM(cfg)
    sd = load_safetensors(w_path)
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise InspectError(f"{w_path}: weights do not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def is_own_model_dir(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("format") == FORMAT_TAG
    except (OSError, ValueError):
        return False


def load_base(spec: str | Path, seed: int = 0) -> tuple[nn.Module, dict]:
    """The base model named by ``spec``: a preset size, one of our model dirs, or a local HF directory.

    Returns ``(model, info)`` where ``info`` says how to find it again:
    ``{"kind": "preset"|"dir"|"hf", ...}``.
    """
    s = str(spec)
    if s in PRESETS:
        return build_model(s, seed=seed), {"kind": "preset", "name": s, "seed": seed}
    p = Path(s)
    if not p.exists():
        raise InspectError(f"model {s!r}: neither a size ({', '.join(PRESETS)}) nor an existing directory")
    if is_own_model_dir(p):
        return load_model(p), {"kind": "dir", "path": str(p.resolve())}
    if (p / "config.json").is_file():
        from ..optional import require

        AutoModelForCausalLM = require("transformers", f"{p}: a Hugging Face model directory").AutoModelForCausalLM
        try:
            model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, torch_dtype=torch.float32)
        except Exception as e:  # transformers raises many kinds
            raise InspectError(f"{p}: could not load as a Hugging Face causal LM ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        return model, {"kind": "hf", "path": str(p.resolve())}
    raise InspectError(f"{p}: not a model directory (no config.json)")


def logits_of(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) → (B, T, V) for our models and Hugging Face causal LMs alike."""
    out = model(input_ids)
    return out if isinstance(out, torch.Tensor) else out.logits
