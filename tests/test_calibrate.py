"""Calibrated truncation: dense float64 oracles for the local and propagated fits and for the dense API
(rewrite.whiten), the paired moments and the held-out KL against independent hooks on PEFT's merged model,
the paired test, and the CLI end to end (the written adapter's held-out KL is never above plain truncation's)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from builders import TINY_TEXT, run_cli, tiny_hf_model, tiny_hf_peft  # noqa: E402

from lora_inspect.formats import load_adapter  # noqa: E402
from lora_inspect.rewrite.calibrate import (  # noqa: E402
    HeldOutKL,
    calibrated_factors,
    module_errors,
    ridge_cholesky,
    significantly_lower,
    whiten,
)
from lora_inspect.rewrite.whiten import (  # noqa: E402
    Moments,
    calibrated_lowrank,
    fit_lowrank,
    output_error,
    whitened_spectrum,
)

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("cal")
    base = tiny_hf_model(d / "base", "llama")
    ad = tiny_hf_peft(base, d / "ad", TARGETS, r=6, seed=3, std=0.5)
    text = d / "text.txt"  # 1,500 seeded words: 12 chunks of 128 tokens, 3 held out
    text.write_text(" ".join(np.random.default_rng(0).choice(sorted(set(TINY_TEXT.split())), 1500)))
    return base, ad, text


def _dense_min(dw: np.ndarray, sigma: np.ndarray, lam: float, k: int) -> np.ndarray:
    """argmin over rank-k M of ‖(ΔW − M)L‖_F, L Lᵀ = Σ + λI: [ΔW L]_k L⁻¹ (Eckart–Young), dense."""
    low = np.linalg.cholesky(sigma + lam * np.eye(sigma.shape[0]))
    u, s, vt = np.linalg.svd(dw @ low)
    return (u[:, :k] * s[:k]) @ vt[:k] @ np.linalg.inv(low)


def _out_err(dw: np.ndarray, m: np.ndarray, x: np.ndarray) -> float:
    return float(np.linalg.norm((dw - m) @ x.T))


@pytest.mark.parametrize("n_rows", [300, 20])  # Σ full rank / rank deficient (n < in)
@pytest.mark.parametrize("k", [1, 3])
def test_factors_are_the_dense_minimiser(llama, n_rows, k):
    _, ad_dir, _ = llama
    ad = load_adapter(ad_dir)
    g = np.random.default_rng(n_rows + k)
    for m in ad.modules:
        n_in = m.shape[1]
        x = g.standard_normal((n_rows, n_in)) @ g.standard_normal((n_in, n_in))  # correlated inputs
        sigma = x.T @ x / n_rows
        c = whiten(m, sigma, ridge=1e-3)
        b1, a1 = calibrated_factors(c, k)
        _, lam = ridge_cholesky(sigma, 1e-3)
        dw = m.delta()
        want = _dense_min(dw, sigma, lam, k)
        got = b1 @ a1
        assert np.linalg.matrix_rank(got, tol=1e-9 * np.abs(got).max()) <= k
        assert np.abs(got - want).max() <= 1e-8 * np.abs(want).max(), m.name
        # the dense API gives the same minimiser, and reported errors are the dense values
        fit = fit_lowrank(dw, Moments(sigma), k, 1e-3)
        assert np.abs(fit.b @ fit.a - want).max() <= 1e-7 * np.abs(want).max(), m.name
        o, w, p = module_errors(c, k)
        low = np.linalg.cholesky(sigma + lam * np.eye(n_in))
        assert abs(o - np.linalg.norm((dw - want) @ low) / np.linalg.norm(dw @ low)) < 1e-9
        assert abs(w - np.linalg.norm(dw - want) / np.linalg.norm(dw)) < 1e-9
        u, s, vt = np.linalg.svd(dw)
        plain = (u[:, :k] * s[:k]) @ vt[:k]
        assert abs(p - np.linalg.norm((dw - plain) @ low) / np.linalg.norm(dw @ low)) < 1e-9
        assert o <= p + 1e-12


def test_output_error_not_above_plain_on_the_data(llama):
    _, ad_dir, _ = llama
    ad = load_adapter(ad_dir)
    g = np.random.default_rng(7)
    worse = better = 0
    for m in ad.modules:
        n_in = m.shape[1]
        x = g.standard_normal((400, n_in)) * np.linspace(0.05, 3.0, n_in)  # anisotropic inputs
        sigma = x.T @ x / 400
        for k in (1, 2, 4):
            b1, a1 = calibrated_factors(whiten(m, sigma, 1e-9), k)
            dw = m.delta()
            u, s, vt = np.linalg.svd(dw)
            cal, plain = _out_err(dw, b1 @ a1, x), _out_err(dw, (u[:, :k] * s[:k]) @ vt[:k], x)
            assert cal <= plain * (1 + 1e-7)
            better += cal < 0.99 * plain
            worse += cal > plain
    assert better > 0 and worse == 0


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])  # the Gram of the left / right side
def test_dense_api_against_dense_svd(shape):
    g = np.random.default_rng(shape[0])
    out, n_in = shape
    dw = g.standard_normal((out, 6)) @ g.standard_normal((6, n_in)) + 0.05 * g.standard_normal(shape)
    x = g.standard_normal((500, n_in)) * np.geomspace(0.02, 4.0, n_in)
    sigma, ridge = x.T @ x / 500, 1e-2
    lam = ridge * np.trace(sigma) / n_in
    low = np.linalg.cholesky(sigma + lam * np.eye(n_in))
    sv = np.linalg.svd(dw @ low, compute_uv=False)
    assert np.allclose(whitened_spectrum(dw, sigma, ridge)[: len(sv)], sv, rtol=1e-9, atol=1e-9 * sv[0])
    res = calibrated_lowrank(dw, sigma, None, 3, ridge)
    want = _dense_min(dw, sigma, lam, 3)
    assert res.choice == "calibrated" and res.b.shape == (out, 3) and res.a.shape == (3, n_in)
    assert np.abs(res.b @ res.a - want).max() <= 1e-8 * np.abs(want).max()
    for j in range(len(sv) + 1):  # the forecast is the true (ridge) output error of the rank-j minimiser
        m = _dense_min(dw, sigma, lam, j)
        true = np.linalg.norm((dw - m) @ low) / np.linalg.norm(dw @ low)
        assert abs(res.forecast[j] - true) < 1e-7, j


def test_dense_api_keeps_plain_when_the_held_out_inputs_differ():
    g = np.random.default_rng(5)
    dw = g.standard_normal((20, 30))
    scales = np.geomspace(0.01, 10.0, 30)
    x_cal = g.standard_normal((400, 30)) * scales
    x_held = g.standard_normal((400, 30)) * scales[::-1]  # the directions the fit neglected now dominate
    s_cal, s_held = x_cal.T @ x_cal / 400, x_held.T @ x_held / 400
    u, s, vt = np.linalg.svd(dw)
    plain = (u[:, :4] * s[:4]) @ vt[:4]
    res = calibrated_lowrank(dw, s_cal, s_held, 4)
    assert res.choice == "plain" and "plain" in res.reason
    assert np.abs(res.b @ res.a - plain).max() <= 1e-9 * np.abs(plain).max()
    assert abs(res.held_out_error_plain - _out_err(dw, plain, x_held) / np.linalg.norm(dw @ x_held.T)) < 1e-9
    same = calibrated_lowrank(dw, s_cal, s_cal, 4)  # held-out inputs like the fit's: calibrated wins
    assert same.choice == "calibrated" and same.held_out_error_calibrated < same.held_out_error_plain


def test_propagated_fit_against_augmented_least_squares():
    """min_M ‖Y − M X̂‖²/n + λ‖M − ΔW‖² with Y = (W + ΔW)X − W X̂, solved as one least-squares problem on
    the stacked data [X̂/√n, √λ I] by QR (no moments, no Cholesky); and the reported errors from samples."""
    g = np.random.default_rng(11)
    out, n_in, n = 12, 16, 300
    w = g.standard_normal((out, n_in))
    dw = 0.3 * g.standard_normal((out, 5)) @ g.standard_normal((5, n_in))
    x = g.standard_normal((n, n_in)) * np.geomspace(0.1, 3.0, n_in)
    xh = x + 0.2 * g.standard_normal((n, n_in)) @ g.standard_normal((n_in, n_in)) / 4  # perturbed upstream
    delta = x - xh
    mom = Moments(x.T @ x / n, x.T @ delta / n, delta.T @ delta / n)
    ridge, k = 1e-2, 3
    lam = ridge * np.trace(xh.T @ xh / n) / n_in
    fit = fit_lowrank(dw, mom, k, ridge, w)
    y = (w + dw) @ x.T - w @ xh.T
    stacked = np.concatenate([xh.T / np.sqrt(n), np.sqrt(lam) * np.eye(n_in)], 1)  # in × (n + in)
    target = np.concatenate([y / np.sqrt(n), np.sqrt(lam) * dw], 1)
    q, r = np.linalg.qr(stacked.T)  # stacked = Rᵀ Qᵀ
    u, s, vt = np.linalg.svd(target @ q)
    want = np.linalg.solve(r, ((u[:, :k] * s[:k]) @ vt[:k]).T).T  # [HQ]_k R⁻ᵀ
    assert np.abs(fit.b @ fit.a - want).max() <= 1e-8 * np.abs(want).max()
    e = output_error(dw, fit.b, fit.a, mom, w)
    assert abs(e - np.linalg.norm(y - fit.b @ fit.a @ xh.T) / np.linalg.norm(y)) < 1e-9
    assert abs(output_error(dw, fit.b[:, :0], fit.a[:0], mom, w) - 1.0) < 1e-12


def test_paired_test():
    tokens = np.array([32.0, 32.0, 32.0, 12.0])
    old = np.array([1.0, 2.0, 1.5, 0.4])
    better = HeldOutKL(np.stack([old, old - 0.01 * tokens]), tokens)  # 0.01 nats less per token everywhere
    v = significantly_lower(better, 1, 0)
    assert v.lower and v.z_score < -1e6 and v.blocks == 4  # no spread but rounding
    assert not significantly_lower(better, 0, 1).lower
    noisy = HeldOutKL(np.stack([old, old + np.array([-0.3, 0.2, -0.25, 0.05])]), tokens)
    d = noisy.sums[1] - noisy.sums[0]
    mean = d.sum() / tokens.sum()
    se = np.sqrt(np.sum((d - mean * tokens) ** 2) * 4 / 3) / tokens.sum()
    v = significantly_lower(noisy, 1, 0)
    assert abs(v.z_score - mean / se) < 1e-12 and not v.lower  # mean < 0 but within the noise
    assert significantly_lower(noisy, 1, 0, z=abs(mean / se) * 0.9).lower
    assert not significantly_lower(HeldOutKL(np.stack([old[:1], old[:1] * 0.1]), tokens[:1]), 1, 0).lower
    assert abs(better.mean(1) - (old.sum() / tokens.sum() - 0.01)) < 1e-15


def _hooked_inputs(model, paths, ids) -> dict[str, np.ndarray]:
    rows: dict[str, np.ndarray] = {}
    mods = dict(model.named_modules())
    hooks = [mods[p].register_forward_pre_hook(lambda m, a, p=p: rows.__setitem__(p, a[0].reshape(-1, a[0].shape[-1])
                                                                                  .double().numpy()))
             for p in paths]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    for h in hooks:
        h.remove()
    rows["logits"] = torch.log_softmax(logits.double(), -1).numpy()
    return rows


def _peft_model(base: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    return PeftModel.from_pretrained(m, str(adapter)).merge_and_unload().eval()


def test_model_calibration_against_peft_hooks(llama, tmp_path):
    """Stages, paired moments and the held-out KL of hf.collect.ModelCalibration against hooks on two
    PEFT-merged models (the adapter, and a plain rank-1 truncation of it written by ``truncate``)."""
    from transformers import AutoModelForCausalLM

    from lora_inspect.hf.apply import bind_adapter
    from lora_inspect.hf.collect import ModelCalibration, hf_feed
    from lora_inspect.hf.model import load_hf

    base, ad_dir, _ = llama
    assert run_cli("truncate", str(ad_dir), "-o", str(tmp_path / "r1"), "--rank", "1").exit_code == 0
    ad, r1 = load_adapter(ad_dir), load_adapter(tmp_path / "r1")
    hf = load_hf(base, "cpu")
    bound = bind_adapter(ad_dir, hf.model, ad)
    ids = list(np.random.default_rng(1).integers(2, 60, 100))
    feed = hf_feed([ids[:60], ids[60:]], 8, hf.device)  # one batch, padded: the mask matters
    data = ModelCalibration(hf.model, bound, feed, feed)
    stages = data.stages()
    short = [[n.split(".")[-1] + n.split("layers.")[1][0] for n in g] for g in stages]
    assert short == [["q_proj0", "v_proj0"], ["down_proj0"], ["q_proj1", "v_proj1"], ["down_proj1"]]
    full = {m.name: (r1.module(m.name).factors()[0] * r1.module(m.name).scale, r1.module(m.name).factors()[1])
            for m in ad.modules}  # upstream truncated to rank 1 (a module's own factors never reach its input)
    names = stages[2] + stages[3]
    got = {**data.paired(stages[2], full), **data.paired(stages[3], full)}
    ref, cur = _peft_model(base, ad_dir), _peft_model(base, tmp_path / "r1")
    paths = [n.removeprefix("base_model.model.") for n in names]
    xs = [_hooked_inputs(ref, paths, ids[:60]), _hooked_inputs(ref, paths, ids[60:])]
    xhs = [_hooked_inputs(cur, paths, ids[:60]), _hooked_inputs(cur, paths, ids[60:])]
    for n, p in zip(names, paths):
        x = np.concatenate([a[p] for a in xs])
        xh = np.concatenate([a[p] for a in xhs])
        d = x - xh
        assert np.abs(d).max() > 1e-3  # layer 0's truncation reaches layer 1
        for want, have in ((x.T @ x / 100, got[n].s), (x.T @ d / 100, got[n].p), (d.T @ d / 100, got[n].d)):
            assert np.abs(have - want).max() <= 1e-5 * np.abs(x.T @ x / 100).max(), n
    # held-out KL of the rank-1 truncation and of the base: per token over the real tokens
    kl = data.held_out_kl([full, {}])  # {}: no module applied, the base model
    plain_base = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    for i, other in enumerate((cur, plain_base)):
        want = 0.0
        for part in (ids[:60], ids[60:]):
            lp, lq = _hooked_inputs(ref, [], part)["logits"], _hooked_inputs(other, [], part)["logits"]
            want += float((np.exp(lp) * (lp - lq)).sum())
        assert abs(kl.mean(i) - want / 100) <= 1e-4 * want / 100, i
    assert kl.tokens.tolist() == [32, 28, 32, 8]  # blocks of 32 real tokens: 60 → 32 + 28, 40 → 32 + 8


def test_gpt2_conv1d_orientation(tmp_path):
    """GPT-2's Conv1D stores (in, out): the base weight handed to the fit is the linear map's W (y = x Wᵀ + b),
    the stages follow the calls, and the CLI runs end to end."""
    from lora_inspect.hf.apply import bind_adapter
    from lora_inspect.hf.collect import ModelCalibration, hf_feed
    from lora_inspect.hf.model import load_hf

    base = tiny_hf_model(tmp_path / "gpt2", "gpt2")
    ad_dir = tiny_hf_peft(base, tmp_path / "ad", ["c_attn", "c_fc"], r=4, seed=2, std=0.3)
    hf = load_hf(base, "cpu")
    feed = hf_feed([list(range(2, 40))], 1, hf.device)
    data = ModelCalibration(hf.model, bind_adapter(ad_dir, hf.model), feed, feed)
    assert [[n.split(".")[-1] for n in g] for g in data.stages()] == [["c_attn"], ["c_fc"]] * 2
    mods = dict(hf.model.named_modules())
    x = torch.randn(5, 32, dtype=torch.float64)
    for name in data.path:
        mod = mods[data.path[name]]
        want = (mod(x.float()) - mod.bias).double().numpy()
        assert np.abs(x.numpy() @ data.base_weight(name).T - want).max() <= 1e-5, name
    text = tmp_path / "t.txt"
    text.write_text(" ".join(np.random.default_rng(2).choice(sorted(set(TINY_TEXT.split())), 600)))
    r = run_cli("truncate", str(ad_dir), "-o", str(tmp_path / "out"), "--rank", "1", "--calibrate", str(text),
                "--base", str(base), "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    cal = json.loads(r.stdout)["calibration"]
    assert cal["held_out_kl"]["calibrated"] < cal["held_out_kl"]["plain"] and cal["chosen"] == "calibrated"


def _written_kl(base: Path, ad_dir: Path, other: Path, chunks: list[list[int]]) -> float:
    ref, cur = _peft_model(base, ad_dir), _peft_model(base, other)
    tot = n = 0.0
    for c in chunks:
        lp, lq = _hooked_inputs(ref, [], c)["logits"], _hooked_inputs(cur, [], c)["logits"]
        tot += float((np.exp(lp) * (lp - lq)).sum())
        n += len(c)
    return tot / n


@pytest.mark.parametrize("k", [1, 2])  # k = 1 writes the calibrated factors, k = 2 plain's (within the noise)
def test_cli_never_worse_than_plain_on_the_held_out_part(llama, tmp_path, k):
    from transformers import AutoTokenizer

    from lora_inspect.hf.collect import split_chunks

    base, ad_dir, text = llama
    out, plain = tmp_path / "cal", tmp_path / "plain"
    r = run_cli("truncate", str(ad_dir), "-o", str(out), "--rank", str(k), "--calibrate", str(text), "--base",
                str(base), "--device", "cpu", "--batch-size", "3", "--json")
    assert r.exit_code == 0, r.output
    assert run_cli("truncate", str(ad_dir), "-o", str(plain), "--rank", str(k)).exit_code == 0
    cal = json.loads(r.stdout)["calibration"]
    ids = AutoTokenizer.from_pretrained(str(base))(text.read_text(), add_special_tokens=False)["input_ids"]
    chunks = [ids[i : i + 128] for i in range(0, len(ids), 128)]
    fit, held = split_chunks(chunks, "text")
    assert cal["tokens"] == sum(map(len, fit)) and cal["held_out_tokens"] == sum(map(len, held)) == 348
    kl_plain, kl_written = _written_kl(base, ad_dir, plain, held), _written_kl(base, ad_dir, out, held)
    assert abs(cal["held_out_kl"]["plain"] - kl_plain) <= 1e-4 * kl_plain
    assert cal["chosen"] == ("calibrated" if k == 1 else "plain")
    if cal["chosen"] == "plain":
        assert cal["z_score"] > -3
        src, new, pl = load_adapter(ad_dir), load_adapter(out), load_adapter(plain)
        for m in src.modules:
            assert np.abs(new.module(m.name).delta() - pl.module(m.name).delta()).max() <= 1e-6
    else:
        assert cal["z_score"] < -3 and kl_written < kl_plain
        assert abs(cal["held_out_kl"]["calibrated"] - kl_written) <= 1e-4 * kl_written
    assert kl_written <= kl_plain * (1 + 1e-6)
    rows = json.loads(r.stdout)["modules"]
    assert all(x["weight_error"] > 0 and x["output_error"] <= 1.0 for x in rows)


def test_cli_budget_that_drops_modules(llama, tmp_path):
    """A budget that drops modules (rank 0): they are absent upstream in the fit and in both candidates."""
    base, ad_dir, text = llama
    r = run_cli("truncate", str(ad_dir), "-o", str(tmp_path / "out"), "--max-params", "300", "--calibrate",
                str(text), "--base", str(base), "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert 0 in doc["ranks"].values() and any(k > 0 for k in doc["ranks"].values())
    kl = doc["calibration"]["held_out_kl"]
    assert kl[doc["calibration"]["chosen"]] <= kl["plain"]
    written = load_adapter(tmp_path / "out")
    assert {m.name for m in written.modules} == {n for n, k in doc["ranks"].items() if k > 0}


def test_split_chunks():
    from lora_inspect.errors import InspectError
    from lora_inspect.hf.collect import split_chunks

    chunks = [[i, i] for i in range(9)]
    fit, held = split_chunks(chunks, "t")
    assert held == [[3, 3], [7, 7]] and len(fit) == 7 and [3, 3] not in fit
    assert split_chunks(chunks[:3], "t") == (chunks[:2], chunks[2:3])
    assert split_chunks([list(range(10))], "t") == ([list(range(7))], [[7, 8, 9]])
    with pytest.raises(InspectError, match="too few"):
        split_chunks([[1, 2, 3]], "t")


def test_cli_errors(llama, tmp_path):
    base, ad_dir, text = llama
    r = run_cli("truncate", str(ad_dir), "-o", str(tmp_path / "x"), "--rank", "2", "--calibrate", str(text))
    assert r.exit_code == 2 and "--base" in r.output
    r = run_cli("truncate", str(ad_dir), "-o", str(tmp_path / "x"), "--rank", "2", "--base", str(base))
    assert r.exit_code == 2 and "--calibrate" in r.output
    other = tiny_hf_model(tmp_path / "gpt2", "gpt2")
    r = run_cli("truncate", str(ad_dir), "-o", str(tmp_path / "x"), "--rank", "2", "--calibrate", str(text),
                "--base", str(other), "--device", "cpu")
    assert r.exit_code == 2 and "not a linear layer" in r.output and "Traceback" not in r.output
    short = tmp_path / "short.txt"
    short.write_text("the fox")
    r = run_cli("truncate", str(ad_dir), "-o", str(tmp_path / "x"), "--rank", "2", "--calibrate", str(short),
                "--base", str(base), "--device", "cpu")
    assert r.exit_code == 2 and "too few to hold a part out" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()


def test_moment_memory_limit_is_one_line(llama):
    from lora_inspect.errors import InspectError
    from lora_inspect.hf.apply import bind_adapter
    from lora_inspect.hf.collect import collect_moments
    from lora_inspect.hf.model import load_hf

    base, ad_dir, _ = llama
    hf = load_hf(base, "cpu", tokenizer=False)
    b = bind_adapter(ad_dir, hf.model)
    layers = {p: dict(hf.model.named_modules())[p] for p in b.factors}
    with pytest.raises(InspectError, match="GiB of input moments"):
        collect_moments(hf.model, layers, lambda m: iter(()), max_bytes=1000)
