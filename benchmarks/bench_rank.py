"""`lora-inspect rank --json` against the cost of merely reading the adapter, and against a dense SVD.

    python benchmarks/bench_rank.py [--runs 5] [--r 64] [--dense 2]

1. Generates (once, into bench-data/) a Llama-3-8B-shaped all-linear r=64 bf16 PEFT adapter (336 MB).
2. Times, alternating runs in fresh processes:
   - floor: a process that only imports numpy, memory-maps the file and decodes every tensor bf16 → float32
     into one reused buffer (what any analysis of the file must do; no torch: analysis does not import it);
   - ours:  `lora-inspect rank ADAPTER --json > /dev/null`.
   The median ratio ours/floor is the headline (the analysis is float64-arithmetic bound: reports/profile_rank.md);
   - info:  `lora-inspect info ADAPTER --json`, which reads the header alone.
3. Times a dense float64 SVD (svdvals of s·B@A formed densely) on a sample of modules and extrapolates
   to all 224 with the usual m·n·min(m, n) cost model — what a tool that forms ΔW would pay.
4. Checks the QR route against that dense SVD on the sampled modules (max |Δσ|/σ₁).
Writes the table to reports/benchmarks.md (section "rank").
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import PY, READ_FLOOR, ROOT, alternate, llama3_8b_adapter, median, write_section  # noqa: E402

FLOOR = READ_FLOOR


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--dense", type=int, default=2, help="modules to SVD densely (0 to skip)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave reports/ alone")
    args = ap.parse_args()

    load0 = os.getloadavg()
    print(f"load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    adapter = llama3_8b_adapter(r=args.r)
    weights = adapter / "adapter_model.safetensors"
    floor_py = ROOT / "bench-data" / "floor_read.py"
    floor_py.write_text(FLOOR)
    cli = [PY, "-c", "from lora_inspect.cli import main; main()", "rank", str(adapter), "--json"]
    info = [PY, "-c", "from lora_inspect.cli import main; main()", "info", str(adapter), "--json"]
    cmds = {"floor": [PY, str(floor_py), str(weights)], "rank": cli, "info": info}
    alternate({"floor": cmds["floor"]}, 1)  # warm the page cache
    times = alternate(cmds, args.runs)
    ratios = [o / f for o, f in zip(times["rank"], times["floor"])]
    med_floor, med_rank, med_ratio = median(times["floor"]), median(times["rank"]), median(ratios)
    print(f"floor (import numpy + read and decode {weights.stat().st_size / 1e6:.0f} MB): median {med_floor:.2f} s  {times['floor']}")
    print(f"lora-inspect rank --json:                median {med_rank:.2f} s  {times['rank']}")
    med_info = median(times["info"])
    print(f"lora-inspect info --json (header only):  median {med_info:.2f} s  {times['info']}")
    print(f"ratio rank/floor: median {med_ratio:.2f}x  (per run: {', '.join(f'{r:.2f}' for r in ratios)})")

    dense_rows = []
    est_total = None
    if args.dense:
        from lora_inspect import load_adapter
        from lora_inspect.spectrum import singular_values

        ad = load_adapter(adapter)
        by_shape = {}
        for m in ad.modules:
            by_shape.setdefault(m.shape, m)
        sample = sorted(by_shape.values(), key=lambda m: m.shape[0] * m.shape[1])[: args.dense]
        unit = []
        worst = 0.0
        for m in sample:
            b, a = m.factors(np.float64)
            t0 = time.perf_counter()
            dense = np.linalg.svd(m.scale * (b @ a), compute_uv=False)
            dt = time.perf_counter() - t0
            o, i = m.shape
            unit.append(dt / (o * i * min(o, i)))
            qr = singular_values(*m.factors(np.float32), m.scale)
            err = float(np.abs(dense[: m.rank] - qr).max() / dense[0])
            worst = max(worst, err)
            dense_rows.append((m.name, f"{o}×{i}", f"{dt:.2f} s", f"{err:.1e}"))
            print(f"dense fp64 SVD {m.name} {o}×{i}: {dt:.2f} s; QR route max |Δσ|/σ₁ = {err:.1e}")
        per = sum(unit) / len(unit)
        est_total = sum(per * m.shape[0] * m.shape[1] * min(m.shape) for m in ad.modules)
        print(f"dense SVD of all {len(ad.modules)} modules, extrapolated: {est_total / 60:.1f} min "
              f"({est_total / med_rank:.0f}x our rank)")

    load1 = os.getloadavg()
    print(f"load average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    if args.no_write:
        return
    lines = [
        f"`python benchmarks/bench_rank.py --runs {args.runs} --r {args.r} --dense {args.dense}` — "
        f"Llama-3-8B-shaped all-linear r={args.r} bf16 adapter (224 modules, {weights.stat().st_size / 1e6:.0f} MB), "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), numpy {np.__version__}, "
        f"fresh processes, alternating runs, page cache warm; load average {load0[0]:.2f} before, {load1[0]:.2f} after.",
        "",
        "| what | median wall time | ratio to floor |",
        "|---|---:|---:|",
        f"| floor: import numpy + read and decode every tensor | {med_floor:.2f} s | 1.00× |",
        f"| `lora-inspect rank --json` (exact spectra of all modules) | {med_rank:.2f} s | **{med_ratio:.2f}×** |",
        f"| `lora-inspect info --json` (header only) | {med_info:.2f} s | {med_info / med_floor:.2f}× |",
    ]
    if est_total is not None:
        lines.append(f"| dense float64 SVD of every ΔW (extrapolated from {len(dense_rows)} modules) | "
                     f"{est_total / 60:.1f} min | {est_total / med_floor:.0f}× |")
    lines += ["", f"Per-run ratios: {', '.join(f'{r:.2f}' for r in ratios)}. The float64 Gram matrices alone take "
              "longer than the floor: where the rest of the time goes is in reports/profile_rank.md."]
    if dense_rows:
        lines += ["", "| sampled module | shape | dense fp64 SVD | float32 QR route max abs. error / σ₁ |",
                  "|---|---|---:|---:|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in dense_rows]
    write_section(ROOT / "reports" / "benchmarks.md", "rank", "\n".join(lines))
    print("wrote reports/benchmarks.md")


if __name__ == "__main__":
    main()
