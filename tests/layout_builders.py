"""One small adapter of every layout in ``lora_inspect.formats.LAYOUTS``, with its ΔW computed independently
in float64 from the raw tensors it was written from: the one registry → builder mapping (:data:`BUILDERS`),
used by ``tests/test_layout_registry.py`` (every layout × every command) and ``tests/test_convert_matrix.py``.

A new layout adds its builder here; a layout in ``LAYOUTS`` without an entry fails the registry test.
``expected`` is keyed by the canonical (pipeline component, dotted module path) that ``convert`` and
``merge`` match modules by (``Layout.canonical_name``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.builders import build_peft, kohya_delta, write_kohya, write_mlx

DATA = Path(__file__).resolve().parent / "data" / "gguf"
Key = tuple[str | None, str]


@dataclass
class Built:
    path: Path
    expected: dict[Key, torch.Tensor]  # canonical name → ΔW (float64, from the raw tensors)
    gguf_base: Path | None = None  # a base config.json folder for --to gguf; None: not an LLM adapter GGUF holds


def rnd(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * 0.3


def llama_config(d: Path) -> Path:
    """A tiny Llama base config (hidden 32, 4 heads over 2 KV heads): what --to gguf reads."""
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "num_attention_heads": 4,
           "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 64, "vocab_size": 96}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def src_peft(tmp: Path) -> Built:
    b = build_peft(tmp, arch="llama", seed=11, r=4, lora_alpha=8, use_rslora=True,
                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                   rank_pattern={"v_proj": 6}, alpha_pattern={"model.layers.1.self_attn.o_proj": 3})
    names = [n for n in b.merged_state if n.endswith("_proj.weight") and "lora" not in n
             and not torch.equal(b.merged_state[n], b.base_state[n])]
    return Built(b.path, {(None, n.removesuffix(".weight")): b.delta(n.removesuffix(".weight")) for n in names},
                 llama_config(tmp / "base"))


def src_kohya(tmp: Path) -> Built:
    g = torch.Generator().manual_seed(1)
    mods = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (rnd(g, 4, 16), rnd(g, 16, 4), 2.0),
            "lora_unet_down_blocks_0_resnets_0_conv1": (rnd(g, 3, 8, 3, 3), rnd(g, 8, 3, 1, 1), 6.0),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (rnd(g, 2, 12), rnd(g, 12, 2), None)}
    path = write_kohya(tmp / "k.safetensors", mods)
    paths = [("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
             ("unet", "down_blocks.0.resnets.0.conv1"), ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj")]
    return Built(path, {p: kohya_delta(*m) for p, m in zip(paths, mods.values())})


def src_mlx(tmp: Path) -> Built:
    g = torch.Generator().manual_seed(2)
    mods = {"model.layers.0.self_attn.q_proj": (rnd(g, 32, 4), rnd(g, 4, 32)),
            "model.layers.1.self_attn.v_proj": (rnd(g, 16, 4), rnd(g, 4, 32)),
            "model.layers.1.mlp.down_proj": (rnd(g, 32, 4), rnd(g, 4, 64))}
    path = write_mlx(tmp / "mlx", mods, scale=2.5)
    return Built(path, {(None, n): 2.5 * (b.double() @ a.double()) for n, (b, a) in mods.items()},
                 llama_config(tmp / "base"))


def src_diffusers(tmp: Path) -> Built:
    g = torch.Generator().manual_seed(3)
    mods = {"unet.down_blocks.0.attentions.0.proj_in": (rnd(g, 16, 3), rnd(g, 3, 16)),
            "text_encoder.text_model.encoder.layers.0.self_attn.k_proj": (rnd(g, 12, 2), rnd(g, 2, 12))}
    sd = {}
    for n, (b, a) in mods.items():
        sd[n + ".lora_A.weight"], sd[n + ".lora_B.weight"] = a.contiguous(), b.contiguous()
    save_file(sd, str(tmp / "pytorch_lora_weights.safetensors"))
    return Built(tmp / "pytorch_lora_weights.safetensors",
                 {tuple(n.split(".", 1)): b.double() @ a.double() for n, (b, a) in mods.items()})  # type: ignore[misc]


def src_lycoris(tmp: Path) -> Built:
    g = torch.Generator().manual_seed(4)
    w1a, w1b, w2a, w2b = rnd(g, 16, 3), rnd(g, 3, 16), rnd(g, 16, 3), rnd(g, 3, 16)
    k1, k2a, k2b = rnd(g, 4, 3), rnd(g, 4, 2), rnd(g, 2, 4)
    sd = {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": w1a,
          "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_b": w1b,
          "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w2_a": w2a,
          "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w2_b": w2b,
          "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(1.5),
          "lora_te_text_model_encoder_layers_0_mlp_fc1.lokr_w1": k1,
          "lora_te_text_model_encoder_layers_0_mlp_fc1.lokr_w2_a": k2a,
          "lora_te_text_model_encoder_layers_0_mlp_fc1.lokr_w2_b": k2b,
          "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "ly.safetensors"))
    loha = (1.5 / 3) * (w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double())
    lokr = (1.0 / 2) * torch.kron(k1.double(), k2a.double() @ k2b.double())
    return Built(tmp / "ly.safetensors", {("unet", "down_blocks.0.attentions.0.proj_in"): loha,
                                          ("text_encoder", "text_model.encoder.layers.0.mlp.fc1"): lokr})


def src_attn_procs(tmp: Path) -> Built:
    """diffusers ≤ 0.13 ``save_attn_procs``: <block>.processor.to_{q,out}_lora.{down,up}.weight, scale 1."""
    g = torch.Generator().manual_seed(5)
    block = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    sd, expected = {}, {}
    for proj, real in (("to_q", "to_q"), ("to_out", "to_out.0")):
        down, up = rnd(g, 3, 16), rnd(g, 16, 3)
        sd[f"{block}.processor.{proj}_lora.down.weight"], sd[f"{block}.processor.{proj}_lora.up.weight"] = down, up
        expected[(None, f"{block}.{real}")] = up.double() @ down.double()
    save_file(sd, str(tmp / "pytorch_lora_weights.safetensors"))
    return Built(tmp / "pytorch_lora_weights.safetensors", expected)


def src_peft_loha(tmp: Path) -> Built:
    """A PEFT LoHa directory (peft_type LOHA): s = α/r, ΔW = s·(w1a@w1b)⊙(w2a@w2b)."""
    g = torch.Generator().manual_seed(6)
    r, alpha, sd, expected = 3, 6.0, {}, {}
    for path, (out, inp) in (("model.layers.0.self_attn.q_proj", (32, 32)), ("model.layers.1.self_attn.v_proj", (16, 32))):
        w1a, w1b, w2a, w2b = rnd(g, out, r), rnd(g, r, inp), rnd(g, out, r), rnd(g, r, inp)
        for role, t in (("hada_w1_a", w1a), ("hada_w1_b", w1b), ("hada_w2_a", w2a), ("hada_w2_b", w2b)):
            sd[f"base_model.model.{path}.{role}"] = t
        expected[(None, path)] = (alpha / r) * (w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double())
    d = tmp / "loha"
    d.mkdir()
    save_file(sd, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "r": r, "alpha": alpha,
                                                       "target_modules": ["q_proj", "v_proj"]}))
    return Built(d, expected, llama_config(tmp / "base"))


XLABS_H, XLABS_MLP = 8, 32


def src_xlabs(tmp: Path) -> Built:
    """x-flux processor keys, ΔW = up·down (no α), a single block's qkv_lora on linear1's first 3h rows."""
    from lora_inspect.convert.names import kohya_to_dotted

    g = torch.Generator().manual_seed(7)
    h, mods = XLABS_H, {"double_blocks.0.processor.qkv_lora1": ("double_blocks.0.img_attn.qkv", 3 * XLABS_H, XLABS_H),
                        "double_blocks.0.processor.proj_lora1": ("double_blocks.0.img_attn.proj", XLABS_H, XLABS_H),
                        "single_blocks.0.processor.qkv_lora": ("single_blocks.0.linear1", 3 * XLABS_H, XLABS_H),
                        "single_blocks.0.processor.proj_lora": ("single_blocks.0.linear2", XLABS_H,
                                                                XLABS_H + XLABS_MLP)}
    sd, expected = {}, {}
    for key, (bfl, out, inp) in mods.items():
        down, up = rnd(g, 2, inp), rnd(g, out, 2)
        sd[key + ".down.weight"], sd[key + ".up.weight"] = down, up
        delta = up.double() @ down.double()
        if bfl.endswith("linear1"):  # x-flux adds it to the q/k/v rows of linear1's output only
            delta = torch.cat([delta, torch.zeros(XLABS_MLP, h, dtype=torch.float64)])
        expected[kohya_to_dotted("lora_unet_" + bfl.replace(".", "_"))] = delta
    save_file(sd, str(tmp / "xlabs.safetensors"))
    return Built(tmp / "xlabs.safetensors", expected)


def src_gguf(tmp: Path) -> Built:
    """llama.cpp's own convert_lora_to_gguf.py output of a PEFT LoRA on a tiny Qwen2 (tests/data/gguf): ΔW from the
    PEFT tensors it was made from, s = α/r = 12/4 (rows not permuted for qwen2)."""
    path = tmp / "qwen2.gguf"
    shutil.copy(DATA / "qwen2-plain-f32.gguf", path)
    sd = {k: v.double() for k, v in load_file(str(DATA / "qwen2-plain" / "adapter_model.safetensors")).items()}
    s, expected = 12 / 4, {}
    for k in sd:
        name = k.removeprefix("base_model.model.")
        if k.endswith(".lora_A.weight"):
            expected[(None, name.removesuffix(".lora_A.weight"))] = s * sd[k.replace("lora_A", "lora_B")] @ sd[k]
        elif k.endswith(".lora_embedding_A"):  # PEFT applies s·(B@A)ᵀ: ΔW (vocab, dim)
            expected[(None, name.removesuffix(".lora_embedding_A"))] = s * (sd[k.replace("_A", "_B")] @ sd[k]).T
    return Built(path, expected, DATA / "qwen2-base")


# layout name (LAYOUTS) → its builder; one entry per layout, in registry order
BUILDERS: dict[str, Callable[[Path], Built]] = {
    "gguf": src_gguf, "lycoris": src_lycoris, "xlabs": src_xlabs, "kohya": src_kohya, "mlx": src_mlx,
    "diffusers": src_diffusers, "diffusers-attn-procs": src_attn_procs, "peft-lycoris": src_peft_loha, "peft": src_peft,
}
