"""What ``extract`` returns (dataclasses for the views: :mod:`lora_inspect.views.extract`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["ExtractSpec", "ExtractedModule", "SetAside", "ExtractResult", "Embeddings", "Mode"]

Embeddings = Literal["save", "lora", "skip"]
Mode = Literal["rank", "energy", "max_size"]


@dataclass
class ExtractSpec:
    """What to keep: exactly one of ``rank``, ``energy``, ``max_bytes``; where and how to write it."""

    rank: int | None = None
    energy: float | None = None
    max_bytes: int | None = None
    to: str | None = None  # the output layout (default: PEFT for transformers, kohya for image checkpoints)
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    embeddings: Embeddings = "save"
    seed: int = 0

    @property
    def mode(self) -> Mode:
        if self.rank is not None:
            return "rank"
        return "energy" if self.energy is not None else "max_size"


@dataclass
class ExtractedModule:
    """One LoRA module: ΔW of ``name`` approximated at ``rank``."""

    name: str  # the module as the output names it
    kind: str  # linear | conv | embedding
    shape: tuple[int, int]  # ΔW (out, in·kh·kw)
    rank: int
    energy: float  # Σ_{i≤k} σᵢ² / ‖ΔW‖²_F (retained energy)
    rel_error: float  # ‖ΔW − B·A‖_F / ‖ΔW‖_F of the factors as written (their rounding included)
    rel_optimum: float  # the Eckart–Young optimum's relative error at this rank, lower bound (certified)
    route: str  # exact | randomized
    ratio_bound: float  # certified ‖ΔW − B·A‖_F / optimum (before the storage rounding)
    share: float  # this tensor's ‖ΔW‖²_F over the whole checkpoint's change
    seconds: float = 0.0


@dataclass
class SetAside:
    """A changed tensor that is not a LoRA module: carried as a full tensor, or dropped, and why."""

    name: str  # the tensor's key
    role: str  # vector | embedding | head | other | linear/conv without a module name
    action: Literal["saved", "dropped"]
    why: str
    share: float  # its ‖Δ‖² over the whole checkpoint's change
    numel: int = 0


@dataclass
class ExtractResult:
    base: Path
    tuned: Path
    out: Path
    target: str  # the layout written
    family: str
    dtype: str
    mode: Mode
    modules: list[ExtractedModule]
    set_aside: list[SetAside]
    unchanged: int  # tensors with no change
    total_energy: float  # Σ ‖Δ‖²_F over every changed float tensor
    size: int  # bytes written
    files: list[str]
    seconds: float
    peak_rss: int  # bytes, the process's high-water mark (ru_maxrss)
    largest_tensor: int  # bytes, the largest tensor of either checkpoint as stored
    notes: list[str] = field(default_factory=list)
    budget: dict[str, Any] = field(default_factory=dict)
    check_error: float = 0.0  # worst relative ΔW difference between the file re-read and the factors

    @property
    def kept_share(self) -> float:
        """The share of the whole checkpoint's ‖Δ‖² that the output reproduces (LoRA modules' retained
        energy, full tensors carried whole)."""
        lora = sum(m.share * (1.0 - m.rel_error ** 2) for m in self.modules)
        return lora + sum(s.share for s in self.set_aside if s.action == "saved")
