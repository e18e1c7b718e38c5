"""Base models and adapter parameter counts without tensors, against transformers and PEFT themselves.

Every expected number here is computed independently: transformers builds the model on the meta device
(no memory) and PEFT's own ``get_nb_trainable_parameters`` counts the LoRA parameters it creates.
"""

import json

import pytest
import torch
from builders import meta_causal_lm

from lora_inspect.basemodels import from_hf_config, load_base, lora_params_for, preset_names, presets
from lora_inspect.errors import InspectError


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-3-8b", "mistral-7b", "qwen2.5-7b", "llama-3.2-1b",
                                  "qwen2.5-0.5b", "gpt2", "tiny-llama", "tiny-gpt2"])
def test_preset_param_totals_match_transformers(name):
    p = presets()[name]
    model = meta_causal_lm(p["config"])
    want = sum(t.numel() for t in model.parameters())
    assert load_base(name).param_counts()["total"] == want == p["params"]


def test_known_totals():
    assert load_base("llama-2-7b").param_counts()["total"] == 6_738_415_616  # 6.74 B
    assert load_base("llama-3-8b").param_counts()["total"] == 8_030_261_248  # 8.03 B
    # metrics.md: bf16 weights 13.48 GB and 16.06 GB
    assert round(load_base("llama-2-7b").param_counts()["total"] * 2 / 1e9, 2) == 13.48
    assert round(load_base("llama-3-8b").param_counts()["total"] * 2 / 1e9, 2) == 16.06


def test_required_presets_exist():
    for n in ["llama-2-7b", "llama-3-8b", "mistral-7b", "qwen2.5-7b", "llama-3.2-1b", "qwen2.5-0.5b", "gpt2", "tiny-llama"]:
        assert n in preset_names()


def _peft_count(config_fields, **lora):
    from peft import LoraConfig, get_peft_model

    model = meta_causal_lm(config_fields)
    pm = get_peft_model(model, LoraConfig(**lora))
    return pm.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("preset,lora,known", [
    ("llama-2-7b", dict(target_modules=["q_proj", "v_proj"], r=8), 4_194_304),
    ("llama-3-8b", dict(target_modules="all-linear", r=8), 20_971_520),
    ("llama-2-7b", dict(target_modules="all-linear", r=8), 19_988_480),
    ("qwen2.5-7b", dict(target_modules="all-linear", r=8), None),
    ("llama-3-8b", dict(target_modules=["q_proj", "o_proj", "lm_head", "embed_tokens"], r=16,
                        rank_pattern={"o_proj": 4, "model.layers.3.self_attn.q_proj": 32}), None),
    ("llama-3-8b", dict(target_modules=["k_proj", "v_proj", "down_proj"], r=4, layers_to_transform=[0, 5, 31]), None),
    ("mistral-7b", dict(target_modules=r".*\.(k|v)_proj", r=4), None),
    ("gpt2", dict(target_modules=["c_attn", "c_proj"], r=4, fan_in_fan_out=True), None),
])
def test_lora_params_without_tensors_match_peft(preset, lora, known):
    want = _peft_count(presets()[preset]["config"], **lora)
    got = lora_params_for(load_base(preset), lora["target_modules"], lora["r"], lora.get("rank_pattern"),
                          lora.get("layers_to_transform"))["params"]
    assert got == want
    if known is not None:
        assert got == known


def test_llama3_r64_and_linearity_in_r():
    b = load_base("llama-3-8b")
    r8 = lora_params_for(b, "all-linear", 8)["params"]
    assert lora_params_for(b, "all-linear", 64)["params"] == 8 * r8 == 167_772_160  # metrics.md: 167.8 M


def test_config_json_file(tmp_path):
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=100, tie_word_embeddings=True)
    cfg.to_json_file(str(tmp_path / "config.json"))
    b = load_base(tmp_path / "config.json")
    assert load_base(tmp_path).hidden == 64  # a directory holding config.json
    assert (b.layers, b.kv_heads, b.head_dim, b.vocab, b.tied_embeddings) == (3, 2, 8, 100, True)
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        m = LlamaForCausalLM(cfg)
    assert b.param_counts()["total"] == sum(p.numel() for p in m.parameters())
    assert b.modules["model.layers.2.self_attn.k_proj"].out == 16


@pytest.mark.parametrize("content,msg", [
    ("{", "not valid JSON"),
    (json.dumps({"model_type": "bert", "hidden_size": 8}), "not supported"),
    (json.dumps({"model_type": "llama", "hidden_size": 8}), "missing"),
    (json.dumps({"model_type": "llama", "hidden_size": -8, "num_attention_heads": 2}), "positive integer"),
])
def test_bad_configs(tmp_path, content, msg):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(InspectError, match=msg):
        load_base(tmp_path / "config.json")


def test_unknown_preset():
    with pytest.raises(InspectError, match="neither a preset"):
        load_base("llama-9-9b")


def test_from_hf_config_gpt2_defaults():
    b = from_hf_config({"model_type": "gpt2", "n_embd": 64, "n_layer": 1, "n_head": 4, "vocab_size": 10})
    assert b.intermediate == 256 and b.tied_embeddings and b.max_positions == 1024


# --- the project's own training base (issue 9, class 7: footprint/check --base refused it) ---------------
from pathlib import Path  # noqa: E402

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


@pytest.mark.parametrize("spec", [SAMPLES / "planted" / "base", SAMPLES / "planted" / "base" / "config.json",
                                  SAMPLES / "planted", SAMPLES / "text" / "base"])
def test_own_training_base_is_read(spec):
    from lora_inspect.train.model import load_model

    b = load_base(spec)
    model = load_model(SAMPLES / "planted" / "base")  # the model itself: counts and shapes to compare with
    assert b.param_counts()["total"] == sum(p.numel() for p in model.parameters())
    linear = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    mods = {n: (ms.out, ms.inp) for n, ms in b.modules.items() if ms.kind == "linear"}
    assert mods == linear
    emb = model.model.embed_tokens.weight.shape
    assert (b.modules["model.embed_tokens"].out, b.modules["model.embed_tokens"].inp) == tuple(emb)
    assert b.model_type == "lora-inspect" and b.max_positions == model.config.max_seq_len


def test_own_training_base_for_a_run_with_gqa(tmp_path):
    from lora_inspect.train.model import ModelConfig, build_model, save_model

    m = build_model(ModelConfig(dim=32, n_heads=4, n_kv_heads=2, hidden_dim=48, n_layers=3, vocab_size=300,
                                tie_word_embeddings=True))
    save_model(m, tmp_path / "base")
    b = load_base(tmp_path / "base")
    assert b.param_counts()["total"] == sum(p.numel() for p in m.parameters())  # tied: lm_head counted once
    assert b.modules["model.layers.2.self_attn.k_proj"].out == 16 and b.kv_heads == 2


@pytest.mark.parametrize("edit,msg", [({"dim": 0}, "dim must be ≥ 1"), ({"n_heads": "4"}, "n_heads must be a number"),
                                      ({"n_kv_heads": 3}, "do not divide evenly"), ({"hidden_dim": 1.5}, "hidden_dim"),
                                      ({"tie_word_embeddings": "no"}, "tie_word_embeddings")])
def test_own_training_base_bad_values(tmp_path, edit, msg):
    cfg = json.loads((SAMPLES / "planted" / "base" / "config.json").read_text())
    cfg.update(edit)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InspectError, match=msg):
        load_base(tmp_path)


def test_footprint_and_check_accept_the_samples_base():
    from builders import run_cli

    res = run_cli("footprint", SAMPLES / "planted", "--base", SAMPLES / "planted" / "base", "--json")
    assert res.exit_code == 0, res.output
    from lora_inspect.train.model import load_model

    base = json.loads(res.stdout)["base"]
    want = sum(p.numel() for p in load_model(SAMPLES / "planted" / "base").parameters())
    assert (base["params"], base["unmatched_modules"], base["model_type"]) == (want, 0, "lora-inspect")
    res = run_cli("check", SAMPLES / "text", "--base", SAMPLES / "text" / "base")
    assert res.exit_code == 0, res.output
