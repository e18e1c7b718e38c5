"""``extract`` on tiny transformers models built in the test: every module against the dense float64 SVD of
its ΔW (Eckart–Young), the PEFT output loaded by PEFT itself (merged weights and logits against TUNED),
GPT-2's Conv1D orientation, sharded checkpoints, the byte budget, and the refusals (one line, exit 2,
nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import run_cli, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

TOL_OPT = 1e-3  # the certificate: ‖ΔW − BA‖_F ≤ (1 + 1e-3)·optimum, plus float32 storage rounding


def _planted(model, rank: int, seed: int, noise: float, names=("q_proj", "v_proj", "up_proj", "down_proj", "c_attn",
                                                             "c_fc")) -> dict[str, torch.Tensor]:
    """Add a rank-`rank` update plus `noise`·Gaussian to the weights whose names end with `names`; returns
    {module: ΔW (out, in) float64} as the model computes it (Conv1D transposed)."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not name.endswith(names):
                continue
            w = mod.weight
            conv1d = type(mod).__name__ == "Conv1D"
            out_, in_ = (w.shape[1], w.shape[0]) if conv1d else w.shape
            d = (torch.randn(out_, rank, generator=g, dtype=torch.float64)
                 @ torch.randn(rank, in_, generator=g, dtype=torch.float64)) * 0.05
            d += noise * torch.randn(out_, in_, generator=g, dtype=torch.float64)
            before = w.detach().double().clone()
            w.add_((d.T if conv1d else d).to(w.dtype))
            got = w.detach().double() - before
            deltas[name] = got.T if conv1d else got
    return deltas


def _save(model, d: Path, shard: str | None = None) -> Path:
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(str(d), safe_serialization=True, **kw)
    return d


def _optimum(d: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(d)
    return float(torch.sqrt(torch.sum(s[k:] ** 2)) / torch.linalg.norm(d))


def _llama_pair(tmp: Path, noise: float = 1e-3, shard: str | None = "40KB"):
    base = tiny_llama(seed=3)
    _save(base, tmp / "base", shard)
    tuned = tiny_llama(seed=3)
    deltas = _planted(tuned, 3, seed=11, noise=noise)
    with torch.no_grad():
        tuned.model.norm.weight.add_(0.01)
    _save(tuned, tmp / "tuned", shard)
    return base, tuned, deltas


def test_llama_sharded_every_module_is_eckart_young_and_peft_applies_it(tmp_path):
    base, tuned, deltas = _llama_pair(tmp_path)
    assert (tmp_path / "base" / "model.safetensors.index.json").is_file()  # sharded, as the test intends
    out = tmp_path / "lora"
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", out, "--rank", "3", "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["schema"] == "lora-inspect/extract/1" and doc["output"]["layout"] == "peft"
    got = {m["name"]: m for m in doc["modules"]}
    assert set(got) == set(deltas)  # every changed linear, nothing else
    for name, d in deltas.items():
        opt = _optimum(d, 3)
        assert got[name]["rank"] == 3
        assert got[name]["rel_error"] <= opt * (1 + TOL_OPT) + 1e-6, name
        assert got[name]["rel_optimum"] <= opt * (1 + 1e-9) + 1e-12, name
    # the norm is carried whole (modules_to_save), named with its share
    aside = {s["name"]: s for s in doc["set_aside"]}
    assert aside["model.norm.weight"]["action"] == "saved" and aside["model.norm.weight"]["share"] > 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["model.norm"] and cfg["r"] == 3
    assert cfg["base_model_name_or_path"] == str(tmp_path / "base")
    # PEFT loads it onto BASE: merged weights = W + U_kΣ_kV_kᵀ (independent dense SVD), logits close to TUNED
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), torch_dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, str(out)).merge_and_unload()
    for name, d in deltas.items():
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        want = (u[:, :3] * s[:3]) @ vh[:3]
        w = merged.get_submodule(name).weight.detach().double() - base.get_submodule(name).weight.detach().double()
        assert float((w - want).norm() / want.norm()) < 1e-5, name
    assert torch.equal(merged.model.norm.weight, tuned.model.norm.weight)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lt, lm, lb = tuned(ids).logits, merged(ids).logits, base(ids).logits
    # the planted rank-3 change is captured: base+LoRA is far closer to TUNED than BASE is
    assert float((lm - lt).abs().max()) < 0.05 * float((lb - lt).abs().max())


def test_gpt2_conv1d_orientation_exact_rank_recovered(tmp_path):
    base = tiny_gpt2(seed=5)
    _save(base, tmp_path / "base")
    tuned = tiny_gpt2(seed=5)
    deltas = _planted(tuned, 2, seed=4, noise=0.0, names=("c_attn", "c_fc"))
    _save(tuned, tmp_path / "tuned")
    out = tmp_path / "lora"
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", out, "--energy", "0.999999", "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert {m["name"]: m["rank"] for m in doc["modules"]} == {n: 2 for n in deltas}
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), torch_dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, str(out)).merge_and_unload()
    for name in deltas:
        assert torch.allclose(merged.get_submodule(name).weight, tuned.get_submodule(name).weight, atol=2e-6), name


def test_max_size_fits_and_allocates_by_sigma_squared_per_byte(tmp_path):
    _llama_pair(tmp_path, noise=1e-2, shard=None)
    out = tmp_path / "lora"
    budget = 20_000
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", out, "--max-size", str(budget), "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    size = sum(p.stat().st_size for p in out.iterdir())
    assert size == doc["output"]["bytes"] <= budget
    ranks = [m["rank"] for m in doc["modules"]]
    assert max(ranks) > min(ranks) or len(set(ranks)) == 1  # an allocation happened (not necessarily uniform)
    assert doc["budget"]["chosen"] in ("greedy", "uniform")


def test_bf16_output_rounding_is_in_the_reported_error(tmp_path):
    _, _, deltas = _llama_pair(tmp_path, noise=0.0, shard=None)
    r32 = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "a", "--rank", "3", "--json")
    r16 = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "b", "--rank", "3", "--dtype",
                  "bf16", "--json")
    e32 = {m["name"]: m["rel_error"] for m in json.loads(r32.stdout)["modules"]}
    e16 = {m["name"]: m["rel_error"] for m in json.loads(r16.stdout)["modules"]}
    for name in deltas:  # exact rank 3: float32 storage is ~1e-7 off, bf16 ~1e-3
        assert e32[name] < 1e-5 and 1e-4 < e16[name] < 1e-2, (name, e32[name], e16[name])


def test_refusals_are_one_line_and_write_nothing(tmp_path):
    _llama_pair(tmp_path, shard=None)
    other = tiny_llama(seed=3, hidden=48)
    _save(other, tmp_path / "other")
    out = tmp_path / "lora"
    res = run_cli("extract", tmp_path / "base", tmp_path / "other", "-o", out, "--rank", "2")
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "model.embed_tokens.weight" in res.stderr or "is 96×48" in res.stderr, res.stderr
    assert not out.exists()
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", out, "--rank", "2", "--energy", "0.9")
    assert res.exit_code == 2 and "exactly one" in res.stderr and not out.exists()
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x04not a real pickle")
    res = run_cli("extract", tmp_path / "base", tmp_path / "pickled", "-o", out, "--rank", "2")
    assert res.exit_code == 2 and "pickle" in res.stderr and not out.exists()
    res = run_cli("extract", tmp_path / "base", tmp_path / "base", "-o", out, "--rank", "2")
    assert res.exit_code == 2 and "nothing to extract" in res.stderr and not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("x")
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", out, "--rank", "2")
    assert res.exit_code == 2 and "already exists" in res.stderr


def test_quantised_config_refused(tmp_path):
    _llama_pair(tmp_path, shard=None)
    cfg = json.loads((tmp_path / "tuned" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes"}
    (tmp_path / "tuned" / "config.json").write_text(json.dumps(cfg))
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "o", "--rank", "2")
    assert res.exit_code == 2 and "quantised" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_embeddings_as_lora_and_skip(tmp_path):
    base = tiny_llama(seed=3)
    _save(base, tmp_path / "base")
    tuned = tiny_llama(seed=3)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        d = torch.randn(96, 2, generator=g) @ torch.randn(2, 32, generator=g) * 0.1
        tuned.model.embed_tokens.weight.add_(d)
    _save(tuned, tmp_path / "tuned")
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "e", "--rank", "2",
                  "--embeddings", "lora", "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert [m["kind"] for m in doc["modules"]] == ["embedding"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), torch_dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, str(tmp_path / "e")).merge_and_unload()
    assert torch.allclose(merged.model.embed_tokens.weight, tuned.model.embed_tokens.weight, atol=1e-6)
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "s", "--rank", "2",
                  "--embeddings", "skip")
    assert res.exit_code == 2 and "nothing to extract" in res.stderr


def test_numpy_engine_matches_torch_exact_route():
    """The GPU route's code (torch, float64 Gram + eigh) run on the CPU agrees with the numpy route."""
    from lora_inspect.extract.factor import decompose
    from lora_inspect.extract.gpu import decompose_torch

    rng = np.random.default_rng(0)
    d = rng.standard_normal((60, 5)) @ rng.standard_normal((5, 90)) + 1e-3 * rng.standard_normal((60, 90))
    a = decompose(d, rank=5)
    b = decompose_torch(d, rank=5, energy=None, device="cpu")
    assert np.allclose(a.sigma, b.sigma, rtol=1e-10)
    assert abs(a.residual2 - b.residual2) <= 1e-9 * a.total
    pa = (a.u * a.sigma) @ a.vt
    pb = (b.u * b.sigma) @ b.vt
    assert np.abs(pa - pb).max() <= 1e-9 * np.abs(pa).max()


def test_calibrate_writes_what_beats_plain_on_held_out_text_and_forecasts(tmp_path):
    """--calibrate: a reference extraction, then truncate --calibrate's propagated fit and held-out check; the
    adapter written is PEFT-loadable, the held-out KL of what was written is ≤ plain's, and the forecast is
    the whitened spectra's tail (non-increasing in k)."""
    from builders import TINY_TEXT, tiny_hf_model, tiny_tokenizer
    from transformers import AutoModelForCausalLM

    tiny_hf_model(tmp_path / "base", seed=4)
    tuned = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), torch_dtype=torch.float32)
    _planted(tuned, 6, seed=9, noise=2e-3, names=("q_proj", "v_proj", "o_proj"))
    tuned.save_pretrained(str(tmp_path / "tuned"), safe_serialization=True)
    tiny_tokenizer().save_pretrained(str(tmp_path / "tuned"))
    text = tmp_path / "calib.txt"
    text.write_text((TINY_TEXT + "\n") * 40)
    out = tmp_path / "cal"
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", out, "--rank", "2", "--calibrate", text,
                  "--reference-rank", "8", "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    cal = doc["calibration"]
    assert cal["chosen"] in ("calibrated", "plain")
    kl = cal["held_out_kl"]
    written = kl[cal["chosen"]]
    assert written <= kl["plain"] + 1e-15
    ref = doc["extract_reference"]
    assert ref["schema"] == "lora-inspect/extract/1" and {m["rank"] for m in ref["modules"]} <= set(range(1, 9))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 2
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), torch_dtype=torch.float32)
    peft.PeftModel.from_pretrained(model, str(out))  # loads
    table = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "cal2", "--rank", "2",
                    "--calibrate", text, "--reference-rank", "8")
    assert table.exit_code == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith("reference:")
    i = next(j for j, line in enumerate(lines) if line.startswith("forecast:"))
    errs = [float(line.split()[1]) for line in lines[i + 3:i + 7]]  # k = 1, 2, 4, 8
    assert errs == sorted(errs, reverse=True) and errs[-1] < errs[0]


def test_usage_errors_are_one_line_exit_2_and_write_nothing(tmp_path):
    from lora_inspect.errors import InspectError
    from lora_inspect.extract.results import ExtractSpec
    from lora_inspect.extract.run import check_spec

    _llama_pair(tmp_path, shard=None)
    out = tmp_path / "o"
    for extra, said in ((["--reference-rank", "8"], "--reference-rank goes with --calibrate"),
                        (["--calibrate", str(tmp_path / "base" / "config.json"), "--to", "kohya"], "--calibrate writes"),
                        (["--energy", "0"], "--energy")):
        args = ["--rank", "2"] if extra[0] != "--energy" else []
        r = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", out, *args, *extra)
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and said in r.stderr, r.stderr
        assert not out.exists()
    for bad in (ExtractSpec(rank=0), ExtractSpec(energy=1.5), ExtractSpec(max_bytes=0), ExtractSpec(rank=2, energy=0.5),
                ExtractSpec(rank=2, dtype="fp8")):
        with pytest.raises(InspectError):  # OptionError (a value) is an InspectError too
            check_spec(bad)
