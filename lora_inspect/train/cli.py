"""``lora-inspect train`` and ``lora-inspect verify``: option parsing only; the work is in run/verify.

Every option is checked here, before anything is built or written: a bad value is one line naming the
option, exit 2 (integers by click's ranges, floats by :func:`_float_in`, ``--targets`` by
:func:`_targets`, the batch split by :func:`_check_batch`).
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import click

from ..commands._options import output_options
from ..errors import InspectError

__all__ = ["train", "verify"]

SEED_MAX = 2**32 - 1  # derived generator seeds (seed · 7919 + …) must stay within torch's 64-bit range
POSITIVE = click.IntRange(min=1)


def _float_in(lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False) -> Callable:
    """A click callback: the value is a finite float in the interval (None passes: 'not given')."""
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"

    def check(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
        if value is None:
            return None
        ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
        if not ok:
            span = f"{left}{lo:g}, {hi:g}{right}" if math.isfinite(hi) else ("> " if lo_open else "≥ ") + f"{lo:g}"
            raise InspectError(f"--{param.name.replace('_', '-') if param.name else '?'} {value:g}: must be a finite number {span}")
        return value

    return check


def _targets(value: str) -> list[str] | str:
    """Comma list → list (PEFT suffix matching); ``re:PATTERN`` → a regex (PEFT fullmatch); ``all-linear`` → the 7 types."""
    from .run import ALL_LINEAR

    v = value.strip()
    if v.startswith("re:"):
        pattern = v[3:]
        if not pattern:
            raise InspectError("--targets re: needs a regular expression after 're:'")
        try:
            re.compile(pattern)
        except (re.error, RecursionError, OverflowError) as e:
            raise InspectError(f"--targets {v}: not a valid regular expression ({e})") from None
        return pattern
    if v == "all-linear":
        return list(ALL_LINEAR)
    items = [t.strip() for t in v.split(",") if t.strip()]
    if not items:
        raise InspectError("--targets is empty")
    return items


def _check_batch(batch_size: int, grad_accum: int) -> None:
    """Every optimizer step splits the global batch evenly over processes × micro-steps."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if batch_size % (world * grad_accum):
        raise InspectError(f"--batch-size {batch_size}: not divisible by --grad-accum {grad_accum} × {world} process(es)")


def _threads(value: str) -> int | None:
    """``auto`` → None (see :func:`lora_inspect.train.loop.default_threads`), else a positive integer."""
    if value == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise InspectError(f"--threads {value}: use 'auto' or a positive integer")
    return n


@click.command("train", short_help="Train a LoRA adapter on a planted-rank or text task.", epilog="""\b
Examples:
  lora-inspect train --task planted --planted-rank 4 --rank 32 --steps 400 \\
      --out runs/planted
  lora-inspect train --task text --data corpus.txt --rank 8 \\
      --targets all-linear --steps 300 --out runs/text
  torchrun --nproc-per-node 2 -m lora_inspect train --task planted \\
      --rank 16 --steps 200 --out runs/ddp
""")
@click.option("--task", type=click.Choice(["planted", "text"]), required=True, help="planted: distil a rank-K teacher; text: next-byte LM on --data.")
@click.option("--data", type=click.Path(dir_okay=False), default=None, help="UTF-8 text file (--task text).")
@click.option("--planted-rank", type=POSITIVE, default=4, show_default=True, help="Rank K of the teacher's ΔW (--task planted).")
@click.option("--rank", "rank", type=POSITIVE, required=True, help="LoRA rank r.")
@click.option("--alpha", type=float, default=None, callback=_float_in(0, lo_open=True), help="LoRA alpha > 0 (default: r, i.e. scale 1).")
@click.option("--rslora", is_flag=True, help="Scale α/√r instead of α/r.")
@click.option("--dropout", type=float, default=0.0, show_default=True, callback=_float_in(0, 1, hi_open=True), help="LoRA dropout in [0, 1).")
@click.option("--targets", default="q_proj,k_proj,v_proj,o_proj", show_default=True, help="Comma list, 'all-linear', or 're:REGEX'.")
@click.option("--steps", type=POSITIVE, required=True, help="Optimizer steps.")
@click.option("--batch-size", type=POSITIVE, default=16, show_default=True, help="Sequences per step (global).")
@click.option("--grad-accum", type=POSITIVE, default=1, show_default=True, help="Micro-steps per step.")
@click.option("--seq-len", type=POSITIVE, default=64, show_default=True)
@click.option("--lr", type=float, default=3e-3, show_default=True, callback=_float_in(0, lo_open=True), help="Peak learning rate > 0.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True, callback=_float_in(0))
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True, help="Warmup steps.")
@click.option("--eval-every", type=click.IntRange(min=0), default=50, show_default=True, help="Evaluate every N steps (0: only at the start and the end).")
@click.option("--seed", type=click.IntRange(0, SEED_MAX), default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--threads", default="auto", show_default=True,
              help="CPU threads for torch. auto: 1 for models up to 'small' (100 tiny steps on a busy 2-core "
                   "machine: median 43 s on 1 thread, 373 s on torch's default of 2), else the cores this "
                   "process may use divided by the processes on this node. On CUDA only the CPU side.")
@click.option("--model", "model", default="tiny", show_default=True, help="tiny, small, medium, base100m, or a model directory (ours or local Hugging Face).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output directory.")
@click.option("--force", is_flag=True, help="Write into a non-empty --out.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train(task, data, planted_rank, rank, alpha, rslora, dropout, targets, steps, batch_size, grad_accum, seq_len, lr,
          weight_decay, warmup, eval_every, seed, device, threads, model, out, force, no_progress):
    """Train a LoRA adapter on a planted-rank or text task; writes a re-evaluable directory."""
    from .loop import TrainConfig
    from .run import run_training

    target_spec = _targets(targets)
    _check_batch(batch_size, grad_accum)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, weight_decay=weight_decay,
                      warmup_steps=min(warmup, steps), eval_every=eval_every, seed=seed, device=device,
                      threads=_threads(threads), progress=not no_progress and sys.stderr.isatty())
    s = run_training(out, task=task, data=data, planted_rank=planted_rank, rank=rank, alpha=alpha, rslora=rslora,
                     dropout=dropout, targets=target_spec, model=model, seq_len=seq_len, force=force, train_cfg=cfg)
    if s.get("initial"):
        from ..views.render import say
        from ..views.words import plural

        say(f"held-out loss {s['initial']['loss']:.6g} → {s['final']['loss']:.6g} in {plural(s['steps'], 'step')} "
            f"({s['tokens_per_s']:,.0f} tokens/s); wrote {out}")


@click.command("verify", short_help="Measure adapters' loss, KL and agreement on held-out data.", epilog="""\b
Examples:
  lora-inspect verify runs/planted
  lora-inspect verify runs/planted truncated-r4/ kohya.safetensors --json
  lora-inspect verify runs/text --data other.txt --format markdown
  lora-inspect verify ./adapter ./adapter-r16 --base ./Llama-3.2-1B \\
      --data eval.jsonl

DIRECTORY is a training output directory (task.json and heldout.safetensors
beside the adapter): every adapter must fit its base (same module names and
shapes). An adapter that is itself a training output directory must also
record the same base weights (else: refused, exit 2); one trained on another
task is evaluated with a note on stderr.

With --base HF_DIR (a Hugging Face model directory), every argument is an
adapter (PEFT dir, kohya, mlx-lm or bare file), merged into the base in turn
and run on --data (.txt, or .jsonl with a "text" field), tokenised with
HF_DIR's tokenizer; the first adapter is the reference for KL and agreement.
""")
@click.argument("directory", type=click.Path())
@click.argument("adapters", nargs=-1, type=click.Path())
@click.option("--base", "base", type=click.Path(), default=None,
              help="A Hugging Face model directory: evaluate the adapters on it.")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="Evaluate on this text (.txt; with --base also .jsonl).")
@click.option("--max-tokens", type=POSITIVE, default=None, help="With --base: at most N tokens of --data (default 65536).")
@click.option("--batch-size", type=POSITIVE, default=None, help="With --base: sequences per forward pass (default 8).")
@click.option("--device", default=None, help="auto, cpu or cuda (default: cpu; with --base: auto).")
@output_options
def verify(directory, adapters, base, data, max_tokens, batch_size, device, fmt):
    """Evaluate DIRECTORY's adapter and further ADAPTERS (PEFT dirs, kohya files) on its held-out data,
    or, with --base HF_DIR, each adapter given on a Hugging Face model and --data."""
    if base is not None:
        from ..commands.verify_hf import run_hf_verify

        run_hf_verify([directory, *adapters], base, data, max_tokens, batch_size, device or "auto", fmt)
        return
    if max_tokens is not None or batch_size is not None:
        raise click.UsageError("--max-tokens and --batch-size go with --base HF_DIR")
    _require_run(directory)
    from ..views.render import emit
    from ..views.verify import verify_view
    from .verify import verify as run_verify

    r = run_verify(directory, list(adapters), data=data, device=device or "cpu", note=_note)
    emit(verify_view(r, directory), fmt)


def _require_run(directory: str) -> None:
    """DIRECTORY must be a training output directory; anything else (an adapter, a file) is one line
    saying so and what to give instead (a missing path is the library's "no such directory")."""
    d = Path(directory)
    if not d.exists():
        return
    missing = [f for f in ("task.json", "heldout.safetensors") if not (d / f).is_file()]
    if d.is_file() or missing:
        what = "a file" if d.is_file() else "no " + " and no ".join(missing)
        raise InspectError(f"{directory}: not a training output directory ({what}); to evaluate adapters on a "
                           "Hugging Face model give --base HF_DIR --data FILE")


def _note(message: str) -> None:
    from ..views.render import note

    note(message)
