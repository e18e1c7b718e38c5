"""The presentation layer: every result becomes a :class:`~.render.View` (a versioned JSON document
plus the tables and lines a person reads), written as a table, JSON or Markdown by :func:`emit`.

- :mod:`.render` — ``View``/``Table``, ``emit``, number formats, stderr helpers;
- :mod:`.layout` — plain-text tables that fit the terminal (names shortened, never a number cut);
- :mod:`.words` — counts in words (``plural(1, "adapter")`` → ``1 adapter``);
- :mod:`.schemas` — every JSON schema id and version;
- :mod:`.inspect` (``info``, ``rank``), :mod:`.footprint`, :mod:`.check`, :mod:`.diff`,
  :mod:`.rewrite` (``truncate``, ``rescale``) — one module per result type.

Only this package, :mod:`lora_inspect.report`, the commands and :mod:`lora_inspect.train` import rich or matplotlib. Importing
the package is cheap (no torch): the per-result modules are imported where they are used.
"""

from __future__ import annotations

from .inspect import adapter_summary
from .render import FORMATS, Table, View, emit, note, progress, say, stderr_console, to_json, to_markdown, to_text, warn
from .words import noun, plural, verb

__all__ = ["FORMATS", "Table", "View", "emit", "progress", "stderr_console", "to_json", "to_markdown", "to_text",
           "warn", "note", "say", "adapter_summary", "plural", "noun", "verb"]
