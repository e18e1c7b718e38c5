"""``check --applied ENGINE ADAPTER`` (issue 22): a dry run of the engine's key mapping. Poisoned adapters
(a doubled prefix, a non-LoRA module, PEFT's saved base embedding, mlx-lm keys outside lora_parameters,
ComfyUI CLIP names outside LORA_CLIP_MAP) are named with the right fate and their share of ‖ΔW‖², which
is checked against PEFT's own merged ΔW. For diffusers, the dry run through its own converters is checked against
diffusers' real loaders on tiny models (what they inject and the ΔW they apply)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.builders import build_peft, edit_peft_tensors, run_cli, tiny_llama, write_kohya


def _applied(*args) -> tuple[int, dict]:
    res = run_cli("check", "--applied", *map(str, args), "--json")
    return res.exit_code, json.loads(res.stdout)


def _with_base(tmp: Path, seed: int, **kw):
    model = tiny_llama(seed)
    base = tmp / "base"
    model.save_pretrained(str(base), safe_serialization=True)
    return base, build_peft(tmp, seed=seed, model=model, **kw)


def test_a_clean_adapter_is_fully_applied(tmp_path):
    base, b = _with_base(tmp_path, 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    for args in ((b.path,), (b.path, "--base", base)):
        code, doc = _applied("vllm", *args)
        assert code == 0 and doc["ok"] and doc["applied_share"] == 1.0
        assert {m["fate"] for m in doc["modules"]} == {"applied"}


def test_a_doubled_prefix_is_dropped_silently_with_its_share(tmp_path):
    base, b = _with_base(tmp_path, 2, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    bad = "model.layers.0.self_attn.q_proj"

    def edit(sd):
        return {k.replace("base_model.model." + bad, "base_model.model.model." + bad): v for k, v in sd.items()}

    edit_peft_tensors(b.path, edit)
    energy = {n: float((b.delta(n) ** 2).sum()) for n in
              [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]}
    code, doc = _applied("vllm", b.path, "--base", base)
    assert code == 1 and not doc["ok"]
    (m,) = [m for m in doc["modules"] if m["fate"] == "dropped"]
    assert m["name"] == "model." + bad
    share = energy[bad] / sum(energy.values())
    assert abs(doc["applied_share"] - (1 - share)) < 1e-6
    text = run_cli("check", "--applied", "vllm", str(b.path), "--base", str(base)).stdout
    assert f"dropped: model.{bad} ({share:.4%} of ‖ΔW‖²)" in text


def test_a_module_vllm_has_no_lora_for_refuses_the_load(tmp_path):
    b = build_peft(tmp_path, seed=3, r=4, lora_alpha=8, target_modules=["q_proj"])
    edit_peft_tensors(b.path, lambda sd: {k.replace("layers.1.self_attn.q_proj", "layers.1.self_attn.q_norm"): v
                                          for k, v in sd.items()})
    code, doc = _applied("vllm", b.path)
    assert code == 1 and doc["applied_share"] == 0.0
    (m,) = [m for m in doc["modules"] if m["fate"] == "refused"]
    assert m["name"].endswith("q_norm") and "q_norm" in m["reason"]


def test_the_saved_base_embedding_is_skipped_not_dropped(tmp_path):
    b = build_peft(tmp_path, seed=4, r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"])
    code, doc = _applied("vllm", b.path)
    fates = {m["name"]: m["fate"] for m in doc["modules"]}
    assert fates["model.embed_tokens"] == "applied"  # Llama's embedding_modules
    assert [k for k, f in fates.items() if f == "skipped"] == ["base_model.model.model.embed_tokens.base_layer.weight"]
    assert code == 0


def test_lorax_drops_a_non_target_module(tmp_path):
    b = build_peft(tmp_path, seed=5, r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"])
    code, doc = _applied("lorax", b.path)
    assert code == 1
    assert [m["name"] for m in doc["modules"] if m["fate"] == "dropped"] == ["model.embed_tokens"]


def test_mlx_keys_outside_lora_parameters_are_dropped(tmp_path):
    base, b = _with_base(tmp_path, 6, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "mlx"
    assert run_cli("convert", str(b.path), "--to", "mlx", "-o", str(out)).exit_code == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["lora_parameters"]["keys"] = ["self_attn.q_proj"]
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    code, doc = _applied("mlx-lm", out, "--base", base)
    assert code == 1
    assert sorted(m["name"] for m in doc["modules"] if m["fate"] == "dropped") == [
        "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]


def test_comfyui_applies_only_its_clip_key_map(tmp_path):
    g = torch.Generator().manual_seed(7)
    sd = {}
    names = ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te1_text_model_encoder_layers_0_mlp_fc1",
             "lora_te1_text_model_final_layer_norm_x", "lora_te1_text_model_encoder_layers_40_mlp_fc1"]
    for n in names:
        sd[n + ".lora_down.weight"] = torch.randn(2, 8, generator=g)
        sd[n + ".lora_up.weight"] = torch.randn(8, 2, generator=g)
        sd[n + ".alpha"] = torch.tensor(2.0)
    f = tmp_path / "lora.safetensors"
    save_file(sd, str(f))
    code, doc = _applied("comfyui", f)
    fates = {m["name"]: m["fate"] for m in doc["modules"]}
    assert code == 1
    assert [fates[n] for n in names] == ["applied", "applied", "dropped", "dropped"]
    e = {m["name"]: m["energy"] for m in doc["modules"]}
    want = {n: float(((sd[n + ".lora_up.weight"].double() @ sd[n + ".lora_down.weight"].double()) ** 2).sum())
            for n in names}  # α = r: s = 1
    for n in names:
        assert abs(e[n] - want[n]) <= 1e-9 * want[n]


def test_an_unknown_engine_is_a_usage_error(tmp_path):
    b = build_peft(tmp_path, seed=8, r=4, lora_alpha=8, target_modules=["q_proj"])
    res = run_cli("check", "--applied", "tgi", str(b.path))
    assert res.exit_code == 2 and "tgi" in res.stderr


# ---- diffusers: its own converters and loaders (lora_inspect/checks/applied_diffusers.py), checked against what
# diffusers' real loaders do on a tiny Stable Diffusion UNet and CLIP text encoder built here


@pytest.fixture(scope="module")
def sd_base(tmp_path_factory):
    """(unet, text encoder, pipeline dir) of a tiny SD 1.x-shaped pipeline."""
    pytest.importorskip("diffusers")
    from tests.diffusers_oracle import save_pipeline, tiny_te, tiny_unet

    unet, te = tiny_unet(), tiny_te()
    return unet, te, save_pipeline(tmp_path_factory.mktemp("sd") / "base", unet, te)


def _kohya_modules(unet, te, paths: dict[str, list[str]], alpha, seed: int) -> dict:
    """{kohya name: (down, up, α)} for the given module paths, rank 2."""
    from tests.diffusers_oracle import factors, kohya_name

    g = torch.Generator().manual_seed(seed)
    models = {"unet": unet, "text_encoder": te}
    return {kohya_name(comp, p): (*factors(models[comp], p, 2, g), alpha(i))
            for comp, ps in paths.items() for i, p in enumerate(ps)}


def _ratio(reason: str) -> float:
    return float(reason.split("applied at ")[1].split("×")[0])


def test_diffusers_dry_run_matches_its_real_loader_on_every_module(sd_base, tmp_path):
    """A kohya file on every Linear/Conv2d of the UNet and text encoder, α = r for most modules and not for some:
    each module the dry run calls applied is injected by diffusers' own loaders with exactly the file's ΔW, each
    it calls altered is injected at the strength it names (diffusers drops the α of attention projections whose α
    is not the most common one), and the applied share is the real one."""
    from tests.builders import kohya_delta
    from tests.diffusers_oracle import kohya_name, lora_paths, real_load

    unet, te, base = sd_base
    paths = {"unet": lora_paths(unet), "text_encoder": lora_paths(te)}
    mods = _kohya_modules(unet, te, paths, lambda i: 2.0 if i % 4 else 1.0 + i % 3, seed=11)
    f = write_kohya(tmp_path / "k.safetensors", mods)
    real = real_load(f, unet, te)
    code, doc = _applied("diffusers", f, "--base", base)
    fates = {m["name"]: m for m in doc["modules"]}
    total = applied = 0.0
    counts = {"applied": 0, "altered": 0}
    for comp, ps in paths.items():
        for p in ps:
            k = kohya_name(comp, p)
            want, got, m = kohya_delta(*mods[k]), real[f"{comp}.{p}"], fates[k]
            energy = float((want ** 2).sum())
            total += energy
            assert abs(m["energy"] - energy) <= 1e-6 * energy, k
            if m["fate"] == "applied":
                assert float((got - want).norm() / want.norm()) < 1e-5, k
                applied += energy
            else:
                assert m["fate"] == "altered", (k, m)
                assert abs(_ratio(m["reason"]) - float(got.norm() / want.norm())) < 1e-3, k
            counts[m["fate"]] += 1
    assert counts["applied"] > 50 and counts["altered"] > 3  # both cases are exercised
    assert code == 1 and abs(doc["applied_share"] - applied / total) < 1e-6
    assert "diffusers" in doc["against"] and str(base) in doc["against"]


def test_keys_under_no_component_are_dropped_as_in_diffusers_9291(sd_base, tmp_path):
    """PEFT keys without the ``unet.`` prefix: the loader keeps ``unet.``/``text_encoder.`` keys only, so nothing
    is injected and nothing fails — the dry run names both modules dropped, with their whole share."""
    from tests.diffusers_oracle import factors, real_load

    unet, te, base = sd_base
    g = torch.Generator().manual_seed(12)
    sd = {}
    for p in ("down_blocks.0.attentions.0.proj_in", "mid_block.resnets.0.conv1"):
        down, up = factors(unet, p, 2, g)
        sd[p + ".lora_A.weight"], sd[p + ".lora_B.weight"] = down.contiguous(), up.contiguous()
    f = tmp_path / "noprefix.safetensors"
    save_file(sd, str(f))
    assert real_load(f, unet, te) == {}
    for args in ((), ("--base", base)):
        code, doc = _applied("diffusers", f, *args)
        assert code == 1 and doc["applied_share"] == 0.0
        assert {m["fate"] for m in doc["modules"]} == {"dropped"}
        assert all("no component" in m["reason"] for m in doc["modules"])


def test_sgm_keys_beside_diffusers_names_are_dropped_by_the_converter(sd_base, tmp_path):
    """``_maybe_map_sgm_blocks_to_diffusers`` discards SGM keys when a file also has diffusers block names
    (SDXL's loader): the dry run names the SGM module dropped; the others are what the real loader injects."""
    from tests.diffusers_oracle import real_load

    unet, te, base = sd_base
    paths = {"unet": ["down_blocks.0.attentions.0.proj_in", "down_blocks.0.attentions.0.proj_out"],
             "text_encoder": ["encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.out_proj"]}
    mods = _kohya_modules(unet, te, paths, lambda i: 2.0, seed=13)
    sgm = "lora_unet_input_blocks_1_1_proj_in"  # = down_blocks.0.attentions.0.proj_in in SGM names
    mods[sgm] = mods.pop("lora_unet_down_blocks_0_attentions_0_proj_in")
    f = write_kohya(tmp_path / "mixed.safetensors", mods)
    xl = base.parent / "xl"
    xl.mkdir()
    for part in ("unet", "text_encoder"):
        (xl / part).symlink_to(base / part)
    (xl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    real = real_load(f, unet, te, xl=True)
    code, doc = _applied("diffusers", f, "--base", xl)
    fates = {m["name"]: m for m in doc["modules"]}
    assert fates[sgm]["fate"] == "dropped" and "conversion drops" in fates[sgm]["reason"]
    assert {m["engine_name"] for m in doc["modules"] if m["fate"] == "applied"} == set(real)
    assert len(real) == 3 and code == 1


def test_a_module_the_base_lacks_is_dropped_with_its_share(sd_base, tmp_path):
    """A kohya name the converter turns into a module the UNet does not have: PEFT leaves it out (a warning);
    the dry run names it dropped with its share of ‖ΔW‖², and the rest is what the real loader injects."""
    from tests.builders import kohya_delta
    from tests.diffusers_oracle import real_load

    unet, te, base = sd_base
    paths = {"unet": ["down_blocks.0.attentions.0.proj_in", "mid_block.resnets.0.conv1"],
             "text_encoder": ["encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.out_proj"]}
    mods = _kohya_modules(unet, te, paths, lambda i: 2.0, seed=18)
    down, up, a = mods["lora_unet_down_blocks_0_attentions_0_proj_in"]
    bad = "lora_unet_down_blocks_0_attentions_0_proj_nope"
    mods[bad] = (down.clone() * 3, up.clone(), a)
    f = write_kohya(tmp_path / "k.safetensors", mods)
    real = real_load(f, unet, te)
    code, doc = _applied("diffusers", f, "--base", base)
    fates = {m["name"]: m for m in doc["modules"]}
    assert fates[bad]["fate"] == "dropped" and "down_blocks.0.attentions.0.proj.nope" in fates[bad]["reason"]
    assert {m["engine_name"] for m in doc["modules"] if m["fate"] == "applied"} == set(real) and len(real) == 4
    energy = {k: float((kohya_delta(*v) ** 2).sum()) for k, v in mods.items()}
    assert code == 1 and abs(doc["applied_share"] - (1 - energy[bad] / sum(energy.values()))) < 1e-6


def test_a_loader_failure_refuses_the_whole_adapter(sd_base, tmp_path):
    """Three loads diffusers' real ``load_lora_weights`` fails: a kohya text-encoder LoRA on q_proj alone and a
    PEFT-format one on fc1 alone (``convert_state_dict_to_diffusers`` / ``convert_state_dict_to_peft`` cannot infer
    the format and raise), and 2-D factors on a 1×1 conv (a size mismatch in ``load_state_dict``). The dry run
    refuses every module of each, with the cause in one line."""
    from tests.diffusers_oracle import factors, real_load

    unet, te, base = sd_base
    kohya = {"te": _kohya_modules(unet, te, {"unet": ["down_blocks.0.attentions.0.proj_in"],
                                             "text_encoder": ["encoder.layers.0.self_attn.q_proj"]}, lambda i: 2.0, 14),
             "shape": {"lora_unet_down_blocks_0_attentions_0_proj_in": (torch.ones(2, 8), torch.ones(8, 2), 2.0)}}
    files = {what: write_kohya(tmp_path / f"{what}.safetensors", mods) for what, mods in kohya.items()}
    g = torch.Generator().manual_seed(19)
    sd = {}
    for comp, model, p in (("unet", unet, "down_blocks.0.attentions.0.proj_in"), ("text_encoder", te, "encoder.layers.0.mlp.fc1")):
        a, b = factors(model, p, 2, g)
        sd[f"{comp}.{p}.lora_A.weight"], sd[f"{comp}.{p}.lora_B.weight"] = a.contiguous(), b.contiguous()
    files["peft-te"] = tmp_path / "peft.safetensors"
    save_file(sd, str(files["peft-te"]))
    for what, f in files.items():
        with pytest.raises((ValueError, RuntimeError)):
            real_load(f, unet, te)
        code, doc = _applied("diffusers", f, "--base", base)
        assert code == 1 and doc["applied_share"] == 0.0
        assert {m["fate"] for m in doc["modules"]} == {"refused"}
        reason = doc["modules"][0]["reason"]
        assert "\n" not in reason and ("size mismatch" if what == "shape" else "infer state dict type") in reason


def test_a_dora_scale_diffusers_filters_out_is_altered(sd_base, tmp_path):
    """diffusers' SD loaders filter ``dora_scale`` out with a warning: the module loads as plain LoRA. The dry run
    calls it altered and names the key; the real loader injects a layer without a magnitude."""
    from tests.builders import kohya_delta
    from tests.diffusers_oracle import real_load

    unet, te, base = sd_base
    paths = {"unet": ["down_blocks.0.attentions.0.proj_in"],
             "text_encoder": ["encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.out_proj"]}
    mods = _kohya_modules(unet, te, paths, lambda i: 2.0, seed=15)
    sd = {}
    for k, (down, up, a) in mods.items():
        sd.update({k + ".lora_down.weight": down, k + ".lora_up.weight": up, k + ".alpha": torch.tensor(a)})
    dora = "lora_unet_down_blocks_0_attentions_0_proj_in"
    sd[dora + ".dora_scale"] = torch.rand(8, 1, 1, 1) + 0.5
    f = tmp_path / "dora.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(f))
    real = real_load(f, unet, te)
    want = kohya_delta(*mods[dora])
    assert float((real["unet.down_blocks.0.attentions.0.proj_in"] - want).norm() / want.norm()) < 1e-5  # plain LoRA
    code, doc = _applied("diffusers", f, "--base", base)
    fates = {m["name"]: m for m in doc["modules"]}
    assert fates[dora]["fate"] == "altered" and dora + ".dora_scale" in fates[dora]["reason"]
    assert code == 1 and {m["fate"] for n, m in fates.items() if n != dora} == {"applied"}


def test_kohya_flux_through_diffusers_converter(tmp_path):
    """A kohya Flux LoRA (sd-scripts names, Flux.1's widths): the converter splits img_attn_qkv into to_q/to_k/to_v
    and single_blocks' linear1 into q/k/v/proj_mlp (its ‖ΔW‖² kept: none altered, though α ≠ r), and drops the T5
    (lora_te2_) keys with only a log line ("Unsupported keys for ai-toolkit"): named dropped with their share."""
    pytest.importorskip("diffusers")
    g = torch.Generator().manual_seed(16)
    h = 3072
    shapes = {"lora_unet_double_blocks_0_img_attn_qkv": (h, 3 * h), "lora_unet_single_blocks_0_linear1": (h, 7 * h),
              "lora_unet_double_blocks_0_txt_mod_lin": (h, 6 * h), "lora_te1_text_model_encoder_layers_0_mlp_fc1": (768, h),
              "lora_te2_encoder_block_0_layer_0_SelfAttention_q": (4096, 4096)}
    mods = {k: (torch.randn(1, i, generator=g), torch.randn(o, 1, generator=g), 0.5) for k, (i, o) in shapes.items()}
    f = write_kohya(tmp_path / "flux.safetensors", mods)
    code, doc = _applied("diffusers", f)
    fates = {m["name"]: m for m in doc["modules"]}
    t5 = "lora_te2_encoder_block_0_layer_0_SelfAttention_q"
    assert fates[t5]["fate"] == "dropped" and "conversion drops" in fates[t5]["reason"]
    assert {m["fate"] for n, m in fates.items() if n != t5} == {"unverified"}  # no --base: names not checked
    qkv = fates["lora_unet_double_blocks_0_img_attn_qkv"]["engine_name"]
    assert qkv == ", ".join(f"transformer.transformer_blocks.0.attn.to_{p}" for p in "qkv")
    assert fates["lora_unet_single_blocks_0_linear1"]["engine_name"].endswith("(+1)")
    assert "FluxLoraLoaderMixin" in doc["against"] and code == 1


def test_without_diffusers_the_key_rules_run_and_say_so(sd_base, tmp_path, monkeypatch):
    """diffusers not importable: the rules (names against the base's weights) and a line saying so."""
    unet, te, base = sd_base
    paths = {"unet": ["down_blocks.0.attentions.0.proj_in"], "text_encoder": ["encoder.layers.0.mlp.fc1"]}
    mods = _kohya_modules(unet, te, paths, lambda i: 2.0, seed=17)
    down, up, a = mods["lora_unet_down_blocks_0_attentions_0_proj_in"]
    mods["lora_unet_down_blocks_0_attentions_0_proj_nope"] = (down.clone(), up.clone(), a)
    f = write_kohya(tmp_path / "k.safetensors", mods)
    monkeypatch.setitem(sys.modules, "diffusers", None)
    code, doc = _applied("diffusers", f, "--base", base)
    assert "diffusers is not installed" in doc["against"]
    fates = {m["name"]: m["fate"] for m in doc["modules"]}
    assert fates == {"lora_unet_down_blocks_0_attentions_0_proj_in": "applied",
                     "lora_te_text_model_encoder_layers_0_mlp_fc1": "applied",
                     "lora_unet_down_blocks_0_attentions_0_proj_nope": "dropped"} and code == 1
