"""GGUF LoRA for llama.cpp, written with the ``gguf`` package (docs/formats.md, "convert").

What llama.cpp checks on load (``src/llama-adapter.cpp``): ``general.type = adapter``,
``general.architecture`` equal to the base's, ``adapter.type = lora``; tensors
``<gguf name>.lora_a`` (numpy (r, in) → ggml ne [in, r]) and ``.lora_b`` ((out, r) → ne [r, out]).
Its scale (``src/llama-adapter.h · get_scale``) is α/r with one global α (``adapter.lora.alpha``)
and r = the tensor's own rank, so s_m·r_m/α is baked into each B. Names come from
``gguf.get_tensor_name_map(arch, n_blocks)`` (``model.layers.3.self_attn.q_proj`` → ``blk.3.attn_q``).
LLaMA-family converters permute Q/K rows (``convert_hf_to_gguf.py · LlamaModel.permute``); the same
permutation is applied to B (A is unchanged), with K using the KV head count.

An embedding LoRA (``token_embd``) is stored the other way round, as llama.cpp's converter writes it
(``convert_lora_to_gguf.py``: ``lora_a = lora_embedding_Aᵀ``): ``lora_a`` numpy (vocab, r) and ``lora_b``
(dim, r), so ``llm_build_inp_embd`` adds ``lora_b @ lora_a[token]`` and ``get_scale`` takes r from ``lora_b``;
``llama-adapter.cpp`` refuses the linear orientation ("incorrect shape"). Found by running llama.cpp
(docs/formats.md, "GGUF output checked against llama.cpp itself").
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import validate as v
from ..arrays import BF16, decode, encode
from ..errors import InspectError
from ..formats.gguf import HEAD_KEYS, MODEL_TYPE_ARCH, PERMUTE_ARCHS
from ..optional import require
from .canon import Canon, CanonModule, times
from .results import ModuleOut
from .writers import record, refuse

__all__ = ["GgufPlan", "plan_gguf", "write_gguf", "read_gguf", "llama_permute", "base_config",
           "config_path", "gguf_factors", "canon_factors"]

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class GgufPlan:
    arch: str
    n_head: int | None
    n_kv_head: int | None
    alpha: float
    tied: bool = False  # the base's lm_head is its embedding matrix (no ``output`` tensor in its GGUF)
    config: str | None = None  # the base config read (for messages), None without one


def config_path(base: Path) -> Path:
    """Where the config of a base given as a directory, a .json file or a weight file is."""
    if base.is_dir():
        return base / "config.json"
    return base if base.suffix == ".json" else base.parent / "config.json"


def base_config(path: Path | None) -> dict | None:
    """The base model's config.json (a directory holding it, the file, or a weight file beside it), read
    through validation; refused in one line naming --base when there is none."""
    if path is None:
        return None
    p = config_path(path)
    if not p.is_file():
        raise InspectError(f"--base {path}: no config.json there (GGUF reads the architecture and head counts "
                           "from it); give --base the model directory or its config.json")
    return v.read_json_object(p)


def _arch(name: str | None, cfg: dict | None, where: str) -> str:
    gguf = require("gguf", "writing GGUF")

    names = set(gguf.MODEL_ARCH_NAMES.values())
    arch_given = name is not None
    if name is None and cfg is not None:
        mt = v.string(cfg, "model_type", where)
        name = MODEL_TYPE_ARCH.get(mt, mt) if isinstance(mt, str) else None
    if name is None:
        raise InspectError("GGUF needs the base model's architecture: give --arch (llama, qwen2 …) or --base "
                           "(the base model's directory, its config.json names it)")
    if name not in names:
        if arch_given:
            raise InspectError(f"--arch {name!r} is not a gguf architecture name (e.g. llama, qwen2, qwen3, gemma2)")
        raise InspectError(f"model_type {name!r} in {where} is not a gguf architecture name: give --arch (e.g. "
                           "llama, qwen2, qwen3, gemma2)")
    return name


def plan_gguf(canon: Canon, arch: str | None, cfg: dict | None, where: str) -> GgufPlan:
    a = _arch(arch, cfg, where)
    nh = nkv = None
    tied = False
    if cfg is not None:
        nh, nkv = _heads(cfg, where)
        tied = v.boolean(cfg, "tie_word_embeddings", where)
    alpha = Counter(m.scale * m.rank for m in canon.modules).most_common(1)[0][0]
    return GgufPlan(a, nh, nkv, float(alpha), tied, where if cfg is not None else None)


def _heads(cfg: dict, where: str) -> tuple[int | None, int | None]:
    """(attention heads, KV heads) from a base config.json, either spelling (:data:`~lora_inspect.formats.gguf.HEAD_KEYS`); KV heads
    default to the heads (no grouped-query attention)."""
    for heads, kv in HEAD_KEYS:
        nh = v.integer(cfg, heads, where, default=None, minimum=1)
        if nh is not None:
            return nh, v.integer(cfg, kv, where, default=None, minimum=1) or nh
    return None, None


def llama_permute(w: np.ndarray, n_head: int, n_kv_head: int | None) -> np.ndarray:
    """``convert_hf_to_gguf.py · LlamaModel.permute`` on the rows of ``w``."""
    if n_kv_head is not None and n_head != n_kv_head:
        n_head = n_kv_head
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _n_blocks(canon: Canon) -> int:
    idx = [int(mt.group(1)) for m in canon.modules for mt in [_LAYER.search(m.path)] if mt]
    return max(idx) + 1 if idx else 1


def gguf_factors(kind: str, b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lora_a, lora_b) as numpy-order tensors for llama.cpp from canonical B (out × r), A (r × in):
    (A, B) for a linear module; for an embedding (ΔW vocab × dim) (B (vocab, r), Aᵀ (dim, r))."""
    return (b, a.T) if kind == "embedding" else (a, b)


def canon_factors(kind: str, lora_a: np.ndarray, lora_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`gguf_factors`: canonical (B, A) from a GGUF's lora_a, lora_b."""
    return (lora_a, lora_b.T) if kind == "embedding" else (lora_b, lora_a)


def _permuted(m: CanonModule, b: np.ndarray, plan: GgufPlan, gname: str) -> tuple[np.ndarray, list[str]]:
    if plan.arch not in PERMUTE_ARCHS or not gname.endswith(("attn_q", "attn_k")):
        return b, []
    if plan.n_head is None:
        found = f"{plan.config} has no num_attention_heads; " if plan.config else ""
        raise refuse("GGUF", m, f"{plan.arch} permutes Q/K rows and needs the head counts: {found}give --base (the "
                     "base model's directory or config.json, with num_attention_heads)")
    kv = plan.n_kv_head if gname.endswith("attn_k") else plan.n_head
    return llama_permute(b, plan.n_head, kv), [f"rows permuted as {plan.arch}'s converter does"]


def _tensors(canon: Canon, plan: GgufPlan) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], list[ModuleOut]]:
    """(GGUF tensor name, lora_a, lora_b) per module, with the records."""
    gguf = require("gguf", "writing GGUF")

    arch_enum = {n: k for k, n in gguf.MODEL_ARCH_NAMES.items()}[plan.arch]
    tmap = gguf.get_tensor_name_map(arch_enum, _n_blocks(canon))
    out, records = [], []
    for m in canon.modules:
        gname = tmap.get_name(m.path, try_suffixes=(".weight",))
        if gname is None:
            raise refuse("GGUF", m, f"no {plan.arch} GGUF tensor name for {m.path!r} (is --arch right?)")
        if gname == "output" and plan.tied:
            # the base GGUF has no output.weight; llama-cpp-python 0.3.36 loads such a LoRA and then crashes
            raise refuse("GGUF", m, "the base ties lm_head to the embeddings: its GGUF has no output tensor to adapt")
        if gname == "token_embd" and plan.tied:
            # llama.cpp then uses token_embd as the output matrix too and applies this LoRA there (GGML_ASSERT)
            raise refuse("GGUF", m, "the base ties lm_head to the embeddings: llama.cpp would apply an embedding "
                         "LoRA to its output matrix too")
        f = m.scale * m.rank / plan.alpha if plan.alpha else m.scale
        b, how = _permuted(m, times(m.b, f), plan, gname)
        if f != 1.0:
            how.insert(0, f"s·r/α = {f:.6g} baked into B (global α {plan.alpha:g})")
        out.append((gname + ".weight", *gguf_factors(m.kind, b, m.a)))
        records.append(record(m, gname + ".weight", m.rank, how))
    return out, records


def write_gguf(canon: Canon, path: Path, plan: GgufPlan, dtype: str) -> list[ModuleOut]:
    """Write ``canon`` as a GGUF LoRA at ``path`` with its factors in ``dtype`` (``"F32"``, ``"F16"`` or ``"BF16"``)."""
    gguf = require("gguf", "writing GGUF")

    if dtype not in ("F32", "F16", "BF16"):
        raise InspectError("GGUF output is written as fp32, fp16 or bf16 (--dtype)")
    tensors, records = _tensors(canon, plan)
    w = gguf.GGUFWriter(str(path), arch=plan.arch)
    try:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, plan.alpha)
        for name, a, b in tensors:
            for suffix, t in ((".lora_a", a), (".lora_b", b)):
                _add(w, name + suffix, np.ascontiguousarray(encode(t, dtype)))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    return records


def _add(w, name: str, t: np.ndarray) -> None:
    """numpy has no bfloat16: a BF16 tensor (:data:`lora_inspect.arrays.BF16` bits) goes in as its uint16 words
    with ``raw_dtype=BF16`` (gguf 0.19)."""
    gguf = require("gguf", "writing GGUF")

    if t.dtype == BF16:
        w.add_tensor(name, t.view(np.uint16), raw_dtype=gguf.GGMLQuantizationType.BF16)
    else:
        w.add_tensor(name, t)


def _array(t) -> np.ndarray:
    """A tensor's values as numpy: GGUFReader (gguf 0.19) gives BF16 data as raw bytes (rows × 2·cols uint8);
    bf16 → float32 is exact (the 16 bits become the float32's high half)."""
    gguf = require("gguf", "reading GGUF")

    if t.tensor_type != gguf.GGMLQuantizationType.BF16:
        return t.data
    return decode(np.ascontiguousarray(t.data).view(BF16))


def read_gguf(path: Path) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    """(metadata fields, tensors by name as float arrays) as ``gguf.GGUFReader`` sees them."""
    gguf = require("gguf", "reading GGUF")

    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items()}
    return fields, {t.name: _array(t) for t in r.tensors}
