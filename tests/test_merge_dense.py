"""merge --method ties|dare_linear|dare_ties|magnitude_prune: the dense pre-SVD ΔW against PEFT's own
``peft.utils.merge_utils`` functions on the same dense updates, the written adapter against the dense
Eckart–Young truncation of that, and end to end against ``add_weighted_adapter(combination_type="*_svd")``.

DARE: our masks are drawn in float32 from a generator seeded per module (``module_seed``). Given the same
generator state, PEFT's ``random_pruning`` on float32 updates draws the same masks, so the fp32 results
are compared bitwise; for fp64 updates PEFT would draw in fp64 (a different stream), so there the masks are
made to come from the same float32 draw (``torch.bernoulli`` wrapped) and the results compared bitwise.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft.utils import merge_utils as mu

from lora_inspect.convert.canon import from_adapter
from lora_inspect.convert.dense_merge import (
    METHODS,
    DenseSpec,
    combine,
    dense_delta,
    dense_updates,
    module_seed,
)
from lora_inspect.convert.merge import merge
from lora_inspect.cpu_random import CpuGenerator
from lora_inspect.formats import load_adapter
from lora_inspect.rewrite import TruncateSpec
from tests.builders import build_peft, run_cli

TARGETS = ["q_proj", "v_proj", "down_proj"]
Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dense")
    a = build_peft(tmp, arch="llama", seed=0, r=4, lora_alpha=8, target_modules=TARGETS)
    b = build_peft(tmp, arch="llama", seed=1, r=6, lora_alpha=4, target_modules=["q_proj", "k_proj"],
                   use_rslora=True)
    return a, b


def _mods(pair, name):
    cs = [from_adapter(load_adapter(p.path)) for p in pair]
    return [m for c in cs for m in c.modules if m.name == name]


def _peft(method, tensors, w, d, sign):
    args = (list(tensors), torch.tensor(w, dtype=tensors[0].dtype), d) + ((sign,) if method.endswith("ties") else ())
    return getattr(mu, method)(*args)


def _bernoulli32(monkeypatch):
    real = torch.bernoulli

    def draw(p, *a, **k):
        return real(p.to(torch.float32), *a, **k).to(p.dtype)
    monkeypatch.setattr(torch, "bernoulli", draw)


COMBOS = [(m, "total") for m in METHODS] + [("ties", "frequency"), ("dare_ties", "frequency")]


@pytest.mark.parametrize("method,sign", COMBOS)
@pytest.mark.parametrize("precision", ["fp64", "fp32"])
def test_pre_svd_delta_is_merge_utils(pair, method, sign, precision, monkeypatch):
    mods = _mods(pair, Q)
    # the dense updates are PEFT's: its merged weights minus the base (fp32 model), and (B@A)·s exactly
    ups = dense_updates(mods, np.float64)
    for u, m, p in zip(ups, mods, pair):
        assert np.allclose(u, m.scale * (m.b @ m.a), rtol=0, atol=1e-13)
        assert float((torch.from_numpy(u) - p.delta(Q)).norm() / np.linalg.norm(u)) < 1e-6
    w = [0.7, -0.45]
    for d in (0.35, 1.0):
        spec = DenseSpec(method, d, sign, seed=11, precision=precision)
        ours = torch.from_numpy(dense_delta(mods, w, spec, Q))
        same = torch.from_numpy(dense_updates(mods, spec.dtype))
        torch.manual_seed(module_seed(11, Q))
        with monkeypatch.context() as mp:
            if precision == "fp64":
                _bernoulli32(mp)
            want = _peft(method, same, w, d, sign)
        assert torch.equal(ours, want), (method, d)
        if d < 1:  # something was pruned: not the plain weighted sum
            plain = mu.task_arithmetic(list(same), torch.tensor(w, dtype=same.dtype))
            assert float((ours - plain).norm() / plain.norm()) > 0.1


def test_three_inputs_and_negative_weights():
    g = torch.Generator().manual_seed(3)
    ts = torch.randn(3, 20, 28, generator=g, dtype=torch.float64)
    w = [1.2, -0.5, 0.3]
    for method in METHODS:
        for sign in ("total", "frequency"):
            spec = DenseSpec(method, 0.4, sign, seed=2, precision="fp32")
            t32 = ts.float()
            ours = torch.from_numpy(combine(t32.numpy().copy(), w, spec, CpuGenerator(99)))
            torch.manual_seed(99)
            assert torch.equal(ours, _peft(method, t32, w, 0.4, sign)), (method, sign)


@pytest.mark.parametrize("seed", [0, 99, 2**32 + 7, 2**63 - 1])
def test_masks_are_torch_bernoulli_draws(seed):
    """The DARE masks are torch's: ``torch.bernoulli`` of a float32 p from ``torch.Generator().manual_seed(seed)``,
    bit for bit, one draw after another from the same generator (seeds past 2³² included)."""
    gen, ours = torch.Generator().manual_seed(seed), CpuGenerator(seed)
    for shape, p in (((7,), 0.3), ((20, 28), 0.35), ((3, 1000), 0.999), ((33, 17), 0.5)):
        want = torch.bernoulli(torch.full(shape, p, dtype=torch.float32), generator=gen).numpy().astype(bool)
        assert np.array_equal(ours.bernoulli(shape, p), want), (shape, p)


def test_dare_mask_statistics_and_seeds(pair):
    mods = _mods(pair, Q)
    spec = DenseSpec("dare_linear", 0.3, seed=5)
    kept = dense_delta(mods[:1], [1.0], spec, Q) != 0
    n = kept.size
    frac = float(kept.sum()) / n
    assert abs(frac - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5  # Bernoulli(0.3), 4σ
    full = dense_updates(mods[:1], np.float64)[0]
    assert np.allclose(dense_delta(mods[:1], [1.0], spec, Q)[kept], full[kept] / 0.3, rtol=1e-15, atol=0)
    assert np.array_equal(dense_delta(mods, [1.0, 1.0], spec, Q), dense_delta(mods, [1.0, 1.0], spec, Q))
    other = DenseSpec("dare_linear", 0.3, seed=6)
    assert not np.array_equal(dense_delta(mods, [1.0, 1.0], spec, Q), dense_delta(mods, [1.0, 1.0], other, Q))
    assert module_seed(5, Q) != module_seed(5, Q.replace("q_proj", "k_proj"))
    # fp32 and fp64 runs draw the same masks
    lo = dense_delta(mods, [1.0, 1.0], DenseSpec("dare_ties", 0.3, seed=5, precision="fp32"), Q).astype(np.float64)
    hi = dense_delta(mods, [1.0, 1.0], DenseSpec("dare_ties", 0.3, seed=5), Q)
    assert float(np.linalg.norm(lo - hi) / np.linalg.norm(hi)) < 1e-6


@pytest.mark.parametrize("method,spec", [("ties", None), ("dare_ties", TruncateSpec(rank=3)),
                                         ("magnitude_prune", TruncateSpec(energy=0.9)),
                                         ("dare_linear", TruncateSpec(max_params=900))])
def test_written_delta_is_eckart_young(pair, tmp_path, method, spec):
    w = [0.8, 0.5]
    dense = DenseSpec(method, 0.5, seed=4)
    res = merge([load_adapter(p.path) for p in pair], tmp_path / "m", weights=w, spec=spec, dense=dense,
                dtype="fp32")
    assert res.method == method and res.density == 0.5
    out = {m.name: m for m in load_adapter(tmp_path / "m").modules}
    for fact in res.modules:
        full = torch.from_numpy(dense_delta(_mods(pair, fact.name), [wi for wi, p in zip(w, pair)
                                                                     if _has(p, fact.name)], dense, fact.name))
        u, s, vh = torch.linalg.svd(full)
        k = fact.rank_out
        if spec is None:
            assert k == max(fact.inputs)
        if k == 0:
            assert fact.name not in out
            continue
        trunc = (u[:, :k] * s[:k]) @ vh[:k]
        got = torch.from_numpy(out[fact.name].delta())
        assert float((got - trunc).norm() / trunc.norm()) < 1e-6, fact.name
        assert abs(fact.relative_error - float((full - trunc).norm() / full.norm())) < 1e-9
    if spec is not None and spec.max_params:
        assert sum(f.rank_out * sum(f.shape) for f in res.modules) <= 900


def _has(build, name):
    return any(m.name == name for m in load_adapter(build.path).modules)


@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "dare_linear"])
def test_against_peft_add_weighted_adapter(tmp_path, method, monkeypatch):
    """PEFT's ``<method>_svd`` (svd_rank=None: max r = 4; full_matrices=True does not change the rank-4
    product) on two real adapters. DARE: PEFT's dare_linear is run with the global RNG seeded per module as
    ours is (PEFT otherwise draws from one global stream in module order)."""
    import peft.tuners.lora.model as lm
    from peft import PeftModel

    from tests.builders import tiny_llama

    a = build_peft(tmp_path, arch="llama", seed=0, r=4, lora_alpha=8, target_modules=TARGETS)
    b = build_peft(tmp_path, arch="llama", seed=1, r=4, lora_alpha=16, target_modules=TARGETS)
    pm = PeftModel.from_pretrained(tiny_llama(0), str(a.path), adapter_name="a")
    pm.load_adapter(str(b.path), adapter_name="b")
    order = [n.removeprefix("base_model.model.") for n, mod in pm.named_modules() if hasattr(mod, "lora_A")]
    seeds = iter(module_seed(7, n) for n in order)
    real = lm.dare_linear

    def seeded(*args, **kw):
        torch.manual_seed(next(seeds))
        return real(*args, **kw)
    monkeypatch.setattr(lm, "dare_linear", seeded)
    pm.add_weighted_adapter(["a", "b"], [0.6, 0.9], "m", combination_type=method + "_svd", density=0.4)
    res = merge([load_adapter(a.path), load_adapter(b.path)], tmp_path / "m", weights=[0.6, 0.9],
                dense=DenseSpec(method, 0.4, seed=7), dtype="fp32")
    assert len(res.modules) == len(order) == 6
    for m in load_adapter(tmp_path / "m").modules:
        peft_delta = pm.base_model.model.get_submodule(m.name).get_delta_weight("m").double()
        assert m.rank == 4
        assert float((torch.from_numpy(m.delta()) - peft_delta).norm() / peft_delta.norm()) < 1e-5, m.name


def test_cli_json_and_refusals(pair, tmp_path):
    a, b = pair[0].path, pair[1].path
    res = run_cli("merge", a, b, "--method", "dare_ties", "--density", "0.5", "--seed", "3", "-o", tmp_path / "o",
                  "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["schema"] == "lora-inspect/merge/1" and doc["mode"] == "rank max rᵢ"
    assert doc["method"] == {"name": "dare_ties", "dense": True, "density": 0.5, "majority_sign": "total",
                             "seed": 3, "precision": "fp64"}
    again = run_cli("merge", a, b, "--method", "dare_ties", "--density", "0.5", "--seed", "3", "-o", tmp_path / "p")
    assert again.exit_code == 0 and "dare_ties on the dense ΔWᵢ" in again.stdout
    files = sorted(p.name for p in (tmp_path / "o").iterdir() if p.suffix == ".safetensors")
    assert files and all((tmp_path / "o" / f).read_bytes() == (tmp_path / "p" / f).read_bytes() for f in files)
    plain = json.loads(run_cli("merge", a, b, "-o", tmp_path / "s", "--json").stdout)
    assert plain["method"]["name"] == "sum" and plain["method"]["dense"] is False
    dora = build_peft(tmp_path, arch="llama", seed=5, r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    cases = [(["--method", "ties", "--density", "0"], "--density must be in (0, 1]"),
             (["--method", "ties", "--density", "1.5"], "--density must be in (0, 1]"),
             (["--method", "ties"], "needs --density"),
             (["--density", "0.5"], "--density goes with a dense --method"),
             (["--method", "ties", "--density", "0.5", "--seed", "1"], "--seed goes with"),
             (["--method", "ties", "--density", "0.5", "--dense-limit", "1KiB"], "above the limit")]
    for i, (args, text) in enumerate(cases):
        r = run_cli("merge", a, b, *args, "-o", tmp_path / f"x{i}")
        assert r.exit_code == 2 and text in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
        assert not (tmp_path / f"x{i}").exists()
    r = run_cli("merge", a, dora.path, "--method", "ties", "--density", "0.5", "-o", tmp_path / "y")
    assert r.exit_code == 2 and "DoRA" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "y").exists()


def test_module_order_and_conv(tmp_path):
    """A 3×3 conv (kohya) merges on its (out, in·3·3) flattening, as PEFT's flatten(1); reversing the
    module order of the inputs leaves every DARE module unchanged (per-module generators)."""
    from lora_inspect.convert.dense_merge import dense_merge_modules
    from tests.builders import kohya_delta, write_kohya

    g = torch.Generator().manual_seed(8)
    specs = {}
    for i in range(2):
        specs[i] = {f"lora_unet_mid_block_resnets_0_conv{j}": (torch.randn(3, 6, 3, 3, generator=g),
                                                            torch.randn(5, 3, 1, 1, generator=g), 1.5 + i)
                    for j in (1, 2)}
    paths = [write_kohya(tmp_path / f"k{i}.safetensors", specs[i]) for i in range(2)]
    dense = DenseSpec("dare_ties", 0.6, seed=1)
    res = merge([load_adapter(p) for p in paths], tmp_path / "m.safetensors", weights=[1.0, -0.7], dense=dense,
                dtype="fp32")
    out = {m.name: m for m in load_adapter(tmp_path / "m.safetensors").modules}
    assert len(out) == 2 and all(f.rank_out == 3 for f in res.modules)
    canons = [from_adapter(load_adapter(p)) for p in paths]
    for f in res.modules:
        mods = [m for c in canons for m in c.modules if m.path == f.name]
        taus = [kohya_delta(*specs[i][mods[i].source_name]) for i in range(2)]
        assert all(torch.allclose(t, torch.from_numpy(u), atol=1e-12)
                   for t, u in zip(taus, dense_updates(mods, np.float64)))
        full = torch.from_numpy(dense_delta(mods, [1.0, -0.7], dense, f.name))
        u, s, vh = torch.linalg.svd(full)
        trunc = (u[:, :3] * s[:3]) @ vh[:3]
        got = torch.from_numpy(out[mods[0].source_name].delta())
        assert float((got.reshape(trunc.shape) - trunc).norm() / trunc.norm()) < 1e-6
    forward, _ = dense_merge_modules(canons, [1.0, -0.7], None, paths, dense)
    for c in canons:
        c.modules.reverse()
    backward, _ = dense_merge_modules(canons, [1.0, -0.7], None, paths, dense)
    fb = {m.path: m.delta() for m in backward}
    assert [m.path for m in forward] == list(reversed(fb)) and all(np.array_equal(m.delta(), fb[m.path])
                                                                    for m in forward)
