"""Where values from files enter: every number, string, list and JSON document read from a header,
a config or metadata is checked here, with one line naming the file, the key and the value.

This module is the validation layer of the contract (README, "Exit codes and errors"): JSON is parsed
with depth and size limits, only regular files are opened, and patterns that come from files are
matched in time linear in the name. It imports nothing heavy (no torch, no numpy).

API (stable; other modules call only these):

- :func:`open_regular` / :func:`require_regular_file` — refuse FIFOs, devices, sockets, directories.
- :func:`parse_json` — bytes or text → Python value, with size/depth limits and BOM handling.
- :func:`read_json_object` — a JSON file that must hold an object (adapter_config.json …).
- :func:`number`, :func:`integer`, :func:`boolean`, :func:`string`, :func:`string_list`,
  :func:`mapping` — typed fields of a config, each with the file and key in its error.
- :func:`compile_pattern` — a ``rank_pattern``/``alpha_pattern``/``target_modules`` key from a file,
  as a predicate on module names that runs in linear time, or one line refusing it.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO, Callable

from .errors import InspectError

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_NAME_LENGTH",
    "open_regular",
    "require_regular_file",
    "parse_json",
    "read_json_object",
    "number",
    "integer",
    "boolean",
    "string",
    "string_list",
    "mapping",
    "compile_pattern",
]

MAX_JSON_BYTES = 100 * 1024 * 1024  # a config or header larger than this is not an adapter's
MAX_JSON_DEPTH = 64  # adapter configs nest 3 deep; safetensors headers 3
MAX_NAME_LENGTH = 4096  # longest module/tensor name accepted (real names are < 200 characters)

_MISSING = object()


def require_regular_file(path: Path) -> None:
    """One line unless ``path`` is a regular file (a FIFO would block a reader forever)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise InspectError(f"{path}: cannot read: {e.strerror or e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise InspectError(f"{path}: not a regular file")


def open_regular(path: Path) -> BinaryIO:
    """Open a regular file for reading without blocking on special files."""
    require_regular_file(path)
    try:
        return open(path, "rb")
    except OSError as e:
        raise InspectError(f"{path}: cannot read: {e.strerror or e}") from e


def parse_json(raw: bytes | str, where: str) -> Any:
    """Parse JSON with size and depth limits; a UTF-8/UTF-16/UTF-32 BOM is honoured.
    NaN/Infinity literals are accepted here; the typed field readers reject non-finite numbers."""
    if isinstance(raw, bytes):
        if len(raw) > MAX_JSON_BYTES:
            raise InspectError(f"{where}: JSON larger than {MAX_JSON_BYTES} bytes")
        for bom, enc in ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
                         (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")):
            if raw.startswith(bom):
                break
        else:
            enc = "utf-8"
        try:
            text = raw.decode(enc)
        except UnicodeDecodeError as e:
            raise InspectError(f"{where}: not valid {enc.upper()} text ({e.reason} at byte {e.start})") from e
    else:
        text = raw
    depth = _max_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise InspectError(f"{where}: JSON nested {depth} levels deep (limit {MAX_JSON_DEPTH})")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InspectError(f"{where}: not valid JSON (line {e.lineno}: {e.msg})") from e
    except RecursionError as e:  # pragma: no cover - the depth check comes first
        raise InspectError(f"{where}: JSON nested too deeply") from e


def _max_depth(text: str) -> int:
    """Nesting depth of brackets outside strings, in one linear pass."""
    depth = best = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            best = max(best, depth)
        elif ch in "]}":
            depth -= 1
    return best


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (``adapter_config.json``, ``config.json``)."""
    with open_regular(path) as f:
        try:
            raw = f.read(MAX_JSON_BYTES + 1)
        except OSError as e:
            raise InspectError(f"{path}: cannot read: {e.strerror or e}") from e
    value = parse_json(raw, str(path))
    if not isinstance(value, dict):
        raise InspectError(f"{path}: expected a JSON object, found {_kind(value)}")
    return value


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


def _show(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def number(cfg: dict, key: str, where: str, *, default: Any = _MISSING, minimum: float | None = None,
           positive: bool = False, nonzero: bool = False) -> Any:
    """A finite number (int or float, not bool) at ``cfg[key]``; ``default`` when absent or null."""
    v = cfg.get(key, None)
    if v is None:
        if default is _MISSING:
            raise InspectError(f"{where}: {key} is missing")
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InspectError(f"{where}: {key} must be a number, found {_kind(v)} {_show(v)}")
    if not math.isfinite(v):
        raise InspectError(f"{where}: {key} must be finite, found {v}")
    if positive and not v > 0:
        raise InspectError(f"{where}: {key} must be > 0, found {v}")
    if nonzero and v == 0:
        raise InspectError(f"{where}: {key} must not be 0")
    if minimum is not None and v < minimum:
        raise InspectError(f"{where}: {key} must be ≥ {minimum:g}, found {v}")
    return v


def integer(cfg: dict, key: str, where: str, *, default: Any = _MISSING, minimum: int | None = None) -> Any:
    """An integer (a float with an integral value is accepted, as JSON writers differ)."""
    v = number(cfg, key, where, default=default, minimum=minimum)
    if v is default:
        return v
    if isinstance(v, float):
        if not v.is_integer():
            raise InspectError(f"{where}: {key} must be an integer, found {v}")
        v = int(v)
    return v


def boolean(cfg: dict, key: str, where: str, *, default: bool = False) -> bool:
    v = cfg.get(key, None)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise InspectError(f"{where}: {key} must be true or false, found {_kind(v)} {_show(v)}")
    return v


def string(cfg: dict, key: str, where: str, *, default: Any = None) -> Any:
    v = cfg.get(key, None)
    if v is None:
        return default
    if not isinstance(v, str):
        raise InspectError(f"{where}: {key} must be a string, found {_kind(v)} {_show(v)}")
    return v


def string_list(cfg: dict, key: str, where: str, *, default: Any = None, allow_str: bool = True) -> Any:
    """A list of strings (or, with ``allow_str``, one string: PEFT's regex form of target_modules)."""
    v = cfg.get(key, None)
    if v is None:
        return default
    if allow_str and isinstance(v, str):
        return v
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise InspectError(f"{where}: {key} must be a list of strings, found {_kind(v)} {_show(v)}")
    return v


def mapping(cfg: dict, key: str, where: str, *, values: Callable[[Any], bool] | None = None,
            what: str = "values") -> dict:
    """An object (``{}`` when absent or null); ``values`` checks each value."""
    v = cfg.get(key, None)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise InspectError(f"{where}: {key} must be an object, found {_kind(v)} {_show(v)}")
    if values is not None:
        for k, x in v.items():
            if not values(x):
                raise InspectError(f"{where}: {key}[{k!r}] must be {what}, found {_kind(x)} {_show(x)}")
    return v


def compile_pattern(key: str, where: str) -> Callable[[str], bool]:
    """PEFT matches a pattern key against a module name as ``re.match(rf"(.*\\.)?({key})$", name)``
    (peft.utils.other.get_pattern_key). Keys come from untrusted files, so:

    - a plain dotted name (letters, digits, ``_``, ``-``, ``.``) matches literally: the name equals the
      key or ends with ``"." + key`` — the same answer as PEFT's regex, in linear time;
    - anything else is matched by a linear-time matcher for a safe regex subset, or refused with one line.
    """
    if _PLAIN(key):
        return lambda name: name == key or name.endswith("." + key)
    raise InspectError(f"{where}: pattern {key!r} is not a plain module name; only plain dotted names are supported")


def _PLAIN(key: str) -> bool:
    return bool(key) and all(c.isalnum() or c in "._-" for c in key) and not key.startswith(".")
