"""Which adapters a scan reads: every adapter under directory trees, or the paths a manifest lists.

Rules (the readers' own, :mod:`lora_inspect.formats`):

- a directory holding one of :data:`~lora_inspect.formats.ADAPTER_MARKERS` (``adapter_config.json``,
  ``adapter_model.safetensors``/``.bin``, mlx-lm's ``adapters.safetensors``) is one adapter; its own
  weight files are not listed again, but its subdirectories are walked (PEFT's ``save_pretrained`` of
  several adapters puts each named adapter in a subfolder: each is a row of its own);
- in any other directory, every file with a weight suffix (:data:`~lora_inspect.formats.WEIGHT_SUFFIXES`)
  is a candidate single-file adapter (kohya, diffusers, PEFT keys); one that turns out not to be an
  adapter gets an error row saying so, the line ``lora-inspect info`` prints;
- a ROOT (a path on the command line) is a directory (walked as above), a file with a weight suffix
  (an adapter) or an ``adapter_config.json`` (its directory). Anything else is refused before anything
  is read or written (:func:`check_roots`): a missing ROOT, and a file without a weight suffix — a
  stray ``notes.txt`` from ``scan dir/*`` is a mistake on the command line, found by its name alone, and
  the old reading of such a file as a manifest turned a note into rows;
- a manifest is read only when named as one (``scan --manifest FILE``, as ``tar -T`` / ``rsync
  --files-from``): one path per line (relative to the manifest's directory), blank lines and ``#``
  comments skipped; an entry naming an adapter (file or directory) is that adapter alone, a directory
  that is not one is walked as above, and a missing entry still gets its (error) row — the list is
  input data, its entries are judged per row;
- nothing found under all the ROOTs and manifests together is refused too (a ROOT folder without
  adapters among others, as ``scan dir/*`` gives, is fine).

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

__all__ = ["discover", "check_roots", "adapters_under", "is_adapter_dir", "MAX_MANIFEST_BYTES"]

MAX_MANIFEST_BYTES = 256 * 2**20  # 256 MiB: ~2 M paths


def _markers() -> tuple[str, ...]:
    from ..formats import ADAPTER_MARKERS

    return ADAPTER_MARKERS


def _suffixes() -> tuple[str, ...]:
    from ..formats import WEIGHT_SUFFIXES

    return WEIGHT_SUFFIXES


def _nothing() -> str:
    return f"no adapters found here (no adapter_config.json, adapters.safetensors or {'/'.join(_suffixes())} files)"


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


def _one(p: Path, seen: set[tuple[int, int]], named: bool) -> Iterator[Path]:
    """``named``: a manifest entry, the adapter it names alone; else a ROOT, walked into."""
    if p.is_dir():
        if named and is_adapter_dir(p):
            yield p  # a manifest names adapters: exactly this one, not its subfolders
        else:
            yield from _walk(p, seen)
    elif p.name == "adapter_config.json":
        yield p.parent
    else:
        yield p  # an adapter file, a special file or a missing entry: its row says which


def _root_error(p: Path, command: str) -> str | None:
    """Why ``p`` cannot be a ROOT of ``command`` (by its name and kind; nothing is opened), or None."""
    if not p.exists():
        if os.path.lexists(p):
            return f"{p}: a symbolic link that leads nowhere (dangling, or a loop)"
        return f"{p}: no such file or directory"
    if p.is_dir() or p.name == "adapter_config.json" or p.name.endswith(_suffixes()):
        return None
    what = f"an adapter is a folder or a {'/'.join(_suffixes())} file"
    manifest = f"; a list of paths is read with --manifest {p}" if command == "scan" else ""
    return f"{p}: not an adapter file ({what}{manifest}; to {command} a whole folder, name the folder)"


def check_roots(roots: Sequence[str | Path], command: str = "scan") -> None:
    """Refuse the command line before anything is read: a missing ROOT, or a file that is not an adapter
    by its name (one line naming the first, with how many more)."""
    bad = [m for r in roots for m in [_root_error(Path(r), command)] if m]
    if bad:
        more = f" ({len(bad) - 1} more such arguments)" if len(bad) > 1 else ""
        raise InspectError(bad[0] + more)


def adapters_under(path: Path, command: str = "check") -> list[Path]:
    """What one ROOT holds: the adapter file itself, or every adapter under a directory (nested ones
    too), as :func:`discover` lists them; ``check`` reads its arguments with this."""
    check_roots([path], command)
    found = list(dict.fromkeys(_one(path, set(), named=False)))
    if not found:
        raise InspectError(f"{path}: {_nothing()}")
    return found


def discover(roots: Sequence[str | Path], manifests: Sequence[str | Path] = ()) -> list[Path]:
    """Every adapter under ``roots`` (directories, adapter files) and in ``manifests`` (lists of paths),
    each once, in a deterministic order. Refused (InspectError) before anything is read: a ROOT that is
    missing or no adapter by its name (:func:`check_roots`); and nothing found at all."""
    check_roots(roots)
    seen: set[tuple[int, int]] = set()
    out: dict[Path, None] = {}
    for r in roots:
        for p in _one(Path(r), seen, named=False):
            out.setdefault(p, None)
    for m in manifests:
        for entry in _manifest(Path(m)):
            for p in _one(entry, seen, named=True):
                out.setdefault(p, None)
    if not out:
        where = ", ".join(str(x) for x in [*roots, *manifests][:3]) + (" …" if len(roots) + len(manifests) > 3 else "")
        raise InspectError(f"{where}: {_nothing()}")
    return list(out)
