"""llama.cpp itself as the oracle for ``convert --to gguf``: a tiny Llama (and Qwen2) base written as GGUF
(tests/gguf_base.py), a real PEFT LoRA on the same transformers model, our GGUF LoRA loaded by
llama.cpp (llama-cpp-python, ``lora_path=``), and llama.cpp's logits compared with PEFT's.

The llama.cpp tests are skipped where llama-cpp-python (built from source) is not installed.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from lora_inspect.convert.gguf_out import read_gguf
from tests.builders import build_peft, edit_peft_tensors, run_cli
from tests.gguf_base import (
    N_VOCAB,
    hf_logits,
    llama_permute,
    llamacpp_logits,
    tiny_llama_config,
    tiny_llama_model,
    write_gguf_base,
)

gguf = pytest.importorskip("gguf")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "plain": dict(r=4, lora_alpha=12, target_modules=TARGETS + ["lm_head"]),  # lm_head → output
    "rslora-patterns": dict(r=4, lora_alpha=8, use_rslora=True,
                            rank_pattern={"q_proj": 6, "model.layers.1.mlp.down_proj": 2},
                            alpha_pattern={"v_proj": 3, "k_proj": 5}),
}
# max |llama.cpp − PEFT| logit (logits up to ~10): float32 both sides, summed in another order (seen: 2e-6 on
# the base, 1.1e-5 with a LoRA); an F16 LoRA also rounds the activations fed to it (seen: 0.036); BF16 has 8
# significant bits (seen: 0.36, of which 0.28 is PEFT's own logits moved by rounding its factors to bf16)
TOL = {"fp32": 1e-4, "fp16": 0.1, "bf16": 0.75}
# the unpermuted-Q/K control (llama; for qwen2 the permuted one) must miss PEFT's logits by more than this
# (seen: 5.5-11)
CONTROL = {"fp32": 1e-3, "fp16": 1.0, "bf16": 4.0}


def _tokens() -> list[int]:
    g = torch.Generator().manual_seed(11)
    return [1] + torch.randint(3, N_VOCAB, (15,), generator=g).tolist()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """arch ("llama" or "qwen2") → its GGUF base, written once per module, config.json beside it."""
    pytest.importorskip("llama_cpp")
    made = {}

    def get(arch: str):
        if arch not in made:
            d = tmp_path_factory.mktemp(f"gguf-{arch}")
            model = tiny_llama_model(0, arch)
            model.config.save_pretrained(d)  # config.json for convert's --base
            made[arch] = write_gguf_base(model, d / "base.gguf")
        return made[arch]

    return get


@pytest.fixture(scope="module")
def base(bases):
    return bases("llama")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_base_gguf_matches_transformers(bases, arch):
    """The oracle's own footing: llama.cpp on our GGUF base gives the transformers model's logits."""
    toks = _tokens()
    got, want = llamacpp_logits(bases(arch), toks), hf_logits(tiny_llama_model(0, arch), toks)
    assert np.abs(want).max() > 1  # logits that are not ~0
    assert np.abs(got - want).max() < TOL["fp32"], np.abs(got - want).max()


def _drop_full_tensors(adapter):
    """PEFT saves the whole lm_head when it is a target (save_embedding_layers); convert refuses full
    tensors, so keep what ``save_pretrained(save_embedding_layers=False)`` writes: the LoRA factors."""
    edit_peft_tensors(adapter, lambda sd: {k: t for k, t in sd.items() if ".lora_" in k})


def _rewrite_lora(src, dst, edit) -> None:
    """Copy a GGUF LoRA as F32, passing its {name: array} through ``edit`` (an independent gguf write)."""
    r = gguf.GGUFReader(str(src))
    tensors = edit({k: np.array(t) for k, t in read_gguf(src)[1].items()})  # BF16 as float32 values
    w = gguf.GGUFWriter(str(dst), arch=r.fields["general.architecture"].contents())
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(r.fields["adapter.lora.alpha"].contents()))
    for name, t in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _unpermute(name: str, b: np.ndarray) -> np.ndarray:
    """Undo LlamaModel.permute on the rows of a Q/K lora_b: the GGUF a naive converter would write."""
    if not name.endswith(("attn_q.weight.lora_b", "attn_k.weight.lora_b")):
        return b
    n = 4 if "attn_q" in name else 2
    return b.reshape(n, b.shape[0] // n // 2, 2, b.shape[1]).swapaxes(1, 2).reshape(b.shape)


def _permute(name: str, b: np.ndarray) -> np.ndarray:
    """LlamaModel.permute on the rows of a Q/K lora_b: what a converter treating qwen2 as llama would write
    (Qwen2Model does not permute; llama.cpp runs qwen2 with NEOX RoPE)."""
    if not name.endswith(("attn_q.weight.lora_b", "attn_k.weight.lora_b")):
        return b
    return llama_permute(torch.from_numpy(b), 4, 4 if "attn_q" in name else 2).numpy()


@pytest.mark.parametrize(("arch", "case", "dtype"), [
    ("llama", "plain", "fp32"), ("llama", "plain", "fp16"), ("llama", "plain", "bf16"),
    ("llama", "rslora-patterns", "fp32"), ("qwen2", "plain", "fp32")])
def test_llamacpp_logits_equal_peft(bases, tmp_path, arch, case, dtype):
    """PEFT on the transformers model vs llama.cpp with our GGUF LoRA on the GGUF base; qwen2 adds q/k/v
    biases (untouched by LoRA) and no Q/K permutation."""
    base = bases(arch)
    kw = {"target_modules": TARGETS, **CASES[case]}
    build = build_peft(tmp_path, model=tiny_llama_model(0, arch), seed=7, std=0.2, **kw)
    _drop_full_tensors(build.path)
    toks = _tokens()
    want = hf_logits(build.model.eval(), toks)
    out = tmp_path / "lora.gguf"
    res = run_cli("convert", build.path, "--to", "gguf", "-o", out, "--base", base.parent, "--dtype", dtype)
    assert res.exit_code == 0, res.output
    assert gguf.GGUFReader(str(out)).fields["general.architecture"].contents() == arch
    got = llamacpp_logits(base, toks, lora_path=out)
    plain = llamacpp_logits(base, toks)
    assert np.abs(plain - want).max() > 0.5  # the adapter matters
    assert np.abs(got - want).max() < TOL[dtype], np.abs(got - want).max()
    # poisoned control: the same LoRA with the other Q/K row order (llama: unpermuted; qwen2: permuted)
    bad = tmp_path / "other-order.gguf"
    _rewrite_lora(out, bad, lambda ts: {k: (_unpermute if arch == "llama" else _permute)(k, t) for k, t in ts.items()})
    assert np.abs(llamacpp_logits(base, toks, lora_path=bad) - want).max() > CONTROL[dtype]
    if dtype == "bf16":  # the BF16 tensors read back as the fp32 ones rounded by torch, bit for bit
        f32 = tmp_path / "lora32.gguf"
        assert run_cli("convert", build.path, "--to", "gguf", "-o", f32, "--base", base.parent).exit_code == 0
        want16 = {k: torch.from_numpy(np.array(t)).to(torch.bfloat16).float() for k, t in read_gguf(f32)[1].items()}
        got16 = read_gguf(out)[1]
        assert {t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors} == {"BF16"}
        assert set(got16) == set(want16) and all(torch.equal(torch.from_numpy(np.array(got16[k])), want16[k])
                                                 for k in want16)


@pytest.mark.parametrize("module", ["lm_head", "embed_tokens"])
def test_refused_when_the_base_ties_embeddings(tmp_path, module):
    """A tied base has no output.weight in its GGUF (llama-cpp-python 0.3.36 loads an output LoRA
    on it and then crashes in decode) and llama.cpp uses token_embd as its output matrix, looking LoRA
    tensors up by name (a token_embd LoRA then fails GGML_ASSERT(ggml_can_mul_mat) in decode): refused
    in one line naming the module, nothing written."""
    build = build_peft(tmp_path, model=tiny_llama_model(0), seed=3, r=2, lora_alpha=4,
                       target_modules=["q_proj", module])
    _drop_full_tensors(build.path)
    cfg = tiny_llama_config()
    cfg.tie_word_embeddings = True
    cfg.save_pretrained(tmp_path / "tied")
    out = tmp_path / "x.gguf"
    res = run_cli("convert", build.path, "--to", "gguf", "-o", out, "--base", tmp_path / "tied")
    assert res.exit_code == 2 and module in res.stderr and "ties" in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and not out.exists()


def _llamacpp_load_log(base, lora) -> str:
    """llama.cpp's log when it loads ``lora`` on ``base``, in a child process: llama-cpp-python 0.3.36 does
    not raise when the adapter is refused and then crashes in decode, so nothing is evaluated."""
    code = ("import sys, llama_cpp; llama_cpp.Llama(sys.argv[1], n_ctx=32, n_threads=1, lora_path=sys.argv[2], "
            "verbose=True).close()")
    res = subprocess.run([sys.executable, "-c", code, str(base), str(lora)], capture_output=True, text=True,
                         timeout=300)
    return res.stdout + res.stderr


def test_embedding_lora_logits_equal_peft(base, tmp_path):
    """PEFT's ``lora_embedding_A (r, vocab)``/``lora_embedding_B (dim, r)`` on embed_tokens: written as
    token_embd ``lora_a`` (vocab, r) = Aᵀ and ``lora_b`` (dim, r) = B, llama.cpp gives PEFT's logits; its own
    rank (6) differs from the global α's so get_scale must take r from lora_b. The linear orientation
    (lora_a (r, dim), lora_b (vocab, r)) is refused by llama.cpp."""
    build = build_peft(tmp_path, model=tiny_llama_model(0), seed=5, std=0.2, r=4, lora_alpha=12,
                       target_modules=["embed_tokens", "q_proj", "down_proj"], rank_pattern={"embed_tokens": 6})
    _drop_full_tensors(build.path)
    toks = _tokens()
    want = hf_logits(build.model.eval(), toks)
    out = tmp_path / "lora.gguf"
    res = run_cli("convert", build.path, "--to", "gguf", "-o", out, "--base", base.parent, "--dtype", "fp32")
    assert res.exit_code == 0, res.output
    shapes = {t.name: tuple(np.array(t.data).shape) for t in gguf.GGUFReader(str(out)).tensors}
    assert shapes["token_embd.weight.lora_a"] == (N_VOCAB, 6) and shapes["token_embd.weight.lora_b"] == (64, 6)
    assert "incorrect shape" not in _llamacpp_load_log(base, out)  # before decoding in this process
    assert np.abs(llamacpp_logits(base, toks) - want).max() > 0.5  # the adapter matters
    got = llamacpp_logits(base, toks, lora_path=out)
    assert np.abs(got - want).max() < TOL["fp32"], np.abs(got - want).max()
    # poisoned control: token_embd in the linear orientation (lora_a = A_canon (r, dim), lora_b = B_canon)
    bad = tmp_path / "linear-orientation.gguf"
    _rewrite_lora(out, bad, lambda ts: {**ts, "token_embd.weight.lora_a": ts["token_embd.weight.lora_b"].T,
                                        "token_embd.weight.lora_b": ts["token_embd.weight.lora_a"].T})
    assert "token_embd.weight' has incorrect shape" in _llamacpp_load_log(base, bad)
