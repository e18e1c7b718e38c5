"""PEFT adapters built with the real library: every module's spectrum against PEFT's own merge.

Reference: PEFT's ``merge_and_unload()`` weight minus the base weight, SVD in float64 (for DoRA, whose
merged change is full rank, s·B·A computed here from the saved tensors and the config's α/r).
Agreement is asserted to 1e-5·σ₁ for every singular value of every module.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from builders import (
    build_peft,
    cli_json,
    peft_lora_layers,
    read_st,
    run_cli,
    sv_close,
    svdvals64,
)
from safetensors.torch import save_file

from lora_inspect import load_adapter
from lora_inspect.analysis import analyse
from lora_inspect.formats.common import pattern_lookup

pytestmark = pytest.mark.filterwarnings("ignore")

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PATTERN_RANKS = {"o_proj": 2, "model.layers.0.self_attn.q_proj": 6}  # a suffix key and a full-name key
PATTERN_ALPHAS = {"v_proj": 3, "model.layers.1.self_attn.k_proj": 5}

# name → build_peft kwargs; every build is made once per test session module
BUILDS = {
    "plain": dict(target_modules=LLAMA_ALL, r=4, lora_alpha=8),
    "rslora": dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, use_rslora=True),
    "patterns": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=4, lora_alpha=8,
                     rank_pattern=PATTERN_RANKS, alpha_pattern=PATTERN_ALPHAS),
    "gpt2_conv1d": dict(arch="gpt2", target_modules=["c_attn", "c_proj", "c_fc"], r=4, lora_alpha=16,
                        fan_in_fan_out=True),
    "embedding": dict(target_modules=["embed_tokens", "q_proj"], r=4, lora_alpha=8),
    "adalora": dict(adalora=True, target_modules=["q_proj", "v_proj"], init_r=6, target_r=2, lora_alpha=4),
    "lora_bias": dict(arch="gpt2", target_modules=["c_attn"], r=4, lora_alpha=8, fan_in_fan_out=True, lora_bias=True),
    "modules_to_save": dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, modules_to_save=["lm_head"]),
    "bin": dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, safe_serialization=False),
    "dora": dict(target_modules=["q_proj", "v_proj", "embed_tokens"], r=4, lora_alpha=8, use_dora=True),
}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build_peft(tmp_path_factory.mktemp(name), **BUILDS[name])
        return cache[name]

    return get


def _expected(layer, adalora: bool) -> dict:
    """What PEFT itself uses for a module: kind, linear-orientation shape, r, α, scale."""
    base = layer.get_base_layer()
    if isinstance(base, torch.nn.Embedding):
        kind, shape = "embedding", tuple(base.weight.shape)  # (vocab, dim)
    else:
        w = tuple(base.weight.shape)
        kind, shape = "linear", (w[::-1] if layer.fan_in_fan_out else w)
    scale = float(layer.scaling["default"])
    if adalora:  # AdaLoRA: ΔW = B (A ⊙ E) · scaling / (ranknum + 1e-5)
        scale = scale / (float(layer.ranknum["default"]) + 1e-5)
    return dict(kind=kind, shape=list(shape), rank=int(layer.r["default"]),
                alpha=float(layer.lora_alpha["default"]), scale=scale)


def _reference_delta(build, name, layer) -> torch.Tensor:
    d = build.delta(name)
    return d.T if getattr(layer, "fan_in_fan_out", False) else d


@pytest.mark.parametrize("kind", [k for k in BUILDS if k != "dora"])
def test_spectra_match_peft_merge(builds, kind):
    b = builds(kind)
    layers = peft_lora_layers(b.model)
    doc = cli_json("rank", b.path)
    got = {m["name"]: m for m in doc["modules"]}
    assert set(got) == set(layers), "module names must be PEFT's, without base_model.model."
    assert not any(n.startswith("base_model.") for n in got)
    for name, layer in layers.items():
        m = got[name]
        want = _expected(layer, adalora=kind == "adalora")
        for field, value in want.items():
            if isinstance(value, float):
                assert m[field] == pytest.approx(value, rel=1e-12), (name, field)
            else:
                assert m[field] == value, (name, field)
        ref = _reference_delta(b, name, layer)
        assert list(ref.shape) == m["shape"]
        sv_close(m["singular_values"], svdvals64(ref), 1e-5)
        assert m["flags"] == []


def test_adapter_block(builds):
    doc = cli_json("rank", builds("rslora").path)
    ad = doc["adapter"]
    assert ad["format"] == "peft" and ad["r"] == 4 and ad["alpha"] == 8 and ad["use_rslora"] is True
    assert ad["use_dora"] is False and ad["peft_type"] == "LORA"
    for m in doc["modules"]:  # rsLoRA: α/√r
        assert m["scale"] == pytest.approx(8 / 2)
    assert cli_json("info", builds("adalora").path)["adapter"]["peft_type"] == "ADALORA"
    assert cli_json("info", builds("dora").path)["adapter"]["use_dora"] is True


def test_rank_and_alpha_patterns_follow_peft(builds):
    b = builds("patterns")
    got = {m.name: m for m in load_adapter(b.path).modules}
    seen_rank = seen_alpha = 0
    for name, layer in peft_lora_layers(b.model).items():
        assert got[name].rank == layer.r["default"]
        assert got[name].alpha == layer.lora_alpha["default"]
        assert got[name].scale == pytest.approx(layer.scaling["default"])
        seen_rank += layer.r["default"] != 4
        seen_alpha += layer.lora_alpha["default"] != 8
    # both the suffix and the full-name keys really applied (2 o_proj + 1 q_proj; 2 v_proj + 1 k_proj)
    assert (seen_rank, seen_alpha) == (3, 3)
    assert got["model.layers.0.self_attn.q_proj"].rank == 6
    assert got["model.layers.1.self_attn.k_proj"].alpha == 5
    assert got["model.layers.0.self_attn.k_proj"].alpha == 8


@pytest.mark.parametrize("name", [
    "model.layers.0.self_attn.o_proj", "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
    "model.layers.10.mlp.down_proj", "o_proj", "xo_proj",
])
def test_pattern_lookup_is_peft_rule(name):
    from peft.utils.other import get_pattern_key

    from lora_inspect.errors import InspectError
    from lora_inspect.validate import compile_pattern

    try:
        compile_pattern("layers\\.1\\d\\..*down_proj", "test")
    except InspectError:
        pytest.skip("validate.compile_pattern does not yet match the safe regex subset")

    pattern = {"proj": 1, "o_proj": 2, "model.layers.0.self_attn.q_proj": 6, "layers\\.1\\d\\..*down_proj": 9}
    key = get_pattern_key(list(pattern), name)
    assert pattern_lookup(pattern, name, -1) == pattern.get(key, -1)


def test_dora_low_rank_part_from_saved_tensors(builds):
    b = builds("dora")
    cfg = json.loads((b.path / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    st = read_st(b.path / "adapter_model.safetensors")
    doc = cli_json("rank", b.path)
    assert doc["adapter"]["use_dora"] is True
    names = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in st if ".lora_" in k}
    assert {m["name"] for m in doc["modules"]} == names
    for m in doc["modules"]:
        key = "base_model.model." + m["name"]
        mag = st[key + ".lora_magnitude_vector"]
        if key + ".lora_embedding_A" in st:  # embedding: ΔW (vocab, dim) = s·(B@A)ᵀ, magnitude per dim
            B, A = st[key + ".lora_embedding_B"], st[key + ".lora_embedding_A"]
            ref = (s * B @ A).T
            assert m["kind"] == "embedding" and mag.shape == (ref.shape[1],)
        else:
            B, A = st[key + ".lora_B.weight"], st[key + ".lora_A.weight"]
            ref = s * B @ A
            assert m["kind"] == "linear" and mag.shape == (ref.shape[0],)
        assert m["scale"] == pytest.approx(s) and m["shape"] == list(ref.shape)
        sv_close(m["singular_values"], svdvals64(ref), 1e-5)
    ad = load_adapter(b.path)
    assert all(mod.is_dora for mod in ad.modules)
    assert torch.equal(torch.from_numpy(ad.module("model.embed_tokens").magnitude()),
                       st["base_model.model.model.embed_tokens.lora_magnitude_vector"].double())
    assert ad.extras == ["base_model.model.model.embed_tokens.base_layer.weight"]


def test_lora_bias_attached_and_merged(builds):
    b = builds("lora_bias")
    ad = load_adapter(b.path)
    assert ad.extras == [], "lora_B.bias belongs to its module, not to the full tensors"
    for mod in ad.modules:
        assert mod.bias_key is not None and mod.bias_key.endswith("lora_B.bias")
        bias_delta = b.merged_state[mod.name + ".bias"] - b.base_state[mod.name + ".bias"]
        assert torch.allclose(mod.scale * torch.from_numpy(mod.bias()), bias_delta.double(), rtol=1e-5, atol=1e-6)


def test_modules_to_save_are_extras_with_exact_params(builds):
    b = builds("modules_to_save")
    doc = cli_json("info", b.path)
    st = read_st(b.path / "adapter_model.safetensors")
    full = sorted(k for k in st if "lora_" not in k)
    assert full == ["base_model.model.lm_head.weight"]
    assert [e["key"] for e in doc["extras"]] == full
    vocab, hidden = b.base_state["lm_head.weight"].shape
    assert doc["extra_params"] == vocab * hidden == st[full[0]].numel()
    assert doc["extras"][0]["bytes"] == vocab * hidden * 4
    assert doc["params"] == sum(v.numel() for k, v in st.items() if "lora_" in k)


def test_embedding_saved_base_layer_is_an_extra(builds):
    b = builds("embedding")
    ad = load_adapter(b.path)
    emb = ad.module("model.embed_tokens")
    assert emb.kind == "embedding"
    st = read_st(b.path / "adapter_model.safetensors")
    assert ad.extras == sorted(k for k in st if "lora_" not in k)
    assert ad.extra_params == sum(st[k].numel() for k in ad.extras)


def test_bin_format_and_analyse_api(builds):
    b = builds("bin")
    assert (b.path / "adapter_model.bin").is_file()
    ad = load_adapter(b.path)
    assert ad.format == "peft" and ad.weights_path.suffix == ".bin"
    rep = analyse(ad, 0.9)
    for r in rep.modules:
        sv_close(r.singular_values, svdvals64(b.delta(r.name)), 1e-5)


# --- bare safetensors (no adapter_config.json) ---------------------------------------------------


def test_bare_safetensors_alpha_unknown(builds, tmp_path):
    b = builds("plain")
    f = tmp_path / "lone" / "adapter_model.safetensors"
    f.parent.mkdir()
    shutil.copy(b.path / "adapter_model.safetensors", f)
    doc = cli_json("rank", f)
    assert doc["adapter"]["format"] == "peft-safetensors"
    assert doc["adapter"]["alpha"] is None and doc["adapter"]["r"] == 4
    assert any("α = r" in n for n in doc["notes"]), doc["notes"]
    layers = peft_lora_layers(b.model)
    for m in doc["modules"]:
        assert m["rank"] == 4 and m["alpha"] == 4 and m["scale"] == 1
        peft_scale = float(layers[m["name"]].scaling["default"])
        sv_close(m["singular_values"], svdvals64(b.delta(m["name"])) / peft_scale, 1e-5)
    # naming the directory instead is refused with the fix: a PEFT directory needs its config
    res = run_cli("info", f.parent)
    assert res.exit_code == 2 and "no adapter_config.json" in res.stderr and res.stdout == ""


def test_bare_safetensors_alpha_from_header(builds, tmp_path):
    b = builds("plain")
    st = {k: v.float() for k, v in read_st(b.path / "adapter_model.safetensors").items()}
    f = tmp_path / "with_meta.safetensors"
    save_file(st, str(f), metadata={"format": "pt", "lora_alpha": "8"})
    doc = cli_json("rank", f)
    assert doc["adapter"]["alpha"] == 8
    assert not any("α = r" in n for n in doc["notes"])
    for m in doc["modules"]:
        assert m["alpha"] == 8 and m["scale"] == 2
        sv_close(m["singular_values"], svdvals64(b.delta(m["name"])), 1e-5)


def test_bare_safetensors_with_config_beside(builds, tmp_path):
    b = builds("patterns")
    f = tmp_path / "weights.safetensors"
    shutil.copy(b.path / "adapter_model.safetensors", f)
    shutil.copy(b.path / "adapter_config.json", tmp_path / "adapter_config.json")
    doc = cli_json("rank", f)
    assert doc["adapter"]["alpha"] == 8
    layers = peft_lora_layers(b.model)
    for m in doc["modules"]:
        assert m["alpha"] == layers[m["name"]].lora_alpha["default"]
        sv_close(m["singular_values"], svdvals64(b.delta(m["name"])), 1e-5)


def test_config_rank_disagreeing_with_shapes_is_refused(builds, tmp_path):
    b = builds("rslora")
    d = tmp_path / "bad"
    shutil.copytree(b.path, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["r"] = 8
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    res = run_cli("rank", d)
    assert res.exit_code == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "stored rank 4" in lines[0] and "r=8" in lines[0]


def test_target_parameters_moe_adapter_is_not_called_unloadable(tmp_path):
    """PEFT's target_parameters (MoE expert weights, ParamWrapper) stores lora_A (r·experts, in): a valid
    adapter that PEFT loads. It must be refused as unsupported, not as "PEFT would refuse to load it"."""
    from peft import LoraConfig, get_peft_model
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2))
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                          target_parameters=["mlp.experts.down_proj"]))
    pm.save_pretrained(str(tmp_path / "moe"))
    res = run_cli("info", tmp_path / "moe")
    assert res.exit_code == 2 and res.stdout == ""
    line = res.stderr.strip()
    assert "target_parameters" in line and "not supported" in line and "refuse to load" not in line


def test_config_without_lora_alpha_uses_peft_default(builds, tmp_path):
    """A hand-written adapter_config.json without lora_alpha: PEFT's LoraConfig default (8) applies, not α = r."""
    from peft import PeftConfig

    b = builds("rslora")  # r=4, rsLoRA
    d = tmp_path / "noalpha"
    shutil.copytree(b.path, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["lora_alpha"] = None
    del cfg["lora_alpha"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    want_alpha = PeftConfig.from_pretrained(str(d)).lora_alpha
    ad = load_adapter(d)
    assert all(m.alpha == want_alpha and abs(m.scale - want_alpha / 2) < 1e-12 for m in ad.modules)  # α/√4
    assert any("lora_alpha" in n for n in ad.notes)
