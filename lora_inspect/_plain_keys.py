"""PEFT's pattern rule for plain keys, without a regex engine, for one key or for a whole table.

PEFT matches a ``rank_pattern``/``alpha_pattern`` key as ``re.match(rf"(.*\\.)?({key})$", name)``
(peft.utils.other.get_pattern_key). For a *plain* key — letters, digits, ``_``, ``-`` and ``.``, where
``.`` is still a regex wildcard for any character but a newline — that regex says: the key's characters
sit at the end of the name (or just before a final newline), preceded by nothing, or by a ``.`` with no
newline anywhere before it. :func:`plain_matcher` checks exactly that in O(len(name)).

A table of K keys looked up for M names one key at a time costs O(K·M): quadratic for the
``rank_pattern`` that ``truncate`` writes (one key per module). :class:`PatternTable` groups the plain
keys by length and wildcard positions and indexes each group by its literal characters, so a name costs
one dictionary look-up per (``.``-boundary suffix of the name, group of that length); keys that are not
plain are tried in order only while they could still come first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["is_plain", "plain_matcher", "PatternTable"]


def is_plain(key: str) -> bool:
    return bool(key) and all(c.isalnum() or c in "._-" for c in key)


def _ends(name: str) -> tuple[int, ...]:
    """Where ``$`` holds: the end, and before a final newline."""
    return (len(name), len(name) - 1) if name.endswith("\n") else (len(name),)


def plain_matcher(key: str) -> Callable[[str], bool]:
    """``re.match(rf"(.*\\.)?({key})$", name) is not None`` for a plain key."""
    k = len(key)
    has_dot = "." in key

    def match(name: str) -> bool:
        for end in _ends(name):
            start = end - k
            if start < 0:
                continue
            seg = name[start:end]
            if seg != key and not (has_dot and "\n" not in seg and all(a == b or b == "." for a, b in zip(seg, key))):
                continue
            if start == 0 or (name[start - 1] == "." and "\n" not in name[: start - 1]):
                return True
        return False

    return match


def _starts(name: str, end: int) -> list[int]:
    """Starts of the suffixes ``(.*\\.)?`` allows before ``end``: 0, and after each ``.`` that has no
    newline before it."""
    out = [0]
    stop = name.find("\n")
    limit = end if stop < 0 else min(end, stop + 1)
    i = name.find(".", 0, limit)
    while i >= 0:
        out.append(i + 1)
        i = name.find(".", i + 1, limit)
    return out


class PatternTable:
    """The index of the first key (in the given order) whose PEFT pattern matches a name, or None."""

    def __init__(self, keys: Sequence[str], compile_other: Callable[[str], Callable[[str], bool]]):
        # (length, literal spans) → {literal characters: first index}
        self.groups: dict[int, dict[tuple[tuple[int, int], ...], dict[str, int]]] = {}
        self.others: list[tuple[int, Callable[[str], bool]]] = []
        for i, key in enumerate(keys):
            if not is_plain(key):
                self.others.append((i, compile_other(key)))
                continue
            spans = tuple((a, b) for a, b in _literal_spans(key))
            index = self.groups.setdefault(len(key), {}).setdefault(spans, {})
            index.setdefault("".join(key[a:b] for a, b in spans), i)

    def __call__(self, name: str) -> int | None:
        best: int | None = None
        for end in _ends(name):
            for start in _starts(name, end):
                seg = name[start:end]
                by_spans = self.groups.get(len(seg))
                if not by_spans or "\n" in seg:
                    continue
                for spans, index in by_spans.items():
                    hit = index.get("".join(seg[a:b] for a, b in spans))
                    if hit is not None and (best is None or hit < best):
                        best = hit
        for i, match in self.others:
            if best is not None and i > best:
                break
            if match(name):
                return i
        return best


def _literal_spans(key: str) -> list[tuple[int, int]]:
    """Runs of non-``.`` characters of a key, as (start, end) slices."""
    spans, start = [], None
    for i, c in enumerate(key + "."):
        if c != "." and start is None:
            start = i
        elif c == "." and start is not None:
            spans.append((start, i))
            start = None
    return spans
