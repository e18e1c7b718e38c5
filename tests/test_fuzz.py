"""The contract fuzzer (tests/fuzz) in the suite: a short fixed-seed run, and checks of the fuzzer itself.

The short run: 21 inputs, one per mutation family (``--round-robin``), through info, rank --json, check
and truncate, with every command (extract and fit included) on inputs 0 and 11; one forked child per command run (the fork
server of tests/fuzz/runner.py), 10 s per run (report 30 s). 25 s alone, ~56 s with other load here.
The long run is one command (see reports/fuzz.md):
    python -m tests.fuzz --seed 7 --n 5000 --quick --full-every 10 --jobs 2 --out reports/fuzz.md

The short run asserts zero contract breaks. (Classes found and fixed: see reports/fuzz.md.) To let a
newly found class through while its fix lands, name it in KNOWN_BREAKS: the run is then xfail,
non-strict, as long as every break it finds is listed.
"""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fuzz.runner import Run, execute, judge  # noqa: E402

KNOWN_BREAKS: list[str] = []


def _known(cls: str) -> bool:
    return any(fnmatch.fnmatchcase(cls, pat) for pat in KNOWN_BREAKS)


def test_short_fixed_seed_run(tmp_path):
    out = tmp_path / "fuzz.md"
    jl = tmp_path / "breaks.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "tests.fuzz", "--seed", "3", "--n", "21", "--round-robin", "--quick",
           # --limit is a hang bound, not a speed claim: every command here takes well under a second
           "--full-every", "11", "--limit", "120", "--jobs", "1", "--workdir", str(tmp_path / "work"),
           "--out", str(out), "--json", str(jl)]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode in (0, 1), p.stderr[-3000:]
    assert out.exists() and "mutated inputs" in out.read_text()
    breaks = [json.loads(line) for line in jl.read_text().splitlines()]
    assert not [b for b in breaks if b["cls"].startswith("fuzzer-error")], breaks
    assert "the seed files changed" not in out.read_text()
    if p.returncode == 0:
        assert breaks == []
        return
    unknown = sorted({b["cls"] for b in breaks if not _known(b["cls"])})
    detail = "\n".join(f"{b['cls']} #{b['index']} {b['family']}: {b['desc']} [{b['cmd']}] {b['stderr']}" for b in breaks)
    assert not unknown, f"contract breaks outside the known list {unknown}:\n{detail}"
    pytest.xfail(f"{len(breaks)} known contract breaks (fixes in other branches):\n{detail}")


# ---- the judge itself (a judge that never flags would make the run above pass vacuously) ------------------

def _run(cmd="info", rc=2, err="", timed_out=False) -> Run:
    return Run(cmd, [cmd], None if timed_out else rc, "", err, 0.1, timed_out)


@pytest.mark.parametrize("run, cls", [
    (_run(err="lora-inspect: error: /in/x: bad\n"), None),
    (_run(rc=0, err=""), None),
    (_run(rc=0, err="wrote /out/r.html (html, 1 adapter)\n"), None),
    (_run("check", rc=1, err=""), None),
    (_run("scan", rc=1, err=""), None),  # scan: an adapter failed the policy or was unreadable
    (_run(rc=1, err=""), "exit-code:1"),
    (_run(rc=3), "exit-code:3"),
    (_run(rc=-9), "signal:SIGKILL"),
    (_run(timed_out=True), "hang"),
    (_run(err="lora-inspect: error: unexpected TypeError: x (run with --debug for details)\n"), "unexpected:TypeError"),
    (_run(rc=1, err="Traceback (most recent call last):\n  File \"x\", line 1\nRecursionError: too deep\n"),
     "traceback:RecursionError"),
    (_run(err="/x/y.py:3: RuntimeWarning: overflow\n  a*b\nlora-inspect: error: /in/x: bad\n"), "stderr-text:RuntimeWarning"),
    (_run(rc=0, err="/x/y.py:3: UserWarning: hm\n"), "stderr-text:UserWarning"),
    (_run(err="lora-inspect: error: module 'q': rank mismatch\n"), "error-names-no-path"),
    (_run(err="boom\n"), "no-error-line"),
    (_run(err="lora-inspect: error: /in/x: not valid JSON (unexpected end of data)\n"), "unexpected-word"),
    (_run(rc=0, err="warning: 3 of 8 modules now have a\nfull-rank change (folded)\n"), None),
    (_run(rc=0, err="warning: folded\n/x/y.py:3: UserWarning: hm\n"), "stderr-text:UserWarning"),
    (_run(err="lora-inspect: error: /in/a: x\nlora-inspect: error: /in/b: y\n"), "stderr-text:text"),
])
def test_judge_classes(run, cls):
    got = [c for c, _ in judge(run, names=[Path("/in"), Path("/out")])]
    assert got == ([] if cls is None else [cls]) or (cls in got), got


# ---- single contract properties that hold today (regression guards, cheap) --------------------------------

@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    from tests.fuzz.seeds import make_seeds

    return make_seeds(tmp_path_factory.mktemp("seeds"))


@pytest.mark.parametrize("how", ["reduce", "eval", "subprocess"])
@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_pickle_never_runs(tmp_path, how, container):
    """A .bin whose pickle would create a marker file (os.system / eval / subprocess): refused, never run."""

    from tests.fuzz.mutations import _evil_pickle, write_pickle

    marker = tmp_path / "PWNED"
    payload = _evil_pickle(marker, how)
    # the payload really executes when unpickled without restriction (so the test can fail)
    if container == "legacy" and how == "reduce":
        import pickle

        probe = tmp_path / "probe"
        pickle.loads(_evil_pickle(probe, how))
        assert probe.exists()
    f = tmp_path / "adapter_model.bin"
    write_pickle(f, payload, container)
    (tmp_path / "cwd").mkdir()
    r = execute("info", ["info", str(f)], tmp_path / "cwd", tmp_path, 60, mode="spawn")
    assert not marker.exists()
    assert r.rc == 2, (r.rc, r.stderr)
    assert judge(r, names=[tmp_path]) == [], r.stderr


def test_fork_and_spawn_agree(tmp_path, seeds):
    """The fork server runs a command as `python -m lora_inspect` does: same status, stdout and stderr."""
    from tests.fuzz.runner import preload  # noqa: F401  (the fork server's preload is exercised by the run above)

    s = next(s for s in seeds if s.name == "kohya")
    bad = tmp_path / "bad.safetensors"
    raw = s.path.read_bytes()
    bad.write_bytes(raw[:100])
    (tmp_path / "cwd").mkdir()
    for target in (s.path, bad):
        a = execute("info", ["info", str(target), "--json"], tmp_path / "cwd", tmp_path, 60, mode="spawn")
        code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from pathlib import Path; "
                f"from tests.fuzz.runner import execute; "
                f"r = execute('info', ['info', {str(target)!r}, '--json'], Path({str(tmp_path / 'cwd')!r}), "
                f"Path({str(tmp_path)!r}), 60, mode='fork'); print(repr((r.rc, r.stdout, r.stderr)))")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
        assert p.returncode == 0, p.stderr
        assert eval(p.stdout.strip().splitlines()[-1]) == (a.rc, a.stdout, a.stderr)
