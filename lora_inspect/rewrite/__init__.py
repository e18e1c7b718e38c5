"""Rewriting adapters: ``truncate`` (best rank-k approximations) and ``rescale`` (strength).

No CLI and no layout knowledge here: :func:`truncate` and :func:`rescale` take a loaded
:class:`~lora_inspect.adapter.Adapter`, hand the layout-specific half (config, ``.alpha`` tensors,
header metadata, file names) to the adapter's :class:`~lora_inspect.formats.layout.Layout`, write the
result atomically, re-read it and check its spectrum (:mod:`.selfcheck`), and return dataclasses
(:mod:`.results`) for the views (:mod:`lora_inspect.views.rewrite`).

- :mod:`.ranks` — rank choice (numpy only): :class:`TruncateSpec`, :func:`choose_ranks`, :func:`greedy_budget_ranks`;
- :mod:`.truncation`, :mod:`.rescaling` — the two operations;
- :mod:`.selfcheck` — write, re-read, compare, commit.
"""

from __future__ import annotations

from ..defaults import SCALE_RANGE
from .ranks import RankChoice, TruncateSpec, choose_ranks, greedy_budget_ranks
from .rescaling import rescale
from .results import ModuleChange, ModuleRescale, RescaleResult, TruncateResult
from .truncation import truncate

__all__ = [
    "TruncateSpec",
    "RankChoice",
    "ModuleChange",
    "ModuleRescale",
    "TruncateResult",
    "RescaleResult",
    "greedy_budget_ranks",
    "choose_ranks",
    "truncate",
    "rescale",
    "SCALE_RANGE",
]
