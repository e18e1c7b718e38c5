"""Per-module handlers of ``fit``: an ordered list, first match wins (as PEFT's dispatchers and
:func:`lora_inspect.convert.writers.dispatch`). Each takes a canonical module and returns what the
engine can apply (a :class:`Fitted`), or None to pass it on:

1. :func:`drop_kind` — a kind the engine or its layout cannot hold (conv for an LLM server, an embedding
   where the engine has no embedding LoRA): dropped and named with its ‖ΔW‖²;
2. :func:`fold_dora` — DoRA where the engine has no magnitudes: plain LoRA of the effective update
   ΔW_eff = m ⊙ (W + s·BA)/‖W + s·BA‖_row − W at rank R (:func:`lowrank.dora_delta`, needs the base W);
3. :func:`plain` — a B·A pair (LoRA, or the exact LoRA of LoHa/LoKr/Tucker/full): kept when its rank fits,
   else its best rank-R approximation (:func:`lowrank.cut_lowrank`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from ..convert.canon import CanonModule, numbers
from ..errors import InspectError
from ..kinds import Algo, Kind
from .engines import Engine
from .lowrank import Cut, cut_dense, cut_lowrank, difference, dora_delta, energy, optimum
from .results import Action, FitModule

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import Module
    from ..basecheckpoint import BaseCheckpoint
    from ..formats.layout import Layout

__all__ = ["FitContext", "Fitted", "Handler", "HANDLERS", "fit_module", "spectrum_of"]


@dataclass
class FitContext:
    engine: Engine
    layout: "Layout"
    rank: int | None  # R (None: keep every rank)
    base: "BaseCheckpoint | None"
    keep_dora: bool  # the engine applies DoRA magnitudes and the output can hold them
    fan_in_fan_out: bool = False

    def k_for(self, r: int) -> int:
        """The rank a cut keeps: R, else the module's own rank."""
        return r if self.rank is None else self.rank


@dataclass
class Fitted:
    module: CanonModule | None  # what is written (None: dropped)
    report: FitModule


Handler = Callable[[FitContext, CanonModule, "Module"], "Fitted | None"]


def _f64(x: np.ndarray) -> np.ndarray:
    return numbers(x).astype(np.float64)


def spectrum_of(cm: CanonModule) -> np.ndarray:
    """σ of the module's s·B@A (float64, factor space)."""
    from ..spectrum import singular_values

    return singular_values(_f64(cm.b), _f64(cm.a), cm.scale)


def _report(cm: CanonModule, action: Action, sv: np.ndarray, kept: float, k: int, err: float | None,
            opt: float | None, reason: str = "") -> FitModule:
    return FitModule(cm.source_name or cm.name, cm.kind, cm.algo, cm.shape, cm.rank, k, action, energy(sv), kept,
                     err, opt, reason)


def drop_kind(ctx: FitContext, cm: CanonModule, m: "Module") -> Fitted | None:
    caps, eng = ctx.layout.caps, ctx.engine
    why = None
    if cm.kind in (Kind.CONV, Kind.CONV_UNKNOWN) and not (eng.conv and caps.conv):
        why = f"{eng.name} applies no {cm.kind} LoRA"
    elif cm.kind == Kind.EMBEDDING and not (eng.embeddings and caps.embeddings):
        why = f"{eng.name} applies no embedding LoRA"
    if why is None:
        return None
    return Fitted(None, _report(cm, Action.DROPPED, spectrum_of(cm), 0.0, 0, 1.0, None, why))


def _with(cm: CanonModule, cut: Cut) -> CanonModule:
    return replace(cm, b=cut.b, a=cut.a, scale=1.0, magnitude=None, alpha=None, rslora=False, algo=Algo.LORA)


def fold_dora(ctx: FitContext, cm: CanonModule, m: "Module") -> Fitted | None:
    if cm.magnitude is None or (ctx.keep_dora and (ctx.rank is None or cm.rank <= ctx.rank)):
        return None
    if ctx.base is None:  # fit checks this before anything is read; a library caller gets the same line
        raise InspectError(f"module {cm.source_name!r} is DoRA: folding it into plain LoRA needs the base weights "
                           "(--base DIR)")
    bt = ctx.base.locate(m, ctx.fan_in_fan_out)
    w = ctx.base.weight(bt, np.float64)
    d = dora_delta(w, _f64(cm.b), _f64(cm.a), cm.scale, cm.magnitude)
    k = min(ctx.k_for(cm.rank), min(d.shape))
    cut = cut_dense(d, k)
    err = float(np.linalg.norm(d - cut.b @ cut.a))
    total = float(np.linalg.norm(d))
    rel = 0.0 if not total > 0 else err / total
    return Fitted(_with(cm, cut), _report(cm, Action.FOLDED, cut.sv, energy(cut.sv[:k]), k, rel, optimum(cut.sv, k),
                                          "m ⊙ (W + s·BA)/‖W + s·BA‖_row − W, best rank"))


def plain(ctx: FitContext, cm: CanonModule, m: "Module") -> Fitted | None:
    exact = Action.KEPT if cm.algo == Algo.LORA else Action.AS_LORA
    if ctx.rank is None or cm.rank <= ctx.rank:
        sv = spectrum_of(cm)
        return Fitted(cm, _report(cm, exact, sv, energy(sv), cm.rank, 0.0, 0.0))
    b, a = _f64(cm.b), _f64(cm.a)
    cut = cut_lowrank(b, a, cm.scale, ctx.rank)
    k = cut.rank
    total = energy(cut.sv)
    rel = 0.0 if not total > 0 else difference(b, a, cm.scale, cut.b, cut.a, 1.0) / total ** 0.5
    action = Action.TRUNCATED if cm.algo == Algo.LORA else Action.AS_LORA
    how = f"best rank {k} of r={cm.rank}" + ("" if cm.algo == Algo.LORA else f" ({cm.algo} as exact LoRA first)")
    kept_sv = cut.sv[:k]
    return Fitted(_with(cm, cut), _report(cm, action, cut.sv, energy(kept_sv), k, rel, optimum(cut.sv, k), how))


HANDLERS: tuple[Handler, ...] = (drop_kind, fold_dora, plain)


def fit_module(ctx: FitContext, cm: CanonModule, m: "Module", handlers: Sequence[Handler] = HANDLERS) -> Fitted:
    """The first handler's answer for ``cm`` (``m`` is the adapter's module it was read from)."""
    for handler in handlers:
        got = handler(ctx, cm, m)
        if got is not None:
            return got
    raise InspectError(f"module {cm.source_name!r}: no fit handler takes it")  # pragma: no cover
