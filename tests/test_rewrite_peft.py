"""truncate / rescale on real PEFT adapters: PEFT itself loads every output, and its merged ΔW equals,
in float64, the best rank-k approximation of PEFT's original ΔW (computed here by a dense SVD) or F × it."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from builders import build_peft, rel_close, run_cli, tiny_gpt2, tiny_llama

from lora_inspect.formats import load_adapter

TOL = 1e-5


def dense_truncation(delta: torch.Tensor | np.ndarray, k: int) -> torch.Tensor:
    """Eckart–Young reference, independent of the tool: dense float64 SVD."""
    u, s, vh = torch.linalg.svd(torch.as_tensor(delta).to(torch.float64), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def dense_energy_rank(delta: torch.Tensor, tau: float) -> int:
    e = torch.linalg.svdvals(delta.to(torch.float64)).numpy() ** 2
    if e.sum() <= 1e-24:
        return 0
    c = np.cumsum(e) / e.sum()
    return int(np.argmax(c >= tau * (1 - 1e-12)) + 1)


def load_with_peft(path, arch: str, seed: int = 0):
    """PeftModel.from_pretrained on a fresh base; asserts no missing/unexpected adapter keys.
    Returns PEFT's merged weights (float64)."""
    from peft import PeftModel
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    base = tiny_llama(seed) if arch == "llama" else tiny_gpt2(seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(base, str(path))
    bad = [str(w.message) for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    assert not bad, bad
    res = set_peft_model_state_dict(pm, load_peft_weights(str(path)))
    assert not res.unexpected_keys, res.unexpected_keys
    assert not [k for k in res.missing_keys if "lora_" in k], res.missing_keys
    merged = pm.merge_and_unload()
    return {k: v.detach().to(torch.float64) for k, v in merged.state_dict().items()}


def new_delta(merged: dict, pb, module: str) -> torch.Tensor:
    key = module + ".weight"
    return merged[key] - pb.base_state[key]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """LoRA r=8 with a rank pattern, an alpha pattern, an embedding, modules_to_save, and planted structure:
    q_proj of layer 0 exactly rank 2, v_proj of layer 1 all zero (energy rank 0 → dropped)."""
    tmp = tmp_path_factory.mktemp("llama")
    return build_peft(
        tmp, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        rank_pattern={"down_proj": 6}, alpha_pattern={"v_proj": 4}, modules_to_save=["lm_head"],
        planted={r"layers\.0\.self_attn\.q_proj": 2, r"layers\.1\.self_attn\.v_proj": 0},
    )


@pytest.fixture(scope="module")
def llama_rslora(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rslora")
    return build_peft(tmp, seed=3, r=8, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "up_proj"],
                      alpha_pattern={"up_proj": 20})


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpt2")
    return build_peft(tmp, arch="gpt2", seed=1, r=8, lora_alpha=8, target_modules=["c_attn", "c_fc", "wte"],
                      fan_in_fan_out=True)


def _modules(pb):
    return [m.name for m in load_adapter(pb.path).modules]


def _truncate(src, out, *args):
    r = run_cli("truncate", src, "-o", out, "--json", *args)
    assert r.exit_code == 0, r.output + (r.stderr if r.stderr_bytes else "")
    doc = json.loads(r.stdout)
    assert doc["schema"] == "lora-inspect/truncate/1"
    return doc


def _check_truncation(pb, out, arch, ranks: dict[str, int]):
    merged = load_with_peft(out, arch, seed=_seed(pb))
    for name in _modules(pb):
        want = dense_truncation(pb.delta(name), ranks[name])
        got = new_delta(merged, pb, name)
        assert rel_close(got, want, TOL), (name, float((got - want).abs().max()))


def _seed(pb) -> int:
    return int(str(pb.path).rsplit("-", 1)[1])


def test_truncate_rank_llama_loads_and_is_eckart_young(llama, tmp_path):
    doc = _truncate(llama.path, tmp_path / "out", "--rank", "3")
    want = {n: min(3, load_adapter(llama.path).module(n).rank) for n in _modules(llama)}
    # the planted zero module has energy 0 but --rank keeps min(3, r) directions (all zero)
    assert doc["ranks"] == want
    _check_truncation(llama, tmp_path / "out", "llama", want)
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 3 and cfg["rank_pattern"] == {} and cfg["use_rslora"] is False
    assert cfg["modules_to_save"] == ["lm_head"]
    # the full lm_head copy travelled unchanged
    src, dst = load_adapter(llama.path), load_adapter(tmp_path / "out")
    assert src.extras == dst.extras and src.extras
    for k in src.extras:
        assert np.array_equal(src.source.raw(k), dst.source.raw(k))
    assert (tmp_path / "out" / "README.md").read_bytes() == (llama.path / "README.md").read_bytes()


def test_truncate_energy_stores_spectrum_ranks_and_drops_zero_module(llama, tmp_path):
    tau = 0.8
    doc = _truncate(llama.path, tmp_path / "out", "--energy", str(tau))
    want = {n: dense_energy_rank(llama.delta(n), tau) for n in _modules(llama)}
    assert want["model.layers.1.self_attn.v_proj"] == 0 and want["model.layers.0.self_attn.q_proj"] <= 2
    assert len(set(want.values())) > 2  # really per-module
    assert doc["ranks"] == {n: k for n, k in want.items()}
    ad = load_adapter(tmp_path / "out")
    assert {m.name: m.rank for m in ad.modules} == {n: k for n, k in want.items() if k}
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["exclude_modules"] == ["model.layers.1.self_attn.v_proj"]
    assert all(k.startswith("model.") for k in cfg["rank_pattern"])  # full names
    _check_truncation(llama, tmp_path / "out", "llama", want)
    for m in doc["by_type"].values():
        assert m["params_after"] <= m["params_before"]
    assert doc["worst_module"]["relative_error"] == max(x["relative_error"] for x in doc["modules"])


def test_truncate_rslora_patterns(llama_rslora, tmp_path):
    doc = _truncate(llama_rslora.path, tmp_path / "out", "--energy", "0.9")
    want = {n: dense_energy_rank(llama_rslora.delta(n), 0.9) for n in _modules(llama_rslora)}
    assert doc["ranks"] == want
    _check_truncation(llama_rslora, tmp_path / "out", "llama", want)


def test_truncate_gpt2_conv1d_budget(gpt2, tmp_path):
    ad = load_adapter(gpt2.path)
    budget = ad.params // 3
    doc = _truncate(gpt2.path, tmp_path / "out", "--max-params", str(budget))
    ranks = doc["ranks"]
    out = load_adapter(tmp_path / "out")
    assert out.params <= budget
    _check_truncation(gpt2, tmp_path / "out", "gpt2", ranks)
    # at least as much total energy as the best uniform rank of equal-or-smaller size (dense spectra)
    svs = {n: torch.linalg.svdvals(gpt2.delta(n)).numpy() ** 2 for n in _modules(gpt2)}
    kept = sum(svs[n][: ranks[n]].sum() for n in svs)
    for k in range(1, 9):
        size = sum(min(k, m.rank) * (m.shape[0] + m.shape[1]) for m in ad.modules)
        if size <= budget:
            assert kept >= sum(svs[n][: min(k, 8)].sum() for n in svs) * (1 - 1e-9)
    assert len(set(ranks.values())) > 1


def test_truncate_uniform_budget_pads_to_one_rank(gpt2, tmp_path):
    ad = load_adapter(gpt2.path)
    doc = _truncate(gpt2.path, tmp_path / "out", "--max-params", str(ad.params // 2), "--uniform")
    assert len(set(doc["ranks"].values())) == 1
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {} and cfg["r"] == next(iter(doc["ranks"].values()))
    _check_truncation(gpt2, tmp_path / "out", "gpt2", doc["ranks"])


def test_truncate_max_size_fits_file(llama, tmp_path):
    src_size = (llama.path / "adapter_model.safetensors").stat().st_size
    budget = src_size - 2000
    _truncate(llama.path, tmp_path / "out", "--max-size", str(budget))
    assert (tmp_path / "out" / "adapter_model.safetensors").stat().st_size <= budget


def test_truncate_is_byte_deterministic(llama_rslora, tmp_path):
    _truncate(llama_rslora.path, tmp_path / "a", "--rank", "5")
    _truncate(llama_rslora.path, tmp_path / "b", "--rank", "5")
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


@pytest.mark.parametrize("how", [("--factor", "0.5"), ("--factor", "1.25"), ("--alpha", "4")])
def test_rescale_config_llama(llama, tmp_path, how):
    r = run_cli("rescale", llama.path, "-o", tmp_path / "out", "--json", *how)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["schema"] == "lora-inspect/rescale/1"
    f = float(how[1]) if how[0] == "--factor" else 4 / 16
    assert doc["factor"] == pytest.approx(f)
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == pytest.approx(16 * f) and cfg["alpha_pattern"]["v_proj"] == pytest.approx(4 * f)
    merged = load_with_peft(tmp_path / "out", "llama")
    for name in _modules(llama):
        assert rel_close(new_delta(merged, llama, name), f * llama.delta(name), TOL), name


def test_rescale_rslora_and_bake(llama_rslora, gpt2, tmp_path):
    r = run_cli("rescale", llama_rslora.path, "-o", tmp_path / "rs", "--factor", "1.5")
    assert r.exit_code == 0, r.output
    merged = load_with_peft(tmp_path / "rs", "llama", seed=3)
    for name in _modules(llama_rslora):
        assert rel_close(new_delta(merged, llama_rslora, name), 1.5 * llama_rslora.delta(name), TOL)
    r = run_cli("rescale", gpt2.path, "-o", tmp_path / "bk", "--factor", "3", "--bake")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "bk" / "adapter_config.json").read_bytes() == json.dumps(
        json.loads((gpt2.path / "adapter_config.json").read_text()), indent=2, sort_keys=True).encode() + b"\n"
    merged = load_with_peft(tmp_path / "bk", "gpt2", seed=1)
    for name in _modules(gpt2):
        assert rel_close(new_delta(merged, gpt2, name), 3 * gpt2.delta(name), TOL)
    assert "outside the usual" in r.stderr


def test_dora_truncate_copies_magnitudes_and_warns(tmp_path):
    pb = build_peft(tmp_path, seed=5, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"])
    r = run_cli("truncate", pb.path, "-o", tmp_path / "out", "--rank", "2")
    assert r.exit_code == 0, r.output
    assert "DoRA" in r.stderr
    load_with_peft(tmp_path / "out", "llama", seed=5)
    src, dst = load_adapter(pb.path), load_adapter(tmp_path / "out")
    for m in src.modules:
        assert np.array_equal(m.magnitude(), dst.module(m.name).magnitude())
        # the low-rank part is the Eckart–Young truncation of s·B@A
        assert rel_close(dst.module(m.name).delta(), dense_truncation(m.delta(), 2), TOL)
