"""Benchmark: truncate a Llama-3-8B-shaped all-linear r=64 bf16 PEFT adapter to r=16, against copying it.

    python benchmarks/bench_rewrite.py [--runs 5] [--rank 16] [--no-report]

Uses the adapter of ``benchmarks/common.py`` (generated once into ``bench-data/``: 32 layers; q 4096×4096,
k/v 1024×4096, o 4096×4096, gate/up 14336×4096, down 4096×14336; 336 MB), then alternates
``shutil.copytree`` of the adapter with ``lora_inspect.rewrite.truncate(--rank 16)`` (read, decompose,
write with fsync, re-read self-check), both in-process with a warm page cache, and reports the median of
the per-pair ratios. It also times ``analysis.compute_spectra`` on the input alone — the exact QR work
any truncation must do — as the floor. Writes the table into ``reports/benchmarks.md`` under ``## truncate``.
Target: truncate ≤ 3× the copy time.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from common import DATA, llama3_8b_adapter, write_section  # noqa: E402

from lora_inspect.analysis import compute_spectra  # noqa: E402
from lora_inspect.formats import load_adapter  # noqa: E402
from lora_inspect.rewrite import TruncateSpec, truncate  # noqa: E402
from lora_inspect.spectrum import worker_count  # noqa: E402

REPORT = ROOT / "reports" / "benchmarks.md"


def _rm(p: Path) -> None:
    if p.exists():
        shutil.rmtree(p)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args()
    src = llama3_8b_adapter(r=64)
    n_modules = len(load_adapter(src).modules)
    size = (src / "adapter_model.safetensors").stat().st_size
    copy_out, trunc_out = DATA / "copy-out", DATA / "trunc-out"
    _rm(copy_out)
    _rm(trunc_out)
    shutil.copytree(src, copy_out)  # warm the page cache
    _rm(copy_out)
    copies, truncs, ratios = [], [], []
    for i in range(args.runs):
        order = ("copy", "trunc") if i % 2 == 0 else ("trunc", "copy")
        t = {}
        for what in order:
            t0 = time.perf_counter()
            if what == "copy":
                shutil.copytree(src, copy_out)
            else:
                truncate(load_adapter(src), trunc_out, TruncateSpec(rank=args.rank))
            t[what] = time.perf_counter() - t0
            _rm(copy_out if what == "copy" else trunc_out)
        copies.append(t["copy"])
        truncs.append(t["trunc"])
        ratios.append(t["trunc"] / t["copy"])
        print(f"run {i + 1}: copy {t['copy']:.3f} s  truncate {t['trunc']:.3f} s  ratio {ratios[-1]:.2f}", flush=True)
    truncate(load_adapter(src), trunc_out, TruncateSpec(rank=args.rank))
    out_size = (trunc_out / "adapter_model.safetensors").stat().st_size
    _rm(trunc_out)
    med = statistics.median(ratios)
    floors = []
    for _ in range(3):
        t0 = time.perf_counter()
        compute_spectra(load_adapter(src).modules)
        floors.append(time.perf_counter() - t0)
    floor = statistics.median(floors)
    verdict = "meets" if med <= 3 else "misses"
    print(f"median ratio {med:.2f} ({verdict} the ≤ 3× target); spectra of the input alone {floor:.3f} s "
          f"= {floor / statistics.median(copies):.1f}× the copy")
    if args.no_report:
        return
    body = "\n".join([
        f"`python benchmarks/bench_rewrite.py --runs {args.runs}` — Llama-3-8B-shaped all-linear PEFT adapter, "
        f"r=64 bf16 ({n_modules} modules, {size / 1e6:.0f} MB) truncated to r={args.rank} "
        f"({out_size / 1e6:.0f} MB), including the fsync'd atomic write and the re-read self-check, against "
        f"`shutil.copytree` of the same adapter (no fsync); alternating runs, warm page cache, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {worker_count()} worker threads with one torch thread each.",
        "",
        "| run | copy (s) | truncate (s) | ratio |",
        "|---:|---:|---:|---:|",
        *[f"| {i + 1} | {c:.3f} | {t:.3f} | {r:.2f} |" for i, (c, t, r) in enumerate(zip(copies, truncs, ratios))],
        f"| median | {statistics.median(copies):.3f} | {statistics.median(truncs):.3f} | **{med:.2f}** |",
        "",
        f"Target ≤ 3× the copy time: {verdict} it. The exact spectra of the input alone (`compute_spectra`: bf16→fp32, "
        f"Householder QR of every B and Aᵀ, batched r×r SVDs — work no exact truncation can skip) take "
        f"{floor:.3f} s = {floor / statistics.median(copies):.1f}× the copy by themselves; a warm-cache copy of "
        f"336 MB is a memcpy, so ≤ 3× would leave the QRs under ~0.5 s on {os.cpu_count()} cores. "
        f"Load average during the run: {os.getloadavg()[0]:.1f}.",
    ])
    write_section(REPORT, "truncate", body)
    print(f"wrote the table to {REPORT}")


if __name__ == "__main__":
    main()
