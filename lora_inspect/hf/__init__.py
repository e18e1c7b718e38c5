"""Hugging Face models as the base: loading (transformers, the optional ``hf`` extra), the user's text,
adapters applied by an exact merge, ``verify --base HF_DIR`` and the input moments that calibrated
truncation needs. Nothing here presents (no rich/click): commands and views do."""

from __future__ import annotations

__all__ = ["is_hf_dir"]


def is_hf_dir(path: object) -> bool:
    """A directory with a ``config.json`` whose ``model_type`` is set and is not this project's own."""
    from .model import is_hf_dir as _is

    return _is(path)
