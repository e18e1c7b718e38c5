"""Tiny Llama and Qwen2 base models for llama.cpp, written as GGUF with ``gguf.GGUFWriter``.

Mirrors llama.cpp's HF → GGUF converter for ``LlamaForCausalLM`` (``convert_hf_to_gguf.py`` →
``conversion/base.py · TextModel.set_gguf_parameters`` and ``conversion/llama.py · LlamaModel``, as
vendored by llama-cpp-python 0.3.36): the ``llama.*`` hyperparameter keys, Q/K rows permuted by
``LlamaModel.permute`` (K with the KV head count), tensor names from ``gguf.get_tensor_name_map``, and
the simplest vocabulary llama.cpp's SPM loader accepts (``src/llama-vocab.cpp``: ``<unk>``, ``<s>``,
``</s>`` at ids 0/1/2 and the 256 byte tokens ``<0x00>``…``<0xFF>``, so the newline token exists).

``Qwen2ForCausalLM`` mirrors ``conversion/qwen.py · Qwen2Model``: arch ``qwen2``, the base
``TextModel.set_gguf_parameters`` keys, no Q/K permutation (llama.cpp runs qwen2 with NEOX RoPE, HF's
rotate-half layout), and the q/k/v biases as ``blk.N.attn_{q,k,v}.bias``. llama.cpp's vocabulary loader does
not depend on the architecture, so the same SPM vocabulary serves both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

N_VOCAB = 3 + 256


def tiny_llama_config(layers: int = 2):
    """hidden 64, 4 heads over 2 KV heads (GQA: K is permuted with its own head count), float32."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=N_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])


def tiny_qwen2_config(layers: int = 2):
    """The same shapes as :func:`tiny_llama_config` as a Qwen2 (q/k/v biases, no sliding window), float32."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=N_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False, use_sliding_window=False,
                       architectures=["Qwen2ForCausalLM"])


def tiny_llama_model(seed: int = 0, arch: str = "llama"):
    """The tiny Llama (or Qwen2, ``arch="qwen2"``) with seeded weights large enough that logits are O(1)
    (the default init gives ~0; biases get the same treatment)."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cls, cfg = (Qwen2ForCausalLM, tiny_qwen2_config()) if arch == "qwen2" else (LlamaForCausalLM, tiny_llama_config())
    model = cls(cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else noise / p.shape[-1] ** 0.5)
    return model


def llama_permute(w: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """``conversion/llama.py · LlamaModel.permute`` (HF rotate-half rows → llama.cpp's interleaved RoPE)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _metadata(w, cfg) -> None:
    import gguf

    w.add_name(f"tiny-{cfg.model_type}")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if cfg.model_type == "llama":  # LlamaModel.set_gguf_parameters adds these two; Qwen2Model does not
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def write_gguf_base(model, path: Path) -> Path:
    """Write ``model`` (a transformers ``LlamaForCausalLM`` or ``Qwen2ForCausalLM``) as an F32 GGUF that
    llama.cpp loads; only llama permutes Q/K rows."""
    import gguf

    cfg = model.config
    if cfg.vocab_size != N_VOCAB:
        raise ValueError(f"the GGUF vocabulary has {N_VOCAB} tokens, the model {cfg.vocab_size}")
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[cfg.model_type]
    tmap = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), arch=gguf.MODEL_ARCH_NAMES[arch])
    _metadata(w, cfg)
    for name, t in model.state_dict().items():
        t = t.detach().float()
        if arch == gguf.MODEL_ARCH.LLAMA and name.endswith("q_proj.weight"):
            t = llama_permute(t, cfg.num_attention_heads, cfg.num_attention_heads)
        elif arch == gguf.MODEL_ARCH.LLAMA and name.endswith("k_proj.weight"):
            t = llama_permute(t, cfg.num_attention_heads, cfg.num_key_value_heads)
        gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ValueError(f"no GGUF name for {name}")
        w.add_tensor(gname, np.ascontiguousarray(t.numpy(), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def llamacpp_logits(model_path: Path, tokens: list[int], lora_path: Path | None = None,
                    lora_scale: float = 1.0) -> np.ndarray:
    """llama.cpp's logits (n_tokens, n_vocab) for ``tokens``, with an F32 KV cache, via llama-cpp-python."""
    import llama_cpp

    kw = {"lora_path": str(lora_path), "lora_scale": lora_scale} if lora_path is not None else {}
    llm = llama_cpp.Llama(str(model_path), n_ctx=32, n_batch=32, n_ubatch=32, n_threads=1, n_threads_batch=1,
                          logits_all=True, verbose=False, type_k=llama_cpp.GGML_TYPE_F32,
                          type_v=llama_cpp.GGML_TYPE_F32, **kw)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def hf_logits(model, tokens: list[int]) -> np.ndarray:
    """The transformers (or PEFT-wrapped) model's logits for one sequence, float64 numpy."""
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().numpy()
