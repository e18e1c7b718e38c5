"""The validation layer (lora_inspect.validate): patterns from files matched in linear time with the
answer of Python's ``re`` under PEFT's wrapper, JSON with limits, only regular files, typed fields.

Every property is checked against an independent computation (``re`` itself, ``json`` itself, a
hand-written rule); hypothesis runs derandomized so a failure reproduces."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lora_inspect import _safe_re, validate
from lora_inspect.errors import InspectError

PROPS = settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
WHERE = "cfg.json"


def peft_match(key: str, name: str) -> bool:
    """PEFT's own rule (peft.utils.other.get_pattern_key)."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


class _ReTimeout(Exception):
    pass


def _ref(fn, *args):
    """``re`` under a wall-clock guard: a random pattern may backtrack exponentially in ``re``."""

    def boom(*_):
        raise _ReTimeout

    old = signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        return fn(*args)
    except _ReTimeout:
        assume(False)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --- patterns: strategies ---------------------------------------------------------------------------

NAME_CHARS = "ab._\n1-x"
names = st.text(alphabet=NAME_CHARS, max_size=10)
TOKENS = list("ab._\n1x-") + ["\\", "(", ")", "[", "]", "^", "$", "|", "*", "+", "?", "{", "}", ",", "2",
                              "?:", "\\.", "\\d", "\\w", "\\s", "\\D", "\\n", "\\x61", "[^", "a-z", "{1,2}", "*?"]
token_soup = st.lists(st.sampled_from(TOKENS), max_size=10).map("".join)


def _subset_tree():
    atom = st.sampled_from(["a", "b", ".", "x", "\\.", "\\d", "\\w", "[ab]", "[^a\\n]", "[a-c_]", "[.]", "\\n", "_", "1"])
    leaf = st.one_of(atom, st.sampled_from(["^", "$"]))

    def extend(inner):
        quant = st.sampled_from(["*", "+", "?", "*?", "+?", "??", "{2}", "{0,2}", "{1,}", "{,3}"])
        return st.one_of(
            st.tuples(inner, inner).map("".join),
            st.tuples(inner, inner).map("|".join),
            inner.map(lambda s: f"({s})"),
            inner.map(lambda s: f"(?:{s})"),
            st.tuples(inner.map(lambda s: f"({s})"), quant).map("".join),
            st.tuples(atom, quant).map("".join),
        )

    return st.recursive(leaf, extend, max_leaves=8)


subset_patterns = _subset_tree()


def _agree(text: str, full: bool, samples: list[str]) -> None:
    try:
        mine = _safe_re.compile_match(text, full=full)
    except _safe_re.PatternRefused:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rx = re.compile(text)  # accepted by us ⇒ valid for re
    for name in samples:
        want = _ref(lambda n: (rx.fullmatch(n) if full else rx.match(n)) is not None, name)
        assert mine(name) == want, (text, name, want)


# --- patterns: properties ---------------------------------------------------------------------------


@PROPS
@given(key=token_soup, samples=st.lists(names, min_size=1, max_size=12))
def test_any_accepted_pattern_agrees_with_re_under_peft_wrapper(key, samples):
    _agree(rf"(.*\.)?({key})$", False, samples)


@PROPS
@given(key=token_soup, samples=st.lists(names, min_size=1, max_size=12))
def test_any_accepted_regex_agrees_with_re_fullmatch(key, samples):
    _agree(key, True, samples)


@PROPS
@given(key=subset_patterns, samples=st.lists(names, min_size=1, max_size=12))
def test_subset_patterns_are_accepted_and_agree_with_re(key, samples):
    pred = validate.compile_pattern(key, WHERE)  # every pattern of the subset is accepted
    for name in samples:
        assert pred(name) == _ref(peft_match, key, name), (key, name)


@PROPS
@given(key=st.text(alphabet="ab._-1é", min_size=1, max_size=8), samples=st.lists(st.text(alphabet="ab._-1é\nx", max_size=12), max_size=12))
def test_plain_keys_take_the_literal_path_and_agree_with_peft(key, samples):
    pred = validate.compile_pattern(key, WHERE)
    assert not isinstance(pred, _safe_re._Matcher)  # the literal fast path
    for name in samples + [key, "x." + key, "x" + key, key + "\n", "y\n." + key, "a." + key + "\n\n"]:
        assert pred(name) == peft_match(key, name), (key, name)


@pytest.mark.parametrize("key,name,want", [
    ("q_proj", "model.layers.0.self_attn.q_proj", True),
    ("q_proj", "model.layers.0.self_attn.kq_proj", False),
    ("layers.0.q_proj", "model.layersX0.q_proj", True),  # '.' is a wildcard for PEFT too
    ("q_proj", "q_proj\n", True),  # '$' matches before a final newline
    ("q_proj", "a\nb.q_proj", False),  # '.*' stops at a newline
    (r"layers\.\d+\.mlp\..*", "model.layers.12.mlp.up_proj", True),
    ("(q|v)_proj", "m.v_proj", True),
    ("^q_proj", "m.q_proj", False),
    ("", "m.", True),
])
def test_known_answers(key, name, want):
    assert validate.compile_pattern(key, WHERE)(name) is want
    assert peft_match(key, name) is want


@pytest.mark.parametrize("key,why", [
    ("(a)\\1", "back-reference"),
    ("(?=a)a", "(?"),
    ("(?i)a", "(?"),
    ("(?P<x>a)", "(?"),
    ("a*+", "possessive"),
    ("a{1000}", "larger than"),
    ("\\bq", "\\b"),
    ("[[a]]", "[["),
    ("a)", "closes no group"),
    ("(a", "never closed"),
    ("[a", "never closed"),
    ("a**", "multiple repeat"),
    ("*a", "nothing to repeat"),
    ("\\q", "escape"),
    ("(" * 60 + ")" * 60, "nest"),
    ("(a{100}){100}", "states"),
    ("x" * 1001, "longer than"),
])
def test_refused_patterns_give_one_line_naming_file_key_and_reason(key, why):
    with pytest.raises(InspectError) as e:
        validate.compile_pattern(key, WHERE)
    msg = str(e.value)
    assert msg.startswith(WHERE + ": pattern ") and "\n" not in msg and why in msg, msg
    assert repr(key[:20])[:-1] in msg


def test_non_string_key_is_one_line():
    with pytest.raises(InspectError, match="must be a string"):
        validate.compile_pattern(5, WHERE)


PATHOLOGICAL = [("(.*)*x", "a" * 100_000), ("(a|aa)*b", "a" * 100_000), ("(a+)+$", "a" * 99_999 + "!"),
                ("(a+)+$", "a" * 100_000), ("(.*.*)*=", "x" * 100_000 + "\n"), ("[ab]*a[ab]{30}", "ab" * 50_000)]


@pytest.mark.parametrize("key,name", PATHOLOGICAL)
def test_pathological_patterns_answer_correctly_on_long_names(key, name):
    got = validate.compile_pattern(key, WHERE)(name)
    # independent answer: each pattern's language is simple enough to state directly
    want = {"(.*)*x": "x" in name.split("\n")[-1], "(a|aa)*b": name.endswith("b"),
            "(a+)+$": name.rstrip("\n").split(".")[-1] != "" and set(name.rstrip("\n").split(".")[-1]) == {"a"},
            "(.*.*)*=": "=" in name, "[ab]*a[ab]{30}": len(name) > 30 and name[-31] == "a"}[key]
    assert got is want


# --- JSON ------------------------------------------------------------------------------------------


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=20,
)


@PROPS
@given(value=json_values, enc=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32",
                                                "utf-32-le", "utf-32-be"]))
def test_parse_json_round_trips_in_every_unicode_encoding(value, enc):
    text = json.dumps(value, ensure_ascii=False)
    assert validate.parse_json(text.encode(enc), WHERE) == json.loads(text)
    assert validate.parse_json(text, WHERE) == json.loads(text)


@PROPS
@given(value=json_values, extra=st.integers(1, 10))
def test_depth_is_measured_like_the_structure(value, extra):
    def depth(v):
        if isinstance(v, (list, dict)):
            inner = v.values() if isinstance(v, dict) else v
            return 1 + max(map(depth, inner), default=0)
        return 0

    wrapped = value
    for _ in range(extra):
        wrapped = [wrapped, '"[{\\"']
    assert validate._max_depth(json.dumps(wrapped)) == depth(wrapped)


@pytest.mark.parametrize("n", [validate.MAX_JSON_DEPTH + 1, 5_000, 200_000])
def test_deep_json_is_one_line_not_recursion_error(n):
    for raw in ("[" * n + "]" * n, '{"a":' * n + "1" + "}" * n, "[" * n):
        with pytest.raises(InspectError, match="nested") as e:
            validate.parse_json(raw, WHERE)
        assert str(e.value).startswith(WHERE)


def test_depth_at_the_limit_is_accepted():
    n = validate.MAX_JSON_DEPTH
    assert validate.parse_json("[" * n + "]" * n, WHERE) is not None


def test_brackets_inside_strings_do_not_count():
    assert validate.parse_json(json.dumps(["[" * 1000, "\\" * 3 + "{" * 500]), WHERE)[0] == "[" * 1000


@pytest.mark.parametrize("raw,why", [
    (b"\xff\xfe{\x00}", "UTF-16"),  # truncated UTF-16
    (b'{"a": "\xc3\x28"}', "UTF-8"),  # invalid UTF-8
    (b'{"a": 1,}', "not valid JSON"),
    (b'{"r": 1, "r": 2}', "appears twice"),
    (b"1" * 5000, "not valid JSON"),  # more digits than int() converts
    (b'{"a": [1, 2}', "not valid JSON"),
])
def test_bad_json_is_one_line(raw, why):
    with pytest.raises(InspectError) as e:
        validate.parse_json(raw, WHERE)
    assert why in str(e.value) and str(e.value).startswith(WHERE) and "\n" not in str(e.value)


def test_nan_and_infinity_parse_but_typed_readers_refuse_them():
    cfg = validate.parse_json(b'{"a": NaN, "b": Infinity, "c": -Infinity, "d": 1e999}', WHERE)
    assert math.isnan(cfg["a"]) and cfg["b"] == math.inf and cfg["c"] == -math.inf and cfg["d"] == math.inf
    for k in "abcd":
        with pytest.raises(InspectError, match=f"{k} must be finite"):
            validate.number(cfg, k, WHERE)


def test_size_limit(monkeypatch):
    monkeypatch.setattr(validate, "MAX_JSON_BYTES", 10)
    with pytest.raises(InspectError, match="larger than 10"):
        validate.parse_json(b"[1, 2, 3, 4, 5]", WHERE)


# --- regular files ------------------------------------------------------------------------------------


from builders import in_thread as _in_thread  # noqa: E402


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "adapter_config.json"
    os.mkfifo(fifo)
    for fn in (validate.open_regular, validate.read_json_object, validate.require_regular_file):
        box = _in_thread(lambda fn=fn: fn(fifo))
        assert isinstance(box.get("error"), InspectError) and "FIFO" in str(box["error"]), box


@pytest.mark.parametrize("path,kind", [("/dev/zero", "character device"), ("/dev/null", "character device")])
def test_devices_and_directories_are_refused(tmp_path, path, kind):
    if not os.path.exists(path):
        pytest.skip(path)
    with pytest.raises(InspectError, match=kind):
        validate.read_json_object(Path(path))
    with pytest.raises(InspectError, match="directory"):
        validate.read_json_object(tmp_path)
    with pytest.raises(InspectError, match="cannot read"):
        validate.read_json_object(tmp_path / "missing.json")


def test_read_json_object_utf16_bom_and_type(tmp_path):
    f = tmp_path / "adapter_config.json"
    f.write_bytes(json.dumps({"r": 8}).encode("utf-16"))
    assert validate.read_json_object(f) == {"r": 8}
    f.write_text("[1]")
    with pytest.raises(InspectError, match="expected a JSON object, found a list"):
        validate.read_json_object(f)


# --- typed readers ------------------------------------------------------------------------------------

anything = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5),
                     st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))


def _one_line(e: InspectError, key: str) -> None:
    msg = str(e)
    assert msg.startswith(WHERE + ": ") and key in msg and "\n" not in msg and len(msg) < 300, msg


@PROPS
@given(v=anything)
def test_number_accepts_exactly_finite_non_bool_numbers_in_range(v):
    ok = (type(v) in (int, float) and math.isfinite(v) and abs(v) <= 2**53) or v is None
    try:
        got = validate.number({"alpha": v}, "alpha", WHERE, default="dflt")
    except InspectError as e:
        assert not ok, v
        _one_line(e, "alpha")
    else:
        assert ok and got == (v if v is not None else "dflt")


@PROPS
@given(v=anything)
def test_integer_accepts_exactly_integral_values(v):
    ok = v is None or (type(v) in (int, float) and math.isfinite(v) and abs(v) <= 2**53 and float(v).is_integer())
    try:
        got = validate.integer({"r": v}, "r", WHERE, default=None)
    except InspectError as e:
        assert not ok, v
        _one_line(e, "r")
    else:
        assert ok and (got is None if v is None else (type(got) is int and got == v))


@PROPS
@given(v=anything)
def test_boolean_string_list_mapping(v):
    cases = [
        (validate.boolean, lambda x: isinstance(x, bool)),
        (validate.string, lambda x: isinstance(x, str)),
        (validate.string_list, lambda x: isinstance(x, str) or (isinstance(x, list) and all(isinstance(i, str) for i in x))),
        (validate.mapping, lambda x: isinstance(x, dict)),
    ]
    for fn, accepts in cases:
        try:
            fn({"k": v}, "k", WHERE)
        except InspectError as e:
            assert v is not None and not accepts(v), (fn, v)
            _one_line(e, "k")
        else:
            assert v is None or accepts(v), (fn, v)


def test_huge_int_message_is_short():
    with pytest.raises(InspectError) as e:
        validate.integer({"r": 10**5000}, "r", WHERE)
    _one_line(e.value, "r")
    assert "digits" in str(e.value)


def test_missing_and_bounds():
    with pytest.raises(InspectError, match="r is missing"):
        validate.integer({}, "r", WHERE)
    with pytest.raises(InspectError, match="must be > 0"):
        validate.number({"a": 0}, "a", WHERE, positive=True)
    with pytest.raises(InspectError, match="≤ 4"):
        validate.integer({"a": 5}, "a", WHERE, maximum=4)
    with pytest.raises(InspectError, match="expected an object"):
        validate.number([1], "a", WHERE)
    with pytest.raises(InspectError, match=r"alpha_pattern\['q'\] must be a number"):
        validate.mapping({"alpha_pattern": {"q": None}}, "alpha_pattern", WHERE,
                         values=lambda x: type(x) in (int, float), what="a number")


@pytest.mark.parametrize("regex,name,want", [
    (r".*\.(q_proj|v_proj)", "model.layers.0.self_attn.q_proj", True),
    (r".*\.(q_proj|v_proj)", "model.layers.0.self_attn.q_proj.x", False),
    ("q_proj", "model.q_proj", False),  # fullmatch: the whole name
    ("a.b", "axb", True),  # '.' is a wildcard in PEFT's re.fullmatch(target_modules, key)
    (r"(.*)*x", "y" * 50_000, False),
])
def test_compile_fullmatch_is_peft_target_modules_string_rule(regex, name, want):
    assert validate.compile_fullmatch(regex, WHERE)(name) is want
    if len(name) < 100:
        assert (re.fullmatch(regex, name) is not None) is want


# --- a whole pattern table: PEFT's get_pattern_key, first key in order --------------------------------


def peft_first(keys: list[str], name: str) -> int | None:
    return next((i for i, k in enumerate(keys) if peft_match(k, name)), None)


table_keys = st.lists(st.one_of(st.text(alphabet="ab._1", min_size=1, max_size=6), subset_patterns), max_size=8)


@PROPS
@given(keys=table_keys, samples=st.lists(st.text(alphabet="ab._1\n", max_size=10), min_size=1, max_size=10))
def test_pattern_table_returns_peft_first_matching_key(keys, samples):
    lookup = validate.compile_pattern_table(keys, WHERE)
    for name in samples + [k for k in keys if "\\" not in k]:
        assert lookup(name) == _ref(peft_first, keys, name), (keys, name)


def test_pattern_table_of_one_key_per_module_answers_every_module():
    names = [f"base_model.model.model.layers.{i}.mlp.experts.{j}.{m}" for i in range(40) for j in range(64)
             for m in ("gate_proj", "up_proj", "down_proj")]
    keys = [n.removeprefix("base_model.model.") for n in names[::-1]]  # 7,680 keys, as truncate writes them
    lookup = validate.compile_pattern_table(keys, WHERE)
    for n in names[::997]:
        assert lookup(n) == peft_first(keys, n)
    assert [lookup(n) for n in names] == list(range(len(keys)))[::-1]  # each module finds its own key
    with pytest.raises(InspectError, match="refused"):
        validate.compile_pattern_table(["q_proj", "(a)\\1"], WHERE)


@PROPS
@given(raw=st.one_of(st.binary(max_size=64), st.text(alphabet='[]{}"\\:,0-.eE nultrfaNIy\ufeff\ud800', max_size=40)))
def test_parse_json_of_any_input_is_a_value_or_one_line(raw):
    try:
        value = validate.parse_json(raw, WHERE)
    except InspectError as e:
        assert str(e).startswith(WHERE) and "\n" not in str(e)
    else:  # whatever we accept, json itself accepts (after the BOM is dropped)
        text = raw if isinstance(raw, str) else raw.decode(json.detect_encoding(raw))
        assert json.dumps(value, sort_keys=True) == json.dumps(json.loads(text), sort_keys=True)
