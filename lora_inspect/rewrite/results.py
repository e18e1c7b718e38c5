"""What ``truncate`` and ``rescale`` return: dataclasses for the views (no dicts read by key)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapter import Adapter
from .ranks import TruncateSpec

__all__ = ["ModuleChange", "ModuleRescale", "TruncateResult", "RescaleResult"]


@dataclass
class ModuleChange:
    """One module before and after truncation."""

    name: str
    type: str
    kind: str
    shape: tuple[int, int]
    rank_before: int
    rank_after: int  # directions kept
    stored_rank: int  # rank stored (≥ rank_after when padded to a uniform rank)
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    retained_energy: float
    relative_error: float
    singular_values: list[float] = field(repr=False, default_factory=list)
    # calibrated truncation only (--calibrate): retained_energy, relative_error and singular_values are
    # then those of the output (ΔW·L, L Cholesky of Σ + λI); these are the weight error ‖ΔW − ΔW_k‖_F/‖ΔW‖_F
    # and the output error plain truncation would have at the same k
    weight_error: float | None = None
    output_error_plain: float | None = None


@dataclass
class ModuleRescale:
    """One module before and after a rescale."""

    name: str
    type: str
    rank: int
    alpha_before: float
    alpha_after: float
    scale_before: float
    scale_after: float
    sigma1_before: float
    sigma1_after: float


@dataclass
class TruncateResult:
    adapter: Adapter
    output: Path
    output_format: str
    spec: TruncateSpec
    modules: list[ModuleChange]
    choice: dict[str, Any]
    file_bytes_before: int
    file_bytes_after: int
    warnings: list[str]
    notes: list[str]
    readme_copied: bool
    max_check_error: float
    calibration: dict[str, Any] | None = None  # calibrated truncation: data, tokens, ridge, objective

    @property
    def ranks(self) -> dict[str, int]:
        return {m.name: m.stored_rank for m in self.modules}


@dataclass
class RescaleResult:
    adapter: Adapter
    output: Path
    factor: float
    method: str  # "config" | "bake"
    alpha_before: float | None
    alpha_after: float | None
    modules: list[ModuleRescale]
    warnings: list[str]
    notes: list[str]
    readme_copied: bool
    max_check_error: float
