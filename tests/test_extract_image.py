"""``extract`` on image checkpoints, with the consumers themselves as oracles (tiny models built here, no
downloads, float64 comparisons, seeded):

- a diffusers pipeline directory (tiny SD1.x-shaped UNet with 3×3/1×1 convs and attention, tiny CLIP text
  encoder): the kohya file's sd-scripts names, conv factor shapes and α, every module against the dense
  float64 SVD of its ΔW (Eckart–Young), and diffusers' own loader (``StableDiffusionPipeline.lora_state_dict``
  + ``load_lora_into_unet`` / ``load_lora_into_text_encoder``) applying W + U_kΣ_kV_kᵀ; ``--to diffusers``
  the same way; changed norms and biases listed as dropped with their share; a pipeline saved by
  transformers ≥ 5 (CLIP keys without "text_model.") still gets sd-scripts' lora_te_text_model_… names;
- a single-file SD checkpoint with original LDM names: the kohya names diffusers' own kohya converter maps to
  the tiny UNet's modules (a hand-written LDM → diffusers table is the independent reference);
- a single-file Flux checkpoint with BFL names (bf16, bare and under ComfyUI's ``model.diffusion_model.``):
  sd-scripts' ``lora_unet_double_blocks_0_img_attn_qkv`` names, and ``--to diffusers`` split q/k/v whose ΔW are
  the rows of the fused ΔW_k, applied by diffusers' Flux loader;
- ``--max-size`` on an image pair: the file is within SIZE.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from builders import read_st, run_cli, tiny_flux
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

K = 3  # the extraction rank
TOL_OPT = 1e-3  # the certificate: ‖ΔW − BA‖_F ≤ (1 + 1e-3)·optimum …
F32 = 2e-6  # … plus float32 storage of the factors (relative to ‖ΔW‖)
SUBSPACE = 1e-4  # ‖BA − U_kΣ_kV_kᵀ‖ ≤ SUBSPACE·‖U_kΣ_kV_kᵀ‖: every planted ΔW has a clear gap after σ_k
KOHYA = (".lora_down.weight", ".lora_up.weight", ".alpha")

# --- tiny models (the configs of tests/test_convert_sd.py: SD1.x block layout, 4 blocks, cross-attention) ---


def _unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(16, 16, 32, 32), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=16, attention_head_dim=4,
        norm_num_groups=8).eval()


def _text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=16, projection_dim=8, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    torch.manual_seed(1)
    return CLIPTextModel(cfg).eval()


# UNet modules changed in TUNED: 3×3 convs (conv_in, a resnet conv, the up_blocks.0 upsampler), 1×1 convs
# (proj_in, conv_shortcut), attention and feed-forward linears, the time embedding
UNET_TARGETS = ("conv_in", "down_blocks.0.resnets.0.conv1", "up_blocks.0.upsamplers.0.conv",
                "down_blocks.0.attentions.0.proj_in", "down_blocks.2.resnets.0.conv_shortcut",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
                "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj", "time_embedding.linear_1")
# text-encoder modules (paths in transformers' CLIPTextModel; the files keep the Hub's "text_model." prefix)
TE_TARGETS = ("encoder.layers.0.self_attn.q_proj", "encoder.layers.1.self_attn.out_proj", "encoder.layers.1.mlp.fc1")
UNET_NORM = "down_blocks.1.resnets.0.norm1.weight"  # a GroupNorm scale
UNET_BIAS = "down_blocks.0.resnets.0.conv1.bias"  # the bias of a LoRA module
TE_NORM = "final_layer_norm.weight"


def _plant_tensor(w: torch.Tensor, g: torch.Generator, weak: float = 0.05, noise: float = 1e-3) -> torch.Tensor:
    """w += a rank-K change (+ one weak direction at `weak` of the others, + `noise`·Gaussian) in the flattened
    layout (out, in·kh·kw), in place. Returns ΔW as stored (the difference of two float32/bf16 values, exact in
    float64), flattened."""
    o, i = w.shape[0], w[0].numel()
    amp = torch.tensor([1.0] * K + [weak], dtype=torch.float64)
    d = (torch.randn(o, K + 1, generator=g, dtype=torch.float64) * amp) @ torch.randn(
        K + 1, i, generator=g, dtype=torch.float64) * 0.05
    d += 0.05 * noise * torch.randn(o, i, generator=g, dtype=torch.float64)
    with torch.no_grad():
        before = w.detach().double().clone()
        w.add_(d.reshape(w.shape).to(w.dtype))
        return (w.detach().double() - before).reshape(o, -1)


def _plant(model, paths, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {p: _plant_tensor(model.get_submodule(p).weight, g) for p in paths}


def _best(d: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """U_kΣ_kV_kᵀ of ΔW and the optimum's relative error ‖ΔW − U_kΣ_kV_kᵀ‖/‖ΔW‖ (dense float64 SVD)."""
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    k = min(k, s.numel())
    return (u[:, :k] * s[:k]) @ vh[:k], float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def _kohya(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{kohya module name: (lora_down, lora_up, α)} read independently (safetensors, float64)."""
    sd = read_st(path)
    names = {k.removesuffix(".lora_down.weight") for k in sd if k.endswith(".lora_down.weight")}
    assert set(sd) == {n + s for n in names for s in KOHYA}, sorted(set(sd) ^ {n + s for n in names for s in KOHYA})
    return {n: (sd[n + ".lora_down.weight"], sd[n + ".lora_up.weight"], float(sd[n + ".alpha"])) for n in names}


def _check_kohya_module(name: str, f: tuple, d: torch.Tensor, shape: tuple[int, ...], row: dict, k: int = K) -> None:
    """One kohya module of the file against ΔW: shapes (convs 4-D: down (r, in, kh, kw), up (out, r, 1, 1)),
    α = r, the error within the certificate of the Eckart–Young optimum, U_kΣ_kV_kᵀ itself, and the JSON row."""
    down, up, alpha = f
    r = down.shape[0]
    assert r == min(k, *d.shape) == row["rank"] and alpha == float(r), name
    if len(shape) == 4:
        assert tuple(down.shape) == (r, *shape[1:]) and tuple(up.shape) == (shape[0], r, 1, 1), name
    else:
        assert tuple(down.shape) == (r, shape[1]) and tuple(up.shape) == (shape[0], r), name
    got = (alpha / r) * up.reshape(shape[0], r) @ down.reshape(r, -1)
    best, opt = _best(d, r)
    err = _rel(got, d)
    assert err <= opt * (1 + TOL_OPT) + F32, (name, err, opt)
    assert _rel(got, best) <= SUBSPACE, name
    assert abs(row["rel_error"] - err) <= 1e-7, (name, row["rel_error"], err)  # the reported error is the truth
    assert row["rel_optimum"] <= opt * (1 + 1e-9) + 1e-12, name  # a lower bound of the optimum


def _merged(model, path: str, base: torch.Tensor) -> torch.Tensor:
    """ΔW that diffusers' loader (PEFT layers) applies to `path`, merged (float64, flattened)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    mod = model.get_submodule(path)
    assert isinstance(mod, BaseTunerLayer), path
    mod.merge()
    w = mod.get_base_layer().weight
    return (w.detach().double() - base).reshape(w.shape[0], -1)


def _lora_paths(model) -> set[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def _write_model(d: Path, model, file_prefix: str = "") -> None:
    model.save_pretrained(str(d), safe_serialization=True)
    if file_prefix:  # the Hub's CLIP text encoders store "text_model.…" keys
        f = d / "model.safetensors"
        save_file({file_prefix + k: v for k, v in load_file(str(f)).items()}, str(f), metadata={"format": "pt"})


def _write_pipeline(d: Path, unet, te, te_prefix: str) -> Path:
    d.mkdir(parents=True)
    (d / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"]}))
    _write_model(d / "unet", unet)
    _write_model(d / "text_encoder", te, te_prefix)
    return d


def _sd_pair(tmp: Path, te_prefix: str = "text_model.") -> dict:
    unet, te = _unet(), _text_encoder()
    state = {"unet": {k: v.clone() for k, v in unet.state_dict().items()},
             "text_encoder": {k: v.clone() for k, v in te.state_dict().items()}}
    _write_pipeline(tmp / "base", unet, te, te_prefix)
    deltas = {("unet", p): d for p, d in _plant(unet, UNET_TARGETS, seed=1).items()}
    deltas |= {("text_encoder", p): d for p, d in _plant(te, TE_TARGETS, seed=2).items()}
    vectors = {}
    with torch.no_grad():
        for model, comp, key, step in ((unet, "unet", UNET_NORM, 0.01), (unet, "unet", UNET_BIAS, 0.02),
                                       (te, "text_encoder", TE_NORM, 0.03)):
            t = model.get_parameter(key)
            before = t.detach().double().clone()
            t.add_(step)
            vectors[f"{comp}.{(te_prefix if comp == 'text_encoder' else '') + key}"] = t.detach().double() - before
    _write_pipeline(tmp / "tuned", unet, te, te_prefix)
    shapes = {("unet", p): tuple(unet.get_submodule(p).weight.shape) for p in UNET_TARGETS}
    shapes |= {("text_encoder", p): tuple(te.get_submodule(p).weight.shape) for p in TE_TARGETS}
    return {"tmp": tmp, "state": state, "deltas": deltas, "vectors": vectors, "shapes": shapes}


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return _sd_pair(tmp_path_factory.mktemp("sd_pipeline"))


def _fresh(sd: dict) -> tuple:
    """BASE's UNet and text encoder, fresh (what a user loads the LoRA onto)."""
    unet, te = _unet(), _text_encoder()
    unet.load_state_dict(sd["state"]["unet"])
    te.load_state_dict(sd["state"]["text_encoder"])
    return unet, te


def _applied(sd: dict, path: Path, modules=None) -> dict[tuple[str, str], torch.Tensor]:
    """The file through diffusers' SD loaders onto fresh copies of BASE's models: {(component, path): ΔW} for
    ``modules`` (default: every changed module), which must be exactly the modules that took a LoRA."""
    modules = set(sd["deltas"]) if modules is None else set(modules)
    pipe = diffusers.StableDiffusionPipeline
    unet, te = _fresh(sd)
    state, alphas = pipe.lora_state_dict(str(path))
    pipe.load_lora_into_unet(state, alphas, unet, adapter_name="x")
    pipe.load_lora_into_text_encoder(state, alphas, te, prefix="text_encoder", adapter_name="x")
    models = {"unet": unet, "text_encoder": te}
    for comp, model in models.items():  # every module of the file, and only those, took a LoRA
        assert _lora_paths(model) == {p for c, p in modules if c == comp}, comp
    return {(c, p): _merged(models[c], p, sd["state"][c][p + ".weight"].double()) for c, p in modules}


def _sd_kohya_name(comp: str, path: str) -> str:
    """sd-scripts' names for SD1.x (diffusers-style UNet names; the CLIP text encoder under text_model.)."""
    return ("lora_unet_" + path if comp == "unet" else "lora_te_text_model_" + path).replace(".", "_")


def _doc(*args) -> dict:
    res = run_cli("extract", *args, "--json")
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


def test_pipeline_kohya_is_eckart_young_and_diffusers_applies_it(sd):
    out = sd["tmp"] / "kohya.safetensors"
    doc = _doc(sd["tmp"] / "base", sd["tmp"] / "tuned", "-o", out, "--rank", str(K))
    assert doc["family"] == "pipeline" and doc["output"]["layout"] == "kohya"  # the default for image checkpoints
    assert doc["output"]["bytes"] == out.stat().st_size
    mods = _kohya(out)
    want = {_sd_kohya_name(c, p): (c, p) for c, p in sd["deltas"]}
    assert set(mods) == set(want)  # sd-scripts names; every changed conv/linear, nothing else
    rows = {m["name"]: m for m in doc["modules"]}
    assert len(rows) == len(want)
    for name, (c, p) in want.items():
        row = rows[f"{c}.{p}" if c == "unet" else f"{c}.text_model.{p}"]
        _check_kohya_module(name, mods[name], sd["deltas"][(c, p)], sd["shapes"][(c, p)], row)
        assert row["kind"] == ("conv" if len(sd["shapes"][(c, p)]) == 4 else "linear")
    # the changed norms and the LoRA module's bias: dropped (kohya carries no full tensor), with their share
    total = sum(float(d.square().sum()) for d in sd["deltas"].values()) + sum(
        float(v.square().sum()) for v in sd["vectors"].values())
    assert doc["total_change"] == pytest.approx(total, rel=1e-9)
    aside = {s["name"]: s for s in doc["set_aside"]}
    assert set(aside) == set(sd["vectors"])
    for key, v in sd["vectors"].items():
        assert aside[key]["action"] == "dropped" and aside[key]["role"] == "vector", key
        assert aside[key]["share"] == pytest.approx(float(v.square().sum()) / total, rel=1e-9), key
    # diffusers' own loader on fresh copies of BASE: merged W + (α/r)·up@down = W + U_kΣ_kV_kᵀ
    for (c, p), got in _applied(sd, out).items():
        name = _sd_kohya_name(c, p)
        down, up, alpha = mods[name]
        assert _rel(got, (alpha / down.shape[0]) * up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)) \
            < 1e-6, name
        assert _rel(got, _best(sd["deltas"][(c, p)], K)[0]) <= SUBSPACE, name


def test_pipeline_to_diffusers_loads_in_diffusers(sd):
    out = sd["tmp"] / "diffusers.safetensors"
    doc = _doc(sd["tmp"] / "base", sd["tmp"] / "tuned", "-o", out, "--rank", str(K), "--to", "diffusers")
    assert doc["output"]["layout"] == "diffusers"
    keys = set(load_file(str(out)))
    te = "text_encoder.text_model."
    want = {(f"unet.{p}" if c == "unet" else te + p) + s for c, p in sd["deltas"] for s in (".lora_A.weight",
                                                                                            ".lora_B.weight")}
    assert keys == want
    for (c, p), got in _applied(sd, out).items():
        best, opt = _best(sd["deltas"][(c, p)], K)
        assert _rel(got, best) <= SUBSPACE, (c, p)
        assert _rel(got, sd["deltas"][(c, p)]) <= opt * (1 + TOL_OPT) + F32, (c, p)


def test_pipeline_saved_by_transformers_5_keeps_sd_scripts_text_encoder_names(tmp_path):
    """transformers ≥ 5 saves CLIPTextModel without the "text_model." prefix; sd-scripts, A1111 and ComfyUI
    still name the text encoder's modules lora_te_text_model_encoder_layers_…: the kohya file must too."""
    pair = _sd_pair(tmp_path, te_prefix="")
    out = tmp_path / "kohya.safetensors"
    _doc(tmp_path / "base", tmp_path / "tuned", "-o", out, "--rank", str(K))
    te_names = {n for n in _kohya(out) if n.startswith("lora_te")}
    assert te_names == {_sd_kohya_name("text_encoder", p) for p in TE_TARGETS}, sorted(te_names)
    applied = _applied(pair, out)
    for (c, p), got in applied.items():
        assert _rel(got, _best(pair["deltas"][(c, p)], K)[0]) <= SUBSPACE, (c, p)


def test_max_size_on_an_image_pair_fits(sd):
    full = sd["tmp"] / "full.safetensors"
    _doc(sd["tmp"] / "base", sd["tmp"] / "tuned", "-o", full, "--rank", str(K))
    # 80 % of the rank-K file (the command sets aside a generous estimate of the header first, so much less
    # than that is refused on models this small)
    budget = full.stat().st_size * 8 // 10
    out = sd["tmp"] / "budget.safetensors"
    doc = _doc(sd["tmp"] / "base", sd["tmp"] / "tuned", "-o", out, "--max-size", str(budget))
    assert out.stat().st_size == doc["output"]["bytes"] <= budget
    mods = _kohya(out)
    rows = {m["name"]: m for m in doc["modules"]}
    kept = {}
    for c, p in sd["deltas"]:
        name = _sd_kohya_name(c, p)
        row = rows.get(f"{c}.{p}" if c == "unet" else f"{c}.text_model.{p}")
        assert (row is None) == (name not in mods), name  # the table lists exactly the modules written
        if row is not None:  # each at its allocated rank: the Eckart–Young optimum of that rank, α = r
            _check_kohya_module(name, mods[name], sd["deltas"][(c, p)], sd["shapes"][(c, p)], row, k=row["rank"])
            kept[(c, p)] = row["rank"]
    assert kept and sum(kept.values()) < K * len(sd["deltas"])  # the budget did cut
    # diffusers' loader takes the per-module ranks
    for (c, p), got in _applied(sd, out, kept).items():
        assert _rel(got, _best(sd["deltas"][(c, p)], kept[(c, p)])[0]) <= SUBSPACE, (c, p)


# --- a single-file SD1.x checkpoint with the original (LDM) names ---

# LDM module (under model.diffusion_model.) → diffusers UNet path, written out by hand from the two layouts
LDM_UNET = {
    "input_blocks.0.0": "conv_in",
    "input_blocks.1.0.in_layers.2": "down_blocks.0.resnets.0.conv1",
    "input_blocks.1.1.proj_in": "down_blocks.0.attentions.0.proj_in",
    "input_blocks.2.1.transformer_blocks.0.attn1.to_q": "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q",
    "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks.7.0.skip_connection": "down_blocks.2.resnets.0.conv_shortcut",
    "input_blocks.11.0.out_layers.3": "down_blocks.3.resnets.1.conv2",
    "middle_block.1.transformer_blocks.0.attn2.to_k": "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
    "middle_block.2.emb_layers.1": "mid_block.resnets.1.time_emb_proj",
    "output_blocks.2.1.conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks.4.1.transformer_blocks.0.ff.net.2": "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2",
    "output_blocks.8.2.conv": "up_blocks.2.upsamplers.0.conv",
    "time_embed.0": "time_embedding.linear_1",
    "out.2": "conv_out",
}
# under …transformer.text_model.; out_proj too, as in every real LoRA: diffusers 0.42 renames its legacy kohya
# text-encoder keys (to_q_lora …) only when a to_out_lora key is present (state_dict_utils ·
# convert_state_dict_to_diffusers guesses the format from that key), so q_proj beside an MLP alone is lost there
LDM_TE = ("encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.out_proj", "encoder.layers.1.mlp.fc2")
LDM_VAE = "first_stage_model.decoder.conv_in.weight"


def _ldm_files(tmp: Path) -> dict:
    """BASE/TUNED single files: the tiny UNet's and text encoder's weights under LDM names (plus a VAE conv, a
    norm, an unchanged embedding); TUNED = BASE + planted changes."""
    unet, te = _unet(), _text_encoder()
    keys = {f"model.diffusion_model.{ldm}.weight": ("unet", p) for ldm, p in LDM_UNET.items()}
    keys |= {f"cond_stage_model.transformer.text_model.{p}.weight": ("text_encoder", p) for p in LDM_TE}
    models = {"unet": unet, "text_encoder": te}
    base = {k: models[c].get_submodule(p).weight.detach().clone().contiguous() for k, (c, p) in keys.items()}
    base["model.diffusion_model.input_blocks.1.0.in_layers.0.weight"] = unet.down_blocks[0].resnets[0].norm1.weight \
        .detach().clone()
    base["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = \
        te.embeddings.token_embedding.weight.detach().clone()
    base[LDM_VAE] = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    tuned = {k: v.clone() for k, v in base.items()}
    g = torch.Generator().manual_seed(5)
    tuned["model.diffusion_model.input_blocks.1.0.in_layers.0.weight"] += 0.01
    tuned[LDM_VAE] += 0.01 * torch.randn(8, 4, 3, 3, generator=g)
    deltas = {(c, p): _plant_tensor(tuned[k], g) for k, (c, p) in keys.items()}
    save_file(base, str(tmp / "base.safetensors"))
    save_file(tuned, str(tmp / "tuned.safetensors"))
    state = {"unet": {k: v.clone() for k, v in unet.state_dict().items()},
             "text_encoder": {k: v.clone() for k, v in te.state_dict().items()}}
    return {"tmp": tmp, "deltas": deltas, "state": state,
            "shapes": {(c, p): tuple(base[k].shape) for k, (c, p) in keys.items()}}


@pytest.fixture(scope="module")
def ldm(tmp_path_factory):
    return _ldm_files(tmp_path_factory.mktemp("sd_single"))


def test_single_file_sd_names_are_sd_scripts_and_diffusers_converts_every_key(ldm):
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.utils import convert_unet_state_dict_to_peft

    out = ldm["tmp"] / "kohya.safetensors"
    doc = _doc(ldm["tmp"] / "base.safetensors", ldm["tmp"] / "tuned.safetensors", "-o", out, "--rank", str(K))
    assert doc["family"] == "stable-diffusion" and doc["output"]["layout"] == "kohya"
    mods = _kohya(out)
    want = {_sd_kohya_name(c, p): (c, p) for c, p in ldm["deltas"]}
    assert set(mods) == set(want)  # e.g. lora_unet_down_blocks_0_attentions_0_proj_in, lora_te_text_model_…
    rows = {m["name"]: m for m in doc["modules"]}
    for name, (c, p) in want.items():
        row = rows[f"{c}.{p}" if c == "unet" else f"{c}.text_model.{p}"]
        _check_kohya_module(name, mods[name], ldm["deltas"][(c, p)], ldm["shapes"][(c, p)], row)
    aside = {s["name"]: s for s in doc["set_aside"]}
    assert set(aside) == {LDM_VAE, "model.diffusion_model.input_blocks.1.0.in_layers.0.weight"}
    assert all(s["action"] == "dropped" and s["share"] > 0 for s in aside.values())
    # diffusers' own kohya converter takes every key (it raises on a key it cannot rename) to the tiny UNet's
    # modules of the hand-written table, and the text encoder's
    conv, _ = _convert_non_diffusers_lora_to_diffusers(dict(load_file(str(out))))
    unet = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in conv.items()
                                            if k.startswith("unet.")})
    assert {k.split(".lora_A")[0] for k in unet if ".lora_A" in k} == set(LDM_UNET.values())
    assert {k for k in conv if not k.startswith("unet.")} and all(
        k.startswith("text_encoder.text_model.") for k in conv if not k.startswith("unet."))
    # … and its loaders apply W + U_kΣ_kV_kᵀ to exactly those modules of fresh tiny models
    for (c, p), got in _applied(ldm, out).items():
        assert _rel(got, _best(ldm["deltas"][(c, p)], K)[0]) <= SUBSPACE, (c, p)


# --- a single-file Flux checkpoint with BFL names ---

H = 16  # the tiny Flux's hidden size (2 heads × 8)
# BFL module → the diffusers paths it holds, in row order (written out by hand, as tests/test_convert_flux.py)
FLUX_BFL = {
    "double_blocks.0.img_attn.qkv": [f"transformer_blocks.0.attn.to_{c}" for c in "qkv"],
    "double_blocks.0.txt_attn.qkv": [f"transformer_blocks.0.attn.add_{c}_proj" for c in "qkv"],
    "double_blocks.0.img_attn.proj": ["transformer_blocks.0.attn.to_out.0"],
    "double_blocks.0.img_mlp.0": ["transformer_blocks.0.ff.net.0.proj"],
    "double_blocks.0.txt_mod.lin": ["transformer_blocks.0.norm1_context.linear"],
    "single_blocks.0.linear1": [f"single_transformer_blocks.0.attn.to_{c}" for c in "qkv"]
    + ["single_transformer_blocks.0.proj_mlp"],
    "single_blocks.0.linear2": ["single_transformer_blocks.0.proj_out"],
    "img_in": ["x_embedder"],
    "txt_in": ["context_embedder"],
}
FLUX_UNCHANGED = {"final_layer.linear": ["proj_out"], "double_blocks.0.img_mlp.2": ["transformer_blocks.0.ff.net.2"]}
FLUX_VECTORS = {"double_blocks.0.img_attn.qkv.bias": [f"transformer_blocks.0.attn.to_{c}.bias" for c in "qkv"],
                "double_blocks.0.img_attn.norm.query_norm.scale": ["transformer_blocks.0.attn.norm_q.weight"]}
FLUX_VAE = "vae.decoder.conv_in.weight"  # ComfyUI all-in-one files carry the VAE beside the transformer


def _flux_files(tmp: Path, prefix: str) -> dict:
    """BASE/TUNED single files in bf16: the tiny Flux's weights fused under BFL names (q/k/v rows stacked)."""
    model = tiny_flux()
    sd = model.state_dict()
    base = {}
    for bfl, paths in (FLUX_BFL | FLUX_UNCHANGED).items():
        base[prefix + bfl + ".weight"] = torch.cat([sd[p + ".weight"] for p in paths]).to(torch.bfloat16)
    for key, parts in FLUX_VECTORS.items():
        base[prefix + key] = torch.cat([sd[p] for p in parts]).to(torch.bfloat16)
    base[FLUX_VAE] = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    tuned = {k: v.clone() for k, v in base.items()}
    g = torch.Generator().manual_seed(21)
    deltas = {bfl: _plant_tensor(tuned[prefix + bfl + ".weight"], g) for bfl in FLUX_BFL}
    for key in list(FLUX_VECTORS) + [FLUX_VAE]:
        k = key if key == FLUX_VAE else prefix + key
        tuned[k] += 0.02 * torch.randn(tuned[k].shape, generator=g).to(torch.bfloat16)
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(base, str(tmp / "base.safetensors"))
    save_file(tuned, str(tmp / "tuned.safetensors"))
    return {"tmp": tmp, "base": base, "deltas": deltas, "prefix": prefix}


def _flux_applied(flux: dict, state: dict) -> dict[str, torch.Tensor]:
    """diffusers' own Flux loader (load_lora_into_transformer) on a tiny model holding BASE's weights, fused:
    {diffusers path: ΔW applied}."""
    from diffusers import FluxPipeline

    model = tiny_flux()
    w0 = {}
    with torch.no_grad():
        for bfl, paths in FLUX_BFL.items():
            rows = flux["base"][flux["prefix"] + bfl + ".weight"].double()
            for p, part in zip(paths, torch.split(rows, [model.get_submodule(q).weight.shape[0] for q in paths])):
                model.get_submodule(p).weight.copy_(part)
                w0[p] = part
    FluxPipeline.load_lora_into_transformer(dict(state), network_alphas=None, transformer=model)
    model.fuse_lora()
    return {p: model.get_submodule(p).weight.detach().double() - w for p, w in w0.items()}


@pytest.fixture(scope="module", params=["", "model.diffusion_model."], ids=["bfl", "comfy"])
def flux(request, tmp_path_factory):
    return _flux_files(tmp_path_factory.mktemp("flux"), request.param)


def test_single_file_flux_kohya_names_and_split_diffusers_parts(flux):
    tmp = flux["tmp"]
    kohya = tmp / "kohya.safetensors"
    doc = _doc(tmp / "base.safetensors", tmp / "tuned.safetensors", "-o", kohya, "--rank", str(K))
    assert doc["family"] == "flux" and doc["output"]["layout"] == "kohya"
    mods = _kohya(kohya)
    assert set(mods) == {"lora_unet_" + b.replace(".", "_") for b in FLUX_BFL}  # sd-scripts lora_flux.py names
    rows = {m["name"]: m for m in doc["modules"]}
    fused = {}
    for bfl, d in flux["deltas"].items():
        name = "lora_unet_" + bfl.replace(".", "_")
        shape = tuple(flux["base"][flux["prefix"] + bfl + ".weight"].shape)
        _check_kohya_module(name, mods[name], d, shape, rows[name])
        down, up, alpha = mods[name]
        fused[bfl] = (alpha / down.shape[0]) * up @ down
    aside = {s["name"]: s["action"] for s in doc["set_aside"]}
    assert aside == {**{flux["prefix"] + k: "dropped" for k in FLUX_VECTORS}, FLUX_VAE: "dropped"}
    # --to diffusers: q/k/v (and linear1's proj_mlp) split; each part's ΔW = its rows of the fused ΔW_k
    out = tmp / "diffusers.safetensors"
    _doc(tmp / "base.safetensors", tmp / "tuned.safetensors", "-o", out, "--rank", str(K), "--to", "diffusers")
    state = load_file(str(out))
    paths = {p: bfl for bfl, ps in FLUX_BFL.items() for p in ps}
    assert set(state) == {f"transformer.{p}.lora_{ab}.weight" for p in paths for ab in "AB"}
    model = tiny_flux()
    parts = {}
    for bfl, ps in FLUX_BFL.items():
        dims = [model.get_submodule(p).weight.shape[0] for p in ps]
        best = _best(flux["deltas"][bfl], K)[0]
        for p, want, file_rows in zip(ps, torch.split(best, dims), torch.split(fused[bfl], dims)):
            got = state[f"transformer.{p}.lora_B.weight"].double() @ state[f"transformer.{p}.lora_A.weight"].double()
            assert _rel(got, file_rows) < 1e-6 and _rel(got, want) <= SUBSPACE, p
            parts[p] = want
    # diffusers' Flux loader applies exactly those parts
    for p, got in _flux_applied(flux, state).items():
        assert _rel(got, parts[p]) <= SUBSPACE, p


def test_single_file_flux_kohya_through_diffusers_converter(flux):
    """Our kohya Flux file through diffusers' own kohya→diffusers converter and loader: the block modules'
    applied ΔW are the rows of ΔW_k. (diffusers 0.42 hard-codes Flux.1's linear1 split, so the tiny model's
    linear1 is left out, and drops the top-level modules' keys; tests/test_convert_flux.py documents both.)"""
    from diffusers import FluxPipeline

    tmp = flux["tmp"]
    kohya = tmp / "kohya2.safetensors"
    _doc(tmp / "base.safetensors", tmp / "tuned.safetensors", "-o", kohya, "--rank", str(K))
    part = tmp / "kohya_blocks.safetensors"
    save_file({k: v for k, v in load_file(str(kohya)).items() if "_linear1." not in k and "_blocks_" in k}, str(part))
    got = _flux_applied(flux, FluxPipeline.lora_state_dict(str(part)))
    model = tiny_flux()
    for bfl, ps in FLUX_BFL.items():
        if "blocks" not in bfl or bfl.endswith("linear1"):
            continue
        best = _best(flux["deltas"][bfl], K)[0]
        for p, want in zip(ps, torch.split(best, [model.get_submodule(q).weight.shape[0] for q in ps])):
            assert _rel(got[p], want) <= SUBSPACE, p
