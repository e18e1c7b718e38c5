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
- :func:`compile_pattern` — a ``rank_pattern``/``alpha_pattern`` key from a file, as a predicate on
  module names that runs in linear time, or one line refusing it; :func:`compile_fullmatch` — the same
  for a regex that must match a whole name (PEFT's string form of ``target_modules``);
  :func:`compile_pattern_table` — PEFT's first-matching-key lookup over a whole pattern table.

Decisions: a JSON object with the same key twice is refused (readers differ on which one wins, so
the file means different things to different tools); NaN/Infinity literals parse (Python's ``json``
accepts them) and every typed reader refuses them; numbers beyond ±2^53 are refused as out of range.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Callable, Sequence
from itertools import accumulate
from pathlib import Path
from typing import Any, BinaryIO

from . import _plain_keys, _safe_re
from .errors import InspectError
from .units import plural

__all__ = [
    "is_number",
    "show_value",
    "is_count",
    "utf8_reason",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_NAME_LENGTH",
    "MAX_TENSORS",
    "MAX_NUMBER",
    "MAX_PATTERN_LENGTH",
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
    "compile_fullmatch",
    "compile_pattern_table",
]

MAX_JSON_BYTES = 100 * 1024 * 1024  # a config or header larger than this is not an adapter's
MAX_JSON_DEPTH = 64  # adapter configs nest 3 deep; safetensors headers 3
MAX_NAME_LENGTH = 4096  # longest module/tensor name accepted (real names are < 200 characters)
MAX_TENSORS = 100_000  # tensors in one file (the largest real adapters hold ~10,000; SDXL kohya all-layers ~6,600)
MAX_NUMBER = 2**53  # largest magnitude of a config number (every integer up to it is exact in a float)
MAX_PATTERN_LENGTH = _safe_re.MAX_PATTERN_LENGTH

_MISSING = object()
_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFLNK: "a symbolic link"}


def _oserror(path: Path | str, e: OSError) -> InspectError:
    return InspectError(f"{path}: cannot read: {e.strerror or e}")


def _check_regular(path: Path | str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "a special file")
        raise InspectError(f"{path}: not a regular file but {kind}")


def require_regular_file(path: Path) -> None:
    """One line unless ``path`` is a regular file (a FIFO would block a reader forever)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise _oserror(path, e) from e
    _check_regular(path, st)


def open_regular(path: Path) -> BinaryIO:
    """Open a regular file for reading without blocking on special files: ``os.stat`` first (so a
    device is never opened), then a non-blocking open and ``fstat`` of what was opened (so a FIFO put in
    its place between the two calls cannot block either)."""
    require_regular_file(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise _oserror(path, e) from e
    try:
        _check_regular(path, os.fstat(fd))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _decode(raw: bytes, where: str) -> str:
    """Bytes → text: a BOM (UTF-8, UTF-16 LE/BE, UTF-32 LE/BE) is honoured and dropped, and BOM-less
    UTF-16/32 is recognised as RFC 8259 §8.1 allows (json.detect_encoding); otherwise strict UTF-8."""
    enc = json.detect_encoding(raw)
    try:
        return raw.decode(enc)
    except UnicodeDecodeError as e:
        name = {"utf-8-sig": "UTF-8"}.get(enc, enc.upper())
        raise InspectError(f"{where}: not valid {name} text ({utf8_reason(e)} at byte {e.start})") from e


_STRINGS = re.compile(rb'"[^"]*"')
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')
_DELTA = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def _max_depth(text: str) -> int:
    """Nesting depth of brackets outside strings, in linear time with C-level passes: escaped
    backslashes and quotes are removed (pairs, left to right, as a JSON lexer reads them), then every
    byte but brackets and quotes, then adjacent quote pairs (which keeps every remaining byte's
    inside/outside parity), then whatever strings are left."""
    data = text.encode("utf-8", "surrogatepass")  # multi-byte sequences never hold ASCII bytes
    if b"\\" in data:
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    structure = data.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in structure:
        structure = _STRINGS.sub(b"", structure).split(b'"', 1)[0]  # what follows a lone quote is in a string
    return max(accumulate(map(_DELTA.__getitem__, structure)), default=0)


def _no_duplicates(where: str) -> Callable[[list], dict]:
    def hook(pairs: list) -> dict:
        d = dict(pairs)
        if len(d) != len(pairs):
            seen: set = set()
            for k, _ in pairs:
                if k in seen:
                    raise InspectError(f"{where}: key {show_value(k)} appears twice in one JSON object (ambiguous)")
                seen.add(k)
        return d

    return hook


def parse_json(raw: bytes | str, where: str) -> Any:
    """Parse JSON with size (:data:`MAX_JSON_BYTES`) and depth (:data:`MAX_JSON_DEPTH`) limits; bytes
    may carry a UTF-8/UTF-16/UTF-32 BOM. NaN/Infinity literals are accepted here; the typed field
    readers reject non-finite numbers. A key repeated in one object is refused."""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        if len(raw) > MAX_JSON_BYTES:
            raise InspectError(f"{where}: JSON larger than {MAX_JSON_BYTES} bytes")
        text = _decode(bytes(raw), where)
    elif isinstance(raw, str):
        if len(raw) > MAX_JSON_BYTES:
            raise InspectError(f"{where}: JSON larger than {MAX_JSON_BYTES} characters")
        text = raw
    else:
        raise InspectError(f"{where}: expected JSON text, found {type(raw).__name__}")
    depth = _max_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise InspectError(f"{where}: JSON nested {depth} levels deep (limit {MAX_JSON_DEPTH})")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates(where))
    except json.JSONDecodeError as e:
        raise InspectError(f"{where}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from e
    except RecursionError as e:  # unbalanced brackets can fool the depth count: json's C scanner stops
        raise InspectError(f"{where}: JSON nested too deeply") from e
    except ValueError as e:  # e.g. an integer literal longer than Python's int_max_str_digits
        raise InspectError(f"{where}: not valid JSON ({str(e).splitlines()[0][:120]})") from e


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (``adapter_config.json``, ``config.json``)."""
    with open_regular(path) as f:
        try:
            raw = f.read(MAX_JSON_BYTES + 1)
        except OSError as e:
            raise _oserror(path, e) from e
    value = parse_json(raw, str(path))
    if not isinstance(value, dict):
        raise InspectError(f"{path}: expected a JSON object, found {_kind(value)}")
    return value


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", int: "an integer",
            float: "a number"}.get(type(v), type(v).__name__)


def show_value(v: Any) -> str:
    """A short one-line rendering of any value (bounded work: huge ints and containers are summarised)."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 200:
        return f"of {len(str(v)) if v.bit_length() < 10_000 else 'thousands of'} digits"
    if isinstance(v, str) and len(v) > 60:
        return repr(v[:57]) + "…"
    if isinstance(v, (list, dict)) and len(v) > 8:
        return f"{_kind(v)[2:] if _kind(v).startswith('a ') else _kind(v)} of {plural(len(v), 'item')}"
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _field(cfg: Any, key: str, where: str) -> Any:
    if not isinstance(cfg, dict):
        raise InspectError(f"{where}: expected an object holding {key}, found {_kind(cfg)} {show_value(cfg)}")
    return cfg.get(key, None)


def number(cfg: dict, key: str, where: str, *, default: Any = _MISSING, minimum: float | None = None,
           positive: bool = False, nonzero: bool = False, maximum: float | None = None) -> Any:
    """A finite number (int or float, not bool, |v| ≤ :data:`MAX_NUMBER`) at ``cfg[key]``;
    ``default`` when absent or null."""
    v = _field(cfg, key, where)
    if v is None:
        if default is _MISSING:
            raise InspectError(f"{where}: {key} is missing")
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InspectError(f"{where}: {key} must be a number, found {_kind(v)} {show_value(v)}")
    if isinstance(v, float) and not math.isfinite(v):
        raise InspectError(f"{where}: {key} must be finite, found {v}")
    if abs(v) > MAX_NUMBER:
        raise InspectError(f"{where}: {key} is out of range (|value| ≤ 2^53), found {_kind(v)} {show_value(v)}")
    if positive and not v > 0:
        raise InspectError(f"{where}: {key} must be > 0, found {v}")
    if nonzero and v == 0:
        raise InspectError(f"{where}: {key} must not be 0")
    if minimum is not None and v < minimum:
        raise InspectError(f"{where}: {key} must be ≥ {minimum:g}, found {v}")
    if maximum is not None and v > maximum:
        raise InspectError(f"{where}: {key} must be ≤ {maximum:g}, found {v}")
    return v


def integer(cfg: dict, key: str, where: str, *, default: Any = _MISSING, minimum: int | None = None,
            maximum: int | None = None) -> Any:
    """An integer (a float with an integral value is accepted, as JSON writers differ)."""
    v = number(cfg, key, where, default=default, minimum=minimum, maximum=maximum)
    if v is default and _field(cfg, key, where) is None:
        return v
    if isinstance(v, float):
        if not v.is_integer():
            raise InspectError(f"{where}: {key} must be an integer, found {v}")
        v = int(v)
    return v


def boolean(cfg: dict, key: str, where: str, *, default: bool = False) -> bool:
    """``true`` or ``false`` (not 0/1, not a string); ``default`` when absent or null."""
    v = _field(cfg, key, where)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise InspectError(f"{where}: {key} must be true or false, found {_kind(v)} {show_value(v)}")
    return v


def string(cfg: dict, key: str, where: str, *, default: Any = None) -> Any:
    """A string; ``default`` when absent or null."""
    v = _field(cfg, key, where)
    if v is None:
        return default
    if not isinstance(v, str):
        raise InspectError(f"{where}: {key} must be a string, found {_kind(v)} {show_value(v)}")
    return v


def string_list(cfg: dict, key: str, where: str, *, default: Any = None, allow_str: bool = True) -> Any:
    """A list of strings (or, with ``allow_str``, one string: PEFT's regex form of target_modules)."""
    v = _field(cfg, key, where)
    if v is None:
        return default
    if allow_str and isinstance(v, str):
        return v
    if not isinstance(v, list):
        raise InspectError(f"{where}: {key} must be a list of strings, found {_kind(v)} {show_value(v)}")
    for i, x in enumerate(v):
        if not isinstance(x, str):
            raise InspectError(f"{where}: {key}[{i}] must be a string, found {_kind(x)} {show_value(x)}")
    return v


def mapping(cfg: dict, key: str, where: str, *, values: Callable[[Any], bool] | None = None,
            what: str = "values") -> dict:
    """An object (``{}`` when absent or null); ``values`` checks each value."""
    v = _field(cfg, key, where)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise InspectError(f"{where}: {key} must be an object, found {_kind(v)} {show_value(v)}")
    if values is not None:
        for k, x in v.items():
            if not values(x):
                raise InspectError(f"{where}: {key}[{show_value(k)}] must be {what}, found {_kind(x)} {show_value(x)}")
    return v


def compile_pattern(key: str, where: str) -> Callable[[str], bool]:
    """PEFT matches a pattern key against a module name as ``re.match(rf"(.*\\.)?({key})$", name)``
    (peft.utils.other.get_pattern_key). Keys come from untrusted files, so:

    - a plain dotted name (letters, digits, ``_``, ``-``, ``.``) is matched without a regex engine —
      the same answer as PEFT's regex (``.`` still matches any character but a newline), in linear time;
    - anything else is matched by :mod:`lora_inspect._safe_re` (a Thompson NFA over a safe subset of
      Python's syntax, linear in the name, the same answer as ``re``), or refused with one line.
    """
    _check_key(key, where)
    if _plain_keys.is_plain(key):
        return _plain_keys.plain_matcher(key)
    return _compile(rf"(.*\.)?({key})$", key, where, full=False)


def compile_pattern_table(keys: Sequence[str], where: str) -> Callable[[str], int | None]:
    """PEFT's ``get_pattern_key`` for a whole ``rank_pattern``/``alpha_pattern``: the index of the first
    key (in the given order) that :func:`compile_pattern` would match, or None — without trying the
    keys one by one (a table of one key per module would make that quadratic); every key is checked
    (and an unsafe one refused) up front."""
    for key in keys:
        _check_key(key, where)
    return _plain_keys.PatternTable(list(keys), lambda k: compile_pattern(k, where))


def compile_fullmatch(regex: str, where: str) -> Callable[[str], bool]:
    """``bool(re.fullmatch(regex, name))`` in linear time (PEFT's string ``target_modules``), or one line."""
    _check_key(regex, where)
    return _compile(regex, regex, where, full=True)


def _check_key(key: Any, where: str) -> None:
    if not isinstance(key, str):
        raise InspectError(f"{where}: pattern {show_value(key)} must be a string, found {_kind(key)}")
    if len(key) > MAX_PATTERN_LENGTH:
        raise InspectError(f"{where}: pattern {show_value(key)} is longer than {MAX_PATTERN_LENGTH} characters")


def _compile(text: str, key: str, where: str, *, full: bool) -> Callable[[str], bool]:
    try:
        return _safe_re.compile_match(text, full=full)
    except _safe_re.PatternRefused as e:
        raise InspectError(f"{where}: pattern {show_value(key)} refused: {e} "
                           "(patterns are matched by a linear-time subset of Python regular expressions)") from e


def utf8_reason(e: UnicodeDecodeError) -> str:
    """The codec's reason in our words ("unexpected end of data" reads like a crash report)."""
    return {"unexpected end of data": "a character cut off at the end"}.get(e.reason, e.reason)


def is_number(x: Any) -> bool:
    """What :func:`number` accepts, as a predicate for values inside a mapping (``alpha_pattern``)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    # an int beyond float range (10**400) must not reach math.isfinite, which raises OverflowError for it
    return abs(x) <= MAX_NUMBER and (isinstance(x, int) or math.isfinite(x))


def is_count(x: Any) -> bool:
    """A positive integer (``rank_pattern`` values), as a predicate."""
    return isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= MAX_NUMBER
