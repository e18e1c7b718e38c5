"""Benchmark: calibrated vs plain truncation at equal rank, KL(original ‖ truncated) on held-out text.

    python benchmarks/bench_calibrate.py [--steps 300] [--ridge 0.01] [--lr 0.003 0.01] [--only own|hf] [--no-write]

Two settings, both seeded, CPU only, a few minutes:

1. the project's text task (``samples/text``: its own tiny byte-level model, r = 8 on q/k/v/o, trained on
   ``samples/corpus.txt``): calibration text = the training part of the corpus (non-overlapping windows),
   held-out = the task's held-out windows, KL and loss from ``lora_inspect.train.verify.verify``;
2. a tiny Hugging Face Llama (built from a config, 2 layers, hidden 64, word-level tokenizer over
   docstrings of the Python standard library — offline, deterministic for a given Python), a PEFT LoRA
   r = 16 on every linear layer trained ``--steps`` steps with AdamW; calibration = the first 8192 training
   tokens, held-out = the last 10 % of the text, KL and loss from ``verify --base`` (``lora_inspect.hf``).

For each rank k, the adapter is truncated plainly (``rewrite.truncate``) and with calibration
(``rewrite.calibrate``: every 4th calibration chunk held out for its own plain-vs-calibrated check, the
rest fitted), and KL(original ‖ truncated) per token on the benchmark's held-out text is compared; the
"check" column is the calibration's own decision (its held-out-split KL ratio, and what it wrote).
Writes ``reports/calibrate.md`` unless ``--no-write`` (``--only`` runs one setting and never writes).
Goal: calibrated KL ≤ 0.7 × plain KL, and never above plain.
"""

from __future__ import annotations

import argparse
import ast
import platform
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora_inspect.formats import load_adapter  # noqa: E402
from lora_inspect.hf.apply import bind_adapter  # noqa: E402
from lora_inspect.hf.collect import Feed, ModelCalibration, hf_feed, split_chunks  # noqa: E402
from lora_inspect.rewrite import TruncateSpec, truncate  # noqa: E402
from lora_inspect.rewrite.calibrate import calibrated_truncate  # noqa: E402

REPORT = ROOT / "reports" / "calibrate.md"


def _rows(ks, plain, cal):
    out = []
    for k, p, c in zip(ks, plain, cal):
        out.append(f"| {k} | {p[0]:.4g} | {c[0]:.4g} | {c[0] / p[0]:.2f}× | {p[1]:.5g} | {c[1]:.5g} | "
                   f"{c[2]:.3f} / {c[3]:.3f} | {c[4]:.2f}× → {c[5]} |")
    return out


def _layer_errors(res) -> tuple[float, float, float, str]:
    """Mean over modules of the relative output error (written, plain at the same inputs); the check's
    held-out-split KL ratio (calibrated / plain), what was written and the check's z score."""
    m, c = res.modules, res.calibration
    kl = c["held_out_kl"]
    z = "" if c["z_score"] is None else f", z {c['z_score']:.1f}"
    return (sum(x.relative_error for x in m) / len(m), sum(x.output_error_plain for x in m) / len(m),
            kl["calibrated"] / kl["plain"] if kl["plain"] > 0 else float("nan"), c["chosen"] + z)


def _spread(moments) -> float:
    """Mean over modules of the effective dimension (tr Σ)²/‖Σ‖²_F divided by in: 1 = isotropic inputs."""
    vals = [float(np.trace(s) ** 2 / (s * s).sum()) / s.shape[0] for s in moments.values()]
    return sum(vals) / len(vals)


def own_text_task(ks, ridge, tmp: Path) -> tuple[list, list, dict]:
    from lora_inspect.train.verify import load_run, verify

    run = ROOT / "samples" / "text"
    model, desc, task = load_run(run)
    ad = load_adapter(run)
    bound = bind_adapter(run, model, ad)
    from lora_inspect.train.tasks import TextTask

    seq = int(desc["seq_len"])
    train_ids = TextTask(ROOT / desc["data"], seq_len=seq, heldout_frac=float(desc["heldout_frac"])).train_ids
    calib = train_ids[: (len(train_ids) // (seq + 1)) * (seq + 1)].view(-1, seq + 1)
    fit, held = split_chunks(list(calib[:, :-1]), "calibration windows")

    def feed(rows) -> Feed:
        x = torch.stack(rows)
        return Feed([(x[i : i + 16], None) for i in range(0, len(x), 16)], lambda m, inp: m(inp))

    data = ModelCalibration(model, bound, feed(fit), feed(held))
    moments = data.moments()
    plain, cal = [], []
    for k in ks:
        truncate(ad, tmp / f"own-plain-{k}", TruncateSpec(rank=k))
        res = calibrated_truncate(ad, tmp / f"own-cal-{k}", TruncateSpec(rank=k), data, ridge=ridge)
        r = verify(run, [tmp / f"own-plain-{k}", tmp / f"own-cal-{k}"])["results"]
        plain.append((r[1]["kl_to_first"], r[1]["loss"]))
        cal.append((r[2]["kl_to_first"], r[2]["loss"], *_layer_errors(res)))
    return plain, cal, {"calibration_tokens": data.tokens, "check_tokens": data.held_out_tokens,
                        "spread": _spread(moments), "heldout_windows": len(task.heldout), "seq_len": seq,
                        "original_loss": r[0]["loss"]}


def stdlib_text(max_chars: int = 600_000) -> str:
    """Docstrings of the standard library's top-level modules, in sorted file order."""
    parts, total = [], 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                d = ast.get_docstring(node)
                if d and len(d) > 80:
                    parts.append(" ".join(d.split()))
                    total += len(parts[-1])
        if total > max_chars:
            break
    return "\n".join(parts)


def build_hf(tmp: Path, text: str, steps: int, lr: float) -> tuple[Path, Path, Path, Path, float]:
    """Tiny Llama + word-level tokenizer (top 2000 words) + PEFT r=16 all-linear trained ``steps`` steps."""
    from collections import Counter

    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tmp.mkdir(parents=True, exist_ok=True)
    pre = pre_tokenizers.Whitespace()
    words = [w for w, _ in pre.pre_tokenize_str(text)]
    vocab = {"[UNK]": 0, "[PAD]": 1}
    for w, _ in Counter(words).most_common(2000):
        vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    base = tmp / "hf-base"
    LlamaForCausalLM(cfg).save_pretrained(str(base))
    tok.save_pretrained(str(base))
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    n_hold = len(ids) // 10
    train_ids, held = ids[:-n_hold], ids[-n_hold:]
    (tmp / "calib.txt").write_text(tok.decode(train_ids[:8192].tolist()))
    (tmp / "heldout.txt").write_text(tok.decode(held.tolist()))
    model = LlamaForCausalLM.from_pretrained(str(base))
    pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(steps):
        starts = torch.randint(0, len(train_ids) - 65, (16,), generator=g)
        x = torch.stack([train_ids[s : s + 64] for s in starts.tolist()])
        loss = pm(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.save_pretrained(str(tmp / "hf-lora"))
    return base, tmp / "hf-lora", tmp / "calib.txt", tmp / "heldout.txt", time.perf_counter() - t0


def hf_task(ks, ridge, tmp: Path, steps: int, lr: float) -> tuple[list, list, dict]:
    from lora_inspect.hf.model import load_hf
    from lora_inspect.hf.verify import prepare_text, verify_hf

    base, lora, calib, held, train_s = build_hf(tmp, stdlib_text(), steps, lr)
    ad = load_adapter(lora)
    hf = load_hf(base, "cpu")
    bound = bind_adapter(lora, hf.model, ad)
    fit, check = split_chunks(prepare_text(hf, calib, 8192), str(calib))
    data = ModelCalibration(hf.model, bound, hf_feed(fit, 8, hf.device), hf_feed(check, 8, hf.device))
    moments = data.moments()
    plain, cal, layer = [], [], []
    for k in ks:
        truncate(ad, tmp / f"hf-plain-{k}", TruncateSpec(rank=k))
        layer.append(_layer_errors(calibrated_truncate(ad, tmp / f"hf-cal-{k}", TruncateSpec(rank=k), data,
                                                       ridge=ridge)))
    res = verify_hf([lora] + [tmp / f"hf-{w}-{k}" for k in ks for w in ("plain", "cal")], base, held, device="cpu",
                    max_tokens=16384)
    for i in range(len(ks)):
        p, c = res.results[1 + 2 * i], res.results[2 + 2 * i]
        plain.append((p.kl_to_first, p.loss))
        cal.append((c.kl_to_first, c.loss, *layer[i]))
    return plain, cal, {"calibration_tokens": data.tokens, "check_tokens": data.held_out_tokens,
                        "spread": _spread(moments), "heldout_tokens": res.tokens, "train_steps": steps,
                        "train_s": train_s, "original_loss": res.results[0].loss, "base_loss": res.base_loss}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ridge", type=float, default=1e-2)
    ap.add_argument("--lr", type=float, nargs="+", default=[3e-3, 1e-2], help="one HF run per learning rate")
    ap.add_argument("--only", choices=["own", "hf"], default=None, help="one setting only (prints, never writes)")
    ap.add_argument("--no-write", action="store_true", help="print the report without writing reports/calibrate.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    own_ks, hf_ks = [1, 2, 4], [2, 4, 8]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        own = own_text_task(own_ks, args.ridge, tmp) if args.only != "hf" else None
        hfs = ([hf_task(hf_ks, args.ridge, tmp / f"lr{lr:g}", args.steps, lr) for lr in args.lr]
               if args.only != "own" else [])
    head = ("| k | KL plain | KL calibrated | ratio | loss plain | loss calibrated | layer output error cal / plain "
            "| check: split KL ratio → written |\n|---|---|---|---|---|---|---|---|")
    body = [
        "# Calibrated vs plain truncation", "",
        f"`python benchmarks/bench_calibrate.py --steps {args.steps} --ridge {args.ridge:g} --lr "
        f"{' '.join(f'{x:g}' for x in args.lr)}` "
        f"({platform.machine()}, torch {torch.__version__}, 1 thread, {time.perf_counter() - t0:.0f} s in all). "
        "KL(original ‖ truncated) in nats per held-out token; the original adapter is the reference. "
        "Goal: calibrated ≤ 0.7 × plain, never above. Layer output errors: the written factors' and plain "
        "truncation's, on the inputs the fit saw (upstream modules truncated).", "",
    ]
    if own is not None:
        body += [
            f"## Project text task (samples/text, r = 8, q/k/v/o; {own[2]['calibration_tokens']} calibration bytes "
            f"from the training text, {own[2]['check_tokens']} more held out for the check; "
            f"{own[2]['heldout_windows']} held-out windows of {own[2]['seq_len']}; original loss "
            f"{own[2]['original_loss']:.5g}; input spread {own[2]['spread']:.2f})", "", head,
            *_rows(own_ks, own[0], own[1]), "",
        ]
    for lr, hf in zip(args.lr, hfs):
        body += [
            f"## Tiny Hugging Face Llama, lr {lr:g} (PEFT r = 16 all-linear, {hf[2]['train_steps']} AdamW steps in "
            f"{hf[2]['train_s']:.0f} s; {hf[2]['calibration_tokens']} calibration tokens, {hf[2]['check_tokens']} "
            f"more for the check; {hf[2]['heldout_tokens']} held-out tokens; base loss {hf[2]['base_loss']:.5g}, "
            f"original adapter {hf[2]['original_loss']:.5g}; input spread {hf[2]['spread']:.2f})", "", head,
            *_rows(hf_ks, hf[0], hf[1]), "",
        ]
    print("\n".join(body))
    if args.only is None and not args.no_write:
        old = REPORT.read_text() if REPORT.exists() else ""
        reading = old[old.index("## Reading") :] if "## Reading" in old else ""  # hand-written: kept across reruns
        REPORT.write_text("\n".join(body) + ("\n" + reading if reading else ""))


if __name__ == "__main__":
    main()
