"""truncate / rescale on kohya and mlx-lm files, refusals, atomicity, determinism and the maths pieces."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from builders import kohya_delta, rel_close, run_cli, write_kohya, write_mlx
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lora_inspect.formats import load_adapter
from lora_inspect.rewrite import greedy_budget_ranks
from lora_inspect.spectrum import decompose, truncate_factors

TOL = 1e-5
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
LIN = "lora_unet_mid_block_attentions_0_proj_in"


def dense_truncation(delta: torch.Tensor | np.ndarray, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(torch.as_tensor(delta).to(torch.float64), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


@pytest.fixture()
def kohya(tmp_path):
    g = torch.Generator().manual_seed(7)
    mods = {
        CONV: (torch.randn(6, 5, 3, 3, generator=g), torch.randn(9, 6, 1, 1, generator=g), 3.0),
        LIN: (torch.randn(6, 20, generator=g), torch.randn(12, 6, generator=g), None),  # no alpha: α = r
    }
    path = write_kohya(tmp_path / "lora.safetensors", mods, metadata={"ss_network_dim": "6", "ss_network_alpha": "3"})
    return path, mods


def _stored(path):
    sd = load_file(str(path))
    out = {}
    for name in (CONV, LIN):
        a = sd.get(f"{name}.alpha")
        out[name] = kohya_delta(sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"],
                                None if a is None else float(a))
    return sd, out


def test_kohya_truncate_conv_round_trip(kohya, tmp_path):
    path, mods = kohya
    out = tmp_path / "small.safetensors"
    r = run_cli("truncate", path, "-o", out, "--rank", "2", "--json")
    assert r.exit_code == 0, r.output
    sd, deltas = _stored(out)
    assert sd[f"{CONV}.lora_down.weight"].shape == (2, 5, 3, 3)
    assert sd[f"{CONV}.lora_up.weight"].shape == (9, 2, 1, 1)
    assert float(sd[f"{CONV}.alpha"]) == 2.0  # α = k: scale baked in
    for name, (down, up, alpha) in mods.items():
        assert rel_close(deltas[name], dense_truncation(kohya_delta(down, up, alpha), 2), TOL), name
    assert load_adapter(out).metadata == load_adapter(path).metadata
    assert load_adapter(out).format == "kohya"


def test_kohya_rescale_alpha_tensors(kohya, tmp_path):
    path, mods = kohya
    out = tmp_path / "strong.safetensors"
    r = run_cli("rescale", path, "-o", out, "--factor", "2.5")
    assert r.exit_code == 0, r.output
    sd, deltas = _stored(out)
    assert float(sd[f"{CONV}.alpha"]) == pytest.approx(7.5)
    assert float(sd[f"{LIN}.alpha"]) == pytest.approx(15.0)  # implied α = r, stored explicitly and scaled
    for name, (down, up, alpha) in mods.items():
        assert rel_close(deltas[name], 2.5 * kohya_delta(down, up, alpha), TOL), name
        assert torch.equal(sd[f"{name}.lora_up.weight"], up)  # factors untouched


def test_kohya_rescale_bake(kohya, tmp_path):
    path, mods = kohya
    out = tmp_path / "baked.safetensors"
    assert run_cli("rescale", path, "-o", out, "--factor", "0.5", "--bake").exit_code == 0
    sd, deltas = _stored(out)
    assert float(sd[f"{CONV}.alpha"]) == 3.0
    for name, (down, up, alpha) in mods.items():
        assert rel_close(deltas[name], 0.5 * kohya_delta(down, up, alpha), TOL)


def test_mlx_truncate_energy_is_uniform(tmp_path):
    g = torch.Generator().manual_seed(11)
    mods = {f"model.layers.{i}.self_attn.q_proj": (torch.randn(16, 8, generator=g) * (torch.arange(8) < 3 + i),
                                                  torch.randn(8, 24, generator=g)) for i in range(2)}
    src = write_mlx(tmp_path / "mlx", mods, scale=4.0)
    r = run_cli("truncate", src, "-o", tmp_path / "out", "--energy", "0.99", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    ranks = set(doc["ranks"].values())
    assert len(ranks) == 1
    k = ranks.pop()
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["lora_parameters"]["rank"] == k and cfg["lora_parameters"]["scale"] == 1.0
    out = load_adapter(tmp_path / "out")
    for name, (b, a) in mods.items():
        keep = doc["modules"][[m["name"] for m in doc["modules"]].index(name)]["rank_after"]
        assert rel_close(out.module(name).delta(), dense_truncation(4.0 * b.double() @ a.double(), keep), TOL)
    r = run_cli("rescale", src, "-o", tmp_path / "half", "--factor", "0.5")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "half" / "adapter_config.json").read_text())["lora_parameters"]["scale"] == 2.0


def _one_line_error(r):
    assert r.exit_code == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lora-inspect: error:"), r.stderr
    assert "Traceback" not in r.output


def test_refusals(kohya, tmp_path):
    path, _ = kohya
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep me")
    _one_line_error(run_cli("truncate", path, "-o", out, "--rank", "2"))
    assert out.read_bytes() == b"keep me"
    assert run_cli("truncate", path, "-o", out, "--rank", "2", "--force").exit_code == 0
    assert load_adapter(out).modules[0].rank == 2
    _one_line_error(run_cli("truncate", path, "-o", path, "--rank", "2"))
    _one_line_error(run_cli("rescale", path, "-o", path, "--factor", "2", "--force"))
    _one_line_error(run_cli("rescale", path, "-o", tmp_path, "--factor", "2", "--force"))  # contains the input
    _one_line_error(run_cli("truncate", path, "-o", tmp_path / "x.safetensors"))  # no mode
    _one_line_error(run_cli("truncate", path, "-o", tmp_path / "x.safetensors", "--rank", "2", "--energy", "0.9"))
    _one_line_error(run_cli("rescale", path, "-o", tmp_path / "x.safetensors", "--factor", "0"))
    _one_line_error(run_cli("rescale", path, "-o", tmp_path / "x.safetensors", "--factor", "2", "--alpha", "1"))
    assert not (tmp_path / "x.safetensors").exists()


def test_peft_dir_output_inside_input_refused(tmp_path):
    from builders import write_mlx as _w  # any directory adapter works

    g = torch.Generator().manual_seed(1)
    src = _w(tmp_path / "m", {"model.layers.0.self_attn.q_proj": (torch.randn(8, 4, generator=g), torch.randn(4, 8, generator=g))})
    _one_line_error(run_cli("truncate", src, "-o", src / "inner", "--rank", "2"))
    assert not (src / "inner").exists()


def test_nan_input_refused_nothing_left(kohya, tmp_path):
    path, mods = kohya
    sd = load_file(str(path))
    sd[f"{LIN}.lora_up.weight"][0, 0] = float("nan")
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    for cmd, opt in (("truncate", ("--rank", "2")), ("rescale", ("--factor", "2"))):
        out_dir = tmp_path / f"o-{cmd}"
        out_dir.mkdir()
        _one_line_error(run_cli(cmd, bad, "-o", out_dir / "out.safetensors", *opt))
        assert list(out_dir.iterdir()) == []


def test_failed_self_check_leaves_nothing(kohya, tmp_path, monkeypatch):
    import importlib

    rw = importlib.import_module("lora_inspect.rewrite.truncation")
    path, _ = kohya
    real = rw.to_stored

    def corrupt(m, b, a, dtype):
        a_st, b_st = real(m, b, a, dtype)
        return a_st, b_st * 1.01

    monkeypatch.setattr(rw, "to_stored", corrupt)
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    r = run_cli("truncate", path, "-o", out_dir / "out.safetensors", "--rank", "2")
    _one_line_error(r)
    assert "self-check failed" in r.stderr
    assert list(out_dir.iterdir()) == []


def test_kohya_output_deterministic(kohya, tmp_path):
    path, _ = kohya
    for name in ("a", "b"):
        assert run_cli("truncate", path, "-o", tmp_path / f"{name}.safetensors", "--energy", "0.9").exit_code == 0
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_decomposition_matches_reference_factors():
    g = torch.Generator().manual_seed(3)
    b = torch.randn(30, 6, generator=g, dtype=torch.float64).numpy()
    a = torch.randn(6, 17, generator=g, dtype=torch.float64).numpy()
    d = decompose(b, a, 0.7)
    for k in (1, 3, 6, 8):
        b1, a1 = d.factors(k)
        b2, a2 = truncate_factors(b, a, 0.7, k)
        assert rel_close(b1 @ a1, b2 @ a2, 1e-10)
        assert rel_close(b1 @ a1, dense_truncation(0.7 * b @ a, k), 1e-10)
        # split evenly: B′ᵀB′ = A′A′ᵀ = diag(S_k)
        assert rel_close(b1.T @ b1, a1 @ a1.T, 1e-10)
    b1, a1 = d.factors(2, 5)  # padded
    assert b1.shape == (30, 5) and a1.shape == (5, 17) and not b1[:, 2:].any() and not a1[2:].any()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(2, 40), st.integers(0, 2**31 - 1)), min_size=1, max_size=5),
       st.floats(0.05, 1.0))
def test_greedy_budget_never_worse_than_uniform_when_combined(mods, frac):
    """The greedy alone is a heuristic; choose_ranks keeps max(greedy, best uniform). Check the greedy
    respects the budget and takes prefixes; the combination is checked end to end in the PEFT tests."""
    spectra, costs, caps = [], [], []
    for r, c, seed in mods:
        rng = np.random.default_rng(seed)
        spectra.append(np.sort(rng.random(r))[::-1])
        costs.append(c)
        caps.append(r)
    budget = frac * sum(r * c for r, c, _ in mods)
    ks = greedy_budget_ranks(spectra, costs, caps, budget)
    assert sum(k * c for k, c in zip(ks, costs)) <= budget
    assert all(0 <= k <= r for k, r in zip(ks, caps))


@pytest.mark.parametrize("kappa, route", [(1e1, "cholesky"), (1e5, "householder R + solve"), (1e10, "reflectors")])
def test_decomposition_routes_by_conditioning(kappa, route):
    """Each route (CholeskyQR; Householder R with triangular solves; geqrf/ormqr reflectors) must give
    the Eckart–Young truncation; κ(B) picks the route."""
    g = torch.Generator().manual_seed(9)
    q, _ = torch.linalg.qr(torch.randn(40, 6, generator=g, dtype=torch.float64))
    b = (q * torch.logspace(0, -math.log10(kappa), 6, dtype=torch.float64)).numpy()
    a = torch.randn(6, 25, generator=g, dtype=torch.float64).numpy()
    d = decompose(b, a, 1.3)
    from lora_inspect.spectrum import HouseholderDecomposition

    reflectors = isinstance(d, HouseholderDecomposition)
    took = "reflectors" if reflectors else ("cholesky" if kappa <= 1e4 else "householder R + solve")
    assert took == route
    for k in (1, 4, 6):
        b1, a1 = d.factors(k)
        assert rel_close(b1 @ a1, dense_truncation(1.3 * b @ a, k), 1e-9)


def test_force_never_replaces_an_unrelated_directory(kohya, tmp_path):
    """--force replaces an earlier output, not a folder of someone's files."""
    path, _ = kohya
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "holiday.jpg").write_bytes(b"not an adapter")
    res = run_cli("truncate", path, "-o", precious, "--rank", "1", "--force")
    assert res.exit_code == 2
    assert "not an adapter directory" in res.stderr
    assert (precious / "holiday.jpg").read_bytes() == b"not an adapter"
