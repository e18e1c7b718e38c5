"""Atomic writes for ``train``: thin calls into :mod:`lora_inspect.files`, the one home of atomic writing
(its temporary names, its stale-temporary cleanup, its one-line OS errors).

Safetensors files go through the project's deterministic writer (sorted header keys and metadata,
no timestamps), not ``safetensors.torch.save_file``, whose header metadata order follows a Rust
``HashMap`` and changes between runs: the same tensors always give the same bytes. An OS error
(disk full, read-only directory, permission) becomes one line naming the path, with the temporary
file removed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..arrays import from_torch
from ..errors import InspectError
from ..files import atomic_path, write_safetensors, write_text

__all__ = ["atomic_write_json", "atomic_write_text", "atomic_save_safetensors", "load_safetensors"]


def atomic_write_text(text: str, path: str | Path) -> None:
    with atomic_path(Path(path)) as tmp:
        write_text(tmp, text)


def atomic_write_json(obj, path: str | Path, *, sort_keys: bool = True) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n", path)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """torch tensors (CPU or not) written as they are stored (the writer takes numpy arrays: converted here)."""
    arrays = {k: from_torch(t) for k, t in tensors.items()}
    with atomic_path(Path(path)) as tmp:
        write_safetensors(tmp, arrays, metadata)


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file (no pickle); a missing or damaged file is an ``InspectError``."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise InspectError(f"{p}: no such file")
    try:
        return load_file(str(p))
    except Exception as e:  # SafetensorError, OSError, …
        raise InspectError(f"{p}: not a readable safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
