"""Base checkpoints and base-aware metrics (``rank --base``) against dense float64 oracles.

Tiny transformers models are saved with ``save_pretrained`` (sharded, with an index), adapted with real
PEFT (``tests/builders.build_peft``), and every metric is recomputed densely here from PEFT's own merged
weights: ρ_F, ρ₂ (dense SVD), the amplification factor (Hu et al. §7.3), the top-k overlap, DoRA's
effective spectrum, and intruder dimensions with the reference algorithm of Shuttleworth et al.
(reeceshuttle/intruder-dimensions: U_dot = |U_tunedᵀ U_base|, max over base vectors, count of the top-k
below ε) reimplemented below.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import build_peft, cli_json, run_cli, tiny_gpt2, tiny_llama

from lora_inspect.analysis import analyse
from lora_inspect.basecheckpoint import open_base_checkpoint
from lora_inspect.basemetrics import INTRUDER_EPS, INTRUDER_K, BasisCache, top_subspace
from lora_inspect.errors import InspectError
from lora_inspect.formats import load_adapter

pytest.importorskip("transformers")
pytest.importorskip("peft")


def _save_base(model, d: Path, shard: str | None = "20KB") -> Path:
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(str(d), safe_serialization=True, **kw)
    return d


def _ref_intruders(w: torch.Tensor, tuned: torch.Tensor, k: int = INTRUDER_K, eps: float = INTRUDER_EPS):
    """Shuttleworth et al. Alg. 1 as their code does it, dense float64."""
    u_base = torch.linalg.svd(w, full_matrices=False)[0]
    u_tuned = torch.linalg.svd(tuned, full_matrices=False)[0]
    u_dot = (u_tuned.T @ u_base).abs()
    c = u_dot.max(dim=1).values
    return int((c[:k] < eps).sum()), c[:k]


def _dense_metrics(w: torch.Tensor, delta: torch.Tensor, r: int) -> dict:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    u, vh, k = u[:, :r], vh[:r], min(r, 16)
    sw = torch.linalg.svdvals(w)
    uw = torch.linalg.svd(w, full_matrices=False)[0][:, :r]
    proj = float(torch.linalg.matrix_norm(u.T @ w @ vh.T))
    return {
        "relative_fro": float(torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(w)),
        "relative_spectral": float(s[0] / sw[0]),
        "w_sigma1": float(sw[0]),
        "projection": proj,
        "amplification": float(torch.linalg.matrix_norm(delta)) / proj,
        "overlap": float(((u[:, :k].T @ uw[:, :k]) ** 2).sum()) / k,  # k = min(r, 16)
    }


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("basellama")
    model = tiny_llama(seed=3)
    base = _save_base(model, tmp / "base")
    built = build_peft(tmp, model=model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                       std=0.3)
    return base, built


def test_sharded_hf_base_matches_dense_oracle(llama):
    base, built = llama
    assert (base / "model.safetensors.index.json").is_file()  # sharded: the index is what we read
    ad = load_adapter(built.path)
    rep = analyse(ad, base=open_base_checkpoint(base), intruders=True)
    assert rep.base is not None and set(rep.base.modules) == {m.name for m in ad.modules}
    for name, got in rep.base.modules.items():
        w = built.base_state[name + ".weight"]
        delta = built.delta(name)
        ref = _dense_metrics(w, delta, 4)
        for k, v in ref.items():
            assert getattr(got, k) == pytest.approx(v, rel=2e-5), (name, k)
        n, c = _ref_intruders(w, w + delta)
        assert got.intruders == n, name
        assert torch.allclose(torch.tensor(got.intruder_similarity, dtype=torch.float64), c, atol=1e-4), name


def test_gpt2_conv1d_is_transposed(tmp_path):
    model = tiny_gpt2(seed=5)
    base = _save_base(model, tmp_path / "base", shard=None)
    built = build_peft(tmp_path, model=model, r=4, lora_alpha=4, target_modules=["c_attn", "c_proj"],
                       fan_in_fan_out=True, std=0.3)
    ad = load_adapter(built.path)
    rep = analyse(ad, base=open_base_checkpoint(base))
    assert rep.base is not None and rep.base.modules
    for name, got in rep.base.modules.items():
        w = built.base_state[name + ".weight"].T  # Conv1D stores (in, out)
        delta = built.delta(name).T
        ref = _dense_metrics(w, delta, 4)
        assert got.relative_spectral == pytest.approx(ref["relative_spectral"], rel=2e-5), name
        assert got.amplification == pytest.approx(ref["amplification"], rel=2e-5), name


def test_dora_effective_spectrum_matches_peft_merge(tmp_path):
    model = tiny_llama(seed=7)
    base = _save_base(model, tmp_path / "base", shard=None)
    built = build_peft(tmp_path, model=model, r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                       use_dora=True, std=0.3)
    rep = analyse(load_adapter(built.path), base=open_base_checkpoint(base), intruders=True)
    assert rep.base is not None and rep.base.modules
    for name, got in rep.base.modules.items():
        w = built.base_state[name + ".weight"]
        eff = built.delta(name)  # PEFT's merged DoRA weight − W: full rank in general
        ref = torch.linalg.svdvals(eff)
        assert got.effective_singular_values is not None
        assert torch.allclose(torch.tensor(got.effective_singular_values, dtype=torch.float64), ref, rtol=1e-4,
                              atol=1e-5 * float(ref[0]))
        assert got.delta_fro == pytest.approx(float(torch.linalg.matrix_norm(eff)), rel=1e-5)
        assert got.intruders == _ref_intruders(w, w + eff)[0]


def test_subspace_iteration_matches_dense_svd():
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(1, -3, 200, dtype=torch.float64)
    w = (u[:, :200] * s) @ v.T
    got_u, got_s = top_subspace(w.float().numpy(), 6)
    assert got_u.dtype == np.float64 and got_s.dtype == np.float64
    assert torch.allclose(torch.from_numpy(got_s), s[:6], rtol=1e-5)
    cos = (torch.from_numpy(got_u).T @ u[:, :6]).abs().diagonal()
    assert bool((cos > 1 - 1e-5).all())


def _torch_top_subspace(w: torch.Tensor, k: int, iters: int, oversample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The subspace iteration as the torch implementation did it (start: torch.randn from a per-shape seed)."""
    out_dim, in_dim = w.shape
    q = k + oversample
    g = torch.Generator().manual_seed(out_dim * 1_000_003 + in_dim)
    y = w @ torch.randn(in_dim, q, generator=g, dtype=torch.float64).to(w.dtype)
    for _ in range(iters):
        y = w @ torch.linalg.qr(w.T @ torch.linalg.qr(y)[0])[0]
    qy = torch.linalg.qr(y)[0]
    ub, s, _ = torch.linalg.svd((qy.T @ w).double(), full_matrices=False)
    return qy.double() @ ub[:, :k], s[:k]


@pytest.mark.parametrize("shape,dtype", [((400, 200), torch.float64), ((70000, 41), torch.float32),
                                         ((257, 333), torch.float32)])
def test_subspace_iteration_starts_where_torch_did(shape, dtype):
    """The seeded start matrix is torch's randn bit for bit (MT19937, torch's 53-bit uniforms and 16-wide
    Box–Muller; a seed past 32 bits), so even a slowly converging iteration — a flat spectrum, one step,
    where the start still shows in the result — gives the numbers the torch implementation gave."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    got_u, got_s = top_subspace(w.numpy(), 5, iters=1)
    ref_u, ref_s = _torch_top_subspace(w, 5, 1, 8)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    np.testing.assert_allclose(got_s, ref_s.numpy(), rtol=tol)
    np.testing.assert_allclose(np.abs(got_u.T @ ref_u.numpy()).diagonal(), 1.0, atol=tol)


def test_cli_json_is_additive_and_cache_round_trips(llama, tmp_path):
    base, built = llama
    plain = cli_json("rank", str(built.path))
    assert "base" not in plain and all("base" not in m for m in plain["modules"])
    cache = tmp_path / "cache"
    doc = cli_json("rank", str(built.path), "--base", str(base), "--intruders", "--basis-cache", str(cache))
    assert doc["base"]["thresholds"] == {"large_update_spectral": 0.5, "intruder_k": 10, "intruder_epsilon": 0.5}
    assert all(m["base"]["relative_fro"] > 0 for m in doc["modules"])
    assert len(list(cache.glob("*.safetensors"))) == len(doc["modules"])
    again = cli_json("rank", str(built.path), "--base", str(base), "--intruders", "--basis-cache", str(cache))
    assert again == doc
    c = BasisCache(cache)
    ck = open_base_checkpoint(base)
    bt = ck.check(load_adapter(built.path))[0]
    c.get(bt.cache_key, lambda: pytest.fail("the disk cache should have answered"))
    assert c.hits == 1


def test_planted_sample_base(tmp_path):
    root = Path(__file__).resolve().parents[1] / "samples" / "planted"
    doc = cli_json("rank", str(root), "--base", str(root / "base"))
    assert doc["base"]["intruders_computed"] is False
    assert {m["base"]["key"] for m in doc["modules"]} == {m["name"] + ".weight" for m in doc["modules"]}


def _one_line(res, *words: str) -> None:
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr)
    err = res.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err


def test_refusals_are_one_line(llama, tmp_path):
    base, built = llama
    q = tmp_path / "quant"
    q.mkdir()
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (q / "config.json").write_text(json.dumps(cfg))
    _one_line(run_cli("rank", str(built.path), "--base", str(q)), "quantised", "bitsandbytes")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF\0\0\0\0")
    _one_line(run_cli("rank", str(built.path), "--base", str(gguf)), "GGUF")
    binned = tmp_path / "bin"
    binned.mkdir()
    torch.save({"x": torch.zeros(1)}, binned / "pytorch_model.bin")
    _one_line(run_cli("rank", str(built.path), "--base", str(binned)), "pytorch_model.bin", "safetensors")
    other = _save_base(tiny_llama(seed=1, hidden=48), tmp_path / "other", shard=None)
    _one_line(run_cli("rank", str(built.path), "--base", str(other)), "model.embed_tokens", "shape")
    gpt = _save_base(tiny_gpt2(seed=1), tmp_path / "gpt", shard=None)
    _one_line(run_cli("rank", str(built.path), "--base", str(gpt)), "model.embed_tokens", "no weight")
    _one_line(run_cli("rank", str(built.path), "--intruders"), "--base")


def test_int8_weight_refused(tmp_path, llama):
    from safetensors.torch import save_file

    _, built = llama
    ad = load_adapter(built.path)
    m = ad.modules[0]
    save_file({m.name + ".weight": torch.zeros(m.shape, dtype=torch.int8)}, str(tmp_path / "q.safetensors"))
    with pytest.raises(InspectError, match="quantised"):
        open_base_checkpoint(tmp_path / "q.safetensors").check(ad, [m])


def test_randomized_intruders_match_reference_on_planted(monkeypatch):
    """The subspace-iteration path (forced on these small matrices) against the dense reference."""
    import lora_inspect.basemetrics as bm

    monkeypatch.setattr(bm, "DENSE", 0)
    root = Path(__file__).resolve().parents[1] / "samples" / "planted"
    ad = load_adapter(root)
    ck = open_base_checkpoint(root / "base")
    rep = analyse(ad, base=ck, intruders=True)
    assert rep.base is not None
    for m in ad.modules:
        w = torch.from_numpy(ck.weight(ck.locate(m), np.float64))
        n, c = _ref_intruders(w, w + torch.from_numpy(m.delta()))
        got = rep.base.modules[m.name]
        assert got.intruders == n, m.name
        assert torch.allclose(torch.tensor(got.intruder_similarity, dtype=torch.float64), c, atol=5e-3), m.name
        ref_s1 = float(torch.linalg.svdvals(w)[0])
        assert got.w_sigma1 == pytest.approx(ref_s1, rel=1e-6), m.name


def _tiny_unet(d: Path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(11)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=2, norm_num_groups=4,
    )
    (d / "unet").mkdir(parents=True)
    unet.save_pretrained(str(d / "unet"))
    (d / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    return {k: v.detach().double() for k, v in unet.state_dict().items()}


def test_kohya_names_on_a_diffusers_unet(tmp_path):
    """kohya names map to diffusers UNet keys (sd-scripts: prefix + key with '_'), a conv flattened."""
    from builders import kohya_delta, write_kohya

    state = _tiny_unet(tmp_path / "pipe")
    g = torch.Generator().manual_seed(0)
    keys = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            "lora_unet_conv_in": "conv_in.weight"}
    mods = {}
    for name, key in keys.items():
        w = state[key]
        r = 3
        down = torch.randn((r, *w.shape[1:]), generator=g) * 0.3
        up = torch.randn((w.shape[0], r) + (1,) * (w.dim() - 2), generator=g) * 0.3
        mods[name] = (down, up, 2.0)
    write_kohya(tmp_path / "k.safetensors", mods)
    rep = analyse(load_adapter(tmp_path / "k.safetensors"), base=open_base_checkpoint(tmp_path / "pipe"))
    assert rep.base is not None and set(rep.base.modules) == set(keys)
    for name, key in keys.items():
        w = state[key].reshape(state[key].shape[0], -1)
        delta = kohya_delta(*mods[name])
        ref = _dense_metrics(w, delta, 3)
        got = rep.base.modules[name]
        assert got.base_key == "unet." + key
        for k in ("relative_fro", "relative_spectral", "amplification"):
            assert getattr(got, k) == pytest.approx(ref[k], rel=1e-5), (name, k)


def test_report_base_section(llama, tmp_path):
    pytest.importorskip("matplotlib")
    base, built = llama
    res = run_cli("report", str(built.path), "--base", str(base), "-o", str(tmp_path / "r.md"))
    assert res.exit_code == 0, res.stderr
    page = (tmp_path / "r.md").read_text()
    assert "## Against the base model" in page and "model.layers.0.self_attn.q_proj" in page
    res = run_cli("report", str(built.path), "-o", str(tmp_path / "plain.html"))
    assert res.exit_code == 0 and "Against the base model" not in (tmp_path / "plain.html").read_text()
