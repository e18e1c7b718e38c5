"""The limits ``check`` enforces: :class:`Policy`, from ``[tool.lora-inspect.check]`` in pyproject.toml
and from the command line."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import InspectError
from ..units import parse_count, parse_size
from .serving import parse_serving

__all__ = ["Policy", "POLICY_KEYS", "parse_min_energy", "policy_from_table"]


@dataclass
class Policy:
    """The limits to enforce; ``None`` means the rule is off."""

    max_rank: int | None = None
    max_params: int | None = None
    max_size: int | None = None
    max_extra_params: int | None = None
    min_energy: tuple[float, int] | None = None
    allow_dora: bool | None = None  # False: --deny-dora; True: --allow-dora (explicitly fine)
    require_finite: bool = True  # the "finite" row of the integrity rule (off: only "trained" runs)
    integrity: bool = True  # the integrity rule: no NaN/inf in any tensor, no module with an all-zero B
    serving: list[tuple[str, int | None]] = field(default_factory=list)
    base: str | None = None  # preset name or config.json path

    @property
    def needs_spectra(self) -> bool:
        return self.min_energy is not None

    @property
    def needs_values(self) -> bool:
        return self.integrity

    def describe(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["min_energy"] = None if self.min_energy is None else {"energy": self.min_energy[0], "rank": self.min_energy[1]}
        d["serving"] = [p if r is None else f"{p}:{r}" for p, r in self.serving]
        return d


def parse_min_energy(text: str) -> tuple[float, int]:
    """``"0.9@16"`` → (0.9, 16): every module keeps ≥ 90% of Σσ² in its top 16 directions."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*@\s*([0-9]+)\s*", str(text))
    if not m:
        raise InspectError(f"--min-energy {text!r}: expected τ@K, e.g. 0.9@16 (keep 90% of the energy at rank 16)")
    tau, k = float(m.group(1)), int(m.group(2))
    if not 0 < tau <= 1:
        raise InspectError(f"--min-energy {text!r}: τ must be in (0, 1]")
    if k < 1:
        raise InspectError(f"--min-energy {text!r}: K must be at least 1")
    return tau, k


POLICY_KEYS = ("max-rank", "max-params", "max-size", "max-extra-params", "min-energy", "allow-dora", "dora",
               "require-finite", "integrity", "serving", "base")


def _pos_int(v: Any, key: str, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InspectError(f"{where}: {key} must be a positive integer, found {v!r}")
    return v


def _bool(v: Any, key: str, where: str) -> bool:
    if not isinstance(v, bool):
        raise InspectError(f"{where}: {key} must be true or false, found {v!r}")
    return v


def _dora(v: Any, key: str, where: str) -> bool:
    if v not in ("allow", "deny"):
        raise InspectError(f"{where}: dora must be \"allow\" or \"deny\", found {v!r}")
    return v == "allow"


def _serving_list(v: Any, key: str, where: str) -> list[tuple[str, int | None]]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise InspectError(f"{where}: serving must be a string or a list of strings such as \"vllm:16\"")
    return [parse_serving(i) for i in items]


def _base(v: Any, key: str, where: str) -> str:
    if not isinstance(v, str):
        raise InspectError(f"{where}: base must be a preset name or a config.json path")
    return v


# pyproject key → (Policy field, parser(value, key, where))
_TABLE_PARSERS: dict[str, tuple[str, Callable[[Any, str, str], Any]]] = {
    "max-rank": ("max_rank", _pos_int),
    "max-params": ("max_params", lambda v, k, w: parse_count(v, f"{w} {k}")),
    "max-extra-params": ("max_extra_params", lambda v, k, w: parse_count(v, f"{w} {k}")),
    "max-size": ("max_size", lambda v, k, w: parse_size(v, f"{w} {k}")),
    "min-energy": ("min_energy", lambda v, k, w: parse_min_energy(v)),
    "allow-dora": ("allow_dora", _bool),
    "dora": ("allow_dora", _dora),
    "require-finite": ("require_finite", _bool),
    "integrity": ("integrity", _bool),
    "serving": ("serving", _serving_list),
    "base": ("base", _base),
}


def policy_from_table(table: dict[str, Any], where: str = "[tool.lora-inspect.check]") -> dict[str, Any]:
    """Validate a ``[tool.lora-inspect.check]`` table into Policy fields; unknown keys are an error naming the key."""
    if not isinstance(table, dict):
        raise InspectError(f"{where}: expected a table")
    out: dict[str, Any] = {}
    for raw_key, v in table.items():
        key = str(raw_key).replace("_", "-")
        if key not in _TABLE_PARSERS:
            raise InspectError(f"{where}: unknown key {raw_key!r} (known: {', '.join(POLICY_KEYS)})")
        name, parse = _TABLE_PARSERS[key]
        out[name] = parse(v, key, where)
    return out


