"""``check``: the rules a CI gate enforces, and what each serving stack refuses (pure, but :mod:`.config`).

A :class:`Policy` holds the limits (from ``[tool.lora-inspect.check]`` in pyproject.toml and the
command line); :func:`evaluate` turns one adapter into a list of :class:`Result` rows, each naming the
rule, the adapter's value and the limit. Only ``min-energy`` (spectra) and ``integrity`` (values: no
NaN/inf anywhere, no module with an all-zero B) need tensor data; the caller passes them in
(:func:`scan_values`, ``analysis.analyse``) only when those rules are on, so every other rule runs on
the file header alone.
Serving profiles (``vllm``, ``llamacpp``, ``lorax``, ``sglang``, ``ollama``) are in :mod:`.serving`; the
one reader of a policy in pyproject.toml (the only file this package reads) is :mod:`.config`.
"""

from __future__ import annotations

from .config import find_pyproject, read_policy_file
from .policy import POLICY_KEYS, Policy, parse_min_energy, policy_from_table
from .result import Result
from .rules import ValueScan, base_results, evaluate, nonfinite_tensors, scan_values, unreadable_results
from .serving import PROFILES, VLLM_RANKS, parse_serving

__all__ = [
    "VLLM_RANKS", "PROFILES", "Policy", "Result", "parse_min_energy", "parse_serving",
    "policy_from_table", "evaluate", "nonfinite_tensors", "scan_values", "ValueScan", "base_results", "POLICY_KEYS",
    "unreadable_results", "find_pyproject", "read_policy_file",
]
