"""Atomic writes: everything goes to a temporary file beside the target, then ``os.replace``.

Safetensors files go through the project's deterministic writer (sorted header keys and metadata,
no timestamps), not ``safetensors.torch.save_file``, whose header metadata order follows a Rust
``HashMap`` and changes between runs: the same tensors always give the same bytes. An OS error
(disk full, read-only directory, permission) becomes one line naming the path, with the temporary
file removed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import InspectError

__all__ = ["atomic_write_json", "atomic_write_text", "atomic_save_safetensors", "load_safetensors", "os_error"]


def os_error(path: str | Path, e: OSError) -> InspectError:
    """One line for an OS error while writing ``path``."""
    return InspectError(f"{path}: cannot write: {e.strerror or e}")


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(Path(tmp))
        os.replace(tmp, path)
    except OSError as e:
        raise os_error(path, e) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(text: str, path: str | Path) -> None:
    _atomic(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(obj, path: str | Path, *, sort_keys: bool = True) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n", path)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from ..files import write_safetensors

    _atomic(Path(path), lambda tmp: write_safetensors(tmp, tensors, metadata))


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
