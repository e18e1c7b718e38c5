"""Training tasks: what a batch is, what the loss is, and what the held-out set is.

``planted`` — a teacher is the base model plus a ΔW of known rank K in every targeted module;
the student (base + LoRA) learns it by distillation on random token sequences, minimising
KL(teacher ‖ student) of the next-token distributions (Hinton et al. 2015, "Distilling the
Knowledge in a Neural Network", with temperature 1). A rank-r LoRA with r ≥ K can represent the
teacher exactly, so a well-trained adapter's spectrum should show ~K significant singular values.

``text`` — next-token cross-entropy on a UTF-8 text file read as bytes (vocabulary 256), with the
last ``heldout_frac`` of the file held out.

Every batch is a pure function of (seed, step): a data-parallel run slices the same global batch
that a single process would use, so both see identical data.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InspectError
from ..units import plural
from .io import atomic_save_safetensors, load_safetensors
from .lora import merge, target_matches
from .model import logits_of

__all__ = ["Task", "PlantedTask", "TextTask", "HeldoutText", "load_task"]

TASK_SCHEMA = "lora-inspect/task/1"


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


class Task:
    """The interface the loop and ``verify`` use."""

    name: str = "?"
    seq_len: int
    heldout: torch.Tensor  # (N, L) int64 token ids, fixed

    def train_batch(self, step: int, global_batch: int) -> torch.Tensor:
        """(global_batch, L) token ids for optimizer step ``step`` (CPU, deterministic)."""
        raise NotImplementedError

    def inputs(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def targets(self, batch: torch.Tensor) -> torch.Tensor:
        """What ``loss`` compares logits with: teacher log-probs (B, T, V) or next tokens (B, T)."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training objective, mean over tokens."""
        raise NotImplementedError

    def cross_entropy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (nats/token) for perplexity = exp(cross-entropy)."""
        raise NotImplementedError

    def to(self, device: torch.device) -> "Task":
        return self

    def describe(self) -> dict:
        raise NotImplementedError

    def save(self, out: Path) -> None:
        atomic_save_safetensors({"input_ids": self.heldout.to(torch.int32)}, out / "heldout.safetensors", metadata={"format": "pt"})


def _kl(logits: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) per token, averaged: Σ_v p_t (log p_t − log p_s)."""
    s_logp = F.log_softmax(logits.float(), dim=-1).flatten(0, -2)  # (B·T, V)
    return F.kl_div(s_logp, t_logp.float().flatten(0, -2), log_target=True, reduction="batchmean")


class PlantedTask(Task):
    """Distil a teacher = base + planted rank-K ΔW (per targeted module) into a LoRA student."""

    name = "planted"

    def __init__(
        self,
        base: nn.Module,
        targets,
        planted_rank: int,
        *,
        seed: int = 0,
        seq_len: int = 64,
        n_heldout: int = 64,
        strength: float = 4.0,
        deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        heldout: torch.Tensor | None = None,
    ):
        if planted_rank <= 0:
            raise InspectError(f"planted rank must be positive, got {planted_rank}")
        self.target_modules, self.planted_rank, self.seed, self.seq_len = targets, planted_rank, seed, seq_len
        self.strength = strength
        self.vocab = _vocab(base)
        linears = {n: m for n, m in base.named_modules() if isinstance(m, nn.Linear) and n and target_matches(n, targets)}
        if not linears:
            raise InspectError(f"no nn.Linear module matches targets {targets!r}")
        if deltas is None:
            deltas = {n: self._plant(m.weight.detach(), planted_rank, _gen(seed * 7919 + 2 + i)) for i, (n, m) in enumerate(linears.items())}
        self.deltas = deltas  # path → (B_t (out, K), A_t (K, in)), ΔW = B_t @ A_t
        # The teacher: a frozen copy of the base with W + ΔW merged in.
        self.teacher = copy.deepcopy(base).eval().requires_grad_(False)
        dense = {n: (b.double() @ a.double()) for n, (b, a) in deltas.items()}
        self.teacher.load_state_dict(merge(self.teacher.state_dict(), dense))
        if heldout is None:
            heldout = torch.randint(0, self.vocab, (n_heldout, seq_len), generator=_gen(seed * 7919 + 4))
        self.heldout = heldout.long()

    def _plant(self, w: torch.Tensor, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW = U diag(σ) Vᵀ with random orthonormal U (out, K), V (in, K) (QR of a Gaussian) and
        σ_i = strength · ‖W‖_F/√min(out, in) · (1 − 0.5·i/K): K clearly separated values, ``strength``
        times W's root-mean-square singular value."""
        out_f, in_f = w.shape
        if k > min(out_f, in_f):
            raise InspectError(f"planted rank {k} exceeds module size {tuple(w.shape)}")
        u, _ = torch.linalg.qr(torch.randn(out_f, k, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(in_f, k, generator=g, dtype=torch.float64))
        typical = w.double().norm() / (min(out_f, in_f) ** 0.5)
        sig = self.strength * typical * (1.0 - 0.5 * torch.arange(k, dtype=torch.float64) / k)
        return (u * sig).float(), v.T.contiguous().float()

    def to(self, device: torch.device) -> "PlantedTask":
        self.teacher.to(device)
        return self

    def train_batch(self, step: int, global_batch: int) -> torch.Tensor:
        return torch.randint(0, self.vocab, (global_batch, self.seq_len), generator=_gen(self.seed * 7919 + 3 + 1_000_003 * (step + 1)))

    @torch.no_grad()
    def targets(self, batch: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(logits_of(self.teacher, batch).float(), dim=-1)  # (B, T, V)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _kl(logits, target)

    def cross_entropy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        s_logp = F.log_softmax(logits.float(), dim=-1)
        return -(target.exp() * s_logp).sum(-1).mean()

    def describe(self) -> dict:
        return {
            "schema": TASK_SCHEMA,
            "task": "planted",
            "planted_rank": self.planted_rank,
            "targets": self.target_modules,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "strength": self.strength,
            "teacher": "W_teacher = W_base + delta_B @ delta_A per module (teacher_delta.safetensors)",
            "loss": "KL(teacher || student) nats/token; perplexity = exp(cross-entropy to the teacher)",
        }

    def save(self, out: Path) -> None:
        super().save(out)
        t = {}
        for n, (b, a) in self.deltas.items():
            t[f"{n}.delta_B"] = b.contiguous()
            t[f"{n}.delta_A"] = a.contiguous()
        atomic_save_safetensors(t, out / "teacher_delta.safetensors", metadata={"format": "pt"})  # one key: safetensors orders metadata unpredictably


def _vocab(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    v = getattr(cfg, "vocab_size", None)
    if v is None:
        raise InspectError("base model has no config.vocab_size")
    return int(v)


class TextTask(Task):
    """Next-token prediction on bytes of a UTF-8 text file; the last ``heldout_frac`` is held out."""

    name = "text"

    def __init__(self, data: str | Path | None, *, seed: int = 0, seq_len: int = 64, heldout_frac: float = 0.1,
                 n_heldout: int = 64, vocab: int = 256, text: bytes | None = None, heldout: torch.Tensor | None = None):
        if vocab < 256:
            raise InspectError(f"the text task needs a vocabulary of at least 256 (bytes), the model has {vocab}")
        self.seed, self.seq_len, self.heldout_frac = seed, seq_len, heldout_frac
        self.data_path = str(data) if data is not None else None
        if text is None:
            p = Path(str(data))
            if not p.is_file():
                raise InspectError(f"--data {p}: no such file")
            text = p.read_bytes()
            try:
                text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InspectError(f"--data {p}: not UTF-8 text (byte {e.start})") from None
        self.sha256 = hashlib.sha256(text).hexdigest()
        ids = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
        n_hold = int(len(ids) * heldout_frac)
        self.train_ids = ids[: len(ids) - n_hold]
        if len(self.train_ids) < 2 * (seq_len + 1):
            raise InspectError(f"text too short ({plural(len(ids), 'byte')}) for seq_len {seq_len}")
        if heldout is None:
            heldout = self.windows(ids[len(ids) - n_hold :], seq_len, n_heldout)
        self.heldout = heldout.long()

    @staticmethod
    def windows(ids: torch.Tensor, seq_len: int, n_max: int) -> torch.Tensor:
        """Non-overlapping windows of seq_len + 1 bytes: (N, seq_len + 1)."""
        n = min(n_max, len(ids) // (seq_len + 1))
        if n == 0:
            raise InspectError(f"held-out text ({plural(len(ids), 'byte')}) is shorter than one window of {seq_len + 1}")
        return ids[: n * (seq_len + 1)].view(n, seq_len + 1)

    def train_batch(self, step: int, global_batch: int) -> torch.Tensor:
        g = _gen(self.seed * 7919 + 3 + 1_000_003 * (step + 1))
        starts = torch.randint(0, len(self.train_ids) - self.seq_len - 1, (global_batch,), generator=g)
        return torch.stack([self.train_ids[s : s + self.seq_len + 1] for s in starts.tolist()])  # (B, L+1)

    def inputs(self, batch: torch.Tensor) -> torch.Tensor:
        return batch[:, :-1]

    def targets(self, batch: torch.Tensor) -> torch.Tensor:
        return batch[:, 1:]

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), target.flatten())

    cross_entropy = loss

    def describe(self) -> dict:
        return {
            "schema": TASK_SCHEMA,
            "task": "text",
            "data": self.data_path,
            "sha256": self.sha256,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "heldout_frac": self.heldout_frac,
            "loss": "next-byte cross-entropy nats/token; perplexity = exp(loss)",
        }


def load_task(out: Path, desc: dict, base: nn.Module) -> Task:
    """Rebuild the task recorded in ``out/task.json`` (``desc``) around ``base``."""
    hp = out / "heldout.safetensors"
    if not hp.is_file():
        raise InspectError(f"{out}: missing heldout.safetensors")
    heldout = load_safetensors(hp).get("input_ids")
    if heldout is None:
        raise InspectError(f"{hp}: no input_ids tensor")
    heldout = heldout.long()
    kind = desc.get("task")
    try:
        return _load_task(out, desc, base, kind, heldout)
    except (KeyError, ValueError, TypeError) as e:
        raise InspectError(f"{out}: task files are incomplete or inconsistent ({type(e).__name__}: {e})") from None


def _load_task(out: Path, desc: dict, base: nn.Module, kind, heldout: torch.Tensor) -> Task:
    if kind == "planted":
        tp = out / "teacher_delta.safetensors"
        if not tp.is_file():
            raise InspectError(f"{out}: planted task without teacher_delta.safetensors")
        t = load_safetensors(tp)
        deltas = {k[: -len(".delta_B")]: (v, t[k[: -len(".delta_B")] + ".delta_A"]) for k, v in t.items() if k.endswith(".delta_B")}
        return PlantedTask(base, desc["targets"], int(desc["planted_rank"]), seed=int(desc.get("seed", 0)),
                           seq_len=int(desc["seq_len"]), strength=float(desc.get("strength", 4.0)), deltas=deltas, heldout=heldout)
    if kind == "text":
        return HeldoutText(heldout, int(desc["seq_len"]))
    raise InspectError(f"{out}/task.json: unknown task {kind!r}")


class HeldoutText(TextTask):
    """A text task known only by its held-out windows (what ``verify`` needs)."""

    def __init__(self, heldout: torch.Tensor, seq_len: int):
        self.seq_len, self.heldout = seq_len, heldout.long()

    def train_batch(self, step, global_batch):  # pragma: no cover - verify never trains
        raise InspectError("this task was loaded for evaluation only")
