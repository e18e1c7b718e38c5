"""lora-inspect: exact spectra, footprints, rewrites and a CI gate for LoRA adapters.

The public Python API is the names in ``__all__`` (the README's "Python API" section shows each in use).
They are imported on first use, so ``import lora_inspect`` stays cheap (no torch) and a header-only
command such as ``info`` never pays for the maths.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name → "module:attribute" (the one place to update when a module moves)
_EXPORTS: dict[str, str] = {
    # reading
    "load_adapter": "lora_inspect.formats:load_adapter",
    "Adapter": "lora_inspect.adapter:Adapter",
    "Module": "lora_inspect.adapter:Module",
    "InspectError": "lora_inspect.errors:InspectError",
    # spectra
    "analyse": "lora_inspect.analysis:analyse",
    "RankReport": "lora_inspect.analysis:RankReport",
    "ModuleResult": "lora_inspect.analysis:ModuleResult",
    # rewriting
    "truncate": "lora_inspect.rewrite:truncate",
    "rescale": "lora_inspect.rewrite:rescale",
    "TruncateSpec": "lora_inspect.rewrite:TruncateSpec",
    "TruncateResult": "lora_inspect.rewrite:TruncateResult",
    "RescaleResult": "lora_inspect.rewrite:RescaleResult",
    # costs
    "estimate_footprint": "lora_inspect.footprint:footprint",  # not `footprint`: that is a submodule's name
    "load_base": "lora_inspect.basemodels:load_base",
    # the CI gate (`check`)
    "Policy": "lora_inspect.checks:Policy",
    "evaluate": "lora_inspect.checks:evaluate",
    "nonfinite_tensors": "lora_inspect.checks:nonfinite_tensors",
}

__all__ = [
    "__version__",
    "load_adapter", "Adapter", "Module", "InspectError",
    "analyse", "RankReport", "ModuleResult",
    "truncate", "rescale", "TruncateSpec", "TruncateResult", "RescaleResult",
    "estimate_footprint", "load_base",
    "Policy", "evaluate", "nonfinite_tensors",
]


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'lora_inspect' has no attribute {name!r}")
    module, attr = target.split(":")
    value = getattr(import_module(module), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ resolves these lazily
    from .adapter import Adapter, Module
    from .analysis import ModuleResult, RankReport, analyse
    from .basemodels import load_base
    from .checks import Policy, evaluate, nonfinite_tensors
    from .errors import InspectError
    from .footprint import footprint as estimate_footprint
    from .formats import load_adapter
    from .rewrite import RescaleResult, TruncateResult, TruncateSpec, rescale, truncate
