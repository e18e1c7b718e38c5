"""merge on Llama-3-8B-shaped r=64 adapters (hidden 4096, intermediate 14336, 8 KV heads,
all seven projections), on this machine's CPU.

Measured, not assumed:
- ours: ``merge --rank 64`` of two generated adapters of ``--layers`` layers (read, factor-space merge,
  write, re-read self-check), extrapolated linearly to 32 layers (the work is per module);
- PEFT's ``svd`` combination, per module as ``add_weighted_adapter`` does it
  (``peft/tuners/lora/model.py · _svd_generalized_task_arithmetic_weighted_adapter``): the dense
  Σ wᵢ·ΔWᵢ in float32, then ``torch.linalg.svd(full_matrices=True)``; timed once per distinct module
  shape and summed over the 7 modules of a layer, × 32 layers;
- a dense float64 reference on one module per shape: the singular values of Σ wᵢΔWᵢ against ours;
- ``convert`` is timed against a copy of the same bytes in ``benchmarks/bench_convert.py`` (``reports/convert.md``).

Run: ``python benchmarks/bench_merge.py [--layers 2] [--out reports/merge.md]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from lora_inspect.convert.merge import merge
from lora_inspect.files import write_safetensors
from lora_inspect.formats import load_adapter
from lora_inspect.rewrite import TruncateSpec

H, INTER, KV = 4096, 14336, 1024
SHAPES = {"q_proj": (H, H), "k_proj": (KV, H), "v_proj": (KV, H), "o_proj": (H, H), "gate_proj": (INTER, H),
          "up_proj": (INTER, H), "down_proj": (H, INTER)}
PART = {m: ("self_attn." if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp.") for m in SHAPES}
R = 64
W = (0.7, 0.3)
MLP_PEFT = False  # set by --mlp-peft: also time PEFT's full SVD of the 14336-wide MLP modules (many minutes each)


def make_adapter(path: Path, layers: int, seed: int, alpha: float) -> dict:
    g = torch.Generator().manual_seed(seed)
    tensors, factors = {}, {}
    for layer in range(layers):
        for m, (o, i) in SHAPES.items():
            name = f"model.layers.{layer}.{PART[m]}{m}"
            a = torch.randn(R, i, generator=g) / i**0.5
            b = torch.randn(o, R, generator=g) * 0.01
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.weight"] = b
            factors[name] = (b, a)
    path.mkdir()
    write_safetensors(path / "adapter_model.safetensors", tensors)
    cfg = {"peft_type": "LORA", "r": R, "lora_alpha": alpha, "target_modules": list(SHAPES), "task_type": "CAUSAL_LM"}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return factors


def peft_svd_seconds(fa: dict, fb: dict, name: str, s: tuple[float, float]) -> tuple[float, torch.Tensor]:
    """PEFT's per-module route: dense Σ w·ΔW (float32) and a full SVD; also returns the fp64 σ's."""
    (b1, a1), (b2, a2) = fa[name], fb[name]
    t = time.perf_counter()
    delta = W[0] * s[0] * (b1 @ a1) + W[1] * s[1] * (b2 @ a2)
    u, sv, vh = torch.linalg.svd(delta, full_matrices=True)
    _ = (u[:, :R] @ torch.diag(sv[:R]), vh[:R])
    sec = time.perf_counter() - t
    d64 = W[0] * s[0] * (b1.double() @ a1.double()) + W[1] * s[1] * (b2.double() @ a2.double())
    return sec, torch.linalg.svdvals(d64)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out", default="reports/merge.md")
    ap.add_argument("--mlp-peft", action="store_true")
    args = ap.parse_args()
    global MLP_PEFT
    MLP_PEFT = args.mlp_peft
    tmp = Path(tempfile.mkdtemp(prefix="bench-merge-"))
    try:
        run(tmp, args.layers, Path(args.out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(tmp: Path, layers: int, out: Path) -> None:
    fa = make_adapter(tmp / "a", layers, 0, 128.0)
    fb = make_adapter(tmp / "b", layers, 1, 64.0)
    s = (128.0 / R, 64.0 / R)
    t = time.perf_counter()
    res = merge([load_adapter(tmp / "a"), load_adapter(tmp / "b")], tmp / "m", weights=list(W),
                spec=TruncateSpec(rank=R), dtype="fp32")
    ours = time.perf_counter() - t
    ours_32 = ours * 32 / layers
    print(f"ours: {ours:.2f} s for {layers} layers", flush=True)
    rows, peft_layer, worst_sigma = [], 0.0, 0.0
    done: dict[tuple[int, int], float] = {}
    for m, shape in SHAPES.items():
        name = f"model.layers.0.{PART[m]}{m}"
        if INTER in shape and not MLP_PEFT:
            # lower bound: the SVD of a 14336×4096 matrix costs at least that of the 4096×4096 one it contains
            peft_layer += done[(H, H)]
            rows.append(f"| {m} | {shape[0]}×{shape[1]} | ≥ {done[(H, H)]:.2f} (bound, not run) | – |")
            continue
        if shape not in done:
            sec, sv64 = peft_svd_seconds(fa, fb, name, s)
            done[shape] = sec
            ours_sv = torch.tensor(next(x for x in res.modules if x.name == name).singular_values, dtype=torch.float64)
            n = min(len(ours_sv), 2 * R)
            err = float((ours_sv[:n] - sv64[:n]).abs().max() / sv64[0])
            worst_sigma = max(worst_sigma, err)
            rows.append(f"| {m} | {shape[0]}×{shape[1]} | {sec:.2f} | {err:.2e} |")
            print(rows[-1], flush=True)
        peft_layer += done[shape]
    peft_32 = peft_layer * 32
    write_report(out, layers, ours, ours_32, peft_layer, peft_32, rows, worst_sigma)


def write_report(out: Path, layers: int, ours: float, ours_32: float, peft_layer: float, peft_32: float,
                 rows: list[str], worst_sigma: float) -> None:
    text = f"""# merge: Llama-3-8B-shaped r=64 adapters

Generated by `python benchmarks/bench_merge.py --layers {layers}` on this machine's CPU
(torch {torch.__version__}, {torch.get_num_threads()} threads; a shared 2-core machine, so absolute times are noisy).
Two adapters of {layers} layers × 7 projections (hidden 4096, intermediate 14336, 8 KV heads), r = 64,
weights 0.7 / 0.3, α 128 and 64.

## merge --rank 64 vs PEFT's svd combination

| route | {layers} layers (measured) | 32 layers |
|---|---|---|
| ours: `merge --rank 64` (read, factor-space merge, write, re-read self-check) | {ours:.2f} s | {ours_32:.1f} s (× 32/{layers}, linear in modules) |
| PEFT `add_weighted_adapter(combination_type="svd")`, per-module dense route | {peft_layer * layers:.1f} s (from the per-shape times) | {peft_32:.0f} s (one layer's 7 modules × 32) |
| **ratio** | | **{peft_32 / ours_32:.0f}×**{"" if MLP_PEFT else " (a lower bound: the MLP modules are bounded by the 4096×4096 time)"} |

PEFT's route timed once per distinct shape (dense Σ wᵢΔWᵢ in float32, `torch.linalg.svd(full_matrices=True)`, as
peft 0.21.2 does by default), and the largest difference between our singular values and those of the dense
float64 Σ wᵢΔWᵢ (`torch.linalg.svdvals`), relative to σ₁ (all 128 non-zero values compared):

| module | shape | PEFT svd (s) | max abs(σ_ours − σ_dense) / σ₁ |
|---|---|---|---|
{chr(10).join(rows)}

Worst: {worst_sigma:.2e} (goal ≤ 1e-6).

`convert` against a copy of the same bytes: `benchmarks/bench_convert.py`, `reports/convert.md`.
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
