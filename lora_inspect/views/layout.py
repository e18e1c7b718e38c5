"""Plain-text tables that fit the terminal, without ever hiding a value silently.

Rules, in the order they are applied when a table is wider than the terminal:

1. Headers wrap at their spaces onto more lines (``energy kept`` over two): nothing is lost.
2. ``"name"`` columns (module names, paths) are shortened in the middle with ``…`` down to a
   comfortable width that keeps the layer index, the module type and a little context;
   ``"text"`` columns (details, formulas) wrap at spaces (a word longer than the column breaks
   after a ``.``, ``_``, ``/`` or ``,``).
3. ``optional`` columns are dropped, least important first (for ``rank`` the sparkline), and the
   table says so in one line below it.
4. Names are shortened further, down to ``<layer index>…<module type>``.
5. If the table is still too wide, lines are left longer than the terminal: numbers, shapes and
   flags (``"fixed"`` columns) are never shortened, cut or dropped.

A cell may hold :data:`GLUE` (a no-break space) where a wrap must not fall, between a number and
its unit (``15.4 k``); it is written as a plain space. Space left over after the columns fit goes
back to headers, so a header is wrapped only where the room was needed.

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

__all__ = ["render_table", "shorten_name", "compact_name", "wrap_text", "wrap_prose", "column_kinds", "glue",
           "SEP", "GLUE"]

SEP = "  "  # between columns
ELLIPSIS = "…"
GLUE = "\u00a0"  # a space no wrap may fall on (a number and its unit); written as " "
INDENT = "  "  # continuation lines of a wrapped sentence
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


def glue(text: str) -> str:
    """``text`` with its spaces made unbreakable (a number and its unit: ``glue("15.4 k")``)."""
    return text.replace(" ", GLUE)


def _split_long(word: str, w: int) -> tuple[str, str]:
    """The first line of a word longer than ``w``: up to and including its last ``/`` that fits (a path
    breaks between folders), else its last ``.`` or ``,`` (a module name between components, a list
    after a comma), else its last ``_`` (``down_`` | ``proj`` only when no component boundary fits),
    else exactly ``w`` characters."""
    head = word[:w]
    for cut in (head.rfind("/"), max(head.rfind("."), head.rfind(",")), head.rfind("_")):
        if cut >= w // 3:
            return word[: cut + 1], word[cut + 1:]
    return head, word[w:]


def wrap_text(text: str, w: int, later: int | None = None) -> list[str]:
    """Greedy word wrap at spaces; a word longer than its line (a path, a name) is split across lines
    between its components where possible. ``later``: the width of every line after the first
    (default ``w``)."""
    if len(text) <= w:
        return [text]
    first, rest = max(w, 1), max(later if later is not None else w, 1)
    lines: list[str] = []
    cur = ""
    for word in text.split(" "):
        if cur and len(cur) + 1 + len(word) <= (rest if lines else first):
            cur += " " + word
            continue
        if cur:
            lines.append(cur)
        while len(word) > (rest if lines else first):
            head, word = _split_long(word, rest if lines else first)
            lines.append(head)
        cur = word
    if cur or not lines:
        lines.append(cur)
    return lines


def wrap_prose(text: str, width: int) -> list[str]:
    """A sentence (a summary line, a warning) in lines of at most ``width`` characters, wrapped at
    spaces; continuation lines are indented by two spaces so that each sentence's start stands out."""
    if len(text) <= width:
        return [text]
    lead = len(text) - len(text.lstrip(" "))
    if width - lead < TEXT_FLOOR:  # no room for the text's own indent: it goes
        lead = 0
    pad = " " * lead + (INDENT if width - lead - len(INDENT) >= TEXT_FLOOR else "")
    lines = wrap_text(text[lead:].lstrip(" "), max(width - lead, 1), max(width - len(pad), 1))
    return [" " * lead + lines[0]] + [pad + ln for ln in lines[1:]]


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
    """One column's widths: ``natural`` (everything on one line), ``snug`` (the header wrapped at its
    spaces, no cell touched), ``comfort`` and ``minimum`` (how far names shorten and text wraps)."""

    __slots__ = ("index", "header", "kind", "natural", "snug", "comfort", "minimum", "width", "right")

    def __init__(self, index: int, header: str, kind: str, values: list[str], right: bool):
        self.index, self.header, self.kind, self.right = index, header, kind, right
        head = max((len(word) for word in header.split(" ")), default=0)  # a header wraps at its spaces
        cells = max((len(v) for v in values), default=0)
        self.natural = max(len(header), cells)
        self.snug = max(head, cells)
        if kind == "name":
            self.comfort = max([head] + [comfortable_width(v) for v in values])
            self.minimum = max([head] + [min(len(v), len(compact_name(v))) for v in values])
        elif kind == "text":  # TEXT_MIN characters a line (a shorter cell is not wrapped), then its longest
            words = [word for v in values for word in v.split(" ")]  # word up to TEXT_FLOOR; numbers stay whole
            longest = max((len(word) for word in words), default=0)
            number = max((len(word) for word in words if _NUMBER.fullmatch(word.replace(GLUE, " "))), default=0)
            self.comfort = max(head, min(cells, TEXT_MIN), number)
            self.minimum = max(head, min(longest, TEXT_FLOOR), number)
        elif kind == "path":
            self.comfort = max(head, min(cells, TEXT_MIN))
            self.minimum = max(head, min(cells, PATH_MIN))
        else:  # fixed: only the header gives way
            self.comfort = self.minimum = self.snug
        self.comfort = min(self.comfort, self.snug)
        self.minimum = min(self.minimum, self.comfort)
        self.width = self.natural


def _total(cols: list[_Col]) -> int:
    return sum(c.width for c in cols) + len(SEP) * (len(cols) - 1)


def _fit(cols: list[_Col], width: int, floor: str) -> bool:
    """Wrap headers, then shrink the flexible columns evenly (widest first) so the table fits
    ``width``, none below its ``floor`` ("comfort" or "minimum"); True when it fits. Room left over
    unwraps headers again, left to right."""
    for c in cols:
        c.width = c.natural
    if _total(cols) <= width:
        return True
    for c in cols:
        c.width = c.snug
    flex = [c for c in cols if c.kind != "fixed"]
    fixed = _total(cols) - sum(c.width for c in flex)

    def total(level: int) -> int:
        return sum(max(getattr(c, floor), min(c.snug, level)) for c in flex)

    lo, hi = 0, max((c.snug for c in flex), default=0)
    while lo < hi:  # the largest level whose total fits (binary search: linear overall)
        mid = (lo + hi + 1) // 2
        if fixed + total(mid) <= width:
            lo = mid
        else:
            hi = mid - 1
    for c in flex:
        c.width = max(getattr(c, floor), min(c.snug, lo))
    room = width - _total(cols)
    for c in cols:  # give the room back to wrapped headers
        if c.width == c.snug and 0 < c.natural - c.width <= room:
            room -= c.natural - c.width
            c.width = c.natural
    return room >= 0


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


def _rows(parts: list[list[str]], kept: list[_Col], top: bool = True) -> list[str]:
    """Cells of several lines side by side (``top``: aligned at the top, else at the bottom)."""
    n = max(len(p) for p in parts)
    if not top:
        parts = [[""] * (n - len(p)) + p for p in parts]
    return [SEP.join(_pad(p[k] if k < len(p) else "", c) for p, c in zip(parts, kept)).rstrip().replace(GLUE, " ")
            for k in range(n)]


def render_table(t: "Table", width: int) -> list[str]:
    """The table as lines of at most ``width`` characters (see the module docstring for when a line
    is longer), a title line first and a note naming dropped columns last."""
    cells = [[str(v) for v in row] for row in t.rows]
    kinds = column_kinds(t, cells)
    just = list(t.justify) if t.justify else ["left"] + ["right"] * (len(t.columns) - 1)
    cols = [_Col(i, str(h), kinds[i], [r[i] for r in cells if i < len(r)], just[i] == "right")
            for i, h in enumerate(t.columns)]
    kept, dropped = _plan(cols, t.optional, width)
    out = wrap_prose(t.title, width) if t.title else []
    out.extend(_rows([wrap_text(c.header, c.width) for c in kept], kept, top=False))
    out.append(SEP.join("─" * c.width for c in kept))
    for row in cells:
        out.extend(_rows([_cell_lines(row[c.index] if c.index < len(row) else "", c) for c in kept], kept))
    if dropped:
        out.extend(wrap_prose(f"(not shown at {width} columns: {', '.join(dropped)}; widen the terminal or use "
                              "--json)", max(width, TEXT_MIN)))
    return out
