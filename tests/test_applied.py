"""``check --applied ENGINE ADAPTER`` (issue 22): a dry run of the engine's key mapping. Poisoned adapters
(a doubled prefix, a non-LoRA module, PEFT's saved base embedding, mlx-lm keys outside lora_parameters,
ComfyUI CLIP names outside LORA_CLIP_MAP) are named with the right fate and their share of ‖ΔW‖², which
is checked against PEFT's own merged ΔW."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.builders import build_peft, edit_peft_tensors, run_cli, tiny_llama


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
