"""Check the training-VRAM estimator (lora_inspect.footprint) against published anchors and, when a CUDA
device is present, against ``torch.cuda.max_memory_allocated`` of a run with the project's training core.

    python benchmarks/bench_vram.py                 # print the comparison
    python benchmarks/bench_vram.py --write reports/vram.md

Anchors (docs/metrics.md): torchtune Llama-2-7B LoRA, 1 GPU, 17.18 GB peak; QLoRA 9.29 GB; Unsloth's
minimum-VRAM table (QLoRA / 16-bit LoRA): 7B 5 / 19 GB, 8B 6 / 22 GB, 70B 41 / 164 GB. The anchors do not state
every setting; the settings assumed for each are printed next to it. Target: within 10% of a measured peak.
The training core (``lora_inspect.train``) is imported lazily: without it, or without CUDA, the measured column
says why it is empty.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_inspect.basemodels import from_hf_config, load_base, lora_params_for  # noqa: E402
from lora_inspect.footprint import layer_paths, training_vram  # noqa: E402

QV = ["q_proj", "v_proj"]

# (label, anchor GB, anchor kind, preset, targets, r, training settings, what is assumed)
ANCHORS = [
    ("torchtune Llama-2-7B LoRA (1 GPU)", 17.18, "measured peak", "llama-2-7b", QV, 8,
     dict(quant="bf16", batch=2, seq=512, adapter_dtype="bf16", optimizer="adamw", grad_checkpointing=False),
     "q,v r=8, bf16 everywhere, batch 2 × 512 (alpaca), no checkpointing"),
    ("torchtune Llama-2-7B LoRA (1 GPU)", 17.18, "measured peak", "llama-2-7b", QV, 8,
     dict(quant="bf16", batch=2, seq=512, adapter_dtype="bf16", optimizer="adamw", grad_checkpointing=True),
     "same, with activation checkpointing"),
    ("torchtune Llama-2-7B QLoRA (1 GPU)", 9.29, "measured peak", "llama-2-7b", QV, 8,
     dict(quant="nf4", batch=2, seq=512, adapter_dtype="bf16", optimizer="adamw", grad_checkpointing=False),
     "q,v r=8, NF4 base, batch 2 × 512, no checkpointing"),
    ("torchtune Llama-2-7B QLoRA (1 GPU)", 9.29, "measured peak", "llama-2-7b", QV, 8,
     dict(quant="nf4", batch=2, seq=512, adapter_dtype="bf16", optimizer="adamw", grad_checkpointing=True),
     "same, with activation checkpointing"),
]
for label, preset, q, gb in (("7B", "llama-2-7b", "nf4", 5), ("7B", "llama-2-7b", "bf16", 19), ("8B", "llama-3-8b", "nf4", 6),
                             ("8B", "llama-3-8b", "bf16", 22), ("70B", "llama-3-70b", "nf4", 41), ("70B", "llama-3-70b", "bf16", 164)):
    ANCHORS.append((f"Unsloth minimum {label} {'QLoRA' if q == 'nf4' else '16-bit LoRA'}", gb, "published minimum", preset,
                    "all-linear", 16, dict(quant=q, batch=1, seq=2048, adapter_dtype="bf16", optimizer="adamw8bit",
                                           grad_checkpointing=True),
                    "all-linear r=16, batch 1 × 2048, checkpointing, AdamW8bit, bf16 adapters"))


def estimate(preset: str, targets, r: int, settings: dict) -> int:
    base = load_base(preset)
    lp = lora_params_for(base, targets, r)
    targeted = {p for p in base.layer_linears() if targets == "all-linear" or p.split(".")[-1] in targets}
    return training_vram(base, trainable_params=lp["params"], targeted=targeted, **settings)["total_bytes"]


def measure_small() -> tuple[list[tuple], str]:
    """Train a small model with the project's training core on CUDA and compare with the estimate."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return [], "torch missing"
    if not torch.cuda.is_available():
        return [], "no CUDA device here: the measured column was not run"
    try:
        from lora_inspect.train import PRESETS, build_model, inject_lora  # lazy: written by another engineer
        from lora_inspect.train.model import logits_of
    except ImportError as e:
        return [], f"training core not importable ({e}): the measured column was not run"
    rows = []
    dev = torch.device("cuda")
    for name, targets, batch, seq, ckpt in (("base100m", QV, 4, 1024, False), ("base100m", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 4, 1024, False)):
        cfg = PRESETS[name]
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model = build_model(cfg).to(device=dev, dtype=torch.bfloat16)
        names = inject_lora(model, targets, r=8, alpha=16)
        for _name, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()  # fp32 adapters, as PEFT
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        x = torch.randint(0, cfg.vocab_size, (batch, seq), device=dev)
        for _ in range(2):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = logits_of(model, x)
            loss = torch.nn.functional.cross_entropy(logits.float().view(-1, cfg.vocab_size), x.view(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated()
        base = from_hf_config({"model_type": "llama", "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim,
                               "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
                               "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads, "vocab_size": cfg.vocab_size,
                               "tie_word_embeddings": cfg.tie_word_embeddings}, name)
        P = sum(p.numel() for p in model.parameters() if p.requires_grad)
        est = training_vram(base, trainable_params=P, targeted=layer_paths(names), batch=batch, seq=seq,
                            grad_checkpointing=ckpt)["total_bytes"]
        est -= 400_000_000  # max_memory_allocated does not see the CUDA context
        rows.append((f"{name} {len(set(t for t in targets))} target types, batch {batch} × {seq}", est, peak))
        del model, opt, logits, loss
    return rows, f"measured on {torch.cuda.get_device_name()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", type=Path, default=None, help="write the Markdown report here")
    args = ap.parse_args()
    lines = ["| anchor | kind | anchor GB | estimate GB | estimate / anchor | settings assumed |", "|---|---|---:|---:|---:|---|"]
    for label, gb, kind, preset, targets, r, settings, assumed in ANCHORS:
        est = estimate(preset, targets, r, settings) / 1e9
        lines.append(f"| {label} | {kind} | {gb:.2f} | {est:.2f} | {est / gb:.2f} | {assumed} |")
    measured, status = measure_small()
    mlines = ["| run | estimate (no context) | max_memory_allocated | ratio |", "|---|---:|---:|---:|"]
    for label, est, peak in measured:
        mlines.append(f"| {label} | {est / 1e9:.3f} GB | {peak / 1e9:.3f} GB | {est / peak:.2f} |")
    text = "\n".join(["## Published anchors", "", *lines, "", "## Measured with lora_inspect.train", "", status, "",
                      *(mlines if measured else [])])
    print(text)
    if args.write:
        args.write.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
