"""The local backend: a pool of worker processes, one adapter per task, with a time and memory limit each.

Why not ``concurrent.futures.ProcessPoolExecutor``: it cannot stop one task that hangs, and one worker
killed by the kernel (out of memory) breaks the whole pool and every task in flight. Here each worker
is a process of our own (``multiprocessing`` forkserver context, spawn where there is none) with a pipe;
the driver keeps :data:`IN_FLIGHT` paths queued at each worker (so that a worker starts its next adapter
without waiting for the driver to take the last row), waits on every pipe and process sentinel with the
nearest deadline as timeout, and when an adapter runs past ``timeout`` or its worker dies, that adapter —
the one the worker was reading — gets an error row, the paths queued behind it go back to the queue, the
worker is killed and replaced, and the scan goes on. Memory is bounded by what one worker needs for
the largest adapter times the number of workers; the driver holds rows only.

BLAS runs single-threaded in the workers (the pool is the parallelism): :data:`ONE_BLAS_THREAD` is set in
the environment while a worker (and with it the forkserver, which preloads numpy) is started, so the
children's BLAS reads it when it loads; the driver's own environment is restored right after.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any

from .row import ScanConfig, error_row

__all__ = ["run_local", "ONE_BLAS_THREAD", "one_blas_thread"]

Result = Callable[[int, "dict[str, Any] | str"], None]
# read by OpenBLAS, OpenMP, MKL and Accelerate once, when the library loads (numpy's import)
ONE_BLAS_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                   "VECLIB_MAXIMUM_THREADS": "1"}


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """:data:`ONE_BLAS_THREAD` in ``os.environ`` for the block (processes started in it inherit it), then
    the previous values back (unset ones unset)."""
    saved = {k: os.environ.get(k) for k in ONE_BLAS_THREAD}
    os.environ.update(ONE_BLAS_THREAD)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _context():
    try:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["lora_inspect.scan.worker"])
        return ctx
    except ValueError:  # pragma: no cover - no forkserver on this platform
        return mp.get_context("spawn")


IN_FLIGHT = 2  # paths queued at a worker: the one it reads and the next


@dataclass
class _Worker:
    proc: Any
    conn: Any
    tasks: deque = field(default_factory=deque)  # (index, path) sent, oldest (the one being read) first
    deadline: float = 0.0  # for tasks[0]: from when the worker started it

    @property
    def task(self) -> tuple[int, str] | None:
        return self.tasks[0] if self.tasks else None


def _start(ctx, cfg: ScanConfig, memory: int | None) -> _Worker:
    from .worker import serve

    parent, child = ctx.Pipe()
    proc = ctx.Process(target=serve, args=(child, cfg, memory), daemon=True)
    with one_blas_thread():  # the forkserver starts (and imports numpy) with the first worker
        proc.start()
    child.close()
    return _Worker(proc, parent)


def _stop(w: _Worker) -> None:
    if w.proc.is_alive():
        w.proc.kill()
    w.proc.join(5)
    w.conn.close()


def _died(w: _Worker, memory: int | None) -> str:
    code = w.proc.exitcode
    how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
    limit = f"; the memory limit is {memory / 2**30:.3g} GiB" if memory else ""
    return f"{w.task[1] if w.task else '?'}: the worker reading it ended ({how}){limit}"


def run_local(paths: list[str], cfg: ScanConfig, on_result: Result, *, jobs: int = 1,
              timeout: float | None = None, memory: int | None = None) -> None:
    """Scan ``paths`` with ``jobs`` worker processes; ``on_result(index, row dict | "skipped")`` is called
    in the driver as each adapter finishes (in completion order)."""
    if not paths:
        return
    ctx = _context()
    todo = deque(enumerate(paths))
    workers = [_start(ctx, cfg, memory) for _ in range(max(1, min(jobs, len(paths))))]
    limit = timeout if timeout else float("inf")
    try:
        while todo or any(w.tasks for w in workers):
            for w in workers:
                while todo and len(w.tasks) < IN_FLIGHT:
                    if not w.tasks:
                        w.deadline = time.monotonic() + limit
                    w.tasks.append(todo.popleft())
                    w.conn.send(w.tasks[-1])
            busy = [w for w in workers if w.tasks]
            wait_s = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready = set(wait([x for w in busy for x in (w.conn, w.proc.sentinel)],
                             None if wait_s == float("inf") else wait_s))
            for i, w in enumerate(workers):
                if w.tasks and _collect(w, ready, on_result, limit):
                    continue
                message = _failure(w, ready, memory, timeout)
                if message is not None:
                    index, path = w.tasks.popleft()
                    on_result(index, error_row(path, message, cfg).to_dict())
                    todo.extendleft(reversed(w.tasks))  # queued behind it, never started: read them again
                    _stop(w)
                    workers[i] = _start(ctx, cfg, memory)
    finally:
        for w in workers:
            with contextlib.suppress(OSError, ValueError):
                w.conn.send(None)
        for w in workers:
            w.proc.join(2)
            _stop(w)


def _collect(w: _Worker, ready: set, on_result: Result, limit: float) -> bool:
    """Hand on every row the worker has sent; True when it answered and is well."""
    if w.conn not in ready:
        return False
    try:
        while w.tasks and w.conn.poll():
            index, res = w.conn.recv()
            w.tasks.popleft()
            w.deadline = time.monotonic() + limit  # the next queued path starts now
            on_result(index, res)
    except (EOFError, OSError):
        return False
    return True


def _failure(w: _Worker, ready: set, memory: int | None, timeout: float | None) -> str | None:
    """Why the worker's current adapter gets an error row (it died, or ran past the time limit), or None."""
    if not w.tasks:
        return None
    if w.conn in ready or w.proc.sentinel in ready:
        w.proc.join(5)
        if w.proc.exitcode is not None:
            return _died(w, memory)
    if time.monotonic() >= w.deadline:
        return f"{w.tasks[0][1]}: no result after {timeout:g} s (the per-adapter time limit); its worker was stopped"
    return None
