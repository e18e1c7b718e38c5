"""Tables that fit the terminal (issue 9, class 6): `rank`, `check` and `footprint` on the bundled
samples at 60, 80, 100 and 160 columns — compared with recorded snapshots, and checked against their
own JSON: no line longer than the terminal, every number of the JSON whole in the table, flags never
dropped, module names shortened only in the middle (layer index and type kept), dropped columns said.

Regenerate the snapshots after a deliberate change: ``UPDATE_SNAPSHOTS=1 python -m pytest tests/test_tables.py``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_inspect.adapter import module_type
from lora_inspect.cli import main
from lora_inspect.naming import natural_key, natural_sorted
from lora_inspect.units import fmt_float
from lora_inspect.views.layout import compact_name, shorten_name, wrap_text
from lora_inspect.views.render import Table, to_text

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOTS = Path(__file__).parent / "snapshots"
SAMPLES = {"planted": "samples/planted", "text": "samples/text", "kohya": "samples/planted-kohya.safetensors"}
WIDTHS = (60, 80, 100, 160)
COMMANDS = {
    "rank": ["rank"],
    "check": ["check", "--no-config", "--max-rank", "8", "--min-energy", "0.99@2", "--serving", "vllm"],
    "footprint": ["footprint"],
}


def _run(args: list[str], width: int | None = None) -> tuple[int, str]:
    env = {"NO_COLOR": "1"}
    if width is not None:
        env["COLUMNS"] = str(width)
    old = os.getcwd()
    os.chdir(ROOT)  # sample paths as the user types them
    try:
        res = CliRunner().invoke(main, args, catch_exceptions=False, env=env)
    finally:
        os.chdir(old)
    return res.exit_code, res.stdout


def _table_rows(text: str) -> list[list[str]]:
    """Every table's rows (lines after a ─── rule up to a blank line), as lists of lines."""
    lines = text.splitlines()
    tables, i = [], 0
    while i < len(lines):
        if lines[i].startswith("─"):
            rows = []
            i += 1
            while i < len(lines) and lines[i].strip() and not lines[i].startswith("(not shown"):
                rows.append(lines[i])
                i += 1
            tables.append(rows)
        i += 1
    return tables


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("sample", SAMPLES)
@pytest.mark.parametrize("cmd", COMMANDS)
def test_snapshot(cmd, sample, width):
    args = [*COMMANDS[cmd][:1], SAMPLES[sample], *COMMANDS[cmd][1:]]
    code, text = _run(args, width)
    assert code in (0, 1), text
    snap = SNAPSHOTS / f"{cmd}-{sample}-{width}.txt"
    if os.environ.get("UPDATE_SNAPSHOTS"):
        snap.parent.mkdir(exist_ok=True)
        snap.write_text(text, encoding="utf-8")
    assert snap.is_file(), f"no snapshot {snap.name}: run with UPDATE_SNAPSHOTS=1"
    assert text == snap.read_text(encoding="utf-8"), f"{snap.name} changed (UPDATE_SNAPSHOTS=1 after a deliberate change)"
    assert _table_rows(text)
    for line in text.splitlines():  # tables, titles, notes, header and footer sentences alike
        assert len(line) <= width, (width, line)


def _first_header(text: str) -> str:
    """The first table's header, all its lines (a header wraps at its spaces when the terminal is narrow):
    the lines after the title up to the ─── rule."""
    lines = text.splitlines()
    rule = next(i for i, ln in enumerate(lines) if ln.startswith("─"))
    return "\n".join(lines[1:rule])


def _tokens(line: str) -> set[str]:
    return set(line.split())


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("sample", SAMPLES)
def test_rank_numbers_whole_and_names_kept(sample, width):
    _, text = _run(["rank", SAMPLES[sample]], width)
    _, js = _run(["rank", SAMPLES[sample], "--json"])
    doc = json.loads(js)
    rows = _table_rows(text)[0]
    mods = doc["modules"]
    assert len(rows) == len(mods)
    header = _first_header(text)
    for m, line in zip(mods, rows):
        tok = _tokens(line)
        assert "×".join(map(str, m["shape"])) in tok and str(m["rank"]) in tok and str(m["energy_rank"]) in tok
        if "σ₁" in header:
            assert fmt_float(m["singular_values"][0]) in tok
        if "stable" in header:
            assert fmt_float(m["stable_rank"]) in tok
        shown = line.split()[0]
        assert shown == m["name"] or ("…" in shown and shown.endswith(module_type(m["name"])))
        layer = re.search(r"[._](\d+)[._]", m["name"]).group(1)
        assert layer in shown
        for f in m["flags"]:
            assert f in line
    # natural (layer) order, also in the JSON
    assert [m["name"] for m in mods] == natural_sorted(m["name"] for m in mods)
    for col in ("flags", "module", "shape", "rec r"):
        assert all(word in header.split() for word in col.split())  # never dropped (a header may wrap)
    if "spectrum" not in header.split():
        assert "(not shown at" in text and "spectrum (log)" in text


@pytest.mark.parametrize("width", WIDTHS)
def test_check_numbers_whole(width):
    args = [COMMANDS["check"][0], SAMPLES["planted"], *COMMANDS["check"][1:], "--max-params", "1k", "--max-size", "1KB"]
    _, text = _run(args, width)
    _, js = _run([*args, "--json"])
    doc = json.loads(js)
    tok = set(text.split())
    for r in doc["adapters"][0]["results"]:
        for v in (r["value"], r["limit"]):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                s = f"{v:,}" if r["rule"] in ("max-params", "max-size") else (f"{v:.4g}" if isinstance(v, float) else str(v))
                assert s in tok, (r["rule"], s)
        assert r["rule"].split(":")[0] + (":" if ":" in r["rule"] else "") in text


@pytest.mark.parametrize("width", WIDTHS)
def test_footprint_numbers_whole(width):
    _, text = _run(["footprint", SAMPLES["planted"]], width)
    _, js = _run(["footprint", SAMPLES["planted"], "--json"])
    doc = json.loads(js)
    tok = set(text.split())
    for t, g in doc["by_type"].items():
        assert f"{g['params']:,}" in tok and t in tok


# ---------------------------------------------------------------- the layout rules themselves
def test_shorten_name_keeps_layer_and_type():
    n = "base_model.model.model.layers.10.self_attn.q_proj"
    for w in range(3, len(n) + 1):
        s = shorten_name(n, w)
        assert "10" in s and s.endswith("q_proj")
        assert len(s) <= max(w, len(compact_name(n)))
        if len(s) < len(n):
            assert s.count("…") == 1
    assert compact_name(n) == "10…q_proj"


def test_wrap_text_never_splits_a_short_number():
    text = "model.layers.1.self_attn.o_proj keeps 0.6348 of its energy at rank 2 < 0.99"
    for w in range(12, 40):
        lines = wrap_text(text, w)
        assert all(len(ln) <= w for ln in lines)
        assert "0.6348" in " ".join(lines).split() and "0.99" in " ".join(lines).split()


def test_fixed_columns_never_cut_even_when_too_wide():
    t = Table(None, ["module", "value"], [("model.layers.3.mlp.down_proj", "123456789012345")])
    out = to_text_lines(t, 10)
    assert "123456789012345" in "\n".join(out) and "3…down_proj" in "\n".join(out)


def to_text_lines(t: Table, width: int) -> list[str]:
    from lora_inspect.views.render import View

    return to_text(View({}, [t]), width).splitlines()


def test_natural_key_orders_layers_and_is_linear_safe():
    names = ["l.10.q", "l.2.q", "l.1.q", "l.2.k", "l.01.q"]
    assert natural_sorted(names) == ["l.1.q", "l.01.q", "l.2.k", "l.2.q", "l.10.q"]
    big = "9" * 100_000  # int() of this would raise (Python's digit limit); the key never converts
    assert natural_key(f"a{big}") > natural_key("a9")


def test_a_very_long_module_name_renders_shortened():
    """A module name of 100,000 characters (issue 9, class 1) is shortened in the middle, keeping the layer
    index and the type, and the row keeps its numbers and flags. That rendering is linear in the name is a
    speed claim, measured by benchmarks/bench_render.py (reports/render.md), not asserted here."""
    from lora_inspect.views.render import Table, View, to_text

    name = "model.layers.7." + "x" * 100_000 + ".q_proj"
    t = Table("t", ["module", "shape", "flags"], [(name, "64×176", "spike")], kinds=["name", "fixed", "fixed"])
    out = to_text(View({}, [t]), 80)
    assert max(map(len, out.splitlines())) <= 80
    assert "7…q_proj" in out and "64×176" in out and "spike" in out


def test_a_header_wraps_before_a_name_is_shortened():
    t = Table(None, ["module", "energy kept", "rel. error"], [("model.layers.3.mlp.down_proj", "0.9973", "0.0518")])
    out = to_text_lines(t, 46)
    assert out[0].split() == ["energy", "rel."] and out[1].split() == ["module", "kept", "error"]
    assert "model.layers.3.mlp.down_proj" in out[3] and max(map(len, out)) <= 46
    assert to_text_lines(t, 80)[0].split() == ["module", "energy", "kept", "rel.", "error"]  # one line when it fits


def test_glue_keeps_a_number_with_its_unit_and_is_written_as_a_space():
    from lora_inspect.views.layout import GLUE, glue

    t = Table(None, ["type", "params"], [("q_proj", f"{glue('15.4 k')} {glue('→ 1.92 k')}")], kinds=["name", "text"])
    out = to_text_lines(t, 18)
    assert GLUE not in "\n".join(out)
    assert [ln.removeprefix("q_proj").strip() for ln in out[2:]] == ["15.4 k", "→ 1.92 k"]


def test_wrap_prose_indents_continuations_and_keeps_words_whole():
    from lora_inspect.views.layout import wrap_prose

    text = "truncate --rank 8 keeps ≥ 95% energy in every module (the largest rec r, 5, rounded up to a power of two)"
    lines = wrap_prose(text, 40)
    assert all(len(ln) <= 40 for ln in lines) and all(ln.startswith("  ") for ln in lines[1:])
    assert " ".join(ln.strip() for ln in lines) == text


def test_a_long_name_in_prose_breaks_between_components():
    lines = wrap_text("worst module.layers.1.mlp.down_proj here", 20)
    assert all(len(ln) <= 20 for ln in lines)
    assert not any(ln.endswith("down_") for ln in lines)  # a dot before an underscore


def test_wrapped_lines_never_exceed_their_width():
    """Random words of letters and separators (seeded): every line of wrap_text fits its width (the first
    and the later ones), no character is lost, and wrap_prose's indented lines fit too."""
    import random

    from lora_inspect.views.layout import wrap_prose

    rng = random.Random(18)
    for _ in range(3000):
        words = ["".join(rng.choice("ab./_,") for _ in range(rng.randint(0, 30))) for _ in range(rng.randint(1, 12))]
        text, w, later = " ".join(words), rng.randint(1, 40), rng.randint(1, 40)
        out = wrap_text(text, w, later)
        assert len(text) <= w or all(len(ln) <= (w if i == 0 else later) for i, ln in enumerate(out)), (text, w, later)
        assert "".join(out).replace(" ", "") == text.replace(" ", "")
        assert all(len(ln) <= w + 3 for ln in wrap_prose(text, w + 3))
