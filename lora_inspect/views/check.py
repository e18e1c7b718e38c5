"""The ``check`` report: one row per adapter × rule, and the ``lora-inspect/check/1`` document."""

from __future__ import annotations

from typing import Any

from ..checks import Policy, Result
from .render import Table, View
from .schemas import CHECK_SCHEMA
from .words import plural, verb

__all__ = ["check_view", "applied_check_view"]


def _fmt_value(rule: str, v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, int) and rule == "max-size":
        return f"{v:,} B"
    if isinstance(v, int) and rule in ("max-params", "max-extra-params"):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def check_view(entries: list[tuple[str, list[Result]]], policy: Policy, source: str | None,
               skipped: list[str] | None = None) -> View:
    """One table per adapter (a row per rule); the JSON document ``lora-inspect/check/1``. ``skipped``: tensor
    files without LoRA keys found in the folders given (base weights), said in the header and in ``not_adapters``."""
    failed = sum(1 for _, rs in entries for r in rs if not r.ok)
    bad_adapters = sum(1 for _, rs in entries if any(not r.ok for r in rs))
    data = {
        "schema": CHECK_SCHEMA,
        "ok": failed == 0,
        "failures": failed,
        "policy": policy.describe(),
        "policy_source": source,
        "not_adapters": list(skipped or []),
        "adapters": [
            {"path": p, "ok": all(r.ok for r in rs),
             "results": [{"rule": r.rule, "ok": r.ok, "value": r.value, "limit": r.limit, "message": r.message} for r in rs]}
            for p, rs in entries
        ],
    }
    tables = [_adapter_table(p, rs) for p, rs in entries]
    n = len(entries)
    checks = sum(len(rs) for _, rs in entries)
    footer = [
        f"✗ {plural(failed, 'rule')} failed in {bad_adapters} of {plural(n, 'adapter')}"
        if failed else f"✓ {'the' if checks == 1 else 'all'} {plural(checks, 'check')} passed for {plural(n, 'adapter')}"
    ]
    header = [f"lora-inspect check — policy from {source}" if source else "lora-inspect check"]
    if skipped:
        k = len(skipped)
        header.append(f"{plural(k, 'tensor file')} without LoRA keys (base weights) not checked: "
                      f"{', '.join(skipped[:3])}{' …' if k > 3 else ''}")
    return View(data, tables, header=header, footer=footer)


def _adapter_table(path: str, rs: list[Result]) -> Table:
    """One adapter's rules (a table per adapter: the path is said once, in the title)."""
    bad = sum(not r.ok for r in rs)
    title = f"{path}: " + (f"{bad} of {plural(len(rs), 'rule')} failed" if bad
                           else f"{'the' if len(rs) == 1 else 'all'} {plural(len(rs), 'rule')} {verb(len(rs), 'holds')}")
    rows = [(r.rule, _fmt_value(r.rule, r.value), _fmt_value(r.rule, r.limit), "ok" if r.ok else "FAIL", r.message)
            for r in rs]
    return Table(title, ["rule", "value", "limit", "result", "detail"], rows,
                 justify=["left", "right", "right", "left", "left"], kinds=["text", "text", "text", "fixed", "text"])



def applied_check_view(rep) -> View:
    """``check --applied``: the ``lora-inspect/applied/1`` document and its lines (:mod:`lora_inspect.views.fit`)."""
    from .fit import applied_view

    return applied_view(rep)
