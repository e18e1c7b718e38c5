"""footprint: exact counts against PEFT and the file, serving and VRAM terms against hand computations."""

import json

import pytest
import torch
from builders import build_peft, run_cli
from safetensors import safe_open

from lora_inspect.analysis import analyse
from lora_inspect.basemodels import load_base
from lora_inspect.footprint import (
    adapter_costs,
    footprint,
    inference_vram,
    layer_paths,
    serving_memory,
    training_vram,
    vllm_pool_bytes,
)
from lora_inspect.formats import load_adapter


@pytest.fixture(scope="module")
def qvd(tmp_path_factory):
    """q,v,down_proj r=8 on tiny Llama; down_proj planted at rank 2."""
    return build_peft(tmp_path_factory.mktemp("qvd"), target_modules=["q_proj", "v_proj", "down_proj"], r=8,
                      lora_alpha=16, planted={r"down_proj": 2})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """all-linear r=4 plus lm_head saved whole (modules_to_save)."""
    return build_peft(tmp_path_factory.mktemp("saved"), target_modules="all-linear", r=4, lora_alpha=8,
                      modules_to_save=["lm_head"])


def _file_counts(path):
    numel, by_dtype = 0, {}
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        for k in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            t = f.get_tensor(k)
            numel += t.numel()
            name = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[t.dtype]
            by_dtype[name] = by_dtype.get(name, 0) + t.numel() * t.element_size()
    return numel, by_dtype


def test_params_match_peft_and_file(qvd, saved):
    for b in (qvd, saved):
        ad = load_adapter(b.path)
        c = adapter_costs(ad)
        trainable, _ = b.model.get_nb_trainable_parameters()
        numel, by_dtype = _file_counts(b.path)
        assert c["trainable_params"] == trainable == numel
        assert c["bytes"] == by_dtype
        assert c["params"] + c["extra_params"] == trainable
    c = adapter_costs(load_adapter(saved.path))
    assert c["extra_params"] == 96 * 32  # lm_head (vocab 96 × hidden 32) saved whole
    # q: (32+32)·8 per layer, v: (16+32)·8, down: (32+56)·8, two layers
    assert adapter_costs(load_adapter(qvd.path))["params"] == 2 * 8 * (64 + 48 + 88)


def test_by_type_and_recommended_rank(qvd):
    ad = load_adapter(qvd.path)
    rep = analyse(ad, 0.95)
    c = adapter_costs(ad, rep)
    assert c["by_type"]["down_proj"]["params"] == 2 * 8 * 88
    # planted rank 2: energy rank ≤ 2, so the per-module cost is at most 2·(out+in) per module
    assert c["by_type"]["down_proj"]["params_pattern"] <= 2 * 2 * 88
    want_pattern = sum(r.energy_rank * (r.module.shape[0] + r.module.shape[1]) for r in rep.modules)
    assert c["recommended"]["params_pattern"] == want_pattern == rep.summary.params.pattern
    assert c["recommended"]["params_uniform"] == rep.summary.params.uniform
    assert c["recommended"]["bytes_pattern"] == 4 * want_pattern  # F32 factors
    assert sum(t["params"] for t in c["by_type"].values()) == c["params"]


def test_vllm_pool_formula():
    b = load_base("llama-2-7b")
    # per layer Σ(in+out): q,k,v,o 4·(4096+4096) + gate,up 2·(11008+4096) + down (4096+11008)
    per_layer = 4 * 8192 + 3 * 15104
    shapes = [(ms.out, ms.inp) for ms in b.modules.values() if ms.layer is not None]
    assert vllm_pool_bytes(shapes, 4, 16, 2) == 4 * 16 * 32 * per_layer * 2 == 319_815_680


def test_serving_memory(saved):
    ad = load_adapter(saved.path)
    s = serving_memory(ad, dtype="bf16", max_loras=2, max_lora_rank=8)
    numel, _ = _file_counts(saved.path)
    assert s["per_adapter_bytes"] == 2 * numel
    own = sum(m.shape[0] + m.shape[1] for m in ad.modules)
    assert s["vllm"]["pool_bytes"] == 2 * 8 * own * 2 and s["vllm"]["fits"]
    assert not serving_memory(ad, max_lora_rank=1)["vllm"]["fits"]
    tiny = serving_memory(ad, load_base("tiny-llama"), max_loras=1, max_lora_rank=16)
    assert tiny["vllm"]["pool_bytes"] == 16 * 2 * 2 * (64 + 48 + 48 + 64 + 88 + 88 + 88)


def test_training_terms_llama2_7b():
    b = load_base("llama-2-7b")
    P = 4_194_304
    tr = training_vram(b, trainable_params=P, targeted={"self_attn.q_proj", "self_attn.v_proj"}, quant="bf16",
                       batch=2, seq=512, adapter_dtype="bf16", grad_checkpointing=False)
    t = {x["name"]: x["bytes"] for x in tr["terms"]}
    assert t["base weights"] == 6_738_415_616 * 2
    assert t["LoRA weights"] == 2 * P and t["LoRA gradients"] == 2 * P and t["optimizer state (adamw)"] == 4 * P
    assert t["activations"] == 34 * 1024 * 4096 * 32  # attention only, bf16 adapters
    assert t["logits (bf16 + fp32 upcast)"] == 1024 * 32000 * 6
    assert t["logits gradient (fp32)"] == 1024 * 32000 * 4
    assert tr["total_bytes"] == sum(t.values())
    fp32 = training_vram(b, trainable_params=P, targeted=set(b.layer_linears()), adapter_dtype="fp32", optimizer="adamw",
                         batch=1, seq=1, grad_checkpointing=True)
    f = {x["name"]: x["bytes"] for x in fp32["terms"]}
    assert f["LoRA weights"] + f["LoRA gradients"] + f["optimizer state (adamw)"] == 16 * P  # 4 + 4 + 8
    assert f["activations: checkpointed layer inputs"] == 2 * 4096 * 32
    assert f["activations: one layer recomputed"] == 68 * 4096  # all linear with fp32 adapters
    s8 = training_vram(b, trainable_params=P, targeted=set(), optimizer="adamw8bit")
    assert {x["name"]: x["bytes"] for x in s8["terms"]}["optimizer state (adamw8bit)"] == 2 * P
    sgd = training_vram(b, trainable_params=P, targeted=set(), optimizer="sgd")
    assert {x["name"]: x["bytes"] for x in sgd["terms"]}["optimizer state (sgd)"] == 0


def test_nf4_and_int8_weights():
    b = load_base("llama-3-8b")
    pc = b.param_counts()
    nf4 = {x["name"]: x["bytes"] for x in training_vram(b, trainable_params=0, targeted=set(), quant="nf4")["terms"]}
    assert nf4["base linear layers (nf4)"] == int(pc["linear"] * 4.127 / 8)
    assert abs(4.127 / 8 - 0.516) < 1e-3
    assert nf4["base embeddings, lm_head, norms (16-bit)"] == 2 * (pc["total"] - pc["linear"])
    assert nf4["dequantized weight (transient)"] == 14336 * 4096 * 2
    i8 = {x["name"]: x["bytes"] for x in training_vram(b, trainable_params=0, targeted=set(), quant="int8")["terms"]}
    assert i8["base linear layers (int8)"] == pc["linear"]


def test_inference_kv_cache():
    assert inference_vram(load_base("llama-2-7b"), adapter_elements=0)["kv_bytes_per_token"] == 512 * 1024
    inf = inference_vram(load_base("llama-3-8b"), adapter_elements=1000, batch=3, seq=100)
    assert inf["kv_bytes_per_token"] == 128 * 1024
    t = {x["name"]: x["bytes"] for x in inf["terms"]}
    assert t["KV cache"] == 300 * 128 * 1024 and t["adapter (unmerged)"] == 2000
    merged = inference_vram(load_base("llama-3-8b"), adapter_elements=1000, merged=True)
    assert {x["name"]: x["bytes"] for x in merged["terms"]}["adapter (merged)"] == 0


def test_layer_paths():
    assert layer_paths(["model.layers.3.self_attn.q_proj", "transformer.h.0.mlp.c_proj", "lm_head"]) == {
        "self_attn.q_proj", "mlp.c_proj"}


def test_footprint_document_uses_adapter_dropout(qvd):
    ad = load_adapter(qvd.path)
    base = load_base("tiny-llama")
    doc = footprint(ad, None, base, dropout=True)
    assert "schema" not in doc and doc["vram"]["training"]["settings"]["dropout"]  # the view adds the schema id
    no = footprint(ad, None, base)  # PEFT's default lora_dropout is 0.0
    assert not no["vram"]["training"]["settings"]["dropout"]
    assert doc["vram"]["training"]["total_bytes"] > no["vram"]["training"]["total_bytes"]
    assert footprint(ad)["vram"] is None
    assert doc["base"]["unmatched_modules"] == 0
    assert footprint(ad, None, load_base("llama-2-7b"))["base"]["unmatched_modules"] == len(ad.modules)


def test_cli_json(qvd):
    r = run_cli("footprint", qvd.path, "--base", "tiny-llama", "--quant", "nf4", "--batch", "2", "--seq", "16",
                "--grad-checkpointing", "--optimizer", "adamw8bit", "--max-loras", "3", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["schema"] == "lora-inspect/footprint/1"
    assert doc["params"] == 2 * 8 * 200 and doc["serving"]["vllm"]["max_loras"] == 3
    tr = doc["vram"]["training"]
    assert tr["total_bytes"] == sum(t["bytes"] for t in tr["terms"])
    assert tr["settings"] == {**tr["settings"], "quant": "nf4", "batch": 2, "seq": 16, "grad_checkpointing": True,
                              "optimizer": "adamw8bit"}
    assert "recommended" in doc and doc["by_type"]["q_proj"]["modules"] == 2


def test_cli_table_and_errors(qvd, tmp_path):
    r = run_cli("footprint", qvd.path)
    assert r.exit_code == 0 and "LoRA total" in r.stdout and "give --base" in r.stdout
    r = run_cli("footprint", qvd.path, "--base", "nope-7b")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert run_cli("footprint", tmp_path / "missing").exit_code == 2
    assert run_cli("footprint", qvd.path, "--quant", "int4").exit_code == 2
    h = run_cli("footprint", "--help")
    assert h.exit_code == 0 and "Examples:" in h.stdout and "--base llama-3-8b" in h.stdout
