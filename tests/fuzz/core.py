"""The fuzz loop: draw a mutated input, run the commands on it, judge each run, collect the breaks."""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .mutations import Mutated, mutate
from .runner import COMMANDS, WRITES_ON_FAILED_RULE, Break, Run, clear, execute, judge, leftovers, snapshot
from .seeds import Seed, make_seeds

__all__ = ["Config", "InputResult", "Result", "fuzz_one", "run_fuzz"]


@dataclass
class Config:
    seed: int = 0
    n: int = 50
    workdir: Path = Path("/tmp/lora-inspect-fuzz")
    limit: float = 20.0  # seconds per run
    mode: str = "fork"  # fork | spawn
    commands: list[str] = field(default_factory=lambda: list(COMMANDS))
    full_every: int = 0  # >0: the full command set on every k-th input, `commands` on the others
    jobs: int = 1
    family: str | None = None  # only this mutation family
    only: list[int] | None = None  # only these input indices (reproduce a break)
    keep: bool = False  # keep each input's folder
    time_budget: float | None = None  # stop drawing new inputs after this many seconds
    verify_outputs: bool = True  # `info OUT` after every successful rewrite
    round_robin: bool = False  # input i uses mutation family i mod (number of families): every family covered


@dataclass
class InputResult:
    index: int
    seed: str
    family: str
    desc: str
    runs: list[tuple[str, int | None, float]]  # (command, exit status, seconds)
    breaks: list[Break]
    skipped: int = 0
    prep: float = 0.0


@dataclass
class Result:
    config: Config
    inputs: list[InputResult]
    seeds: list[Seed]
    wall: float
    seeds_changed: bool = False

    @property
    def breaks(self) -> list[Break]:
        return [b for r in self.inputs for b in r.breaks]


def _commands_for(cfg: Config, index: int) -> list[str]:
    if cfg.full_every and index % cfg.full_every == 0:
        return list(COMMANDS)
    return cfg.commands


def _out_path(mut: Mutated, out_dir: Path, kind: str) -> Path:
    if kind == "report.html":
        return out_dir / "report.html"
    if kind == "kohya.safetensors":  # convert/merge --to kohya: one file
        return out_dir / "OUT.safetensors"
    name = mut.path.name
    suffix = Path(name).suffix if Path(name).suffix in (".safetensors", ".bin") else ""
    return out_dir / ("OUT" + suffix)


def _origin(seeds: list[Seed], name: str) -> Path:
    return next(s.path for s in seeds if s.name == name)


def fuzz_one(cfg: Config, seeds: list[Seed], index: int) -> InputResult:
    rng = random.Random(f"{cfg.seed}:{index}")
    d = cfg.workdir / f"in-{index:06d}"
    if d.exists():
        shutil.rmtree(d)
    inp_dir, out_dir, cwd, scratch = d / "in", d / "out", d / "cwd", d / "scratch"
    for p in (out_dir, cwd, scratch):
        p.mkdir(parents=True)
    marker = d / "PWNED"
    t0 = time.monotonic()
    family = cfg.family
    if family is None and cfg.round_robin:
        from .mutations import FAMILIES

        family = list(FAMILIES)[index % len(FAMILIES)]
    mut = mutate(rng, seeds, inp_dir, marker, family)
    prep = time.monotonic() - t0
    before = snapshot(inp_dir)
    orig = _origin(seeds, mut.seed)
    res = InputResult(index, mut.seed, mut.family, mut.desc, [], [], prep=prep)

    def brk(cls: str, cmd: str, line: str, **extra) -> None:
        res.breaks.append(Break(cls, index, mut.seed, mut.family, mut.desc, cmd, line[:400], extra))

    cmds = _commands_for(cfg, index)
    for i, name in enumerate(cmds):
        template, writes = COMMANDS[name]
        out = _out_path(mut, out_dir, writes) if writes else None
        args = [a.replace("{in}", str(mut.path)).replace("{orig}", str(orig)).replace("{out}", str(out)) for a in template]
        limit = cfg.limit * (3 if name == "report" else 1)  # report draws figures: 5-17 s on a loaded 2-core box
        run = execute(name, args, cwd, scratch, limit, cfg.mode)
        res.runs.append((name, run.rc, run.wall))
        for cls, line in judge(run, names=[inp_dir, out_dir, orig]):
            brk(cls, name, line)
        if name == "check" and run.rc == 0 and mut.expect_check_fails:
            brk("check-passes-bad-weights", name, "exit 0 on " + mut.desc)
        if out is not None:
            _judge_output(cfg, run, out, out_dir, cwd, scratch, brk, name)
        if leftovers(inp_dir) or leftovers(cwd):
            brk("temp-left", name, ", ".join(leftovers(inp_dir) + leftovers(cwd))[:300])
        if any(cwd.iterdir()):
            brk("stray-file", name, ", ".join(p.name for p in cwd.iterdir())[:300])
            clear(cwd)
        if marker.exists():
            brk("executed", name, f"{marker} was created: the pickle ran")
            marker.unlink()
        after = snapshot(inp_dir)
        if after != before:
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            brk("input-changed", name, ", ".join(changed)[:300])
            before = after
        clear(out_dir)
        if run.timed_out:  # one hang is enough: the rest would hang too and cost the time limit each
            res.skipped = len(cmds) - i - 1
            break
    if not cfg.keep:
        shutil.rmtree(d, ignore_errors=True)
    return res


def _judge_output(cfg, run: Run, out: Path, out_dir: Path, cwd: Path, scratch: Path, brk, name: str) -> None:
    left = leftovers(out_dir)
    if left:
        brk("temp-left", name, ", ".join(left)[:300])
    if run.rc == 0:
        if not (out.exists() or out.is_symlink()):
            brk("output-missing", name, f"exit 0 but {out} is absent")
        elif cfg.verify_outputs and out.name != "report.html":
            v = execute(f"info (OUT of {name})", ["info", str(out)], cwd, scratch, cfg.limit, cfg.mode)
            if v.rc != 0:
                brk("accepted-unreadable-output", name, (v.stderr.strip().splitlines() or ["(timeout)"])[0])
    elif run.rc == 1 and name.split()[0] in WRITES_ON_FAILED_RULE:  # written, and the rule failed on it: said
        return
    elif run.rc is not None:  # (a run killed at the time limit may have finished its write: the hang is the break)
        present = [p.name for p in out_dir.iterdir() if not p.name.startswith(".")]
        if present:
            brk("output-left", name, f"exit {run.rc}: {', '.join(present)} left in the output folder")


def _worker(args):
    cfg, seeds, index = args
    return _safe_one(cfg, seeds, index)


def _safe_one(cfg: Config, seeds: list[Seed], index: int) -> InputResult:
    """fuzz_one, with a bug of the fuzzer itself recorded (class ``fuzzer-error:…``) instead of ending the run."""
    try:
        return fuzz_one(cfg, seeds, index)
    except Exception as e:
        import traceback

        line = traceback.format_exc().strip().splitlines()[-1]
        return InputResult(index, "?", "?", "?", [], [Break(f"fuzzer-error:{e.__class__.__name__}", index, "?", "?", "?",
                                                             "(mutation)", line[:400])])


def run_fuzz(cfg: Config, progress=None) -> Result:
    """Make the seeds, fuzz ``cfg.n`` inputs (or ``cfg.only``), return every run's verdict."""
    from .runner import preload

    t0 = time.monotonic()
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    seeds_dir = cfg.workdir / "seeds"
    if seeds_dir.exists():
        shutil.rmtree(seeds_dir)
    if cfg.mode == "fork":
        preload()
    seeds = make_seeds(seeds_dir, cfg.seed)
    seed_snap = snapshot(seeds_dir)
    indices = cfg.only if cfg.only is not None else list(range(cfg.n))
    results: list[InputResult] = []

    def budget_left() -> bool:
        return cfg.time_budget is None or time.monotonic() - t0 < cfg.time_budget

    if cfg.jobs <= 1:
        for i in indices:
            if not budget_left():
                break
            results.append(_safe_one(cfg, seeds, i))
            if progress:
                progress(results[-1])
    else:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(cfg.jobs, maxtasksperchild=200) as pool:
            pending = iter(indices)
            it = pool.imap_unordered(_worker, ((cfg, seeds, i) for i in pending), chunksize=1)
            for r in it:
                results.append(r)
                if progress:
                    progress(r)
                if not budget_left():
                    pool.terminate()
                    break
    results.sort(key=lambda r: r.index)
    changed = snapshot(seeds_dir) != seed_snap
    if not cfg.keep:
        shutil.rmtree(seeds_dir, ignore_errors=True)
    return Result(cfg, results, seeds, time.monotonic() - t0, seeds_changed=changed)
