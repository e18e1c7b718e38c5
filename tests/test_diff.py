"""`diff`: every number checked against dense float64 computations made here, independently of the
QR route (dense ΔW from PEFT's own merge or from the raw stored tensors, dense SVD)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from builders import build_peft, kohya_delta, run_cli, write_kohya
from safetensors.torch import save_file

from lora_inspect import load_adapter
from lora_inspect.diff import compare_factors, diff_adapters, factor_inner
from lora_inspect.spectrum import energy_rank, relative_error, singular_values, truncate_factors

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------- references


def dense_numbers(x: torch.Tensor, y: torch.Tensor, top: int, tau: float) -> dict:
    """Distance, cosine and φ of two dense ΔW, from first principles (full SVD, no QR route)."""
    x, y = x.double(), y.double()
    ux, sx, _ = torch.linalg.svd(x, full_matrices=False)
    uy, sy, _ = torch.linalg.svd(y, full_matrices=False)

    def erank(s):
        e = (s**2).cumsum(0) / (s**2).sum()
        return int((e < tau - 1e-12).sum()) + 1

    i = max(1, min(top, erank(sx), erank(sy)))
    phi = float(torch.linalg.matrix_norm(ux[:, :i].T @ uy[:, :i]) ** 2 / i)
    return {
        "rel_distance": float(torch.linalg.matrix_norm(x - y) / torch.linalg.matrix_norm(x)),
        "spectral_distance": float(torch.linalg.matrix_norm(x - y, ord=2)),
        "cosine": float((x * y).sum() / (torch.linalg.matrix_norm(x) * torch.linalg.matrix_norm(y))),
        "phi": phi,
        "phi_dim": i,
    }


def write_peft_dir(path: Path, modules: dict[str, tuple[torch.Tensor, torch.Tensor]], r: int,
                   dtype=torch.float64) -> Path:
    """A PEFT save_pretrained-style directory with s = 1 (α = r): modules {name: (B (out, r), A (r, in))}."""
    path.mkdir(parents=True)
    sd = {}
    for name, (b, a) in modules.items():
        sd[f"base_model.model.{name}.lora_A.weight"] = a.to(dtype).contiguous()
        sd[f"base_model.model.{name}.lora_B.weight"] = b.to(dtype).contiguous()
    save_file(sd, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": r, "use_rslora": False,
           "target_modules": sorted({n.rsplit(".", 1)[-1] for n in modules})}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def diff_json(a, b, *extra) -> dict:
    res = run_cli("diff", a, b, "--json", *extra)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


# ------------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_peft(tmp_path_factory.mktemp("a"), r=8, lora_alpha=16, target_modules=ALL_LINEAR, seed=0)


def test_self_diff_is_zero_distance_unit_cosine_unit_phi(llama):
    doc = diff_json(llama.path, llama.path, "--top", "3")
    assert doc["schema"] == "lora-inspect/diff/1"
    assert len(doc["modules"]) == 14 and doc["only_in_a"] == [] and doc["only_in_b"] == []
    # Zero up to rounding, not bit-exactly: identical factors take a shortcut to 0.0 today, but through the QR
    # route ‖[B, −B]·[A; A]‖ is 0 only if BLAS rounds both halves alike, and a kernel that does not leaves
    # O(eps)·‖ΔW‖ ≈ 1e-16 (relative). 1e-12 is far above that noise and far below any real difference.
    for m in doc["modules"]:
        assert m["status"] == "ok"
        assert m["rel_distance"] == pytest.approx(0.0, abs=1e-12)
        assert m["cosine"] == pytest.approx(1.0, abs=1e-12)
        assert m["phi"] == pytest.approx(1.0, abs=1e-12)
        assert m["phi_dim"] == 3
    s = doc["summary"]
    assert s["compared"] == 14 and s["max_rel_distance"] == pytest.approx(0.0, abs=1e-12) and s["min_cosine"] == pytest.approx(1.0, abs=1e-12)


def test_same_delta_from_different_factors_is_zero(tmp_path):
    """B·2 and A/2 and a different α give the same ΔW: no shortcut applies, the QR route must find 0."""
    g = torch.Generator().manual_seed(3)
    down = torch.randn(5, 24, generator=g, dtype=torch.float64)
    up = torch.randn(16, 5, generator=g, dtype=torch.float64)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    a = write_kohya(tmp_path / "a.safetensors", {name: (down, up, 5.0)}, dtype=torch.float64)
    b = write_kohya(tmp_path / "b.safetensors", {name: (down / 2, up * 4, 2.5)}, dtype=torch.float64)
    (m,) = diff_json(a, b, "--top", "5")["modules"]
    assert m["rel_distance"] < 1e-13
    assert m["cosine"] == pytest.approx(1.0, abs=1e-13)
    assert m["phi"] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_diff_against_truncation_equals_predicted_error(llama, tmp_path, k):
    ad = load_adapter(llama.path)
    trunc, predicted = {}, {}
    for m in ad.modules:
        b, a = m.factors()
        trunc[m.name] = tuple(torch.from_numpy(x) for x in truncate_factors(b, a, m.scale, k))
        sv = singular_values(b, a, m.scale)
        predicted[m.name] = (relative_error(sv, k), sv)
    out = write_peft_dir(tmp_path / f"trunc-{k}", trunc, r=k)
    doc = diff_json(llama.path, out, "--top", str(k))
    assert len(doc["modules"]) == len(ad.modules)
    for m in doc["modules"]:
        err, sv = predicted[m["name"]]
        assert m["rel_distance"] == pytest.approx(err, abs=1e-6, rel=1e-6)
        # X_k is the orthogonal projection of X: ⟨X, X_k⟩ = ‖X_k‖², so cos = ‖X_k‖/‖X‖ = √(1 − err²)
        assert m["cosine"] == pytest.approx((1 - err**2) ** 0.5, abs=1e-9)
        # the top directions of X_k are X's own: φ = 1 whenever i ≤ k (X_k's energy rank is of σ₁…σ_k)
        assert m["phi_dim"] == min(k, energy_rank(sv, 0.95), energy_rank(sv[:k], 0.95))
        assert m["phi"] == pytest.approx(1.0, abs=1e-9)
        assert m["rank_a"] == 8 and m["rank_b"] == k


def test_matches_dense_peft_merge_different_ranks(tmp_path):
    """Two real PEFT adapters (r=4 vs r=6, different α, seeds): references from PEFT's merge_and_unload."""
    one = build_peft(tmp_path / "1", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], seed=0)
    two = build_peft(tmp_path / "2", r=6, lora_alpha=3, target_modules=["q_proj", "v_proj", "down_proj"], seed=0,
                     std=0.25)
    for top in (1, 3):
        doc = diff_json(one.path, two.path, "--top", str(top))
        assert len(doc["modules"]) == 6
        for m in doc["modules"]:
            ref = dense_numbers(one.delta(m["name"]), two.delta(m["name"]), top, 0.95)
            # PEFT merges in float32: ~1e-7 relative
            assert m["rel_distance"] == pytest.approx(ref["rel_distance"], rel=1e-5)
            assert m["cosine"] == pytest.approx(ref["cosine"], abs=1e-5)
            assert m["spectral_distance"] == pytest.approx(ref["spectral_distance"], rel=1e-5)
            assert m["phi_dim"] == ref["phi_dim"]
            assert m["phi"] == pytest.approx(ref["phi"], abs=1e-5)


def test_matches_dense_float64_kohya_with_conv(tmp_path):
    """Raw float64 kohya tensors (linear and 3×3 conv, r=3 vs r=7): dense references to 1e-10."""
    g = torch.Generator().manual_seed(11)
    lin, conv = "lora_unet_mid_block_attentions_0_proj_out", "lora_unet_down_blocks_1_resnets_0_conv1"

    def mods(r, alpha):
        return {
            lin: (torch.randn(r, 20, generator=g, dtype=torch.float64), torch.randn(12, r, generator=g, dtype=torch.float64), alpha),
            conv: (torch.randn(r, 4, 3, 3, generator=g, dtype=torch.float64),
                   torch.randn(6, r, 1, 1, generator=g, dtype=torch.float64), alpha),
        }

    ma, mb = mods(3, 1.5), mods(7, 7.0)
    a = write_kohya(tmp_path / "a.safetensors", ma, dtype=torch.float64)
    b = write_kohya(tmp_path / "b.safetensors", mb, dtype=torch.float64)
    doc = diff_json(a, b, "--top", "2", "--energy", "0.9")
    by = {m["name"]: m for m in doc["modules"]}
    assert set(by) == {lin, conv}
    for name in by:
        ref = dense_numbers(kohya_delta(*ma[name]), kohya_delta(*mb[name]), 2, 0.9)
        m = by[name]
        for key in ("rel_distance", "cosine", "phi", "spectral_distance"):
            assert m[key] == pytest.approx(ref[key], rel=1e-10, abs=1e-12), key
        assert m["phi_dim"] == ref["phi_dim"]
    assert doc["energy"] == 0.9 and doc["top"] == 2
    s = doc["summary"]
    assert s["max_rel_distance"] == pytest.approx(max(m["rel_distance"] for m in by.values()))
    assert s["mean_cosine"] == pytest.approx(sum(m["cosine"] for m in by.values()) / 2)
    assert set(s["by_type"]) == {"proj_out", "conv1"}


def test_inner_product_formula_against_dense():
    g = torch.Generator().manual_seed(5)
    b1, a1 = torch.randn(9, 2, generator=g, dtype=torch.float64), torch.randn(2, 13, generator=g, dtype=torch.float64)
    b2, a2 = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(5, 13, generator=g, dtype=torch.float64)
    dense = float(((0.7 * b1 @ a1) * (-1.3 * b2 @ a2)).sum())
    assert factor_inner(b1.numpy(), a1.numpy(), 0.7, b2.numpy(), a2.numpy(), -1.3) == pytest.approx(dense, rel=1e-12)


def test_phi_never_exceeds_one():
    """φ ∈ [0, 1]: identical or opposite subspaces gave 1.0000000000000009 from rounding."""
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        b, a = torch.randn(4, 2, generator=g), torch.randn(2, 5, generator=g)
        for b2 in (b, -b, 2 * b):
            d = compare_factors("m", b.numpy(), a.numpy(), 1.0, b2.numpy(), a.numpy(), 1.0, top=2)
            assert 0.0 <= d.phi <= 1.0, (seed, d.phi)


def test_tiny_distance_has_no_cancellation():
    """‖X − Y‖ = 1e-9·‖X‖: the √(‖X‖²+‖Y‖²−2⟨X,Y⟩) route would return noise of ~1e-8; ours is exact."""
    g = torch.Generator().manual_seed(2)
    b, a = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(4, 40, generator=g, dtype=torch.float64)
    db = torch.randn(30, 4, generator=g, dtype=torch.float64)
    b2 = b + 1e-9 * db
    d = compare_factors("m", b.numpy(), a.numpy(), 1.0, b2.numpy(), a.numpy(), 1.0)
    ref = float(torch.linalg.matrix_norm(1e-9 * db @ a) / torch.linalg.matrix_norm(b @ a))
    assert d.rel_distance == pytest.approx(ref, rel=1e-6)


def test_shape_mismatch_and_one_sided_modules_are_listed(tmp_path):
    g = torch.Generator().manual_seed(1)

    def m(r, i, o):
        return (torch.randn(r, i, generator=g), torch.randn(o, r, generator=g), float(r))

    a = write_kohya(tmp_path / "a.safetensors", {"lora_te_x_0_q": m(2, 8, 8), "lora_te_x_0_k": m(2, 8, 8),
                                                 "lora_te_x_0_only_a": m(2, 8, 8)})
    b = write_kohya(tmp_path / "b.safetensors", {"lora_te_x_0_q": m(3, 8, 8), "lora_te_x_0_k": m(2, 6, 8),
                                                 "lora_te_x_0_only_b": m(2, 8, 8)})
    doc = diff_json(a, b)
    by = {x["name"]: x for x in doc["modules"]}
    assert by["lora_te_x_0_k"]["status"] == "shape_mismatch"
    assert by["lora_te_x_0_k"]["shape_a"] == [8, 8] and by["lora_te_x_0_k"]["shape_b"] == [8, 6]
    assert by["lora_te_x_0_k"]["rel_distance"] is None
    assert by["lora_te_x_0_q"]["status"] == "ok" and by["lora_te_x_0_q"]["rel_distance"] > 0
    assert doc["only_in_a"] == ["lora_te_x_0_only_a"] and doc["only_in_b"] == ["lora_te_x_0_only_b"]
    assert doc["summary"]["shape_mismatches"] == 1 and doc["summary"]["compared"] == 1
    table = run_cli("diff", a, b)
    assert table.exit_code == 0
    assert "shape_mismatch" in table.stdout and "only in A (1): lora_te_x_0_only_a" in table.stdout


def test_zero_and_non_finite_modules(tmp_path):
    g = torch.Generator().manual_seed(4)
    down, up = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)
    nan_up = up.clone()
    nan_up[0, 0] = float("nan")
    a = write_kohya(tmp_path / "a.safetensors", {"lora_te_x_0_q": (down, torch.zeros(8, 2), 2.0),
                                                 "lora_te_x_0_k": (down.clone(), up, 2.0)})
    b = write_kohya(tmp_path / "b.safetensors", {"lora_te_x_0_q": (down, up, 2.0),
                                                 "lora_te_x_0_k": (down.clone(), nan_up, 2.0)})
    by = {x["name"]: x for x in diff_json(a, b)["modules"]}
    assert by["lora_te_x_0_q"]["norm_a"] == 0.0 and by["lora_te_x_0_q"]["rel_distance"] is None
    assert by["lora_te_x_0_q"]["cosine"] is None and by["lora_te_x_0_q"]["phi"] is None
    assert by["lora_te_x_0_k"]["status"] == "non_finite"


def test_no_common_names_is_one_line_exit_2(tmp_path, llama):
    g = torch.Generator().manual_seed(1)
    k = write_kohya(tmp_path / "k.safetensors", {"lora_te_x_0_q": (torch.randn(2, 8, generator=g),
                                                                   torch.randn(8, 2, generator=g), 2.0)})
    res = run_cli("diff", llama.path, k)
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and "no module names in common" in res.stderr
    assert res.stdout == ""


@pytest.mark.parametrize("args,needle", [(["--top", "0"], "--top"), (["--energy", "1.5"], "--energy")])
def test_bad_options_exit_2(llama, args, needle):
    res = run_cli("diff", llama.path, llama.path, *args)
    assert res.exit_code == 2 and needle in res.stderr and res.stderr.count("\n") == 1


def test_missing_input_exit_2(llama, tmp_path):
    res = run_cli("diff", llama.path, tmp_path / "nope")
    assert res.exit_code == 2 and "no such file" in res.stderr


def test_library_api_pairs_in_a_order(llama):
    ad = load_adapter(llama.path)
    res = diff_adapters(ad, ad, top=2)
    assert [d.name for d in res.modules] == [m.name for m in ad.modules]
    assert res.summary.by_type["q_proj"].modules == 2


def test_one_side_zero_is_said_not_reported_as_a_worst_value(tmp_path):
    """ΔW_B = 0 everywhere (an untrained B): the summary says where cosine/φ are undefined and names
    the modules, instead of a worst value of '-' for module None (issue 9)."""
    g = torch.Generator().manual_seed(5)
    mods = {f"model.layers.{i}.self_attn.q_proj": (torch.randn(8, 2, generator=g), torch.randn(2, 8, generator=g))
            for i in range(3)}
    a = write_peft_dir(tmp_path / "a", mods, 2)
    b = write_peft_dir(tmp_path / "b", {n: (torch.zeros_like(bb), aa) for n, (bb, aa) in mods.items()}, 2)
    doc = diff_json(a, b)
    assert all(m["norm_b"] == 0.0 and m["rel_distance"] == pytest.approx(1.0) for m in doc["modules"])
    assert doc["summary"]["min_cosine"] is None and doc["summary"]["min_cosine_module"] is None
    res = run_cli("diff", a, b)
    assert res.exit_code == 0 and "None" not in res.stdout
    assert "ΔW_B is zero (untrained?) in 3 of 3 compared modules" in res.stdout
    assert "model.layers.0.self_attn.q_proj" in res.stdout.split("ΔW_B is zero")[1]
    assert "cosine undefined" in res.stdout
    res = run_cli("diff", b, a)
    assert "relative distance ‖ΔW_A−ΔW_B‖_F/‖ΔW_A‖_F undefined" in res.stdout and "worst -" not in res.stdout


def test_modules_in_layer_order_and_no_overflow_warning(tmp_path):
    """Layer 2 before layer 10 (natural order), and float64 factors near 1e150 (σ² overflows a plain
    sum of squares) give finite numbers and nothing on stderr."""
    g = torch.Generator().manual_seed(6)
    mods = {f"model.layers.{i}.mlp.up_proj": (torch.randn(8, 2, generator=g, dtype=torch.float64),
                                              torch.randn(2, 8, generator=g, dtype=torch.float64)) for i in (10, 2, 1)}
    a = write_peft_dir(tmp_path / "a", mods, 2)
    big = write_peft_dir(tmp_path / "big", {n: (bb * 1e150, aa * 1e150) for n, (bb, aa) in mods.items()}, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = run_cli("diff", a, big, "--json")
    assert res.exit_code == 0 and res.stderr == "", res.stderr
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
    doc = json.loads(res.stdout)
    assert [m["name"] for m in doc["modules"]] == [f"model.layers.{i}.mlp.up_proj" for i in (1, 2, 10)]
    for m in doc["modules"]:
        dense = (mods[m["name"]][0] @ mods[m["name"]][1]).norm().item() * 1e300
        assert m["norm_b"] == pytest.approx(dense, rel=1e-9) and m["cosine"] == pytest.approx(1.0)
        assert m["energy_rank_b"] == m["energy_rank_a"]
