"""Counts in words: ``plural(1, "adapter")`` → ``"1 adapter"``, ``plural(3, "adapter")`` → ``"3 adapters"``,
and the verb that goes with them: ``verb(3, "has")`` → ``"have"``.

Every sentence that states a count goes through these, so that "1 adapters" cannot be written. They are
defined once, in :mod:`lora_inspect.units` (the lower layers state counts too and may not import views);
this module re-exports them for the views.
"""

from __future__ import annotations

from ..units import noun, plural, verb

__all__ = ["plural", "noun", "verb"]
