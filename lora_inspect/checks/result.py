"""One row of a ``check`` report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Result"]


@dataclass
class Result:
    rule: str
    ok: bool
    value: Any
    limit: Any
    message: str = ""
