"""Transition shim: the presentation layer lives in :mod:`lora_inspect.views` (``views/render.py``).

Kept only so that modules not yet moved into ``views/`` (``rewrite``'s views, ``commands/rewrite``)
still import; delete it once they import ``lora_inspect.views.render``.
"""

from __future__ import annotations

from .views.render import (  # noqa: F401
    FORMATS,
    Table,
    View,
    emit,
    fmt_bytes,
    fmt_count,
    fmt_float,
    progress,
    sparkline,
    stderr_console,
    to_json,
    to_markdown,
    warn,
)
