"""Atomic writes: everything goes to a temporary file beside the target, then ``os.replace``."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

__all__ = ["atomic_write_json", "atomic_write_text", "atomic_save_safetensors"]


def _tmp_beside(path: Path) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return tmp


def atomic_write_text(text: str, path: str | Path) -> None:
    path = Path(path)
    tmp = _tmp_beside(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(obj, path: str | Path, *, sort_keys: bool = True) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n", path)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    tmp = _tmp_beside(path)
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file (no pickle); a missing or damaged file is an ``InspectError``."""
    from safetensors.torch import load_file

    from ..errors import InspectError

    p = Path(path)
    if not p.is_file():
        raise InspectError(f"{p}: no such file")
    try:
        return load_file(str(p))
    except Exception as e:  # SafetensorError, OSError, …
        raise InspectError(f"{p}: not a readable safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
