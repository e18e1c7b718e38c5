"""Run every command on a mutated input and judge each run against the contract (issue 9).

Two ways to start a command:

* ``spawn``: ``sys.executable -m lora_inspect …`` in a fresh interpreter (what a user runs; each start
  imports torch, 3–6 s on the shared 2-core machine);
* ``fork`` (default): a fork server. The fuzzer imports lora_inspect, its commands, torch and matplotlib
  once, with one torch thread, and runs each command in a forked child (own process group, stdin from
  /dev/null, stdout/stderr to files, its own cwd and environment, an address-space limit) that calls the
  click entry point exactly as ``python -m lora_inspect`` does and exits with its status. A child that
  runs past the time limit is killed with its process group. ``--exec spawn`` re-checks a run this way.

The contract checked on every run: exit status in {0, 1, 2} (1 only from :data:`RULE_COMMANDS`: a rule or
policy failed, or for ``scan`` an adapter was unreadable); on 2 exactly one
stderr line, starting ``lora-inspect: error:``, without "unexpected" or a traceback, naming a path under
the input or output folder; no other stderr text on any status (our own notes —
lines starting ``warning:``, ``note:``, ``lora-inspect: note:`` or ``wrote `` — are allowed); the time limit kept; no output path and no ``.lora-inspect-tmp``/
``-old-`` entries left after a failure, the output present (and readable by ``info``) after success;
input bytes unchanged; nothing executed (a pickle's marker file absent); nothing written in the cwd;
``check`` never passes an adapter with NaN/Inf or all-zero B tensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .seeds import REPO

__all__ = ["Run", "Break", "COMMANDS", "QUICK", "RULE_COMMANDS", "WRITES_ON_FAILED_RULE", "execute", "judge", "snapshot",
           "preload", "child_env"]


@dataclass
class Run:
    cmd: str
    args: list[str]
    rc: int | None
    stdout: str
    stderr: str
    wall: float
    timed_out: bool


@dataclass
class Break:
    cls: str  # e.g. "unexpected:RecursionError", "hang", "stderr-text:RuntimeWarning"
    index: int
    seed: str
    family: str
    desc: str
    cmd: str
    stderr: str
    extra: dict = field(default_factory=dict)


# name → (args builder, writes an output). `{in}` the input, `{orig}` the unmutated seed, `{out}` OUT.
COMMANDS: dict[str, tuple[list[str], str | None]] = {
    "info": (["info", "{in}"], None),
    "rank": (["rank", "{in}"], None),
    "rank --json": (["rank", "{in}", "--json"], None),
    "check": (["check", "{in}"], None),
    "footprint": (["footprint", "{in}"], None),
    "diff": (["diff", "{orig}", "{in}"], None),
    "report": (["report", "{in}", "-o", "{out}"], "report.html"),
    "truncate": (["truncate", "{in}", "--rank", "2", "-o", "{out}"], "adapter"),
    "rescale": (["rescale", "{in}", "--factor", "2", "-o", "{out}"], "adapter"),
    "convert": (["convert", "{in}", "--to", "kohya", "-o", "{out}"], "kohya.safetensors"),
    "merge": (["merge", "{orig}", "{in}", "--to", "kohya", "-o", "{out}"], "kohya.safetensors"),
    # the unmutated seed as BASE, the mutated one as TUNED: every tensor pair read, compared and factored
    "extract": (["extract", "{orig}", "{in}", "--rank", "2", "-o", "{out}"], "adapter"),
    "fit": (["fit", "{in}", "--for", "vllm", "-o", "{out}"], "adapter"),
}
QUICK = ["info", "rank --json", "check", "truncate"]
# the commands whose exit status 1 means "a rule or policy failed" (scan: also "some adapter was unreadable")
RULE_COMMANDS = ("check", "scan", "fit")
# the commands that write OUT and still exit 1 when a rule fails on what they wrote (fit: the engine's check fails)
WRITES_ON_FAILED_RULE = ("fit",)


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LORA_INSPECT_DEBUG", "GITHUB_STEP_SUMMARY")}
    env.update(NO_COLOR="1", COLUMNS="120", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="default")
    env.pop("PYTHONWARNINGS")  # as a user runs it: Python's default warning filters
    return env


def preload() -> None:
    """Import what the commands import, once, before forking (torch with one thread, matplotlib Agg)."""
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    import importlib

    import lora_inspect.cli  # noqa: F401
    from lora_inspect.commands import COMMANDS as CMDS

    for name, spec in CMDS.items():
        if name in ("train", "verify"):
            continue
        importlib.import_module(spec.split(":")[0])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except ImportError:
        pass


AS_LIMIT = 6 * 2 ** 30  # address-space limit of a forked child beyond what it inherits (MemoryError, not the OOM killer)


def _child(args: list[str], cwd: Path, out: Path, err: Path, env: dict[str, str]) -> None:
    code = 70
    try:
        os.setpgid(0, 0)
        fi = os.open(os.devnull, os.O_RDONLY)
        fo = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        fe = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fi, 0)
        os.dup2(fo, 1)
        os.dup2(fe, 2)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        try:
            m = re.search(r"VmSize:\s+(\d+)", Path("/proc/self/status").read_text())
            vm = int(m.group(1)) * 1024 if m else 0
            resource.setrlimit(resource.RLIMIT_AS, (vm + AS_LIMIT, vm + AS_LIMIT))
        except (OSError, ValueError, AttributeError):
            pass
        sys.argv = ["lora-inspect", *args]
        from lora_inspect.cli import main

        try:
            main(args=args, prog_name="lora-inspect")
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _read(p: Path) -> str:
    try:
        return p.read_bytes()[:200_000].decode("utf-8", "replace")
    except OSError:
        return ""


def execute(cmd: str, args: list[str], cwd: Path, scratch: Path, limit: float, mode: str = "fork") -> Run:
    out, err = scratch / "stdout", scratch / "stderr"
    env = child_env()
    t0 = time.monotonic()
    if mode == "spawn":
        with open(out, "wb") as fo, open(err, "wb") as fe:
            p = subprocess.Popen([sys.executable, "-m", "lora_inspect", *args], cwd=cwd, env=env,
                                 stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, start_new_session=True)
            try:
                rc: int | None = p.wait(timeout=limit)
                timed_out = False
            except subprocess.TimeoutExpired:
                _killpg(p.pid)
                p.wait()
                rc, timed_out = None, True
        _killpg(p.pid)
    else:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(args, cwd, out, err, env)
        rc, timed_out = _wait(pid, limit)
    wall = time.monotonic() - t0
    return Run(cmd, args, rc, _read(out), _read(err), wall, timed_out)


def _killpg(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _wait(pid: int, limit: float) -> tuple[int | None, bool]:
    deadline = time.monotonic() + limit
    delay = 0.002
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            _killpg(pid)  # anything the command left running in its group
            return os.waitstatus_to_exitcode(status), False
        if time.monotonic() > deadline:
            _killpg(pid)
            os.waitpid(pid, 0)
            return None, True
        time.sleep(delay)
        delay = min(delay * 1.5, 0.05)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (not following links): regular files by SHA-256, others by type/target.
    Special files are never opened (a FIFO would block)."""
    out: dict[str, tuple] = {}
    paths = [root]
    if root.is_dir() and not root.is_symlink():
        for dp, dns, fns in os.walk(root):
            paths += [Path(dp) / n for n in dns + fns]
    for p in paths:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            out[str(p)] = ("missing",)
            continue
        if stat.S_ISREG(st.st_mode):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[str(p)] = ("file", h.hexdigest(), st.st_mode & 0o7777)
        elif stat.S_ISLNK(st.st_mode):
            out[str(p)] = ("link", os.readlink(p))
        else:
            out[str(p)] = (stat.S_IFMT(st.st_mode), st.st_mode & 0o7777)
    return out


# stderr lines the tool writes on purpose (render.warn, the report's "wrote …", notes such as a removed stale temp)
OWN_NOTES = ("lora-inspect: note:", "lora-inspect: warning:", "note:", "warning:", "wrote ")
_UNEXPECTED = re.compile(r"unexpected ([A-Za-z_][\w.]*):")  # the CLI's catch-all: "unexpected TypeError: …"
_WARNING = re.compile(r"\b(\w*Warning)\b")
_EXC = re.compile(r"^(\w+(?:\.\w+)*(?:Error|Exception|Warning|Interrupt|Exit)|\w+Error)\b")


def _traceback_name(stderr: str) -> str:
    for line in reversed(stderr.splitlines()):
        m = _EXC.match(line.strip())
        if m:
            return m.group(1).rsplit(".", 1)[-1]
    return "?"


def _not_notes(lines: list[str]) -> list[str]:
    """Lines that are not our own notes; a line after a note that is no warning/error/traceback line is the
    note folded by the console at its width (rich wraps long warnings), and counts as the note."""
    out, in_note = [], False
    for ln in lines:
        if ln.startswith(OWN_NOTES):
            in_note = True
            continue
        if in_note and not (ln.startswith("lora-inspect:") or _WARNING.search(ln) or ln.startswith("Traceback")):
            continue
        in_note = False
        out.append(ln)
    return out


def judge(run: Run, *, names: list[Path]) -> list[tuple[str, str]]:
    """Contract classes this run breaks, as (class, the stderr line that shows it)."""
    cmd = run.cmd.split()[0]
    if run.timed_out:
        return [("hang", f"no exit within the time limit ({run.wall:.1f} s)")]
    err = run.stderr
    lines = [ln for ln in err.splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    if "Traceback (most recent call last)" in err:
        return [(f"traceback:{_traceback_name(err)}", first)]
    assert run.rc is not None
    if run.rc < 0:
        return [(f"signal:{signal.Signals(-run.rc).name}", first)]
    out: list[tuple[str, str]] = []
    if run.rc not in (0, 1, 2) or (run.rc == 1 and cmd not in RULE_COMMANDS):
        out.append((f"exit-code:{run.rc}", first))
    other = _not_notes(lines)
    if run.rc == 2:
        errs = [ln for ln in other if ln.startswith("lora-inspect: error:")]
        m = _UNEXPECTED.search(err)
        if m:
            out.append((f"unexpected:{m.group(1).rsplit('.', 1)[-1]}", errs[0] if errs else first))
        elif "unexpected" in err:  # the contract: no "unexpected" at all (e.g. a codec's "unexpected end of data")
            out.append(("unexpected-word", errs[0] if errs else first))
        if not errs:
            out.append(("no-error-line", first))
        if len(other) > 1 or (other and not other[0].startswith("lora-inspect: error:")) or len(errs) > 1:
            w = next((ln for ln in other if not ln.startswith("lora-inspect: error:")), first)
            mw = _WARNING.search(w)
            out.append((f"stderr-text:{mw.group(1) if mw else 'text'}", w))
        if errs and not m and not any(str(n) in errs[0] for n in names):
            out.append(("error-names-no-path", errs[0]))
    elif other:
        mw = _WARNING.search(other[0])
        out.append((f"stderr-text:{mw.group(1) if mw else 'text'}", other[0]))
    return out


def leftovers(d: Path) -> list[str]:
    """Temp/trash entries of an atomic write anywhere under ``d`` (not following links)."""
    bad = []
    for dp, dns, fns in os.walk(d):
        for n in dns + fns:
            if ".lora-inspect-tmp" in n or ".lora-inspect-old" in n:
                bad.append(str(Path(dp) / n))
    return bad


def clear(d: Path) -> None:
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
