"""The scan worker process: limits first, imports once, then one adapter per message.

Imported by the forkserver (``lora_inspect.scan.local`` preloads it), so numpy and the readers are
imported once in the server and every worker forked from it starts with them loaded. A worker sets
its own address-space limit (``RLIMIT_AS``, when asked) to what it uses after start-up plus the
budget, runs BLAS single-threaded (the pool is the parallelism: ``local`` starts the server and the
workers with one BLAS thread in their environment) and per-module work in one thread
(``LORA_INSPECT_THREADS``), and answers ``(index, row dict)``,
``(index, "skipped")`` for each ``(index, path)`` it receives, until it receives None.
"""

from __future__ import annotations

import os
import resource
from typing import Any

import lora_inspect.analysis  # noqa: F401  (imported here so that forked workers inherit it)
import lora_inspect.checks  # noqa: F401
import lora_inspect.formats  # noqa: F401

from .row import ScanConfig, ScanRow, scan_one

__all__ = ["serve", "address_space", "run_task"]


def address_space() -> int:
    """This process's virtual size in bytes (``/proc/self/statm``), 0 where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _limit_memory(budget: int | None) -> None:
    if not budget:
        return
    cap = address_space() + budget
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def run_task(path: str, cfg: ScanConfig) -> dict[str, Any] | str:
    """One adapter's row as a dict (what crosses a pipe or Ray's object store), or ``"skipped"``."""
    res = scan_one(path, cfg)
    return res.to_dict() if isinstance(res, ScanRow) else res


def serve(conn: Any, cfg: ScanConfig, memory_budget: int | None) -> None:
    """The worker loop (see the module docstring)."""
    os.environ["LORA_INSPECT_THREADS"] = "1"
    _limit_memory(memory_budget)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the driver has gone
        if msg is None:
            return
        index, path = msg
        conn.send((index, run_task(path, cfg)))
