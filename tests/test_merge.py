"""merge: against a dense float64 Σ wᵢΔWᵢ, its Eckart–Young truncation, and PEFT's
add_weighted_adapter(combination_type="svd")."""

from __future__ import annotations

import json

import pytest
import torch

from lora_inspect.convert.merge import merge
from lora_inspect.formats import load_adapter
from lora_inspect.rewrite import TruncateSpec
from tests.builders import build_peft, run_cli, write_kohya

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pair")
    a = build_peft(tmp, arch="llama", seed=0, r=4, lora_alpha=8, target_modules=TARGETS,
                   rank_pattern={"down_proj": 6})
    b = build_peft(tmp, arch="llama", seed=1, r=8, lora_alpha=4, target_modules=["q_proj", "k_proj"], use_rslora=True)
    return a, b


def _dense(build, name: str) -> torch.Tensor:
    ad = load_adapter(build.path)
    names = {m.name for m in ad.modules}
    return build.delta(name) if name in names else None


def _expected(pair, w, name):
    terms = [wi * d for wi, d in zip(w, (_dense(p, name) for p in pair)) if d is not None]
    return sum(terms)


def test_exact_merge_equals_dense_sum(pair, tmp_path):
    w = [0.7, -0.3]
    res = merge([load_adapter(p.path) for p in pair], tmp_path / "m", weights=w, dtype="fp32")
    out = load_adapter(tmp_path / "m")
    names = {m.name for m in out.modules}
    assert "model.layers.0.self_attn.k_proj" in names and "model.layers.0.mlp.down_proj" in names
    for m in out.modules:
        want = _expected(pair, w, m.name)
        got = torch.from_numpy(m.delta())
        assert float((got - want).norm() / want.norm()) < 1e-6, m.name
    q = next(x for x in res.modules if x.name == "model.layers.0.self_attn.q_proj")
    assert q.inputs == [4, 8] and q.rank_out == 12 and q.relative_error == 0.0


def test_rank_k_is_eckart_young(pair, tmp_path):
    w = [1.0, 0.5]
    k = 3
    res = merge([load_adapter(p.path) for p in pair], tmp_path / "m", weights=w, spec=TruncateSpec(rank=k),
                dtype="fp32")
    out = load_adapter(tmp_path / "m")
    for m in out.modules:
        want = _expected(pair, w, m.name)
        u, s, vh = torch.linalg.svd(want)
        fact = next(x for x in res.modules if x.name == m.name)
        ours = torch.tensor(fact.singular_values[: len(s)], dtype=torch.float64)
        n = min(len(ours), int((s > 1e-12 * s[0]).sum()))
        assert float((ours[:n] - s[:n]).abs().max()) <= 1e-6 * float(s[0]), m.name
        trunc = (u[:, :k] * s[:k]) @ vh[:k]
        got = torch.from_numpy(m.delta())
        assert float((got - trunc).norm()) <= 1e-6 * float(s[0]) * 10, m.name
        rel = float((want - trunc).norm() / want.norm())
        assert abs(fact.relative_error - rel) < 1e-6  # the reference ΔW went through fp32 weights


def test_against_peft_svd_combination(tmp_path):
    """PEFT's svd combination (dense ΔW + torch.linalg.svd) gives the same rank-k ΔW (no rsLoRA: peft ≤ 0.21.2
    over-scales it)."""
    from peft import PeftModel

    from tests.builders import tiny_llama

    a = build_peft(tmp_path, arch="llama", seed=0, r=4, lora_alpha=8, target_modules=TARGETS)
    b = build_peft(tmp_path, arch="llama", seed=1, r=4, lora_alpha=16, target_modules=TARGETS)
    pm = PeftModel.from_pretrained(tiny_llama(0), str(a.path), adapter_name="a")
    pm.load_adapter(str(b.path), adapter_name="b")
    pm.add_weighted_adapter(["a", "b"], [0.6, 0.4], "svd", combination_type="svd", svd_rank=5)
    res = merge([load_adapter(a.path), load_adapter(b.path)], tmp_path / "m", weights=[0.6, 0.4],
                spec=TruncateSpec(rank=5), dtype="fp32")
    assert res.modules
    ours = load_adapter(tmp_path / "m")
    for m in ours.modules:
        layer = pm.base_model.model.get_submodule(m.name)
        peft_delta = layer.get_delta_weight("svd").double()
        assert float((torch.from_numpy(m.delta()) - peft_delta).norm() / peft_delta.norm()) < 1e-5, m.name


def test_mixed_layouts_and_refusals(pair, tmp_path):
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g)
    k = write_kohya(tmp_path / "k.safetensors", {"lora_te_model_layers_0_self_attn_q_proj": (down, up, 2.0)})
    res = run_cli("merge", pair[0].path, k, "--weights", "1,2", "-o", tmp_path / "mk", "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["schema"] == "lora-inspect/merge/1"
    out = load_adapter(tmp_path / "mk")
    want = pair[0].delta("model.layers.0.self_attn.q_proj") + 2 * (2.0 / 4) * (up.double() @ down.double())
    got = torch.from_numpy(out.module("model.layers.0.self_attn.q_proj").delta())
    assert float((got - want).norm() / want.norm()) < 1e-6
    # disjoint names: one line naming them
    other = write_kohya(tmp_path / "o.safetensors", {"lora_unet_mid_block_attentions_0_proj_in": (down, up, None)})
    res = run_cli("merge", pair[0].path, other, "-o", tmp_path / "x")
    assert res.exit_code == 2 and "proj_in" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    dora = build_peft(tmp_path, arch="llama", seed=5, r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    res = run_cli("merge", pair[0].path, dora.path, "-o", tmp_path / "y")
    assert res.exit_code == 2 and "DoRA" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = run_cli("merge", pair[0].path, pair[1].path, "--weights", "1", "-o", tmp_path / "z")
    assert res.exit_code == 2 and "weights" in res.stderr
    assert not any((tmp_path / n).exists() for n in ("x", "y", "z"))


def test_lycoris_loha_and_lokr_merge_with_a_lora_exactly(tmp_path):
    """LoHa and LoKr modules enter the sum through their exact LoRA factors: the merge equals the dense
    w₁·ΔW_LoHa + w₂·ΔW_LoKr + w₃·ΔW_LoRA computed from the raw tensors."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"

    def r(*s):
        return torch.randn(*s, generator=g)

    w1a, w1b, w2a, w2b = r(16, 2), r(2, 16), r(16, 3), r(3, 16)
    save_file({f"{name}.hada_w1_a": w1a, f"{name}.hada_w1_b": w1b, f"{name}.hada_w2_a": w2a,
               f"{name}.hada_w2_b": w2b, f"{name}.alpha": torch.tensor(1.0)}, str(tmp_path / "loha.safetensors"))
    k1, k2a, k2b = r(4, 4), r(4, 2), r(2, 4)
    save_file({f"{name}.lokr_w1": k1, f"{name}.lokr_w2_a": k2a, f"{name}.lokr_w2_b": k2b,
               f"{name}.alpha": torch.tensor(4.0)}, str(tmp_path / "lokr.safetensors"))
    down, up = r(4, 16), r(16, 4)
    lora = write_kohya(tmp_path / "lora.safetensors", {name: (down, up, 2.0)})
    res = run_cli("merge", tmp_path / "loha.safetensors", tmp_path / "lokr.safetensors", lora, "--weights",
                  "0.5,0.25,2", "-o", tmp_path / "m.safetensors")
    assert res.exit_code == 0, res.stderr
    d = lambda x: x.double()  # noqa: E731
    loha = (1.0 / 2) * (d(w1a) @ d(w1b)) * (d(w2a) @ d(w2b))  # LoHa: α / r₁ with r = dim of w1
    lokr = (4.0 / 2) * torch.kron(d(k1), d(k2a) @ d(k2b))  # LoKr: α / r of the low-rank w2
    want = 0.5 * loha + 0.25 * lokr + 2 * (2.0 / 4) * (d(up) @ d(down))
    got = torch.from_numpy(load_adapter(tmp_path / "m.safetensors").modules[0].delta())
    assert float((got - want).norm() / want.norm()) < 1e-6
