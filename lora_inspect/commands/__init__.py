"""Click commands, one module per feature; wiring only (the work lives in the library modules)."""

from __future__ import annotations

from .inspect import info, rank

COMMANDS = [info, rank]

# Optional feature modules register themselves here when present.
for _mod, _names in (
    ("rewrite", ("truncate", "rescale")),
    ("footprint", ("footprint",)),
    ("check", ("check",)),
    ("report", ("report", "diff")),
):
    try:
        _m = __import__(f"{__name__}.{_mod}", fromlist=list(_names))
    except ModuleNotFoundError as _e:  # not built yet
        if _e.name and _e.name.endswith(_mod):
            continue
        raise
    COMMANDS.extend(getattr(_m, n) for n in _names)
try:
    from ..train.cli import train, verify

    COMMANDS.extend([train, verify])
except ModuleNotFoundError as _e:  # the training core is optional until built
    if not (_e.name or "").startswith("lora_inspect.train"):
        raise
