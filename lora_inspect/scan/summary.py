"""What a whole scan found: :class:`ScanSummary`, computed from the rows (new and resumed alike)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ScanSummary", "summarise_rows"]


@dataclass
class ScanSummary:
    """Counts over all rows. ``rank_histogram``: stored r → (adapters with that largest r, adapters whose
    recommended uniform rank is that r). ``bytes_saved``: Σ (bytes − bytes at the recommended uniform rank)."""

    adapters: int
    analysed: int
    errors: int
    check_failed: int
    by_layout: dict[str, int]
    rank_histogram: dict[int, tuple[int, int]]
    bytes: int
    bytes_uniform: int
    bytes_saved: int
    params_saved: int
    failing_rules: list[tuple[str, int]]
    flags: dict[str, int]
    error_examples: list[tuple[str, str]] = field(default_factory=list)


def summarise_rows(rows: list[dict[str, Any]], top: int = 10) -> ScanSummary:
    ok = [r for r in rows if not r.get("error")]
    errs = [r for r in rows if r.get("error")]
    layouts = Counter(r.get("layout") or "?" for r in ok)
    if errs:
        layouts["(error)"] = len(errs)
    stored = Counter(int(r["r"]) for r in ok if r.get("r") is not None)
    rec = Counter(int(r["uniform_rank"]) for r in ok if r.get("uniform_rank") is not None)
    ranks = sorted(set(stored) | set(rec))
    rules = Counter(rule for r in rows for rule in r.get("check_failed") or [])
    flags = Counter(f for r in ok for f in r.get("flags") or [])
    b_now = sum(r.get("bytes") or 0 for r in ok)
    b_uni = sum(r.get("bytes_uniform") or 0 for r in ok)
    p_saved = sum((r.get("params") or 0) - (r.get("params_uniform") or 0) for r in ok)
    return ScanSummary(
        adapters=len(rows),
        analysed=len(ok),
        errors=len(errs),
        check_failed=sum(1 for r in ok if r.get("check_ok") is False),
        by_layout=dict(sorted(layouts.items(), key=lambda kv: (-kv[1], kv[0]))),
        rank_histogram={k: (stored.get(k, 0), rec.get(k, 0)) for k in ranks},
        bytes=b_now,
        bytes_uniform=b_uni,
        bytes_saved=b_now - b_uni,
        params_saved=p_saved,
        failing_rules=sorted(rules.items(), key=lambda kv: (-kv[1], kv[0]))[:top],
        flags=dict(sorted(flags.items())),
        error_examples=[(r["path"], r["error"]) for r in errs[:top]],
    )
