"""Parse the numbers people write in policies: ``20M``, ``4,194,304``, ``1.5GB``, ``512MiB``.

Counts (``--max-params``): a number with an optional decimal suffix ``k`` (10³), ``M`` (10⁶), ``G`` or
``B`` (10⁹, "billion"); thousands separators ``,`` and ``_`` are allowed. Sizes (``--max-size``): a number
with ``B``, decimal ``KB``/``MB``/``GB``/``TB`` (SI, 10³ⁿ) or binary ``KiB``/``MiB``/``GiB``/``TiB``
(IEC 80000-13, 2¹⁰ⁿ); a bare number is bytes. Anything else is an :class:`~lora_inspect.errors.InspectError`
naming what was accepted. The inverse direction too: :func:`fmt_count`, :func:`fmt_bytes`,
:func:`fmt_float` write numbers the way every view shows them, and :func:`plural`, :func:`noun`,
:func:`verb` write a count in words (``1 adapter``, ``3 adapters``, ``3 modules have``): every
sentence that states a count, in any layer, goes through them. Pure: no I/O.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import InspectError

__all__ = ["json_safe", "parse_count", "parse_size", "COUNT_SUFFIXES", "SIZE_SUFFIXES", "fmt_count", "fmt_bytes", "fmt_float",
           "plural", "noun", "verb"]

COUNT_SUFFIXES = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}
SIZE_SUFFIXES = {
    "": 1, "B": 1,
    "KB": 10**3, "kB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
}
_NUM = re.compile(r"^\s*([0-9][0-9_,]*(?:\.[0-9]+)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


def _split(text: str | int | float, what: str, example: str) -> tuple[float, str]:
    if isinstance(text, bool):
        raise InspectError(f"{what}: expected a number, got {text!r}")
    if isinstance(text, (int, float)):
        if not math.isfinite(text) or text < 0:
            raise InspectError(f"{what}: {text!r} must be a non-negative finite number")
        return float(text), ""
    m = _NUM.match(str(text))
    if not m:
        raise InspectError(f"{what}: cannot read {text!r} as a number (examples: {example})")
    digits, suffix = m.groups()
    if "," in digits or "_" in digits:
        groups = re.split(r"[,_]", digits.split(".")[0])
        if any(len(g) != 3 for g in groups[1:]) or not groups[0]:
            raise InspectError(f"{what}: {text!r} has misplaced thousands separators (write 4,194,304)")
        digits = digits.replace(",", "").replace("_", "")
    return float(digits), suffix


def parse_count(text: str | int | float, what: str = "count") -> int:
    """``"20M"`` → 20_000_000; ``"4,194,304"`` → 4194304; ``"1.5k"`` → 1500 (decimal suffixes only)."""
    value, suffix = _split(text, what, "4194304, 4,194,304, 20M, 1.5B")
    if suffix not in COUNT_SUFFIXES:
        raise InspectError(
            f"{what}: unknown suffix {suffix!r} in {text!r} (use k, M, G or B for 10³, 10⁶, 10⁹; sizes belong to --max-size)"
        )
    n = value * COUNT_SUFFIXES[suffix]
    if abs(n - round(n)) > 1e-6 * max(1.0, n):
        raise InspectError(f"{what}: {text!r} is not a whole number of parameters")
    return int(round(n))


def parse_size(text: str | int | float, what: str = "size") -> int:
    """``"100MB"`` → 100_000_000; ``"512MiB"`` → 536_870_912; ``"1.5GB"`` → 1_500_000_000; ``"4096"`` → 4096."""
    value, suffix = _split(text, what, "100MB, 1.5GB, 512MiB, 4096")
    if suffix not in SIZE_SUFFIXES:  # "Mb", "gb" … are refused: bits or bytes is ambiguous
        raise InspectError(
            f"{what}: unknown unit {suffix!r} in {text!r} (use B, KB/MB/GB/TB for 10³ⁿ bytes or KiB/MiB/GiB/TiB for 2¹⁰ⁿ)"
        )
    return int(round(value * SIZE_SUFFIXES[suffix]))


def fmt_count(n: float | int | None) -> str:
    """4194304 → '4.19 M'."""
    if n is None:
        return "-"
    n = float(n)
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g} {unit}" if abs(n) / div < 100 else f"{n / div:.1f} {unit}"
    return f"{int(n)}"


def fmt_bytes(n: float | int | None) -> str:
    """Binary units: 1048576 → '1.00 MiB'."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def fmt_float(x: float | None, digits: int = 3) -> str:
    """``digits`` significant digits; '-' for None, NaN and ±inf."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}g}"


def json_safe(o: Any) -> Any:
    """NaN/inf are not JSON: the same structure with them written as None (null)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    return o


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
