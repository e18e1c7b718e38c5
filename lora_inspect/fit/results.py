"""What ``fit`` returns: one :class:`FitModule` per module or full tensor, and the :class:`FitResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..kinds import Algo, Choice, Kind

if TYPE_CHECKING:  # pragma: no cover
    from ..checks.applied import AppliedReport
    from ..checks.result import Result
    from ..hf.verify import HFVerifyResult

__all__ = ["Action", "FitModule", "FitResult"]


class Action(Choice):
    """What ``fit`` did to a module (docs/serving.md, "fit")."""

    KEPT = "kept"  # a LoRA pair within the rank limit: its factors written unchanged
    TRUNCATED = "truncated"  # a LoRA pair above the limit: its best rank-R approximation (Eckart–Young)
    AS_LORA = "as LoRA"  # LoHa, LoKr, Tucker LoCon, full ΔW: its exact LoRA (or best rank R of it)
    FOLDED = "DoRA folded"  # DoRA: plain LoRA of m ⊙ (W + s·BA)/‖W + s·BA‖_row − W at rank R (needs --base)
    FACTORED = "delta as LoRA"  # a full tensor (modules_to_save): LoRA of W_saved − W at rank R (needs --base)
    CARRIED = "carried"  # a full tensor the engine takes as it is (vLLM: classifier, score)
    DROPPED = "dropped"  # nothing the engine applies could hold it


@dataclass
class FitModule:
    """One module (or full tensor) of the source and what became of it. Energies are ‖·‖²_F in float64."""

    name: str
    kind: Kind
    algo: Algo
    shape: tuple[int, int]
    rank_in: int  # 0 for a full tensor
    rank_out: int  # 0 when dropped or carried
    action: Action
    energy: float | None  # ‖ΔW_eff‖²_F of the source (None: a full tensor's ΔW without --base)
    kept: float  # ‖ΔW′‖²_F of what is written
    rel_error: float | None  # ‖ΔW_eff − ΔW′‖_F / ‖ΔW_eff‖_F (1 when dropped; None when unknown)
    optimum: float | None  # the Eckart–Young optimum √(Σ_{i>k} σᵢ²/Σ σᵢ²) at rank_out
    reason: str = ""  # why it was dropped, or how it was changed
    target: str = ""  # the name it is written under ("" when dropped)


@dataclass
class FitResult:
    source: Path
    source_format: str
    engine: str
    max_rank: int | None
    output: Path
    target: str  # the layout written (peft, gguf, mlx, diffusers, kohya)
    dtype: str
    modules: list[FitModule]
    notes: list[str] = field(default_factory=list)
    check_error: float = 0.0  # the write's self-check: worst relative ΔW error after re-reading
    serving: list["Result"] = field(default_factory=list)  # check OUT --serving ENGINE
    applied: "AppliedReport | None" = None  # check --applied ENGINE OUT
    verify: "HFVerifyResult | None" = None  # --base HF_DIR --data FILE: the original first, the fitted second

    @property
    def total_energy(self) -> float:
        """Σ‖ΔW‖²_F over every module whose energy is known."""
        return sum(m.energy for m in self.modules if m.energy is not None)

    @property
    def kept_energy(self) -> float:
        return sum(m.kept for m in self.modules if m.energy is not None)

    @property
    def kept_share(self) -> float:
        """The share of ‖ΔW‖² written (1 for an all-zero adapter)."""
        t = self.total_energy
        return 1.0 if not t > 0 else min(self.kept_energy / t, 1.0)

    @property
    def unknown(self) -> list[str]:
        """Modules whose ΔW is unknown (full tensors without --base)."""
        return [m.name for m in self.modules if m.energy is None]

    @property
    def ok(self) -> bool:
        """The output passes ``check --serving`` and ``check --applied`` (nothing dropped silently)."""
        return all(r.ok for r in self.serving) and (self.applied is None or self.applied.ok)
