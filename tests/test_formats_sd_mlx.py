"""kohya, diffusers and mlx-lm files built by hand from each project's key conventions.

Every module's ΔW (``Module.delta``, float64) is checked against an independent dense computation
(``kohya_delta`` and friends), and its spectrum (``rank --json``) against a float64 SVD of that.
"""

from __future__ import annotations

import json

import pytest
import torch
from builders import cli_json, kohya_delta, planted_factors, rel_close, sv_close, svdvals64, write_kohya, write_mlx
from safetensors.torch import save_file

from lora_inspect import load_adapter


def _factors(out_dim, in_dim, r, seed, kernel=None):
    g = torch.Generator().manual_seed(seed)
    down = torch.randn((r, in_dim) + (kernel or ()), generator=g)
    up = torch.randn((out_dim, r) + ((1, 1) if kernel else ()), generator=g)
    return down, up


def _check(path, refs: dict[str, torch.Tensor]):
    """Every module's dense ΔW and spectrum against the reference ΔW (float64, linear orientation)."""
    ad = load_adapter(path)
    assert {m.name for m in ad.modules} == set(refs)
    for m in ad.modules:
        ref = refs[m.name]
        assert m.shape == tuple(ref.shape), m.name
        assert rel_close(m.delta(), ref, 1e-12), m.name
    doc = cli_json("rank", path)
    for m in doc["modules"]:
        sv_close(m["singular_values"], svdvals64(refs[m["name"]]), 1e-5)
    return ad, doc


# --- kohya ---------------------------------------------------------------------------------------

KOHYA = {
    # name: (out, in, r, kernel, alpha)
    "lora_unet_down_blocks_0_resnets_0_conv1": (16, 8, 4, (3, 3), 2.0),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q": (24, 24, 4, None, 1.0),
    "lora_unet_up_blocks_1_attentions_0_proj_in": (24, 24, 8, (1, 1), None),  # missing .alpha → α = r
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (20, 20, 4, None, 0.0),  # zero alpha → α = r
    "lora_te2_text_model_encoder_layers_1_mlp_fc1": (40, 20, 2, None, 16.0),
}


@pytest.fixture(scope="module")
def kohya_file(tmp_path_factory):
    mods = {}
    for i, (name, (o, n, r, k, alpha)) in enumerate(KOHYA.items()):
        down, up = _factors(o, n, r, 10 + i, k)
        mods[name] = (down, up, alpha)
    path = write_kohya(tmp_path_factory.mktemp("kohya") / "lora.safetensors", mods)
    return path, mods


def test_kohya(kohya_file):
    path, mods = kohya_file
    refs = {name: kohya_delta(down, up, alpha) for name, (down, up, alpha) in mods.items()}
    ad, doc = _check(path, refs)
    assert ad.format == "kohya" and doc["adapter"]["format"] == "kohya"
    got = {m["name"]: m for m in doc["modules"]}
    for name, (o, n, r, k, alpha) in KOHYA.items():
        m = got[name]
        want_alpha = alpha if alpha else r
        assert m["rank"] == r and m["alpha"] == want_alpha and m["scale"] == pytest.approx(want_alpha / r)
        assert m["kind"] == ("conv" if k else "linear")
        assert m["shape"] == [o, n * (k[0] * k[1] if k else 1)]
    conv = ad.module("lora_unet_down_blocks_0_resnets_0_conv1")
    assert conv.kernel == (3, 3)
    assert any("no .alpha" in note for note in ad.notes)


# --- diffusers -----------------------------------------------------------------------------------

DIFF = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (32, 32, 4),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0": (32, 32, 4),
    "text_encoder.text_model.encoder.layers.0.self_attn.k_proj": (24, 24, 2),
}


def _diffusers_state(seed=0):
    sd, fac = {}, {}
    for i, (name, (o, n, r)) in enumerate(DIFF.items()):
        a, b = _factors(o, n, r, seed + i)
        sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = a, b
        fac[name] = (b.double(), a.double())
    return sd, fac


def test_diffusers_alpha_keys(tmp_path):
    sd, fac = _diffusers_state()
    alphas = {name: 1.0 + i for i, name in enumerate(DIFF)}
    for name, al in alphas.items():
        sd[f"{name}.alpha"] = torch.tensor(al)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(sd, str(path))
    refs = {n: (alphas[n] / DIFF[n][2]) * b @ a for n, (b, a) in fac.items()}
    ad, doc = _check(path, refs)
    assert ad.format == "diffusers" and ad.extras == []
    assert {m["name"]: m["alpha"] for m in doc["modules"]} == alphas


def test_diffusers_no_alpha_means_alpha_r(tmp_path):
    sd, fac = _diffusers_state(5)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(sd, str(path))
    ad, _ = _check(path, {n: b @ a for n, (b, a) in fac.items()})
    assert any("α = r" in note for note in ad.notes)


def test_diffusers_metadata_plain_peft_config(tmp_path):
    sd, fac = _diffusers_state(7)
    cfg = {"r": 4, "lora_alpha": 8, "alpha_pattern": {"k_proj": 6}, "target_modules": ["to_q", "to_out.0", "k_proj"]}
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(sd, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(cfg)})
    want = {n: (6.0 if n.endswith("k_proj") else 8.0) for n in DIFF}
    refs = {n: (want[n] / DIFF[n][2]) * b @ a for n, (b, a) in fac.items()}
    ad, doc = _check(path, refs)
    assert {m["name"]: m["alpha"] for m in doc["modules"]} == want
    assert not any("α = r" in note for note in ad.notes)


def test_diffusers_metadata_packed_per_component(tmp_path):
    """diffusers' save_lora_weights packs each component's PEFT config as "<component>.<field>"."""
    sd, fac = _diffusers_state(9)
    unet_cfg = {"r": 4, "lora_alpha": 2, "use_rslora": True, "alpha_pattern": {"to_out.0": 12}}
    te_cfg = {"r": 2, "lora_alpha": 3}
    packed = {f"unet.{k}": v for k, v in unet_cfg.items()} | {f"text_encoder.{k}": v for k, v in te_cfg.items()}
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(sd, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(packed, sort_keys=True)})
    scale = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 2 / 2.0,  # α/√r, r = 4
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0": 12 / 2.0,
        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj": 3 / 2,  # α/r
    }
    refs = {n: scale[n] * b @ a for n, (b, a) in fac.items()}
    _, doc = _check(path, refs)
    for m in doc["modules"]:
        assert m["scale"] == pytest.approx(scale[m["name"]])


def test_diffusers_old_lora_down_up_keys(tmp_path):
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q"
    a, b = _factors(16, 16, 4, 3)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({f"{name}_lora.down.weight": a, f"{name}_lora.up.weight": b}, str(path))
    _check(path, {name: b.double() @ a.double()})


# --- mlx-lm --------------------------------------------------------------------------------------


def test_mlx_transposed_absolute_scale(tmp_path):
    mods = {}
    for i, (name, o) in enumerate((("model.layers.0.self_attn.q_proj", 32), ("model.layers.1.self_attn.v_proj", 16))):
        b, a = planted_factors(o, 32, 8, 8, seed=20 + i)
        mods[name] = (b, a)
    d = write_mlx(tmp_path / "mlx", mods, scale=20.0)
    refs = {n: 20.0 * b.double() @ a.double() for n, (b, a) in mods.items()}
    ad, doc = _check(d, refs)
    assert ad.format == "mlx"
    for m in doc["modules"]:
        assert m["rank"] == 8 and m["scale"] == 20.0, "mlx scale is absolute: no division by r"
        assert m["kind"] == "linear"


def test_mlx_default_scale_when_missing(tmp_path):
    b, a = planted_factors(16, 32, 4, 4, seed=3)
    d = write_mlx(tmp_path / "mlx", {"model.layers.0.mlp.up_proj": (b, a)})
    cfg = json.loads((d / "adapter_config.json").read_text())
    del cfg["lora_parameters"]["scale"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    ad, _ = _check(d, {"model.layers.0.mlp.up_proj": 20.0 * b.double() @ a.double()})
    assert any("default" in n for n in ad.notes)
