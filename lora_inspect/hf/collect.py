"""Second moments of the inputs of adapted layers, Σ = XᵀX/n, from one forward pass over text.

Forward pre-hooks on each adapted layer add xᵀx of the batch's real (unpadded) token rows to a float64
accumulator on the model's device; nothing of size n is kept (streamed), and the memory is in×in per
module whatever the rank: :data:`MAX_MOMENT_BYTES` bounds the total (8 bytes · Σ in²) and a larger
request is refused before anything runs. The adapter being truncated is merged while collecting, so
X is what each layer sees when the adapter is in place (:func:`lora_inspect.hf.apply.merged`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

from ..errors import InspectError
from .apply import Bound, merged
from .model import linear_modules, linear_shape

__all__ = ["MAX_MOMENT_BYTES", "moment_bytes", "input_moments", "collect_moments"]

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
