"""Calibrated truncation: per module, the rank-k ΔW_k that minimises the *output* error on data,
‖(ΔW − ΔW_k) Xᵀ‖_F, instead of the weight error ‖ΔW − ΔW_k‖_F.

With Σ = XᵀX/n the second moment of the module's input (n rows x of dimension ``in``) and
L the lower Cholesky factor of Σ + λI, ‖(ΔW − M)Xᵀ‖²_F/n = ‖(ΔW − M)L‖²_F − λ‖ΔW − M‖²_F, and the ridge
objective ‖(ΔW − M)L‖_F is minimised over rank-k M by M = [ΔW L]_k L⁻¹ (Eckart–Young on ΔW·L, L
invertible). This is the whitening of SVD-LLM (Wang et al. 2024, "SVD-LLM: truncation-aware singular
value decomposition", Cholesky of XᵀX) and of ASVD (Yuan et al. 2023, activation-aware SVD), applied
to the low-rank update rather than to W. In factor space: ΔW·L = s·B(A L), so the QR + r×r core SVD of
``spectrum.decompose`` on (B, A·L) gives the whitened spectrum σ̃ and factors B′, C with B′C = [ΔW L]_k;
then A′ = C L⁻¹ (a triangular solve). Costs per module: one in×in Cholesky, A·L (r·in²), the solve
(k·in²).

Ridge: λ = ``ridge`` · tr(Σ)/in (relative to the mean input energy; default :data:`DEFAULT_RIDGE`),
which keeps L invertible when the data do not span the input space (fewer tokens than ``in``,
dead features) and pulls directions the data never excite back towards the plain (weight-error)
choice. Budgets (``--energy``, ``--max-params``) rank modules by the whitened spectrum, i.e. by output
energy (:mod:`.ranks`). Every module's output error, weight error and plain truncation's output error
are reported, all relative (to ‖ΔW L‖_F and ‖ΔW‖_F).

A torch engine, like the moments it takes (:mod:`lora_inspect.hf.collect`): the Cholesky factor, the
triangular solve and the error norms are torch (imported inside the functions); the factors, the
decompositions (:func:`lora_inspect.spectrum.decompose`) and what goes to :mod:`.truncation` are numpy,
converted at the door (:func:`lora_inspect.arrays.to_torch` / :func:`~lora_inspect.arrays.from_torch`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..adapter import Adapter, Module
from ..arrays import from_torch, to_torch
from ..errors import InspectError
from ..formats import check_output, layout_of, refuse_inexpressible
from ..formats.layout import Format, Layout
from ..spectrum import Decomposition, decompose
from .ranks import TruncateSpec, choose_ranks
from .results import TruncateResult
from .selfcheck import Expected, write_checked
from .tensors import extras_tensors
from .truncation import (
    Factored,
    assemble,
    rank_independent_bytes,
    to_stored,
    truncation_warnings,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["DEFAULT_RIDGE", "CalibratedModule", "whiten", "calibrated_factors", "calibrated_truncate", "calibration_target",
           "ridge_cholesky"]

DEFAULT_RIDGE = 1e-2


def ridge_cholesky(sigma: torch.Tensor | np.ndarray, ridge: float) -> tuple[torch.Tensor, float]:
    """(L lower with LLᵀ = Σ + λI, λ) in float64 torch; λ = ridge·tr(Σ)/in (ridge itself if Σ = 0)."""
    import torch

    s = torch.as_tensor(sigma).to(torch.float64)
    n = s.shape[0]
    mean = float(torch.trace(s)) / n
    lam = ridge * mean if mean > 0 else max(ridge, 1e-12)
    low, info = torch.linalg.cholesky_ex(s + lam * torch.eye(n, dtype=torch.float64))
    if int(info) != 0:
        raise InspectError(f"the input second moment is not positive semi-definite (Cholesky failed at {int(info)})")
    return low, lam


@dataclass
class CalibratedModule:
    module: Module
    chol: torch.Tensor  # (in, in) lower Cholesky factor of Σ + λI, float64
    decomp: Decomposition  # of (s·B, A·L): the whitened spectrum (numpy)
    b: torch.Tensor  # s·B (out, r) float64
    a: torch.Tensor  # A (r, in) float64

    @property
    def spectrum(self) -> np.ndarray:
        sv = np.zeros(self.module.rank)
        sv[: self.decomp.s.shape[0]] = self.decomp.s
        return sv


def whiten(m: Module, sigma: torch.Tensor, ridge: float) -> CalibratedModule:
    """The module's factors and the decomposition of ΔW·L (see the module docstring)."""
    if tuple(sigma.shape) != (m.shape[1], m.shape[1]):
        raise InspectError(f"module {m.name}: input moment is {tuple(sigma.shape)}, expected in×in = {m.shape[1]}")
    b_np, a_np = m.factors(np.float64)
    b, a = to_torch(b_np), to_torch(a_np)
    low, _ = ridge_cholesky(sigma, ridge)
    try:
        d = decompose(b_np, from_torch(a @ low), m.scale)
    except ValueError:
        raise InspectError(f"module {m.name!r} holds NaN/inf values: refusing to rewrite a corrupt adapter") from None
    return CalibratedModule(m, low, d, b * m.scale, a)


def calibrated_factors(c: CalibratedModule, keep: int, stored: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(B′, A′) float64 numpy, linear orientation, with B′A′ = [ΔW L]_keep L⁻¹ (zero columns past ``keep``)."""
    import torch

    b1, cw = c.decomp.factors(keep, stored)
    a1 = torch.linalg.solve_triangular(c.chol.T, to_torch(cw.astype(np.float64)).T, upper=True).T  # C L⁻¹
    return b1.astype(np.float64), from_torch(a1)


def _diff_norm(left_a: torch.Tensor, right_a: torch.Tensor, left_b: torch.Tensor, right_b: torch.Tensor,
               low: torch.Tensor | None) -> float:
    """‖(left_a right_a − left_b right_b) L‖_F (L = I when None) through a QR of [left_a, −left_b]."""
    import torch

    left = torch.cat([left_a, -left_b], 1)
    right = torch.cat([right_a, right_b], 0)
    if low is not None:
        right = right @ low
    r = torch.linalg.qr(left, mode="r").R
    return float(torch.linalg.norm(r @ right))


def module_errors(c: CalibratedModule, keep: int) -> tuple[float, float, float]:
    """(output error, weight error, plain truncation's output error), each relative."""
    b1, a1 = (to_torch(x) for x in calibrated_factors(c, keep))
    w_norm = _diff_norm(c.b, c.a, c.b[:, :0], c.a[:0], None)
    o_norm = float(np.sqrt(np.sum(np.square(c.decomp.s))))
    if not (w_norm > 0 and o_norm > 0):
        return 0.0, 0.0, 0.0
    out = _diff_norm(c.b, c.a, b1, a1, c.chol) / o_norm
    weight = _diff_norm(c.b, c.a, b1, a1, None) / w_norm
    bp, ap = decompose(from_torch(c.b), from_torch(c.a), 1.0).factors(keep)
    plain = _diff_norm(c.b, c.a, to_torch(bp.astype(np.float64)), to_torch(ap.astype(np.float64)), c.chol) / o_norm
    return out, weight, plain


def _check_moments(ad: Adapter, moments: dict[str, torch.Tensor]) -> None:
    missing = [m.name for m in ad.modules if m.name not in moments]
    if missing:
        raise InspectError(f"{ad.path}: no calibration data reached module {missing[0]!r}")


def calibration_target(ad: Adapter, out: Path, force: bool = False) -> tuple[Layout, Format]:
    """The layout and format a calibrated truncation of ``ad`` writes to ``out``, after refusing in one line
    what it cannot write: an existing OUT without ``force``, DoRA and AdaLoRA, and (as truncate does) what
    that layout cannot hold (:func:`~lora_inspect.formats.refuse_inexpressible`: conv modules in diffusers
    attention-processor files, …). Cheap: the command calls it before it loads the base model and reads the
    calibration data."""
    check_output(ad, out, force)
    if ad.use_dora or ad.peft_type == "ADALORA" or any(m.is_dora for m in ad.modules):
        raise InspectError(f"{ad.path}: calibrated truncation applies to plain LoRA modules (not DoRA/AdaLoRA)")
    layout = layout_of(ad)
    out_fmt = layout.output_format(ad, out)
    refuse_inexpressible(ad, out_fmt)
    return layout, out_fmt


def calibrated_truncate(ad: Adapter, out: Path, spec: TruncateSpec, moments: dict[str, torch.Tensor], *,
                        ridge: float = DEFAULT_RIDGE, force: bool = False, calibration: dict[str, Any] | None = None,
                        progress: Callable[[int], None] | None = None) -> TruncateResult:
    """Write the calibrated truncation of ``ad`` to ``out`` (atomically, self-checked): ``moments`` maps
    each module name to Σ = XᵀX/n of its input (:func:`lora_inspect.hf.collect.input_moments`)."""
    spec.validate()
    out = Path(out)
    if not ridge > 0:
        raise InspectError(f"ridge must be > 0, got {ridge}")
    layout, out_fmt = calibration_target(ad, out, force)
    _check_moments(ad, moments)
    cal = []
    for m in ad.modules:
        cal.append(whiten(m, moments[m.name], ridge))
        if progress is not None:
            progress(1)
    extras = extras_tensors(ad)
    got = Factored(spectra=[c.spectrum for c in cal])
    choice = choose_ranks(ad.modules, got.spectra, spec, fixed_bytes=rank_independent_bytes(ad, extras),
                          force_uniform=layout.caps.one_rank_only)
    real: dict[str, np.ndarray] = {}
    for c, k, st in zip(cal, choice.keep, choice.stored):
        if st > 0:
            b1, a1 = calibrated_factors(c, k, st)
            got.factors[c.module.name] = to_stored(c.module, b1, a1, c.module.dtype)
            sv = np.zeros(st)
            s_new = decompose(b1, a1, 1.0).s[:st] if k else np.zeros(0)
            sv[: len(s_new)] = s_new
            real[c.module.name] = sv
    tensors, changes, dropped, expected, ranks = assemble(ad, got, choice)
    for name, sv in real.items():
        expected[name] = Expected(sv, expected[name].rank, expected[name].dtype)
    for i, (c, k) in enumerate(zip(cal, choice.keep)):
        o, w, p = module_errors(c, k)
        changes[i] = replace(changes[i], relative_error=o, weight_error=w, output_error_plain=p)
    tensors.update(extras)
    rw = layout.truncated(ad, out_fmt, tensors, ranks, dropped)
    size, max_err, written = write_checked(ad, layout, out, rw, expected, set(dropped))
    facts = dict(calibration or {})
    facts.update(ridge=ridge, objective="min ||(dW - dW_k) X||_F: SVD of dW·L, L = chol(XᵀX/n + λI)")
    return TruncateResult(
        adapter=ad, output=out, output_format=out_fmt, spec=spec, modules=changes, choice=choice.facts,
        file_bytes_before=ad.file_bytes, file_bytes_after=size, warnings=truncation_warnings(ad, spec, dropped),
        notes=written, readme_copied=bool(layout.copied_files(ad, out_fmt)), max_check_error=max_err,
        calibration=facts,
    )
