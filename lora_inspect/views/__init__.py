"""Views: results in, tables / JSON / Markdown out.

Transitional (core branch): the adapter views still live in the flat module ``lora_inspect/views.py``,
which this package shadows; it is loaded here under another name and re-exported. The ``views``
helper's package replaces this file at merge; ``views/rewrite.py`` holds ``truncate``/``rescale``.
"""

from __future__ import annotations

import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path

_FLAT = _Path(__file__).resolve().parent.parent / "views.py"
if _FLAT.is_file():
    _name = "lora_inspect._views_flat"
    _mod = _sys.modules.get(_name)
    if _mod is None:
        _spec = _util.spec_from_file_location(_name, _FLAT)
        assert _spec is not None and _spec.loader is not None
        _mod = _util.module_from_spec(_spec)
        _sys.modules[_name] = _mod
        _spec.loader.exec_module(_mod)
    globals().update({k: v for k, v in vars(_mod).items() if not k.startswith("__")})
