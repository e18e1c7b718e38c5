"""Writing files: atomic outputs, output-path checks, the deterministic safetensors writer, JSON.

Determinism: the safetensors container is written here (from numpy arrays in their storage dtypes,
:mod:`lora_inspect.arrays`; no torch) rather than by ``safetensors.torch.save_file``,
whose header metadata order follows a Rust ``HashMap`` and changes from run to run. Header keys are
sorted, tensors are laid out by (element size descending, key) — the order the safetensors library
uses, which keeps every tensor aligned — and the header is padded with spaces to a multiple of 8
(the format spec: https://github.com/huggingface/safetensors#format). No timestamps anywhere.

Atomicity, one scheme for every writer of the project (rewrites, convert, report, train, the basis
cache, scan's Parquet): everything is written under a temporary name beside OUT (same filesystem),
``.OUT.lora-inspect-tmp-PID-N[suffix]`` (:func:`temp_path`; N counts within the process, so threads
never share a name), and only then renamed onto OUT — :class:`AtomicOutput` for an output the caller
checks before committing (a file or a directory), :func:`atomic_path` for one file. Nothing is left
behind on failure; every OS error while writing (disk full, read-only filesystem, permission …)
becomes one :class:`~lora_inspect.errors.InspectError` naming the path and the cause
(:func:`os_error`). Temporaries left by a process that no longer runs (killed mid-write) are found by
:func:`stale_temporaries` and removed by the next write into the same directory
(:func:`remove_stale`), with a note in :attr:`AtomicOutput.notes`. Layout-specific writing (which
files, which config) lives in :mod:`lora_inspect.formats`.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InspectError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = [
    "write_safetensors",
    "write_bin",
    "write_text",
    "AtomicOutput",
    "atomic_path",
    "temp_path",
    "stale_temporaries",
    "remove_stale",
    "copy_file",
    "check_output_path",
    "dump_json",
    "write_bytes",
    "os_error",
    "TMP_MARK",
]

TMP_MARK = ".lora-inspect-tmp-"
OLD_MARK = ".lora-inspect-old-"  # a directory OUT replaced by --force, removed once the new one is in place
# any writer's temporary (and the older ``…-PID[suffix]`` names without the counter); group 1 = the PID
_STALE = re.compile(r"^\..+\.lora-inspect-(?:tmp|old)-(\d+)(?:-\d+)?(?:\..*)?$")
_serial = itertools.count()  # next() on a count is atomic under the GIL: threads get distinct names


def temp_path(target: Path, suffix: str = "", mark: str = TMP_MARK) -> Path:
    """The temporary name beside ``target`` that every writer uses: ``.NAME.lora-inspect-tmp-PID-N[suffix]``
    (``suffix``: an extension a library insists on, e.g. ``.gguf``); :func:`stale_temporaries` finds it
    once its process is gone."""
    return target.parent / f".{target.name}{mark}{os.getpid()}-{next(_serial)}{suffix}"


def os_error(path: str | Path, e: OSError) -> InspectError:
    """One line for an OS error while writing ``path``: the path and the cause (ENOSPC, EROFS …)."""
    code = errno.errorcode.get(e.errno or 0, "")
    cause = e.strerror or str(e)
    return InspectError(f"{path}: cannot write: {cause}" + (f" ({code})" if code else ""))


def dump_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, two-space indent, trailing newline (PEFT writes sorted keys too)."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as e:
        raise os_error(path, e) from e


def _safetensors_layout(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None):
    import numpy as np

    from .arrays import from_torch, st_dtype

    items = []
    for key, t in tensors.items():
        if not isinstance(t, np.ndarray) and hasattr(t, "detach"):  # a torch engine's tensor (train): its door
            t = from_torch(t)
        try:
            name = st_dtype(t)
        except (ValueError, AttributeError):
            raise InspectError(f"{path}: cannot store tensor {key!r} of dtype {getattr(t, 'dtype', type(t).__name__)}") from None
        t = np.ascontiguousarray(t).reshape(t.shape)  # (a 0-d array stays 0-d: a kohya .alpha is shape [])
        items.append((key, name, t.astype(t.dtype.newbyteorder("<")) if t.dtype.byteorder == ">" else t))
    items.sort(key=lambda kv: (-kv[2].itemsize, kv[0]))
    header: dict[str, Any] = {}
    offset = 0
    for key, name, t in items:
        header[key] = {"dtype": name, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise InspectError(f"{path}: header metadata must map strings to strings")
        header["__metadata__"] = dict(sorted(metadata.items()))
    raw = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return items, raw, offset


def write_safetensors(path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file deterministically (byte-identical for equal inputs) from numpy arrays in
    their storage dtypes (bf16 as :data:`lora_inspect.arrays.BF16`; a torch tensor, as ``train`` hands
    over, is converted bit for bit); returns the bytes written. Not
    atomic by itself: write to :attr:`AtomicOutput.tmp` for that. ``train`` calls this."""
    items, raw, offset = _safetensors_layout(path, tensors, metadata)
    try:
        with open(path, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for _, _, t in items:
                if t.size:
                    f.write(t.reshape(-1).view("u1").data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise os_error(path, e) from e
    return 8 + len(raw) + offset


def write_bin(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A pickled state dict (torch's engine: the arrays become tensors here); ``torch.save`` is
    deterministic for the same dict in the same order."""
    import torch

    from .arrays import to_torch

    try:
        torch.save({k: to_torch(tensors[k]) for k in sorted(tensors)}, str(path))
    except OSError as e:
        raise os_error(path, e) from e
    except RuntimeError as e:  # torch wraps write failures of its zip writer
        raise InspectError(f"{path}: cannot write: {str(e).splitlines()[0][:200]}") from e


def _looks_like_adapter_dir(d: Path, markers: tuple[str, ...]) -> bool:
    return any((d / n).is_file() for n in markers)


def check_output_path(inp: Path, weights: Path, out: Path, force: bool, markers: tuple[str, ...] = ()) -> None:
    """Refuse OUT when it is the input, lies inside it, contains it, or exists without ``force``;
    ``force`` replaces an existing directory only when it holds one of ``markers`` (an adapter's files,
    ``lora_inspect.formats.ADAPTER_MARKERS``) or nothing."""
    ri, rw, ro = inp.resolve(), weights.resolve(), out.resolve()
    if ro in (ri, rw):
        raise InspectError(f"{out}: OUT is the input itself; write to a new path")
    if ri.is_dir() and ri in ro.parents:
        raise InspectError(f"{out}: OUT lies inside the input directory {inp}; write elsewhere")
    if ro in ri.parents or ro in rw.parents:
        raise InspectError(f"{out}: OUT contains the input {inp}; replacing it would destroy the input")
    if out.exists() or out.is_symlink():
        if out.exists() and out.samefile(weights):
            raise InspectError(f"{out}: OUT is the input file (same file on disk); write to a new path")
        if not force:
            raise InspectError(f"{out}: already exists", hint="force replaces it", option="force")
        if out.is_dir() and not out.is_symlink() and any(out.iterdir()) and not _looks_like_adapter_dir(out, markers):
            # --force replaces an earlier output, never an unrelated folder full of someone's files
            raise InspectError(f"{out}: exists and is not an adapter directory; forcing replaces only adapters")
    if not out.parent.exists():
        raise InspectError(f"{out.parent}: no such directory for OUT")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return False
    return True


def stale_temporaries(parent: Path) -> Iterator[Path]:
    """Temporaries of ours in ``parent`` whose writing process no longer runs."""
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for p in entries:
        m = _STALE.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            yield p


def remove_stale(parent: Path) -> list[str]:
    """Remove :func:`stale_temporaries` in ``parent``; one note per removed path."""
    notes = []
    for p in stale_temporaries(parent):
        _remove(p)
        notes.append(f"removed {p.name}, left in {p.parent} by an interrupted earlier run")
    return notes


@contextmanager
def atomic_path(target: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``target`` for the block to write one file to; renamed onto ``target``
    (replacing a file there: the caller decides whether it may, :func:`check_output_path`) when the block
    ends normally, removed when it raises. An OS error becomes one line naming ``target``. Stale
    temporaries of dead processes in the same directory are removed first."""
    remove_stale(target.parent)
    tmp = temp_path(target, suffix)
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as e:
        raise os_error(target, e) from None
    finally:
        _remove(tmp)


class AtomicOutput:
    """A temporary path beside OUT; :meth:`commit` renames it onto OUT, leaving the block without
    committing (an error, a failed self-check) removes everything that was written. Entering removes
    stale temporaries of dead processes in the same directory; :attr:`notes` says which."""

    def __init__(self, out: Path, suffix: str = ""):
        self.out = out
        self.tmp = temp_path(out, suffix)
        self.notes: list[str] = []
        self._committed = False

    def __enter__(self) -> "AtomicOutput":
        self.notes.extend(remove_stale(self.out.parent))
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            _remove(self.tmp)

    def mkdir(self) -> Path:
        try:
            self.tmp.mkdir()
        except OSError as e:
            raise os_error(self.tmp, e) from e
        return self.tmp

    def commit(self) -> None:
        try:
            self._commit()
        except OSError as e:
            raise os_error(self.out, e) from e

    def _commit(self) -> None:
        trash = None
        if self.out.exists() or self.out.is_symlink():
            if self.out.is_dir() and not self.out.is_symlink():
                trash = temp_path(self.out, mark=OLD_MARK)
                os.rename(self.out, trash)
            elif self.tmp.is_dir():
                self.out.unlink()
        os.replace(self.tmp, self.out)  # atomic for a file over a file; a dir onto a free name
        self._committed = True
        if trash is not None:
            _remove(trash)


def copy_file(src: Path, dst: Path) -> None:
    try:
        shutil.copyfile(src, dst)
    except OSError as e:
        raise os_error(dst, e) from e


def _remove(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            p.unlink()
    except OSError:
        pass  # best effort: a temp we cannot remove is reported by the next run
