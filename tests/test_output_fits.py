"""A newcomer's first hour (issue 18): every command's output fits 60, 80 and 100 columns, every ``--help``
fits 80 columns at any terminal width, counts are in words that agree, a mistyped command names the nearest
one. Every command runs on the bundled samples (outputs written under tmp_path), in-process, with
``NO_COLOR=1`` and ``COLUMNS`` set: no line of stdout (or stderr) is longer than the width, and the numbers
its ``--json`` document holds for a few key cells appear whole in the table."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_inspect.cli import main
from lora_inspect.commands import COMMANDS
from lora_inspect.units import fmt_float
from lora_inspect.views.words import noun, plural, verb

ROOT = Path(__file__).resolve().parent.parent
PLANTED, TEXT, KOHYA = "samples/planted", "samples/text", "samples/planted-kohya.safetensors"
WIDTHS = (60, 80, 100)


def _invoke(args: list[str], width: int | None = None) -> tuple[int, str, str]:
    env = {"NO_COLOR": "1", "COLUMNS": str(width) if width else None}
    old = os.getcwd()
    os.chdir(ROOT)  # sample paths as a user types them
    try:
        res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, env=env)
    finally:
        os.chdir(old)
    return res.exit_code, res.stdout, res.stderr


@pytest.fixture(scope="module")
def truncated(tmp_path_factory) -> str:
    """samples/planted truncated to rank 4: the second adapter of diff and verify."""
    out = tmp_path_factory.mktemp("fits") / "r4"
    code, _, err = _invoke(["truncate", PLANTED, "-o", out, "--rank", "4"])
    assert code == 0, err
    return str(out)


# each case: the arguments ({out} is a fresh output path, {r4} the truncated adapter) and, from its JSON
# document, the strings that must appear as whole words in the table at every width
def _rank(doc: dict) -> list[str]:
    return [str(m["energy_rank"]) for m in doc["modules"]] + ["×".join(map(str, m["shape"])) for m in doc["modules"]]


def _rank_base(doc: dict) -> list[str]:
    return _rank(doc) + [fmt_float(m["base"]["relative_fro"]) for m in doc["modules"]]


def _truncate(doc: dict) -> list[str]:
    return ([f"{m['retained_energy']:.4f}" for m in doc["modules"]] + [fmt_float(m["relative_error"]) for m in doc["modules"]]
            + [f"{g['retained_energy']:.4f}" for g in doc["by_type"].values()])


def _merge(doc: dict) -> list[str]:
    return [f"{m['retained_energy']:.6f}" for m in doc["modules"]] + [str(m["rank_out"]) for m in doc["modules"]]


def _diff(doc: dict) -> list[str]:
    return [fmt_float(m["rel_distance"], 4) for m in doc["modules"]] + [fmt_float(m["cosine"], 4) for m in doc["modules"]]


def _footprint(doc: dict) -> list[str]:
    return [f"{g['params']:,}" for g in doc["by_type"].values()] + [f"{doc['params']:,}"]


def _verify(doc: dict) -> list[str]:
    return [f"{r['loss']:.6g}" for r in doc["results"]] + [f"{r['top1_agreement']:.2%}" for r in doc["results"]]


def _convert(doc: dict) -> list[str]:
    return [str(m["rank_out"]) for m in doc["modules"]]


def _rescale(doc: dict) -> list[str]:
    return [str(m["rank"]) for m in doc["modules"]]


def _fit(doc: dict) -> list[str]:
    return [fmt_float(m["relative_error"]) for m in doc["modules"]] + [f"{doc['kept_share']:.4%}"]


def _info(doc: dict) -> list[str]:
    return [f"{doc['params']:,}", str(doc["modules"])]


CASES: dict[str, tuple[list[str], Callable[[dict], list[str]]]] = {
    "info": (["info", PLANTED], _info),
    "info-kohya": (["info", KOHYA], _info),
    "rank": (["rank", PLANTED], _rank),
    "rank-text": (["rank", TEXT], _rank),
    "rank-kohya": (["rank", KOHYA], _rank),
    "rank-base": (["rank", PLANTED, "--base", f"{PLANTED}/base"], _rank_base),
    "truncate-rank": (["truncate", PLANTED, "-o", "{out}", "--rank", "4"], _truncate),
    "truncate-budget": (["truncate", PLANTED, "-o", "{out}", "--max-params", "20k"], _truncate),
    "truncate-kohya": (["truncate", KOHYA, "-o", "{out}.safetensors", "--energy", "0.95"], _truncate),
    "rescale": (["rescale", PLANTED, "-o", "{out}", "--factor", "0.5"], _rescale),
    "convert-kohya": (["convert", PLANTED, "--to", "kohya", "-o", "{out}.safetensors"], _convert),
    "convert-mlx": (["convert", PLANTED, "--to", "mlx", "-o", "{out}"], _convert),
    "merge": (["merge", PLANTED, "{r4}", "-o", "{out}", "--rank", "8"], _merge),
    "fit": (["fit", PLANTED, "--for", "vllm", "-o", "{out}"], _fit),
    "footprint": (["footprint", PLANTED], _footprint),
    "footprint-base": (["footprint", PLANTED, "--base", "llama-3-8b"], _footprint),
    "diff": (["diff", PLANTED, "{r4}"], _diff),
    "verify": (["verify", PLANTED, "{r4}"], _verify),
    "verify-text": (["verify", TEXT], _verify),
}


def _args(argv: list[str], out: Path, r4: str) -> list[str]:
    return [a.replace("{out}", str(out)).replace("{r4}", r4) for a in argv]


@pytest.mark.parametrize("case", CASES)
def test_every_table_fits_and_keeps_its_numbers(case, truncated, tmp_path):
    argv, cells = CASES[case]
    code, js, err = _invoke([*_args(argv, tmp_path / "json", truncated), "--json"])
    assert code == 0, err
    wanted = cells(json.loads(js))
    assert wanted
    for width in WIDTHS:
        code, text, err = _invoke(_args(argv, tmp_path / f"w{width}", truncated), width)
        assert code == 0, err
        long = [ln for ln in text.splitlines() + err.splitlines() if len(ln) > width]
        assert not long, (case, width, long)
        words = set(text.split())
        missing = [w for w in wanted if w not in words]
        assert not missing, (case, width, missing)  # a number is never cut
        if "(not shown at" in text:
            assert f"(not shown at {width} columns:" in text  # a dropped column is said


@pytest.mark.parametrize("width", WIDTHS)
def test_a_long_path_wraps_between_folders(tmp_path, width):
    import shutil

    folder = tmp_path / "a-rather-long-folder-name-for-a-narrow-terminal" / "and-another-one-below-it"
    folder.mkdir(parents=True)
    target = folder / "planted-kohya.safetensors"
    shutil.copy(ROOT / KOHYA, target)
    for command in ("rank", "info"):
        code, text, err = _invoke([command, target], width)
        assert code == 0, err
        assert all(len(ln) <= width for ln in text.splitlines()), text
    assert any(w.endswith("/planted-kohya.safetensors") or w == "planted-kohya.safetensors" for w in text.split())


@pytest.mark.parametrize("width", WIDTHS)
def test_report_says_what_it_wrote_in_one_fitting_sentence(tmp_path, width):
    pytest.importorskip("matplotlib")
    out = tmp_path / "a-report-with-a-rather-long-name-for-a-narrow-terminal.html"
    code, text, err = _invoke(["report", PLANTED, "-o", out], width)
    assert code == 0, err
    assert text == "" and all(len(ln) <= width for ln in err.splitlines())
    assert "(html, 1 adapter)" in " ".join(ln.strip() for ln in err.splitlines())


# ---------------------------------------------------------------- help
HELPS = ["", *COMMANDS]


@pytest.mark.parametrize("width", (200, 60))
@pytest.mark.parametrize("command", HELPS, ids=[c or "main" for c in HELPS])
def test_every_help_fits_80_columns(command, width):
    code, text, _ = _invoke([command, "--help"] if command else ["--help"], width)
    assert code == 0
    long = [ln for ln in text.splitlines() if len(ln) > 80]
    assert not long, long


def test_main_help_says_what_each_command_does_in_one_line():
    _, text, _ = _invoke(["--help"], 200)
    listed = text.split("Commands:\n", 1)[1].splitlines()
    for name in COMMANDS:
        (line,) = [ln for ln in listed if ln.split()[:1] == [name]]
        assert not line.rstrip().endswith("..."), line  # an explicit short_help, not a cut docstring
    ours = {"info", "rank", "truncate", "rescale", "convert", "merge", "footprint", "diff", "report", "train", "verify"}
    for name in ours:  # ours fit one line at 80 columns (the help is capped at 80)
        i = next(i for i, ln in enumerate(listed) if ln.split()[:1] == [name])
        assert i + 1 == len(listed) or listed[i + 1].split()[0] in COMMANDS, listed[i:i + 2]


# ---------------------------------------------------------------- a mistyped command
@pytest.mark.parametrize(("typed", "near"), [("rnak", "rank"), ("verfy", "verify"), ("Rank", "rank"),
                                               ("footprnt", "footprint")])
def test_a_mistyped_command_names_the_nearest(typed, near):
    code, text, err = _invoke([typed, PLANTED])
    assert code == 2 and text == ""
    assert err.splitlines() == [f"lora-inspect: error: no command '{typed}'; did you mean '{near}'?"]


def test_a_command_far_from_every_other_points_to_help():
    code, _, err = _invoke(["zzzzzz"])
    assert code == 2
    assert err.splitlines() == ["lora-inspect: error: no command 'zzzzzz'; see 'lora-inspect --help'"]


# ---------------------------------------------------------------- counts in words
def test_plural_and_verb():
    assert plural(1, "adapter") == "1 adapter" and plural(2, "adapter") == "2 adapters"
    assert plural(0, "module") == "0 modules" and plural(1, "tensor file") == "1 tensor file"
    assert plural(3, "tensor file") == "3 tensor files" and plural(1234, "module") == "1,234 modules"
    assert plural(2, "entry") == "2 entries" and plural(2, "pass") == "2 passes" and plural(2, "day") == "2 days"
    assert noun(1, "rule") == "rule" and noun(2, "matrix") == "matrices"
    assert [verb(1, v) for v in ("has", "is", "differs")] == ["has", "is", "differs"]
    assert [verb(2, v) for v in ("has", "is", "differs", "holds", "was")] == ["have", "are", "differ", "hold", "were"]


def test_counts_of_one_are_singular_in_output(tmp_path):
    _, text, _ = _invoke(["rank", PLANTED, "--module", r"layers\.0\.self_attn\.q_proj"], 100)
    assert text.startswith("1 module, energy")
    _, text, _ = _invoke(["check", KOHYA, "--no-config"], 100)
    assert "1 adapters" not in text and "for 1 adapter" in text
    _, text, _ = _invoke(["info", PLANTED], 100)
    assert "in 0 tensors" in text  # zero is plural
    for case in ("truncate-rank", "convert-kohya", "diff"):
        argv, _ = CASES[case]
        _, text, err = _invoke(_args(argv, tmp_path / case, PLANTED), 100)
        assert "14 modules" in text and " 1 modules" not in text + err


def test_rank_summary_and_rec_r_agree():
    """The table's rec r is each module's energy rank; the summary's --rank is the largest rec r, rounded up
    to a power of two, and it says which (text sample: rec r ≤ 5 at τ = 0.95, ≤ 3 at 0.8; r = 8)."""
    _, js, _ = _invoke(["rank", TEXT, "--json"])
    doc = json.loads(js)
    assert doc["summary"]["max_recommended_rank"] == max(m["recommended_rank"] for m in doc["modules"]) == 5

    def summary(*args: str) -> str:
        _, text, _ = _invoke(["rank", *args], 100)
        return " ".join(text.split("\n\n")[-1].split())

    assert summary(TEXT).startswith("rec r ≤ 5 everywhere, and rounded up to a power of two that is r=8 already;")
    assert "truncate --rank 4 keeps ≥ 80% energy in every module (rec r ≤ 3 everywhere, rounded up to a power of " \
           "two)" in summary(TEXT, "--energy", "0.8")
    assert "truncate --rank 4 keeps ≥ 95% energy in every module (rec r ≤ 4 everywhere)" in summary(PLANTED)


def test_warnings_wrap_at_words_on_a_narrow_terminal(monkeypatch, capsys):
    from lora_inspect.views.render import warn

    monkeypatch.setenv("COLUMNS", "40")
    monkeypatch.setenv("NO_COLOR", "1")
    message = "model.layers.1.self_attn.o_proj keeps 0.6348 of its energy at rank 2, below the 0.99 asked for"
    warn(message)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) > 1 and all(len(ln) <= 40 for ln in lines)
    assert " ".join(ln.strip() for ln in lines) == f"warning: {message}"
