"""Re-evaluate a training output directory and rewrites of its adapter on the task's held-out data.

For each adapter the dense update ΔW of every module (``Module.delta()``, float64, scale applied) is
merged into a copy of the base weights, W ← W + ΔW, and the merged model is run on the held-out set.
Reported per adapter:

- ``loss`` — the task's objective (planted: KL(teacher ‖ model); text: next-byte cross-entropy);
- ``perplexity`` — exp(cross-entropy) (planted: cross-entropy to the teacher's distribution);
- ``kl_to_first`` — mean over positions of KL(first ‖ this), the first adapter being DIR's own;
- ``top1_agreement`` — fraction of positions where this adapter's argmax equals the first's;

and ``base_loss``, the same objective for the base model without any adapter.

Every adapter is checked against DIR before anything runs. One made for another base is refused with
one line naming the first difference: a module the base lacks or a ΔW shape that differs
(:func:`adapter_deltas`), or — for a training output directory — another ``base/config.json`` value,
other base weights or another Hugging Face base (:func:`origin_mismatch`). One trained on another task
(another kind, planted teacher or text) on the same base is evaluated, with a note: its numbers are
still its loss on DIR's held-out data, a fair question (how much does it disturb DIR's task?).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..adapter import require_mergeable
from ..arrays import to_torch
from ..errors import InspectError
from ..formats.kohya import KOHYA_PREFIXES
from ..peft_rules import strip_prefix
from .io import load_safetensors
from .loop import resolve_device
from .lora import merge
from .model import is_own_model_dir, load_base, load_model, logits_of
from .run import read_task_json
from .tasks import HeldoutText, Task, TextTask, load_task

__all__ = ["verify", "VERIFY_SCHEMA", "load_run", "adapter_deltas", "origin_mismatch"]

VERIFY_SCHEMA = "lora-inspect/verify/1"


def load_run(directory: str | Path) -> tuple[nn.Module, dict, Task]:
    """(base model, task.json contents, task) for a training output directory."""
    out = Path(directory)
    if not out.is_dir():
        raise InspectError(f"{out}: no such directory")
    desc = read_task_json(out)
    base: nn.Module
    if (out / "base").is_dir() and is_own_model_dir(out / "base"):
        base = load_model(out / "base")
    elif (out / "base.json").is_file():
        base, _ = load_base(_hf_base_path(out))
    else:
        raise InspectError(f"{out}: no base/ model directory and no base.json")
    base.eval().requires_grad_(False)
    return base, desc, load_task(out, desc, base)


def _hf_base_path(run: Path) -> str:
    """The Hugging Face base directory recorded in ``run/base.json``."""
    from ..validate import read_json_object, string

    where = str(run / "base.json")
    path = string(read_json_object(run / "base.json"), "path", where)
    if not path:
        raise InspectError(f"{where}: path is missing")
    return path


def adapter_deltas(path: str | Path, weight_shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """{module path: ΔW float64} for a PEFT directory or kohya file read with the project's loader.

    ``weight_shapes`` maps the base model's module paths that have a ``.weight`` to that weight's
    shape; kohya names are mapped back through ``prefix + path.replace('.', '_')``. A module the base
    does not have, or whose ΔW shape differs from the base weight's, is refused (one line naming the
    first such module): the adapter was made for another base.
    """
    from ..formats import load_adapter

    ad = load_adapter(path)
    require_mergeable(ad, path, "verify")
    kohya = {p + n.replace(".", "_"): n for p in KOHYA_PREFIXES for n in weight_shapes}
    out: dict[str, torch.Tensor] = {}
    for m in ad.modules:
        if m.kind == "conv":
            raise InspectError(f"{path}: module {m.name} is a convolution; the base model has none")
        if m.bias_key is not None:
            raise InspectError(f"{path}: module {m.name} has a LoRA bias, which verify does not apply")
        name = strip_prefix(m.name)
        target = name if name in weight_shapes else kohya.get(name)
        if target is None:
            raise InspectError(f"{path}: module {m.name!r} is not a module of the base model (made for another base?)")
        if target in out:
            raise InspectError(f"{path}: two modules map onto {target!r}")
        want = tuple(weight_shapes[target])
        if tuple(m.shape) != want:
            raise InspectError(f"{path}: module {m.name!r} has ΔW shape {tuple(m.shape)} but the base's weight is "
                               f"{want} (made for another base?)")
        out[target] = to_torch(m.delta(np.dtype(np.float64)))  # numpy from the adapter: torch from here on
    return out


def origin_mismatch(run: Path, desc: dict, adapter: str | Path) -> str | None:
    """Compare what ``adapter`` records about its training with ``run`` (DIR).

    An adapter that is itself a training output directory (it has ``task.json``) must have the same
    base: equal ``base/config.json`` and equal weights in ``base/model.safetensors`` (or the same
    Hugging Face path in ``base.json``); otherwise an ``InspectError`` names the first difference. Its
    task is compared too: another kind, another planted teacher (``teacher_delta.safetensors``) or
    another text (``sha256``) returns a note, since its loss on DIR's held-out data is still a
    well-defined number. Anything else (a rewrite, a kohya file) carries no such record: ``None``.
    """
    other = Path(adapter)
    if other.resolve() == run.resolve() or not (other.is_dir() and (other / "task.json").is_file()):
        return None
    theirs = read_task_json(other)
    why = _base_difference(run, other)
    if why is not None:
        raise InspectError(f"{other}: trained on another base than {run} ({why})")
    kind, their_kind = desc.get("task"), theirs.get("task")
    if kind != their_kind:
        return f"{other} was trained on the {their_kind} task; evaluated on {run}'s {kind} task"
    if kind == "text" and theirs.get("sha256") != desc.get("sha256"):
        return f"{other} was trained on another text (sha256 {str(theirs.get('sha256'))[:12]}…); evaluated on {run}'s"
    if kind == "planted" and not _same_tensors(run / "teacher_delta.safetensors", other / "teacher_delta.safetensors"):
        return f"{other} was trained to another planted teacher; evaluated on {run}'s"
    return None


def _base_difference(run: Path, other: Path) -> str | None:
    """Why the two runs' bases differ, or None when they are the same."""
    from ..validate import read_json_object

    mine_own, theirs_own = is_own_model_dir(run / "base"), is_own_model_dir(other / "base")
    if mine_own != theirs_own:
        return "one base is a lora-inspect model, the other a Hugging Face model"
    if not mine_own:
        a, b = Path(_hf_base_path(run)).resolve(), Path(_hf_base_path(other)).resolve()
        return None if a == b else f"base {b}, not {a}"
    ca, cb = read_json_object(run / "base" / "config.json"), read_json_object(other / "base" / "config.json")
    for key in sorted(set(ca) | set(cb)):
        if ca.get(key) != cb.get(key):
            return f"base/config.json {key} is {cb.get(key)!r}, not {ca.get(key)!r}"
    if not _same_tensors(run / "base" / "model.safetensors", other / "base" / "model.safetensors"):
        return "base/model.safetensors holds other weights"
    return None


def _same_tensors(a: Path, b: Path) -> bool:
    ta, tb = load_safetensors(a), load_safetensors(b)
    return ta.keys() == tb.keys() and all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta)


@torch.no_grad()
def _run(model: nn.Module, task: Task, device: torch.device, batch: int) -> torch.Tensor:
    """Log-probs (N, T, V) float32 of ``model`` on the held-out inputs."""
    outs = []
    for i in range(0, len(task.heldout), batch):
        b = task.heldout[i : i + batch].to(device)
        outs.append(F.log_softmax(logits_of(model, task.inputs(b)).float(), dim=-1).cpu())
    return torch.cat(outs)


def verify(directory: str | Path, adapters: Sequence[str | Path] = (), data: str | Path | None = None,
           device: str = "cpu", batch: int = 16, note: Callable[[str], None] | None = None) -> dict:
    """Evaluate DIR's adapter, then each of ``adapters``, on DIR's held-out data (or ``data``).

    Every adapter is checked against DIR before anything is evaluated (:func:`adapter_deltas`,
    :func:`origin_mismatch`); ``note`` receives one line per adapter trained on another task.
    """
    out = Path(directory)
    base, desc, task = load_run(out)
    if data is not None:
        task = _other_text(desc, data)
    dev = resolve_device(device)
    base.to(dev)
    task.to(dev)
    base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    shapes = {k[: -len(".weight")]: tuple(v.shape) for k, v in base_sd.items() if k.endswith(".weight")}

    # DIR's own adapter goes through the same reader as every other one
    specs: list[tuple[str, dict[str, torch.Tensor]]] = [(str(out), adapter_deltas(out, shapes))]
    for a in adapters:
        msg = origin_mismatch(out, desc, a)
        specs.append((str(a), adapter_deltas(a, shapes)))
        if msg is not None and note is not None:
            note(msg)

    # targets once: teacher log-probs (planted) or next bytes (text)
    tgt = torch.cat([task.targets(task.heldout[i : i + batch].to(dev)).cpu() for i in range(0, len(task.heldout), batch)])
    base_loss = task.loss(_run(base, task, dev, batch), tgt).item()
    results = []
    first: torch.Tensor | None = None
    for label, deltas in specs:
        base.load_state_dict(merge(base_sd, deltas))
        logp = _run(base, task, dev, batch)  # (N, T, V); log_softmax is idempotent: log-probs stand in for logits
        first = logp if first is None else first
        kl = F.kl_div(logp.flatten(0, -2), first.flatten(0, -2), log_target=True, reduction="batchmean").item()
        agree = (logp.argmax(-1) == first.argmax(-1)).float().mean().item()
        ce = task.cross_entropy(logp, tgt).item()
        results.append({"adapter": label, "loss": task.loss(logp, tgt).item(), "perplexity": math.exp(min(ce, 700.0)),
                        "kl_to_first": max(kl, 0.0), "top1_agreement": agree})
    base.load_state_dict(base_sd)
    return {"schema": VERIFY_SCHEMA, "task": desc.get("task"), "base_loss": base_loss, "results": results}


def _other_text(desc: dict, data: str | Path) -> Task:
    """DIR's text task evaluated on the windows of another text file (``--data``)."""
    if desc.get("task") != "text":
        raise InspectError("--data applies to text tasks only; a planted task is evaluated on its own held-out set")
    p = Path(str(data))
    if not p.is_file():
        raise InspectError(f"--data {p}: no such file")
    seq_len = int(desc["seq_len"])
    ids = torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8).long()
    return HeldoutText(TextTask.windows(ids, seq_len, n_max=1 << 30), seq_len)
