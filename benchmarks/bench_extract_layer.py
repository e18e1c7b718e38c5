"""`extract`'s numerical core per layer against mergekit's (issue 21: ≥ 5× faster on CPU, error ≤ theirs).

    python benchmarks/bench_extract_layer.py [--quick] [--ranks 16,64,128] [--threads 1,all] [--repeats 1]
                                             [--no-oracle] [--max-load L] [--write | --no-write]

One ΔW per Llama-3-8B linear shape (q/k/v/o, gate/up/down; `--quick`: every side ÷ 4), planted low rank plus
noise — σᵢ ∝ i^-0.5 for i ≤ min(512, min(m, n)/2) and Gaussian noise carrying 10 % of the energy — rounded
to bf16 and held as float32 (what `extract` computes from a bf16 pair). Timed on the same array:

- ours: `lora_inspect.extract.factor.decompose(ΔW, rank=k)` (default tolerance 1e-3);
- mergekit: `mergekit.scripts.extract_lora.TaskVectorDecompositionTask.execute` (mergekit 0.1.x;
  `torch.linalg.svd(task_vector.float(), full_matrices=False)`, then the top k, `distribute_scale`), called
  directly when `mergekit` imports (`pip install --no-deps mergekit immutables`), else the same lines
  reimplemented from mergekit/scripts/extract_lora.py (github:arcee-ai/mergekit). It is timed once per shape
  at the largest rank (its cost does not depend on k: the SVD is full); the smaller ranks' factors come
  from one more, untimed, SVD through the same lines. mergekit writes its factors in the model's dtype
  (bf16): its error is shown in float32 and after that cast.

Errors are relative Frobenius errors ‖ΔW − BA‖_F/‖ΔW‖_F computed densely in float64 row blocks; the optimum
(Eckart–Young) from the float64 Gram matrix's eigenvalues (`--no-oracle`: skipped). Each thread setting runs
in its own process (OPENBLAS/OMP/MKL_NUM_THREADS and torch.set_num_threads): `1` and `all` (every CPU).
Prints the load average; writes reports/extract_layer.md (section "per layer"; `--quick` only with --write),
with a paper estimate for whole 8B and 70B models on CPU: per-layer times × layers, the 70B shapes scaled
from the 8B ones by min(m, n)²·max(m, n) (the cost of both sides' dominant term).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rank_peer import cpu_model  # noqa: E402  (the machine line of every report)

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "reports" / "extract_layer.md"
SHAPES_8B = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
             "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336)}
SHAPES_70B = {"q_proj": (8192, 8192), "k_proj": (1024, 8192), "v_proj": (1024, 8192), "o_proj": (8192, 8192),
              "gate_proj": (28672, 8192), "up_proj": (28672, 8192), "down_proj": (8192, 28672)}
LAYERS = {"8B": 32, "70B": 80}


def planted(m: int, n: int, seed: int):
    """float32 ΔW with bf16-exact values: σᵢ ∝ i^-0.5 (i ≤ r) on Gaussian bases, plus 10 % noise energy."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    r = min(512, min(m, n) // 2)
    s = (np.arange(1, r + 1) ** -0.5).astype(np.float32)
    u = rng.standard_normal((m, r), dtype=np.float32) / np.float32(np.sqrt(m))
    v = rng.standard_normal((n, r), dtype=np.float32) / np.float32(np.sqrt(n))
    a = (u * s) @ v.T
    signal = float(np.linalg.norm(a))
    a += rng.standard_normal((m, n), dtype=np.float32) * np.float32(signal / 3.0 / np.sqrt(m * n))  # 1/9 ≈ 10 %
    a *= np.float32(1e-3 * np.sqrt(m * n) / signal)  # entries ~1e-3, as a fine-tune's ΔW
    return torch.from_numpy(a).to(torch.bfloat16).to(torch.float32).numpy()


def sq_error(a, b, c) -> float:
    """‖a − b @ c‖²_F in float64, by row blocks (a: m×n, b: m×k, c: k×n)."""
    import numpy as np

    b64, c64, total = np.asarray(b, np.float64), np.asarray(c, np.float64), 0.0
    for i in range(0, a.shape[0], 1024):
        d = a[i:i + 1024].astype(np.float64) - b64[i:i + 1024] @ c64
        total += float(np.einsum("ij,ij->", d, d))
    return total


def mergekit_task():
    """(execute(task_vector, k) → (A, B), 'import' | 'reimplemented')."""
    import torch

    try:
        from mergekit.scripts.extract_lora import TaskVectorDecompositionTask

        return (lambda tv, k: TaskVectorDecompositionTask.model_construct(max_rank=k).execute(task_vector=tv)), \
            "mergekit " + _version("mergekit")
    except ImportError:
        def execute(task_vector, k):  # TaskVectorDecompositionTask.execute, distribute_scale=True, sv_epsilon=0
            out_dtype = task_vector.dtype
            u, s, vh = torch.linalg.svd(task_vector.to(dtype=torch.float32), full_matrices=False)
            return _their_factors(u, s, vh, k, out_dtype)

        return execute, "reimplemented from mergekit/scripts/extract_lora.py"


def _their_factors(u, s, vh, k, out_dtype):
    """The lines of mergekit's execute() after its SVD (distribute_scale=True)."""
    import torch

    rank = min(k, s.shape[0])
    sqrt_s = torch.diag(torch.sqrt(s[:rank]))
    return (sqrt_s @ vh[:rank]).to(dtype=out_dtype), (u[:, :rank] @ sqrt_s).to(dtype=out_dtype)


def _version(dist: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def optimum(a, ks: list[int]) -> dict[int, float]:
    """Eckart–Young residual² for each k: ‖ΔW‖²_F − Σ_{i≤k} λᵢ(ΔWᵀΔW), the Gram matrix in float64 (small side)."""
    import numpy as np
    import scipy.linalg as sla

    t = a if a.shape[0] >= a.shape[1] else a.T
    g = np.zeros((t.shape[1], t.shape[1]))
    for i in range(0, t.shape[0], 1024):
        x = t[i:i + 1024].astype(np.float64)
        g += x.T @ x
    n = g.shape[0]
    lam = sla.eigh(g, eigvals_only=True, subset_by_index=[n - max(ks), n - 1])[::-1]
    total = float(np.trace(g))
    return {k: max(total - float(lam[:k].sum()), 0.0) for k in ks}


def child(args: argparse.Namespace) -> None:
    """One thread setting: every shape, every rank; one JSON line per (shape, rank) on stdout."""
    import numpy as np
    import torch

    threads = os.cpu_count() if args.threads == "all" else int(args.threads)
    torch.set_num_threads(threads or 1)
    from lora_inspect.extract.factor import decompose

    execute, how = mergekit_task()
    ks = sorted(args.ks)
    for idx, (name, (m, n)) in enumerate(SHAPES_8B.items()):
        m, n = (m // 4, n // 4) if args.quick else (m, n)
        a = planted(m, n, idx)
        total = sq_error(a, np.zeros((m, 0)), np.zeros((0, n)))
        opt = optimum(a, ks) if args.oracle else {}
        tv = torch.from_numpy(a)
        t0 = time.perf_counter()
        for _ in range(args.repeats):  # the SVD of execute() (its only cost beyond O((m+n)k²)), kept for every k
            u, s, vh = torch.linalg.svd(tv.to(dtype=torch.float32), full_matrices=False)
        theirs_t = (time.perf_counter() - t0) / args.repeats
        big = execute(tv, ks[-1])  # untimed: mergekit's own factors at the largest rank (checked equal below)
        for k in ks:
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                d = decompose(a, rank=k)
            ours_t = (time.perf_counter() - t0) / args.repeats
            fa, fb = big if k == ks[-1] else _their_factors(u, s, vh, k, torch.float32)
            if k == ks[-1]:
                ref = _their_factors(u, s, vh, k, torch.float32)
                assert torch.equal(ref[0], fa) and torch.equal(ref[1], fb), "mergekit factors differ"
            row = {"module": name, "shape": [m, n], "k": k, "ours_s": ours_t, "theirs_s": theirs_t, "total": total,
                   "ours": d.residual2, "ours_dense": sq_error(a, d.u * d.sigma, d.vt), "ratio_bound": d.ratio_bound(),
                   "route": d.route, "proof": d.proof, "attempts": d.attempts,
                   "theirs_f32": sq_error(a, fb.numpy(), fa.numpy()),
                   "theirs_bf16": sq_error(a, fb.bfloat16().float().numpy(), fa.bfloat16().float().numpy()),
                   "optimum": opt.get(k), "mergekit": how, "torch_threads": torch.get_num_threads()}
            print(json.dumps(row), flush=True)


def run_setting(args: argparse.Namespace, threads: str) -> list[dict]:
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(var, None)
        if threads != "all":
            env[var] = threads
    cmd = [sys.executable, __file__, "--child", "--threads", threads, "--ranks", ",".join(map(str, args.ks)),
           "--repeats", str(args.repeats)] + (["--quick"] if args.quick else []) + ([] if args.oracle else ["--no-oracle"])
    out = subprocess.run(cmd, env=env, cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def rel(err2: float | None, total: float) -> str:
    return "—" if err2 is None else f"{(err2 / total) ** 0.5:.6f}"


def excess(err2: float, opt: float | None) -> str:
    """err/opt − 1 (how much worse than Eckart–Young)."""
    if opt is None or opt <= 0:
        return "—"
    x = (err2 / opt) ** 0.5 - 1
    return f"{x:.1e}" if abs(x) >= 5e-10 else "0"


def versus(a: float, b: float) -> str:
    """√(a/b) − 1: below 0 when the first error is the smaller."""
    x = (a / b) ** 0.5 - 1 if b > 0 else 0.0
    return f"{x:+.1e}" if abs(x) >= 5e-15 else "0"


def tables(rows: list[dict], threads: str) -> list[str]:
    out = [f"**BLAS/torch threads: {threads}** (torch reports {rows[0]['torch_threads']})", "",
           "| module | shape | k | ours | mergekit | speed-up | optimum | ours − opt | mergekit f32 − opt "
           "| mergekit bf16 − opt | ours vs mergekit f32 | certified | route |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        rb = r["ratio_bound"] - 1
        out.append(f"| {r['module']} | {r['shape'][0]}×{r['shape'][1]} | {r['k']} | {r['ours_s']:.2f} s "
                   f"| {r['theirs_s']:.2f} s | **{r['theirs_s'] / r['ours_s']:.1f}×** | {rel(r['optimum'], r['total'])} "
                   f"| {excess(r['ours_dense'], r['optimum'])} | {excess(r['theirs_f32'], r['optimum'])} "
                   f"| {excess(r['theirs_bf16'], r['optimum'])} | {versus(r['ours_dense'], r['theirs_f32'])} "
                   f"| {f'≤ {rb:.0e}' if rb > 0 else '0'} | {r['route']} ({r['proof']}, {r['attempts']}) |")
    return out


def estimates(rows: list[dict], quick: bool) -> list[str]:
    """Whole-model CPU time on paper: Σ per-layer times × layers; 70B shapes scaled by min²·max."""
    out = ["| model | k | ours | mergekit | speed-up |", "|---|---:|---:|---:|---:|"]
    for model, shapes in (("8B", SHAPES_8B), ("70B", SHAPES_70B)):
        for k in sorted({r["k"] for r in rows}):
            ours = theirs = 0.0
            for r in (r for r in rows if r["k"] == k):
                m8, n8 = SHAPES_8B[r["module"]]
                m, n = shapes[r["module"]]
                f = (min(m, n) ** 2 * max(m, n)) / (min(m8, n8) ** 2 * max(m8, n8)) * (64 if quick else 1)
                ours, theirs = ours + f * r["ours_s"], theirs + f * r["theirs_s"]
            layers = LAYERS[model]
            out.append(f"| {model} ({layers} layers) | {k} | {ours * layers / 60:.1f} min | {theirs * layers / 60:.1f} min "
                       f"| {theirs / ours:.1f}× |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="every side ÷ 4 (a smoke run)")
    ap.add_argument("--ranks", default=None, help="comma-separated ranks (default 16,64,128; --quick: 16,64)")
    ap.add_argument("--threads", default="1,all", help="BLAS/torch thread settings to run, e.g. 1,all")
    ap.add_argument("--repeats", type=int, default=1, help="timed calls per measurement (mean)")
    ap.add_argument("--no-oracle", dest="oracle", action="store_false", help="skip the float64 optimum")
    ap.add_argument("--max-load", type=float, default=None, help="1-min load above which a run is NOT QUIET "
                    "(default 0.75 × CPUs)")
    ap.add_argument("--write", dest="write", action="store_true", default=None)
    ap.add_argument("--no-write", dest="write", action="store_false")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.ks = [int(x) for x in (args.ranks or ("16,64" if args.quick else "16,64,128")).split(",")]
    if args.child:
        child(args)
        return 0
    cpus = os.cpu_count() or 1
    max_load = args.max_load if args.max_load is not None else 0.75 * cpus
    started = dt.datetime.now(dt.timezone.utc)
    before = os.getloadavg()
    print(f"load average before: {before[0]:.2f} {before[1]:.2f} {before[2]:.2f}  ({cpus} CPUs; limit {max_load:.2f})")
    results = {}
    for threads in args.threads.split(","):
        results[threads] = run_setting(args, threads)
        for line in tables(results[threads], threads) + [""] + estimates(results[threads], args.quick) + [""]:
            print(line)
    after = os.getloadavg()
    print(f"load average after: {after[0]:.2f} {after[1]:.2f} {after[2]:.2f}")
    quiet = before[0] <= max_load
    body = report(args, results, started, before, after, quiet, max_load)
    if args.write or (args.write is None and not args.quick):
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from common import write_section

        if not REPORT.exists():
            REPORT.write_text("# extract: per-layer numerical core against mergekit\n\nWritten by "
                              "`benchmarks/bench_extract_layer.py` (issue 21).\n")
        write_section(REPORT, "per layer" + (" (quick smoke run, reduced shapes)" if args.quick else ""), body)
    return 0 if quiet else 3


def report(args, results, started, before, after, quiet, max_load) -> str:
    import numpy
    import scipy
    import torch

    first = next(iter(results.values()))[0]
    cmd = "python benchmarks/bench_extract_layer.py" + (" --quick" if args.quick else "") + \
        ("" if args.ranks is None else f" --ranks {args.ranks}") + f" --threads {args.threads}"
    lines = [f"`{cmd}` — {started:%Y-%m-%d %H:%M} UTC", "",
             f"- Machine: {cpu_model()}, {os.cpu_count()} CPUs; Python {platform.python_version()}; numpy {numpy.__version__}, "
             f"scipy {scipy.__version__}, torch {torch.__version__}; peer: {first['mergekit']}.",
             f"- Load average (1/5/15 min): before {before[0]:.2f}/{before[1]:.2f}/{before[2]:.2f}, after "
             f"{after[0]:.2f}/{after[1]:.2f}/{after[2]:.2f}" + ("" if quiet else
                                                                  f" — ⚠ **NOT QUIET** (> {max_load:.2f}): indicative only"),
             "- ΔW: planted σᵢ ∝ i^-0.5 (i ≤ min(512, min(m, n)/2)) + 10 % noise energy, bf16 values held as float32."
             + (" **Quick smoke run: every side ÷ 4.**" if args.quick else ""),
             "- Errors: relative Frobenius ‖ΔW − BA‖/‖ΔW‖ of the optimum, and each side's excess over it, err/opt − 1 "
             "(errors computed densely in float64; the optimum from float64 Gram eigenvalues resolves excesses down to "
             "~1e-10: '0' is below 5e-10); `ours vs mergekit f32`: √(ours²/theirs²) − 1 from the same dense "
             "computation (negative: ours smaller); ours in float64 as returned; `certified`: our ratio_bound − 1.", ""]
    for threads, rows in results.items():
        lines += tables(rows, threads) + [""]
        lines += [f"Paper estimate, whole model on this CPU ({threads} threads; linear layers only):", ""]
        lines += estimates(rows, args.quick) + [""]
    return "\n".join(lines)



if __name__ == "__main__":
    sys.exit(main())
