"""``python -m tests.fuzz``: fuzz lora-inspect's commands and write a Markdown summary.

Short run (a minute or two): ``python -m tests.fuzz --seed 1 --n 40 --quick --out /tmp/fuzz.md``
Long run: ``python -m tests.fuzz --seed 7 --n 5000 --quick --full-every 10 --jobs 2 --out reports/fuzz.md``
Exit status: 0 no contract break, 1 breaks found (the summary lists them), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from .core import Config, run_fuzz
from .mutations import FAMILIES
from .runner import COMMANDS, QUICK
from .summary import markdown


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=50, help="mutated inputs")
    ap.add_argument("--out", type=Path, help="write the Markdown summary here")
    ap.add_argument("--json", type=Path, help="write every break as JSON lines here")
    ap.add_argument("--quick", action="store_true", help=f"commands {', '.join(QUICK)} only (see --full-every)")
    ap.add_argument("--commands", help="comma-separated subset of: " + ", ".join(COMMANDS))
    ap.add_argument("--full-every", type=int, default=0, help="every command on every k-th input")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--limit", type=float, default=20.0, help="seconds per command run")
    ap.add_argument("--exec", dest="mode", choices=["fork", "spawn"], default="fork",
                    help="fork: forked children of a preloaded server (fast); spawn: python -m lora_inspect each time")
    ap.add_argument("--family", choices=sorted(FAMILIES))
    ap.add_argument("--round-robin", action="store_true", help="input i uses family i mod 21 (covers every family)")
    ap.add_argument("--only", help="comma-separated input indices (reproduce)")
    ap.add_argument("--keep", action="store_true", help="keep each input's folder")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lora-inspect-fuzz"))
    ap.add_argument("--time-budget", type=float, help="stop drawing inputs after this many seconds")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    cmds = QUICK if a.quick else list(COMMANDS)
    if a.commands:
        cmds = [c.strip() for c in a.commands.split(",")]
        bad = [c for c in cmds if c not in COMMANDS]
        if bad:
            ap.error(f"unknown commands: {bad}")
    cfg = Config(seed=a.seed, n=a.n, workdir=a.workdir, limit=a.limit, mode=a.mode, commands=cmds,
                 full_every=a.full_every, jobs=a.jobs, family=a.family,
                 only=[int(x) for x in a.only.split(",")] if a.only else None, keep=a.keep, time_budget=a.time_budget,
                 round_robin=a.round_robin)

    def progress(r):
        if a.verbose or r.breaks:
            tag = "; ".join(sorted({f"{b.cls} [{b.cmd}]" for b in r.breaks})) or "ok"
            print(f"#{r.index} {r.seed} {r.family}: {r.desc[:80]} → {tag}", file=sys.stderr, flush=True)

    result = run_fuzz(cfg, progress)
    command = "python -m tests.fuzz " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    text = markdown(result, command)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
    if a.json:
        with open(a.json, "w") as f:
            for b in result.breaks:
                f.write(json.dumps(asdict(b)) + "\n")
    print(text.split("## Breaks by mutation family")[0])
    return 1 if result.breaks or result.seeds_changed else 0


if __name__ == "__main__":
    sys.exit(main())
