"""Counts in words: ``plural(1, "adapter")`` → ``"1 adapter"``, ``plural(3, "adapter")`` → ``"3 adapters"``,
and the verb that goes with them: ``verb(3, "has")`` → ``"have"``.

Every sentence that states a count goes through here, so that "1 adapters" cannot be written.
"""

from __future__ import annotations

__all__ = ["plural", "noun", "verb"]

_NOUNS = {"matrix": "matrices", "index": "indices", "entry": "entries", "directory": "directories"}
_VERBS = {"is": "are", "has": "have", "was": "were", "does": "do"}


def noun(n: int | float, word: str, many: str | None = None) -> str:
    """``word`` as it goes with ``n``: itself for exactly 1, else ``many`` (default: the regular
    plural: ``module`` → ``modules``, ``pass`` → ``passes``, ``entry`` → ``entries``)."""
    if n == 1:
        return word
    if many is not None:
        return many
    if word in _NOUNS:
        return _NOUNS[word]
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in ("a", "e", "i", "o", "u"):
        return word[:-1] + "ies"
    return word + "s"


def verb(n: int | float, word: str) -> str:
    """A verb given in its singular form (``has``, ``is``, ``changes``) as it goes with ``n`` things:
    ``verb(1, "has")`` → ``has``, ``verb(2, "has")`` → ``have``, ``verb(2, "differs")`` → ``differ``."""
    if n == 1:
        return word
    if word in _VERBS:
        return _VERBS[word]
    if word.endswith(("sses", "ches", "shes", "xes")):
        return word[:-2]
    return word[:-1] if word.endswith("s") else word


def plural(n: int | float, word: str, many: str | None = None) -> str:
    """``n`` and ``word`` in agreement: ``plural(1, "module")`` → ``"1 module"``, ``plural(0, "file")`` →
    ``"0 files"``; in a phrase the last word takes the plural (``plural(2, "tensor file")`` →
    ``"2 tensor files"``); ``many`` overrides the plural form of the whole phrase."""
    if many is None:
        head, _, last = word.rpartition(" ")
        form = f"{head} {noun(n, last)}" if head else noun(n, last)
    else:
        form = word if n == 1 else many
    return f"{n:,} {form}" if isinstance(n, int) else f"{n:g} {form}"
