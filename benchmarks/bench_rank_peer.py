"""`lora-inspect rank --json` against the closest peer, Gradience's `audit` (issue 20: rank ≥ 3× faster).

    python benchmarks/bench_rank_peer.py [--runs 5] [--max-load 1.5] [--no-write]

The peer is not a dependency of this project (no extra, not in the tests); install it by hand:

    pip install --no-deps gradience==0.11.0 && pip install pyyaml packaging

On the Llama-3-8B-shaped all-linear r=64 bf16 PEFT adapter that benchmarks/bench_rank.py uses (generated once
into bench-data/, 224 modules, 336 MB), times in fresh processes, alternating, after one untimed warm-up round
(page cache warm), stdout to /dev/null:
  - torch floor:   python -c "import torch"
  - scipy floor:   python -c "import numpy, scipy.linalg"
  - info:          python -m lora_inspect info ADAPTER --json    (header only)
  - ours:          python -m lora_inspect rank ADAPTER --json    (every σ of every module)
  - peer:          python -m gradience audit --peft-dir ADAPTER --json --layers
                   (the form gradience.api.audit runs; adapter-only: without --base-model it loads no base model
                   and downloads nothing, and HF_HUB_OFFLINE=1 is set for every command anyway)
Both analysers compute the full r-length spectrum of every module without forming ΔW (ours: float64 Gram →
Cholesky/QR R factors + a batched r×r SVD; Gradience: float64 Gram matrices + two r×r eigendecompositions).
The warm-up round's outputs are cross-checked (same modules, σ₁, stable rank, entropy rank, energy rank) so the timing is like for like.

Prints the load average before and after; a 1-minute load average above --max-load before starting marks the
table NOT REPORTABLE (exit status 3); fewer than 5 runs, or outputs that disagree, mark it so too. Writes
reports/rank_peer.md (section "rank vs peer") unless --no-write.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata as md
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REPORT = ROOT / "reports" / "rank_peer.md"
PY = sys.executable
PEER_VERSION = "0.11.0"
INSTALL_HINT = (f"gradience {PEER_VERSION} (the peer; not a project dependency) is not installed: "
                f"pip install --no-deps gradience=={PEER_VERSION} && pip install pyyaml packaging")
# every child gets this environment: nothing may reach the network
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

OURS_COMPUTES = ("the exact singular values of every module's s·B@A without forming it: float64 Gram matrices BᵀB "
                 "and AAᵀ reduced to R factors by Cholesky when κ ≤ 1e4 (Householder QR otherwise), in worker "
                 "threads, then one batched float64 SVD of the r×r cores; emits all r σ of every module plus "
                 "energy/stable/entropy rank, the recommended rank, a rank_pattern and by-type/by-layer summaries")
PEER_COMPUTES = ("the exact singular values of every module's B@A without forming it: float64 Gram matrices AAᵀ and "
                 "BᵀB, eigh(AAᵀ), then eigvalsh of the r×r matrix Λ^½·UᵀBᵀBU·Λ^½ (σ² route), one module at a "
                 "time — the same spectrum three times per module (the audit, then compute_lora_norms twice via "
                 "compute_update_norms) and the Gram matrices six times; emits per-layer stable/effective rank, "
                 "k at 90/95/99 % energy, σ₁, ‖ΔW‖_F, rank-policy suggestions (energy, knee, erank) and a "
                 "policy-disagreement analysis, but not the σ themselves (only with --top-singular-values k)")


def version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> tuple[float, float, float]:
    return os.getloadavg()


def fmt_load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def run_once(cmd: list[str], stdout_path: Path | None = None) -> float:
    """Wall time of one fresh process; stdout to /dev/null (or a file, untimed rounds only)."""
    with open(stdout_path or os.devnull, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, env=ENV, cwd=ROOT)
        elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace")[-2000:]
        sys.exit(f"failed (exit {proc.returncode}): {shlex.join(cmd)}\n{tail}")
    return elapsed


def peer_json(text: str) -> dict:
    """Gradience 0.11.0 prints progress lines ("computing SVD and metrics for layer: …") on stdout ahead of its
    --json payload; the payload is the last line-initial '{' onwards."""
    if text.startswith("{"):
        return json.loads(text)
    return json.loads(text[text.index("\n{") + 1:])


def cross_check(ours_out: Path, peer_out: Path) -> tuple[bool, list[str]]:
    """Do both sides report the same modules with the same spectra? (warm-up round outputs)"""
    try:
        ours = json.loads(ours_out.read_text())
        peer = peer_json(peer_out.read_text())
        mods = {m["name"]: m for m in ours["modules"]}
        rows = {}
        for row in peer["layer_data"]["layer_rows"]:
            name = row["name"]
            for prefix in ("base_model.model.", "base_model."):
                if name.startswith(prefix):
                    name = name[len(prefix):]
                    break
            rows[name] = row
        common = sorted(set(mods) & set(rows))
        if not common:
            return False, [f"no module in common (ours {len(mods)}, peer {len(rows)})"]

        def rel(a: float, b: float) -> float:
            return abs(a - b) / max(abs(b), 1e-300)

        sig = max(rel(rows[n]["sigma_max_scaled"], mods[n]["singular_values"][0]) for n in common)
        stab = max(rel(rows[n]["stable_rank"], mods[n]["stable_rank"]) for n in common)
        ent = max(rel(rows[n]["effective_rank"], mods[n]["entropy_rank"]) for n in common)
        lines = [
            f"ours: {len(mods)} modules, {ours_out.stat().st_size / 1e3:.0f} kB of JSON; "
            f"peer: n_layers {peer['n_layers']}, {len(rows)} layer rows, {peer_out.stat().st_size / 1e3:.0f} kB "
            f"of output; {len(common)} in common",
            f"max relative difference over the common modules: σ₁ {sig:.1e}, stable rank {stab:.1e}, "
            f"entropy (effective) rank {ent:.1e}",
        ]
        key = {0.9: "energy_rank_90", 0.95: "energy_rank_95", 0.99: "energy_rank_99"}.get(ours.get("energy"))
        if key:
            same = sum(rows[n][key] == mods[n]["energy_rank"] for n in common)
            lines.append(f"rank at {ours['energy']:.0%} energy identical in {same}/{len(common)} modules")
        ok = len(common) == len(mods) == len(rows) == peer["n_layers"] and max(sig, stab, ent) < 1e-3
        return ok, lines
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return False, [f"cross-check failed: {type(e).__name__}: {e}"]


def stats(xs: list[float]) -> tuple[float, float, float]:
    return statistics.median(xs), min(xs), max(xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="timed rounds (median of these; ≥ 5 for a report)")
    ap.add_argument("--max-load", type=float, default=1.5,
                    help="1-minute load average above which the numbers are marked not reportable")
    ap.add_argument("--no-write", action="store_true", help="print only; leave reports/ alone")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be ≥ 1")

    if any(importlib.util.find_spec(m) is None for m in ("gradience", "yaml", "packaging")):
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    peer_version = version("gradience")
    if peer_version != PEER_VERSION:
        print(f"warning: gradience {peer_version} installed; this benchmark was written against {PEER_VERSION}",
              file=sys.stderr)

    sys.path.insert(0, str(HERE))
    from common import llama3_8b_adapter  # imports torch; only when run

    adapter = llama3_8b_adapter(r=64)
    weights = adapter / "adapter_model.safetensors"
    shown = adapter.relative_to(ROOT) if adapter.is_relative_to(ROOT) else adapter
    cmds = {
        "torch floor": [PY, "-c", "import torch"],
        "scipy floor": [PY, "-c", "import numpy, scipy.linalg"],
        "info": [PY, "-m", "lora_inspect", "info", str(adapter), "--json"],
        "ours": [PY, "-m", "lora_inspect", "rank", str(adapter), "--json"],
        "peer": [PY, "-m", "gradience", "audit", "--peft-dir", str(adapter), "--json", "--layers"],
    }
    labels = {
        "torch floor": '`python -c "import torch"`',
        "scipy floor": '`python -c "import numpy, scipy.linalg"`',
        "info": f"`python -m lora_inspect info {shown} --json` (header only)",
        "ours": f"**ours** `python -m lora_inspect rank {shown} --json`",
        "peer": f"**peer** `python -m gradience audit --peft-dir {shown} --json --layers`",
    }

    print(f"adapter: {shown} ({weights.stat().st_size / 1e6:.0f} MB); python {PY}")
    for k, c in cmds.items():
        print(f"  {k:12s} {shlex.join(c).replace(PY, 'python').replace(str(adapter), str(shown))}")

    load_before = loadavg()  # before anything of ours runs (the adapter may just have been generated)
    quiet = load_before[0] <= args.max_load
    print(f"load average before: {fmt_load(load_before)}" + ("" if quiet else f"  (> {args.max_load}: NOT QUIET)"))
    # untimed warm-up round: page cache, .pyc files; keep ours' and the peer's output for the cross-check
    with tempfile.TemporaryDirectory() as tmp:
        outs = {"ours": Path(tmp) / "ours.json", "peer": Path(tmp) / "peer.out"}
        for k, c in cmds.items():
            run_once(c, outs.get(k))
        like_for_like, check_lines = cross_check(outs["ours"], outs["peer"])
    for line in check_lines:
        print(f"cross-check: {line}")
    if not like_for_like:
        print("warning: the two sides did not report the same modules/spectra — not a like-for-like comparison")

    load_warm = loadavg()
    print(f"load average after the warm-up round: {fmt_load(load_warm)}")
    started = dt.datetime.now(dt.timezone.utc)
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for i in range(args.runs):
        for k, c in cmds.items():
            times[k].append(run_once(c))
        print(f"round {i + 1}/{args.runs}: " + ", ".join(f"{k} {times[k][-1]:.2f} s" for k in cmds))
    load_after = loadavg()
    print(f"load average after:  {fmt_load(load_after)}")

    ratios = [p / o for p, o in zip(times["peer"], times["ours"])]
    med_ours = statistics.median(times["ours"])
    med_ratio = statistics.median(ratios)
    ratio_of_medians = statistics.median(times["peer"]) / med_ours
    reportable = quiet and like_for_like and args.runs >= 5

    table = ["| command | median | min | max | median ÷ ours |", "|---|---:|---:|---:|---:|"]
    if not quiet:
        table.append(f"| ⚠ **NOT REPORTABLE**: 1-min load average {load_before[0]:.2f} > {args.max_load} before "
                     "starting; rerun on a quiet machine | | | | |")
    for k in cmds:
        m, lo, hi = stats(times[k])
        table.append(f"| {labels[k]} | {m:.2f} s | {lo:.2f} s | {hi:.2f} s | {m / med_ours:.2f}× |")
    verdict = (f"peer ÷ ours: median of per-run ratios **{med_ratio:.2f}×** (ratio of medians {ratio_of_medians:.2f}×; "
               f"per run: {', '.join(f'{r:.2f}' for r in ratios)}). Issue 20's target: ≥ 3×.")
    if not reportable:
        why = [w for w, bad in (("machine not quiet", not quiet), ("outputs not like for like", not like_for_like),
                                (f"only {args.runs} run(s)", args.runs < 5)) if bad]
        verdict = f"NOT REPORTABLE ({'; '.join(why)}) — indicative only. " + verdict
    print()
    print("\n".join(table))
    print()
    print(verdict)

    if not args.no_write:
        write_report(args, shown, weights, started, (load_before, load_warm, load_after), cmds, labels, times,
                     ratios, table, verdict, check_lines, peer_version)
        print(f"wrote {REPORT.relative_to(ROOT)}")
    return 0 if quiet else 3


def write_report(args, shown, weights, started, loads, cmds, labels, times, ratios,
                 table, verdict, check_lines, peer_version) -> None:
    from common import write_section

    argv = " ".join(shlex.quote(a) for a in sys.argv[1:])
    versions = ", ".join(f"{d} {version(d)}" for d in ("torch", "numpy", "scipy", "safetensors", "lora-inspect"))
    lines = [
        f"`python benchmarks/bench_rank_peer.py{' ' + argv if argv else ''}` — {started:%Y-%m-%d %H:%M} UTC",
        "",
        f"- Machine: {cpu_model()}, {os.cpu_count()} CPUs; Python {platform.python_version()}; {versions}; "
        f"gradience {peer_version}.",
        f"- Load average (1/5/15 min): before starting {fmt_load(loads[0])}, after the warm-up round "
        f"{fmt_load(loads[1])}, after the timed rounds {fmt_load(loads[2])} (limit {args.max_load} on the 1-minute "
        "value before starting).",
        f"- Adapter: `{shown}` — Llama-3-8B-shaped all-linear r=64 bf16 PEFT adapter, 224 modules, "
        f"{weights.stat().st_size / 1e6:.0f} MB (benchmarks/common.py).",
        f"- Method: {args.runs} timed round(s) after one untimed warm-up round (page cache warm); each command in a "
        "fresh process, alternating; stdout to /dev/null, stderr to a pipe; HF_HUB_OFFLINE=1 for every command.",
        "",
        *table,
        "",
        verdict,
        "",
        "What each side computes:",
        "",
        f"- ours: {OURS_COMPUTES}.",
        f"- peer: {PEER_COMPUTES}. Adapter-only: no `--base-model`, so no base model is loaded and nothing "
        "downloaded (its UDR metrics stay empty). Run as `gradience.api.audit` runs it (`python -m gradience audit "
        "--peft-dir DIR --layers`) plus `--json`, the counterpart of our `--json`.",
        "",
        "Cross-check of the warm-up round's outputs: " + "; ".join(check_lines) + ".",
        "",
        "Timed commands (`python` = the interpreter running the benchmark):",
        "",
    ]
    for k, c in cmds.items():
        lines.append(f"- {k}: `{shlex.join(c).replace(PY, 'python').replace(str(weights.parent), str(shown))}`")
    lines += ["", "Per-run wall times (s):", "",
              "| run | " + " | ".join(cmds) + " | peer ÷ ours |",
              "|---:|" + "---:|" * (len(cmds) + 1)]
    for i in range(args.runs):
        lines.append(f"| {i + 1} | " + " | ".join(f"{times[k][i]:.3f}" for k in cmds) + f" | {ratios[i]:.2f} |")
    if not REPORT.exists():
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        REPORT.write_text("# rank against the closest peer\n\nWritten by `benchmarks/bench_rank_peer.py` "
                          "(issue 20: `lora-inspect rank` ≥ 3× faster than the closest peer).\n")
    write_section(REPORT, "rank vs peer", "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
