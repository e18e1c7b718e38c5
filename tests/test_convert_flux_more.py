"""Flux LoRAs in ComfyUI's dotted key style (``diffusion_model.double_blocks.0.img_attn.qkv`` with kohya's
``lora_down``/``lora_up`` or PEFT-style ``lora_A``/``lora_B``), and the CLIP-L prefix of a Flux pipeline
written to kohya (``lora_te1_``, as sd-scripts ``networks/lora_flux.py`` names it). Oracles: diffusers'
own Flux loader/converter and its loader on the tiny FluxTransformer2DModel of test_convert_flux.py, and
ΔW computed there in float64."""

from __future__ import annotations

import pytest
import test_convert_flux
import torch
from safetensors.torch import load_file, save_file
from test_convert_flux import BFL, QKV, TOP, _close, _no_linear1, applied

from lora_inspect.convert.canon import from_adapter
from lora_inspect.convert.run import convert
from lora_inspect.formats import load_adapter

flux = test_convert_flux.flux  # the kohya Flux LoRA fixture (module scope), shared

# kohya BFL name → ComfyUI's dotted module name (written out here, independent of the code)
DOTTED = {
    "double_blocks_0_img_attn_qkv": "double_blocks.0.img_attn.qkv",
    "double_blocks_0_txt_attn_qkv": "double_blocks.0.txt_attn.qkv",
    "double_blocks_0_img_attn_proj": "double_blocks.0.img_attn.proj",
    "double_blocks_0_txt_attn_proj": "double_blocks.0.txt_attn.proj",
    "double_blocks_0_img_mlp_0": "double_blocks.0.img_mlp.0",
    "double_blocks_0_img_mlp_2": "double_blocks.0.img_mlp.2",
    "double_blocks_0_txt_mlp_0": "double_blocks.0.txt_mlp.0",
    "double_blocks_0_txt_mlp_2": "double_blocks.0.txt_mlp.2",
    "double_blocks_0_img_mod_lin": "double_blocks.0.img_mod.lin",
    "double_blocks_0_txt_mod_lin": "double_blocks.0.txt_mod.lin",
    "single_blocks_0_linear1": "single_blocks.0.linear1",
    "single_blocks_0_linear2": "single_blocks.0.linear2",
    "single_blocks_0_modulation_lin": "single_blocks.0.modulation.lin",
    "img_in": "img_in",
    "txt_in": "txt_in",
    "time_in_in_layer": "time_in.in_layer",
    "vector_in_out_layer": "vector_in.out_layer",
    "final_layer_linear": "final_layer.linear",
    "final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1",
}
PEFT_STYLE = {".lora_down.weight": ".lora_A.weight", ".lora_up.weight": ".lora_B.weight", ".alpha": ".alpha"}


def _comfy(sd: dict, peft_style: bool, drop_alpha: set[str] = frozenset()) -> dict:
    out = {}
    for k, v in sd.items():
        mod, dot, suf = k.partition(".")
        bfl = mod.removeprefix("lora_unet_")
        if bfl in drop_alpha and suf == "alpha":
            continue
        out["diffusion_model." + DOTTED[bfl] + (PEFT_STYLE["." + suf] if peft_style else dot + suf)] = v
    return out


def test_comfy_kohya_style_reads_and_converts_as_kohya(flux, tmp_path):
    """lora_down/lora_up under diffusion_model.: the same modules, scales and outputs as the lora_unet_ file,
    and diffusers' own Flux loader (its "ComfyUI" branch) maps it to the same names and weights."""
    from diffusers import FluxPipeline

    src = load_file(str(flux["src"]))
    path = tmp_path / "comfy_down_up.safetensors"
    save_file(_comfy(src, False), str(path))
    ad = load_adapter(path)
    assert ad.format == "kohya" and len(ad.modules) == len(BFL)
    ref = {m.path: m for m in from_adapter(load_adapter(flux["src"])).modules}
    got = {m.path: m for m in from_adapter(ad).modules}
    assert set(got) == set(ref) and all(got[p].scale == ref[p].scale for p in ref)

    outs = {}
    for tag, s in (("comfy", path), ("kohya", flux["src"])):
        outs[tag] = tmp_path / f"{tag}_diffusers.safetensors"
        convert(load_adapter(s), outs[tag], "diffusers", dtype="fp32")
    a, b = load_file(str(outs["comfy"])), load_file(str(outs["kohya"]))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    ours = applied(FluxPipeline.lora_state_dict(str(outs["comfy"])))
    for p, w in flux["w0"].items():
        d = flux["deltas"].get(p)
        assert _close(ours[p], w + d if d is not None else w, d if d is not None else w), p
    # diffusers on the ComfyUI file itself (linear1 left out: its split is hard-coded to Flux.1's 3072)
    theirs_sd = FluxPipeline.lora_state_dict(_comfy(_no_linear1(src), False))
    assert {k.removeprefix("transformer.") for k in theirs_sd} <= {k.removeprefix("transformer.") for k in a}
    theirs = applied(theirs_sd)
    blocks = [p for p in flux["deltas"] if p not in TOP and not (p.startswith("single_transformer_blocks.0.")
                                                                 and p.endswith(QKV + ("proj_mlp",)))]
    assert len(blocks) == 16
    for p in blocks:
        assert _close(theirs[p], ours[p], flux["deltas"][p]), p


def test_comfy_peft_style_diffusers_and_kohya_out(flux, tmp_path):
    """lora_A/lora_B under diffusion_model. (ComfyUI loads it; diffusers' Flux loader does not convert it):
    with .alpha, s = α/r; without, s = 1 (ComfyUI and kohya: α = r). Our diffusers output loads in diffusers
    with exactly those ΔW, and our kohya output is the lora_unet_ file, alphas included."""
    from diffusers import FluxPipeline

    src = load_file(str(flux["src"]))
    no_alpha = {"double_blocks_0_img_attn_qkv", "single_blocks_0_linear2", "final_layer_adaLN_modulation_1"}
    sd = _comfy(src, True, no_alpha)
    path = tmp_path / "comfy_a_b.safetensors"
    save_file(sd, str(path))
    # diffusers 0.42.1 leaves these keys as they are (only the .alpha keys are taken out, as network alphas)
    assert set(FluxPipeline.lora_state_dict(str(path))) == {k for k in sd if not k.endswith(".alpha")}

    out = tmp_path / "ab_diffusers.safetensors"
    convert(load_adapter(path), out, "diffusers", dtype="fp32")
    got = applied(FluxPipeline.lora_state_dict(str(out)))
    unscaled = {p for bfl in no_alpha for p in BFL[bfl]}
    for p, w in flux["w0"].items():
        d = flux["deltas"].get(p)
        if d is None:
            assert torch.equal(got[p], w), p
            continue
        want = d / flux["scales"][p] if p in unscaled else d
        assert _close(got[p], w + want, want), p

    k = tmp_path / "ab_kohya.safetensors"
    convert(load_adapter(path), k, "kohya", dtype="fp32")
    kk = load_file(str(k))
    for key, v in src.items():
        bfl = key.partition(".")[0].removeprefix("lora_unet_")
        if key.endswith(".alpha"):
            r = src[key.replace(".alpha", ".lora_down.weight")].shape[0]
            assert float(kk[key]) == (float(r) if bfl in no_alpha else float(v)), key
        else:
            assert torch.equal(kk[key], v), key
    assert len(kk) == len(src)


def _flux_pipeline_diffusers(path, single: bool) -> dict[str, torch.Tensor]:
    """A diffusers Flux pipeline LoRA: a transformer module and CLIP-L's q_proj/out_proj/fc1, α ≠ r in the metadata.
    (out_proj is needed by diffusers 0.42.1: its text-encoder loader tells the old attention-processor names
    its kohya converter produces by a to_out_lora key, and refuses the state dict without one.)"""
    g = torch.Generator().manual_seed(3)
    mods = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (8, 8),
            "text_encoder.text_model.encoder.layers.0.self_attn.out_proj": (8, 8),
            "text_encoder.text_model.encoder.layers.1.mlp.fc1": (32, 8)}
    mods["transformer.single_transformer_blocks.0.proj_out" if single else
         "transformer.transformer_blocks.0.attn.to_out.0"] = (16, 16)
    sd = {}
    for name, (o, i) in mods.items():
        sd[name + ".lora_A.weight"], sd[name + ".lora_B.weight"] = torch.randn(4, i, generator=g), \
            torch.randn(o, 4, generator=g)
    save_file(sd, str(path), metadata={"lora_adapter_metadata": '{"r": 4, "lora_alpha": 2}'})
    return sd


@pytest.mark.parametrize("single", [True, False])
def test_flux_pipeline_clip_l_is_lora_te1(tmp_path, single):
    """kohya output of a Flux pipeline names CLIP-L lora_te1_; diffusers' Flux kohya converter (its sd-scripts
    branch for BFL names, its "mixture" branch for lora_transformer_ names, which accepts only lora_te1_)
    maps it back to our text-encoder names with ΔW = s·B·A (s = 2/4)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    src = tmp_path / "pipe.safetensors"
    sd = _flux_pipeline_diffusers(src, single)
    out = tmp_path / "pipe_kohya.safetensors"
    convert(load_adapter(src), out, "kohya", dtype="fp32")
    ours = load_file(str(out))
    te = sorted({k.partition(".")[0] for k in ours if k.startswith("lora_te")})
    assert te == ["lora_te1_text_model_encoder_layers_0_self_attn_out_proj",
                  "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te1_text_model_encoder_layers_1_mlp_fc1"]
    assert any(k.startswith("lora_unet_single_blocks_0_linear2" if single else "lora_transformer_") for k in ours)
    theirs = _convert_kohya_flux_lora_to_diffusers(dict(ours))
    # then what load_lora_into_text_encoder does to the "text_encoder." keys (diffusers/loaders/lora_base.py)
    te_sd = {k.removeprefix("text_encoder."): v for k, v in theirs.items() if k.startswith("text_encoder.")}
    te_sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(te_sd))
    want = {k.removeprefix("text_encoder.") for k in sd if k.startswith("text_encoder.")}
    assert set(te_sd) == want
    for ka in (k for k in want if ".lora_A." in k):
        kb = ka.replace(".lora_A.", ".lora_B.")
        ref = 0.5 * (sd["text_encoder." + kb].double() @ sd["text_encoder." + ka].double())
        assert _close(te_sd[kb].double() @ te_sd[ka].double(), ref, ref), ka


def test_comfy_clip_l_prefix(tmp_path):
    """ComfyUI's text_encoders.clip_l.transformer.… beside diffusion_model.…: our diffusers output names CLIP-L as
    diffusers' own converter (its ComfyUI branch) and loader do, with the same ΔW (s = α/r = 1/2)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    g = torch.Generator().manual_seed(8)
    sd = {}
    for n, w in (("diffusion_model.double_blocks.0.img_attn.proj", 16),
                 ("text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj", 8),
                 ("text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.out_proj", 8)):
        sd[n + ".lora_down.weight"], sd[n + ".lora_up.weight"] = torch.randn(2, w, generator=g), \
            torch.randn(w, 2, generator=g)
        sd[n + ".alpha"] = torch.tensor(1.0)
    src, out = tmp_path / "clip.safetensors", tmp_path / "clip_diffusers.safetensors"
    save_file(sd, str(src))
    convert(load_adapter(src), out, "diffusers", dtype="fp32")
    ours = {k.removeprefix("text_encoder."): v for k, v in load_file(str(out)).items() if k.startswith("text_encoder.")}
    theirs = _convert_kohya_flux_lora_to_diffusers(dict(sd))
    theirs = {k.removeprefix("text_encoder."): v for k, v in theirs.items() if k.startswith("text_encoder.")}
    theirs = convert_state_dict_to_peft(convert_state_dict_to_diffusers(theirs))  # as load_lora_into_text_encoder
    assert set(ours) == set(theirs) and len(ours) == 4
    for ka in (k for k in ours if ".lora_A." in k):
        kb = ka.replace(".lora_A.", ".lora_B.")
        ref = theirs[kb].double() @ theirs[ka].double()
        assert _close(ours[kb].double() @ ours[ka].double(), ref, ref), ka
