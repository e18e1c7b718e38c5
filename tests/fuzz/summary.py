"""The Markdown summary of a fuzz run: inputs, runs, timings, breaks by class with one example each."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict

from .core import Result
from .runner import COMMANDS

__all__ = ["markdown", "break_classes"]


def break_classes(result: Result) -> Counter:
    return Counter(b.cls for b in result.breaks)


def _md(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")[:220]


def markdown(result: Result, command: str) -> str:
    cfg = result.config
    runs = [r for i in result.inputs for r in i.runs]
    per_input = [sum(w for _, _, w in i.runs) + i.prep for i in result.inputs]
    by_cmd: dict[str, list[float]] = defaultdict(list)
    for name, _, w in runs:
        by_cmd[name].append(w)
    rcs = Counter(rc for _, rc, _ in runs)
    fams = Counter(i.family for i in result.inputs)
    broken_inputs = {b.index for b in result.breaks}
    lines = [
        "# Contract fuzzer: results", "",
        f"Command: `{command}`", "",
        f"- seed {cfg.seed}, {len(result.inputs)} mutated inputs, {len(runs)} command runs "
        f"({sum(i.skipped for i in result.inputs)} skipped after a hang), exec mode `{cfg.mode}`, jobs {cfg.jobs}, "
        f"time limit {cfg.limit:g} s per run",
        f"- commands: {', '.join(cfg.commands)}" + (f"; all {len(COMMANDS)} on every {cfg.full_every}th input" if cfg.full_every else ""),
        f"- wall time {result.wall:.0f} s; per input mean {statistics.mean(per_input) if per_input else 0:.2f} s, "
        f"median {statistics.median(per_input) if per_input else 0:.2f} s",
        f"- exit statuses: {', '.join(f'{k}: {v}' for k, v in sorted(rcs.items(), key=lambda kv: str(kv[0])))}",
        f"- **{len(result.breaks)} contract breaks** in {len(broken_inputs)} inputs, "
        f"{len(break_classes(result))} classes" + ("; the seed files changed!" if result.seeds_changed else ""),
        "",
        "## Breaks by class", "",
        "| class | breaks | inputs | example: mutation (seed) | command | stderr / detail |",
        "|---|---:|---:|---|---|---|",
    ]
    groups: dict[str, list] = defaultdict(list)
    for b in result.breaks:
        groups[b.cls].append(b)
    for cls, bs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        ex = bs[0]
        lines.append(f"| `{cls}` | {len(bs)} | {len({b.index for b in bs})} | #{ex.index} {_md(ex.family + ': ' + ex.desc)} "
                     f"({ex.seed}) | `{ex.cmd}` | {_md(ex.stderr)} |")
    if not groups:
        lines.append("| (none) | 0 | 0 | | | |")
    lines += ["", "## Breaks by mutation family", "", "| family | inputs | inputs with a break | classes |", "|---|---:|---:|---|"]
    for fam, n in sorted(fams.items()):
        bs = [b for b in result.breaks if b.family == fam]
        lines.append(f"| {fam} | {n} | {len({b.index for b in bs})} | "
                     f"{', '.join(f'{c} ×{k}' for c, k in Counter(b.cls for b in bs).most_common())} |")
    lines += ["", "## Time per command (s)", "", "| command | runs | mean | median | max |", "|---|---:|---:|---:|---:|"]
    for name, ws in sorted(by_cmd.items()):
        lines.append(f"| {name} | {len(ws)} | {statistics.mean(ws):.2f} | {statistics.median(ws):.2f} | {max(ws):.2f} |")
    lines += ["", "Reproduce one input: `python -m tests.fuzz --seed SEED --only INDEX --keep` (same options), "
              "then look under the work folder's `in-INDEX/`.", ""]
    return "\n".join(lines)
