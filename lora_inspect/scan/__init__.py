"""``scan``: every adapter under directory trees (or in a manifest) → one row each, on a local process
pool or on Ray, into an append-only JSONL journal (and Parquet at the end).

- :mod:`.discover` — which paths are adapters (deterministic, linear, loop-safe, never opens a file;
  also ``check``'s discovery);
- :mod:`.row` — :class:`ScanRow`, one adapter's row (:func:`scan_one` never raises for bad input);
- :mod:`.journal` — JSONL appended atomically per row, torn last line dropped, Parquet from it;
- :mod:`.local` / :mod:`.worker` — the process pool with per-adapter time and memory limits;
- :mod:`.ray_backend` — the same rows from Ray tasks; :mod:`.summary` — counts over all rows.

Resume (:func:`run_scan` with ``resume=True``): an adapter is skipped when the journal already has a
row for the same path with the same content digest (the digest alone would also skip an identical copy
stored at another path, and a resumed scan would then differ from an uninterrupted one); a row without
a digest (a missing or unreadable path, a worker stopped by a limit) is skipped by path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints

from ..errors import InspectError
from .clock import process_seconds
from .discover import adapters_under, discover
from .journal import Journal, read_rows, write_parquet
from .row import NOT_ADAPTER, SKIPPED, ScanConfig, ScanRow, no_lora_keys, scan_one
from .summary import ScanSummary, summarise_rows

__all__ = ["run_scan", "ScanOutcome", "ScanConfig", "ScanRow", "ScanSummary", "discover", "adapters_under",
           "scan_one", "no_lora_keys", "summarise_rows", "journal_path", "row_columns", "process_seconds",
           "BACKENDS"]

BACKENDS = ("local", "ray")


@dataclass
class ScanOutcome:
    rows: list[dict[str, Any]]  # every row (resumed ones first, then new ones in completion order)
    found: int  # adapters discovered
    new: int  # rows written by this run
    skipped: int  # adapters skipped (already had a row)
    not_adapters: int  # tensor files without LoRA keys (no row)
    seconds: float  # this run_scan call: discovery, the rows, Parquet (not the imports before it)
    journal: Path

    @property
    def failed(self) -> bool:
        """Some row (resumed ones included) is unreadable or fails the policy: the scan's exit code is 1."""
        return any(r.get("error") or r.get("check_ok") is False for r in self.rows)


def journal_path(out: Path) -> Path:
    """``results.jsonl`` is its own journal; ``results.parquet`` keeps ``results.parquet.jsonl`` beside it."""
    return out if out.suffix != ".parquet" else out.with_name(out.name + ".jsonl")


def row_columns() -> list[tuple[str, str]]:
    """(field, kind) for every :class:`ScanRow` field, as :func:`journal.write_parquet` takes them."""
    hints = get_type_hints(ScanRow)
    kinds = {int: "int", float: "float", bool: "bool", str: "str"}
    out = []
    for f in fields(ScanRow):
        t = str(hints[f.name])
        if t.startswith("list["):
            out.append((f.name, f"list[{t[5:-1]}]"))
        else:
            out.append((f.name, next(k for typ, k in kinds.items() if typ.__name__ in t)))
    return out


def _resume_keys(rows: list[dict[str, Any]]) -> tuple[frozenset[str], set[str]]:
    with_digest = frozenset(f"{r['digest']} {r['path']}" for r in rows if r.get("digest"))
    by_path = {r["path"] for r in rows if not r.get("digest")}
    return with_digest, by_path


def run_scan(roots: list[str], out: Path, cfg: ScanConfig, *, backend: str = "local", jobs: int = 1,
             address: str | None = None, timeout: float | None = None, memory: int | None = None,
             resume: bool = False, on_found: Callable[[int], None] | None = None,
             on_row: Callable[[dict[str, Any] | None], None] | None = None,
             manifests: list[str] | None = None) -> ScanOutcome:
    """Discover, scan and journal; see the module docstring. ``manifests``: files listing paths, one a line
    (:func:`discover`). A missing ROOT, a non-adapter file among them, or nothing found at all raises
    InspectError before the journal is touched. ``on_row(row)`` is called per finished adapter (None for
    a skipped one), for a progress bar."""
    if backend not in BACKENDS:
        raise InspectError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    t0 = time.perf_counter()
    jpath = journal_path(out)
    paths = [str(p) for p in discover(roots, manifests or ())]
    with Journal(jpath, resume) as journal:
        old = read_rows(jpath) if resume else []
        skip, skip_paths = _resume_keys(old)
        todo = [p for p in paths if p not in skip_paths]
        cfg = ScanConfig(cfg.policy, cfg.energy, cfg.precision, cfg.row_schema, skip)
        if on_found:
            on_found(len(paths))
        new: list[dict[str, Any]] = []
        skipped = len(paths) - len(todo)
        for _ in range(skipped):
            if on_row:
                on_row(None)

        not_adapters = 0

        def take(index: int, res: dict[str, Any] | str) -> None:
            nonlocal skipped, not_adapters
            if res == SKIPPED:
                skipped += 1
            elif res == NOT_ADAPTER:
                not_adapters += 1
            else:
                assert isinstance(res, dict)
                journal.append(res)
                new.append(res)
            if on_row:
                on_row(res if isinstance(res, dict) else None)

        if backend == "ray":
            from .ray_backend import run_ray

            run_ray(todo, cfg, take, jobs=jobs, address=address, timeout=timeout)
        else:
            from .local import run_local

            run_local(todo, cfg, take, jobs=jobs, timeout=timeout, memory=memory)
    rows = old + new
    if out.suffix == ".parquet":
        order = {p: i for i, p in enumerate(paths)}
        write_parquet(sorted(rows, key=lambda r: (order.get(r["path"], len(order)), r["path"])), out, row_columns())
    return ScanOutcome(rows, len(paths), len(new), skipped, not_adapters, time.perf_counter() - t0, jpath)
