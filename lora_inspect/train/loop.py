"""The training loop: AdamW, warmup + cosine, gradient accumulation and clipping, DDP, eval, logs.

- AdamW: Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization" (``fused=True`` on CUDA).
- Learning rate: linear warmup, then cosine decay to ``min_lr_ratio · lr`` (Loshchilov & Hutter
  2017, "SGDR"; the form nanoGPT's ``get_lr`` uses).
- Gradient clipping by global norm (Pascanu et al. 2013).
- bf16 autocast on CUDA only; the LoRA parameters and optimizer state stay float32.
- Data parallel: run under ``torchrun`` (or any launcher that sets RANK/WORLD_SIZE) and the loop
  wraps the model in DistributedDataParallel (NCCL on CUDA, gloo on CPU). Every optimizer step uses
  the same *global* batch whatever the world size: rank k takes rows [k·b, (k+1)·b) of each
  micro-batch, and DDP averages the gradients, so 1 process and N processes take the same steps.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import InspectError
from .model import logits_of
from .tasks import Task

__all__ = ["TrainConfig", "train", "evaluate", "resolve_device", "setup_distributed", "lr_at", "default_threads",
           "cpu_threads"]

# Models whose widest layer is at most this run on one CPU thread by default: their matrices are too
# small for intra-op parallelism to pay (measured on the tiny model: see default_threads).
ONE_THREAD_MAX_DIM = 256


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 16  # sequences per optimizer step, over all processes and micro-steps
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 3e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 disables
    eval_every: int = 50  # 0: only at the start and the end
    eval_batch: int = 32
    seed: int = 0
    device: str = "auto"
    threads: int | None = None  # CPU threads; None: default_threads()
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InspectError(f"TrainConfig.{name} must be a positive integer, got {v!r}")
        for name in ("warmup_steps", "eval_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InspectError(f"TrainConfig.{name} must be a non-negative integer, got {v!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InspectError(f"TrainConfig.lr must be a finite number > 0, got {self.lr!r}")
        for name in ("weight_decay", "grad_clip", "min_lr_ratio"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise InspectError(f"TrainConfig.{name} must be a finite number ≥ 0, got {v!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1):
            raise InspectError(f"TrainConfig.threads must be a positive integer or None, got {self.threads!r}")


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise InspectError(f"--device {name!r}: use auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InspectError("--device cuda: no CUDA device is available")
    return torch.device(name)


def default_threads(model_dim: int | None) -> int:
    """CPU threads when none are asked for.

    One thread for models no wider than :data:`ONE_THREAD_MAX_DIM` (the presets ``tiny`` and
    ``small``): their 64×64…176×64 matmuls are too small to split across threads. Measured on a
    2-core machine shared with other jobs (load average 8–12), the README's tiny planted command
    for 100 steps (``lora-inspect train --task planted --planted-rank 4 --rank 32 --targets
    all-linear --steps 100``) took 27.0, 48.8, 43.4 s on one thread (median 43 s) and 426, 373,
    321 s on torch's default of two (median 373 s): idle OpenMP threads spin on busy cores. Wider
    models (or an unknown width) get the cores this process may run on, divided among the processes
    of a torchrun node (``LOCAL_WORLD_SIZE``), at least one (not measured here).
    """
    if model_dim is not None and model_dim <= ONE_THREAD_MAX_DIM:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, cores // local)


@contextmanager
def cpu_threads(cfg: TrainConfig, model_dim: int | None) -> Iterator[int]:
    """Run the block with ``cfg.threads`` (or :func:`default_threads`) torch CPU threads, then restore."""
    n = cfg.threads if cfg.threads is not None else default_threads(model_dim)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def setup_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Joins the process group when launched with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        return rank, world, device
    return 0, 1, device


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from lr towards min_lr_ratio·lr, reaching it at
    step ``steps`` (one past the last optimizer step, as nanoGPT's ``get_lr`` with lr_decay_iters = steps):
    the last step runs slightly above the floor."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 → 0
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * coeff)


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, device: torch.device, batch: int = 32) -> dict[str, float]:
    """Task loss and cross-entropy on the held-out set (token-weighted means)."""
    was_training = model.training
    model.eval()
    tot_loss = tot_ce = 0.0
    n = 0
    for i in range(0, len(task.heldout), batch):
        b = task.heldout[i : i + batch].to(device)
        with _autocast(device):
            logits = logits_of(model, task.inputs(b))  # (b, T, V)
        tgt = task.targets(b)
        k = b.shape[0]
        tot_loss += task.loss(logits, tgt).item() * k
        tot_ce += task.cross_entropy(logits, tgt).item() * k
        n += k
    model.train(was_training)
    return {"loss": tot_loss / n, "cross_entropy": tot_ce / n, "perplexity": math.exp(min(tot_ce / n, 700.0))}


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


class _Log:
    """JSONL log (rank 0 only); one object per line, flushed as written."""

    def __init__(self, path: Path | None):
        self.path = path
        try:
            self.f = open(path, "w", encoding="utf-8") if path is not None else None  # noqa: SIM115 - held open across steps
        except OSError as e:
            raise InspectError(f"{path}: cannot write: {e.strerror or e}") from None

    def __call__(self, **rec) -> None:
        if self.f is not None:
            try:
                self.f.write(json.dumps(rec) + "\n")
                self.f.flush()
            except OSError as e:
                self.close()
                raise InspectError(f"{self.path}: cannot write: {e.strerror or e}") from None

    def close(self) -> None:
        if self.f is not None:
            f, self.f = self.f, None
            with suppress(OSError):
                f.close()


@dataclass
class _Run:
    """What one training run holds between steps."""

    model: nn.Module
    net: nn.Module  # the model, or its DistributedDataParallel wrapper
    ddp: nn.parallel.DistributedDataParallel | None
    task: Task
    cfg: TrainConfig
    params: list[nn.Parameter]
    opt: torch.optim.Optimizer
    device: torch.device
    rank: int
    world: int
    micro: int  # sequences per process per micro-step
    tokens_seen: int = 0


def _setup(model: nn.Module, task: Task, cfg: TrainConfig) -> _Run:
    """Device, process group, seeds, optimizer."""
    rank, world, device = setup_distributed(resolve_device(cfg.device))
    if cfg.batch_size % (world * cfg.grad_accum):
        raise InspectError(f"batch size {cfg.batch_size} is not divisible by world size × grad_accum = {world * cfg.grad_accum}")
    torch.manual_seed(cfg.seed + rank)  # dropout masks; the data does not depend on this RNG
    model.to(device)
    task.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InspectError("nothing to train: the model has no trainable parameters")
    ddp = None
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    return _Run(model, ddp if ddp is not None else model, ddp, task, cfg, params, opt, device, rank, world,
                micro=cfg.batch_size // (world * cfg.grad_accum))


def _step(r: _Run, step: int) -> tuple[float, float]:
    """One optimizer step: (mean loss over ranks, learning rate)."""
    cfg, task = r.cfg, r.task
    lr = lr_at(step, cfg)
    for g in r.opt.param_groups:
        g["lr"] = lr
    batch = task.train_batch(step, cfg.batch_size)  # the global batch for this step, (batch_size, L) on CPU
    step_loss = torch.zeros((), device=r.device)
    # forward/backward over micro-steps; DDP all-reduces only on the last
    for m in range(cfg.grad_accum):
        lo = (m * r.world + r.rank) * r.micro  # this rank's rows
        b = batch[lo : lo + r.micro].to(r.device, non_blocking=True)  # (micro, L)
        sync = m == cfg.grad_accum - 1
        tgt = task.targets(b)  # outside autocast: the same float32 targets as evaluate()
        with (r.ddp.no_sync() if r.ddp is not None and not sync else nullcontext()), _autocast(r.device):
            logits = logits_of(r.net, task.inputs(b))  # (micro, T, V)
            loss = task.loss(logits, tgt) / cfg.grad_accum
        loss.backward()
        step_loss += loss.detach()
        r.tokens_seen += task.inputs(b).numel() * r.world
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(r.params, cfg.grad_clip)
    r.opt.step()
    r.opt.zero_grad(set_to_none=True)
    if r.ddp is not None:
        dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
    return step_loss.item(), lr


def train(model: nn.Module, task: Task, cfg: TrainConfig, log_path: Path | None = None) -> dict:
    """Train the trainable parameters of ``model`` (the LoRA factors) on ``task``.

    Returns a summary: initial and final held-out metrics, tokens/s, steps. Works in a single
    process or under torchrun (see the module docstring).
    """
    r = _setup(model, task, cfg)
    main = r.rank == 0
    log = _Log(log_path if main else None)
    try:
        log(event="config", **{**asdict(cfg), "threads": torch.get_num_threads(), "world_size": r.world,
                               "device": str(r.device), "n_trainable": sum(p.numel() for p in r.params)})
        first = evaluate(model, task, r.device, cfg.eval_batch) if main else {}  # rank 0 evaluates
        log(event="eval", step=0, **first)
        last = first
        loss_val = float("nan")
        t0 = time.perf_counter()
        with _progress(cfg.progress and main, cfg.steps) as bar:
            job = bar.add_task("train", total=cfg.steps, loss=float("nan"), tps=0.0) if bar else None
            for step in range(cfg.steps):
                loss_val, lr = _step(r, step)
                elapsed = time.perf_counter() - t0
                tps = r.tokens_seen / max(elapsed, 1e-9)
                log(event="train", step=step + 1, loss=loss_val, lr=lr, tokens=r.tokens_seen, tokens_per_s=tps, elapsed_s=elapsed)
                if bar:
                    bar.update(job, advance=1, loss=loss_val, tps=tps)
                if main and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.steps):
                    last = evaluate(model, task, r.device, cfg.eval_batch)
                    log(event="eval", step=step + 1, **last)
        elapsed = time.perf_counter() - t0
        summary = {"steps": cfg.steps, "world_size": r.world, "tokens": r.tokens_seen, "elapsed_s": elapsed,
                   "tokens_per_s": r.tokens_seen / max(elapsed, 1e-9), "train_loss": loss_val,
                   "initial": first, "final": last}
        log(event="done", **summary)
    finally:
        log.close()
    return summary


def _progress(enabled: bool, total: int):
    """A rich progress bar on stderr showing loss and tokens/s (or a no-op context)."""
    if not enabled:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"), TimeRemainingColumn(),
        console=Console(stderr=True), transient=False,
    )
