"""Exact spectra of SDXL-shaped LyCORIS files: our route against the dense route, in one run.

    python benchmarks/bench_lycoris.py [--sample 1]

1. Generates (into bench-data/, never committed) two SDXL-UNet-shaped float32 files with kohya names for
   the 700 linear layers of the 70 transformer blocks (10 blocks of width 640, 60 of width 1280; per block
   attn1 q/k/v/out, attn2 q/out (d×d), attn2 k/v (d×2048), ff.net.0.proj (8d×d), ff.net.2 (d×4d)):
   - LoHa, r₁ = r₂ = 8 (α = 4);
   - LoKr as LyCORIS builds it with factor −1: W₁ (a, c) whole, W₂ = w2a (b, 8) @ w2b (8, d) (α = 4).
2. Ours: ``analysis.compute_spectra`` on every module (the work ``lora-inspect rank`` does: face-split
   factors + QR/QR/core SVD for LoHa, products of the factor spectra for LoKr), timed in this process, and the
   whole ``rank --json`` command timed once in-process.
3. Dense route (what resize/merge tools do: form ΔW in float64, full SVD): timed on ``--sample`` modules of
   each distinct shape and extrapolated to all 700 by shape count — stated as an extrapolation in the report.
4. Accuracy: max |Δσ|/σ₁ between our spectrum and the dense one on the sampled modules.
Writes the table to reports/lycoris.md.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import platform
import sys
import time
from collections import Counter
from contextlib import redirect_stdout
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench-data"
sys.path.insert(0, str(ROOT))

from lora_inspect.analysis import compute_spectra  # noqa: E402
from lora_inspect.formats import load_adapter  # noqa: E402


def sdxl_linear_shapes() -> list[tuple[str, tuple[int, int]]]:
    """(kohya name, (out, in)) for the transformer-block linears of the SDXL UNet."""
    blocks = [("input_blocks_4_1", 640, 2), ("input_blocks_5_1", 640, 2), ("input_blocks_7_1", 1280, 10),
              ("input_blocks_8_1", 1280, 10), ("middle_block_1", 1280, 10), ("output_blocks_0_1", 1280, 10),
              ("output_blocks_1_1", 1280, 10), ("output_blocks_2_1", 1280, 10), ("output_blocks_3_1", 640, 2),
              ("output_blocks_4_1", 640, 2), ("output_blocks_5_1", 640, 2)]
    out = []
    for blk, d, depth in blocks:
        for t in range(depth):
            p = f"lora_unet_{blk}_transformer_blocks_{t}_"
            out += [(p + "attn1_to_q", (d, d)), (p + "attn1_to_k", (d, d)), (p + "attn1_to_v", (d, d)),
                    (p + "attn1_to_out_0", (d, d)), (p + "attn2_to_q", (d, d)), (p + "attn2_to_k", (d, 2048)),
                    (p + "attn2_to_v", (d, 2048)), (p + "attn2_to_out_0", (d, d)),
                    (p + "ff_net_0_proj", (8 * d, d)), (p + "ff_net_2", (d, 4 * d))]
    return out


def factorization(dim: int) -> tuple[int, int]:
    """LyCORIS ``factorization(dim, -1)``: the most balanced (m, n), m ≤ n, m·n = dim."""
    m = int(math.isqrt(dim))
    while dim % m:
        m -= 1
    return m, dim // m


def make_files(r: int = 8, seed: int = 0) -> tuple[Path, Path]:
    DATA.mkdir(exist_ok=True)
    loha_p, lokr_p = DATA / "sdxl-loha-r8.safetensors", DATA / "sdxl-lokr-r8.safetensors"
    if loha_p.exists() and lokr_p.exists():
        return loha_p, lokr_p
    g = torch.Generator().manual_seed(seed)
    loha, lokr = {}, {}
    for name, (o, i) in sdxl_linear_shapes():
        def rnd(*s):
            return torch.randn(*s, generator=g) * 0.05
        loha.update({f"{name}.hada_w1_a": rnd(o, r), f"{name}.hada_w1_b": rnd(r, i), f"{name}.hada_w2_a": rnd(o, r),
                     f"{name}.hada_w2_b": rnd(r, i), f"{name}.alpha": torch.tensor(4.0)})
        (a, b), (c, d) = factorization(o), factorization(i)
        lokr.update({f"{name}.lokr_w1": rnd(a, c), f"{name}.lokr_w2_a": rnd(b, r), f"{name}.lokr_w2_b": rnd(r, d),
                     f"{name}.alpha": torch.tensor(4.0)})
    save_file(loha, str(loha_p))
    save_file(lokr, str(lokr_p))
    return loha_p, lokr_p


def bench(path: Path, sample: int) -> dict:
    from click.testing import CliRunner

    from lora_inspect.cli import main

    ad = load_adapter(path)
    t0 = time.perf_counter()
    spectra = compute_spectra(ad.modules, precision="fp64")
    ours = time.perf_counter() - t0
    buf = io.StringIO()
    t0 = time.perf_counter()
    with redirect_stdout(buf):
        res = CliRunner().invoke(main, ["rank", str(path), "--json"])
    cmd = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    counts = Counter(m.shape for m in ad.modules)
    per_shape, worst = {}, 0.0
    torch.set_num_threads(1)
    for shape in counts:
        mods = [m for m in ad.modules if m.shape == shape][:sample]
        ts = []
        for m in mods:
            t0 = time.perf_counter()
            dense = torch.linalg.svdvals(m.delta(torch.float64))
            ts.append(time.perf_counter() - t0)
            sv = torch.as_tensor(spectra[m.name][0])
            n = min(len(sv), len(dense))
            worst = max(worst, float((sv[:n] - dense[:n]).abs().max() / dense[0]),
                        float(dense[n:].max() / dense[0]) if len(dense) > n else 0.0)
        per_shape[shape] = sum(ts) / len(ts)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    dense_total = sum(per_shape[s] * n for s, n in counts.items())
    return {"modules": len(ad.modules), "ours": ours, "cmd": cmd, "dense": dense_total, "per_shape": per_shape,
            "counts": counts, "worst": worst, "mb": path.stat().st_size / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sample", type=int, default=1, help="modules per distinct shape timed densely")
    args = ap.parse_args()
    loha_p, lokr_p = make_files()
    rows = []
    for label, p in (("LoHa r₁=r₂=8", loha_p), ("LoKr W₁ whole, W₂ rank 8", lokr_p)):
        r = bench(p, args.sample)
        rows.append((label, r))
        print(label, {k: v for k, v in r.items() if k not in ("per_shape", "counts")}, flush=True)
    lines = [
        "# LyCORIS spectra: exact route vs dense route",
        "",
        f"`python benchmarks/bench_lycoris.py --sample {args.sample}` on {platform.machine()}, "
        f"{os.cpu_count()} CPUs (a shared, loaded 2-core machine), torch {torch.__version__}. SDXL-UNet-shaped files "
        "(700 transformer-block linears, float32, generated by the script).",
        "",
        "| file | modules | size | ours: compute_spectra | ours: `rank --json` | dense route (extrapolated) | ratio dense/ours | ratio dense/`rank` | max abs Δσ/σ₁ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in rows:
        lines.append(f"| {label} | {r['modules']} | {r['mb']:.0f} MiB | {r['ours']:.2f} s | {r['cmd']:.2f} s | "
                     f"{r['dense']:.0f} s | {r['dense'] / r['ours']:.0f}× | {r['dense'] / r['cmd']:.0f}× | {r['worst']:.1e} |")
    lines += ["", "Dense route: ΔW formed in float64 and `torch.linalg.svdvals` (one thread), timed on "
              f"{args.sample} module(s) of each distinct shape and multiplied by the number of modules of that shape "
              "(an extrapolation, not a measured full run; single samples on a loaded machine are noisy):", "",
              "| file | shape | modules | dense s/module |", "|---|---|---|---|"]
    for label, r in rows:
        for s, t in r["per_shape"].items():
            lines.append(f"| {label} | {s[0]}×{s[1]} | {r['counts'][s]} | {t:.2f} |")
    lines += ["", "Ours: LoHa through the face-splitting factors (rank ≤ 64) and QR/QR/core SVD; LoKr as the products "
              "σᵢ(W₁)·σⱼ(W₂) (full list: rank(ΔW) = rank(W₁)·rank(W₂), up to min(out, in)). Accuracy column: the largest "
              "|σᵢ(ours) − σᵢ(dense)| / σ₁ over the sampled modules (and any dense σ beyond our list)."]
    (ROOT / "reports" / "lycoris.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
