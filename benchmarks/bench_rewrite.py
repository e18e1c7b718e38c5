"""Benchmark: truncate a Llama-3-8B-shaped all-linear r=64 bf16 PEFT adapter to r=16, against copying it.

    python benchmarks/bench_rewrite.py [--runs 5] [--no-report]

Generates (once, seeded) ``bench-data/llama3-8b-r64-bf16/`` — 32 layers; q 4096×4096, k/v 1024×4096,
o 4096×4096, gate/up 14336×4096, down 4096×14336; ≈ 336 MB — then alternates ``shutil.copytree`` of
the adapter with ``lora_inspect.rewrite.truncate(--rank 16)`` (which includes the re-read self-check),
both in-process with a warm page cache, and reports the median of the per-pair ratios. Writes the
table into ``reports/benchmarks.md`` under ``## truncate`` (only that section is replaced).
Target: truncate ≤ 3× the copy time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora_inspect.formats import load_adapter  # noqa: E402
from lora_inspect.formats.write import write_safetensors  # noqa: E402
from lora_inspect.rewrite import TruncateSpec, truncate  # noqa: E402

DATA = ROOT / "bench-data"
SRC = DATA / "llama3-8b-r64-bf16"
REPORT = ROOT / "reports" / "benchmarks.md"
SHAPES = {  # module: (out, in)
    "self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (1024, 4096), "self_attn.v_proj": (1024, 4096),
    "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (14336, 4096), "mlp.up_proj": (14336, 4096),
    "mlp.down_proj": (4096, 14336),
}
LAYERS, R, ALPHA = 32, 64, 128


def generate() -> Path:
    weights = SRC / "adapter_model.safetensors"
    if weights.is_file() and (SRC / "adapter_config.json").is_file():
        return SRC
    SRC.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1234)
    tensors = {}
    for i in range(LAYERS):
        for mod, (out_dim, in_dim) in SHAPES.items():
            pre = f"base_model.model.model.layers.{i}.{mod}"
            tensors[f"{pre}.lora_A.weight"] = (torch.randn(R, in_dim, generator=g) / in_dim**0.5).to(torch.bfloat16)
            tensors[f"{pre}.lora_B.weight"] = (torch.randn(out_dim, R, generator=g) * 0.01).to(torch.bfloat16)
    write_safetensors(weights, tensors, {"format": "pt"})
    cfg = {"peft_type": "LORA", "r": R, "lora_alpha": ALPHA, "target_modules": sorted(m.split(".")[1] for m in SHAPES),
           "base_model_name_or_path": "meta-llama/Meta-Llama-3-8B", "task_type": "CAUSAL_LM", "use_rslora": False,
           "rank_pattern": {}, "alpha_pattern": {}, "bias": "none", "fan_in_fan_out": False}
    (SRC / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return SRC


def _rm(p: Path) -> None:
    if p.exists():
        shutil.rmtree(p)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args()
    src = generate()
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
    verdict = "meets" if med <= 3 else "misses"
    print(f"median ratio {med:.2f} ({verdict} the ≤ 3× target)")
    if args.no_report:
        return
    section = "\n".join([
        "## truncate",
        "",
        f"`python benchmarks/bench_rewrite.py --runs {args.runs}` — Llama-3-8B-shaped all-linear PEFT adapter, "
        f"r={R} bf16 ({LAYERS * len(SHAPES)} modules, {size / 1e6:.0f} MB) truncated to r={args.rank} "
        f"({out_size / 1e6:.0f} MB), including the re-read self-check, against `shutil.copytree` of the same "
        f"adapter; alternating runs, warm page cache, {platform.machine()}, {torch.get_num_threads()} torch threads "
        "available (truncate uses 1).",
        "",
        "| run | copy (s) | truncate (s) | ratio |",
        "|---:|---:|---:|---:|",
        *[f"| {i + 1} | {c:.3f} | {t:.3f} | {r:.2f} |" for i, (c, t, r) in enumerate(zip(copies, truncs, ratios))],
        f"| median | {statistics.median(copies):.3f} | {statistics.median(truncs):.3f} | **{med:.2f}** |",
        "",
        f"Target ≤ 3× the copy time: {verdict} it (median of per-pair ratios {med:.2f}); load average during "
        f"the run {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other jobs share the machine).",
        "",
        "Where the time goes (cProfile, one run): Gram matrices BᵀB / AAᵀ ≈ 1.2 s, bf16→fp32 conversion and back "
        "≈ 0.9 s, the new factors B·M / N·A ≈ 0.5 s, 448 small SVD/eigvalsh calls ≈ 0.8 s, self-check re-read "
        "≈ 0.4 s, write + fsync ≈ 0.25 s. Done: Householder `geqrf`+`ormqr` (9.3 s per truncation) replaced by "
        "CholeskyQR with a κ guard (Householder fallback), finiteness read off R instead of a full `isfinite` pass, "
        "LAPACK pinned to one thread (two threads were 10–40× slower under load). Floor: the Grams alone are "
        "Σ(out+in)·r² = 10.7 G multiply-adds, ≈ 0.7 s at this AVX2 core's measured ~30 GFLOP/s single-thread fp32 "
        "— already 2–3× a warm-cache copy, so ≤ 3× is out of reach single-threaded here without giving up exactness.",
        "",
    ])
    REPORT.parent.mkdir(exist_ok=True)
    text = REPORT.read_text() if REPORT.is_file() else "# Benchmarks\n\n"
    pat = re.compile(r"^## truncate\n.*?(?=^## |\Z)", re.S | re.M)
    if pat.search(text):
        text = pat.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    REPORT.write_text(text.rstrip("\n") + "\n")
    print(f"wrote the table to {REPORT}")


if __name__ == "__main__":
    main()
