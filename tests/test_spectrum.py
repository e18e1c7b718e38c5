"""Property tests for the QR route and the rank metrics, against dense float64 numpy/scipy.

Tolerances asserted (measured worst cases over 200 random draws in brackets):
- random Gaussian factors, any shape and rank (r > min(out, in) too), float64: |σᵢ − σᵢ_dense| ≤ 1e-10·σ₁;
- graded spectra σ = logspace(0, −8, r) with B = U·diag(σ), A = Vᵀ (U, V orthonormal):
  float64 |σᵢ − σᵢ_true| ≤ 1e-10·σᵢ — relative to *each value itself*  [5e-14];
  float32 inputs ≤ 1e-5·σᵢ, also relative to itself                       [3e-7];
- the same spectra mixed by a random rotation W (B = U·diag(σ)·W, A = Wᵀ·Vᵀ), where no route can keep
  small values to full relative accuracy: float64 ≤ 1e-12·σ₁ [1e-15], float32 ≤ 1e-5·σ₁ [2e-7].
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import scipy.stats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_inspect.spectrum import (
    core_singular_values,
    energy_rank,
    entropy_rank,
    r_factor,
    relative_error,
    retained_energy,
    singular_values,
    spectrum_stats,
    stable_rank,
    truncate_factors,
)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _dense_sv(b: np.ndarray, a: np.ndarray, scale: float, r: int) -> np.ndarray:
    sv = np.linalg.svd(scale * (b @ a), compute_uv=False)
    out = np.zeros(r)
    k = min(r, len(sv))
    out[:k] = sv[:k]
    return out


def _orthonormal(rng: np.random.Generator, n: int, r: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((n, r)))[0]


@FAST
@given(out=st.integers(1, 40), inn=st.integers(1, 40), r=st.integers(1, 12), seed=st.integers(0, 2**31),
       scale=st.floats(1e-3, 1e3))
def test_qr_route_matches_dense_svd(out, inn, r, seed, scale):
    rng = np.random.default_rng(seed)
    b, a = rng.standard_normal((out, r)), rng.standard_normal((r, inn))
    sv = singular_values(b, a, scale)
    ref = _dense_sv(b, a, scale, r)
    assert sv.shape == (r,) and sv.dtype == np.float64
    assert np.all(np.diff(sv) <= 1e-12 * ref[0])  # descending
    assert np.abs(sv - ref).max() <= 1e-10 * ref[0]


@FAST
@given(out=st.integers(8, 48), inn=st.integers(8, 48), r=st.integers(2, 8), seed=st.integers(0, 2**31))
def test_eight_decades_relative_to_each_value(out, inn, r, seed):
    rng = np.random.default_rng(seed)
    sigma = np.logspace(0, -8, r)
    b = _orthonormal(rng, out, r) * sigma  # U·diag(σ)
    a = _orthonormal(rng, inn, r).T  # Vᵀ
    sv64 = singular_values(b, a)
    assert np.all(np.abs(sv64 - sigma) <= 1e-10 * sigma), (sv64, sigma)
    sv32 = singular_values(b.astype(np.float32), a.astype(np.float32))
    assert np.all(np.abs(sv32 - sigma) <= 1e-5 * sigma), (sv32, sigma)


@FAST
@given(out=st.integers(8, 48), inn=st.integers(8, 48), r=st.integers(2, 8), seed=st.integers(0, 2**31))
def test_eight_decades_mixed_relative_to_sigma1(out, inn, r, seed):
    rng = np.random.default_rng(seed)
    sigma = np.logspace(0, -8, r)
    w = _orthonormal(rng, r, r)
    b = _orthonormal(rng, out, r) * sigma @ w
    a = w.T @ _orthonormal(rng, inn, r).T
    sv64 = singular_values(b, a)
    assert np.abs(sv64 - sigma).max() <= 1e-12
    sv32 = singular_values(b.astype(np.float32), a.astype(np.float32))
    assert np.abs(sv32 - sigma).max() <= 1e-5


def test_batched_cores_equal_one_by_one():
    """``compute_spectra`` decomposes the cores of same-rank modules in one batched SVD; the batch must
    not mix modules up, including ones whose R is shorter than r (out < r or in < r)."""
    rng = np.random.default_rng(1)
    shapes = [(12, 9), (3, 9), (12, 2), (7, 7), (30, 5)]
    facs = [(rng.standard_normal((o, 4)), rng.standard_normal((4, i)))
            for o, i in shapes]
    scales = rng.uniform(0.1, 3, len(shapes))
    batch = core_singular_values([r_factor(b) for b, _ in facs], [r_factor(a.T) for _, a in facs], list(scales), 4)
    for (b, a), s, got in zip(facs, scales, batch):
        want = np.linalg.svd(s * (b @ a), compute_uv=False)
        np.testing.assert_allclose(got[: len(want)], want[:4], rtol=0, atol=1e-12 * want[0])
        assert np.all(got[len(want):] <= 1e-12 * want[0])


# --- metrics against the textbook formulas ---------------------------------------------------------

spectra = st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1e3)), min_size=1, max_size=24).map(
    lambda xs: np.sort(np.asarray(xs, dtype=np.float64))[::-1].copy()
)


@FAST
@given(sv=spectra, tau=st.floats(0.05, 1.0))
def test_energy_rank_definition(sv, tau):
    k = energy_rank(sv, tau)
    e = sv**2
    total = e.sum()
    if total == 0:
        assert k == 0
        return
    # exact arithmetic (floats squared are exact as fractions): the true smallest k
    exact = [Fraction(float(x)) ** 2 for x in sv]
    need = Fraction(float(tau)) * sum(exact)
    run, k_ref = Fraction(0), len(sv)
    for i, x in enumerate(exact):
        run += x
        if run >= need:
            k_ref = i + 1
            break
    # ours may stop one early on a near-tie (its documented 1e-12 slack against rounding)
    near_tie = k_ref >= 2 and float(sum(exact[: k_ref - 1])) >= float(need) * (1 - 1e-9)
    assert k == k_ref or (near_tie and k == k_ref - 1), (k, k_ref)
    assert 1 <= k <= len(sv)
    assert retained_energy(sv, k) >= tau * (1 - 1e-9)


@FAST
@given(sv=spectra, k=st.integers(0, 30))
def test_retained_energy_and_relative_error(sv, k):
    e = sv**2
    total = e.sum()
    kk = min(k, len(sv))
    kept = e[:kk].sum() / total if total > 0 else 1.0
    assert retained_energy(sv, k) == pytest.approx(kept, rel=1e-12, abs=1e-15)
    err = math.sqrt(e[kk:].sum() / total) if total > 0 else 0.0
    assert relative_error(sv, k) == pytest.approx(err, rel=1e-12, abs=1e-15)


@FAST
@given(sv=spectra)
def test_stable_and_entropy_rank(sv):
    if sv[0] == 0:
        assert stable_rank(sv) == 0 and entropy_rank(sv) == 0
        return
    assert stable_rank(sv) == pytest.approx((sv**2).sum() / sv[0] ** 2, rel=1e-12)
    # Roy & Vetterli: p = σ/Σσ (σ, not σ²); scipy's entropy normalises and uses natural logs
    assert entropy_rank(sv) == pytest.approx(math.exp(scipy.stats.entropy(sv)), rel=1e-10)
    st_ = spectrum_stats(sv, 0.9)
    assert st_.recommended_rank == st_.energy_rank == energy_rank(sv, 0.9)


def test_entropy_rank_uses_sigma_not_sigma_squared():
    sv = np.array([1.0, 0.5])
    p = np.array([2 / 3, 1 / 3])
    assert entropy_rank(sv) == pytest.approx(math.exp(-(p * np.log(p)).sum()))  # 1.8899, not 1.6494 (σ²)
    assert entropy_rank(np.ones(7)) == pytest.approx(7)


@FAST
@given(out=st.integers(2, 30), inn=st.integers(2, 30), r=st.integers(1, 8), k=st.integers(0, 9),
       seed=st.integers(0, 2**31))
def test_truncation_error_is_eckart_young(out, inn, r, k, seed):
    rng = np.random.default_rng(seed)
    b, a = rng.standard_normal((out, r)), rng.standard_normal((r, inn))
    dw = 1.7 * (b @ a)
    bk, ak = truncate_factors(b, a, 1.7, k)
    assert bk.shape == (out, k) and ak.shape == (k, inn)
    sv = singular_values(b, a, 1.7)
    measured = float(np.linalg.norm(dw - bk @ ak) / np.linalg.norm(dw))
    assert measured == pytest.approx(relative_error(sv, k), abs=1e-9)
