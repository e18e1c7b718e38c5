"""``fit``: an adapter turned into one a named serving engine loads and applies fully (docs/serving.md, "fit").

:mod:`.engines` says what each engine applies, :mod:`.handlers` and :mod:`.extras` turn each module into
that (an ordered list of per-module handlers, first match wins), :mod:`.run` writes the result with
``convert``'s writers and checks it as the engine will see it (``check --serving``, ``check --applied``).
"""

from __future__ import annotations

from .engines import ENGINE_NAMES, ENGINES, Engine, EngineName, engine_named, rank_limit
from .results import Action, FitModule, FitResult
from .run import fit, needs_base, verify_fit

__all__ = ["fit", "verify_fit", "needs_base", "FitResult", "FitModule", "Action", "Engine", "EngineName", "ENGINES",
           "ENGINE_NAMES", "engine_named", "rank_limit"]
