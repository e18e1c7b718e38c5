"""``--max-size``: one allocation of ranks across all modules under a byte budget.

First pass: each module's leading singular values, up to the most directions the budget could ever
give it (⌊budget / cost⌋, cost = (out + in)·bytes per element). Then the rule ``truncate`` uses
(:func:`lora_inspect.rewrite.ranks.greedy_budget_ranks`): directions taken greedily by σ² per byte,
prefixes only (optimal for the fractional knapsack, Dantzig 1957), and compared with the best single
rank that fits; the one keeping more energy wins. The bytes that do not depend on the ranks — full
tensors carried, the file header and config — are estimated generously first and taken off the budget
(:func:`header_bytes`), so the file written is never larger than SIZE (the tests check it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InspectError
from ..formats.tensors import DTYPE_SIZES
from ..rewrite.ranks import greedy_budget_ranks
from ..units import plural
from . import delta as dw
from .pairs import CheckpointPair, TensorPair

if TYPE_CHECKING:  # pragma: no cover
    from .plan import Plan
    from .results import ExtractSpec

__all__ = ["allocate", "header_bytes", "PER_TENSOR_HEADER", "CONFIG_BYTES"]

PER_TENSOR_HEADER = 112  # bytes of header per tensor beyond the module name: a suffix (".lora_down.weight", a
# PEFT prefix) and '"…":{"dtype":"F32","shape":[…],"data_offsets":[…,…]},' with 12-digit numbers
CONFIG_BYTES = 4096  # adapter_config.json (directory layouts) and the header's metadata, generously


def header_bytes(plan: "Plan", target: str) -> int:
    """A generous estimate of everything in the output that is not factor data."""
    per_module = 3 if target == "kohya" else 2  # A, B (and kohya's .alpha, 4 bytes of data too)
    names = sum(per_module * (len(p.key) + PER_TENSOR_HEADER) + 4 for p in plan.lora)
    names += sum(len(k) + PER_TENSOR_HEADER for k in plan.saved_keys)
    config = CONFIG_BYTES if target in ("peft", "mlx") else 512  # a single file: the header's metadata only
    return 8 + names + config


def _cost(p: TensorPair, dtype_bytes: int) -> int:
    out, inp = p.matrix_shape
    return (out + inp) * dtype_bytes


def allocate(ck: CheckpointPair, lora: list[TensorPair], spec: "ExtractSpec", fixed: int,
             advance: Callable[[int], None]) -> tuple[dict[str, int], dict[str, Any], dict[str, float]]:
    """Per-module ranks (tensor key → k) whose factors fit ``spec.max_bytes − fixed`` (module docstring), the
    facts of the choice, and every module's ‖ΔW‖²_F."""
    from ..convert.run import DTYPES
    from .factors import decompose_pair

    assert spec.max_bytes is not None
    per = DTYPE_SIZES[DTYPES[spec.dtype]]
    budget = spec.max_bytes - fixed
    if budget <= 0:
        raise InspectError(f"--max-size {spec.max_bytes} bytes is smaller than what the output holds regardless "
                           f"of rank ({plural(fixed, 'byte')}: full tensors carried, header and config)")
    costs = [_cost(p, per) for p in lora]
    caps = [min(min(p.matrix_shape), budget // c) for p, c in zip(lora, costs)]
    spectra: list[np.ndarray] = []
    totals: dict[str, float] = {}
    for p, cap in zip(lora, caps):
        d = dw.delta(ck, p, dw.delta_dtype(p, ck.largest_bytes))
        if cap < 1:
            spectra.append(np.zeros(0))
            totals[p.key] = dw.sum_squares(d)
        else:
            dec = decompose_pair(d, p, spec, int(cap), False, "cpu")
            spectra.append(dec.sigma)
            totals[p.key] = dec.total
        del d
        dw.release(ck, p)
        advance(1)
    greedy = greedy_budget_ranks(spectra, costs, [len(s) for s in spectra], float(budget))
    uni_k, uni = _best_uniform(spectra, costs, budget)
    e_g, e_u = _kept(spectra, greedy), _kept(spectra, uni)
    keep = greedy if e_g >= e_u else uni
    if sum(keep) == 0:
        raise InspectError(f"--max-size {spec.max_bytes} bytes keeps no direction of any module (one direction of "
                           f"the smallest module costs {plural(min(costs), 'byte')} after {plural(fixed, 'byte')} "
                           "of header and full tensors)")
    facts = {"bytes": spec.max_bytes, "fixed_bytes": fixed, "for_factors": budget, "chosen":
             "greedy" if e_g >= e_u else "uniform", "greedy_energy": e_g, "uniform_rank_in_budget": uni_k,
             "uniform_energy": e_u}
    return {p.key: k for p, k in zip(lora, keep)}, facts, totals


def _best_uniform(spectra: list[np.ndarray], costs: list[int], budget: int) -> tuple[int, list[int]]:
    best_k, best = 0, [0] * len(spectra)
    top = max((len(s) for s in spectra), default=0)
    for k in range(1, top + 1):
        ks = [min(k, len(s)) for s in spectra]
        if sum(kk * c for kk, c in zip(ks, costs)) > budget:
            break
        best_k, best = k, ks
    return best_k, best


def _kept(spectra: list[np.ndarray], ks: list[int]) -> float:
    return float(sum(np.sum(np.asarray(s[:k], dtype=np.float64) ** 2) for s, k in zip(spectra, ks)))
