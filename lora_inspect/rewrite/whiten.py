"""Activation-aware low-rank approximation of a dense ΔW (numpy/scipy, no torch).

**Objective.** For a module with input x (a row of X, n tokens), Σ = E[x xᵀ] = XᵀX/n, find the rank-k M
minimising the output error E‖(ΔW − M)x‖² = ‖(ΔW − M)Xᵀ‖²_F/n instead of the weight error ‖ΔW − M‖²_F.
With a ridge λ = ``ridge``·tr(Σ)/in pulling M towards ΔW,

    E‖(ΔW − M)x‖² + λ‖ΔW − M‖²_F = ‖(ΔW − M)L‖²_F,   L Lᵀ = Σ + λI (lower Cholesky),

and since L is invertible the minimiser over rank-k M is M_k = [ΔW L]_k L⁻¹ (Eckart–Young on the
*whitened* matrix ΔW L). This is the truncation-aware whitening of SVD-LLM (Wang et al. 2024,
"SVD-LLM: Truncation-aware Singular Value Decomposition for Large Language Model Compression", §3.1:
Cholesky of XXᵀ, SVD of W·S) and the activation-aware idea of ASVD (Yuan et al. 2023, "ASVD:
Activation-aware Singular Value Decomposition for Compressing Large Language Models", which scales by
activation statistics instead of the full Cholesky), applied to the update ΔW rather than to W. The
whitened spectrum σ̃ (singular values of ΔW L) gives the error of every rank at once (Eckart–Young):

    ‖(ΔW − M_k)L‖_F / ‖ΔW L‖_F = sqrt(Σ_{i>k} σ̃ᵢ²) / ‖ΔW L‖_F          (:attr:`LowRankFit.forecast`)

**Propagated target** (:class:`Moments` with ``p``/``d``; GPTQ-style sequential compensation, Frantar et
al. 2023 §3, applied to low-rank updates). When the modules upstream are already truncated, this module
sees x̂ = x − δ instead of x, and the best it can do is to reproduce the original output (W + ΔW)x from
x̂: minimise E‖Y − M x̂‖² + λ‖M − ΔW‖²_F with Y = ΔW x + W δ (W the base weight). With P = E[x δᵀ],
D = E[δ δᵀ]: Σ̂ = E[x̂ x̂ᵀ] = Σ − P − Pᵀ + D, T = E[Y x̂ᵀ] = ΔW(Σ − P) + W(Pᵀ − D), and the minimiser is
M_k = [Z]_k L̂⁻¹ with Z = (T + λΔW) L̂⁻ᵀ, L̂ L̂ᵀ = Σ̂ + λI (P = D = 0 gives back Z = ΔW L). The
differences δ are accumulated directly, so nothing large cancels.

**Memory and cost.** Beyond the caller's ΔW (out×in) and Σ (in×in): one in×in Cholesky factor, Z
(out×in), and the Gram matrix of Z's smaller side (min(out, in)²). The top-k singular triplets come from
that Gram matrix (``eigh``; 2–3× faster than a dense SVD of Z at 1024×3584), the residuals from
‖Z‖²_F − Σ_{i≤k} σ̃ᵢ², which is exact up to rounding of the kept energy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import InspectError

__all__ = ["DEFAULT_RIDGE", "Moments", "LowRankFit", "CalibratedLowRank", "Choice", "whitening", "whitened_spectrum",
           "fit_lowrank", "plain_lowrank", "output_error", "output_errors", "calibrated_lowrank"]

DEFAULT_RIDGE = 1e-2
Choice = Literal["calibrated", "plain"]
_ROWS = 1024  # rows of ΔW per block where an out×in temporary would otherwise be formed


@dataclass
class Moments:
    """A module's input statistics over calibration tokens (float64, in×in): Σ = E[x xᵀ]; with a truncated model
    upstream, also P = E[x δᵀ] and D = E[δ δᵀ], δ = x − x̂ (x̂ the truncated model's input at the same token)."""

    s: np.ndarray
    p: np.ndarray | None = None
    d: np.ndarray | None = None

    @property
    def propagated(self) -> bool:
        return self.p is not None and self.d is not None

    def sigma_hat(self) -> np.ndarray:
        """Σ̂ = E[x̂ x̂ᵀ] = Σ − P − Pᵀ + D (Σ itself when nothing upstream changed)."""
        if self.p is None or self.d is None:
            return self.s
        return self.s - self.p - self.p.T + self.d


@dataclass
class LowRankFit:
    """B (out×k) and A (k×in), float64, with B@A the rank-k minimiser; ``spectrum`` the whitened singular values
    σ̃ (descending, all of them); ``forecast[j]`` the relative (ridge) output error at rank j = 0..len(spectrum)."""

    b: np.ndarray
    a: np.ndarray
    spectrum: np.ndarray
    forecast: np.ndarray
    lam: float


@dataclass
class CalibratedLowRank:
    """What :func:`calibrated_lowrank` chose: B@A is the approximation written; ``choice`` and ``reason`` say
    which and why; ``forecast``/``spectrum`` are of the calibrated (whitened) objective; held-out errors are
    relative output errors ‖(ΔW − M)Lₕ‖/‖ΔW Lₕ‖ with Lₕ Lₕᵀ = Σₕ (no ridge), None without a held-out Σ."""

    b: np.ndarray
    a: np.ndarray
    choice: Choice
    reason: str
    rank: int
    forecast: np.ndarray
    spectrum: np.ndarray
    held_out_error_calibrated: float | None
    held_out_error_plain: float | None
    ridge: float
    lam: float


def _check(delta: np.ndarray, sigma: np.ndarray, what: str = "sigma") -> None:
    if delta.ndim != 2 or sigma.shape != (delta.shape[1], delta.shape[1]):
        raise InspectError(f"{what} is {sigma.shape}, expected in×in = {delta.shape[1]} for ΔW {delta.shape}")
    if not (np.isfinite(delta).all() and np.isfinite(sigma).all()):
        raise InspectError("ΔW or the input moment holds NaN/inf values")


def whitening(sigma: np.ndarray, ridge: float) -> tuple[np.ndarray, float]:
    """(L lower, λ) with L Lᵀ = Σ + λI, λ = ridge·tr(Σ)/in (ridge itself when tr Σ = 0); float64."""
    from scipy.linalg import cholesky

    if not ridge > 0:
        raise InspectError(f"ridge must be > 0, got {ridge}")
    n = sigma.shape[0]
    mean = float(np.trace(sigma)) / n
    lam = ridge * mean if mean > 0 else max(ridge, 1e-12)
    shifted = np.array(sigma, dtype=np.float64, copy=True)
    shifted.flat[:: n + 1] += lam  # Σ + λI with one in×in copy (Cholesky in place)
    try:
        low = cholesky(shifted.T, lower=True, overwrite_a=True, check_finite=False)  # symmetric: .T is Fortran order
    except np.linalg.LinAlgError as e:
        raise InspectError(f"the input second moment is not positive semi-definite (Cholesky failed: {e})") from None
    return low, lam


def _top(z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(σ all, descending; U_k (out×k); U_kᵀZ (k×in)): the top-k of Z from its smaller Gram matrix."""
    from scipy.linalg import eigh

    left = z.shape[0] <= z.shape[1]
    g = z @ z.T if left else z.T @ z
    w, v = eigh(g, check_finite=False)
    w, v = np.maximum(w[::-1], 0.0), v[:, ::-1]
    s = np.sqrt(w)
    k = min(k, len(s))
    if left:
        return s, v[:, :k], v[:, :k].T @ z
    # Z V_k = U_k S_k: U_k = Z V_k / s_k where s_k > 0 (zero directions contribute nothing)
    zv = z @ v[:, :k]
    keep = s[:k] > 0
    u = np.zeros_like(zv)
    u[:, keep] = zv[:, keep] / s[:k][keep]
    return s, u, (v[:, :k] * s[:k]).T


def _forecast(s: np.ndarray, total: float) -> np.ndarray:
    """sqrt(max(‖Z‖² − Σ_{i≤k} σ̃ᵢ², 0)/‖Z‖²) for k = 0..len(s)."""
    if not total > 0:
        return np.zeros(len(s) + 1)
    kept = np.concatenate([[0.0], np.cumsum(s * s)])
    return np.sqrt(np.maximum(total - kept, 0.0) / total)


def _balanced(u: np.ndarray, c: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(U√S, S^-½C): the same product U C with both factors of similar size (storage in fp16/bf16)."""
    r = np.sqrt(np.where(s > 0, s, 1.0))
    return u * r, c / r[:, None]


def whitened_spectrum(delta: np.ndarray, sigma: np.ndarray, ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """σ̃: singular values of ΔW L (L Lᵀ = Σ + λI), descending, min(out, in) of them — the output energy per
    direction, for rank allocation (Σ σ̃ᵢ² = E‖ΔW x‖² + λ‖ΔW‖²_F). Values only: one Gram matrix and ``eigvalsh``."""
    from scipy.linalg import eigvalsh

    _check(np.asarray(delta), np.asarray(sigma))
    low, _ = whitening(np.asarray(sigma, dtype=np.float64), ridge)
    z = np.asarray(delta, dtype=np.float64) @ low
    g = z @ z.T if z.shape[0] <= z.shape[1] else z.T @ z
    return np.sqrt(np.maximum(eigvalsh(g, check_finite=False)[::-1], 0.0))


def fit_lowrank(delta: np.ndarray, moments: Moments, rank: int, ridge: float = DEFAULT_RIDGE,
                weight: np.ndarray | None = None) -> LowRankFit:
    """The rank-``rank`` minimiser of the (ridge) output error, local or propagated (module docstring).
    ``weight`` (the base W, out×in, linear orientation) is needed only for propagated moments."""
    from scipy.linalg import solve_triangular

    delta = np.asarray(delta, dtype=np.float64)
    _check(delta, moments.s)
    if rank < 0:
        raise InspectError(f"rank must be ≥ 0, got {rank}")
    sig = moments.sigma_hat()
    low, lam = whitening(sig, ridge)
    if moments.propagated:
        assert moments.p is not None and moments.d is not None
        if weight is None or weight.shape != delta.shape:
            raise InspectError(f"a propagated fit needs the base weight {delta.shape}")
        t = delta @ moments.s - delta @ moments.p + lam * delta + weight @ moments.p.T - weight @ moments.d
        z = solve_triangular(low, t.T, lower=True, check_finite=False).T  # (T + λΔW) L̂⁻ᵀ
    else:
        z = delta @ low
    s, u, c = _top(z, rank)
    a = solve_triangular(low, c.T, lower=True, trans="T", check_finite=False).T  # C L⁻¹
    b, a = _balanced(u, a, s[: u.shape[1]])
    return LowRankFit(b, a, s, _forecast(s, float(np.sum(z * z))), lam)


def plain_lowrank(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, A, σ) of the plain truncation [ΔW]_k (Eckart–Young on ΔW itself), from the smaller Gram matrix."""
    delta = np.asarray(delta, dtype=np.float64)
    s, u, c = _top(delta, rank)
    b, a = _balanced(u, c, s[: u.shape[1]])
    return b, a, s


def output_error(delta: np.ndarray, b: np.ndarray, a: np.ndarray, moments: Moments,
                 weight: np.ndarray | None = None) -> float:
    """Relative output error of M = BA, no ridge: sqrt(E‖Y − M x̂‖² / E‖Y‖²) — locally (Y = ΔW x, x̂ = x) that is
    ‖(ΔW − M)L‖_F / ‖ΔW L‖_F with L Lᵀ = Σ. With propagated moments E‖Y‖² = tr(ΔWΣΔWᵀ) + 2tr(ΔWPWᵀ) + tr(WDWᵀ)
    and E‖Y − Mx̂‖² = E‖Y‖² − 2tr(MTᵀ) + tr(MΣ̂Mᵀ) (module docstring). By blocks of rows: no out×in temporary."""
    return output_errors(delta, [(b, a)], moments, weight)[0]


def output_errors(delta: np.ndarray, factors: list[tuple[np.ndarray, np.ndarray]], moments: Moments,
                  weight: np.ndarray | None = None) -> list[float]:
    """:func:`output_error` of several (B, A) at once (ΔWΣ, the costly product, formed once per block of rows)."""
    sig_hat = moments.sigma_hat()
    quads = [a @ sig_hat @ a.T for _, a in factors]  # k×k
    num, den = [0.0] * len(factors), 0.0
    for i in range(0, delta.shape[0], _ROWS):
        d = delta[i : i + _ROWS]
        ds = d @ moments.s
        y2 = float(np.sum(ds * d))
        t = ds
        if moments.propagated:
            assert moments.p is not None and moments.d is not None and weight is not None
            w, dp = weight[i : i + _ROWS], d @ moments.p
            y2 += float(2 * np.sum(dp * w) + np.sum((w @ moments.d) * w))
            t = ds - dp + w @ (moments.p.T - moments.d)
        den += y2
        for j, ((b, a), q) in enumerate(zip(factors, quads)):
            bb = b[i : i + _ROWS]
            num[j] += y2 - 2 * float(np.sum((bb.T @ t) * a)) + float(np.sum((bb @ q) * bb))
    return [float(np.sqrt(max(x, 0.0) / den)) if den > 0 else 0.0 for x in num]


def calibrated_lowrank(delta: np.ndarray, sigma: np.ndarray, held_out_sigma: np.ndarray | None, rank: int,
                       ridge: float = DEFAULT_RIDGE) -> CalibratedLowRank:
    """Rank-``rank`` approximation of a dense ΔW (out×in, float64) for the inputs whose second moment is ``sigma``.

    The calibrated factors are [ΔW L]_k L⁻¹ (module docstring: SVD-LLM's whitening, ASVD's idea). With
    ``held_out_sigma`` (Σ of inputs *not* used for ``sigma``), they are kept only if their output error on those
    inputs is ≤ plain truncation's; otherwise the plain [ΔW]_k is returned — so, per module, the result is
    never worse than plain SVD on the held-out activations. ``forecast[j]`` is the relative (ridge) output
    error at rank j of the calibrated solution, from the whitened spectrum, for j = 0..min(out, in).

    Note (measured on the project's text task, docs/calibrate.md): a lower per-module output error does not
    guarantee a lower end-to-end KL; ``truncate --calibrate`` therefore decides on the model's held-out KL.
    """
    delta = np.asarray(delta, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    _check(delta, sigma)
    fit = fit_lowrank(delta, Moments(sigma), rank, ridge)
    if held_out_sigma is None:
        return CalibratedLowRank(fit.b, fit.a, "calibrated", "no held-out moment: calibrated factors unchecked",
                                 rank, fit.forecast, fit.spectrum, None, None, ridge, fit.lam)
    held = np.asarray(held_out_sigma, dtype=np.float64)
    _check(delta, held, "held_out_sigma")
    pb, pa, _ = plain_lowrank(delta, rank)
    e_cal, e_plain = output_errors(delta, [(fit.b, fit.a), (pb, pa)], Moments(held))
    choice: Choice
    if e_cal <= e_plain:
        b, a, choice = fit.b, fit.a, "calibrated"
        reason = f"held-out output error {e_cal:.4g} (calibrated) ≤ {e_plain:.4g} (plain)"
    else:
        b, a, choice = pb, pa, "plain"
        reason = f"held-out output error {e_plain:.4g} (plain) < {e_cal:.4g} (calibrated)"
    return CalibratedLowRank(b, a, choice, reason, rank, fit.forecast, fit.spectrum, e_cal, e_plain, ridge, fit.lam)
