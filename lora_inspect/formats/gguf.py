"""GGUF LoRA for llama.cpp, as a ``convert`` target (``--to gguf``); GGUF adapters are not read.

The container, names, orientation and scale rule are llama.cpp's (:mod:`lora_inspect.convert.gguf_out`:
one α in the header, s·r/α baked into each B, Q/K rows permuted for LLaMA-family bases); the write is
checked by reading the file back with ``gguf.GGUFReader`` (:func:`lora_inspect.convert.run.write_gguf_checked`).
What it can hold: linear and embedding LoRA of one model, no DoRA, one α. A merge is not written as GGUF
(its writer needs the base model's architecture and head counts; ``merge --base`` reads them only for its
GGUF inputs).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .capabilities import AlphaHome, Capabilities, Models
from .layout import Converted, Found, Layout, WriteOptions

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import Adapter
    from ..convert.canon import Canon

__all__ = ["GgufLayout"]


# archs whose HF → GGUF converter subclasses LlamaModel and permutes Q/K rows (convert_hf_to_gguf.py): one home
# for the writer (convert/gguf_out.py) and the reader (gguf_read.py)
PERMUTE_ARCHS = frozenset({"llama", "mistral", "granite", "granitemoe"})
# HF model_type → GGUF arch where they differ; "lora-inspect" is this project's training base
# (lora_inspect.train.model: Llama blocks, HF's rotate-half RoPE, Llama's module names)
MODEL_TYPE_ARCH = {"mistral": "llama", "mixtral": "llama", "lora-inspect": "llama"}
# (heads, KV heads) keys of a base's config.json: Hugging Face's, then this project's (lora-inspect/model/1)
HEAD_KEYS = (("num_attention_heads", "num_key_value_heads"), ("n_heads", "n_kv_heads"))

class GgufLayout(Layout):
    name = "gguf"
    label = "GGUF"
    target: str | None = "gguf"
    merge_target = False
    file_suffix = ".gguf"
    caps = Capabilities(per_module_rank=True, per_module_alpha=False, dora=False, conv=False, embeddings=True,
                        models=Models.ONE, alpha=AlphaHome.HEADER,
                        why=(("dora", "DoRA (llama.cpp has no magnitude vectors)"),
                             ("conv", "{kind} LoRA is not written to GGUF here")))

    def matches(self, keys: list[str], found: Found) -> bool:
        return False  # this entry writes; reading is GgufReadLayout's (formats/gguf_read.py), its subclass

    def write_converted(self, canon: "Canon", out: Path, opts: WriteOptions) -> Converted:
        from ..convert.run import write_gguf_checked

        return write_gguf_checked(canon, out, opts)

    def default_dtype(self, source: str) -> str:
        return "fp16" if source == "bf16" else source  # a bf16 source is written fp16 unless --dtype bf16 is asked

    def locate_base(self, ad: "Adapter", base: Path | None) -> Path | None:
        """``--base``, else the base model the adapter names when it is a directory or config on disk."""
        from ..convert.gguf_out import config_path

        if base is not None or not ad.base_model:
            return base
        home = Path(ad.path) if Path(ad.path).is_dir() else Path(ad.path).parent
        cand = Path(ad.base_model) if Path(ad.base_model).is_absolute() else home / ad.base_model
        return cand if cand.exists() and config_path(cand).is_file() else None  # a folder with a config
