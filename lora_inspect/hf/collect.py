"""Second moments of the inputs of adapted layers, Σ = XᵀX/n, from one forward pass over text; and, for the
propagated calibration (:mod:`lora_inspect.rewrite.calibrate`), the paired moments of two models run on the
same tokens and the KL between their predictions.

Forward pre-hooks on each adapted layer add xᵀx of the batch's real (unpadded) token rows to a float64
accumulator on the model's device; nothing of size n is kept (streamed), and the memory is in×in per
module whatever the rank: :data:`MAX_MOMENT_BYTES` bounds the total (8 bytes · Σ in²) and a larger
request is refused before anything runs. The adapter being truncated is merged while collecting, so
X is what each layer sees when the adapter is in place (:func:`lora_inspect.hf.apply.merged`).

:class:`ModelCalibration` is what the calibrated truncation asks of a model (the
:class:`~lora_inspect.rewrite.calibrate.CalibrationData` protocol): Σ on the fit part of the text, the
adapted layers grouped in call order (layers fed the same input tensor form one group), for one group the
moments of x (adapter in place) against x̂ (the truncated adapter upstream) — each batch runs twice and
stops at the group (:class:`_Stop` raised from the hook) — and KL(original ‖ candidate) summed per block of
:data:`KL_BLOCK` held-out tokens, the units of the check's paired test. Any model whose forward is given by a :class:`Feed` works: a Hugging Face causal
LM (:func:`hf_feed`) or the project's own models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..arrays import from_torch, to_torch
from ..errors import InspectError
from ..rewrite.calibrate import HeldOutKL
from ..rewrite.whiten import Moments
from .apply import Bound, merged
from .model import linear_modules, linear_shape

__all__ = ["MAX_MOMENT_BYTES", "moment_bytes", "input_moments", "collect_moments", "Feed", "hf_feed", "split_chunks",
           "ModelCalibration", "KL_BLOCK"]

KL_BLOCK = 32  # held-out tokens per unit of the paired test (rewrite.calibrate.significantly_lower)
MAX_MOMENT_BYTES = 8 * 2**30  # 8 GiB of float64 accumulators (e.g. 64 modules with in = 4096 take 8 GiB)


def moment_bytes(in_dims: Iterable[int]) -> int:
    return sum(8 * d * d for d in in_dims)


def collect_moments(model: nn.Module, layers: dict[str, nn.Module], run: Callable[[nn.Module], Iterable[torch.Tensor]],
                    max_bytes: int = MAX_MOMENT_BYTES) -> tuple[dict[str, torch.Tensor], int]:
    """({layer path: Σ float64 on CPU}, rows n of the layer that saw most). ``run(model)`` is a generator that, per batch, yields the
    boolean mask (batch, seq) of the token rows to count (None: every row) and *then* runs that batch's
    forward pass."""
    dims = {name: linear_shape(m, _transposed(m))[1] for name, m in layers.items()}
    need = moment_bytes(dims.values())
    if need > max_bytes:
        big = max(dims, key=lambda k: dims[k])
        raise InspectError(f"calibration would hold {need / 2**30:.1f} GiB of input moments (in×in float64 per module, "
                           f"largest {big} with in = {dims[big]}); the limit is {max_bytes / 2**30:.0f} GiB")
    dev = next(model.parameters()).device
    acc = {name: torch.zeros(d, d, dtype=torch.float64, device=dev) for name, d in dims.items()}
    count = dict.fromkeys(dims, 0)
    mask: list[torch.Tensor | None] = [None]

    def hook(name: str):
        def pre(_mod, args):
            x = args[0].detach()
            keep = mask[0]
            rows = x[keep] if keep is not None and keep.shape == x.shape[:-1] else x.reshape(-1, x.shape[-1])
            rows = rows.to(torch.float64)
            acc[name].addmm_(rows.T, rows)
            count[name] += rows.shape[0]
        return pre

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]
    try:
        with torch.no_grad():
            for keep in run(model):
                mask[0] = keep
    finally:
        for h in handles:
            h.remove()
    unreached = [name for name, c in count.items() if c == 0]
    if unreached:
        raise InspectError(f"the calibration text never reached layer {unreached[0]!r}")
    return {name: (a / count[name]).cpu() for name, a in acc.items()}, max(count.values())


def _transposed(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D"


def input_moments(model: nn.Module, bound: Bound, chunks: list[list[int]], batch: int,
                  progress: Callable[[int], None] | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """{adapter module name: Σ} over the token chunks, with ``bound`` merged; and the token count."""
    from .text import batches

    all_layers = linear_modules(model)
    layers = {p: all_layers[p][0] for p in bound.factors}
    for p in bound.factors:
        linear_shape(*all_layers[p])
    dev = next(model.parameters()).device

    def run(m: nn.Module):
        with merged(m, bound):
            for ids, mask in batches(chunks, batch):
                yield mask.bool().to(dev)
                m(input_ids=ids.to(dev), attention_mask=mask.to(dev))
                if progress is not None:
                    progress(1)

    moments, n = collect_moments(model, layers, run)
    return {bound.modules[p]: s for p, s in moments.items()}, n


Factors = dict[str, tuple[np.ndarray, np.ndarray]]  # adapter module name → (s·B, A), linear orientation, float64


@dataclass
class Feed:
    """Batches for a model: (inputs, row mask (B, T) bool, None for every row); ``forward(model, inputs)`` runs
    one batch and returns its logits (B, T, V)."""

    batches: list[tuple[Any, torch.Tensor | None]]
    forward: Callable[[nn.Module, Any], torch.Tensor]


def hf_feed(chunks: list[list[int]], batch: int, device: torch.device) -> Feed:
    """A Hugging Face causal LM's feed over token chunks (right-padded, padding masked out)."""
    from .text import batches

    items: list[tuple[Any, torch.Tensor | None]] = [((ids.to(device), mask.to(device)), mask.bool().to(device))
                                                    for ids, mask in batches(chunks, batch)]
    return Feed(items, lambda m, x: m(input_ids=x[0], attention_mask=x[1], use_cache=False).logits)


def split_chunks(chunks: list[list[int]], where: str, every: int = 4) -> tuple[list[list[int]], list[list[int]]]:
    """(fit, held out): every ``every``-th chunk is held out (the 4th, 8th, …); with 2 to ``every`` − 1 chunks the
    last one; a single chunk is cut at 3/4 (each part ≥ 2 tokens, else one line refuses)."""
    if len(chunks) >= every:
        return ([c for i, c in enumerate(chunks) if i % every != every - 1], chunks[every - 1 :: every])
    if len(chunks) >= 2:
        return chunks[:-1], chunks[-1:]
    c = chunks[0]
    cut = max(2, len(c) * 3 // 4)
    if len(c) - cut < 2:
        raise InspectError(f"{where}: {len(c)} tokens are too few to hold a part out for the check (at least 4)")
    return [c[:cut]], [c[cut:]]


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """(B, T) → the sums over consecutive blocks of :data:`KL_BLOCK` positions of each row, flattened."""
    pad = (-x.shape[1]) % KL_BLOCK
    return F.pad(x, (0, pad)).reshape(x.shape[0], -1, KL_BLOCK).sum(-1).reshape(-1)


class _Stop(Exception):
    """Raised from a hook once a partial forward pass has seen what it needs."""


def _rows(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    rows = x[keep] if keep is not None and keep.shape == x.shape[:-1] else x.reshape(-1, x.shape[-1])
    return rows.detach().to(torch.float64)


class ModelCalibration:
    """A model, the adapter being truncated (``bound``, the reference) and the two parts of the calibration text
    (module docstring). Implements :class:`lora_inspect.rewrite.calibrate.CalibrationData`."""

    def __init__(self, model: nn.Module, bound: Bound, fit: Feed, held_out: Feed):
        self.model, self.bound, self.fit, self.held_out = model, bound, fit, held_out
        found = linear_modules(model)
        self.layers = {p: found[p][0] for p in bound.factors}
        self.transposed = {p: found[p][1] for p in bound.factors}
        self.path = {name: p for p, name in bound.modules.items()}
        self.tokens = 0

    def _bound(self, factors: Factors) -> Bound:
        return Bound("candidate", {self.path[n]: (to_torch(b), to_torch(a)) for n, (b, a) in factors.items()},
                     {self.path[n]: n for n in factors})

    def moments(self) -> dict[str, np.ndarray]:
        """{module name: Σ} on the fit part, the adapter in place."""
        def run(m: nn.Module):
            with merged(m, self.bound):
                for inputs, keep in self.fit.batches:
                    yield keep
                    self.fit.forward(m, inputs)

        moments, self.tokens = collect_moments(self.model, self.layers, run)
        return {self.bound.modules[p]: from_torch(s) for p, s in moments.items()}

    def stages(self) -> list[list[str]]:
        """Module names in call order (first call), consecutive layers fed the same tensor in one group."""
        order: list[tuple[str, torch.Tensor]] = []
        handles = [m.register_forward_pre_hook(lambda _m, a, p=p: order.append((p, a[0]))) for p, m in self.layers.items()]
        try:
            with torch.no_grad(), merged(self.model, self.bound):
                self.fit.forward(self.model, self.fit.batches[0][0])
        finally:
            for h in handles:
                h.remove()
        groups: list[list[str]] = []
        seen: set[str] = set()
        last: torch.Tensor | None = None
        for p, x in order:
            if p not in seen:
                seen.add(p)
                if groups and x is last:
                    groups[-1].append(self.bound.modules[p])
                else:
                    groups.append([self.bound.modules[p]])
                last = x
        missing = [p for p in self.layers if p not in seen]
        if missing:
            raise InspectError(f"the calibration text never reached layer {missing[0]!r}")
        return groups

    def _inputs(self, paths: list[str], bound: Bound, inputs: Any, keep: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The rows each of ``paths`` sees with ``bound`` merged; the pass stops once all are seen."""
        got: dict[str, torch.Tensor] = {}

        def hook(p: str):
            def pre(_m, args):
                got[p] = _rows(args[0], keep)
                if len(got) == len(paths):
                    raise _Stop
            return pre

        handles = [self.layers[p].register_forward_pre_hook(hook(p)) for p in paths]
        try:
            with torch.no_grad(), merged(self.model, bound):
                self.fit.forward(self.model, inputs)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        if len(got) < len(paths):
            raise InspectError(f"the calibration text never reached layer {next(p for p in paths if p not in got)!r}")
        return got

    def paired(self, names: list[str], done: Factors) -> dict[str, Moments]:
        """Per module of one group: Σ = E[x xᵀ], P = E[x δᵀ], D = E[δ δᵀ] (δ = x − x̂) on the fit part, x with the
        adapter in place, x̂ with ``done`` (the truncated modules upstream; the others absent)."""
        paths = [self.path[n] for n in names]
        current = self._bound(done)
        acc: dict[str, list[torch.Tensor]] = {}
        n = 0
        for inputs, keep in self.fit.batches:
            x, xh = self._inputs(paths, self.bound, inputs, keep), self._inputs(paths, current, inputs, keep)
            for p in paths:
                d = x[p] - xh[p]
                terms = [x[p].T @ x[p], x[p].T @ d, d.T @ d]
                acc[p] = terms if p not in acc else [s + t for s, t in zip(acc[p], terms)]
            n += next(iter(x.values())).shape[0]
        return {self.bound.modules[p]: Moments(*(from_torch((t / n).cpu()) for t in acc[p])) for p in paths}

    def base_weight(self, name: str) -> np.ndarray:
        """The layer's base weight W (out, in), float64 (GPT-2's Conv1D transposed)."""
        p = self.path[name]
        w = cast(torch.Tensor, self.layers[p].weight).detach().to(torch.float64).cpu()
        return from_torch(w.T if self.transposed[p] else w)

    def held_out_kl(self, candidates: Sequence[Factors]) -> HeldOutKL:
        """KL(adapter ‖ candidate), nats, summed per block of ≤ :data:`KL_BLOCK` consecutive held-out tokens of one
        sequence, for each candidate (factors per module; a module absent is not applied)."""
        bounds = [self._bound(c) for c in candidates]
        sums: list[list[torch.Tensor]] = [[] for _ in bounds]
        counts: list[torch.Tensor] = []
        with torch.no_grad():
            for inputs, keep in self.held_out.batches:
                with merged(self.model, self.bound):
                    ref = self._logp(inputs)
                mask = (torch.ones(ref.shape[:2], dtype=torch.bool) if keep is None else keep).to(ref.device)
                counts.append(_blocks(mask.double().cpu()))
                for i, b in enumerate(bounds):
                    with merged(self.model, b):
                        lp = self._logp(inputs)
                    sums[i].append(_blocks(((ref.exp() * (ref - lp)).sum(-1).double() * mask).cpu()))
                    del lp
        n = torch.cat(counts)
        used = n > 0
        return HeldOutKL(np.stack([from_torch(torch.cat(s)[used]) for s in sums]), from_torch(n[used]))

    def _logp(self, inputs: Any) -> torch.Tensor:
        return F.log_softmax(self.held_out.forward(self.model, inputs).float(), dim=-1)

    @property
    def held_out_tokens(self) -> int:
        return sum(int(k.sum()) if k is not None else int(np.prod(x.shape)) for x, k in self.held_out.batches)
