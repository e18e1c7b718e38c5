"""Planted structure: a module whose ΔW has rank exactly k reports energy_rank = k at τ = 0.99, in every
layout (PEFT directory incl. an embedding, bare safetensors, kohya incl. a 3×3 conv, diffusers, mlx-lm)."""

from __future__ import annotations

import shutil

import pytest
import torch
from builders import build_peft, cli_json, planted_factors, write_kohya, write_mlx
from safetensors.torch import save_file

pytestmark = pytest.mark.filterwarnings("ignore")

TAU = "0.99"
R = 8


def _ranks(path) -> dict[str, dict]:
    doc = cli_json("rank", path, "--energy", TAU)
    assert doc["energy"] == 0.99
    return {m["name"]: m for m in doc["modules"]}


def _assert_planted(got: dict[str, dict], want: dict[str, int]):
    for name, k in want.items():
        m = got[name]
        assert m["energy_rank"] == k, (name, m["singular_values"])
        assert m["recommended_rank"] == k
        sv = m["singular_values"]
        assert len(sv) == m["rank"] and all(s <= 1e-6 * sv[0] for s in sv[k:]), (name, sv)


@pytest.fixture(scope="module")
def peft_planted(tmp_path_factory):
    return build_peft(
        tmp_path_factory.mktemp("planted"), r=R, lora_alpha=16, seed=3,
        target_modules=["q_proj", "v_proj", "embed_tokens"],
        planted={r"layers\.0\..*q_proj": 1, r"layers\.1\..*q_proj": 3, "v_proj": 2, "embed_tokens": 5},
    )


PEFT_WANT = {
    "model.layers.0.self_attn.q_proj": 1, "model.layers.1.self_attn.q_proj": 3,
    "model.layers.0.self_attn.v_proj": 2, "model.layers.1.self_attn.v_proj": 2, "model.embed_tokens": 5,
}


def test_planted_peft_directory(peft_planted):
    got = _ranks(peft_planted.path)
    _assert_planted(got, PEFT_WANT)
    assert got["model.embed_tokens"]["kind"] == "embedding"
    doc = cli_json("rank", peft_planted.path, "--energy", TAU)
    assert doc["summary"]["rank_pattern"] == PEFT_WANT
    assert doc["summary"]["uniform_rank"] == 8  # 5 → next power of two, capped at r = 8


def test_planted_bare_safetensors(peft_planted, tmp_path):
    f = tmp_path / "adapter.safetensors"
    shutil.copy(peft_planted.path / "adapter_model.safetensors", f)
    _assert_planted(_ranks(f), PEFT_WANT)


def test_planted_kohya_with_conv(tmp_path):
    up, down = planted_factors(24, 16, R, 3, seed=1)  # (B, A) = (up, down)
    te_up, te_down = planted_factors(20, 20, R, 4, seed=3)
    te_down[5:] = 0  # zero rows of A as well: the rank stays min(4, 5) = 4
    g = torch.Generator().manual_seed(2)
    conv_down = torch.randn(R, 8, 3, 3, generator=g)
    conv_up = torch.randn(16, R, 1, 1, generator=g)
    conv_up[:, 2:] = 0
    mods = {
        "lora_unet_mid_block_attentions_0_proj_in": (down, up, 4.0),
        "lora_unet_down_blocks_0_resnets_0_conv1": (conv_down, conv_up, None),
        "lora_te_text_model_encoder_layers_0_mlp_fc1": (te_down, te_up, 0.0),
    }
    want = {"lora_unet_mid_block_attentions_0_proj_in": 3, "lora_unet_down_blocks_0_resnets_0_conv1": 2,
            "lora_te_text_model_encoder_layers_0_mlp_fc1": 4}
    got = _ranks(write_kohya(tmp_path / "planted_kohya.safetensors", mods))
    _assert_planted(got, want)
    assert got["lora_unet_down_blocks_0_resnets_0_conv1"]["kind"] == "conv"


def test_planted_diffusers(tmp_path):
    sd, want = {}, {}
    for i, (name, k) in enumerate({"unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": 2,
                                   "text_encoder.text_model.encoder.layers.1.self_attn.out_proj": 5}.items()):
        b, a = planted_factors(32, 24, R, k, seed=10 + i)
        sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"], sd[f"{name}.alpha"] = a, b, torch.tensor(4.0)
        want[name] = k
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(sd, str(path))
    _assert_planted(_ranks(path), want)


def test_planted_mlx(tmp_path):
    mods, want = {}, {}
    for i, (name, k) in enumerate({"model.layers.0.self_attn.q_proj": 1, "model.layers.1.mlp.down_proj": 6}.items()):
        mods[name] = planted_factors(32, 40, R, k, seed=20 + i)
        want[name] = k
    _assert_planted(_ranks(write_mlx(tmp_path / "mlx", mods)), want)
