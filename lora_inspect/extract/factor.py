"""The best rank-k approximation of a dense ΔW (Eckart–Young), with a certificate. numpy/scipy only.

ΔW (m×n) is handled as its tall form T (ΔW, or ΔWᵀ when m < n; M×N, M ≥ N), read in float64 row blocks, never
copied whole except on the small dense route. Everything returned is float64.

**Randomized route.** S = TᵀT (float32 ``syrk`` blocks of ``GRAM_ROWS`` rows summed in float64; ``dsyrk`` when
cheap), then block Krylov on S: the fully reorthogonalised block Lanczos basis of span[X, SX, …, S^q X], X
Gaussian (``np.random.default_rng(seed)``), and its top l Ritz vectors (Golub & Underwood 1977; Musco & Musco,
"Randomized block Krylov methods", NeurIPS 2015: each S product is a power step TᵀT of Halko, Martinsson &
Tropp 2011, Alg. 4.4, and the space converges like √gap, not gap); S's own top-l eigenvectors (``syevr``) when
that space would be half of ℝ^N. Then Rayleigh–Ritz on T in float64: B = TV = Q_B R_B (CholeskyQR2),
R_B = U_r Σ̂ Wᵀ, U = Q_B U_r, V′ = VW, so U_kΣ̂_kV′_kᵀ = T·V′_kV′_kᵀ and ‖T − U_kΣ̂_kV′_kᵀ‖²_F = ‖T‖²_F −
Σ_{i≤k} σ̂ᵢ² exactly (``residual2``). :mod:`.certificate` proves the distance to the optimum; failing 1 +
tolerance, the next attempt of ``SCHEDULE`` starts from TᵀU (a float64 power step on T) deeper and wider, and
the last resort is the exact route. Depth q (:func:`_depth`, 6–10) makes the space ~``KRYLOV_SPAN`` wide: on
slowly decaying spectra (σᵢ ∝ i^-0.5) the residual is then within ~1e-13 of the optimum.

**Exact route.** N ≤ ``SMALL_SIDE``: ``gesdd`` of T in float64 (``gesvd`` if it does not converge), bound 0.
Larger: the float64 Gram matrix's top-k eigenvectors (``eigh``, ``subset_by_index``) and the same
Rayleigh–Ritz step; ‖Ŝ − S‖₂ ≤ (γ_M + 4Nu)‖T‖²_F (with ``syevr``'s backward error), so the subspace keeps all
but 2k‖Ŝ − S‖₂ of the optimal energy: its ``bound``. When that misses the tolerance (σ_k² near the Gram
matrix's rounding floor, ~N·u·σ₁²), ``gesdd``.

**Cost model.** With l = k + p and depth q the randomized route costs MN² (float32 Gram, ~3× the float64
rate), q + 1 products 2N²l, two float64 passes 2MNl, a Cholesky N³/3 and O(N(ql)²) Gram–Schmidt, all BLAS-3;
the exact route MN² plus a tridiagonal reduction (4/3)N³ at BLAS-2 speed (~22 s for N = 4096 on 2 busy
cores, against 2–4 s for the whole randomized route on one), or ~4MN² + 8N³ (``gesdd``). So: randomized when
N > ``SMALL_SIDE`` and l ≤ N/``WIDE_FRACTION`` (energy mode grows l, exact once it would pass that). Memory:
ΔW, the Gram matrix (12N² bytes: float64 and float32; 8N² more for the ``deflated`` proof), O((M + N)·ql).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import scipy.linalg as sla
from scipy.linalg import blas

from ..errors import NonFiniteUpdate, OptionError
from ..spectrum import energy_rank
from .certificate import U32, U64, GramBound, Proof, Ritz, certify, gamma, ratio_bound, rounding_floor
from .dense import orth, thin_qr, thin_svd

__all__ = ["Route", "Proof", "Decomposition", "decompose", "SMALL_SIDE", "WIDE_FRACTION", "SCHEDULE"]

Route = Literal["exact", "randomized"]

SMALL_SIDE = 512  # exact dense SVD when min(m, n) is at most this
WIDE_FRACTION = 4  # randomized only while k + p ≤ min(m, n)/4
SCHEDULE = ((1, 0), (2, 2), (4, 4))  # per attempt: (oversampling multiple, Krylov depth added to _depth)
KRYLOV_SPAN = 768  # directions the first Krylov space should span (see _depth)
ROW_ELEMENTS = 1 << 22  # elements per float64 row block of ΔW (32 MiB)
GRAM_ROWS = 2048  # rows per float32 syrk block: error ≤ γ_2048(float32)·‖T‖²_F ≈ 1.2e-4·‖T‖²_F
F64_GRAM = 1 << 31  # the Gram matrix in float64 when M·N² is at most this (cheap anyway)
_SAFE = 2.0**40  # |entries| in [2⁻⁴⁰, 2⁴⁰] need no scaling for float32 Gram blocks


@dataclass
class Decomposition:
    """ΔW ≈ u·diag(sigma)·vt, the best rank-k approximation within :meth:`ratio_bound`."""

    sigma: np.ndarray  # (k,) float64, descending (σ̂ on the randomized route)
    u: np.ndarray | None  # (m, k) float64 orthonormal, or None when vectors=False
    vt: np.ndarray | None  # (k, n) float64 orthonormal rows
    total: float  # ‖ΔW‖²_F, float64 accumulation
    route: Route
    bound: float  # certified upper bound on residual² − optimum² (0.0 for a dense SVD)
    spectrum: np.ndarray  # every singular value computed, descending (≥ k of them)
    floor: float = 0.0  # first-order rounding allowance φ of the float64 steps (certificate.rounding_floor)
    proof: Proof = "svd"
    depth: int = 0  # Krylov depth q of the randomized route (each step a power step TᵀT)
    oversampling: int = 0  # p = l − k
    attempts: int = 1

    @property
    def rank(self) -> int:
        return int(self.sigma.shape[0])

    @property
    def residual2(self) -> float:
        """‖ΔW − UΣVᵀ‖²_F = total − Σσᵢ² (UΣVᵀ = ΔW·P, P an orthogonal projector), clipped at 0."""
        return max(self.total - float(np.dot(self.sigma, self.sigma)), 0.0)

    def ratio_bound(self) -> float:
        """Certified upper bound on ‖ΔW − UΣVᵀ‖_F / √(optimum² + floor) (1.0 for a dense SVD)."""
        return ratio_bound(self.residual2, self.bound, self.floor)


def decompose(delta: np.ndarray, *, rank: int | None = None, energy: float | None = None, vectors: bool = True,
              seed: int = 0, tolerance: float = 1e-3) -> Decomposition:
    """The top-min(rank, m, n) singular triplets of ``delta``, or (``energy`` τ ∈ (0, 1]) those of its energy
    rank: the smallest k with Σ_{i≤k} σᵢ² ≥ τ·‖ΔW‖²_F (:func:`lora_inspect.spectrum.energy_rank`).
    ``ratio_bound()`` of the result is at most 1 + ``tolerance``. ``delta`` is never modified."""
    if (rank is None) == (energy is None):
        raise OptionError("rank", "give exactly one of rank and energy")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 0):
        raise OptionError("rank", f"rank must be a whole number ≥ 0, not {rank!r}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise OptionError("energy", f"energy must be in (0, 1], not {energy!r}")
    if not 0.0 < tolerance < 1.0:
        raise OptionError("tolerance", f"tolerance must be in (0, 1), not {tolerance!r}")
    a = np.asarray(delta)
    if a.ndim != 2:
        raise OptionError("delta", f"ΔW must be 2-D, not {a.shape}")
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float32 if a.dtype.itemsize <= 4 else np.float64)
    op = _Tall(a)
    want = _Want(None if rank is None else min(int(rank), op.n), energy)
    if op.n == 0 or op.scale == 0.0 or want.rank == 0:
        return op.finish(_empty(op), vectors)
    out = None
    if op.n > SMALL_SIDE:
        out = _randomized(op, want, tolerance, np.random.default_rng(seed)) or _exact_gram(op, want, tolerance)
    elif op.m >= 2 * op.n:  # small and tall (a 512×2048 k/v projection): M·N² + eigh(N) beats gesdd's 4MN² + 8N³
        out = _exact_gram(op, want, tolerance)
    return op.finish(out or _exact_dense(op, want, vectors), vectors)


@dataclass
class _Want:
    rank: int | None
    energy: float | None

    def k(self, sigma: np.ndarray, total: float) -> int | None:
        """The rank asked for; in energy mode the energy rank of ``sigma`` against ``total``, None when
        ``sigma`` does not reach the target (energy_rank's slack: τ·total·(1 − 1e-12))."""
        if self.rank is not None:
            return min(self.rank, sigma.shape[0])
        cum = np.cumsum(sigma**2)
        if not cum.size or cum[-1] < self.cap(total):
            return None
        return int(np.searchsorted(cum, self.cap(total), side="left")) + 1

    def cap(self, total: float) -> float:
        return math.inf if self.energy is None else self.energy * total * (1 - 1e-12)


class _Tall:
    """T = ΔW or ΔWᵀ (M×N, M ≥ N) times a power of two ``scale`` (exact) that keeps every square in range.
    ΔW is read in row blocks of its own layout (the Gram matrix of a wide ΔW: column blocks, as strided views);
    decompositions of s·T are oriented back and unscaled by :meth:`finish`."""

    def __init__(self, a: np.ndarray) -> None:
        self.a = a
        self.flip = a.shape[0] < a.shape[1]
        self.m, self.n = (a.shape[1], a.shape[0]) if self.flip else a.shape
        self.rows = max(1, ROW_ELEMENTS // max(a.shape[1], 1))
        self.scale = _scale(a)
        self.total = math.nan  # ‖s·T‖²_F, set by the first float64 pass

    def blocks(self) -> Iterator[tuple[slice, np.ndarray]]:
        """Row blocks of s·ΔW in float64: views of a float64 input, else converted into one reused buffer; the
        first pass also sets ``total`` (row sums, then rows: error ≤ (γ_n + γ_m)·total)."""
        a, rows, first = self.a, self.rows, math.isnan(self.total)
        buf = None if a.dtype == np.float64 and self.scale == 1.0 else np.empty((rows, a.shape[1]))
        total = 0.0
        for i in range(0, a.shape[0], rows):
            j = min(i + rows, a.shape[0])
            if buf is None:
                x = a[i:j]
            else:
                x = buf[: j - i]
                np.copyto(x, a[i:j])
                if self.scale != 1.0:
                    x *= self.scale
            if first:
                total += float(np.einsum("ij,ij->i", x, x).sum())
            yield slice(i, j), x
        if first:
            if not math.isfinite(total):
                raise NonFiniteUpdate("ΔW has non-finite values")
            self.total = total

    def _a_times(self, v: np.ndarray) -> np.ndarray:
        """(s·ΔW)V in float64, row block by row block."""
        out = np.empty((self.a.shape[0], v.shape[1]))
        for sl, x in self.blocks():
            np.matmul(x, v, out=out[sl])
        return out

    def _at_times(self, u: np.ndarray) -> np.ndarray:
        """(s·ΔW)ᵀU in float64: row blocks accumulated by ``dgemm`` with β = 1, x never copied."""
        acc = np.zeros((self.a.shape[1], u.shape[1]), order="F")
        for sl, x in self.blocks():
            blas.dgemm(1.0, x.T, u[sl], beta=1.0, c=acc, overwrite_c=1)
        return acc

    def times(self, v: np.ndarray) -> np.ndarray:
        """(s·T)V (M×l, float64)."""
        return self._at_times(v) if self.flip else self._a_times(v)

    def rtimes(self, u: np.ndarray) -> np.ndarray:
        """(s·T)ᵀU (N×l, float64)."""
        return self._a_times(u) if self.flip else self._at_times(u)

    def gram(self, f64: bool) -> GramBound:
        """Ŝ = (s·T)ᵀ(s·T) and ‖Ŝ − S‖₂/‖T‖²_F: float64 (asked for, or M·N² small: γ_M), else float32 blocks of
        ``GRAM_ROWS`` rows of T (``syrk`` through numpy's matmul, strided views, no copies) accumulated in
        float64 (γ_b(float32) + γ_blocks(float64))."""
        gb, a = GramBound(self.n), self.a
        wide = f64 or self.m * self.n * self.n <= F64_GRAM
        step = self.rows if wide else GRAM_ROWS
        for i in range(0, self.m, step):
            x = a[:, i:i + step].T if self.flip else a[i:i + step]
            if wide or a.dtype != np.float32 or self.scale != 1.0:
                x = (x * self.scale).astype(np.float64 if wide else np.float32)
            gb.add_rows(x)
        if wide:
            gb.finish(gamma(self.m, U64), copy32=not f64)
        else:
            conv = 2 if a.dtype != np.float32 else 0  # float64 → float32 rounding of each factor
            gb.finish(gamma(GRAM_ROWS + conv, U32) + gamma(-(-self.m // GRAM_ROWS) + 1, U64))
        return gb

    def deflated(self, rz: Ritz) -> GramBound:
        """K̂ = XᵀX for X = s·T − UΣ̂Vᵀ = s·T(I − VVᵀ), in float64 (``dsyrk``), with its rounding bound
        (γ_M·tr K plus the forming of X, relative to ‖T‖²_F): the certificate's last proof."""
        gb, b, vt = GramBound(self.n), rz.u * rz.sigma, rz.v.T
        if self.flip:  # rows of T are columns of ΔW
            step = max(1, ROW_ELEMENTS // self.n)
            for j in range(0, self.m, step):
                gb.add_rows(self.a[:, j:j + step].T.astype(np.float64) * self.scale - b[j:j + step] @ vt)
        else:
            for sl, x in self.blocks():
                gb.add_rows(x - b[sl] @ vt)
        trace, width = float(np.trace(gb.g)), b.shape[1]
        dx = 4 * (width + 1) * U64 * math.sqrt(width * self.total)  # ‖X̂ − X‖_F, first order
        gb.finish((gamma(self.m, U64) * trace + 2 * math.sqrt(trace) * dx + dx * dx) / self.total, copy32=False)
        return gb

    def finish(self, d: Decomposition, vectors: bool) -> Decomposition:
        """Orient back to ΔW (ΔW = Tᵀ ≈ V Σ Uᵀ when flipped) and undo the scale."""
        s = self.scale or 1.0
        total = d.total / (s * s)
        if d.total > 0 and not 0.0 < total < math.inf:
            raise NonFiniteUpdate("‖ΔW‖²_F is outside float64's range")
        u, vt = (d.u, d.vt) if vectors else (None, None)
        if self.flip and u is not None and vt is not None:
            u, vt = np.ascontiguousarray(vt.T), np.ascontiguousarray(u.T)
        return replace(d, sigma=d.sigma / s, u=u, vt=vt, total=total, bound=d.bound / (s * s),
                       spectrum=d.spectrum / s, floor=d.floor / (s * s))


def _scale(a: np.ndarray) -> float:
    """1.0 when the largest |entry| is in [2⁻⁴⁰, 2⁴⁰], else the power of two that brings it near 1; 0.0 for
    an all-zero ΔW."""
    if a.size == 0:
        return 0.0
    with np.errstate(invalid="ignore"):
        amax = max(abs(float(a.max())), abs(float(a.min())))
    if math.isnan(amax) or math.isinf(amax):
        raise NonFiniteUpdate("ΔW has non-finite values")
    if amax == 0.0 or 1 / _SAFE <= amax <= _SAFE:
        return 1.0 if amax else 0.0
    return math.ldexp(1.0, -math.frexp(amax)[1])


def _empty(op: _Tall) -> Decomposition:
    if op.scale != 0.0 and math.isnan(op.total):
        for _ in op.blocks():  # sets the total
            pass
    z = np.zeros(0)
    return Decomposition(z, np.zeros((op.m, 0)), np.zeros((0, op.n)), op.total if op.scale else 0.0, "exact", 0.0, z)


def _oversampling(k: int) -> int:
    return max(8, k // 4)


def _ritz(op: _Tall, v: np.ndarray) -> Ritz:
    """Rayleigh–Ritz from the right: B = (s·T)V in float64, B = Q_B R_B, R_B = U_r Σ̂ Wᵀ (float64 SVD)."""
    qb, rb, _ = thin_qr(op.times(v))
    ur, sig, wt = thin_svd(rb)
    return Ritz(qb @ ur, sig, v @ wt.T)


def _krylov(gram: GramBound, warm: np.ndarray | None, width: int, depth: int,
            rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """The top ``width`` Ritz vectors (N×l, orthonormal) of Ŝ in span[X, ŜX, …, Ŝ^q X], X = [W, Ω] (W from the
    previous attempt, Ω Gaussian): block Lanczos, fully reorthogonalised (block classical Gram–Schmidt twice),
    H = QᵀŜQ from the Gram–Schmidt coefficients; ŜX in float32 (only the span matters), the basis in float64.
    When the space would be half of ℝ^N or more, Ŝ's own top eigenvectors. Also the next Ritz value: about
    λ_{l+1}(S) ≤ λ_max of S outside the subspace, where the certificate's Cholesky test starts."""
    n = gram.g.shape[0]
    if 2 * width * (depth + 1) >= n:  # the space would be most of ℝ^N: Ŝ's own top eigenvectors (syevr)
        w, z = sla.eigh(gram.g, subset_by_index=[n - width - 1, n - 1], check_finite=False)
        return orth(z[:, :0:-1]), float(w[0])  # syevr's vectors can lose orthogonality in tight clusters
    x = rng.standard_normal((n, width))
    if warm is not None:
        have = min(warm.shape[1], width)
        x[:, :have] = warm[:, :have]
    size = width * (depth + 1)
    basis, h = np.empty((n, size)), np.zeros((size, size))
    basis[:, :width] = orth(x)
    for i in range(depth + 1):
        cur, done = slice(i * width, (i + 1) * width), slice(0, (i + 1) * width)
        q, y = basis[:, done], gram.mul(basis[:, cur]).astype(np.float64)
        c = q.T @ y  # Qᵀ Ŝ X_i: column block i of H
        if i < depth:
            y -= q @ c
            c2 = q.T @ y
            y -= q @ c2
            c += c2
            basis[:, (i + 1) * width:(i + 2) * width] = orth(y, against=q)
        h[done, cur] = c
    h = np.triu(h) + np.triu(h, 1).T  # symmetric block tridiagonal in exact arithmetic
    w, z = sla.eigh(h, subset_by_index=[max(size - width - 1, 0), size - 1], check_finite=False)
    return orth(basis @ z[:, ::-1][:, :width]), float(w[0]) if size > width else 0.0


def _depth(width: int) -> int:
    """First-attempt Krylov depth: a space of ~``KRYLOV_SPAN`` directions, 6 to 10 steps."""
    return max(6, min(10, -(-KRYLOV_SPAN // width) - 1))


def _randomized(op: _Tall, want: _Want, tol: float, rng: np.random.Generator) -> Decomposition | None:
    """The randomized route, or None when the cost model or the certificate sends the matrix to the exact
    route. Energy mode starts at l = 60 and doubles l until the Ritz values reach the target."""
    k0 = want.rank if want.rank is not None else 48
    width = k0 + _oversampling(k0)
    if width * WIDE_FRACTION > op.n:
        return None
    gram = op.gram(f64=False)
    attempt, warm = 0, None
    while width * WIDE_FRACTION <= op.n:
        depth = _depth(width) + SCHEDULE[attempt][1]
        v, beyond = _krylov(gram, warm, width, depth, rng)
        rz = _ritz(op, v)
        k = want.k(rz.sigma, op.total)
        if k is None or width < k + _oversampling(k):  # energy target not reached in this subspace
            width, warm = max(2 * width, (k or 0) + _oversampling(k or 0)), rz.v
            continue
        cert = certify(rz, k, shape=(op.m, op.n), total=op.total, tolerance=tol, cap=want.cap(op.total),
                       rtimes=op.rtimes, gram=gram, estimate=beyond, deflate=op.deflated)
        if cert.bound is not None:
            return Decomposition(rz.sigma[:k].copy(), rz.u[:, :k].copy(), rz.v[:, :k].T.copy(), op.total,
                                 "randomized", cert.bound, rz.sigma.copy(),
                                 rounding_floor(op.m, op.n, width, op.total), cert.proof, depth, width - k,
                                 attempt + 1)
        attempt += 1
        if attempt == len(SCHEDULE) or cert.z is None:
            return None
        width = k + SCHEDULE[attempt][0] * _oversampling(k)
        warm = orth(cert.z)  # a float64 power step on T itself: Tᵀ(T V)
    return None


def _exact_dense(op: _Tall, want: _Want, vectors: bool) -> Decomposition:
    """gesdd of s·T in float64 (a copy: the small route, and the last resort)."""
    t64 = (op.a.T if op.flip else op.a).astype(np.float64) * op.scale
    total = float(np.einsum("ij,ij->i", t64, t64).sum())
    if not math.isfinite(total):
        raise NonFiniteUpdate("ΔW has non-finite values")
    if vectors or want.energy is not None:
        u, s, vt = thin_svd(t64)
    else:
        s = np.linalg.svd(t64, compute_uv=False)
        u, vt = np.zeros((op.m, 0)), np.zeros((0, op.n))
    k = min(want.rank if want.rank is not None else energy_rank(s, want.energy or 1.0), s.shape[0])
    uk, vtk = (u[:, :k], vt[:k]) if u.shape[1] >= k else (None, None)
    return Decomposition(s[:k].copy(), uk, vtk, total, "exact", 0.0, s.copy(), rounding_floor(op.m, op.n, 1, total))


def _exact_gram(op: _Tall, want: _Want, tol: float) -> Decomposition | None:
    """Top-k eigenvectors of the float64 Gram matrix, then Rayleigh–Ritz on T; None (→ gesdd) when the
    Gram matrix's rounding does not allow the tolerance."""
    gb, n = op.gram(f64=True), op.n
    spectrum = None
    if want.rank is not None:
        k = want.rank
    else:
        spectrum = np.sqrt(np.maximum(sla.eigh(gb.g, eigvals_only=True, check_finite=False)[::-1], 0.0))
        k = energy_rank(spectrum, want.energy or 1.0)
    v = sla.eigh(gb.g, subset_by_index=[n - k, n - 1], check_finite=False)[1]
    del gb
    rz = _ritz(op, orth(v[:, ::-1]))  # syevr's vectors can lose orthogonality in tight clusters
    total = op.total  # set by the Rayleigh–Ritz pass
    bound = 2 * k * (gamma(op.m, U64) + 4 * n * U64) * total
    floor = rounding_floor(op.m, n, k, total)
    if ratio_bound(max(total - float(np.dot(rz.sigma, rz.sigma)), 0.0), bound, floor) > 1.0 + tol:
        return None
    if spectrum is None:
        spectrum = rz.sigma.copy()
    else:
        spectrum[:k] = rz.sigma
    return Decomposition(rz.sigma.copy(), rz.u.copy(), rz.v.T.copy(), total, "exact", bound, spectrum, floor,
                         "gram-eigh")
