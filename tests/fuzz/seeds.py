"""Seed inputs for the fuzzer: the bundled samples and small generated adapters of every layout.

Layouts and key names follow docs/formats.md: PEFT (directory, bare .safetensors, .bin), kohya,
diffusers (``lora_A``/``lora_B`` with a ``lora_adapter_metadata`` header, the older ``.lora.down`` keys
in a .bin, and the attention-processor ``to_q_lora.down`` keys), mlx-lm (directory, transposed factors),
LyCORIS (LoHa, LoKr, Tucker LoCon) and a PEFT LoHa directory.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .sfile import Entry, SFile, build

__all__ = ["Seed", "make_seeds", "REPO"]

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Seed:
    name: str
    path: Path  # what the commands are given (a directory or a file)
    weights: Path  # the tensor file inside (== path for a bare file)
    config: Path | None  # adapter_config.json, if any
    layout: str  # peft | kohya | diffusers | mlx
    meta_config: bool = False  # a PEFT config in the lora_adapter_metadata header entry

    @property
    def is_dir(self) -> bool:
        return self.path != self.weights


def _f32(rng: np.random.Generator, *shape: int) -> bytes:
    return (rng.standard_normal(shape) * 0.1).astype("<f4").tobytes()


def _peft_entries(rng, prefix: str, mods: dict[str, tuple[int, int]], r: int, a_key: str = "lora_A.weight",
                  b_key: str = "lora_B.weight") -> list[Entry]:
    out = []
    for m, (o, i) in mods.items():
        out.append(Entry(f"{prefix}{m}.{a_key}", "F32", [r, i], _f32(rng, r, i)))
        out.append(Entry(f"{prefix}{m}.{b_key}", "F32", [o, r], _f32(rng, o, r)))
    return out


LLAMA_MODS = {
    "model.layers.0.self_attn.q_proj": (16, 16), "model.layers.0.self_attn.v_proj": (8, 16),
    "model.layers.1.self_attn.q_proj": (16, 16), "model.layers.1.mlp.down_proj": (16, 24),
}
PEFT_CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
               "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "use_dora": False,
               "fan_in_fan_out": False, "bias": "none", "modules_to_save": None, "task_type": "CAUSAL_LM",
               "base_model_name_or_path": "tiny", "layers_to_transform": None, "lora_dropout": 0.0}


def _save_bin(path: Path, entries: list[Entry]) -> None:
    import torch

    state = {}
    for e in entries:
        state[e.name] = torch.from_numpy(np.frombuffer(e.data, dtype="<f4").reshape(e.shape).copy())
    torch.save(state, str(path))


def _copy_sample(dst: Path, name: str) -> Path:
    d = dst / name
    d.mkdir(parents=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(REPO / "samples" / name / f, d / f)
    return d


def make_seeds(dst: Path, seed: int = 0) -> list[Seed]:
    """Write every seed under ``dst`` (fresh) and return them."""
    rng = np.random.default_rng(seed)
    dst.mkdir(parents=True, exist_ok=True)
    seeds: list[Seed] = []
    for name in ("planted", "text"):
        d = _copy_sample(dst, name)
        seeds.append(Seed(f"sample-{name}", d, d / "adapter_model.safetensors", d / "adapter_config.json", "peft"))
    k = dst / "planted-kohya.safetensors"
    shutil.copyfile(REPO / "samples" / "planted-kohya.safetensors", k)
    seeds.append(Seed("sample-planted-kohya", k, k, None, "kohya"))

    # PEFT directory (safetensors) and (bin)
    entries = _peft_entries(rng, "base_model.model.", LLAMA_MODS, 4)
    d = dst / "peft-dir"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes(build(SFile(entries, {"format": "pt"})))
    (d / "adapter_config.json").write_text(json.dumps(PEFT_CONFIG, indent=2))
    seeds.append(Seed("peft-dir", d, d / "adapter_model.safetensors", d / "adapter_config.json", "peft"))
    d = dst / "peft-dir-bin"
    d.mkdir()
    _save_bin(d / "adapter_model.bin", entries)
    (d / "adapter_config.json").write_text(json.dumps(PEFT_CONFIG, indent=2))
    seeds.append(Seed("peft-dir-bin", d, d / "adapter_model.bin", d / "adapter_config.json", "peft"))
    # bare PEFT files
    f = dst / "peft-bare.safetensors"
    f.write_bytes(build(SFile(entries, {"format": "pt"})))
    seeds.append(Seed("peft-bare-st", f, f, None, "peft"))
    f = dst / "peft-bare.bin"
    _save_bin(f, entries)
    seeds.append(Seed("peft-bare-bin", f, f, None, "peft"))

    # kohya with a conv module and alphas
    ke = []
    for m, (o, i) in {"lora_unet_down_blocks_0_attentions_0_proj_in": (8, 8),
                      "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (12, 12)}.items():
        ke += [Entry(f"{m}.alpha", "F32", [], np.float32(2.0).tobytes()),
               Entry(f"{m}.lora_down.weight", "F32", [4, i], _f32(rng, 4, i)),
               Entry(f"{m}.lora_up.weight", "F32", [o, 4], _f32(rng, o, 4))]
    ke += [Entry("lora_unet_conv_in.alpha", "F32", [], np.float32(4.0).tobytes()),
           Entry("lora_unet_conv_in.lora_down.weight", "F32", [4, 3, 3, 3], _f32(rng, 4, 3, 3, 3)),
           Entry("lora_unet_conv_in.lora_up.weight", "F32", [8, 4, 1, 1], _f32(rng, 8, 4, 1, 1))]
    f = dst / "kohya.safetensors"
    f.write_bytes(build(SFile(ke, {"ss_network_dim": "4", "ss_network_alpha": "2", "ss_base_model_version": "sd_v1"})))
    seeds.append(Seed("kohya", f, f, None, "kohya"))

    # diffusers with lora_adapter_metadata
    dmods = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (16, 16),
             "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k": (16, 16),
             "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (12, 12)}
    de = _peft_entries(rng, "", dmods, 4)
    meta_cfg = {"r": 4, "lora_alpha": 4, "target_modules": ["to_q", "to_k", "q_proj"], "rank_pattern": {},
                "alpha_pattern": {"to_k": 8}, "use_dora": False}
    f = dst / "diffusers-meta.safetensors"
    f.write_bytes(build(SFile(de, {"format": "pt", "lora_adapter_metadata": json.dumps(meta_cfg)})))
    seeds.append(Seed("diffusers-meta", f, f, None, "diffusers", meta_config=True))
    # older diffusers keys in a .bin
    f = dst / "diffusers-old.bin"
    _save_bin(f, _peft_entries(rng, "", dmods, 4, "lora.down.weight", "lora.up.weight"))
    seeds.append(Seed("diffusers-old-bin", f, f, None, "diffusers"))
    # attention-processor layout (diffusers ≤ 0.13 training scripts)
    pe = []
    for blk in ("to_q", "to_out"):
        m = f"down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.{blk}_lora"
        pe += [Entry(f"{m}.down.weight", "F32", [4, 16], _f32(rng, 4, 16)),
               Entry(f"{m}.up.weight", "F32", [16, 4], _f32(rng, 16, 4))]
    f = dst / "diffusers-attnproc.safetensors"
    f.write_bytes(build(SFile(pe, {"format": "pt"})))
    seeds.append(Seed("diffusers-attnproc", f, f, None, "diffusers"))

    # mlx-lm directory: lora_a (in, r), lora_b (r, out)
    me = []
    for m, (o, i) in {"model.layers.0.self_attn.q_proj": (16, 16), "model.layers.1.self_attn.q_proj": (16, 16)}.items():
        me += [Entry(f"{m}.lora_a", "F32", [i, 4], _f32(rng, i, 4)), Entry(f"{m}.lora_b", "F32", [4, o], _f32(rng, 4, o))]
    d = dst / "mlx-dir"
    d.mkdir()
    (d / "adapters.safetensors").write_bytes(build(SFile(me, None)))
    (d / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 2,
         "lora_parameters": {"rank": 4, "scale": 20.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]}}))
    seeds.append(Seed("mlx-dir", d, d / "adapters.safetensors", d / "adapter_config.json", "mlx"))
    seeds += _lycoris_seeds(dst, rng)
    return seeds


def _lycoris_seeds(dst: Path, rng: np.random.Generator) -> list[Seed]:
    """A LyCORIS file (LoHa, LoKr, LoCon with a Tucker core; kohya names) and a PEFT LoHa directory."""
    le: list[Entry] = []
    h = "lora_unet_down_blocks_0_attentions_0_proj_in"
    le += [Entry(f"{h}.hada_w1_a", "F32", [8, 2], _f32(rng, 8, 2)), Entry(f"{h}.hada_w1_b", "F32", [2, 8], _f32(rng, 2, 8)),
           Entry(f"{h}.hada_w2_a", "F32", [8, 2], _f32(rng, 8, 2)), Entry(f"{h}.hada_w2_b", "F32", [2, 8], _f32(rng, 2, 8)),
           Entry(f"{h}.alpha", "F32", [], np.float32(1.0).tobytes())]
    k = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    le += [Entry(f"{k}.lokr_w1", "F32", [2, 2], _f32(rng, 2, 2)), Entry(f"{k}.lokr_w2_a", "F32", [6, 2], _f32(rng, 6, 2)),
           Entry(f"{k}.lokr_w2_b", "F32", [2, 6], _f32(rng, 2, 6)), Entry(f"{k}.alpha", "F32", [], np.float32(2.0).tobytes())]
    c = "lora_unet_conv_in"
    le += [Entry(f"{c}.lora_down.weight", "F32", [2, 3, 1, 1], _f32(rng, 2, 3, 1, 1)),
           Entry(f"{c}.lora_mid.weight", "F32", [2, 2, 3, 3], _f32(rng, 2, 2, 3, 3)),
           Entry(f"{c}.lora_up.weight", "F32", [8, 2, 1, 1], _f32(rng, 8, 2, 1, 1)),
           Entry(f"{c}.alpha", "F32", [], np.float32(2.0).tobytes())]
    f = dst / "lycoris.safetensors"
    f.write_bytes(build(SFile(le, {"ss_network_module": "lycoris.kohya"})))
    pe: list[Entry] = []
    for m in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        pre = f"base_model.model.{m}"
        pe += [Entry(f"{pre}.hada_w1_a", "F32", [16, 2], _f32(rng, 16, 2)),
               Entry(f"{pre}.hada_w1_b", "F32", [2, 16], _f32(rng, 2, 16)),
               Entry(f"{pre}.hada_w2_a", "F32", [16, 2], _f32(rng, 16, 2)),
               Entry(f"{pre}.hada_w2_b", "F32", [2, 16], _f32(rng, 2, 16))]
    d = dst / "peft-loha"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes(build(SFile(pe, {"format": "pt"})))
    (d / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LOHA", "r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {},
         "alpha_pattern": {}, "module_dropout": 0.0, "rank_dropout": 0.0, "use_effective_conv2d": False}))
    return [Seed("lycoris", f, f, None, "kohya"),
            Seed("peft-loha", d, d / "adapter_model.safetensors", d / "adapter_config.json", "peft")]
