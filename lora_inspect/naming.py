"""Module names in layer order: the one sort key every listing uses (tables and JSON module lists).

``model.layers.2.q_proj`` sorts before ``model.layers.10.q_proj`` (a "natural" sort): digit runs
compare as numbers, everything else as text. The key is built in one pass over the name and never
converts digits to ``int`` (so a name with a 10,000-digit run costs linear time, and Python's
limit on int-string conversion never applies).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TypeVar

__all__ = ["natural_key", "natural_sorted", "names_line"]

_RUNS = re.compile(r"(\d+)")
T = TypeVar("T")


def natural_key(name: str) -> tuple:
    """A sort key: text runs as text, digit runs as (length without leading zeros, digits)."""
    out: list[tuple[int, int, str]] = []
    for i, part in enumerate(_RUNS.split(name)):
        if i % 2:  # a digit run: compare by magnitude, then by the digits themselves
            stripped = part.lstrip("0") or "0"
            out.append((1, len(stripped), stripped))
        elif part:
            out.append((0, 0, part))
    return tuple(out)


def natural_sorted(items: Iterable[T], key=lambda x: x) -> list[T]:
    """``sorted`` in layer order; ``key`` maps an item to its name."""
    return sorted(items, key=lambda x: natural_key(key(x)))


def names_line(names: list[str], limit: int = 3) -> str:
    """``a, b, c, … (5 more)``: the first few names of a list, for one-line messages."""
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")
