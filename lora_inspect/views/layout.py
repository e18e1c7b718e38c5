"""Plain-text tables that fit the terminal, without ever hiding a value silently.

Rules, in the order they are applied when a table is wider than the terminal:

1. ``"name"`` columns (module names, paths) are shortened in the middle with ``…`` down to a
   comfortable width that keeps the layer index, the module type and a little context;
   ``"text"`` columns (details, formulas) wrap at spaces.
2. ``optional`` columns are dropped, least important first (for ``rank`` the sparkline), and the
   table says so in one line below it.
3. Names are shortened further, down to ``<layer index>…<module type>``.
4. If the table is still too wide, lines are left longer than the terminal: numbers, shapes and
   flags (``"fixed"`` columns) are never shortened, cut or dropped.

Everything here is linear in the size of the table's text: widths come from one pass over the
cells, the shrink level from a binary search over widths, and shortening a name slices it once
(a 10-million-character module name renders in well under a second).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..adapter import module_type

if TYPE_CHECKING:  # pragma: no cover
    from .render import Table

__all__ = ["render_table", "shorten_name", "compact_name", "wrap_text", "column_kinds", "SEP"]

SEP = "  "  # between columns
ELLIPSIS = "…"
TYPE_CAP = 40  # a module type longer than this is itself shortened in the middle (never happens in real models)
TEXT_MIN = 24  # a wrapped column keeps at least this many characters per line
TEXT_FLOOR = 12  # … and when columns had to be dropped, this many
PATH_MIN = 16  # a path (shortened in the middle) keeps at least this many characters
CONTEXT = 8  # characters of the name's start kept in front of … when there is room
_NUMBER = re.compile(r"[-+(]?[0-9][0-9.,_eE+×@%:/-]*[)B]?")  # 1.96, 4,194,304, 64×176, 0.9@16, 1e-05
_INDEX = re.compile(r"(?:^|(?<=[._]))\d+(?=[._])")


def _middle(s: str, w: int) -> str:
    """``s`` in at most ``w`` characters, … in the middle (w ≥ 3)."""
    if len(s) <= w:
        return s
    w = max(w, 3)
    head = (w - 1) // 2
    return s[:head] + ELLIPSIS + s[len(s) - (w - 1 - head):]


def _parts(name: str) -> tuple[str, str]:
    """(essential tail from the layer index to the end, "<index>…<type>" compact form)."""
    mtype = module_type(name)
    rest = name[: len(name) - len(mtype)]
    idx = None
    for m in _INDEX.finditer(rest):  # the last whole-component digit run before the type: the layer
        idx = m
    short_type = _middle(mtype, TYPE_CAP)
    if idx is None:
        return (mtype if len(mtype) <= TYPE_CAP else short_type), ELLIPSIS + short_type
    essential = name[idx.start():]
    return essential, f"{idx.group()}{ELLIPSIS}{short_type}"


def compact_name(name: str) -> str:
    """The shortest form a name is ever shown in: its layer index and module type."""
    if len(name) <= 3:
        return name
    essential, compact = _parts(name)
    return name if len(name) <= len(compact) else compact


def comfortable_width(name: str) -> int:
    """The width a name shrinks to before optional columns are dropped."""
    essential, compact = _parts(name)
    if len(essential) > TYPE_CAP + 20:  # a pathological name: go straight to the compact form
        return min(len(name), len(compact))
    return min(len(name), len(essential) + 1 + CONTEXT)


def shorten_name(name: str, w: int) -> str:
    """``name`` in ``w`` characters when possible, shortened in the middle with … so that the layer
    index and the module type stay whole: ``base_mod…rs.10.self_attn.q_proj``, then ``10…q_proj``.
    Never shorter than :func:`compact_name`."""
    if len(name) <= w:
        return name
    essential, compact = _parts(name)
    if len(essential) + 1 <= w:
        tail = max(len(essential), w - 1 - min(CONTEXT, (w - 1) // 3))
        return name[: w - 1 - tail] + ELLIPSIS + name[len(name) - tail:]
    return compact if len(compact) < len(name) else name


def _split_long(word: str, w: int) -> tuple[str, str]:
    """The first line of a word longer than ``w``: up to and including its last ``.``, ``_`` or ``/``
    that fits (so a module name breaks between components), else exactly ``w`` characters."""
    head = word[:w]
    cut = max(head.rfind("."), head.rfind("_"), head.rfind("/"))
    if cut >= w // 3:
        return word[: cut + 1], word[cut + 1:]
    return head, word[w:]


def wrap_text(text: str, w: int) -> list[str]:
    """Greedy word wrap at spaces; a word longer than ``w`` (a path, a name) is split across lines
    between its components where possible."""
    if len(text) <= w:
        return [text]
    w = max(w, 1)
    lines: list[str] = []
    cur = ""
    for word in text.split(" "):
        while len(word) > w:
            if cur:
                lines.append(cur)
                cur = ""
            first, word = _split_long(word, w)
            lines.append(first)
        if not cur:
            cur = word
        elif len(cur) + 1 + len(word) <= w:
            cur += " " + word
        else:
            lines.append(cur)
            cur = word
    if cur or not lines:
        lines.append(cur)
    return lines


def column_kinds(t: "Table", cells: list[list[str]]) -> list[str]:
    """The table's kinds, or defaults: the first column is a name, prose (a cell with spaces longer
    than 24 characters) wraps, everything else is fixed."""
    if t.kinds is not None:
        return list(t.kinds)
    kinds = []
    for i in range(len(t.columns)):
        prose = any(i < len(r) and " " in r[i] and len(r[i]) > TEXT_MIN for r in cells)
        kinds.append("name" if i == 0 else ("text" if prose else "fixed"))
    return kinds


class _Col:
    __slots__ = ("index", "header", "kind", "natural", "comfort", "minimum", "width", "right")

    def __init__(self, index: int, header: str, kind: str, values: list[str], right: bool):
        self.index, self.header, self.kind, self.right = index, header, kind, right
        self.natural = max([len(header)] + [len(v) for v in values])
        if kind == "name":
            self.comfort = max([len(header)] + [comfortable_width(v) for v in values])
            self.minimum = max([len(header)] + [min(len(v), len(compact_name(v))) for v in values])
        elif kind == "text":  # its longest word up to TEXT_MIN, shrinking to TEXT_FLOOR; numbers stay whole
            words = [word for v in values for word in v.split(" ")]
            longest = max((len(word) for word in words), default=0)
            number = max((len(word) for word in words if _NUMBER.fullmatch(word)), default=0)
            self.comfort = min(self.natural, max(len(header), min(longest, TEXT_MIN), number))
            self.minimum = min(self.natural, max(len(header), min(longest, TEXT_FLOOR), number))
        elif kind == "path":
            self.comfort = min(self.natural, max(len(header), TEXT_MIN))
            self.minimum = min(self.natural, max(len(header), PATH_MIN))
        else:
            self.comfort = self.minimum = self.natural
        self.comfort = min(self.comfort, self.natural)
        self.minimum = min(self.minimum, self.comfort)
        self.width = self.natural


def _fit(cols: list[_Col], width: int, floor: str) -> bool:
    """Shrink the flexible columns evenly (widest first) so the table fits ``width``, none below its
    ``floor`` ("comfort" or "minimum"); True when it fits."""
    for c in cols:
        c.width = c.natural
    fixed = sum(c.natural for c in cols if c.kind == "fixed") + len(SEP) * (len(cols) - 1)
    flex = [c for c in cols if c.kind != "fixed"]
    if fixed + sum(c.natural for c in flex) <= width:
        return True

    def total(level: int) -> int:
        return sum(max(getattr(c, floor), min(c.natural, level)) for c in flex)

    lo, hi = 0, max((c.natural for c in flex), default=0)
    while lo < hi:  # the largest level whose total fits (binary search: linear overall)
        mid = (lo + hi + 1) // 2
        if fixed + total(mid) <= width:
            lo = mid
        else:
            hi = mid - 1
    for c in flex:
        c.width = max(getattr(c, floor), min(c.natural, lo))
    return fixed + total(lo) <= width


def _plan(cols: list[_Col], optional: Sequence[str], width: int) -> tuple[list[_Col], list[str]]:
    """Which columns to show (and at what widths), and the names of those dropped."""
    kept, dropped = list(cols), list[str]()
    if _fit(kept, width, "comfort"):
        return kept, dropped
    for name in optional:
        c = next((c for c in kept if c.header == name), None)
        if c is None:
            continue
        kept.remove(c)
        dropped.append(name)
        if _fit(kept, width, "comfort"):
            return kept, dropped
    _fit(kept, width, "minimum")
    return kept, dropped


def _cell_lines(value: str, col: _Col) -> list[str]:
    if len(value) <= col.width:
        return [value]
    if col.kind == "name":
        return [shorten_name(value, col.width)]
    if col.kind == "text":
        return wrap_text(value, col.width)
    if col.kind == "path":
        return [_middle(value, col.width)]
    return [value]


def _pad(value: str, col: _Col) -> str:
    return value.rjust(col.width) if col.right else value.ljust(col.width)


def render_table(t: "Table", width: int) -> list[str]:
    """The table as lines of at most ``width`` characters (see the module docstring for when a line
    is longer), a title line first and a note naming dropped columns last."""
    cells = [[str(v) for v in row] for row in t.rows]
    kinds = column_kinds(t, cells)
    just = list(t.justify) if t.justify else ["left"] + ["right"] * (len(t.columns) - 1)
    cols = [_Col(i, str(h), kinds[i], [r[i] for r in cells if i < len(r)], just[i] == "right")
            for i, h in enumerate(t.columns)]
    kept, dropped = _plan(cols, t.optional, width)
    out = [t.title] if t.title else []
    out.append(SEP.join(_pad(c.header, c) for c in kept).rstrip())
    out.append(SEP.join("─" * c.width for c in kept))
    for row in cells:
        parts = [_cell_lines(row[c.index] if c.index < len(row) else "", c) for c in kept]
        for k in range(max(len(p) for p in parts)):
            out.append(SEP.join(_pad(p[k] if k < len(p) else "", c) for p, c in zip(parts, kept)).rstrip())
    if dropped:
        out.extend(wrap_text(f"(not shown at {width} columns: {', '.join(dropped)}; widen the terminal or use --json)",
                             max(width, TEXT_MIN)))
    return out
