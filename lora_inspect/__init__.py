"""lora-inspect: exact spectra, footprints, rewrites and a CI gate for LoRA adapters."""

from __future__ import annotations

__version__ = "0.1.0"

from .adapter import Adapter, Module
from .errors import InspectError
from .formats import load_adapter

__all__ = ["Adapter", "Module", "InspectError", "load_adapter", "__version__"]
