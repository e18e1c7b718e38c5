"""Rank choice for ``truncate`` (numpy only).

Per-module ranks:

- ``rank``: min(K, r);
- ``energy``: the energy rank at τ — smallest k with Σ_{i≤k} σᵢ² ≥ τ·Σ σᵢ² (``spectrum.energy_rank``);
- a budget (parameters or bytes): a knapsack — keep the set of singular directions with the most
  retained energy Σσᵢ² whose cost Σ k_m·(out_m + in_m) fits. Solved greedily by σᵢ²/(out+in) (each
  module's ratios are non-increasing in i, so the greedy picks are prefixes, i.e. ranks). Greedy is
  optimal for the fractional relaxation (Dantzig 1957) and only approximately for the 0/1 problem;
  we therefore also evaluate the best single rank that fits and keep whichever retains more energy,
  so the result is never worse than a uniform rank of equal or smaller size.
- ``uniform``: one stored rank for all modules; modules whose own r is smaller are zero-padded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InspectError, OptionError
from ..formats.tensors import DTYPE_SIZES
from ..spectrum import energy_rank
from ..units import plural

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import Module

__all__ = ["TruncateSpec", "RankChoice", "choose_ranks", "greedy_budget_ranks", "energy_rank"]


def greedy_budget_ranks(spectra: list[np.ndarray], costs: list[int], caps: list[int], budget: float) -> list[int]:
    """Per-module ranks maximising retained Σσ² with Σ k·cost ≤ budget (greedy on σ²/cost; see module doc)."""
    items = []
    for m, (sv, c) in enumerate(zip(spectra, costs)):
        e = np.asarray(sv, dtype=np.float64)[: caps[m]] ** 2
        for i, ei in enumerate(e):
            if ei > 0:
                items.append((-ei / c, m, i))
    items.sort()
    ks = [0] * len(spectra)
    left = budget
    for _, m, i in items:
        if i == ks[m] and costs[m] <= left:  # prefixes only; a skipped item blocks the rest of its module
            ks[m] += 1
            left -= costs[m]
    return ks


def _kept_energy(spectra: list[np.ndarray], ks: list[int]) -> float:
    return float(sum((np.asarray(sv[:k], dtype=np.float64) ** 2).sum() for sv, k in zip(spectra, ks)))


@dataclass
class TruncateSpec:
    """What to keep: exactly one of ``rank``, ``energy``, ``max_params``, ``max_bytes``."""

    rank: int | None = None
    energy: float | None = None
    max_params: int | None = None
    max_bytes: int | None = None
    uniform: bool = False

    def validate(self) -> None:
        given = [n for n, x in (("rank", self.rank), ("energy", self.energy), ("max_params", self.max_params),
                                ("max_bytes", self.max_bytes)) if x is not None]
        if len(given) != 1:
            raise InspectError("give exactly one of rank, energy, max_params, max_bytes"
                               + (f" (got {', '.join(given)})" if given else ""))
        if self.rank is not None and self.rank < 1:
            raise OptionError("rank", f"rank must be ≥ 1, got {self.rank}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise OptionError("energy", f"energy must be in (0, 1], got {self.energy}")
        if self.max_params is not None and self.max_params < 1:
            raise OptionError("max_params", f"max_params must be ≥ 1, got {self.max_params}")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise OptionError("max_bytes", f"max_bytes must be ≥ 1, got {self.max_bytes}")
        if self.uniform and self.rank is not None:
            raise OptionError("uniform", "uniform goes with an energy or a budget (a rank already gives one rank)")

    @property
    def mode(self) -> str:
        if self.rank is not None:
            return "rank"
        if self.energy is not None:
            return "energy"
        return "max_params" if self.max_params is not None else "max_size"


@dataclass
class RankChoice:
    """Directions kept and ranks stored per module (stored ≥ kept when zero-padded to one rank)."""

    keep: list[int]
    stored: list[int]
    facts: dict[str, Any] = field(default_factory=dict)  # budget facts for the JSON document


def _fixed_or_energy(caps: list[int], spectra: list[np.ndarray], spec: TruncateSpec, uniform: bool,
                     one_rank: bool) -> RankChoice:
    if spec.rank is not None:
        keep = [min(spec.rank, c) for c in caps]
        if one_rank:
            return RankChoice(keep, [spec.rank if max(caps) >= spec.rank else max(caps)] * len(caps))
        return RankChoice(keep, keep)
    assert spec.energy is not None
    keep = [min(energy_rank(sv, spec.energy), c) for sv, c in zip(spectra, caps)]
    if uniform:
        k = max(keep + [0])
        if k == 0:
            raise InspectError("every module is all zero: nothing to keep")
        return RankChoice([min(k, c) for c in caps], [k] * len(caps))
    return RankChoice(keep, keep)


def _budget(modules: list["Module"], spec: TruncateSpec, fixed_bytes: int) -> tuple[list[int], float, dict]:
    """(cost of one direction per module, budget) in parameters or bytes."""
    if spec.max_params is not None:
        unit = [1] * len(modules)
        return unit, float(spec.max_params), {"budget": {"params": spec.max_params}}
    assert spec.max_bytes is not None
    unit = [DTYPE_SIZES.get(m.dtype, 4) for m in modules]
    budget = float(spec.max_bytes - fixed_bytes)
    facts = {"budget": {"bytes": spec.max_bytes, "fixed_bytes": fixed_bytes, "for_factors": int(budget)}}
    if budget <= 0:
        raise OptionError(
            "max_bytes", f"a size budget of {plural(spec.max_bytes, 'byte')} is smaller than what every output keeps "
            f"regardless of rank ({plural(fixed_bytes, 'byte')}: full tensors, DoRA magnitudes, biases, alphas and the header)"
        )
    return unit, budget, facts


def choose_ranks(modules: list["Module"], spectra: list[np.ndarray], spec: TruncateSpec, *, fixed_bytes: int = 0,
                 force_uniform: bool = False) -> RankChoice:
    """Kept directions and stored ranks per module for ``spec`` (see the module docstring).
    ``force_uniform``: the layout stores one rank for all modules (mlx-lm)."""
    caps = [m.rank for m in modules]
    uniform = spec.uniform or force_uniform
    if spec.rank is not None or spec.energy is not None:
        return _fixed_or_energy(caps, spectra, spec, uniform, force_uniform)
    unit, budget, facts = _budget(modules, spec, fixed_bytes)
    cost = [(m.shape[0] + m.shape[1]) * u for m, u in zip(modules, unit)]
    if uniform:
        per_rank = sum(cost)
        k = min(int(budget // per_rank) if per_rank else 0, max(caps))
        if k < 1:
            what = "params" if spec.max_params else "bytes"
            raise InspectError(f"the budget does not fit rank 1 in every module (needs {per_rank} {what})")
        return RankChoice([min(k, c) for c in caps], [k] * len(modules), facts)
    greedy = greedy_budget_ranks(spectra, cost, caps, budget)
    best_k, best_uni = 0, [0] * len(modules)  # the best single rank that fits (no padding: min(k, r))
    for k in range(1, max(caps) + 1):
        ks = [min(k, c) for c in caps]
        if sum(kk * cc for kk, cc in zip(ks, cost)) <= budget:
            best_k, best_uni = k, ks
    e_greedy, e_uni = _kept_energy(spectra, greedy), _kept_energy(spectra, best_uni)
    facts.update(greedy_energy=e_greedy, uniform_rank_in_budget=best_k, uniform_energy=e_uni,
                 chosen="greedy" if e_greedy >= e_uni else "uniform")
    keep = greedy if e_greedy >= e_uni else best_uni
    if sum(keep) == 0:
        raise InspectError("the budget is too small to keep a single direction of any module")
    return RankChoice(keep, keep, facts)
