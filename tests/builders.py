"""Adapters built for tests: real PEFT on tiny transformers models (no downloads), and hand-built
kohya / diffusers / mlx-lm files from the key conventions in docs/formats.md.

Shared by every test module: add builders here (append; keep existing signatures stable).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


def tiny_llama(seed: int = 0, vocab: int = 96, hidden: int = 32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2 - 8, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_flux(layers: int = 1, single_layers: int = 1):
    """A tiny diffusers FluxTransformer2DModel in float64 (seeded): the oracle model of the Flux tests."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=layers, num_single_layers=single_layers,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)).to(torch.float64)


def tiny_gpt2(seed: int = 0, vocab: int = 80, hidden: int = 32, layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


@dataclass
class PeftBuild:
    path: Path  # the saved adapter directory
    model: object  # the PeftModel (unmerged)
    base_state: dict[str, torch.Tensor]  # base weights before the adapter, float64 copies
    merged_state: dict[str, torch.Tensor]  # PEFT's merge_and_unload() weights, float64

    def delta(self, module: str) -> torch.Tensor:
        """PEFT's own change to `<module>.weight` (merged − base), float64, in the base weight's layout."""
        key = module + ".weight"
        return self.merged_state[key] - self.base_state[key]


def build_peft(
    tmp: Path,
    *,
    arch: str = "llama",
    seed: int = 0,
    std: float = 0.3,
    safe_serialization: bool = True,
    planted: dict[str, int] | None = None,
    adalora: bool = False,
    model=None,
    **lora_kwargs,
) -> PeftBuild:
    """Wrap a tiny model with PEFT, fill every adapter tensor with seeded noise, save it, merge it.

    ``planted``: {module-name regex: k} makes the matching modules' B@A exactly rank k (B's columns
    past k zeroed), for planted-structure tests.
    """
    import re

    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    if model is None:
        model = tiny_llama(seed) if arch == "llama" else tiny_gpt2(seed)
    base_state = {k: v.detach().to(torch.float64).clone() for k, v in model.state_dict().items()}
    if adalora:
        cfg = AdaLoraConfig(total_step=10, **lora_kwargs)
    else:
        cfg = LoraConfig(**lora_kwargs)
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                if "magnitude" in name:
                    p.copy_(p.abs() * (1 + 0.1 * torch.rand(p.shape, generator=g)))
                else:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
        if planted:
            for name, mod in pm.named_modules():
                for rx, k in planted.items():
                    if re.search(rx, name) and hasattr(mod, "lora_B") and "default" in getattr(mod, "lora_B", {}):
                        mod.lora_B["default"].weight[:, k:] = 0
            for name, mod in pm.named_modules():
                for rx, k in planted.items():
                    if re.search(rx, name) and hasattr(mod, "lora_embedding_B") and "default" in mod.lora_embedding_B:
                        mod.lora_embedding_A["default"][k:, :] = 0
    out = tmp / f"adapter-{arch}-{seed}"
    pm.save_pretrained(str(out), safe_serialization=safe_serialization)
    import copy

    merged = copy.deepcopy(pm).merge_and_unload()
    merged_state = {k: v.detach().to(torch.float64).clone() for k, v in merged.state_dict().items()}
    return PeftBuild(out, pm, base_state, merged_state)


def svdvals64(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x.to(torch.float64))


def planted_factors(out_dim: int, in_dim: int, r: int, k: int, seed: int, std: float = 1.0):
    """Random B (out, r), A (r, in) whose product has rank exactly k (B columns past k are zero)."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(out_dim, r, generator=g) * std
    a = torch.randn(r, in_dim, generator=g) * std
    b[:, k:] = 0
    return b, a


def write_kohya(path: Path, modules: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]],
                metadata: dict[str, str] | None = None, dtype=torch.float32) -> Path:
    """modules: {prefix (e.g. 'lora_unet_..._proj_in'): (down (r, in[,kh,kw]), up (out, r[,1,1]), alpha or None)}."""
    sd = {}
    for name, (down, up, alpha) in modules.items():
        sd[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
        sd[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    save_file(sd, str(path), metadata=metadata or {"ss_network_dim": "8", "ss_network_alpha": "4"})
    return path


def kohya_delta(down: torch.Tensor, up: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """kohya: ΔW = (α/r)·up@down, conv flattened to (out, in·kh·kw); α missing/0 → r."""
    r = down.shape[0]
    a = float(alpha) if alpha else float(r)
    return (a / r) * (up.reshape(up.shape[0], r).double() @ down.reshape(r, -1).double())


def write_mlx(dirpath: Path, modules: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float = 20.0,
              rank: int | None = None) -> Path:
    """modules: {path: (B (out, r), A (r, in))} in PEFT orientation; stored transposed as mlx-lm does."""
    dirpath.mkdir(parents=True, exist_ok=True)
    sd = {}
    for name, (b, a) in modules.items():
        sd[f"{name}.lora_a"] = a.T.contiguous().float()
        sd[f"{name}.lora_b"] = b.T.contiguous().float()
        rank = rank or a.shape[0]
    save_file(sd, str(dirpath / "adapters.safetensors"))
    cfg = {"fine_tune_type": "lora", "num_layers": 2,
           "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": ["self_attn.q_proj"]}}
    (dirpath / "adapter_config.json").write_text(json.dumps(cfg))
    return dirpath


def run_cli(*args: str):
    """Run the CLI in-process; returns the click Result (exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    from lora_inspect.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def rel_close(a, b, tol: float) -> bool:
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max()) <= tol * max(float(b.abs().max()), 1e-300)


__all__ = [
    "tiny_llama", "tiny_gpt2", "build_peft", "PeftBuild", "svdvals64", "planted_factors", "write_kohya",
    "kohya_delta", "write_mlx", "run_cli", "rel_close", "math",
]


# --- helpers shared by the test modules (appended) -------------------------------------------------


def cli_json(*args: str) -> dict:
    """Run a command with ``--json``; assert it succeeded quietly and return the parsed document."""
    res = run_cli(*args, "--json")
    assert res.exit_code == 0, (res.exit_code, res.stderr, res.stdout)
    assert res.stderr == "", res.stderr
    return json.loads(res.stdout)


def peft_lora_layers(peft_model) -> dict:
    """{module name without ``base_model.model.``: PEFT LoraLayer} for every adapted module."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in peft_model.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.r:
            out[name.removeprefix("base_model.model.")] = mod
    return out


def read_st(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, float64 (an independent read, no lora_inspect code)."""
    from safetensors.torch import load_file

    return {k: v.to(torch.float64) for k, v in load_file(str(path)).items()}


def sv_close(ours, ref, tol: float = 1e-5) -> None:
    """Assert two descending spectra agree to tol·σ₁ (shorter one zero-padded)."""
    ours = torch.as_tensor(list(ours), dtype=torch.float64)
    ref = torch.as_tensor(ref, dtype=torch.float64).flatten()
    n = max(len(ours), len(ref))
    a = torch.zeros(n, dtype=torch.float64)
    b = torch.zeros(n, dtype=torch.float64)
    a[: len(ours)] = ours
    b[: len(ref)] = torch.sort(ref, descending=True).values
    s1 = float(b.abs().max())
    err = float((a - b).abs().max())
    assert err <= tol * max(s1, 1e-300), f"spectra differ by {err:.3g} (σ₁ = {s1:.6g}): {a.tolist()} vs {b.tolist()}"


def write_safetensors_raw(path: Path, header: dict, data: bytes = b"", *, header_len: int | None = None) -> Path:
    """A safetensors file written byte by byte (for corrupt-file tests): 8-byte length, JSON, data."""
    import struct

    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


__all__ += ["cli_json", "peft_lora_layers", "read_st", "sv_close", "write_safetensors_raw"]


# ---- builders for footprint / check tests (appended) ----
def edit_peft_tensors(adapter_dir: Path, edit) -> Path:
    """Rewrite a PEFT directory's adapter_model.safetensors in place: ``edit(state_dict) -> state_dict``."""
    from safetensors.torch import load_file

    f = Path(adapter_dir) / "adapter_model.safetensors"
    sd = edit(dict(load_file(str(f))))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(f), metadata={"format": "pt"})
    return Path(adapter_dir)


def edit_peft_config(adapter_dir: Path, **changes) -> Path:
    """Change fields of a PEFT directory's adapter_config.json (a value of None deletes the field)."""
    p = Path(adapter_dir) / "adapter_config.json"
    cfg = json.loads(p.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    p.write_text(json.dumps(cfg, sort_keys=True))
    return Path(adapter_dir)


def meta_causal_lm(config_fields: dict):
    """A transformers causal LM built on the meta device from config.json fields (no memory, no download)."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    fields = dict(config_fields)
    cfg = CONFIG_MAPPING[fields.pop("model_type")](**fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return model


__all__ += ["edit_peft_tensors", "edit_peft_config", "meta_causal_lm"]


def write_hub(root: Path, n: int, seed: int = 0, corrupt: float = 0.02) -> dict[str, int]:
    """A tree of ``n`` small generated adapters for ``scan`` (mixed layouts, sizes and ranks; about
    ``corrupt`` of them damaged), seeded. Returns counts by kind. Layouts: PEFT directories (some with a
    second named adapter in a subfolder, as save_pretrained writes several), kohya files, mlx-lm directories."""
    import random

    rnd = random.Random(seed)
    counts: dict[str, int] = {}
    for i in range(n):
        group = root / f"org{i % 7}" / f"batch{i // 50}"
        group.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        hidden, r, layers = rnd.choice([16, 32, 64]), rnd.choice([2, 4, 8, 16]), rnd.choice([1, 2])
        kind = rnd.choices(["peft", "kohya", "mlx", "peft-multi"], weights=[5, 3, 1, 1])[0]
        mods = {f"model.layers.{layer}.self_attn.{p}": (torch.randn(hidden, r, generator=g) * torch.logspace(0, -1, r),
                                                         torch.randn(r, hidden, generator=g))
                for layer in range(layers) for p in ("q_proj", "v_proj")}
        if kind in ("peft", "peft-multi"):
            path = _hub_peft(group / f"a{i:05d}", mods, r)
            if kind == "peft-multi":
                _hub_peft(path / "second", {k: (b[:, :2], a[:2]) for k, (b, a) in mods.items()}, 2)
        elif kind == "kohya":
            path = write_kohya(group / f"a{i:05d}.safetensors",
                               {f"lora_te_text_model_encoder_layers_{k.split('.')[2]}_self_attn_{k.split('.')[-1]}": (a, b, r / 2)
                                for k, (b, a) in mods.items()})
        else:
            path = write_mlx(group / f"a{i:05d}", mods, scale=2.0)
        if rnd.random() < corrupt:
            kind = "corrupt"
            target = path / "adapter_model.safetensors" if path.is_dir() and (path / "adapter_model.safetensors").exists() \
                else (path / "adapters.safetensors" if path.is_dir() else path)
            data = target.read_bytes()
            target.write_bytes(data[: rnd.randrange(1, len(data) // 2)])
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _hub_peft(path: Path, mods: dict[str, tuple[torch.Tensor, torch.Tensor]], r: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    sd = {}
    for name, (b, a) in mods.items():
        sd[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        sd[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    save_file(sd, str(path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"],
           "base_model_name_or_path": "tiny", "task_type": "CAUSAL_LM"}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


# ---- tiny Hugging Face models, tokenizers and PEFT adapters on them (hfverify) ----
TINY_TEXT = ("the quick brown fox jumps over the lazy dog and the dog sleeps while the fox runs "
             "over the hill to the river where the fish swim and the birds sing in the trees ") * 6


def tiny_tokenizer(words: str = TINY_TEXT):
    """A word-level ``PreTrainedTokenizerFast`` over the words of ``words`` (+ [UNK], [PAD])."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1}
    for w in words.split():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def tiny_hf_model(directory: Path, arch: str = "llama", *, seed: int = 0, vocab: int = 64, tokenizer: bool = True,
                  hidden: int = 32, layers: int = 2) -> Path:
    """A tiny seeded Llama or GPT-2 causal LM (float32) saved with ``save_pretrained`` (+ a tokenizer)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=128)
        model = GPT2LMHeadModel(cfg)
    model.save_pretrained(str(directory), safe_serialization=True)
    if tokenizer:
        tiny_tokenizer().save_pretrained(str(directory))
    return Path(directory)


def tiny_hf_peft(base_dir: Path, out: Path, targets: list[str], *, r: int = 4, alpha: float = 8.0, seed: int = 1,
                 std: float = 0.2) -> Path:
    """A PEFT LoRA adapter on a tiny HF model with seeded random A and B (B ≠ 0), saved to ``out``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), torch_dtype=torch.float32)
    fan = getattr(model.config, "model_type", "") == "gpt2"
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, fan_in_fan_out=fan))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    pm.save_pretrained(str(out))
    return Path(out)


__all__ += ["TINY_TEXT", "tiny_tokenizer", "tiny_hf_model", "tiny_hf_peft"]


def in_thread(fn, timeout: float = 120.0) -> dict:
    """Run ``fn`` in a daemon thread and fail the test if it is still running after ``timeout`` s (it
    blocked: a FIFO opened for reading, say). The bound catches a hang, not slowness: the calls it guards
    return in milliseconds. Returns {"value": …} or {"error": exception}."""
    import threading

    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "blocked"
    return box
