"""The entry point's own promises: exit codes with and without ``--debug`` (accepted anywhere), a reader
that closes the pipe early does not change the exit code, and no Python warning text reaches stderr
unless ``--debug`` asks for it. Subprocesses, because these are properties of a real process (its
stdout file descriptor, its warning filters, its exit status)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_inspect.cli import hoist_debug

ROOT = Path(__file__).resolve().parents[1]
PLANTED = str(ROOT / "samples" / "planted")


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1", COLUMNS="120")
    env.pop("LORA_INSPECT_DEBUG", None)
    return env


def _run(*args: str, stdout=subprocess.PIPE, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "lora_inspect", *args]
    return subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT, timeout=300)


def test_hoist_debug_moves_the_flag_to_the_front_but_not_after_double_dash():
    assert hoist_debug(["rank", "x", "--debug"]) == (True, ["--debug", "rank", "x"])
    assert hoist_debug(["--debug", "rank", "--debug"]) == (True, ["--debug", "rank"])
    assert hoist_debug(["rank", "--", "--debug"]) == (False, ["rank", "--", "--debug"])
    assert hoist_debug(["rank", "x"]) == (False, ["rank", "x"])


def test_a_mistyped_command_is_one_line_naming_the_nearest_and_exit_2():
    res = _run("rnak", PLANTED)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.splitlines() == ["lora-inspect: error: no command 'rnak'; did you mean 'rank'?"]


def test_an_error_is_one_line_and_exit_2(tmp_path):
    res = _run("rank", str(tmp_path / "missing"))
    assert res.returncode == 2
    assert res.stderr.splitlines() == [f"lora-inspect: error: {tmp_path / 'missing'}: no such file or directory"]


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_prints_the_traceback_then_the_line_and_still_exits_2(tmp_path, where):
    target = str(tmp_path / "missing")
    args = ["--debug", "rank", target] if where == "before" else ["rank", target, "--debug"]
    res = _run(*args)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert lines[0].startswith("Traceback"), res.stderr
    assert "InspectError" in res.stderr
    assert lines[-1] == f"lora-inspect: error: {target}: no such file or directory"


def test_debug_after_a_usage_error_exits_2():
    res = _run("rank", PLANTED, "--energy", "7", "--debug")
    assert res.returncode == 2
    assert res.stderr.splitlines()[-1].startswith("lora-inspect: error: ")


def _closed_pipe_run(*args: str) -> subprocess.CompletedProcess:
    """Run with stdout a pipe whose reader is already gone, as after ``| head -1`` has exited: every
    write fails with EPIPE, deterministically (no race with a real head)."""
    r, w = os.pipe()
    os.close(r)
    try:
        return _run(*args, stdout=w)
    finally:
        os.close(w)


@pytest.mark.parametrize(("max_rank", "code"), [("64", 0), ("16", 1)])
def test_check_into_a_closed_pipe_exits_with_its_own_code(max_rank, code):
    res = _closed_pipe_run("check", PLANTED, "--max-rank", max_rank)
    assert res.returncode == code, res.stderr
    assert res.stderr == ""


def test_rank_into_a_closed_pipe_exits_0_without_noise():
    res = _closed_pipe_run("rank", PLANTED, "--all")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""


def test_check_piped_to_head_keeps_exit_code_0():
    """The user's own pipeline, through a real ``head -1``."""
    script = f'"{sys.executable}" -m lora_inspect check "{PLANTED}" --max-rank 64 | head -1; exit "${{PIPESTATUS[0]}}"'
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == 1


# A command that warns the way numpy and torch do, registered as the CLI resolves its own commands.
_WARNING_CLI = """
import sys, warnings
import click
import numpy as np

@click.command()
def noisy():
    with np.errstate(over="warn"):
        np.float32(3e38) * np.float32(10)  # numpy RuntimeWarning: overflow
    warnings.warn("a torch-style notice", UserWarning)
    click.echo("done")

from lora_inspect.commands import COMMANDS
COMMANDS["noisy"] = "__main__:noisy"
from lora_inspect.cli import main
main()
"""


def test_python_warnings_are_silenced():
    res = _run("noisy", code=_WARNING_CLI)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "done\n"
    assert res.stderr == ""


def test_python_warnings_show_with_debug():
    res = _run("noisy", "--debug", code=_WARNING_CLI)
    assert res.returncode == 0, res.stderr
    assert "RuntimeWarning" in res.stderr and "a torch-style notice" in res.stderr


def test_in_process_runner_accepts_debug_after_the_command():
    from click.testing import CliRunner

    from lora_inspect.cli import main

    res = CliRunner().invoke(main, ["info", PLANTED, "--json", "--debug"])
    assert res.exit_code == 0, res.output
    assert '"schema"' in res.output
