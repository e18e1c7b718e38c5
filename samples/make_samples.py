"""Regenerate the committed sample adapters (deterministic: fixed seeds, CPU, one thread).

    python samples/make_samples.py            # writes samples/planted/, samples/text/, samples/planted-kohya.safetensors

- ``samples/planted/``: r=32 LoRA on all 7 linear types of the tiny model, trained on the planted task
  with planted rank 4 (training output directory: adapter at the top level, ``base/``, task files);
- ``samples/text/``: r=8 LoRA on q/k/v/o trained on ``samples/corpus.txt`` (byte-level);
- ``samples/planted-kohya.safetensors``: the planted adapter converted to kohya layout by hand
  (``lora_te_<path with . → _>.lora_down.weight`` (r, in), ``.lora_up.weight`` (out, r), ``.alpha``;
  ΔW = (alpha/r)·up@down).

Weights are bit-identical between runs on the same machine/torch build; ``log.jsonl`` and the
``result`` timings in ``task.json`` record wall-clock speed and therefore differ.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lora_inspect.train import ALL_LINEAR, DEFAULT_TARGETS, TrainConfig, run_training

HERE = Path(__file__).resolve().parent


def to_kohya(peft_dir: Path, dest: Path) -> None:
    """PEFT (lora_A (r, in), lora_B (out, r), α from the config) → kohya keys, same dtype."""
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    if cfg.get("use_rslora"):
        raise SystemExit("kohya has no rsLoRA scale; convert a plain LoRA")
    sd = load_file(str(peft_dir / "adapter_model.safetensors"))
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
    # one metadata key only: safetensors writes metadata in hash order, which would break byte-identity
    save_file(out, str(tmp), metadata={"format": "pt"})
    tmp.replace(dest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE, help="where to write (default: samples/)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    for name in ("planted", "text"):
        if (out / name).exists():
            shutil.rmtree(out / name)

    s = run_training(out / "planted", task="planted", planted_rank=4, rank=32, alpha=32, targets=list(ALL_LINEAR),
                     model="tiny", seq_len=64,
                     train_cfg=TrainConfig(steps=400, batch_size=16, lr=3e-3, eval_every=100, seed=0, device="cpu", progress=False))
    print(f"planted: KL {s['initial']['loss']:.4g} -> {s['final']['loss']:.4g}")

    corpus = HERE / "corpus.txt"
    s = run_training(out / "text", task="text", data=corpus, rank=8, alpha=16, targets=list(DEFAULT_TARGETS),
                     model="tiny", seq_len=64,
                     train_cfg=TrainConfig(steps=300, batch_size=16, lr=1e-2, eval_every=100, seed=0, device="cpu", progress=False))
    print(f"text: loss {s['initial']['loss']:.4g} -> {s['final']['loss']:.4g}")
    # record the corpus path relative to the repo so the sample does not carry this machine's paths
    tj = json.loads((out / "text" / "task.json").read_text())
    tj["data"] = "samples/corpus.txt"
    (out / "text" / "task.json").write_text(json.dumps(tj, indent=2, sort_keys=True) + "\n")

    to_kohya(out / "planted", out / "planted-kohya.safetensors")
    print(f"wrote {out}/planted, {out}/text, {out}/planted-kohya.safetensors")


if __name__ == "__main__":
    main()
