"""PEFT's rules, in one place: key prefix, target matching, pattern lookup, scale, default α.

Sources (peft 0.21): ``peft.utils.save_and_load.get_peft_model_state_dict`` (keys are saved under
``base_model.model.`` with the adapter name removed), ``peft.tuners.tuners_utils.check_target_module_exists``
(target matching), ``peft.utils.other.get_pattern_key`` (``rank_pattern``/``alpha_pattern``),
``peft.tuners.lora.layer.LoraLayer.update_layer`` (s = α/r, α/√r with rsLoRA) and
``peft.tuners.adalora.layer`` (s = α/(r + 1e-5)); ``LoraConfig.lora_alpha`` defaults to 8.
See docs/formats.md. Patterns come from files, so they are matched through
:mod:`lora_inspect.validate` (linear time), never with ``re`` on file text.
Torch- and numpy-free.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .validate import compile_fullmatch, compile_pattern_table

__all__ = [
    "PEFT_PREFIX",
    "PEFT_DEFAULT_ALPHA",
    "strip_prefix",
    "target_matches",
    "pattern_lookup",
    "scale_for",
    "adalora_scale",
]

PEFT_PREFIX = "base_model.model."
PEFT_DEFAULT_ALPHA = 8  # peft.LoraConfig.lora_alpha (AdaLoraConfig inherits it)
ADALORA_EPS = 1e-5  # peft AdaLoRA: scaling / (ranknum + 1e-5)


def strip_prefix(name: str) -> str:
    """A saved key or module name without PEFT's ``base_model.model.`` prefix."""
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def target_matches(name: str, targets: str | Iterable[str] | None, where: str = "target_modules") -> bool:
    """PEFT's ``check_target_module_exists``: a list matches a name equal to an entry or ending in
    ``"." + entry``; a string must match the whole name as PEFT's ``re.fullmatch`` does, through
    :func:`~lora_inspect.validate.compile_fullmatch` (linear time; file text never reaches ``re``).
    ``None`` matches nothing: PEFT then takes the targets from its table for the model type, which the
    adapter file does not name."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return compile_fullmatch(targets, where)(name)
    return any(name == t or name.endswith("." + t) for t in targets)


def pattern_lookup(pattern: Mapping[str, Any] | None, name: str, default: Any, where: str = "pattern") -> Any:
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern``: the first key (in dict order) whose pattern
    ``(.*\\.)?KEY$`` matches the name wins (peft.utils.other.get_pattern_key); otherwise ``default``.
    For many names, compile the table once with :func:`compiled_patterns`."""
    return lookup_compiled(compiled_patterns(pattern, where), name, default)


@dataclass(frozen=True)
class CompiledPatterns:
    """A ``rank_pattern``/``alpha_pattern`` compiled once: every key checked (an unsafe one refused) up
    front, and a lookup that does not try the keys one by one (one key per module is common: the table
    of :func:`lora_inspect.validate.compile_pattern_table` keeps that linear)."""

    values: list[Any]
    first_match: Callable[[str], int | None]


def compiled_patterns(pattern: Mapping[str, Any] | None, where: str) -> CompiledPatterns:
    keys = list(pattern or {})
    return CompiledPatterns([pattern[k] for k in keys] if pattern else [], compile_pattern_table(keys, where))


def lookup_compiled(compiled: CompiledPatterns, name: str, default: Any) -> Any:
    if not compiled.values:
        return default
    i = compiled.first_match(name)
    return default if i is None else compiled.values[i]


def scale_for(alpha: float, rank: int, rslora: bool = False) -> float:
    """PEFT: s = α/r, or α/√r with rsLoRA (Kalajdzievski 2023, 'A Rank Stabilization Scaling Factor')."""
    if rank <= 0:
        return 0.0
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def adalora_scale(alpha: float, rank: int) -> float:
    """peft AdaLoRA: s = α / (ranknum + 1e-5), ranknum = r."""
    return alpha / (rank + ADALORA_EPS)
