"""Re-evaluate a training output directory and rewrites of its adapter on the task's held-out data.

For each adapter the dense update ΔW of every module (``Module.delta()``, float64, scale applied) is
merged into a copy of the base weights, W ← W + ΔW, and the merged model is run on the held-out set.
Reported per adapter:

- ``loss`` — the task's objective (planted: KL(teacher ‖ model); text: next-byte cross-entropy);
- ``perplexity`` — exp(cross-entropy) (planted: cross-entropy to the teacher's distribution);
- ``kl_to_first`` — mean over positions of KL(first ‖ this), the first adapter being DIR's own;
- ``top1_agreement`` — fraction of positions where this adapter's argmax equals the first's;

and ``base_loss``, the same objective for the base model without any adapter.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InspectError
from .lora import merge
from .loop import resolve_device
from .model import is_own_model_dir, load_base, load_model, logits_of
from .run import read_task_json
from .tasks import Task, TextTask, _HeldoutText, load_task

__all__ = ["verify", "VERIFY_SCHEMA", "load_run", "adapter_deltas"]

VERIFY_SCHEMA = "lora-inspect/verify/1"
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_")


def load_run(directory: str | Path) -> tuple[nn.Module, dict, Task]:
    """(base model, task.json contents, task) for a training output directory."""
    out = Path(directory)
    if not out.is_dir():
        raise InspectError(f"{out}: no such directory")
    desc = read_task_json(out)
    if (out / "base").is_dir() and is_own_model_dir(out / "base"):
        base = load_model(out / "base")
    elif (out / "base.json").is_file():
        try:
            info = json.loads((out / "base.json").read_text())
            path = info["path"]
        except (ValueError, KeyError) as e:
            raise InspectError(f"{out}/base.json: bad base record ({e})") from None
        base, _ = load_base(path)
    else:
        raise InspectError(f"{out}: no base/ model directory and no base.json")
    base.eval().requires_grad_(False)
    return base, desc, load_task(out, desc, base)


def adapter_deltas(path: str | Path, weight_names: set[str]) -> dict[str, torch.Tensor]:
    """{module path: ΔW float64} for a PEFT directory or kohya file read with the project's loader.

    ``weight_names`` are the base model's module paths that have a ``.weight``; kohya names are
    mapped back through ``prefix + path.replace('.', '_')``.
    """
    from ..formats import load_adapter

    ad = load_adapter(path)
    if ad.use_dora or any(m.is_dora for m in ad.modules):
        raise InspectError(f"{path}: DoRA adapters are not supported by verify (W + ΔW would ignore the magnitude)")
    if ad.extras:
        raise InspectError(f"{path}: holds full tensors ({ad.extras[0]}…) that verify cannot apply; only low-rank modules")
    if not ad.modules:
        raise InspectError(f"{path}: no LoRA modules")
    kohya = {p + n.replace(".", "_"): n for p in KOHYA_PREFIXES for n in weight_names}
    out: dict[str, torch.Tensor] = {}
    for m in ad.modules:
        if m.kind == "conv":
            raise InspectError(f"{path}: module {m.name} is a convolution; the base model has none")
        if m.bias_key is not None:
            raise InspectError(f"{path}: module {m.name} has a LoRA bias, which verify does not apply")
        name = m.name
        if name.startswith("base_model.model."):
            name = name[len("base_model.model.") :]
        target = name if name in weight_names else kohya.get(name)
        if target is None:
            raise InspectError(f"{path}: module {m.name!r} is not a module of the base model")
        if target in out:
            raise InspectError(f"{path}: two modules map onto {target!r}")
        out[target] = m.delta(torch.float64)
    return out


@torch.no_grad()
def _run(model: nn.Module, task: Task, device: torch.device, batch: int) -> torch.Tensor:
    """Log-probs (N, T, V) float32 of ``model`` on the held-out inputs."""
    outs = []
    for i in range(0, len(task.heldout), batch):
        b = task.heldout[i : i + batch].to(device)
        outs.append(F.log_softmax(logits_of(model, task.inputs(b)).float(), dim=-1).cpu())
    return torch.cat(outs)


def verify(directory: str | Path, adapters: list[str | Path] = (), data: str | Path | None = None,
           device: str = "cpu", batch: int = 16) -> dict:
    """Evaluate DIR's adapter, then each of ``adapters``, on DIR's held-out data (or ``data``)."""
    out = Path(directory)
    base, desc, task = load_run(out)
    if data is not None:
        if desc.get("task") != "text":
            raise InspectError("--data applies to text tasks only; a planted task is evaluated on its own held-out set")
        p = Path(str(data))
        if not p.is_file():
            raise InspectError(f"--data {p}: no such file")
        ids = torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8).long()
        task = _HeldoutText(TextTask.windows(ids, int(desc["seq_len"]), n_max=1 << 30), int(desc["seq_len"]))
    dev = resolve_device(device)
    base.to(dev)
    task.to(dev)
    base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    weight_names = {k[: -len(".weight")] for k in base_sd if k.endswith(".weight")}

    # targets once: teacher log-probs (planted) or next bytes (text)
    tgt = torch.cat([task.targets(task.heldout[i : i + batch].to(dev)).cpu() for i in range(0, len(task.heldout), batch)])

    def score(logp: torch.Tensor) -> tuple[float, float]:
        # log_softmax is idempotent, so log-probs can stand in for logits
        loss = task.loss(logp, tgt).item()
        ce = task.cross_entropy(logp, tgt).item()
        return loss, ce

    base_loss, _ = score(_run(base, task, dev, batch))

    # DIR's own adapter goes through the same reader as every other one
    specs: list[tuple[str, dict[str, torch.Tensor]]] = [(str(out), adapter_deltas(out, weight_names))]
    for a in adapters:
        specs.append((str(a), adapter_deltas(a, weight_names)))

    results = []
    first: torch.Tensor | None = None
    for label, deltas in specs:
        base.load_state_dict(merge(base_sd, deltas))
        logp = _run(base, task, dev, batch)  # (N, T, V)
        loss, ce = score(logp)
        if first is None:
            first = logp
        kl = F.kl_div(logp.flatten(0, -2), first.flatten(0, -2), log_target=True, reduction="batchmean").item()
        agree = (logp.argmax(-1) == first.argmax(-1)).float().mean().item()
        results.append({"adapter": label, "loss": loss, "perplexity": math.exp(min(ce, 700.0)),
                        "kl_to_first": max(kl, 0.0), "top1_agreement": agree})
    base.load_state_dict(base_sd)
    return {"schema": VERIFY_SCHEMA, "task": desc.get("task"), "base_loss": base_loss, "results": results}
