"""convert, Stable Diffusion names: kohya SGM UNet names (``input_blocks`` …, as sd-scripts writes every SDXL
LoRA) and text encoders ↔ diffusers, with diffusers itself as the oracle on tiny SDXL- and SD1.5-shaped UNets
and CLIP text encoders built from configs: the names diffusers' own kohya converter gives, and the weights
diffusers' loaders apply (merged), against ΔW = (α/r)·up@down computed in float64 from the kohya file."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from lora_inspect.convert.canon import from_adapter
from lora_inspect.convert.names import dotted_to_kohya, kohya_to_dotted
from lora_inspect.convert.run import convert
from lora_inspect.convert.sgm import up0_has_attention
from lora_inspect.errors import InspectError
from lora_inspect.formats import load_adapter
from tests.builders import kohya_delta, read_st, run_cli, write_kohya

diffusers = pytest.importorskip("diffusers")

# kohya SGM name (after lora_unet_) → diffusers path, written out by hand from the SGM/diffusers block layouts
SDXL_UNET = {
    "input_blocks_0_0": "conv_in", "time_embed_0": "time_embedding.linear_1", "label_emb_0_2": "add_embedding.linear_2",
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_2_0_emb_layers_1": "down_blocks.0.resnets.1.time_emb_proj",
    "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks_4_1_proj_in": "down_blocks.1.attentions.0.proj_in",
    "input_blocks_5_1_transformer_blocks_1_attn1_to_q": "down_blocks.1.attentions.1.transformer_blocks.1.attn1.to_q",
    "input_blocks_7_1_transformer_blocks_0_attn2_to_k": "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k",
    "input_blocks_8_1_transformer_blocks_1_ff_net_0_proj": "down_blocks.2.attentions.1.transformer_blocks.1.ff.net.0.proj",
    "middle_block_0_out_layers_3": "mid_block.resnets.0.conv2",
    "middle_block_1_transformer_blocks_0_attn1_to_out_0": "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "middle_block_2_emb_layers_1": "mid_block.resnets.1.time_emb_proj",
    "output_blocks_0_0_skip_connection": "up_blocks.0.resnets.0.conv_shortcut",
    "output_blocks_1_1_proj_out": "up_blocks.0.attentions.1.proj_out",
    "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_5_1_transformer_blocks_1_attn2_to_v": "up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_v",
    "output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks_8_0_in_layers_2": "up_blocks.2.resnets.2.conv1",
    "out_2": "conv_out",
}
SD_UNET = {
    "input_blocks_1_1_transformer_blocks_0_attn1_to_k": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
    "input_blocks_2_0_in_layers_2": "down_blocks.0.resnets.1.conv1",
    "input_blocks_6_0_op": "down_blocks.1.downsamplers.0.conv",
    "input_blocks_7_1_proj_in": "down_blocks.2.attentions.0.proj_in",
    "input_blocks_10_0_out_layers_3": "down_blocks.3.resnets.0.conv2",
    "input_blocks_11_0_emb_layers_1": "down_blocks.3.resnets.1.time_emb_proj",
    "middle_block_1_proj_out": "mid_block.attentions.0.proj_out",
    "output_blocks_1_0_skip_connection": "up_blocks.0.resnets.1.conv_shortcut",
    "output_blocks_2_1_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_4_1_transformer_blocks_0_ff_net_2": "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2",
    "output_blocks_8_2_conv": "up_blocks.2.upsamplers.0.conv",
    "output_blocks_11_1_transformer_blocks_0_attn2_to_out_0": "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0",
    "time_embed_2": "time_embedding.linear_2",
}
# diffusers 0.42 cannot read two things of SD1.x SGM files (lora_conversion_utils.py ·
# _maybe_map_sgm_blocks_to_diffusers): "input_blocks_1" also collects input_blocks_10/11 (substring match, then a
# KeyError), and position 1 of output_blocks is always "attentions" (SD1.x's up_blocks.0 upsampler is
# output_blocks.2.1.conv). Those names are checked by the applied weights of our file only.
DIFFUSERS_CANNOT = re.compile(r"_blocks_1[01]_|^output_blocks_2_1_conv$")
TE = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": "text_encoder",
      "lora_te1_text_model_encoder_layers_0_self_attn_out_proj": "text_encoder",
      "lora_te1_text_model_encoder_layers_1_mlp_fc1": "text_encoder",
      "lora_te2_text_model_encoder_layers_0_self_attn_out_proj": "text_encoder_2",
      "lora_te2_text_model_encoder_layers_1_mlp_fc2": "text_encoder_2"}


def _sdxl_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(16, 32, 32), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 2),
        cross_attention_dim=16, attention_head_dim=(2, 4, 4), norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 16)


def _sd_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(16, 16, 32, 32), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=16, attention_head_dim=4,
        norm_num_groups=8)


def _text_encoders():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=16, projection_dim=8, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    torch.manual_seed(1)
    return {"text_encoder": CLIPTextModel(cfg), "text_encoder_2": CLIPTextModelWithProjection(cfg)}


def _te_path(model, kohya: str) -> str:
    path = kohya_to_dotted(kohya)[1]  # the text-encoder map predates this work; checked here by the loaded weights
    return path if hasattr(model, "text_model") else path.removeprefix("text_model.")


def _factors(mod: torch.nn.Module, r: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w = mod.weight
    if w.ndim == 4:
        return torch.randn(r, w.shape[1], *w.shape[2:], generator=g), torch.randn(w.shape[0], r, 1, 1, generator=g)
    return torch.randn(r, w.shape[1], generator=g), torch.randn(w.shape[0], r, generator=g)


def _kohya_file(path, unet, table: dict[str, str], tes=None) -> dict:
    """A kohya file with SGM names: ranks 2–4, α ≠ r. Returns {kohya name: (model, path, down, up, α)}."""
    g = torch.Generator().manual_seed(7)
    spec = {}
    for i, (sgm, dp) in enumerate(table.items()):
        r = 2 + i % 3
        down, up = _factors(unet.get_submodule(dp), r, g)
        spec["lora_unet_" + sgm] = (unet, dp, down, up, 0.75 * r + i % 2)
    for i, (name, comp) in enumerate((TE if tes else {}).items()):
        te = tes[comp]
        down, up = _factors(te.get_submodule(_te_path(te, name)), 3, g)
        # one α for text_encoder: diffusers 0.42 keeps the "text_model." prefix in its α keys while transformers 5
        # flattens CLIPTextModel, so a second α there would be dropped when diffusers reads a kohya file
        spec[name] = (te, _te_path(te, name), down, up, 2.5 if comp == "text_encoder" else 1.5 + i)
    write_kohya(path, {k: v[2:] for k, v in spec.items()})
    return spec


def _lora_modules(model) -> set[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def _merged_delta(model, path: str, base: dict) -> torch.Tensor:
    from peft.tuners.tuners_utils import BaseTunerLayer

    mod = model.get_submodule(path)
    assert isinstance(mod, BaseTunerLayer), path
    mod.merge()
    w = mod.get_base_layer().weight
    return (w.detach().double() - base[path]).reshape(w.shape[0], -1)


def _check_applied(spec: dict, models: dict, bases: dict) -> None:
    for name, (model, path, down, up, alpha) in spec.items():
        want = kohya_delta(down, up, alpha)
        got = _merged_delta(models[id(model)], path, bases[id(model)])
        assert float((got - want).abs().max() / want.abs().max()) < 1e-6, name


def _fresh(build, seed_model):
    m = build()
    m.load_state_dict(seed_model.state_dict())
    return m


def _bases(*models) -> dict:
    out = {}
    for m in models:
        out[id(m)] = {n: mod.weight.detach().double().clone() for n, mod in m.named_modules()
                      if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))}
    return out


def _diffusers_names(path, unet_config) -> set[str]:
    """The UNet module paths diffusers' kohya path gives (lora_state_dict → PEFT names)."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    sd, _ = diffusers.StableDiffusionXLPipeline.lora_state_dict(str(path), unet_config=unet_config)
    sd = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in sd.items() if k.startswith("unet.")})
    return {k.split(".lora_A")[0] for k in sd if ".lora_A" in k}


def test_sdxl_sgm_kohya_to_diffusers_names_and_applied_weights(tmp_path):
    unet, tes = _sdxl_unet(), _text_encoders()
    src = tmp_path / "sdxl.safetensors"
    spec = _kohya_file(src, unet, SDXL_UNET, tes)
    out = tmp_path / "d.safetensors"
    res = run_cli("convert", src, "--to", "diffusers", "-o", out)  # the command path
    assert res.exit_code == 0, res.output
    keys = read_st(out)
    ours = {k.removeprefix("unet.").split(".lora_A")[0] for k in keys if k.startswith("unet.") and ".lora_A" in k}
    assert ours == set(SDXL_UNET.values())
    assert ours == _diffusers_names(src, unet.config)  # (a) diffusers' own kohya converter
    # (b) our file through diffusers' loaders, merged: W + (α/r)·up@down. (diffusers reading the kohya file itself
    # applies the most common α to attention projections (to_q/k/v/out) whose α differs: _get_alpha_name keeps
    # "….processor.to_q_lora.down.weight" as the module name; our file bakes α into lora_B.)
    u, t1, t2 = _fresh(_sdxl_unet, unet), _fresh(lambda: _text_encoders()["text_encoder"], tes["text_encoder"]), \
        _fresh(lambda: _text_encoders()["text_encoder_2"], tes["text_encoder_2"])
    bases = _bases(unet, tes["text_encoder"], tes["text_encoder_2"])
    pipe = diffusers.StableDiffusionXLPipeline
    sd, alphas = pipe.lora_state_dict(str(out), unet_config=u.config)
    pipe.load_lora_into_unet(sd, alphas, u, adapter_name="x")
    for comp, te in (("text_encoder", t1), ("text_encoder_2", t2)):
        pipe.load_lora_into_text_encoder(sd, alphas, te, prefix=comp, adapter_name="x")
    models = {id(unet): u, id(tes["text_encoder"]): t1, id(tes["text_encoder_2"]): t2}
    assert _lora_modules(u) == ours
    _check_applied(spec, models, bases)


def test_sdxl_round_trip_and_kohya_from_diffusers(tmp_path):
    unet, tes = _sdxl_unet(), _text_encoders()
    src = tmp_path / "sdxl.safetensors"
    spec = _kohya_file(src, unet, SDXL_UNET, tes)
    convert(load_adapter(src), tmp_path / "d.safetensors", "diffusers")
    back = convert(load_adapter(tmp_path / "d.safetensors"), tmp_path / "k.safetensors", "kohya")
    assert any("SGM" in n for n in back.notes)
    assert set(read_st(tmp_path / "k.safetensors")) == set(read_st(src))  # same key names, α included
    a, b = load_adapter(src), load_adapter(tmp_path / "k.safetensors")
    for m in a.modules:
        want = m.delta().astype(np.float64)
        assert float(np.abs(b.module(m.name).delta().astype(np.float64) - want).max() / np.abs(want).max()) < 1e-6, \
            m.name
    # our kohya output through diffusers' text-encoder loader
    t1, t2 = _fresh(lambda: _text_encoders()["text_encoder"], tes["text_encoder"]), \
        _fresh(lambda: _text_encoders()["text_encoder_2"], tes["text_encoder_2"])
    bases = _bases(tes["text_encoder"], tes["text_encoder_2"])
    pipe = diffusers.StableDiffusionXLPipeline
    sd, alphas = pipe.lora_state_dict(str(tmp_path / "k.safetensors"), unet_config=unet.config)
    for comp, te in (("text_encoder", t1), ("text_encoder_2", t2)):
        pipe.load_lora_into_text_encoder(sd, alphas, te, prefix=comp, adapter_name="x")
    te_spec = {k: v for k, v in spec.items() if not k.startswith("lora_unet_")}
    _check_applied(te_spec, {id(tes["text_encoder"]): t1, id(tes["text_encoder_2"]): t2}, bases)


def test_unet_names_option_through_the_cli(tmp_path):
    """`--unet-names diffusers` writes an SDXL kohya file with diffusers-style block names, `sgm` with SGM names;
    both read back to the same ΔW."""
    unet, tes = _sdxl_unet(), _text_encoders()
    src = tmp_path / "sdxl.safetensors"
    _kohya_file(src, unet, SDXL_UNET, tes)
    outs = {}
    for how in ("sgm", "diffusers"):
        outs[how] = tmp_path / f"{how}.safetensors"
        res = run_cli("convert", src, "--to", "kohya", "--unet-names", how, "-o", outs[how])
        assert res.exit_code == 0, res.stderr
    sgm, dif = set(read_st(outs["sgm"])), set(read_st(outs["diffusers"]))
    assert any("input_blocks" in k for k in sgm) and not any("down_blocks" in k for k in sgm)
    assert any("down_blocks" in k for k in dif) and not any("input_blocks" in k for k in dif)
    a, b = load_adapter(outs["sgm"]), load_adapter(outs["diffusers"])
    da = {(m.component, m.path): m.delta() for m in from_adapter(a).modules}
    db = {(m.component, m.path): m.delta() for m in from_adapter(b).modules}
    assert set(da) == set(db) and all(np.allclose(da[k], db[k], atol=1e-6) for k in da)


def test_sd15_sgm_names_and_applied_weights(tmp_path):
    unet = _sd_unet()
    src = tmp_path / "sd.safetensors"
    spec = _kohya_file(src, unet, SD_UNET)
    convert(load_adapter(src), tmp_path / "d.safetensors", "diffusers")
    keys = read_st(tmp_path / "d.safetensors")
    ours = {k.removeprefix("unet.").split(".lora_A")[0] for k in keys if ".lora_A" in k}
    assert ours == set(SD_UNET.values())
    part = tmp_path / "part.safetensors"
    write_kohya(part, {k: v[2:] for k, v in spec.items() if not DIFFUSERS_CANNOT.search(k.removeprefix("lora_unet_"))})
    assert _diffusers_names(part, unet.config) == {v for k, v in SD_UNET.items() if not DIFFUSERS_CANNOT.search(k)}
    u = _fresh(_sd_unet, unet)
    bases = _bases(unet)
    sd, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(tmp_path / "d.safetensors"))
    diffusers.StableDiffusionPipeline.load_lora_into_unet(sd, alphas, u, adapter_name="x")
    _check_applied(spec, {id(unet): u}, bases)
    # kohya out: an SGM source keeps its names; from diffusers, SD1.x gets sd-scripts' diffusers-style names
    convert(load_adapter(src), tmp_path / "k.safetensors", "kohya")
    assert set(read_st(tmp_path / "k.safetensors")) == set(read_st(src))
    k2 = convert(load_adapter(tmp_path / "d.safetensors"), tmp_path / "k2.safetensors", "kohya")
    assert {m.target for m in k2.modules} == {"lora_unet_" + p.replace(".", "_") for p in SD_UNET.values()}


def _all_paths(unet) -> list[str]:
    return [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


@pytest.mark.parametrize("shape", ["sdxl", "sd15"])
def test_every_unet_module_sgm_round_trip_and_diffusers_names(shape):
    """Every Linear/Conv2d of the tiny UNet: diffusers path → SGM kohya name → the same path, and diffusers'
    converter gives the same path for that SGM name (SD1.x: except what it cannot read, see DIFFUSERS_CANNOT)."""
    unet = _sdxl_unet() if shape == "sdxl" else _sd_unet()
    paths = _all_paths(unet)
    up0 = up0_has_attention(paths)
    assert up0 is (shape == "sdxl")
    names = {}
    for p in paths:
        k = dotted_to_kohya("unet", p, sgm=True, up0_attn=up0)
        assert k.removeprefix("lora_unet_").startswith(("input_blocks_", "middle_block_", "output_blocks_", "out_2",
                                                         "time_embed_", "label_emb_"))
        assert kohya_to_dotted(k) == ("unet", p)
        names[k] = p
    keep = {k: p for k, p in names.items() if not DIFFUSERS_CANNOT.search(k.removeprefix("lora_unet_"))}
    assert shape == "sd15" or keep == names
    sd = {f"{k}.{s}": torch.zeros(1, 1) for k in keep for s in ("lora_down.weight", "lora_up.weight")}
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils import convert_unet_state_dict_to_peft

    got, _ = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(sd, unet.config))
    got = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in got.items()})
    assert {k.split(".lora_A")[0] for k in got if ".lora_A" in k} == set(keep.values())


def test_sgm_refusals_one_line():
    cases = [
        lambda: kohya_to_dotted("lora_unet_input_blocks_3_1_proj_in"),  # input_blocks.3 is the downsampler
        lambda: kohya_to_dotted("lora_unet_output_blocks_1_0_norm1"),  # not a LoRA-able resnet layer
        lambda: kohya_to_dotted("lora_unet_middle_block_3_proj_in"),
        lambda: kohya_to_dotted("lora_unet_output_blocks_4_2_conv"),  # the upsampler is in output_blocks.5
        # where up_blocks.0's upsampler goes depends on the layout, and nothing tells
        lambda: dotted_to_kohya("unet", "up_blocks.0.upsamplers.0.conv", sgm=True, up0_attn=None),
        lambda: up0_has_attention(["up_blocks.0.attentions.0.proj_in", "down_blocks.3.resnets.0.conv1"]),
        lambda: dotted_to_kohya("unet", "down_blocks.0.resnets.0.norm1", sgm=True),  # no SGM LoRA name
    ]
    for case in cases:
        with pytest.raises(InspectError) as e:
            case()
        assert len(str(e.value).splitlines()) == 1
    assert dotted_to_kohya("unet", "up_blocks.0.upsamplers.0.conv", sgm=True, up0_attn=False) == \
        "lora_unet_output_blocks_2_1_conv"
    assert dotted_to_kohya("unet", "up_blocks.1.upsamplers.0.conv", sgm=True) == "lora_unet_output_blocks_5_2_conv"
    assert up0_has_attention(["mid_block.attentions.0.proj_in"]) is None


def test_every_text_encoder_module_matches_diffusers_names():
    """Every Linear of a CLIP text encoder (with projection): the kohya name sd-scripts writes → our dotted path,
    equal to what diffusers' kohya text-encoder converter and its PEFT renaming give."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    te = _text_encoders()["text_encoder_2"]
    paths = [n for n, m in te.named_modules() if isinstance(m, torch.nn.Linear)]
    assert "text_projection" in paths and len(paths) == 13
    for prefix, comp in (("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")):
        names = {prefix + p.replace(".", "_"): p for p in paths}
        assert {k: kohya_to_dotted(k) for k in names} == {k: (comp, p) for k, p in names.items()}
        sd = {f"{k}.{s}": torch.zeros(1, 1) for k in names for s in ("lora_down.weight", "lora_up.weight")}
        got, _ = _convert_non_diffusers_lora_to_diffusers(sd)
        got = convert_state_dict_to_peft(convert_state_dict_to_diffusers(
            {k.removeprefix(comp + "."): v for k, v in got.items()}))
        assert {k.split(".lora_A")[0] for k in got if ".lora_A" in k} == set(paths)


def _canon(paths: dict[str, str], source: str):
    from lora_inspect.convert.canon import Canon, CanonModule

    mods = [CanonModule(*full.split(".", 1), "linear", np.ones((2, 1)), np.ones((1, 2)), 1.0, source_name=src)
            for full, src in paths.items()]
    return Canon(mods, source)


def test_kohya_naming_choices():
    from lora_inspect.convert.names import kohya_names

    up0 = "unet.up_blocks.0.upsamplers.0.conv"
    # SDXL evidence (a second text encoder) but nothing says whether up_blocks.0 has attentions
    c = _canon({up0: up0, "text_encoder_2.text_model.encoder.layers.0.mlp.fc1": "x",
                "text_encoder.text_model.encoder.layers.0.mlp.fc1": "y"}, "diffusers")
    with pytest.raises(InspectError) as e:
        kohya_names(c, "sgm")
    assert len(str(e.value).splitlines()) == 1 and "up_blocks.0" in str(e.value)
    names, notes = kohya_names(c)  # auto falls back to diffusers-style names and says why
    assert names == ["lora_unet_up_blocks_0_upsamplers_0_conv", "lora_te2_text_model_encoder_layers_0_mlp_fc1",
                     "lora_te1_text_model_encoder_layers_0_mlp_fc1"]
    assert "not possible" in notes[0]
    # an SGM kohya source decides that upsampler's slot by its own name, and keeps its names
    for slot in ("1", "2"):
        src = f"lora_unet_output_blocks_2_{slot}_conv"
        assert kohya_names(_canon({up0: src}, "kohya"))[0] == [src]
    # SD1.x evidence (down_blocks.3), from diffusers: sd-scripts' diffusers-style names, lora_te_
    c = _canon({"unet.down_blocks.3.resnets.0.conv1": "a", up0: "b", "text_encoder.text_model.final_layer_norm": "c"},
               "diffusers")
    assert kohya_names(c)[0] == ["lora_unet_down_blocks_3_resnets_0_conv1", "lora_unet_up_blocks_0_upsamplers_0_conv",
                                 "lora_te_text_model_final_layer_norm"]
    assert kohya_names(c, "sgm")[0][:2] == ["lora_unet_input_blocks_10_0_in_layers_2", "lora_unet_output_blocks_2_1_conv"]
    with pytest.raises(InspectError):
        kohya_names(c, "compvis")
