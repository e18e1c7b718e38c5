"""Full tensors of the source (``modules_to_save``, a whole lm_head or embedding) under ``fit``:

- carried as they are when the engine takes them (vLLM: ``classifier``/``score``, ``vllm/lora/peft_helper.py``);
- with ``--base``, the dense delta W_saved − W becomes a LoRA at rank R (an embedding LoRA for an input
  embedding where the engine has one, a linear LoRA for lm_head and other linear weights);
- otherwise dropped and named (without ``--base`` its ‖ΔW‖² is unknown and said so).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..adapter import module_type
from ..checks.serving import extra_module
from ..convert.canon import CanonModule
from ..kinds import Algo, Kind
from ..peft_rules import strip_prefix
from .handlers import FitContext, Fitted
from .lowrank import cut_dense, energy, optimum
from .results import Action, FitModule

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import Adapter

__all__ = ["fit_extras", "EMBEDDING_NAMES"]

# input embeddings (an nn.Embedding: ΔW (num_embeddings, dim) as stored); every other 2-D full tensor is Linear
EMBEDDING_NAMES = frozenset({"embed_tokens", "wte", "wpe", "word_embeddings", "tok_embeddings", "embed_in"})


def _dropped(name: str, shape: tuple[int, ...], why: str, energy_: float | None = None) -> Fitted:
    sh = (int(shape[0]), int(np.prod(shape[1:]))) if len(shape) > 1 else (int(shape[0]) if shape else 0, 1)
    return Fitted(None, FitModule(name, Kind.LINEAR, Algo.FULL, sh, 0, 0, Action.DROPPED, energy_, 0.0,
                                  1.0 if energy_ is not None else None, None, why))


def _delta(ctx: FitContext, ad: "Adapter", key: str, name: str) -> tuple[np.ndarray | None, str]:
    """(W_saved − W in float64, "") or (None, why not)."""
    assert ctx.base is not None
    base_key = ctx.base.key_for(name)
    if base_key is None:
        return None, f"the base has no weight {name}.weight"
    p, file_key = ctx.base.files[base_key]
    w = ctx.base.source(p).get(file_key)
    saved = ad.source.get(key)
    if tuple(w.shape) != tuple(saved.shape):
        return None, (f"{'×'.join(map(str, saved.shape))} here, {'×'.join(map(str, w.shape))} in the base "
                      "(a resized vocabulary?)")
    return saved.astype(np.float64) - w.astype(np.float64), ""


def _one(ctx: FitContext, ad: "Adapter", key: str) -> tuple[Fitted, str | None]:
    """(what became of full tensor ``key``, the key when it is carried as it is)."""
    name = extra_module(key)
    kind_name = module_type(name)
    shape = tuple(ad.source.info(key).shape)
    if kind_name in ctx.engine.saved_modules:
        sh = (int(shape[0]), int(np.prod(shape[1:]))) if len(shape) > 1 else (int(shape[0]) if shape else 0, 1)
        return Fitted(None, FitModule(name, Kind.LINEAR, Algo.FULL, sh, 0, 0, Action.CARRIED, None, 0.0, 0.0, 0.0,
                                      f"{ctx.engine.name} takes {kind_name} as a full tensor")), key
    if not key.endswith(".weight") or len(shape) != 2:
        return _dropped(name if key.endswith(".weight") else key, shape,
                        f"a full {'bias' if key.endswith('.bias') else 'tensor'}: no LoRA holds it"), None
    copy = key.endswith(".base_layer.weight")  # PEFT's save_embedding_layers: the base weight beside an embedding LoRA
    shown = strip_prefix(key) if copy else name
    if ctx.base is None:
        return _dropped(shown, shape, ("the base weight PEFT saves beside an embedding LoRA (save_embedding_layers); "
                                       "whether it differs from the base needs --base") if copy
                        else "a full tensor: its ΔW (and share) needs --base"), None
    d, why = _delta(ctx, ad, key, name)
    if d is None:
        return _dropped(shown, shape, why), None
    if copy and not d.any():
        return _dropped(shown, shape, "the base weight PEFT saves beside an embedding LoRA: equal to the base, "
                                      "nothing lost", 0.0), None
    kind = Kind.EMBEDDING if kind_name in EMBEDDING_NAMES else Kind.LINEAR
    if kind == Kind.EMBEDDING and not (ctx.engine.embeddings and ctx.layout.caps.embeddings):
        return _dropped(name, shape, f"{ctx.engine.name} applies no embedding LoRA",
                        float((d ** 2).sum())), None
    k = min(ctx.k_for(ad.r or 16), min(d.shape))
    cut = cut_dense(d, k)
    total = float(np.linalg.norm(d))
    rel = 0.0 if not total > 0 else float(np.linalg.norm(d - cut.b @ cut.a)) / total
    cm = CanonModule(None, name, kind, cut.b, cut.a, 1.0, source_name=name)
    rep = FitModule(name, kind, Algo.FULL, (int(d.shape[0]), int(d.shape[1])), 0, k, Action.FACTORED, energy(cut.sv),
                    energy(cut.sv[:k]), rel, optimum(cut.sv, k), f"W_saved − W at rank {k}")
    return Fitted(cm, rep), None


def fit_extras(ctx: FitContext, ad: "Adapter") -> tuple[list[Fitted], list[str]]:
    """What becomes of every full tensor of ``ad``, and the keys carried unchanged."""
    out, carried = [], []
    for key in ad.extras:
        fitted, keep = _one(ctx, ad, key)
        out.append(fitted)
        if keep is not None:
            carried.append(keep)
    return out, carried
