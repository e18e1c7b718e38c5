"""The one gate for optional dependencies, and the TOML reader for every Python the project supports.

Every import of a package that only an extra installs goes through :func:`require`: it returns the
module, or raises one :class:`~lora_inspect.errors.InspectError` line (exit 2 through the CLI) naming
what needed it, the package and the extra that installs it::

    writing GGUF needs gguf: pip install 'lora-inspect[convert]'

:data:`EXTRAS` is the table (import name → (distribution, extra)); it mirrors pyproject.toml's
``[project.optional-dependencies]`` and a test keeps the two in step.

TOML: :data:`tomllib` is the standard library's ``tomllib`` (Python 3.11+), else ``tomli`` (the same
API; a dependency on Python 3.10 only, ``tomli; python_version < "3.11"``). Nothing else in the package
imports either.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from .errors import InspectError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised by tests/test_one_home.py under Python 3.10
    import tomli as tomllib

__all__ = ["require", "missing_message", "missing_torch", "is_missing_torch", "EXTRAS", "TORCH_ENGINE", "tomllib"]

# torch is a dependency, but only these import it (lazily): analysis, rewrites and conversions run without it
TORCH_ENGINE = "training, verify, calibrated truncation, .bin files and Hugging Face bases"

# top-level import name → (the distribution pip installs, the extra of lora-inspect that brings it)
EXTRAS: dict[str, tuple[str, str]] = {
    "gguf": ("gguf", "convert"),
    "mlx": ("mlx", "convert"),
    "mlx_lm": ("mlx-lm", "convert"),
    "diffusers": ("diffusers", "convert"),
    "matplotlib": ("matplotlib", "plot"),
    "pyarrow": ("pyarrow", "scan"),
    "ray": ("ray", "ray"),
    "transformers": ("transformers", "hf"),
    "peft": ("peft", "hf"),
    "lycoris": ("lycoris-lora", "lycoris"),
}


def missing_message(module: str, purpose: str) -> str:
    """The one line for a missing optional ``module`` that ``purpose`` needs."""
    top = module.split(".")[0]
    dist, extra = EXTRAS[top]
    return f"{purpose} needs {dist}: pip install 'lora-inspect[{extra}]'"


def missing_torch(purpose: str) -> str:
    """The one line when torch is not installed and ``purpose`` (a command) needs it."""
    return f"{purpose} needs torch (the engine of {TORCH_ENGINE}): pip install torch"


def is_missing_torch(e: ImportError) -> bool:
    """Whether ``e`` says that torch itself is not installed (not a name missing inside an installed torch)."""
    return isinstance(e, ModuleNotFoundError) and e.name is not None and (e.name == "torch" or e.name.startswith("torch."))


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (``matplotlib.figure`` …; its top-level package must be in :data:`EXTRAS`) or
    raise the one-line :class:`InspectError` of :func:`missing_message`. ``purpose`` says what needs it
    (``writing GGUF``, ``report``). An import that fails inside the package (a broken install) keeps
    its own cause in the line."""
    top = module.split(".")[0]
    if top not in EXTRAS:
        raise KeyError(f"{top!r} is not an optional dependency (lora_inspect.optional.EXTRAS)")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = e.name is None or e.name == top or module.startswith(e.name + ".") or e.name == module
        cause = "" if missing else f" (importing it failed: {str(e).splitlines()[0][:160]})"
        raise InspectError(missing_message(module, purpose) + cause) from e
