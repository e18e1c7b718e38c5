"""``convert`` against a copy of the same bytes, on a Llama-3-8B-shaped r=64 adapter (hidden 4096,
intermediate 14336, 8 KV heads, all seven projections), on this machine's CPU, in one run.

Baselines, measured in the same run on the same (page-cached) source file:
- ``copy + fsync``: ``shutil.copyfile`` then ``os.fsync`` of the copy — the durability every
  ``convert`` output has (our atomic writer fsyncs the file before renaming it into place);
- ``copy``: ``shutil.copyfile`` alone (page cache only; shown for reference).
Every route is timed ``--repeat`` times; the table shows medians. ``convert`` here is the whole job:
read and validate the source, write the target, re-read it with the target's own reader and check
every module's ΔW (bit-identical factors compared exactly, changed ones by a Gaussian sketch).

Run: ``python benchmarks/bench_convert.py [--layers 4] [--repeat 5] [--out reports/convert.md]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lora_inspect.convert.run import convert
from lora_inspect.files import write_safetensors
from lora_inspect.formats import load_adapter

H, INTER, KV, HEADS = 4096, 14336, 1024, 32
SHAPES = {"q_proj": (H, H), "k_proj": (KV, H), "v_proj": (KV, H), "o_proj": (H, H), "gate_proj": (INTER, H),
          "up_proj": (INTER, H), "down_proj": (H, INTER)}
PART = {m: ("self_attn." if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp.") for m in SHAPES}
R = 64


def make_adapter(path: Path, layers: int, dtype: torch.dtype) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(layers):
        for m, (o, i) in SHAPES.items():
            name = f"base_model.model.model.layers.{layer}.{PART[m]}{m}"
            tensors[f"{name}.lora_A.weight"] = (torch.randn(R, i, generator=g) / i**0.5).to(dtype)
            tensors[f"{name}.lora_B.weight"] = (torch.randn(o, R, generator=g) * 0.01).to(dtype)
    path.mkdir()
    write_safetensors(path / "adapter_model.safetensors", tensors)
    cfg = {"peft_type": "LORA", "r": R, "lora_alpha": 2 * R, "target_modules": list(SHAPES), "task_type": "CAUSAL_LM",
           "base_model_name_or_path": "meta-llama/Meta-Llama-3-8B"}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def base_config(path: Path) -> Path:
    path.mkdir()
    cfg = {"model_type": "llama", "hidden_size": H, "num_attention_heads": HEADS, "num_key_value_heads": 8,
           "intermediate_size": INTER, "num_hidden_layers": 32}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_fsync(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clear(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def convert_row(tmp: Path, src: Path, target: str, dtype: str | None, repeat: int, base: Path) -> dict:
    out = tmp / ("o.safetensors" if target in ("kohya", "diffusers") else "o.gguf" if target == "gguf" else "o")
    res = None

    def job():
        nonlocal res
        clear(out)
        res = convert(load_adapter(src), out, target, dtype=dtype, base=base if target == "gguf" else None)

    sec = timed(job, repeat)
    assert res is not None
    same = sum(m.check == "identical" for m in res.modules)
    clear(out)
    return {"target": target, "dtype": res.dtype, "sec": sec, "identical": same, "n": len(res.modules),
            "err": res.max_check_error}


def run(tmp: Path, layers: int, repeat: int) -> tuple[list[dict], dict]:
    base = base_config(tmp / "base")
    rows, sizes = [], {}
    for label, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        src = make_adapter(tmp / f"src-{label}", layers, dt)
        weights = src / "adapter_model.safetensors"
        weights.read_bytes()  # page cache warm for every route alike
        sizes[label] = weights.stat().st_size
        cp = timed(lambda w=weights: copy_fsync(w, tmp / "copy"), repeat)
        plain = timed(lambda w=weights: shutil.copyfile(w, tmp / "copy"), repeat)
        for target, dtype in (("peft", None), ("kohya", None), ("mlx", None), ("gguf", "fp16" if label == "bf16" else None),
                              ("kohya", "fp16")):
            row = convert_row(tmp, src, target, dtype, repeat, base)
            row.update(source=label, copy_fsync=cp, copy=plain)
            rows.append(row)
            print(row, flush=True)
    return rows, sizes


def write_report(out: Path, layers: int, repeat: int, rows: list[dict], sizes: dict) -> None:
    lines = ["| source | target (dtype) | convert (s) | copy + fsync (s) | ratio | copy only (s) | factors bit-identical "
             "| worst rel. error |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['source']} ({sizes[r['source']] / 1e6:.0f} MB) | {r['target']} ({r['dtype']}) | {r['sec']:.3f} | "
                     f"{r['copy_fsync']:.3f} | **{r['sec'] / r['copy_fsync']:.1f}×** | {r['copy']:.3f} | "
                     f"{r['identical']}/{r['n']} | {r['err']:.1e} |")
    text = f"""# convert vs a copy of the same bytes

Generated by `python benchmarks/bench_convert.py --layers {layers} --repeat {repeat}` on this machine's CPU
(torch {torch.__version__}, {torch.get_num_threads()} threads; a shared 2-core machine, so absolute times are noisy;
medians of {repeat} runs). A PEFT adapter of {layers} Llama-3-8B-shaped layers × 7 projections, r = {R}, α = {2 * R},
stored fp32 and bf16. The goal is `convert` ≤ 3× a copy of the same bytes; the baseline that matches what
`convert` guarantees is the copy made durable with fsync (our writer fsyncs before the atomic rename).

{chr(10).join(lines)}

What the routes do:
- peft, kohya (same dtype): the stored factors are written unchanged (renamed keys; kohya gets an fp32 `.alpha`
  per module); the self-check re-reads the output with the target's reader and compares the factors bit for bit
  and the scale to fp32 rounding.
- mlx: factors transposed (mlx-lm stores `lora_a` (in, r), `lora_b` (r, out)); the scale α/r = 2 is mlx-lm's
  absolute `scale`, so nothing is baked and the re-read factors are again bit-identical.
- gguf: Q/K rows of B permuted as llama.cpp's converter does, `s·r/α` baked where it differs from the global α,
  written with the `gguf` package and read back with `gguf.GGUFReader`; checked by the sketch.
- kohya (fp16) from fp32/bf16: every factor rounded to fp16, so every module is checked by the sketch
  (float64, 8 Gaussian columns).

Reading the ratios: where the factors are written unchanged, the cost over a copy is the re-read and the
bit-for-bit comparison (and for mlx-lm the transpose). Where they change (a new dtype, GGUF's permutation
and baking), every factor is also widened to float64 for the sketch: 4× the bytes of a bf16 source,
which is why those rows cost the most relative to a copy of a bf16 file.
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="reports/convert.md")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=os.environ.get("BENCH_TMP")))
    try:
        rows, sizes = run(tmp, args.layers, args.repeat)
        write_report(Path(args.out), args.layers, args.repeat, rows, sizes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
