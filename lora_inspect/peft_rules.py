"""PEFT's rules, in one place: key prefix, target matching, pattern lookup, scale, default α.

Sources (peft 0.21): ``peft.utils.save_and_load.get_peft_model_state_dict`` (keys are saved under
``base_model.model.`` with the adapter name removed), ``peft.tuners.tuners_utils.check_target_module_exists``
(target matching), ``peft.utils.other.get_pattern_key`` (``rank_pattern``/``alpha_pattern``),
``peft.tuners.lora.layer.LoraLayer.update_layer`` (s = α/r, α/√r with rsLoRA) and
``peft.tuners.adalora.layer`` (s = α/(r + 1e-5)); ``LoraConfig.lora_alpha`` defaults to 8.
See docs/formats.md. Patterns come from files, so they are matched through
:func:`lora_inspect.validate.compile_pattern` (linear time), never with ``re`` on file text.
Torch- and numpy-free.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .validate import compile_pattern

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
    ``"." + entry``; a string must match the whole name (PEFT: ``re.fullmatch``): a plain name is
    compared literally, anything else goes through :func:`~lora_inspect.validate.compile_pattern`
    (linear time; it matches at a ``.`` boundary, which equals ``fullmatch`` for the usual ``.*\\.NAME``
    forms). ``None`` matches nothing: PEFT then takes the targets from its table for the model type,
    which the adapter file does not name."""
    if targets is None:
        return False
    if isinstance(targets, str):
        if _plain(targets):
            return name == targets
        return compile_pattern(targets, where)(name)
    return any(name == t or name.endswith("." + t) for t in targets)


def _plain(key: str) -> bool:
    return bool(key) and all(c.isalnum() or c in "_-" or c == "." for c in key) and not key.startswith(".")


def pattern_lookup(pattern: Mapping[str, Any] | None, name: str, default: Any, where: str = "pattern") -> Any:
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern``: the first key (in dict order) whose pattern
    ``(.*\\.)?KEY$`` matches the name wins (peft.utils.other.get_pattern_key); otherwise ``default``."""
    if pattern:
        for key, value in pattern.items():
            if compile_pattern(key, where)(name):
                return value
    return default


def compiled_patterns(pattern: Mapping[str, Any] | None, where: str) -> list[tuple[Callable[[str], bool], Any]]:
    """Compile every key once (refusing unsafe ones up front); use with :func:`lookup_compiled`."""
    return [(compile_pattern(k, where), v) for k, v in (pattern or {}).items()]


def lookup_compiled(compiled: list[tuple[Callable[[str], bool], Any]], name: str, default: Any) -> Any:
    for match, value in compiled:
        if match(name):
            return value
    return default


def scale_for(alpha: float, rank: int, rslora: bool = False) -> float:
    """PEFT: s = α/r, or α/√r with rsLoRA (Kalajdzievski 2023, 'A Rank Stabilization Scaling Factor')."""
    if rank <= 0:
        return 0.0
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def adalora_scale(alpha: float, rank: int) -> float:
    """peft AdaLoRA: s = α / (ranknum + 1e-5), ranknum = r."""
    return alpha / (rank + ADALORA_EPS)
