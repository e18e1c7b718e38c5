"""One output object for every command: rich tables on a terminal, JSON, or Markdown.

A command builds a :class:`View` — a versioned JSON document plus the tables and lines a person
reads — and :func:`emit` writes it in the chosen format. JSON goes to stdout alone; logs, warnings
and progress go to stderr. ``NO_COLOR`` is honoured (rich reads it).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..units import fmt_bytes, fmt_count, fmt_float, json_safe
from .layout import GLUE, render_table, wrap_prose

__all__ = [
    "View",
    "Table",
    "emit",
    "to_json",
    "to_markdown",
    "to_text",
    "terminal_width",
    "width_known",
    "stderr_console",
    "warn",
    "note",
    "say",
    "progress",
    "fmt_count",
    "fmt_bytes",
    "fmt_float",
    "sparkline",
    "FORMATS",
]

FORMATS = ("table", "json", "markdown")
_SPARK = "▁▂▃▄▅▆▇█"


@dataclass
class Table:
    """Rows a person reads. ``kinds`` says how each column may give way when the terminal is narrow
    (see :mod:`lora_inspect.views.layout`): ``"name"`` (shortened in the middle with …, keeping the
    layer index and module type), ``"path"`` (shortened in the middle), ``"text"`` (wrapped at spaces), ``"fixed"`` (never shortened:
    numbers, shapes, flags). ``optional`` names the columns that may be dropped, least important first."""

    title: str | None
    columns: Sequence[str]
    rows: Sequence[Sequence[Any]] = field(default_factory=list)
    justify: Sequence[str] | None = None  # "left"/"right" per column; numbers default right
    kinds: Sequence[str] | None = None  # default: first column "name", long prose "text", the rest "fixed"
    optional: Sequence[str] = ()


@dataclass
class View:
    data: dict[str, Any]  # the JSON document (carries its own "schema")
    tables: list[Table] = field(default_factory=list)
    header: list[str] = field(default_factory=list)  # lines before the tables
    footer: list[str] = field(default_factory=list)  # lines after (the actionable ones)


def _console(stderr: bool):
    from rich.console import Console

    c = Console(stderr=stderr, highlight=False, soft_wrap=False)
    if not c.is_terminal and "COLUMNS" not in os.environ:
        # piped or captured (a CI log, a file): don't fold module names at 80 columns
        c = Console(stderr=stderr, highlight=False, soft_wrap=False, width=160)
    return c


def stderr_console():
    return _console(True)


def _say(prefix: str, style: str | None, message: str) -> None:
    """``prefix`` and ``message`` on stderr, wrapped at spaces to the console's width when it has one
    (:func:`width_known`); rich never re-wraps it, so no word is folded."""
    from rich.text import Text

    console = stderr_console()
    line = f"{prefix} {message}" if prefix else message
    lines = wrap_prose(line, max(console.width, 20)) if width_known(sys.stderr) else [line]
    text = Text("\n".join(lines))
    if style:
        text.stylize(style, 0, len(prefix))
    console.print(text, soft_wrap=True, highlight=False)


def say(message: str) -> None:
    """A line for the person on stderr (``wrote report.html …``), wrapped to the terminal's width."""
    _say("", None, message)


def warn(message: str) -> None:
    """A warning on stderr (``warning: …``), wrapped to the terminal's width."""
    _say("warning:", "yellow", message)


def note(message: str) -> None:
    """A note on stderr (``lora-inspect: note: …``), wrapped to the terminal's width."""
    _say("lora-inspect: note:", None, message)


def _json_default(o: Any):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if hasattr(o, "__fspath__"):
        return os.fspath(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


_clean = json_safe  # NaN/inf → null (one home: units.json_safe)


def to_json(view: View) -> str:
    return json.dumps(_clean(view.data), indent=2, default=_json_default, allow_nan=False)


def _md_cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ").replace(GLUE, " ")


def to_markdown(view: View) -> str:
    out: list[str] = []
    for line in view.header:
        out.append(line)
    if view.header:
        out.append("")
    for t in view.tables:
        if t.title:
            out.append(f"**{t.title}**")
            out.append("")
        out.append("| " + " | ".join(_md_cell(c) for c in t.columns) + " |")
        just = t.justify or ["left"] + ["right"] * (len(t.columns) - 1)
        out.append("|" + "|".join("---:" if j == "right" else "---" for j in just) + "|")
        for row in t.rows:
            out.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
        out.append("")
    for line in view.footer:
        out.append(line)
    return "\n".join(out).rstrip() + "\n"


def emit(view: View, fmt: str = "table") -> None:
    """Write a view to stdout in the chosen format."""
    if fmt == "json":
        _write(to_json(view) + "\n")
    elif fmt == "markdown":
        _write(to_markdown(view))
    else:
        _write(to_text(view, terminal_width(), wrap=width_known(sys.stdout)))


def _write(text: str) -> None:
    """stdout, tolerating a reader that has gone (``| head -1``): what it read is what it wanted, and
    the command's exit code must still be its own (0, or 1 for a failed check), not a broken pipe's."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        try:  # later writes and the interpreter's final flush go nowhere instead of failing again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # pragma: no cover - no file descriptor behind stdout
            pass


def width_known(stream: Any) -> bool:
    """Whether a width was given for ``stream``: $COLUMNS, or a terminal. Captured output (a CI log, a
    file) has none: its tables are laid out at 160 columns, its sentences stay one line each."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def terminal_width() -> int:
    """$COLUMNS when set, else the terminal's width; piped or captured output (a CI log, a file) gets
    160 columns so that module names are not shortened at 80."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    if sys.stdout.isatty():
        return shutil.get_terminal_size((80, 24)).columns
    return 160


def to_text(view: View, width: int, wrap: bool = True) -> str:
    """The view as plain text that fits ``width`` columns: tables by :func:`layout.render_table`, the
    header and footer lines wrapped at spaces (continuations indented by two; ``wrap=False``: one line
    each, for output that goes to no terminal)."""
    def lines(text: str) -> list[str]:
        return wrap_prose(text, width) if wrap else [text]

    out: list[str] = [ln for line in view.header for ln in lines(line)]
    for t in view.tables:
        if out:
            out.append("")
        out.extend(render_table(t, width))
    if view.footer:
        out.append("")
        out.extend(ln for line in view.footer for ln in lines(line))
    return "\n".join(out) + "\n"


@contextmanager
def progress(total: int, description: str, enabled: bool = True) -> Iterator:
    """A rich progress bar on stderr (only on a terminal); yields an ``advance(n)`` callable."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = stderr_console()
    if not enabled or not console.is_terminal or total < 2:
        yield lambda n=1: None
        return
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, transient=True,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def sparkline(values: Iterable[float], width: int = 16) -> str:
    """Log-scale sparkline of a descending spectrum (first `width` values), 3 decades per bar range."""
    vals = [float(v) for v in list(values)[:width]]
    if not vals or vals[0] <= 0:
        return ""
    top = math.log10(vals[0])
    span = 3.0  # decades shown
    out = []
    for v in vals:
        if v <= 0:
            out.append(" ")
            continue
        level = 1 - min(max((top - math.log10(v)) / span, 0.0), 1.0)
        out.append(_SPARK[min(int(level * (len(_SPARK) - 1) + 0.5), len(_SPARK) - 1)])
    return "".join(out)
