"""Calibrated truncation (``truncate --calibrate``): per module, a rank-k ΔW_k chosen for the *output* of the model
on text instead of the weight error ‖ΔW − ΔW_k‖_F, and never worse than plain truncation on held-out text.

Three steps (the formulas and their sources are in :mod:`.whiten`):

1. **Ranks.** Σ = E[x xᵀ] of each module's input on the fit part of the text (the adapter in place) gives the
   whitened spectrum σ̃ of ΔW·L (L Lᵀ = Σ + λI; SVD-LLM's whitening). ``--rank`` keeps k everywhere; the budgets
   (``--energy``, ``--max-params``, ``--max-size``) rank directions by output energy σ̃² (:mod:`.ranks`). In
   factor space ΔW·L = s·B(A L), so the QR + r×r core SVD of :func:`lora_inspect.spectrum.decompose` on (B, A·L)
   gives σ̃ for the cost of A·L.
2. **Propagated fit.** Modules are fitted in the order the model calls them (layers fed the same tensor
   together). Each sees x̂, its input with every module upstream already truncated, and gets the rank-k M that
   best reproduces the original layer output (W + ΔW)x from x̂ (GPTQ-style compensation, Frantar et al. 2023):
   errors upstream are corrected downstream instead of compounding.
3. **Held-out check.** Every 4th chunk of the text is held out (never used in 1–2). On it, KL(adapter ‖
   candidate) is measured per token for plain truncation and for the calibrated factors, both as they will be
   stored (rounded to the adapter's dtype), at the same ranks. The calibrated factors are written only if their
   mean KL is lower than plain's by :data:`CHECK_Z` standard errors of a paired test over blocks of 32 tokens
   (:func:`significantly_lower`); otherwise plain truncation is written. So the written adapter's held-out KL
   is never above plain truncation's, and a gain within the noise of the check is not trusted: on a tiny Llama
   whose adapter barely moves the model (KL 10⁻⁴–10⁻⁵ nats), calibrated factors that looked 12 % and 3 %
   better on 2,048 held-out tokens (|z| < 1.5) were 4 % and 13 % *worse* on other text (k = 4, 8).

Why not the per-module (local) whitening alone (the first version of this command): on the project's byte-level
text task (``samples/text``, k = 1, 2) it lowered every module's output error — on held-out activations too —
yet raised the model's KL to 1.06–1.12× plain truncation's, even calibrated on the evaluation text itself; one
module's lower output error alone could raise the KL by 13 %. The per-layer objective does not compose;
propagation fixed it there (0.50–0.73× plain, docs/calibrate.md).

Numpy/scipy only: the model is reached through :class:`CalibrationData`
(:class:`lora_inspect.hf.collect.ModelCalibration` implements it with torch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..adapter import Adapter, Module
from ..arrays import decode, encode
from ..errors import InspectError
from ..formats import check_output, layout_of, refuse_inexpressible
from ..formats.layout import Format, Layout
from ..spectrum import Decomposition, decompose
from .ranks import RankChoice, TruncateSpec, choose_ranks
from .results import TruncateResult
from .selfcheck import Expected, write_checked
from .tensors import extras_tensors, storage_dtype
from .truncation import Factored, assemble, rank_independent_bytes, to_stored, truncation_warnings
from .whiten import DEFAULT_RIDGE, Moments, fit_lowrank, output_error, output_errors, whitening

__all__ = ["DEFAULT_RIDGE", "CHECK_Z", "CalibrationData", "HeldOutKL", "Verdict", "significantly_lower", "CalibratedModule", "whiten", "calibrated_factors", "module_errors",
           "calibrated_truncate", "calibration_target", "ridge_cholesky"]

Factors = dict[str, tuple[np.ndarray, np.ndarray]]  # module name → (s·B, A) linear orientation, float64
CHECK_Z = 3.0  # the calibrated factors are written only if their held-out KL is lower by 3 standard errors


class CalibrationData(Protocol):
    """What the calibrated truncation needs from a model and a text split in a fit and a held-out part."""

    tokens: int  # fit-part tokens, known after moments()

    def moments(self) -> dict[str, np.ndarray]: ...  # module name → Σ (in×in) on the fit part, adapter in place

    def stages(self) -> list[list[str]]: ...  # module names in call order, grouped

    def paired(self, names: list[str], done: Factors) -> dict[str, Moments]: ...  # x vs x̂ with ``done`` upstream

    def base_weight(self, name: str) -> np.ndarray: ...  # W (out, in) float64

    def held_out_kl(self, candidates: Sequence[Factors]) -> HeldOutKL: ...  # KL(adapter ‖ each) per block

    @property
    def held_out_tokens(self) -> int: ...


@dataclass
class HeldOutKL:
    """KL(adapter ‖ candidate) on the held-out part, summed per block of consecutive tokens (the units of the
    paired test): ``sums`` (candidates, blocks), ``tokens`` (blocks,)."""

    sums: np.ndarray
    tokens: np.ndarray

    def mean(self, i: int) -> float:
        """Candidate i's mean KL per token."""
        return max(float(self.sums[i].sum() / self.tokens.sum()), 0.0)


@dataclass
class Verdict:
    """The held-out check: is candidate ``new``'s mean KL lower than ``old``'s by more than ``z`` standard errors?
    ``z_score`` = mean difference / its standard error (−inf when every block improves by the same amount)."""

    lower: bool
    z_score: float
    blocks: int


def significantly_lower(kl: HeldOutKL, new: int, old: int, z: float = CHECK_Z) -> Verdict:
    """Paired test over blocks (ratio estimator): d_b = KL_new,b − KL_old,b summed over block b's n_b tokens,
    d̄ = Σd_b/Σn_b, SE² = Σ(d_b − d̄ n_b)²/(Σn_b)² · B/(B − 1) (the delta-method variance of a ratio mean,
    Cochran, "Sampling Techniques", ch. 6 on ratio estimators). Lower when d̄ + z·SE < 0; never with fewer than 2 blocks."""
    d, w = kl.sums[new] - kl.sums[old], kl.tokens
    n = len(w)
    if n < 2 or not w.sum() > 0:
        return Verdict(False, float("nan"), n)
    mean = float(d.sum() / w.sum())
    se = float(np.sqrt(np.sum((d - mean * w) ** 2) * n / (n - 1)) / w.sum())
    if se == 0:
        return Verdict(mean < 0, -np.inf if mean < 0 else (0.0 if mean == 0 else np.inf), n)
    return Verdict(mean + z * se < 0, mean / se, n)


def ridge_cholesky(sigma: np.ndarray, ridge: float) -> tuple[np.ndarray, float]:
    """(L lower with LLᵀ = Σ + λI, λ) float64; λ = ridge·tr(Σ)/in (:func:`.whiten.whitening`)."""
    return whitening(np.asarray(sigma, dtype=np.float64), ridge)


@dataclass
class CalibratedModule:
    module: Module
    chol: np.ndarray  # (in, in) lower Cholesky factor of Σ + λI, float64
    decomp: Decomposition  # of (s·B, A·L): the whitened spectrum
    b: np.ndarray  # s·B (out, r) float64
    a: np.ndarray  # A (r, in) float64
    sigma: np.ndarray

    @property
    def spectrum(self) -> np.ndarray:
        sv = np.zeros(self.module.rank)
        sv[: self.decomp.s.shape[0]] = self.decomp.s
        return sv


def whiten(m: Module, sigma: np.ndarray, ridge: float) -> CalibratedModule:
    """The module's factors and the decomposition of ΔW·L (module docstring, step 1)."""
    sigma = np.asarray(sigma, dtype=np.float64)
    if tuple(sigma.shape) != (m.shape[1], m.shape[1]):
        raise InspectError(f"module {m.name}: input moment is {tuple(sigma.shape)}, expected in×in = {m.shape[1]}")
    b, a = m.factors(np.float64)
    low, _ = ridge_cholesky(sigma, ridge)
    try:
        d = decompose(b, a @ low, m.scale)
    except ValueError:
        raise InspectError(f"module {m.name!r} holds NaN/inf values: refusing to rewrite a corrupt adapter") from None
    return CalibratedModule(m, low, d, b * m.scale, a, sigma)


def calibrated_factors(c: CalibratedModule, keep: int, stored: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(B′, A′) float64, linear orientation, with B′A′ = [ΔW L]_keep L⁻¹ (zero columns past ``keep``): the local
    (per-module) minimiser."""
    from scipy.linalg import solve_triangular

    b1, cw = c.decomp.factors(keep, stored)
    a1 = solve_triangular(c.chol, cw.astype(np.float64).T, lower=True, trans="T").T  # C L⁻¹
    return b1.astype(np.float64), a1


def _plain(c: CalibratedModule, keep: int, stored: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    b, a = decompose(c.b, c.a, 1.0).factors(keep, stored)
    return b.astype(np.float64), a.astype(np.float64)


def _weight_error(c: CalibratedModule, b1: np.ndarray, a1: np.ndarray) -> float:
    """‖s·BA − B′A′‖_F / ‖s·BA‖_F through a QR of [s·B, −B′] (no out×in matrix)."""
    left, right = np.concatenate([c.b, -b1], 1), np.concatenate([c.a, a1], 0)
    r = np.linalg.qr(left, mode="r")
    whole = np.linalg.norm(np.linalg.qr(c.b, mode="r") @ c.a)
    return float(np.linalg.norm(r @ right) / whole) if whole > 0 else 0.0


def module_errors(c: CalibratedModule, keep: int) -> tuple[float, float, float]:
    """Of the local minimiser: (output error, weight error, plain truncation's output error), relative; output
    errors with the ridge, ‖(ΔW − M)L‖_F/‖ΔW L‖_F."""
    b1, a1 = calibrated_factors(c, keep)
    o_norm = float(np.sqrt(np.sum(np.square(c.decomp.s))))
    if not o_norm > 0:
        return 0.0, 0.0, 0.0
    out = float(np.linalg.norm(np.linalg.qr(np.concatenate([c.b, -b1], 1), mode="r")
                               @ (np.concatenate([c.a, a1], 0) @ c.chol))) / o_norm
    bp, ap = _plain(c, keep)
    plain = float(np.linalg.norm(np.linalg.qr(np.concatenate([c.b, -bp], 1), mode="r")
                                 @ (np.concatenate([c.a, ap], 0) @ c.chol))) / o_norm
    return out, _weight_error(c, b1, a1), plain


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


def _rounded(m: Module, b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The factors as they will be stored (the adapter's dtype), back in float64."""
    st = storage_dtype(m.dtype)
    return decode(encode(b, st)).astype(np.float64), decode(encode(a, st)).astype(np.float64)


def _pad(b: np.ndarray, a: np.ndarray, stored: int) -> tuple[np.ndarray, np.ndarray]:
    k = b.shape[1]
    return np.pad(b, ((0, 0), (0, stored - k))), np.pad(a, ((0, stored - k), (0, 0)))


@dataclass
class _Fitted:
    factors: Factors  # rounded as stored
    errors: dict[str, tuple[float, float, float]]  # name → (output error, weight error, plain's output error)


def _propagate(cal: list[CalibratedModule], choice: RankChoice, data: CalibrationData, ridge: float,
               progress: Callable[[int], None] | None) -> _Fitted:
    """Step 2 of the module docstring: each group fitted on x̂ from the groups already truncated."""
    by_name = {c.module.name: (c, k, st) for c, k, st in zip(cal, choice.keep, choice.stored)}
    got = _Fitted({}, {})
    for group in data.stages():
        todo = [n for n in group if by_name[n][2] > 0]  # rank 0: dropped, absent downstream
        moments = data.paired(todo, got.factors) if todo else {}
        for n in todo:
            c, k, st = by_name[n]
            dw, w = c.module.delta(np.float64), data.base_weight(n)
            fit = fit_lowrank(dw, moments[n], k, ridge, w)
            b, a = _rounded(c.module, *_pad(fit.b, fit.a, st))
            got.factors[n] = (b, a)
            bp, ap = _plain(c, k)
            e_cal, e_plain = output_errors(dw, [(b, a), (bp, ap)], moments[n], w)
            got.errors[n] = (e_cal, _weight_error(c, b, a), e_plain)
        if progress is not None:
            progress(len(group))
    return got


def _plain_candidate(cal: list[CalibratedModule], choice: RankChoice) -> _Fitted:
    got = _Fitted({}, {})
    for c, k, st in zip(cal, choice.keep, choice.stored):
        if st > 0:
            got.factors[c.module.name] = _rounded(c.module, *_plain(c, k, st))
            bp, ap = got.factors[c.module.name]
            e = output_error(c.module.delta(np.float64), bp, ap, Moments(c.sigma))
            got.errors[c.module.name] = (e, _weight_error(c, bp, ap), e)
    return got


def calibrated_truncate(ad: Adapter, out: Path, spec: TruncateSpec, data: CalibrationData, *,
                        ridge: float = DEFAULT_RIDGE, force: bool = False, calibration: dict[str, Any] | None = None,
                        progress: Callable[[int], None] | None = None) -> TruncateResult:
    """Write the calibrated truncation of ``ad`` to ``out`` (atomically, self-checked; module docstring).
    ``progress`` gets one call per module fitted."""
    spec.validate()
    out = Path(out)
    if not ridge > 0:
        raise InspectError(f"ridge must be > 0, got {ridge}")
    layout, out_fmt = calibration_target(ad, out, force)
    moments = data.moments()
    missing = [m.name for m in ad.modules if m.name not in moments]
    if missing:
        raise InspectError(f"{ad.path}: no calibration data reached module {missing[0]!r}")
    cal = [whiten(m, moments[m.name], ridge) for m in ad.modules]
    extras = extras_tensors(ad)
    got = Factored(spectra=[c.spectrum for c in cal])
    choice = choose_ranks(ad.modules, got.spectra, spec, fixed_bytes=rank_independent_bytes(ad, extras),
                          force_uniform=layout.caps.one_rank_only)
    fitted, plain = _propagate(cal, choice, data, ridge, progress), _plain_candidate(cal, choice)
    kl = data.held_out_kl([plain.factors, fitted.factors])
    verdict = significantly_lower(kl, 1, 0)
    chosen = fitted if verdict.lower else plain
    real: dict[str, np.ndarray] = {}
    for c, k, st in zip(cal, choice.keep, choice.stored):
        if st > 0:
            b1, a1 = chosen.factors[c.module.name]
            got.factors[c.module.name] = to_stored(c.module, b1, a1, c.module.dtype)
            sv = np.zeros(st)
            s_new = decompose(b1, a1, 1.0).s[:st] if k else np.zeros(0)
            sv[: len(s_new)] = s_new
            real[c.module.name] = sv
    tensors, changes, dropped, expected, ranks = assemble(ad, got, choice)
    for name, sv in real.items():
        expected[name] = Expected(sv, expected[name].rank, expected[name].dtype)
    for i, c in enumerate(cal):
        o, w, p = chosen.errors.get(c.module.name, (1.0, 1.0, 1.0))
        changes[i] = replace(changes[i], relative_error=o, weight_error=w, output_error_plain=p)
    tensors.update(extras)
    rw = layout.truncated(ad, out_fmt, tensors, ranks, dropped)
    size, max_err, written = write_checked(ad, layout, out, rw, expected, set(dropped))
    facts = dict(calibration or {})
    facts.update(ridge=ridge, tokens=data.tokens, held_out_tokens=data.held_out_tokens,
                 held_out_kl={"plain": kl.mean(0), "calibrated": kl.mean(1)},
                 z_score=verdict.z_score if np.isfinite(verdict.z_score) else None,
                 blocks=verdict.blocks, chosen="calibrated" if verdict.lower else "plain",
                 objective="min E||(W + dW) x - (W + M) x^||^2 + lam ||M - dW||^2, modules in call order "
                           "(x^: input with upstream modules truncated)",
                 rule=f"calibrated only if its held-out KL is lower than plain's by {CHECK_Z:g} standard errors")
    return TruncateResult(
        adapter=ad, output=out, output_format=out_fmt, spec=spec, modules=changes, choice=choice.facts,
        file_bytes_before=ad.file_bytes, file_bytes_after=size, warnings=truncation_warnings(ad, spec, dropped),
        notes=written, readme_copied=bool(layout.copied_files(ad, out_fmt)), max_check_error=max_err,
        calibration=facts,
    )
