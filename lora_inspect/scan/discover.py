"""Which adapters a scan reads: every adapter under directory trees, or the paths a manifest lists.

Rules (the readers' own, :mod:`lora_inspect.formats`):

- a directory holding one of :data:`~lora_inspect.formats.ADAPTER_MARKERS` (``adapter_config.json``,
  ``adapter_model.safetensors``/``.bin``, mlx-lm's ``adapters.safetensors``) is one adapter; its own
  weight files are not listed again, but its subdirectories are walked (PEFT's ``save_pretrained`` of
  several adapters puts each named adapter in a subfolder: each is a row of its own);
- in any other directory, every file with a weight suffix (:data:`~lora_inspect.formats.WEIGHT_SUFFIXES`)
  is a candidate single-file adapter (kohya, diffusers, PEFT keys); one that turns out not to be an
  adapter gets an error row saying so, the line ``lora-inspect info`` prints;
- a file given on the command line with a weight suffix is an adapter; any other file is a manifest:
  one path per line (relative to the manifest's directory), blank lines and ``#`` comments skipped;
  an entry naming an adapter (file or directory) is that adapter alone, a directory that is not one is
  walked as above, and a missing entry still gets its (error) row.

Order is deterministic: roots in the order given, names sorted by code point within a directory, a
directory's files (or the directory itself, when it is an adapter) before its subfolders, depth first. The walk is linear in the tree: each directory is
listed once (``os.scandir``), symlinked directories are followed but a directory already seen (same
device and inode) is not entered again, so symlink loops end. Nothing is opened here: special files
(FIFOs, devices, sockets) with a weight suffix are listed, and the reader refuses them in one line
without opening them (``validate.open_regular``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import InspectError
from ..validate import open_regular

__all__ = ["discover", "is_adapter_dir", "MAX_MANIFEST_BYTES"]

MAX_MANIFEST_BYTES = 256 * 2**20  # 256 MiB: ~2 M paths


def _markers() -> tuple[str, ...]:
    from ..formats import ADAPTER_MARKERS

    return ADAPTER_MARKERS


def _suffixes() -> tuple[str, ...]:
    from ..formats import WEIGHT_SUFFIXES

    return WEIGHT_SUFFIXES


def is_adapter_dir(names: set[str] | Path) -> bool:
    """A directory (or the set of its regular-file names) holding a marker file of some layout."""
    if isinstance(names, Path):
        return any((names / m).is_file() for m in _markers())
    return any(m in names for m in _markers())


def _entries(d: Path) -> list[tuple[str, os.DirEntry]]:
    try:
        with os.scandir(d) as it:
            return sorted(((e.name, e) for e in it), key=lambda t: t[0])
    except OSError:
        return []  # unreadable directory: nothing found in it (the walk goes on)


def _kind(e: os.DirEntry) -> str:
    """"dir", "file" (regular), "special" (FIFO, device, socket) or "" (dangling link), following links."""
    try:
        mode = e.stat(follow_symlinks=True).st_mode
    except OSError:
        return ""
    if stat.S_ISDIR(mode):
        return "dir"
    return "file" if stat.S_ISREG(mode) else "special"


def _walk(root: Path, seen: set[tuple[int, int]]) -> Iterator[Path]:
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            st = d.stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        entries = _entries(d)
        kinds = [(name, e, _kind(e)) for name, e in entries]
        files = {name for name, _, k in kinds if k == "file"}
        if is_adapter_dir(files):
            yield d
        else:
            yield from (d / name for name, _, k in kinds if k in ("file", "special") and name.endswith(_suffixes()))
        # depth first, subfolders in name order: push in reverse
        stack.extend(d / name for name, _, k in reversed(kinds) if k == "dir")


def _manifest(path: Path) -> list[Path]:
    with open_regular(path) as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise InspectError(f"{path}: manifest larger than {MAX_MANIFEST_BYTES // 2**20} MiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InspectError(f"{path}: manifest is not UTF-8 text (byte {e.start})") from e
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line)
            out.append(p if p.is_absolute() else path.parent / p)
    return out


def _one(p: Path, seen: set[tuple[int, int]], manifests: bool) -> Iterator[Path]:
    if p.is_dir():
        if not manifests and is_adapter_dir(p):
            yield p  # a manifest names adapters: exactly this one, not its subfolders
        else:
            yield from _walk(p, seen)
    elif p.name == "adapter_config.json":
        yield p.parent
    elif manifests and p.is_file() and p.suffix not in _suffixes():
        for entry in _manifest(p):
            yield from _one(entry, seen, manifests=False)  # a manifest does not name manifests
    else:
        yield p  # an adapter file, a special file or a missing path: its row says which


def discover(roots: Sequence[str | Path]) -> list[Path]:
    """Every adapter under ``roots`` (directories, adapter files, manifests), each once, in a deterministic order."""
    seen: set[tuple[int, int]] = set()
    out: dict[Path, None] = {}
    for r in roots:
        for p in _one(Path(r), seen, manifests=True):
            out.setdefault(p, None)
    return list(out)
