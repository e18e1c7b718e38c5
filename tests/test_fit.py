"""``fit`` (issue 22): every module becomes one the engine applies, at the Eckart–Young optimum of its
effective update (float64, against independent torch SVDs of PEFT's own merged ΔW); PEFT loads every PEFT
output; ``check OUT --serving ENGINE`` passes afterwards; DoRA without --base exits 2 and writes nothing;
dropped modules are named with their share of ‖ΔW‖²."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_inspect.formats import load_adapter
from tests.builders import build_peft, edit_peft_tensors, run_cli, tiny_llama
from tests.layout_builders import src_peft_loha

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _base(tmp: Path, seed: int = 0) -> tuple[Path, object]:
    model = tiny_llama(seed)
    d = tmp / "base"
    model.save_pretrained(str(d), safe_serialization=True)
    return d, model


def _best(d: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """Independent Eckart–Young: the best rank-k of d (dense float64 SVD) and its relative error."""
    u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
    best = (u[:, :k] * s[:k]) @ vh[:k]
    return best, float((s[k:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())


def _written(out: Path) -> dict[str, torch.Tensor]:
    """ΔW of every module of a written adapter, float64, from its raw factors (our reader)."""
    ad = load_adapter(out)
    return {m.name: torch.from_numpy(m.delta()) for m in ad.modules}


def _fit(*args) -> tuple[int, dict, str]:
    res = run_cli("fit", *map(str, args), "--json")
    return res.exit_code, (json.loads(res.stdout) if res.stdout.strip() else {}), res.stderr


def test_vllm_truncates_each_module_to_its_eckart_young_optimum(tmp_path):
    b = build_peft(tmp_path, seed=3, r=32, lora_alpha=16, target_modules=ALL)
    out = tmp_path / "served"
    code, doc, err = _fit(b.path, "--for", "vllm", "-o", out)
    assert code == 0, err
    assert doc["max_rank"] == 16 and doc["ok"]
    got = _written(out)
    total = kept = 0.0
    for m in doc["modules"]:
        d = b.delta(m["name"])  # PEFT's own merged change, float64
        best, opt = _best(d, 16)
        assert m["action"] == "truncated" and m["rank_out"] == 16
        assert abs(m["relative_error"] - opt) <= 1e-6 * max(opt, 1e-3), (m["name"], m["relative_error"], opt)
        assert abs(m["optimal_relative_error"] - opt) <= 1e-6 * max(opt, 1e-3)
        # the written ΔW is the optimum itself (fp32 storage; PEFT's merge in fp32)
        assert float((got[m["name"]] - best).norm() / d.norm()) < 1e-5
        s = torch.linalg.svdvals(d)
        total += float((s ** 2).sum())
        kept += float((s[:16] ** 2).sum())
    assert abs(doc["kept_share"] - kept / total) < 1e-6
    assert run_cli("check", str(out), "--serving", "vllm:16", "--no-config").exit_code == 0


def test_peft_loads_the_output_and_applies_it(tmp_path):
    from peft import PeftModel

    b = build_peft(tmp_path, seed=4, r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "served"
    code, doc, err = _fit(b.path, "--for", "vllm", "--max-rank", "8", "-o", out)
    assert code == 0, err
    assert {m["action"] for m in doc["modules"]} == {"kept"}  # rank 8 fits 8: factors unchanged
    pm = PeftModel.from_pretrained(tiny_llama(4), str(out)).merge_and_unload()
    sd = pm.state_dict()
    for m in doc["modules"]:
        d = sd[m["name"] + ".weight"].double() - b.base_state[m["name"] + ".weight"]
        assert float((d - b.delta(m["name"])).norm() / b.delta(m["name"]).norm()) < 1e-5


def test_dora_without_base_exits_2_and_writes_nothing(tmp_path):
    b = build_peft(tmp_path, seed=5, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"])
    out = tmp_path / "served"
    code, _, err = _fit(b.path, "--for", "vllm", "-o", out)
    assert code == 2 and not out.exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--base" in lines[0] and "DoRA" in lines[0]


def test_dora_folds_into_the_best_lora_of_its_effective_update(tmp_path):
    base, model = _base(tmp_path, seed=6)
    b = build_peft(tmp_path, seed=6, model=model, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"])
    out = tmp_path / "served"
    code, doc, err = _fit(b.path, "--for", "vllm", "--max-rank", "8", "--base", base, "-o", out)
    assert code == 0, err
    got = _written(out)
    for m in doc["modules"]:
        eff = b.delta(m["name"])  # PEFT's merged DoRA weight − W: the effective update, independently
        best, opt = _best(eff, 8)
        assert m["action"] == "DoRA folded" and m["rank_out"] == 8
        assert abs(m["relative_error"] - opt) < 1e-5, (m["relative_error"], opt)
        assert float((got[m["name"]] - best).norm() / eff.norm()) < 1e-5
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_dora"] is False and not any("magnitude" in k for k in load_adapter(out).tensors)


def test_a_module_the_engine_cannot_apply_is_dropped_and_named_with_its_share(tmp_path):
    b = build_peft(tmp_path, seed=7, r=4, lora_alpha=4, target_modules=["q_proj", "embed_tokens"])
    out = tmp_path / "served"
    code, doc, err = _fit(b.path, "--for", "lorax", "-o", out)  # LoRAX: no embedding LoRA
    assert code == 0, err
    mods = [x for x in doc["modules"] if x["rank_in"]]  # the LoRA modules (PEFT also saved the base embedding)
    energy = {m["name"]: float((b.delta(m["name"]) ** 2).sum()) for m in mods}
    total = sum(energy.values())
    (dropped,) = [m for m in mods if m["action"] == "dropped"]
    assert dropped["name"] == "model.embed_tokens"
    (copy,) = [m for m in doc["modules"] if not m["rank_in"]]
    assert copy["name"] == "model.embed_tokens.base_layer.weight" and copy["energy"] is None
    assert abs(dropped["energy"] - energy["model.embed_tokens"]) <= 1e-6 * energy["model.embed_tokens"]
    assert abs(doc["kept_share"] - (1 - energy["model.embed_tokens"] / total)) < 1e-6
    text = run_cli("fit", str(b.path), "--for", "lorax", "-o", str(tmp_path / "t"))
    assert f"dropped: model.embed_tokens ({energy['model.embed_tokens'] / total:.4%} of ‖ΔW‖²)" in text.stdout
    assert load_adapter(out).modules and all("embed" not in m.name for m in load_adapter(out).modules)


def _perturbed_lm_head(tmp: Path, seed: int):
    base, model = _base(tmp, seed)
    b = build_peft(tmp, seed=seed, model=model, r=4, lora_alpha=8, target_modules=["q_proj"],
                   modules_to_save=["lm_head"])
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(96, 32, generator=g) * 0.05

    def edit(sd):
        (key,) = [k for k in sd if "lm_head" in k]
        sd[key] = sd[key] + noise
        return sd

    edit_peft_tensors(b.path, edit)
    return base, b, noise.double()


def test_modules_to_save_without_base_is_dropped_with_base_factored(tmp_path):
    base, b, noise = _perturbed_lm_head(tmp_path, 8)
    code, doc, err = _fit(b.path, "--for", "vllm", "-o", tmp_path / "a")
    assert code == 0, err
    (lm,) = [m for m in doc["modules"] if m["name"] == "lm_head"]
    assert lm["action"] == "dropped" and lm["energy"] is None and "--base" in lm["reason"]
    assert doc["unknown_energy"] == ["lm_head"]
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["modules_to_save"] is None
    code, doc, err = _fit(b.path, "--for", "vllm", "--base", base, "-o", tmp_path / "b")
    assert code == 0, err
    (lm,) = [m for m in doc["modules"] if m["name"] == "lm_head"]
    best, opt = _best(noise, 16)
    assert lm["action"] == "delta as LoRA" and lm["rank_out"] == 16
    assert abs(lm["relative_error"] - opt) < 1e-5
    assert float((_written(tmp_path / "b")["lm_head"] - best).norm() / noise.norm()) < 1e-5
    assert run_cli("check", str(tmp_path / "b"), "--serving", "vllm", "--no-config").exit_code == 0


def test_loha_becomes_lora_at_the_optimum(tmp_path):
    built = src_peft_loha(tmp_path)
    out = tmp_path / "served"
    code, doc, err = _fit(built.path, "--for", "vllm", "--max-rank", "8", "-o", out)
    assert code == 0, err
    got = _written(out)
    for m in doc["modules"]:
        d = built.expected[(None, m["name"])]
        best, opt = _best(d, 8)
        assert m["action"] == "as LoRA" and m["rank_out"] == 8
        assert abs(m["relative_error"] - opt) < 1e-6
        assert float((got[m["name"]] - best).norm() / d.norm()) < 1e-5


def test_mlx_output_has_one_rank_and_the_applied_check_passes(tmp_path):
    base, model = _base(tmp_path, seed=9)
    b = build_peft(tmp_path, seed=9, model=model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                   rank_pattern={"v_proj": 2})
    out = tmp_path / "mlx"
    code, doc, err = _fit(b.path, "--for", "mlx-lm", "--base", base, "-o", out)
    assert code == 0, err
    assert doc["applied"]["ok"] and doc["applied"]["applied_share"] == pytest.approx(1.0)
    got = _written(out)
    for m in doc["modules"]:
        assert float((got[m["name"]] - b.delta(m["name"])).norm() / b.delta(m["name"]).norm()) < 1e-5


@pytest.mark.parametrize("args, needle", [
    (["--for", "vllm", "--max-rank", "20"], "1, 8, 16, 32, 64, 128, 256, 320, 512"),
    (["--for", "nope"], "nope"),
    (["--for", "llama.cpp"], "--base"),
    (["--for", "vllm", "--data", "README.md"], "--base"),
])
def test_refusals_exit_2_and_write_nothing(tmp_path, args, needle):
    b = build_peft(tmp_path, seed=10, r=4, lora_alpha=8, target_modules=["q_proj"])
    out = tmp_path / "served"
    res = run_cli("fit", str(b.path), *args, "-o", str(out))
    assert res.exit_code == 2 and not out.exists()
    assert needle in res.stderr


def test_an_existing_output_needs_force(tmp_path):
    b = build_peft(tmp_path, seed=12, r=4, lora_alpha=8, target_modules=["q_proj"])
    out = tmp_path / "served"
    assert run_cli("fit", str(b.path), "--for", "vllm", "-o", str(out)).exit_code == 0
    before = (out / "adapter_model.safetensors").read_bytes()
    assert run_cli("fit", str(b.path), "--for", "vllm", "-o", str(out)).exit_code == 2
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert run_cli("fit", str(b.path), "--for", "vllm", "-o", str(out), "--force").exit_code == 0


def test_data_reports_kl_and_top1_against_the_original(tmp_path):
    from tests.builders import TINY_TEXT, tiny_hf_model, tiny_hf_peft

    base = tiny_hf_model(tmp_path / "hf", seed=13)
    src = tiny_hf_peft(base, tmp_path / "src", ["q_proj", "v_proj", "down_proj"], r=16, alpha=16, seed=13, std=0.4)
    data = tmp_path / "text.txt"
    data.write_text(TINY_TEXT)
    code, same, err = _fit(src, "--for", "vllm", "--max-rank", "16", "--base", base, "--data", data, "-o", tmp_path / "a")
    assert code == 0, err
    assert same["verify"]["kl_to_original"] < 1e-9 and same["verify"]["top1_agreement"] == 1.0  # nothing cut
    code, cut, err = _fit(src, "--for", "vllm", "--max-rank", "1", "--base", base, "--data", data, "-o", tmp_path / "b")
    assert code == 0, err
    assert cut["verify"]["kl_to_original"] > 1e-6 and cut["verify"]["tokens"] == same["verify"]["tokens"] > 0


def test_llama_cpp_gguf_at_the_optimum(tmp_path):
    base, model = _base(tmp_path, seed=14)
    b = build_peft(tmp_path, seed=14, model=model, r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    out = tmp_path / "lora.gguf"
    code, doc, err = _fit(b.path, "--for", "llama.cpp", "--base", base, "--max-rank", "4", "-o", out)
    assert code == 0, err
    assert doc["output"]["format"] == "gguf" and doc["applied"]["ok"] and all(r["ok"] for r in doc["serving"])
    from lora_inspect.formats import layout_of

    ad = load_adapter(out)
    ad = layout_of(ad).with_base(ad, base)  # the head counts un-permute llama.cpp's Q/K rows
    got = {m.name: torch.from_numpy(m.delta()) for m in ad.modules}
    for m in doc["modules"]:
        d = b.delta(m["name"])
        best, opt = _best(d, 4)
        assert abs(m["relative_error"] - opt) < 1e-6
        assert float((got[m["name"]] - best).norm() / d.norm()) < 1e-5
