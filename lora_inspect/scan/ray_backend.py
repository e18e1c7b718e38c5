"""The Ray backend: one Ray task per adapter, small adapters batched, rows streamed back to the driver.

The driver (``lora-inspect scan``) discovers the adapters, submits tasks with ``num_cpus=1`` each, and
writes every row as its task finishes (``ray.wait``), so the output and ``--resume`` work exactly as
with the local backend, and the rows are the same (each is computed by the same :func:`worker.run_task`).
Batching: adapters are grouped in path order until a batch holds ``batch_bytes`` of files or
``batch_max`` adapters, so that thousands of 100 kB adapters do not pay Ray's per-task cost each.
Limits: a batch that runs past ``timeout`` × its size is cancelled (``ray.cancel(force=True)``) and its
adapters get error rows; memory is left to Ray's own memory monitor (a killed task's adapters get error rows).
BLAS runs single-threaded in Ray's workers (:data:`local.ONE_BLAS_THREAD` in the runtime environment).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..optional import require
from .local import ONE_BLAS_THREAD
from .row import ScanConfig, adapter_files, error_row

__all__ = ["run_ray", "batches"]

BATCH_BYTES = 64 * 2**20
BATCH_MAX = 32


def _size(path: str) -> int:
    try:
        return sum(p.stat().st_size for p in adapter_files(Path(path)))
    except OSError:
        return 0


def batches(paths: list[str], batch_bytes: int = BATCH_BYTES, batch_max: int = BATCH_MAX) -> list[list[tuple[int, str]]]:
    """Consecutive (index, path) groups of at most ``batch_max`` adapters or ``batch_bytes`` of files
    (an adapter larger than that is a batch of its own)."""
    out: list[list[tuple[int, str]]] = []
    cur: list[tuple[int, str]] = []
    cur_bytes = 0
    for i, p in enumerate(paths):
        s = _size(p)
        if cur and (len(cur) >= batch_max or cur_bytes + s > batch_bytes):
            out.append(cur)
            cur, cur_bytes = [], 0
        cur.append((i, p))
        cur_bytes += s
    if cur:
        out.append(cur)
    return out


def _run_batch(items: list[tuple[int, str]], cfg: ScanConfig) -> list[tuple[int, Any]]:
    os.environ["LORA_INSPECT_THREADS"] = "1"
    from .worker import run_task

    return [(i, run_task(p, cfg)) for i, p in items]


def _init(address: str | None, jobs: int) -> bool:
    ray = require("ray", "the ray backend")
    if ray.is_initialized():
        return False
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    kw["runtime_env"] = {"env_vars": {"PYTHONPATH": os.pathsep.join(
        x for x in (here, os.environ.get("PYTHONPATH", "")) if x), **ONE_BLAS_THREAD}}
    if address:
        ray.init(address=address, **kw)
    else:
        ray.init(num_cpus=jobs, **kw)
    return True


def run_ray(paths: list[str], cfg: ScanConfig, on_result: Callable[[int, Any], None], *, jobs: int = 1,
            address: str | None = None, timeout: float | None = None, batch_bytes: int = BATCH_BYTES,
            batch_max: int = BATCH_MAX) -> None:
    """Scan ``paths`` on Ray (a local one with ``jobs`` CPUs, or the cluster at ``address``)."""
    if not paths:
        return
    started = _init(address, jobs)
    ray = require("ray", "the ray backend")

    try:
        task = ray.remote(num_cpus=1, max_retries=0)(_run_batch)
        cfg_ref = ray.put(cfg)
        pending = {}
        for b in batches(paths, batch_bytes, batch_max):
            ref = task.remote(b, cfg_ref)
            pending[ref] = (b, time.monotonic() + timeout * len(b) if timeout else float("inf"))
        while pending:
            nearest = min(d for _, d in pending.values()) - time.monotonic()
            done, _ = ray.wait(list(pending), num_returns=1, timeout=None if nearest == float("inf") else max(nearest, 0))
            for ref in done:
                b, _ = pending.pop(ref)
                try:
                    results = ray.get(ref)
                except Exception as e:  # a task killed (memory monitor, node lost): its adapters get error rows
                    first = (str(e).strip().splitlines() or [""])[-1][:300]
                    results = [(i, error_row(p, f"{p}: the Ray task reading it failed ({type(e).__name__}: {first})",
                                             cfg).to_dict()) for i, p in b]
                for i, res in results:
                    on_result(i, res)
            now = time.monotonic()
            for ref, (b, deadline) in list(pending.items()):
                if now >= deadline:
                    ray.cancel(ref, force=True)
                    del pending[ref]
                    for i, p in b:
                        on_result(i, error_row(p, f"{p}: no result after {timeout:g} s per adapter (the time limit); "
                                                  "its Ray task was cancelled", cfg).to_dict())
    finally:
        if started:
            ray.shutdown()
