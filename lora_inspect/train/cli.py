"""``lora-inspect train`` and ``lora-inspect verify``: option parsing only; the work is in run/verify."""

from __future__ import annotations

import json
import sys

import click

from ..errors import InspectError

__all__ = ["train", "verify"]


def _targets(value: str) -> list[str] | str:
    """Comma list → list (PEFT suffix matching); ``re:PATTERN`` → a regex (PEFT fullmatch); ``all-linear`` → the 7 types."""
    from .run import ALL_LINEAR

    v = value.strip()
    if v.startswith("re:"):
        return v[3:]
    if v == "all-linear":
        return list(ALL_LINEAR)
    items = [t.strip() for t in v.split(",") if t.strip()]
    if not items:
        raise InspectError("--targets is empty")
    return items


@click.command("train", epilog="""\b
Examples:
  lora-inspect train --task planted --planted-rank 4 --rank 32 --steps 400 --out runs/planted
  lora-inspect train --task text --data corpus.txt --rank 8 --targets all-linear --steps 300 --out runs/text
  torchrun --nproc-per-node 2 -m lora_inspect train --task planted --rank 16 --steps 200 --out runs/ddp
""")
@click.option("--task", type=click.Choice(["planted", "text"]), required=True, help="planted: distil a rank-K teacher; text: next-byte LM on --data.")
@click.option("--data", type=click.Path(dir_okay=False), default=None, help="UTF-8 text file (--task text).")
@click.option("--planted-rank", type=int, default=4, show_default=True, help="Rank K of the teacher's ΔW (--task planted).")
@click.option("--rank", "rank", type=int, required=True, help="LoRA rank r.")
@click.option("--alpha", type=float, default=None, help="LoRA alpha (default: r, i.e. scale 1).")
@click.option("--rslora", is_flag=True, help="Scale α/√r instead of α/r.")
@click.option("--dropout", type=float, default=0.0, show_default=True, help="LoRA dropout.")
@click.option("--targets", default="q_proj,k_proj,v_proj,o_proj", show_default=True, help="Comma list, 'all-linear', or 're:REGEX'.")
@click.option("--steps", type=int, required=True, help="Optimizer steps.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Sequences per step (global).")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-steps per step.")
@click.option("--seq-len", type=int, default=64, show_default=True)
@click.option("--lr", type=float, default=3e-3, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True, help="Warmup steps.")
@click.option("--eval-every", type=click.IntRange(min=0), default=50, show_default=True, help="Evaluate every N steps (0: only at the start and the end).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--model", "model", default="tiny", show_default=True, help="tiny, small, medium, base100m, or a model directory (ours or local Hugging Face).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output directory.")
@click.option("--force", is_flag=True, help="Write into a non-empty --out.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train(task, data, planted_rank, rank, alpha, rslora, dropout, targets, steps, batch_size, grad_accum, seq_len, lr,
          weight_decay, warmup, eval_every, seed, device, model, out, force, no_progress):
    """Train a LoRA adapter on a planted-rank or text task; writes a re-evaluable directory."""
    from .loop import TrainConfig
    from .run import run_training

    if steps <= 0 or batch_size <= 0 or grad_accum <= 0 or seq_len <= 0:
        raise InspectError("--steps, --batch-size, --grad-accum and --seq-len must be positive")
    if not 0.0 <= dropout < 1.0:
        raise InspectError(f"--dropout {dropout:g}: must be in [0, 1)")
    cfg = TrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, weight_decay=weight_decay,
                      warmup_steps=min(warmup, steps), eval_every=eval_every, seed=seed, device=device,
                      progress=not no_progress and sys.stderr.isatty())
    s = run_training(out, task=task, data=data, planted_rank=planted_rank, rank=rank, alpha=alpha, rslora=rslora,
                     dropout=dropout, targets=_targets(targets), model=model, seq_len=seq_len, force=force, train_cfg=cfg)
    if s.get("initial"):
        click.echo(f"held-out loss {s['initial']['loss']:.6g} → {s['final']['loss']:.6g} in {s['steps']} steps "
                   f"({s['tokens_per_s']:,.0f} tokens/s); wrote {out}", err=True)


@click.command("verify", epilog="""\b
Examples:
  lora-inspect verify runs/planted
  lora-inspect verify runs/planted truncated-r4/ planted-kohya.safetensors --json
  lora-inspect verify runs/text --data other.txt
""")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("adapters", nargs=-1, type=click.Path())
@click.option("--data", type=click.Path(dir_okay=False), default=None, help="Evaluate on this UTF-8 text instead (text tasks).")
@click.option("--device", default="cpu", show_default=True, help="auto, cpu or cuda.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema lora-inspect/verify/1) to stdout.")
def verify(directory, adapters, data, device, as_json):
    """Evaluate DIRECTORY's adapter and further ADAPTERS (PEFT dirs, kohya files) on its held-out data."""
    from .verify import verify as run_verify

    r = run_verify(directory, list(adapters), data=data, device=device)
    if as_json:
        click.echo(json.dumps({"schema": r["schema"], "base_loss": r["base_loss"], "results": r["results"]}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"verify {directory} ({r['task']} task; base loss {r['base_loss']:.6g})")
    for col in ("adapter", "loss", "perplexity", "KL to first", "top-1 agreement"):
        t.add_column(col, justify="left" if col == "adapter" else "right")
    for x in r["results"]:
        t.add_row(x["adapter"], f"{x['loss']:.6g}", f"{x['perplexity']:.6g}", f"{x['kl_to_first']:.3g}", f"{x['top1_agreement']:.2%}")
    Console().print(t)
