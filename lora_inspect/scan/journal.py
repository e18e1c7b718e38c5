"""The scan's output journal: JSON Lines, one complete row per line, appended atomically.

Each row is written as one ``write`` of a complete line and flushed, so a scan killed at any moment
leaves whole rows plus at most one torn last line (a write cut short): what a killed process wrote is
in the kernel's page cache and reaches the file. ``fsync`` — which only a crash of the whole machine
needs — runs when a row is appended :data:`SYNC_EVERY` seconds or more after the last one, and at close:
such a crash loses the rows appended since the last fsync, which ``--resume`` scans again. (An fsync per row took 28% of a 2-worker scan's driver time and
capped its speed-up; reports/scan.md.) On
opening, a torn last line (no final newline, or not valid JSON) is cut off before anything is
appended, so the journal always holds exactly the rows finished before the kill. Parquet is written
from the journal at the end (:func:`write_parquet`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import InspectError
from ..units import json_safe

__all__ = ["Journal", "read_rows", "write_parquet", "SYNC_EVERY"]

SYNC_EVERY = 0.25  # seconds between fsyncs of the journal (and one at close)


_clean = json_safe  # NaN/inf → null (one home: units.json_safe)


def _valid_prefix(data: bytes) -> int:
    """Length of the longest prefix of ``data`` made of complete, parseable lines."""
    end = data.rfind(b"\n") + 1
    if end == 0:
        return 0
    last_start = data.rfind(b"\n", 0, end - 1) + 1
    try:
        json.loads(data[last_start:end])
    except ValueError:
        return last_start  # a line cut and later completed by a newline: drop it too
    return end


def _iter_lines(path: Path) -> Iterator[dict]:
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                return  # torn last line
            try:
                row = json.loads(line)
            except ValueError as e:
                raise InspectError(f"{path}: line {n} is not a JSON row ({e})") from e
            if isinstance(row, dict):
                yield row


def read_rows(path: Path) -> list[dict]:
    """Every complete row of a journal (a torn last line is ignored)."""
    return list(_iter_lines(path)) if path.is_file() else []


class Journal:
    """Append-only JSONL writer; see the module docstring. ``resume`` keeps the rows already there."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.path = path
        if path.exists() and not path.is_file():
            raise InspectError(f"{path}: not a regular file")
        if resume and path.is_file():
            data = path.read_bytes()
            keep = _valid_prefix(data)
            if keep < len(data):
                with path.open("r+b") as f:
                    f.truncate(keep)
                    os.fsync(f.fileno())
        self._synced = time.monotonic()
        mode = "ab" if resume else "wb"
        try:
            self._f = path.open(mode)
        except OSError as e:
            raise InspectError(f"{path}: cannot write ({e.strerror or e})") from e

    def append(self, row: dict) -> None:
        line = json.dumps(_clean(row), ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n"
        self._f.write(line.encode("utf-8"))
        self._f.flush()
        now = time.monotonic()
        if now - self._synced >= SYNC_EVERY:
            os.fsync(self._f.fileno())
            self._synced = now

    def close(self) -> None:
        if self._f.closed:
            return
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:  # the rows may not be on disk: say so (the file is closed all the same)
            raise InspectError(f"{self.path}: cannot write ({e.strerror or e})") from e
        finally:
            self._f.close()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_parquet(rows: list[dict], out: Path, columns: list[tuple[str, str]]) -> None:
    """``rows`` as a Parquet file (pyarrow, the ``scan`` extra), written atomically (:func:`~lora_inspect.files.atomic_path`).
    ``columns``: (name, kind) with kind one of str, int, float, bool, list[int], list[float], list[str]."""
    from ..files import atomic_path
    from ..optional import require

    pa = require("pyarrow", f"{out}: writing Parquet")
    pq = require("pyarrow.parquet", f"{out}: writing Parquet")
    types = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(),
             "list[int]": pa.list_(pa.int64()), "list[float]": pa.list_(pa.float64()),
             "list[str]": pa.list_(pa.string())}
    schema = pa.schema([(name, types[kind]) for name, kind in columns])
    table = pa.Table.from_pylist([{n: r.get(n) for n, _ in columns} for r in rows], schema=schema)
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
