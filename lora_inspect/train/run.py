"""One training run end to end: base → task → LoRA → loop → output directory.

The output directory holds everything needed to re-evaluate the run:

- ``adapter_config.json`` + ``adapter_model.safetensors`` — the adapter, PEFT layout, top level;
- ``base/config.json`` + ``base/model.safetensors`` — our base model, or ``base.json`` with the
  path of a local Hugging Face directory;
- ``task.json`` — the task definition, training settings and result summary;
- ``heldout.safetensors`` — the fixed held-out token ids; ``teacher_delta.safetensors`` (planted);
- ``log.jsonl`` — one JSON object per step / eval.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import InspectError
from ..files import os_error
from .io import atomic_write_json
from .loop import TrainConfig, cpu_threads, resolve_device, train
from .lora import adapter_config, inject_lora, save_adapter
from .model import ModelConfig, load_base, save_model
from .tasks import PlantedTask, Task, TextTask

__all__ = ["run_training", "DEFAULT_TARGETS", "ALL_LINEAR", "check_out_dir"]

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InspectError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InspectError(f"--out {out}: directory is not empty", hint="pass --force to overwrite")


def run_training(
    out: str | Path,
    *,
    task: str = "planted",
    data: str | Path | None = None,
    planted_rank: int = 4,
    rank: int = 8,
    alpha: float | None = None,
    rslora: bool = False,
    dropout: float = 0.0,
    targets: list[str] | str | None = None,
    model: str = "tiny",
    seq_len: int = 64,
    force: bool = False,
    train_cfg: TrainConfig | None = None,
) -> dict:
    """Train one adapter and write the output directory; returns the loop's summary.

    ``alpha`` defaults to ``rank`` (scale 1). Under torchrun only rank 0 writes files. Everything is
    checked (options, device, base, data, targets) before the output directory is touched. Torch runs
    on ``train_cfg.threads`` CPU threads (default :func:`~lora_inspect.train.loop.default_threads`),
    restored afterwards.
    """
    cfg = train_cfg or TrainConfig()
    out = Path(out)
    # under torchrun the loop joins the process group later: until then RANK says who we are
    is_main = dist.get_rank() == 0 if dist.is_initialized() else int(os.environ.get("RANK", "0")) == 0
    if is_main:
        check_out_dir(out, force)
    targets = list(DEFAULT_TARGETS) if targets is None else targets
    alpha = float(rank if alpha is None else alpha)
    _check_args(task, data, rank, alpha, seq_len)
    resolve_device(cfg.device)  # an unknown or absent device is refused before anything is written
    base, base_info = load_base(model, seed=cfg.seed)
    _check_seq_len(base, seq_len)
    with cpu_threads(cfg, _model_dim(base)):
        base.eval()
        base.requires_grad_(False)
        base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
        # the task (the teacher is a copy of the base, made before LoRA goes in)
        t: Task
        if task == "planted":
            t = PlantedTask(base, targets, planted_rank, seed=cfg.seed, seq_len=seq_len)
        else:
            t = TextTask(data, seed=cfg.seed, seq_len=seq_len, vocab=_vocab_size(base))
        # LoRA factors: A from a seeded RNG (same on every rank), B = 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed * 7919 + 1)
            wrapped = inject_lora(base, targets, rank, alpha, dropout=dropout, rslora=rslora)
        base.train()
        if is_main:
            _make_dir(out)
            _clear_previous(out)
        summary = train(base, t, cfg, log_path=out / "log.jsonl" if is_main else None)
    if is_main:
        lora = {"r": rank, "alpha": alpha, "rslora": rslora, "dropout": dropout, "targets": targets, "modules": wrapped}
        _write_outputs(out, base, base_info, base_sd, t, cfg, lora, summary)
    if dist.is_initialized():  # every rank returns once rank 0 has written: none tears the group down under it
        dist.barrier()
    return summary


def _check_args(task: str, data: str | Path | None, rank: int, alpha: float, seq_len: int) -> None:
    if task not in ("planted", "text"):
        raise InspectError(f"--task {task!r}: use planted or text")
    if task == "planted" and data is not None:
        raise InspectError("--data is for --task text only")
    if task == "text" and data is None:
        raise InspectError("--task text needs --data FILE")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InspectError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise InspectError(f"LoRA alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise InspectError(f"sequence length must be a positive integer, got {seq_len!r}")


def _model_dim(base: nn.Module) -> int | None:
    cfg = getattr(base, "config", None)
    v = getattr(cfg, "dim", None) or getattr(cfg, "hidden_size", None)
    return int(v) if isinstance(v, int) else None


def _vocab_size(base: nn.Module) -> int:
    v = getattr(getattr(base, "config", None), "vocab_size", None)
    if not isinstance(v, int):
        raise InspectError("base model has no config.vocab_size")
    return v


def _check_seq_len(base: nn.Module, seq_len: int) -> None:
    cfg = getattr(base, "config", None)
    limit = getattr(cfg, "max_seq_len", None) or getattr(cfg, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise InspectError(f"sequence length {seq_len} exceeds the base model's {limit} positions")


def _make_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(out, e) from None


def _write_outputs(out: Path, base: nn.Module, base_info: dict, base_sd: dict, t: Task, cfg: TrainConfig,
                   lora: dict, summary: dict) -> None:
    """The adapter (PEFT layout), the untouched base (or base.json), the task files and task.json."""
    hf = base_info["kind"] == "hf"
    acfg = adapter_config(r=lora["r"], alpha=lora["alpha"], targets=lora["targets"], dropout=lora["dropout"],
                          rslora=lora["rslora"], base_model_name_or_path=base_info["path"] if hf else "base",
                          task_type="CAUSAL_LM" if hf else None)
    save_adapter(base, out, acfg)
    if hf:
        atomic_write_json(base_info, out / "base.json")
    else:
        # the untouched base weights (before LoRA), in our model format
        from .model import CausalLM

        config = base.config
        assert isinstance(config, ModelConfig)
        clean = CausalLM(config)
        clean.load_state_dict(base_sd)
        save_model(clean, out / "base")
    t.save(out)
    desc = t.describe()
    desc.update(model=base_info, lora=lora, result=summary,
                train={k: v for k, v in asdict(cfg).items() if k not in ("progress", "threads")})
    atomic_write_json(desc, out / "task.json")


OUTPUT_FILES = ("adapter_config.json", "adapter_model.safetensors", "base.json", "task.json",
                "teacher_delta.safetensors", "heldout.safetensors", "log.jsonl")


def _clear_previous(out: Path) -> None:
    """With --force: remove an earlier run's files (only the names a run writes), so none is left stale."""
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    for name in ("config.json", "model.safetensors"):
        (out / "base" / name).unlink(missing_ok=True)
    if (out / "base").is_dir() and not any((out / "base").iterdir()):
        (out / "base").rmdir()


def read_task_json(out: Path) -> dict:
    """``out/task.json``, with every field that verify uses checked (one line naming the key)."""
    from ..validate import integer, number, read_json_object, string, string_list

    p = out / "task.json"
    if not p.is_file():
        raise InspectError(f"{out}: not a training output directory (no task.json)")
    desc = read_json_object(p)
    where = str(p)
    task = string(desc, "task", where)
    if task not in ("planted", "text"):
        raise InspectError(f"{where}: task must be 'planted' or 'text', found {task!r}")
    integer(desc, "seq_len", where, minimum=1)
    if task == "planted":
        integer(desc, "planted_rank", where, minimum=1)
        integer(desc, "seed", where, default=0, minimum=0)
        number(desc, "strength", where, default=4.0, positive=True)
        if string_list(desc, "targets", where) is None:
            raise InspectError(f"{where}: targets is missing")
    else:
        string(desc, "sha256", where)
    return desc
