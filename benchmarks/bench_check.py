"""`lora-inspect check` and `info` on the 8B-shaped adapter, against the floors they cannot beat (issue 20:
check with size-only rules and info ≤ 0.5 s; the integrity rules at read speed).

    python benchmarks/bench_check.py [--runs 5] [--max-load 1.5]

On the Llama-3-8B-shaped all-linear r=64 bf16 PEFT adapter (bench-data/, generated once by
benchmarks/common.py, 224 modules, 336 MB), times in fresh processes, alternating, after one untimed
warm-up round (page cache warm), stdout to /dev/null:
  - python floor:    python -c "pass"
  - numpy floor:     python -c "import numpy" (what the integrity rules import)
  - read floor:      python -c "…": numpy memory-maps the file and sums it as uint16 (every byte touched once)
  - info:            lora-inspect info ADAPTER --json
  - check (size):    lora-inspect check ADAPTER --max-size 500MB --no-integrity --json (header rules only)
  - check:           lora-inspect check ADAPTER --max-size 500MB --json (the default integrity rules too:
                     NaN/±inf and all-zero B over every tensor)
Prints the load average before and after; above --max-load before starting the table is marked NOT
REPORTABLE (exit 3). Writes the section "check and info" of reports/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from common import ROOT, alternate, llama3_8b_adapter, write_section

PY = sys.executable
REPORT = ROOT / "reports" / "benchmarks.md"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max-load", type=float, default=1.5)
    args = ap.parse_args()
    adapter = llama3_8b_adapter()
    weights = adapter / "adapter_model.safetensors"
    li = [PY, "-m", "lora_inspect"]
    n = (weights.stat().st_size - 8) // 2
    read = ("import numpy as np, sys; a = np.memmap(sys.argv[1], dtype=np.uint16, mode='r', "
            f"offset=8, shape=({n},)); int(a.sum(dtype=np.uint64))")
    cmds = {
        "python floor": [PY, "-c", "pass"],
        "numpy floor": [PY, "-c", "import numpy"],
        "read floor (numpy memmap, every byte)": [PY, "-c", read, str(weights)],
        "info --json": [*li, "info", str(adapter), "--json"],
        "check --no-integrity (header rules)": [*li, "check", str(adapter), "--max-size", "500MB", "--no-integrity",
                                                "--json"],
        "check (integrity rules too)": [*li, "check", str(adapter), "--max-size", "500MB", "--json"],
    }
    before = os.getloadavg()
    print(f"load average before: {before[0]:.2f}/{before[1]:.2f}/{before[2]:.2f}")
    alternate(cmds, 1)  # warm-up: page cache, .pyc files
    times = alternate(cmds, args.runs)
    after = os.getloadavg()
    print(f"load average after:  {after[0]:.2f}/{after[1]:.2f}/{after[2]:.2f}")
    quiet = before[0] <= args.max_load and args.runs >= 5
    rows = ["| command | median | min | max |", "|---|---:|---:|---:|"]
    rows += [f"| {k} | {statistics.median(v):.2f} s | {min(v):.2f} s | {max(v):.2f} s |" for k, v in times.items()]
    if not quiet:
        rows.append("| NOT REPORTABLE: load average above --max-load before starting, or fewer than 5 runs | | | |")
    body = "\n".join([
        f"`python benchmarks/bench_check.py --runs {args.runs}` — Llama-3-8B-shaped all-linear r=64 bf16 PEFT adapter "
        f"(224 modules, {weights.stat().st_size / 1e6:.0f} MB), fresh processes, alternating, page cache warm; load "
        f"average {before[0]:.2f} before, {after[0]:.2f} after. No command here imports torch.", "", *rows, "",
        "Per-run times (s): " + "; ".join(f"{k}: " + ", ".join(f"{x:.2f}" for x in v) for k, v in times.items()),
    ])
    print(body)
    if quiet:
        write_section(REPORT, "check and info", body)
        print(f"wrote {REPORT.relative_to(ROOT)}")
    return 0 if quiet else 3


if __name__ == "__main__":
    sys.exit(main())
