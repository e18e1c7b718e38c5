"""A certified upper bound on how far a rank-k approximation taken from a subspace is from the optimum.

Setting (``factor.py``'s randomized route). T is the tall form of ΔW (M×N, M ≥ N). A subspace of ℝ^N gives,
by Rayleigh–Ritz on T itself (float64), T V = U·diag(σ̂) with V (N×l) and U (M×l) orthonormal. The returned
approximation U_k Σ̂_k V_kᵀ = T·P with P = V_kV_kᵀ an orthogonal projector, so its residual is exactly
‖T‖²_F − Σ_{i≤k} σ̂ᵢ², and it is worse than the Eckart–Young optimum ‖T‖²_F − Σ_{i≤k} σᵢ² by exactly
Σ_{i≤k} σᵢ² − Σ_{i≤k} σ̂ᵢ² ≥ 0 (σ̂ᵢ ≤ σᵢ by Cauchy interlacing). ``bound`` is an upper bound on that gap.

**The bound (a proof, in exact arithmetic).** In the orthonormal basis [V, V⊥] of ℝ^N,

    TᵀT = [[Λ, G], [Gᵀ, D]],   Λ = Σ̂² (VᵀTᵀTV = Σ̂UᵀUΣ̂),   GGᵀ = Σ̂ RᵀR Σ̂ with R = TᵀU − VΣ̂,

since G = Σ̂UᵀT V⊥ and R = (I − VVᵀ)TᵀU; D is TᵀT compressed to V⊥, so its eigenvalues are those of
K = (I − VVᵀ)TᵀT(I − VVᵀ) (and zeros). If λ_max(K) ≤ μ then TᵀT ⪯ M′ = [[Λ, G], [Gᵀ, μI]] (the difference
diag(0, μI − D) is ⪰ 0), so by Weyl's monotonicity λᵢ(TᵀT) ≤ λᵢ(M′) for every i, and Σ_{i≤k} σᵢ² ≤
Σ_{i≤k} λᵢ(M′). With F = Σ̂(RᵀR)^{1/2} (FFᵀ = GGᵀ, so G = F Zᵀ with Z orthonormal), M′ has the eigenvalues
of the 2l×2l matrix [[Λ, F], [Fᵀ, μI]] and μ (N − 2l times): :func:`kyfan_upper` sums the top k. No gap is
assumed — unseen directions are charged μ each — so flat spectra and ties only cost precision, and the bound
is monotone in μ and in GGᵀ (Haynsworth inertia of the Schur complement), so over-estimates keep it valid.
μ comes from, cheapest first:

- ``frobenius``: λ_max(K) ≤ tr K = ‖T‖²_F − Σσ̂ᵢ², and RᵀR ⪯ ‖T(I − VVᵀ)‖²₂ I ⪯ (tr K) I with no pass;
- ``residual``: R from one float64 pass (TᵀU), with μ = tr K;
- ``cholesky``: μI − K̂ is factored by Cholesky (LAPACK ``potrf``) on the Gram matrix S = TᵀT the subspace
  came from (K̂ = Ŝ − SVVᵀ − VVᵀS + VΣ̂²Vᵀ with SV = TᵀUΣ̂ exact): success proves μI − K̂ + ΔH ⪰ 0 with
  |ΔH| ≤ γ_{N+1}|R̂ᵀ||R̂|, so λ_max(K̂) ≤ μ + γ_{N+1}·tr(μI − K̂)/(1 − γ_{N+1}) (Higham, *Accuracy and
  Stability of Numerical Algorithms*, 2nd ed., Thm 10.5 and §10.1.1; Demmel 1989), and λ_max(K) ≤
  λ_max(K̂) + ‖Ŝ − S‖₂;
- ``deflated``: the same test on K̂ formed directly as the float64 Gram matrix of T(I − VVᵀ) (one more pass),
  whose rounding is relative to tr K instead of ‖T‖²_F: for a k deep in a flat tail that carries a small
  share of the energy (a merged LoRA's rank exceeded into bf16 rounding noise), where Ŝ's float32 rounding
  is larger than the eigenvalues that matter.

**Rounding.** Ŝ is accumulated from float32 ``syrk`` blocks of b rows (or in float64): |Ŝ − S| ≤ γ_b|T|ᵀ|T|
entrywise in the worst case, so ‖Ŝ − S‖₂ ≤ γ_b‖T‖²_F (Higham §3.1, §3.5), added to μ. The float64 steps
(Ritz values, R, the small eigenproblems, ‖T‖²_F) are covered by first-order allowances of size
c·u·dim·‖T‖²_F (u = 2⁻⁵³): :func:`rounding_floor` φ bounds the rounding of the computed residual² and is
charged in :func:`ratio_bound`, which reports 1 when the residual² itself is below φ. This is first-order
a-priori error analysis, not interval arithmetic.

**What is probabilistic.** Only the cost: the Gaussian start makes the subspace good with high probability
(Halko, Martinsson & Tropp 2011, §10), so a certificate usually holds on the first try; when it does not,
``factor.decompose`` retries and finally takes the exact route. A returned bound is never a probability.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.linalg import blas, lapack

__all__ = ["U64", "U32", "gamma", "Proof", "Ritz", "Certified", "certify", "kyfan_upper", "rounding_floor",
           "ratio_bound", "GramBound"]

U64 = 2.0**-53  # unit roundoff, float64
U32 = 2.0**-24  # unit roundoff, float32
_COPY_BLOCK = 512  # columns per step of the triangle copies
_BISECT = 14  # bisection steps for the largest admissible μ

# how ``bound`` was obtained: dense SVD (bound 0); Gram eigenvectors; then the proofs above
Proof = Literal["svd", "gram-eigh", "frobenius", "residual", "cholesky", "deflated"]


def gamma(n: int, u: float) -> float:
    """γ_n = nu/(1 − nu) (Higham §3.1): the relative error bound of an n-term dot product."""
    nu = n * u
    return nu / (1.0 - nu) if nu < 0.5 else math.inf


def rounding_floor(m: int, n: int, width: int, total: float) -> float:
    """φ = 4u(M + N(1 + √l) + l²)·‖T‖²_F: a first-order bound on the rounding error of the computed
    residual² = ‖T‖²_F − Σσ̂ᵢ² (‖T‖²_F: γ_N + γ_M; B = fl(TV): 2γ_N√l·‖T‖²_F by Ky Fan; the float64 QR, SVD
    and V's orthogonality: O(l²u)), l = ``width`` Ritz vectors."""
    return 4.0 * U64 * (m + n * (1.0 + math.sqrt(width)) + width * width) * total


def ratio_bound(residual2: float, bound: float, floor: float) -> float:
    """An upper bound on ‖T − T_k‖_F / optimum given optimum² ≥ residual² − bound: 1.0 when residual² is at
    the rounding floor φ (the approximation is exact to working precision: no finer claim can be made in
    float64), else √((r² + φ)/(max(r² − bound, 0) + φ)), φ absorbing the rounding of r² itself."""
    if residual2 <= floor:
        return 1.0
    den = max(residual2 - bound, 0.0) + floor
    return math.sqrt((residual2 + floor) / den) if den > 0.0 else math.inf


@dataclass
class Ritz:
    """T V = U·diag(σ̂): U (M×l) and V (N×l) orthonormal, σ̂ descending (float64)."""

    u: np.ndarray
    sigma: np.ndarray
    v: np.ndarray


@dataclass
class Certified:
    bound: float | None  # None: no proof within the tolerance
    proof: Proof
    z: np.ndarray | None  # TᵀU (N×l) when the residual pass ran: a float64 power step for a retry


def kyfan_upper(sig2: np.ndarray, f: np.ndarray, mu: float, count: int) -> np.ndarray:
    """Upper bounds on Σ_{i≤j} σᵢ(T)² for j = 1..count: cumulative sums of the top ``count`` eigenvalues of
    [[Λ, F], [Fᵀ, μI]] and ``count`` copies of μ (more copies of μ than M′ has only raise them)."""
    nl = sig2.shape[0]
    m = np.zeros((2 * nl, 2 * nl))
    m[np.arange(nl), np.arange(nl)] = sig2
    m[:nl, nl:] = f
    m[nl:, :nl] = f.T
    m[np.arange(nl, 2 * nl), np.arange(nl, 2 * nl)] = mu
    ev = np.linalg.eigvalsh(m)
    top = np.sort(np.concatenate([ev, np.full(count, mu)]))[::-1][:count]
    return np.cumsum(top)


def _coupling(sigma: np.ndarray, rtr: np.ndarray, delta: float) -> tuple[np.ndarray, float]:
    """F = Σ̂(R̂ᵀR̂ + sI)^{1/2} and ‖R̂‖²₂, where s = 2‖R̂‖δ + δ² covers ‖R − R̂‖₂ ≤ δ (RᵀR ⪯ R̂ᵀR̂ + sI)."""
    w, z = np.linalg.eigh((rtr + rtr.T) / 2)
    norm2 = float(max(w[-1], 0.0)) if w.size else 0.0
    slack = 2.0 * math.sqrt(norm2) * delta + delta * delta
    root = (z * np.sqrt(np.maximum(w, 0.0) + slack)) @ z.T
    return sigma[:, None] * root, norm2


def _largest_admissible(ok: Callable[[float], bool], lo: float, hi: float) -> float | None:
    """The largest μ in [lo, hi] (from below, to ~1 %) with ``ok(μ)`` for a predicate that holds up to some μ*
    and fails beyond it; None when ``ok(lo)`` fails."""
    if not ok(lo):
        return None
    if ok(hi):
        return hi
    a, b = lo, hi
    for _ in range(_BISECT):
        mid = math.sqrt(a * b) if a > 0 else (a + b) / 2
        a, b = (mid, b) if ok(mid) else (a, mid)
        if b <= a * 1.01:
            break
    return a


def certify(ritz: Ritz, k: int, *, shape: tuple[int, int], total: float, tolerance: float, cap: float,
            rtimes: Callable[[np.ndarray], np.ndarray], gram: GramBound, estimate: float = 0.0,
            deflate: Callable[[Ritz], GramBound] | None = None) -> Certified:
    """A bound on Σ_{i≤k} σᵢ² − Σ_{i≤k} σ̂ᵢ² small enough that :func:`ratio_bound` ≤ 1 + ``tolerance``, by the
    cheapest proof that gives one. In energy mode ``cap`` (τ·‖T‖²_F) must also exceed the bound on
    Σ_{i<k} σᵢ², which proves k is the energy rank. ``rtimes(U)`` = TᵀU in float64; ``estimate``: about
    λ_max(K) (the next Ritz value of the range finder; 0: estimate it by power iteration on K̂);
    ``deflate(ritz)``: K̂ as the float64 Gram matrix of T(I − VVᵀ) itself, for when Ŝ's rounding (relative to
    ‖T‖²_F) is too coarse for the unseen part's spectrum (relative to tr K)."""
    m, n = shape
    sig = ritz.sigma
    sig2 = sig**2
    width = sig.shape[0]
    floor = rounding_floor(m, n, width, total)
    res2 = max(total - float(sig2[:k].sum()), 0.0)
    outside = max(total - float(sig2.sum()), 0.0) + floor  # tr K, with the rounding of both sums

    def verdict(f: np.ndarray, mu: float) -> float | None:
        cum = kyfan_upper(sig2, f, mu, k)
        extra = max(float(cum[k - 1] - sig2[:k].sum()), 0.0)
        fits = ratio_bound(res2, extra, floor) <= 1.0 + tolerance
        return extra if fits and not (k > 1 and cum[k - 2] >= cap) else None

    bound = verdict(math.sqrt(outside) * np.diag(sig), outside)
    if bound is not None:
        return Certified(bound, "frobenius", None)
    z = rtimes(ritz.u)
    r = z - ritz.v * sig  # R = (I − VVᵀ)TᵀU
    delta = (gamma(m, U64) + 4 * width * U64) * math.sqrt(width * total)  # ‖R − R̂‖₂ (first order)
    f, norm2 = _coupling(sig, r.T @ r, delta)
    bound = verdict(f, outside)
    if bound is not None:
        return Certified(bound, "residual", z)
    w = z * sig - ritz.v * (sig2 / 2)  # K̂ = Ŝ − wVᵀ − Vwᵀ, w = SV − ½VΣ̂²
    # rounding of K̂ beyond Ŝ's own: TᵀU and its products with Σ̂ and V (first order), syr2k, subtraction
    extra = (gram.rel_error + 2 * math.sqrt(width) * gamma(m, U64) + gamma(2 * width, U64)
             + 8 * (width + 1) * U64) * total
    theta = max(norm2, estimate if estimate > 0 else gram.largest(w, ritz.v), 0.0)  # λ_max(K) ≳ θ
    trial = _Trial(verdict, f, theta, outside, n)
    bound = trial.run(gram, (w, ritz.v), extra)
    if bound is not None:
        return Certified(bound, "cholesky", z)
    if deflate is None or extra <= 0.01 * theta:
        return Certified(None, "cholesky", z)
    kgram = deflate(ritz)
    return Certified(trial.run(kgram, None, kgram.rel_error * total), "deflated", z)


@dataclass
class _Trial:
    """The Cholesky proof of λ_max(K) ≤ μ at 1.1× the estimate θ (the tightest bound worth proving), then, if
    that fails, at the largest μ the tolerance allows."""

    verdict: Callable[[np.ndarray, float], float | None]
    f: np.ndarray
    theta: float
    outside: float
    n: int

    def run(self, gram: GramBound, update: tuple[np.ndarray, np.ndarray] | None, extra: float) -> float | None:
        gam = gamma(self.n + 1, U64)
        grow = 1.0 + self.n * gam / (1.0 - gam)  # Cholesky's margin, with tr(μI − K̂) ≤ Nμ

        def ok(mu: float) -> bool:
            return self.verdict(self.f, mu * grow + extra) is not None

        theta, first = self.theta, 1.1 * self.theta
        if theta > 0 and ok(first):
            held = gram.holds(update, first)
            if held is not None:
                return self.verdict(self.f, held + extra)
            theta = first
        best = _largest_admissible(ok, theta, max(self.outside, theta))
        held = gram.holds(update, best) if best is not None and best > 1.01 * theta else None
        return None if held is None else self.verdict(self.f, held + extra)


class GramBound:
    """S = TᵀT (N×N float64; the lower triangle is S, the upper one too unless a Cholesky test used it) with a
    bound ``rel_error``·‖T‖²_F on ‖Ŝ − S‖₂, a float32 copy (both triangles) for the products, and the Cholesky
    test of λ_max((I − VVᵀ)S(I − VVᵀ)) ≤ μ, built in the upper triangle of the same buffer (``potrf`` with
    uplo='U' leaves the lower one alone)."""

    def __init__(self, n: int) -> None:
        self.g = np.zeros((n, n), order="F")
        self.diag = np.zeros(n)
        self.rel_error = 0.0
        self.s32: np.ndarray | None = None
        self._scratch: np.ndarray | None = None

    def add_rows(self, x: np.ndarray) -> None:
        """S += xᵀx (the lower triangle) for a block x (b×N, any strides) of T's rows: float64 ``dsyrk`` straight
        into S, or float32 ``ssyrk`` (numpy's matmul, which takes syrk too, for strided x) into a scratch that is
        added in float64."""
        if x.dtype == np.float64:
            a, trans = (x, 1) if x.flags.f_contiguous else (np.ascontiguousarray(x).T, 0)
            blas.dsyrk(1.0, a, beta=1.0, c=self.g, trans=trans, lower=1, overwrite_c=1)
            return
        if self._scratch is None:
            self._scratch = np.zeros(self.g.shape, dtype=np.float32, order="F")
        if x.flags.c_contiguous:  # the lower triangle is all that counts: finish() mirrors it
            blas.ssyrk(1.0, x.T, beta=0.0, c=self._scratch, trans=0, lower=1, overwrite_c=1)
        else:
            np.matmul(x.T, x, out=self._scratch)
        self.g += self._scratch

    def finish(self, rel_error: float, copy32: bool = True) -> None:
        """Mirror S into the upper triangle; ``rel_error`` bounds ‖Ŝ − S‖₂/‖T‖²_F."""
        self._scratch = None
        _mirror(self.g)
        self.diag = self.g.diagonal().copy()
        self.rel_error = rel_error
        self.s32 = self.g.astype(np.float32, order="F") if copy32 else None

    def mul(self, x: np.ndarray) -> np.ndarray:
        """Ŝx in float32 (the subspace iteration only needs the span)."""
        s = self.s32 if self.s32 is not None else self.g.astype(np.float32)
        return s @ x.astype(np.float32, copy=False)

    def kx(self, w: np.ndarray, v: np.ndarray, x: np.ndarray) -> np.ndarray:
        """K̂x = Ŝx − w(vᵀx) − v(wᵀx), where K̂ = Ŝ − wvᵀ − vwᵀ (see :meth:`holds`); Ŝx in float32."""
        return self.mul(x) - w @ (v.T @ x) - v @ (w.T @ x)

    def holds(self, update: tuple[np.ndarray, np.ndarray] | None, mu: float) -> float | None:
        """If Cholesky of μI − K̂ succeeds, μ plus Demmel's margin (a certified bound on λ_max(K̂)); else None.
        K̂ = Ŝ − wvᵀ − vwᵀ for ``update`` (w, v) (with v = V′ and w = SV′ − ½V′Σ̂²: (I − V′V′ᵀ)S(I − V′V′ᵀ) +
        (Ŝ − S)), or Ŝ itself."""
        g, n = self.g, self.g.shape[0]
        _mirror(g, -1.0)  # upper(g) = −S, from the lower triangle
        g[np.arange(n), np.arange(n)] = mu - self.diag
        if update is not None:
            w, v = update
            blas.dsyr2k(1.0, np.asfortranarray(w), np.asfortranarray(v), beta=1.0, c=g, trans=0, lower=0,
                        overwrite_c=1)
        trace = float(g.diagonal().sum())
        _, info = lapack.dpotrf(g, lower=0, clean=0, overwrite_a=1)
        g[np.arange(n), np.arange(n)] = self.diag  # the lower triangle is intact: S again after a mirror
        if self.s32 is None:
            _mirror(g)
        if info != 0 or not trace >= 0.0:
            return None
        gam = gamma(n + 1, U64)
        return mu + gam * trace / (1.0 - gam)

    def largest(self, w: np.ndarray, v: np.ndarray, steps: int = 4, width: int = 8) -> float:
        """An estimate (a Rayleigh–Ritz value: from below) of λ_max(K̂) by block power iteration: where to
        try the Cholesky test first."""
        n = self.g.shape[0]
        x = np.linalg.qr(np.random.default_rng(0).standard_normal((n, min(width, n))))[0]
        for _ in range(steps):
            x = np.linalg.qr(self.kx(w, v, x))[0]
        h = x.T @ self.kx(w, v, x)
        return float(np.linalg.eigvalsh((h + h.T) / 2)[-1])


def _mirror(g: np.ndarray, sign: float = 1.0) -> None:
    """upper(g) = sign·lower(g)ᵀ, block by block (no N×N temporary)."""
    n = g.shape[0]
    for j0 in range(0, n, _COPY_BLOCK):
        j1 = min(n, j0 + _COPY_BLOCK)
        np.multiply(g[j0:j1, :j0].T, sign, out=g[:j0, j0:j1])
        blk = g[j0:j1, j0:j1]
        iu = np.triu_indices(j1 - j0, 1)
        blk[iu] = sign * blk.T[iu]
