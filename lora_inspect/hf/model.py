"""Load a local Hugging Face causal LM and its tokenizer (transformers: the optional ``hf`` extra).

Nothing is downloaded (``local_files_only``). On CPU the model runs in float32 (deterministic: fixed
batch order, no autocast); on a GPU in bfloat16 (the ΔW is still formed in float32 before rounding).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn as nn

from ..errors import InspectError

__all__ = ["is_hf_dir", "require_hf", "HFBase", "load_hf", "linear_modules", "resolve_device"]

OWN_MODEL_TYPE = "lora-inspect"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def is_hf_dir(path: object) -> bool:
    p = Path(str(path))
    try:
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(cfg, dict) or cfg.get("format") == OWN_MODEL_TYPE:
        return False
    mt = cfg.get("model_type")
    return isinstance(mt, str) and bool(mt) and mt != OWN_MODEL_TYPE


def require_hf(what: str):
    """The transformers module, or one line saying which extra to install (:mod:`lora_inspect.optional`)."""
    from ..optional import require

    return require("transformers", what)


def resolve_device(name: str) -> torch.device:
    if name not in ("auto", "cpu", "cuda"):
        raise InspectError(f"device {name!r}: use auto, cpu or cuda")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InspectError("device cuda: no CUDA device is available")
    return torch.device(name)


@dataclass
class HFBase:
    path: Path
    model: nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    context: int  # longest sequence fed to the model


def _context(model: nn.Module) -> int:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 1:
            return min(v, 1024)
    return 1024


def load_hf(path: str | Path, device: str = "auto", *, tokenizer: bool = True) -> HFBase:
    """The model (eval, no grad) and, if asked, its tokenizer, from a local directory."""
    p = Path(str(path))
    if not is_hf_dir(p):
        raise InspectError(f"{p}: not a Hugging Face model directory (config.json with a model_type)")
    tf = require_hf(str(p))
    _quiet(tf)
    dev = resolve_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    tok = None
    if tokenizer:
        if not any((p / f).is_file() for f in TOKENIZER_FILES):
            raise InspectError(f"{p}: no tokenizer ({', '.join(TOKENIZER_FILES[:2])} …); a tokenizer is needed to "
                               "read the text: save one beside the model (tokenizer.save_pretrained)")
        try:
            tok = tf.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except Exception as e:  # transformers raises many kinds
            raise InspectError(f"{p}: no usable tokenizer (save one with the model: tokenizer.save_pretrained; "
                               f"{type(e).__name__})") from None
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, **_dtype_kw(tf, dtype))
    except Exception as e:  # transformers raises many kinds
        first = str(e).splitlines()[0] if str(e) else ""
        raise InspectError(f"{p}: could not load as a Hugging Face causal LM ({type(e).__name__}: {first})") from None
    model.to(dev).eval().requires_grad_(False)
    return HFBase(p, model, tok, dev, dtype, _context(model))


def _quiet(tf) -> None:
    """No loading bars or config warnings from transformers on our stderr."""
    tf.logging.set_verbosity_error()
    tf.logging.disable_progress_bar()


def _dtype_kw(tf, dtype: torch.dtype) -> dict:
    """``dtype=`` (transformers ≥ 4.56) or ``torch_dtype=`` (older)."""
    major, minor = (int(x) for x in re.findall(r"\d+", tf.__version__)[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def linear_modules(model: nn.Module) -> dict[str, tuple[nn.Module, bool]]:
    """{module path: (module, transposed)} for every nn.Linear and GPT-2 Conv1D (weight stored (in, out))."""
    out: dict[str, tuple[nn.Module, bool]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            out[name] = (mod, False)
        elif type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None and mod.weight.dim() == 2:
            out[name] = (mod, True)
    return out


def linear_shape(mod: nn.Module, transposed: bool) -> tuple[int, int]:
    """(out, in) of the layer's linear map."""
    w = cast(torch.Tensor, mod.weight)
    return (int(w.shape[1]), int(w.shape[0])) if transposed else (int(w.shape[0]), int(w.shape[1]))
