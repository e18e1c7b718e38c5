"""How long this process has run: the "wall" a scan reports covers the interpreter's start-up and the
imports (torch alone takes seconds) as well as the scan, as ``time`` on the command line would.

Linux: the kernel's start time of the process (``/proc/self/stat`` field 22, clock ticks since boot) against
``CLOCK_BOOTTIME`` now, the clock that start time is counted on (read by a system call, so a container whose
``/proc/uptime`` is rewritten still agrees). Elsewhere, or when the two disagree, there is no such number
(None) and the caller says what it measured instead.
"""

from __future__ import annotations

import os
import time

__all__ = ["process_seconds"]


def _start_ticks(stat: str) -> int:
    """Field 22 (starttime) of ``/proc/PID/stat``; the command name (field 2) may hold spaces and ')'."""
    rest = stat[stat.rindex(")") + 2:].split()
    return int(rest[22 - 3])  # rest starts at field 3 (state)


def process_seconds() -> float | None:
    """Seconds since this process started, or None where that cannot be read."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    if boottime is None:
        return None
    try:
        with open("/proc/self/stat", encoding="ascii", errors="replace") as f:
            ticks = _start_ticks(f.read())
        hz = os.sysconf("SC_CLK_TCK")
        now = time.clock_gettime(boottime)
    except (OSError, ValueError, IndexError):
        return None
    seconds = now - ticks / hz
    return seconds if 0 <= seconds < 10 * 365 * 86400 else None
