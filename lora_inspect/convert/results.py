"""What ``convert`` and ``merge`` return: dataclasses for the views."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..kinds import Kind

if TYPE_CHECKING:  # pragma: no cover
    from ..formats.layout import Format

__all__ = ["ModuleOut", "ConvertResult", "MergeModule", "MergeResult"]


@dataclass
class ModuleOut:
    """One module as written: its names before and after, ranks, and what the writer did to it."""

    source: str
    target: str
    kind: Kind
    shape: tuple[int, int]
    rank_in: int
    rank_out: int
    scale_in: float
    how: list[str] = field(default_factory=list)  # "α kept", "s baked into B", "zero-padded to r=…", "Q rows permuted"
    check_error: float = 0.0  # ‖ΔW_written − ΔW‖_F / ‖ΔW‖_F after re-reading
    check: str = ""  # "identical" (bit-identical factors; only the scale's rounding) or "sketched"


@dataclass
class ConvertResult:
    source: Path
    source_format: "Format"
    output: Path
    target: str
    dtype: str
    modules: list[ModuleOut]
    files: list[str]
    output_bytes: int
    notes: list[str]
    max_check_error: float  # largest relative ΔW error found by re-reading
    max_check_ratio: float  # largest error / tolerance


@dataclass
class MergeModule:
    name: str
    kind: Kind
    shape: tuple[int, int]
    inputs: list[int]  # ranks per input (0 where the module is absent)
    rank_concat: int  # Σ rᵢ
    numerical_rank: int
    rank_out: int
    retained_energy: float
    relative_error: float
    sigma1: float
    singular_values: list[float] = field(repr=False, default_factory=list)


@dataclass
class MergeResult:
    inputs: list[Path]
    input_formats: list["Format"]
    weights: list[float]
    mode: str  # "exact", or the rank rule and its value: "rank 64", "energy 0.99", "max_params 2e+07" …
    output: Path
    target: str
    dtype: str
    modules: list[MergeModule]
    written: list[ModuleOut]
    output_bytes: int
    notes: list[str]
    max_check_error: float
    max_check_ratio: float
    method: str = "sum"  # "sum" (exact Σ wᵢΔWᵢ) or a dense method: ties, dare_linear, dare_ties, magnitude_prune
    density: float | None = None  # dense methods: the fraction of each ΔWᵢ kept
    majority_sign: str | None = None  # ties, dare_ties: "total" or "frequency"
    seed: int | None = None  # dare_linear, dare_ties: the seed of the random masks
    precision: str | None = None  # dense methods: dtype of the dense tensors ("fp64", "fp32")
