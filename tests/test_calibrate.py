"""Calibrated truncation: dense float64 oracles for the factors, the output error against plain
truncation, the moments against an independent hook on PEFT's merged model, and the CLI end to end."""

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
from lora_inspect.rewrite.calibrate import calibrated_factors, module_errors, ridge_cholesky, whiten  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("cal")
    base = tiny_hf_model(d / "base", "llama")
    ad = tiny_hf_peft(base, d / "ad", ["q_proj", "v_proj", "down_proj"], r=6, seed=3, std=0.5)
    text = d / "text.txt"
    text.write_text(TINY_TEXT)
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
        sigma = torch.from_numpy(x.T @ x / n_rows)
        c = whiten(m, sigma, ridge=1e-3)
        b1, a1 = calibrated_factors(c, k)
        _, lam = ridge_cholesky(sigma, 1e-3)
        dw = m.delta()
        want = _dense_min(dw, sigma.numpy(), lam, k)
        got = b1 @ a1
        assert np.linalg.matrix_rank(got, tol=1e-9 * np.abs(got).max()) <= k
        assert np.abs(got - want).max() <= 1e-8 * np.abs(want).max(), m.name
        # reported errors: the dense values
        o, w, p = module_errors(c, k)
        low = np.linalg.cholesky(sigma.numpy() + lam * np.eye(n_in))
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
    ridge = 1e-9
    worse = better = 0
    for m in ad.modules:
        n_in = m.shape[1]
        x = g.standard_normal((400, n_in)) * np.linspace(0.05, 3.0, n_in)  # anisotropic inputs
        sigma = torch.from_numpy(x.T @ x / 400)
        for k in (1, 2, 4):
            b1, a1 = calibrated_factors(whiten(m, sigma, ridge), k)
            dw = m.delta()
            u, s, vt = np.linalg.svd(dw)
            cal, plain = _out_err(dw, b1 @ a1, x), _out_err(dw, (u[:, :k] * s[:k]) @ vt[:k], x)
            assert cal <= plain * (1 + 1e-7)
            better += cal < 0.99 * plain
            worse += cal > plain
    assert better > 0 and worse == 0


def _peft_moments(base: Path, ad: Path, text: Path) -> dict[str, np.ndarray]:
    """Σ = XᵀX/n of each adapted layer's input, by a hook on PEFT's merged model (one chunk)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                      str(ad)).merge_and_unload().eval()
    ids = AutoTokenizer.from_pretrained(str(base))(text.read_text(), add_special_tokens=False)["input_ids"]
    rows: dict[str, list] = {}
    names = {n for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj", "down_proj"))}
    hooks = [mod.register_forward_hook(lambda mod, a, o, n=n: rows.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for n, mod in model.named_modules() if n in names]
    with torch.no_grad():
        for i in range(0, len(ids), 128):
            model(torch.tensor([ids[i : i + 128]]))
    for h in hooks:
        h.remove()
    out = {}
    for n, r in rows.items():
        x = torch.cat(r).double().numpy()
        out[n] = x.T @ x / len(x)
    return out


def test_cli_end_to_end_matches_oracles(llama, tmp_path):
    base, ad_dir, text = llama
    out = tmp_path / "cal"
    r = run_cli("truncate", str(ad_dir), "-o", str(out), "--rank", "2", "--calibrate", str(text), "--base", str(base),
                "--device", "cpu", "--batch-size", "3", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["calibration"]["tokens"] == len(TINY_TEXT.split()) and doc["calibration"]["ridge"] == 1e-2
    sig = _peft_moments(base, ad_dir, text)
    src, new = load_adapter(ad_dir), load_adapter(out)
    rows = {x["name"]: x for x in doc["modules"]}
    for m in src.modules:
        s = sig[m.name.removeprefix("base_model.model.")]
        _, lam = ridge_cholesky(torch.from_numpy(s), 1e-2)
        want = _dense_min(m.delta(), s, lam, 2)
        got = new.module(m.name).delta()
        assert np.abs(got - want).max() <= 2e-5 * np.abs(want).max(), m.name  # float32 storage
        row = rows[m.name]
        assert row["output_error"] <= row["output_error_plain"] + 1e-9 and row["weight_error"] > 0
    plain = tmp_path / "plain"
    assert run_cli("truncate", str(ad_dir), "-o", str(plain), "--rank", "2").exit_code == 0


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
