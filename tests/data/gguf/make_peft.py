"""Rebuilds the PEFT side of tests/data/gguf: the tiny bases' config.json and the seeded PEFT LoRA adapters that
llama.cpp's convert_lora_to_gguf.py turned into the .gguf files here (README.md: the commands).

    python tests/data/gguf/make_peft.py OUT_DIR

Deterministic (CPU torch, fixed seeds): the adapters come out bit for bit as committed. No llama.cpp code is
used or needed here; the base weights are not kept (the converter reads only config.json).
"""

import json
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
BASES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
ADAPTERS = {
    "plain": dict(r=4, lora_alpha=12, target_modules=TARGETS + ["embed_tokens", "lm_head"]),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=TARGETS,
                   rank_pattern={"k_proj": 2, "down_proj": 6}, alpha_pattern={"v_proj": 3, "o_proj": 16}),
}


def build(root: Path) -> None:
    for arch, (cfg_cls, model_cls) in BASES.items():
        base = root / f"{arch}-base"
        base.mkdir(parents=True, exist_ok=True)
        cfg = cfg_cls(**SIZES, architectures=[model_cls.__name__], dtype="float32")
        cfg.to_json_file(str(base / "config.json"))
        for kind, kw in ADAPTERS.items():
            pm = get_peft_model(model_cls(cfg_cls(**SIZES)), LoraConfig(**kw))
            g = torch.Generator().manual_seed(1 + len(kind) + len(arch))
            with torch.no_grad():
                for name, p in pm.named_parameters():
                    if "lora_" in name:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            out = root / f"{arch}-{kind}"
            pm.save_pretrained(str(out), save_embedding_layers=False)
            cfg = json.loads((out / "adapter_config.json").read_text())
            cfg["base_model_name_or_path"] = f"../{arch}-base"
            cfg["target_modules"] = sorted(cfg["target_modules"])  # PEFT saves a set: its order follows the hash seed
            (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            (out / "README.md").unlink(missing_ok=True)


if __name__ == "__main__":
    build(Path(sys.argv[1]))
