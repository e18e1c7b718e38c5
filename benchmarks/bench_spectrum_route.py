"""Where `rank`'s time goes on the Llama-3-8B-shaped r=64 bf16 adapter, and the Gram/Cholesky route's effect.

    python benchmarks/bench_spectrum_route.py [--runs 5] [--no-write]

In one process, single-threaded torch (as a scan worker runs), page cache warm, each stage timed over
all 224 modules, median of ``--runs``:
- import: ``python -c 'import torch, safetensors'`` in a fresh process (what a worker pays once);
- read: ``safe_open`` + ``get_tensor`` of every tensor (bf16, as stored), and with every byte copied out
  (``get_tensor`` alone maps the file and touches nothing: not a floor);
- convert: bf16 → float32 and bf16 → float64 of every factor;
- QR: Householder R of B and Aᵀ in float32 (the route before), and the core SVD;
- Gram: BᵀB and AAᵀ in float64, eigvalsh (κ estimate), Cholesky (the new route);
- analyse: ``analysis.compute_spectra`` end to end (read + reduce + core SVD), old route and new.
Also checks the two routes agree: max |Δσ|/σ₁ over all modules. Writes reports/scan.md (section "rank speed").
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("LORA_INSPECT_THREADS", "1")
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, llama3_8b_adapter, write_section  # noqa: E402

sys.path.insert(0, str(ROOT))


def _t(fn, runs: int) -> float:
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from lora_inspect import spectrum
    from lora_inspect.analysis import compute_spectra
    from lora_inspect.formats import load_adapter

    adapter = llama3_8b_adapter(r=64)
    weights = adapter / "adapter_model.safetensors"
    imp = statistics.median(
        _t(lambda: subprocess.run([sys.executable, "-c", "import torch, safetensors"], check=True), 1)
        for _ in range(3))
    with safe_open(str(weights), framework="pt") as f:
        keys = list(f.keys())

        def read():
            return {k: f.get_tensor(k) for k in keys}

        t_get = _t(read, args.runs)
        t_read = _t(lambda: [f.get_tensor(k).clone() for k in keys], args.runs)  # every byte copied out once
        sd = read()
    f32 = {k: v.float() for k, v in sd.items()}
    f64 = {k: v.double() for k, v in sd.items()}
    t_c32 = _t(lambda: [v.float() for v in sd.values()], args.runs)
    t_c64 = _t(lambda: [v.double() for v in sd.values()], args.runs)
    buf = torch.empty(max(v.numel() for v in sd.values()), dtype=torch.float64)
    t_c64b = _t(lambda: [buf[: v.numel()].view(v.shape).copy_(v) for v in sd.values()], args.runs)
    pairs = [(k, k.replace("lora_A", "lora_B")) for k in keys if "lora_A" in k]
    t_qr = _t(lambda: [(spectrum.r_factor(f32[b]), spectrum.r_factor(f32[a].T)) for a, b in pairs], args.runs)
    t_gram = _t(lambda: [(f64[b].T @ f64[b], f64[a] @ f64[a].T) for a, b in pairs], args.runs)
    grams = [(f64[b].T @ f64[b], f64[a] @ f64[a].T) for a, b in pairs]
    t_eig = _t(lambda: [(torch.linalg.eigvalsh(gb), torch.linalg.eigvalsh(ga)) for gb, ga in grams], args.runs)
    t_chol = _t(lambda: [(torch.linalg.cholesky(gb), torch.linalg.cholesky(ga)) for gb, ga in grams], args.runs)
    rs = [(spectrum.r_factor(f32[b]), spectrum.r_factor(f32[a].T)) for a, b in pairs]
    t_core = _t(lambda: spectrum.core_singular_values([x for x, _ in rs], [y for _, y in rs], [2.0] * len(rs), 64),
                args.runs)
    ad = load_adapter(adapter)
    routes = {}
    for route in ("qr", "auto"):
        os.environ["LORA_INSPECT_REDUCTION"] = route
        routes[route] = (_t(lambda: compute_spectra(ad.modules, workers=1), args.runs), compute_spectra(ad.modules, workers=1))
        routes[route + "2"] = (_t(lambda: compute_spectra(ad.modules, workers=2), args.runs), None)
    os.environ.pop("LORA_INSPECT_REDUCTION")
    exact = compute_spectra(ad.modules, precision="fp64", workers=1)  # Householder QR in float64: the reference

    def worst(route: str) -> float:
        return max(float(abs(routes[route][1][n][0] - exact[n][0]).max() / exact[n][0][0]) for n in exact)

    rows = [("interpreter + `import torch, safetensors` (fresh process)", imp),
            ("`get_tensor` of every tensor (bf16; no byte touched yet)", t_get),
            ("read every tensor: `get_tensor` + copy every byte out (the read floor)", t_read),
            ("convert bf16 → float32, all factors", t_c32), ("convert bf16 → float64, all factors", t_c64),
            ("convert bf16 → float64 into one reused buffer", t_c64b),
            ("Householder QR (R of B and Aᵀ), float32", t_qr), ("Gram BᵀB and AAᵀ, float64", t_gram),
            ("eigvalsh of both Grams (κ estimate)", t_eig), ("Cholesky of both Grams", t_chol),
            ("batched core SVD (float64, 224 × 64×64)", t_core),
            ("`compute_spectra`, QR route (before)", routes["qr"][0]),
            ("`compute_spectra`, Gram/Cholesky route (now)", routes["auto"][0]),
            ("`compute_spectra`, QR route, 2 worker threads", routes["qr2"][0]),
            ("`compute_spectra`, Gram route, 2 worker threads", routes["auto2"][0])]
    lines = [f"`python benchmarks/bench_spectrum_route.py --runs {args.runs}` — Llama-3-8B-shaped r=64 bf16 adapter "
             f"(224 modules, {weights.stat().st_size / 1e6:.0f} MB), one torch thread, one worker thread, page cache warm, "
             f"median of {args.runs}; torch {torch.__version__}, {os.cpu_count()} CPUs **shared with 5 other helpers' work**.",
             "", "| stage | median |", "|---|---:|"]
    lines += [f"| {name} | {sec * 1000:.0f} ms |" for name, sec in rows]
    lines += ["", f"In-process analysis / read: QR route **{routes['qr'][0] / t_read:.2f}×**, Gram route "
              f"**{routes['auto'][0] / t_read:.2f}×** (goal ≤ 1.2×). Largest |Δσ|/σ₁ over all modules against float64 "
              f"Householder QR: QR route (float32) {worst('qr'):.1e}, Gram route (float64) {worst('auto'):.1e}."]
    print("\n".join(lines))
    if not args.no_write:
        write_section(ROOT / "reports" / "scan.md", "rank speed", "\n".join(lines))


if __name__ == "__main__":
    main()
