"""The policy in a pyproject.toml: one reader for ``check`` (the nearest pyproject.toml, or ``--policy``)
and ``scan --policy``.

Where the keys go: ``[tool.lora-inspect.check]`` (the documented table) or straight under
``[tool.lora-inspect]`` — both are read, as one policy; a key set in both is refused (which would win is
not obvious). Every key is one :data:`~lora_inspect.checks.POLICY_KEYS` (``max-rank`` or ``max_rank``);
anything else, a sub-table other than ``check`` included, is an error naming it. A ``[tool.lora-inspect]``
table that sets no key is an error too (a policy that checks nothing is a mistake); a pyproject.toml
without one is an error only when the user named it (``--policy``): found by walking up from the working
directory, it is just some project's file, and the defaults apply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InspectError
from .policy import POLICY_KEYS, policy_from_table

__all__ = ["find_pyproject", "read_policy_file", "TABLES"]

TABLES = ("[tool.lora-inspect]", "[tool.lora-inspect.check]")


def find_pyproject(start: Path) -> Path | None:
    """The nearest pyproject.toml at or above ``start`` (as black and ruff find theirs)."""
    for d in [start, *start.parents]:
        p = d / "pyproject.toml"
        if p.is_file():
            return p
    return None


def _load(path: Path) -> dict[str, Any]:
    from ..optional import tomllib  # the standard library's on 3.11+, tomli on 3.10
    from ..validate import open_regular

    try:
        with open_regular(path) as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise InspectError(f"{path}: not valid TOML ({e})") from e
    except UnicodeDecodeError as e:
        raise InspectError(f"{path}: not UTF-8 text (byte {e.start})") from e


def _tables(path: Path, tool: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the keys straight under [tool.lora-inspect], the [tool.lora-inspect.check] table)."""
    if not isinstance(tool, dict):
        raise InspectError(f"{path}: tool.lora-inspect must be a table ({TABLES[0]})")
    check = tool.get("check", {})
    if not isinstance(check, dict):
        raise InspectError(f"{path}: tool.lora-inspect.check must be a table ({TABLES[1]})")
    top = {k: v for k, v in tool.items() if k != "check"}
    sub = next((k for k, v in top.items() if isinstance(v, dict)), None)
    if sub is not None:
        raise InspectError(f"{path}: unknown table [tool.lora-inspect.{sub}] (the policy goes in {TABLES[1]} "
                           f"or {TABLES[0]})")
    return top, check


def read_policy_file(path: Path, *, named: bool) -> dict[str, Any] | None:
    """Policy fields (as :class:`~lora_inspect.checks.Policy` takes them) from ``path``; None when the file
    has no ``[tool.lora-inspect]`` table and was not ``named`` by the user (see the module docstring).
    A relative ``base`` path is relative to the file."""
    tool = _load(path).get("tool", {})
    tool = tool.get("lora-inspect") if isinstance(tool, dict) else None
    if tool is None:
        if not named:
            return None
        raise InspectError(f"{path}: no {TABLES[1]} or {TABLES[0]} table (the policy keys: "
                           f"{', '.join(POLICY_KEYS)})")
    top, check = _tables(path, tool)
    fields = policy_from_table(top, f"{path} {TABLES[0]}")
    below = policy_from_table(check, f"{path} {TABLES[1]}")
    both = sorted(set(fields) & set(below))
    if both:
        raise InspectError(f"{path}: {both[0].replace('_', '-')} is set in both {TABLES[0]} and {TABLES[1]}; "
                           "keep one")
    fields.update(below)
    if not fields:
        raise InspectError(f"{path}: neither {TABLES[1]} nor {TABLES[0]} sets a policy key (the keys: "
                           f"{', '.join(POLICY_KEYS)})")
    base = fields.get("base")
    if base and ("/" in base or base.endswith(".json")) and not Path(base).is_absolute():
        fields["base"] = str(path.parent / base)  # relative to the pyproject.toml
    return fields
