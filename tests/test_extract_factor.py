"""``extract.factor.decompose`` against the Eckart–Young oracle: a dense float64 SVD (``numpy.linalg.svd``) of
the same matrix. Every case checks what the result claims: the residual is ‖ΔW − UΣVᵀ‖²_F computed densely,
U and V are orthonormal, and the certified ratio bounds the true ratio to the optimum. Small matrices reach the
randomized route by lowering ``SMALL_SIDE`` (the route is asserted); a few keep the default policy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lora_inspect.errors import NonFiniteUpdate, OptionError
from lora_inspect.extract import certificate, factor
from lora_inspect.extract.factor import decompose
from lora_inspect.spectrum import energy_rank


@pytest.fixture
def small(monkeypatch):
    """Randomized route from min(m, n) > 32 (else only from 512)."""
    monkeypatch.setattr(factor, "SMALL_SIDE", 32)


def planted(m, n, sv, seed, noise=0.0, dtype=np.float64):
    """U diag(sv) Vᵀ with Haar U, V, plus Gaussian noise of Frobenius norm ``noise``·‖sv‖."""
    rng = np.random.default_rng(seed)
    r = len(sv)
    u = np.linalg.qr(rng.standard_normal((m, r)))[0]
    v = np.linalg.qr(rng.standard_normal((n, r)))[0]
    a = (u * np.asarray(sv, dtype=np.float64)) @ v.T
    if noise:
        a += noise * np.linalg.norm(sv) / math.sqrt(m * n) * rng.standard_normal((m, n))
    return a.astype(dtype)


def oracle(a):
    return np.linalg.svd(np.asarray(a, dtype=np.float64), compute_uv=False)


def check(a, d, tol=1e-3):
    """Everything ``d`` claims about ``a``, against a dense float64 computation."""
    a64 = np.asarray(a, dtype=np.float64)
    s = oracle(a64)
    k = d.rank
    assert d.sigma.dtype == np.float64 and np.all(np.diff(d.sigma) <= 0)
    total = float((a64**2).sum())
    assert d.total == pytest.approx(total, rel=1e-12, abs=1e-300)
    assert d.u.shape == (a.shape[0], k) and d.vt.shape == (k, a.shape[1])
    assert np.abs(d.u.T @ d.u - np.eye(k)).max() < 1e-12
    assert np.abs(d.vt @ d.vt.T - np.eye(k)).max() < 1e-12
    dense = float(((a64 - (d.u * d.sigma) @ d.vt) ** 2).sum())
    assert abs(d.residual2 - dense) <= 1e-10 * dense + 10 * d.floor + 1e-14 * total
    opt = float((s[k:] ** 2).sum())
    rb = d.ratio_bound()
    assert rb <= 1 + tol
    # the certificate's claim: the residual² is at the rounding floor φ, or
    # (residual² + φ)/(optimum² + φ) ≤ ratio_bound² (up to the oracle's own rounding)
    if d.residual2 <= d.floor:
        assert rb == 1.0 and dense <= 2 * d.floor
    else:
        assert dense + d.floor <= rb**2 * (opt + d.floor) + 1e-13 * total
    assert np.all(d.sigma <= s[:k] * (1 + 1e-12) + 1e-12 * s[0])  # Ritz values from below (interlacing)
    if tol <= 1e-3:
        assert d.sigma == pytest.approx(s[:k], rel=2e-3, abs=1e-7 * s[0])
    return s


@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_planted_low_rank_plus_noise(small, shape, dtype):
    sv = np.geomspace(1.0, 0.02, 40)
    for seed in range(3):
        a = planted(*shape, sv, seed, noise=0.05, dtype=dtype)
        before = a.copy()
        d = decompose(a, rank=12, seed=seed)
        assert d.route == "randomized" and d.proof in ("residual", "cholesky")
        check(a, d)
        assert np.array_equal(a, before)  # the input is never modified


def test_certificate_is_sound_across_seeds(small):
    """Slowly decaying and noisy spectra, many seeds, ranks inside and past the planted rank."""
    for seed in range(16):
        rng = np.random.default_rng(100 + seed)
        m, n = rng.integers(150, 260, size=2)
        sv = np.arange(1, 31) ** -rng.uniform(0.3, 1.5)
        a = planted(int(m), int(n), sv, seed, noise=rng.uniform(0.0, 0.3))
        d = decompose(a, rank=int(rng.integers(4, 30)), seed=seed)
        assert d.route == "randomized"
        check(a, d)


def test_certificate_is_sound_for_poor_subspaces(small, monkeypatch):
    """One Krylov step, one attempt, a loose tolerance: the subspaces are poor (the residual² is 2–9 % above
    the optimum) and the certified ratio must still bound the true one."""
    monkeypatch.setattr(factor, "_depth", lambda width: 1)
    monkeypatch.setattr(factor, "SCHEDULE", ((1, 0),))
    for seed in range(6):
        a = planted(240, 200, np.arange(1, 81) ** -(0.4 + 0.1 * seed), seed, noise=0.2)
        d = decompose(a, rank=10, seed=seed, tolerance=0.5)
        assert d.route == "randomized"
        check(a, d, tol=0.5)
        assert d.residual2 > 1.01 * float((oracle(a)[10:] ** 2).sum())  # visibly suboptimal


def test_flat_spectrum_with_ties(small):
    """σ_k = σ_{k+1} = … (a tie across the cut and beyond the subspace): any k of the tied directions is
    optimal, and the certificate must still prove it."""
    sv = np.concatenate([[4.0, 3.0, 2.5], np.full(60, 1.0)])
    a = planted(240, 220, sv, 7)
    d = decompose(a, rank=10)
    assert d.route == "randomized"
    s = check(a, d)
    assert s[9] == pytest.approx(s[10])
    assert d.residual2 == pytest.approx(float((s[10:] ** 2).sum()), rel=1e-9)


def test_exactly_low_rank(small):
    a = planted(260, 200, [5.0, 2.0, 1.0, 0.5, 0.1], 3)
    d = decompose(a, rank=12)
    assert d.route == "randomized" and d.proof == "frobenius"
    check(a, d)
    assert d.residual2 <= d.floor and d.ratio_bound() == 1.0
    assert d.sigma[:5] == pytest.approx([5.0, 2.0, 1.0, 0.5, 0.1], rel=1e-9)


def test_each_proof(small):
    """Rank 5 plus faint noise: k < 5 is proved by the Frobenius norm alone, k = 5 by the Ritz residuals, k past
    the planted rank (the flat noise floor) only by the Cholesky-certified spectral norm."""
    a = planted(260, 200, [5.0, 2.0, 1.0, 0.5, 0.1], 3, noise=1e-4)
    proofs = {}
    for k in (3, 5, 8):
        d = decompose(a, rank=k)
        assert d.route == "randomized"
        check(a, d)
        proofs[k] = d.proof
    assert proofs == {3: "frobenius", 5: "residual", 8: "cholesky"}


def test_deflated_proof_for_a_tail_below_the_gram_rounding(small, monkeypatch):
    """A strong rank-5 signal over unit noise, k = 8 in the noise: the float32 Gram matrix's rounding
    (relative to ‖ΔW‖²_F) exceeds the noise eigenvalues, so the proof takes the Gram matrix of ΔW(I − VVᵀ)."""
    monkeypatch.setattr(factor, "F64_GRAM", 0)
    monkeypatch.setattr(factor, "GRAM_ROWS", 64)
    noise = np.random.default_rng(0).standard_normal((300, 250))
    for amp, proof in ((1e2, "cholesky"), (1e4, "deflated")):
        a = (planted(300, 250, amp * np.array([5.0, 4.0, 3.0, 2.0, 1.0]), 3) + noise).astype(np.float32)
        d = decompose(a, rank=8)
        assert d.route == "randomized" and d.proof == proof
        check(a, d)


def test_zero_matrix():
    for shape in [(40, 30), (700, 600), (0, 5)]:
        d = decompose(np.zeros(shape, dtype=np.float32), rank=4)
        assert d.rank == 0 and d.total == 0.0 and d.residual2 == 0.0 and d.ratio_bound() == 1.0
        assert d.u.shape == (shape[0], 0) and d.vt.shape == (0, shape[1])
    assert decompose(np.zeros((50, 40)), energy=0.9).rank == 0


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_tiny_and_huge_float32(small, scale):
    """Entries far outside [2⁻⁴⁰, 2⁴⁰] are scaled by a power of two (exact): σ scales, U and V do not."""
    a = planted(220, 180, np.geomspace(1, 0.05, 20), 5, noise=0.1)
    ref = decompose(a.astype(np.float32), rank=6)
    big = decompose((a * scale).astype(np.float32), rank=6)
    assert big.route == "randomized"
    check((a * scale).astype(np.float32), big)
    assert big.sigma == pytest.approx(ref.sigma * scale, rel=1e-5)
    assert np.abs(np.abs(big.u.T @ ref.u).diagonal() - 1).max() < 1e-4


@pytest.mark.parametrize("scale", [1e-140, 1e150])
def test_tiny_and_huge_float64(small, scale):
    a = planted(220, 180, np.geomspace(1, 0.05, 20), 5, noise=0.1)
    d = decompose(a * scale, rank=6)
    assert d.route == "randomized"
    assert d.total == pytest.approx(float(((a * scale) ** 2).sum()), rel=1e-12)
    assert d.sigma == pytest.approx(oracle(a)[:6] * scale, rel=1e-10)
    assert d.ratio_bound() <= 1 + 1e-3
    with pytest.raises(NonFiniteUpdate):  # ‖ΔW‖²_F itself underflows float64
        decompose(a * 1e-170, rank=6)


def test_float32_input_is_decomposed_as_its_values(small):
    a = planted(300, 240, np.geomspace(1, 0.01, 50), 11, noise=0.02, dtype=np.float32)
    d = decompose(a, rank=20)
    assert d.route == "randomized"
    check(a, d)  # against the float64 SVD of the float32 values


def test_rank_at_least_min_side():
    a = planted(70, 50, np.geomspace(1, 0.01, 50), 2)
    for k in (50, 80):
        d = decompose(a, rank=k)
        assert d.route == "exact" and d.rank == 50 and d.ratio_bound() == 1.0
        check(a, d)
        assert d.residual2 <= 1e-24 + 1e-13 * d.total


def test_default_policy_routes():
    """Without patching: min(m, n) ≤ 512 is exact; larger with k + p ≤ min/4 is randomized, else exact."""
    a = planted(700, 600, np.geomspace(1, 0.01, 80), 4, noise=0.05, dtype=np.float32)
    d = decompose(a, rank=16)
    assert d.route == "randomized"
    check(a, d)
    assert decompose(a[:, :500], rank=16).route == "exact"
    d = decompose(a, rank=200)
    assert d.route == "exact" and d.proof == "gram-eigh"
    check(a, d)


@pytest.mark.parametrize("tau", [0.5, 0.8, 0.95])
def test_energy_mode_matches_energy_rank(small, tau):
    a = planted(260, 300, np.arange(1, 61) ** -0.8, 21, noise=0.05)
    s = oracle(a)
    d = decompose(a, energy=tau)
    assert d.rank == energy_rank(s, tau)
    check(a, d)
    if d.rank + max(8, d.rank // 4) <= 50:
        assert d.route == "randomized"


def test_energy_mode_large_rank_goes_exact(small):
    a = planted(260, 200, np.ones(150), 8, noise=0.2)
    d = decompose(a, energy=0.9)
    assert d.route == "exact" and d.rank == energy_rank(oracle(a), 0.9)
    check(a, d)


def test_float32_gram_blocks(small, monkeypatch):
    """The float32 Gram matrix (several syrk blocks, accumulated in float64) behind the certificate."""
    monkeypatch.setattr(factor, "F64_GRAM", 0)
    monkeypatch.setattr(factor, "GRAM_ROWS", 64)
    for dtype in (np.float32, np.float64):
        a = planted(330, 250, np.geomspace(1, 0.02, 60), 13, noise=0.1, dtype=dtype)
        d = decompose(a, rank=15)
        assert d.route == "randomized"
        check(a, d)
        d = decompose(a.T, rank=15)  # the wide form: Gram blocks from columns
        check(a.T, d)


def test_tight_tolerance(small):
    """A noise matrix (flat bulk) and a tolerance of 1e-9: whichever route gives it, the bound holds."""
    a = np.random.default_rng(4).standard_normal((240, 200))
    check(a, decompose(a, rank=20, tolerance=1e-9), tol=1e-9)


def test_failed_certificates_retry_then_go_exact(small, monkeypatch):
    """A certificate that fails once: the second attempt (deeper, wider, from TᵀU) is returned; one that
    always fails: the exact route, still right."""
    real, calls = factor.certify, []

    def failing(times):
        def certify(ritz, k, **kw):
            calls.append(ritz.sigma.shape[0])
            got = real(ritz, k, **kw)
            if len(calls) <= times:
                z = kw["rtimes"](ritz.u)
                return certificate.Certified(None, "cholesky", z)
            return got
        return certify

    a = planted(300, 260, np.geomspace(1, 0.02, 60), 5, noise=0.05)
    monkeypatch.setattr(factor, "certify", failing(1))
    d = decompose(a, rank=10)
    assert d.route == "randomized" and d.attempts == 2 and calls[1] > calls[0]
    check(a, d)
    calls.clear()
    monkeypatch.setattr(factor, "certify", failing(99))
    d = decompose(a, rank=10)
    assert d.route == "exact" and len(calls) == len(factor.SCHEDULE)
    check(a, d)


def test_vectors_false_and_seeds(small):
    a = planted(300, 250, np.geomspace(1, 0.02, 40), 9, noise=0.05)
    d = decompose(a, rank=10, vectors=False, seed=3)
    assert d.u is None and d.vt is None
    full = decompose(a, rank=10, seed=3)
    assert np.array_equal(d.sigma, full.sigma)
    assert decompose(a, rank=10, seed=3).sigma.tobytes() == full.sigma.tobytes()  # deterministic


def test_bad_requests():
    a = np.ones((4, 3))
    for kw in [{}, {"rank": 2, "energy": 0.5}, {"rank": -1}, {"rank": 1.5}, {"energy": 0.0},
               {"energy": 1.5}, {"rank": 2, "tolerance": 0.0}]:
        with pytest.raises(OptionError):
            decompose(a, **kw)
    with pytest.raises(OptionError):
        decompose(np.ones(5), rank=1)
    bad = np.ones((40, 30))
    bad[3, 4] = np.nan
    with pytest.raises(NonFiniteUpdate):
        decompose(bad, rank=2)


def test_kyfan_bound_against_dense_eigenvalues():
    """certificate.kyfan_upper with the true λ_max(K) bounds every Ky Fan sum of TᵀT from above, for a poor
    (random, unconverged) subspace; and the Cholesky test refuses μ below λ_max(K), certifies just above."""
    rng = np.random.default_rng(0)
    t = planted(120, 80, np.arange(1, 41) ** -0.5, 1, noise=0.3)
    v = np.linalg.qr(rng.standard_normal((80, 10)))[0]
    qb, rb = np.linalg.qr(t @ v)
    ur, sig, wt = np.linalg.svd(rb)
    u, v = qb @ ur, v @ wt.T
    r = t.T @ u - v * sig
    f = sig[:, None] * np.real(_sqrtm(r.T @ r))
    p = np.eye(80) - v @ v.T
    kmat = p @ t.T @ t @ p
    lam = np.linalg.eigvalsh(kmat)[-1]
    ky = certificate.kyfan_upper(sig**2, f, lam, 10)
    true = np.cumsum(np.linalg.eigvalsh(t.T @ t)[::-1][:10])
    assert np.all(ky >= true * (1 - 1e-12))
    gb = certificate.GramBound(80)
    gb.add_rows(t)
    gb.finish(certificate.gamma(120, certificate.U64))
    w = (t.T @ u) * sig - v * (sig**2 / 2)
    assert 0.5 * lam <= gb.largest(w, v) <= lam * (1 + 1e-5)  # a power-iteration estimate, from below
    assert gb.holds((w, v), lam * (1 - 1e-6)) is None
    held = gb.holds((w, v), lam * (1 + 1e-6))
    assert held is not None and held >= lam
    assert np.allclose(np.tril(gb.g), np.tril(t.T @ t), rtol=0, atol=1e-12 * (t**2).sum())  # S is kept


def _sqrtm(x):
    w, z = np.linalg.eigh((x + x.T) / 2)
    return (z * np.sqrt(np.maximum(w, 0))) @ z.T
