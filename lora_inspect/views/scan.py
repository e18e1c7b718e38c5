"""The ``scan`` summary (``lora-inspect/scan/1``) and its progress bar (rate and ETA)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

from ..scan import ScanOutcome, ScanSummary
from .render import Table, View, fmt_bytes, fmt_count, stderr_console
from .schemas import SCAN_SCHEMA
from .words import plural, verb

__all__ = ["scan_view", "scan_progress"]


def _clock(outcome: ScanOutcome, process: float | None) -> str:
    """The wall time, truthfully: since the process started (imports included) where that is known."""
    if process is None:
        return f"{outcome.seconds:.1f} s scanning, not counting start-up"
    return f"{process:.1f} s wall since the process started, {outcome.seconds:.1f} s of it scanning"


def scan_view(summary: ScanSummary, outcome: ScanOutcome, out: str, backend: str, jobs: int,
              process_seconds: float | None = None) -> View:
    """Counts by layout, the rank histogram, bytes truncation would save, the rules failing most.
    ``process_seconds``: how long the process has run (``scan.process_seconds``), the wall time shown."""
    s = summary
    data: dict[str, Any] = {
        "schema": SCAN_SCHEMA, "output": out, "journal": str(outcome.journal), "backend": backend, "jobs": jobs,
        "found": outcome.found, "new_rows": outcome.new, "skipped": outcome.skipped, "not_adapters": outcome.not_adapters,
        "seconds": round(outcome.seconds, 3),
        "process_seconds": None if process_seconds is None else round(process_seconds, 3), **asdict(s),
    }
    data["rank_histogram"] = [{"rank": k, "adapters": a, "recommended": b} for k, (a, b) in s.rank_histogram.items()]
    data["failing_rules"] = [{"rule": k, "adapters": n} for k, n in s.failing_rules]
    data["error_examples"] = [{"path": p, "error": e} for p, e in s.error_examples]
    rate = outcome.new / outcome.seconds if outcome.seconds > 0 else 0.0
    data["rate"] = round(rate, 3)
    header = [f"{plural(s.adapters, 'adapter')} in {out}: {s.analysed} analysed, {s.errors} unreadable, "
              f"{s.check_failed} failing the policy; {plural(outcome.new, 'new row')}, {outcome.skipped} skipped "
              f"({backend}, {plural(jobs, 'job')}; {_clock(outcome, process_seconds)})"]
    if outcome.not_adapters:
        n = outcome.not_adapters
        header.append(f"{plural(n, 'tensor file')} without LoRA keys (base weights) {verb(n, 'was')} not counted")
    tables = [
        Table("by layout", ["layout", "adapters"], [[k, v] for k, v in s.by_layout.items()]),
        Table("rank histogram", ["r", "adapters (stored r)", "adapters (recommended r)"],
              [[k, a, b] for k, (a, b) in s.rank_histogram.items()]),
        Table("truncation", ["bytes now", "at recommended r", "would save", "params saved"],
              [[fmt_bytes(s.bytes), fmt_bytes(s.bytes_uniform), fmt_bytes(s.bytes_saved), fmt_count(s.params_saved)]],
              kinds=["fixed"] * 4),
    ]
    if s.failing_rules:
        tables.append(Table("rules failing most", ["rule", "adapters"], [[k, n] for k, n in s.failing_rules]))
    if s.error_examples:
        tables.append(Table("unreadable (first ones)", ["path", "error"], [[p, e] for p, e in s.error_examples], justify=["left", "left"],
                            kinds=["path", "text"]))
    return View(data, tables, header)


@contextmanager
def scan_progress(enabled: bool = True) -> Iterator[tuple[Any, Any]]:
    """A progress bar on stderr with count, rate (adapters/s) and ETA; yields (set_total(n), advance())."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = stderr_console()
    if not enabled or not console.is_terminal:
        yield (lambda n: None), (lambda row=None: None)
        return
    with Progress(TextColumn("scan"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("scan", total=None, rate="")

        def advance(row=None) -> None:
            bar.advance(task, 1)
            speed = bar.tasks[0].speed
            bar.update(task, rate=f"{speed:.1f}/s" if speed else "")

        yield (lambda n: bar.update(task, total=n)), advance
