"""Regenerate the committed sample adapters (byte for byte on the same machine and kernels; see below).

    python samples/make_samples.py                  # writes samples/planted/, samples/text/, samples/planted-kohya.safetensors,
                                                    # samples/planted-merged.safetensors
    python samples/make_samples.py --only text --out /tmp/s   # one sample elsewhere (what the test does)

- ``samples/planted/``: r=32 LoRA on all 7 linear types of the tiny model, trained on the planted task
  with planted rank 4 (training output directory: adapter at the top level, ``base/``, task files);
- ``samples/text/``: r=8 LoRA on q/k/v/o trained on ``samples/corpus.txt`` (byte-level);
- ``samples/planted-kohya.safetensors``: the planted adapter converted to kohya layout by hand
  (``lora_te_<path with . → _>.lora_down.weight`` (r, in), ``.lora_up.weight`` (out, r), ``.alpha``;
  ΔW = (alpha/r)·up@down);
- ``samples/planted-merged.safetensors``: the planted adapter merged into its base, a "fine-tuned checkpoint"
  for ``extract``: every adapted weight W + (α/r)·B@A computed in float64 and rounded once to float32, the other
  tensors copied (a float64 product rounded once: byte for byte wherever the float64 matmul's last bits round
  to the same float32, which held on this machine; the extract tour and tests compare to tolerances).

What regenerates, and where. Byte for byte — every ``.safetensors`` file and ``adapter_config.json``;
``task.json`` and ``log.jsonl`` except their wall-clock fields (``elapsed_s``, ``tokens_per_s``) — only
on the same machine and kernels: the same torch build, ATen's AVX2 kernels (pinned here, see
:data:`PINNED`), one thread, and the same BLAS kernels. MKL chooses its own kernels by CPU, whatever
``ATEN_CPU_CAPABILITY`` says (``MKL_CBWR=COMPATIBLE`` alone changed the weights), and an AVX-512
machine with ATen's AVX2 kernels pinned did train to other weights; the machines on which the committed bytes were seen to regenerate are listed in
``tests/test_train_samples.py`` (``EXACT_ON``: torch 2.13.0+cpu, AVX2 ATen kernels, MKL, an AMD EPYC
with AVX2). Elsewhere training amplifies last-bit differences into another draw of the same recipe:
the test then compares the retrained text sample with the committed one within stated tolerances
(held-out loss to 6%, each module's ‖ΔW‖_F to 30%, energy ranks to ±2; measured: 2%, 11%, ±1) — the
non-vectorised ATen kernels, for example, reached held-out loss 3.2298 and MKL's ``MKL_CBWR=COMPATIBLE``
path 3.1935, against the committed 3.2152 (AVX-512 kernels: 3.2106). The thread count did not matter
where it was tried (1 and 2 threads with AVX2, 1, 2 and 4 with AVX-512 gave identical bytes); one
thread is pinned anyway, as the fastest for this tiny model. The kohya sample is the planted adapter
laid out again (no arithmetic): the same bytes everywhere.
"""

from __future__ import annotations

import os

# must be set before torch first dispatches a kernel (it reads the variable once): pinned, not defaulted
PINNED = {"ATEN_CPU_CAPABILITY": "avx2"}
os.environ.update(PINNED)

import argparse  # noqa: E402 - after the pinned environment
import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from lora_inspect.files import write_safetensors  # noqa: E402
from lora_inspect.train import ALL_LINEAR, DEFAULT_TARGETS, TrainConfig, run_training  # noqa: E402
from lora_inspect.train.io import load_safetensors  # noqa: E402

HERE = Path(__file__).resolve().parent
THREADS = 1
SAMPLES = ("planted", "text", "kohya", "merged")


def to_kohya(peft_dir: Path, dest: Path) -> None:
    """PEFT (lora_A (r, in), lora_B (out, r), α from the config) → kohya keys, same dtype."""
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    if cfg.get("use_rslora"):
        raise SystemExit("kohya has no rsLoRA scale; convert a plain LoRA")
    sd = load_safetensors(peft_dir / "adapter_model.safetensors")
    out = {}
    for k in sorted(sd):
        if not k.endswith(".lora_A.weight"):
            continue
        path = k[len("base_model.model.") : -len(".lora_A.weight")]
        stem = "lora_te_" + path.replace(".", "_")
        a, b = sd[k], sd[k.replace(".lora_A.", ".lora_B.")]
        out[f"{stem}.lora_down.weight"] = a.contiguous()
        out[f"{stem}.lora_up.weight"] = b.contiguous()
        out[f"{stem}.alpha"] = torch.tensor(float(cfg["lora_alpha"]), dtype=a.dtype)
    tmp = dest.with_name(dest.name + ".tmp")
    write_safetensors(tmp, out, metadata={"format": "pt"})  # deterministic header (sorted keys)
    tmp.replace(dest)


def to_merged(peft_dir: Path, dest: Path) -> None:
    """The base checkpoint with the adapter merged: W + (α/r)·B@A in float64, rounded once to the base dtype."""
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    scale = float(cfg["lora_alpha"]) / float(cfg["r"])
    base = load_safetensors(peft_dir / "base" / "model.safetensors")
    sd = load_safetensors(peft_dir / "adapter_model.safetensors")
    out = {}
    for k in sorted(base):
        w = base[k]
        a_key = "base_model.model." + k.removesuffix(".weight") + ".lora_A.weight"
        if a_key in sd:
            a, b = sd[a_key].double(), sd[a_key.replace(".lora_A.", ".lora_B.")].double()
            w = (w.double() + scale * (b @ a)).to(w.dtype)
        out[k] = w.contiguous()
    tmp = dest.with_name(dest.name + ".tmp")
    write_safetensors(tmp, out, metadata={"format": "pt"})
    tmp.replace(dest)


def make_planted(out: Path) -> None:
    s = run_training(out / "planted", task="planted", planted_rank=4, rank=32, alpha=32, targets=list(ALL_LINEAR),
                     model="tiny", seq_len=64,
                     train_cfg=TrainConfig(steps=400, batch_size=16, lr=3e-3, eval_every=100, seed=0, device="cpu",
                                           threads=THREADS, progress=False))
    print(f"planted: KL {s['initial']['loss']:.4g} -> {s['final']['loss']:.4g}")


def make_text(out: Path) -> None:
    corpus = HERE / "corpus.txt"
    s = run_training(out / "text", task="text", data=corpus, rank=8, alpha=16, targets=list(DEFAULT_TARGETS),
                     model="tiny", seq_len=64,
                     train_cfg=TrainConfig(steps=300, batch_size=16, lr=1e-2, eval_every=100, seed=0, device="cpu",
                                           threads=THREADS, progress=False))
    print(f"text: loss {s['initial']['loss']:.4g} -> {s['final']['loss']:.4g}")
    # record the corpus path relative to the repo so the sample does not carry this machine's paths
    tj = json.loads((out / "text" / "task.json").read_text())
    tj["data"] = "samples/corpus.txt"
    (out / "text" / "task.json").write_text(json.dumps(tj, indent=2, sort_keys=True) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE, help="where to write (default: samples/)")
    ap.add_argument("--only", choices=SAMPLES, action="append",
                    help="only this sample (repeatable; kohya and merged need planted, made first when missing)")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    only = set(args.only or SAMPLES)
    if only & {"kohya", "merged"} and "planted" not in only and not (out / "planted" / "adapter_model.safetensors").is_file():
        only.add("planted")
    for name in ("planted", "text"):
        if name in only and (out / name).exists():
            shutil.rmtree(out / name)
    if "planted" in only:
        make_planted(out)
    if "text" in only:
        make_text(out)
    if "kohya" in only:
        to_kohya(out / "planted", out / "planted-kohya.safetensors")
    if "merged" in only:
        to_merged(out / "planted", out / "planted-merged.safetensors")
    print(f"wrote {', '.join(sorted(only))} under {out} ({torch.backends.cpu.get_cpu_capability()} kernels, {THREADS} thread)")


if __name__ == "__main__":
    main()
