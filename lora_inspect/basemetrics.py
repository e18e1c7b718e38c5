"""Base-aware metrics: how an adapter's ΔW relates to the base weight W it is added to.

Definitions, sources and costs are in ``docs/metrics.md`` ("Base-aware metrics"). For ΔW = U_Δ Σ_Δ V_Δᵀ
(its thin SVD, from the factors: :func:`lora_inspect.spectrum.svd_factors`, never the dense product):

- relative update ρ_F = ‖ΔW‖_F / ‖W‖_F and ρ₂ = σ₁(ΔW) / σ₁(W); σ₁(W) by seeded subspace iteration
  (Halko, Martinsson & Tropp 2011, Alg. 4.4: q = k + 8 columns, :data:`SUBSPACE_ITERS` power steps);
- the projection ‖U_ΔᵀWV_Δ‖_F and the amplification factor ‖ΔW‖_F / ‖U_ΔᵀWV_Δ‖_F (Hu et al. 2021,
  LoRA, §7.3, Table 7): needs only W·V_Δ;
- overlap with W's top-k left singular subspace, k = min(ΔW's rank, :data:`OVERLAP_K`): the normalised
  subspace similarity φ = ‖U_Δ,kᵀ U_W,k‖_F² / k of ΔW's top-k directions (Hu et al. §7.2; a random
  k-subspace gives k/out in expectation, :attr:`BaseMetrics.overlap_random`), and the share of
  ‖ΔW‖_F² inside W's top-k subspace;
- intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
  Equivalence", Alg. 1): the top-k left singular vectors u_j of W + ΔW, c_j = max_i |u_jᵀ u_{0,i}|
  over *all* left singular vectors of W (thin SVD), an intruder when c_j < ε; k = 10, ε = 0.5 (the
  paper's values; the first author recommends ε = 0.5, reeceshuttle/intruder-dimensions #3). Needs the
  complete basis of W: a dense SVD, cached per base tensor (:class:`BasisCache`);
- DoRA: the effective update ΔW_eff = m·(W + ΔW)/‖W + ΔW‖_row − W (PEFT's ``lora_magnitude_vector``,
  per output row) is not low rank: its spectrum comes from a dense SVD, and every metric above uses it.

Precision: W is read once per module in float32 (float64 when the matrix holds at most
:data:`SMALL` entries); every small matrix (r×r cores, q×q, the k×min(out, in) similarities) is float64.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .cpu_random import CpuGenerator
from .defaults import FLAG_INTRUDERS, FLAG_LARGE_UPDATE
from .errors import InspectError
from .spectrum import all_finite, parallel_map, svd_factors

if TYPE_CHECKING:  # pragma: no cover
    from .adapter import Module
    from .basecheckpoint import BaseCheckpoint, BaseTensor

__all__ = ["BaseMetrics", "BaseAnalysis", "BasisCache", "module_base_metrics", "analyse_base", "top_subspace",
           "intruder_similarity", "dora_effective_delta", "INTRUDER_K", "INTRUDER_EPS", "LARGE_UPDATE",
           "FLAG_LARGE_UPDATE", "FLAG_INTRUDERS", "SUBSPACE_ITERS"]

INTRUDER_K = 10  # Shuttleworth et al. 2024: top-10 singular vectors of the fine-tuned matrix
INTRUDER_EPS = 0.5  # their ε; peft's reduce_intruder_dimension uses the same defaults
# ρ₂ = σ₁(ΔW)/σ₁(W) at or above this is flagged: the update's strongest direction is at least half as strong
# as the base's. A project heuristic: Hu et al. (Table 7, GPT-3 W_q) measured ρ_F ≈ 6.91/61.95 = 0.11 at r = 4.
LARGE_UPDATE = 0.5
SUBSPACE_ITERS = 3  # power steps of the subspace iteration (Halko et al. 2011 §4.5: 1–2 suffice for fast decay)
OVERLAP_K = 16  # overlap: ΔW's top-k directions against W's top-k, k = min(ΔW's rank, 16)
OVERSAMPLE = 8
INTRUDER_OVERSAMPLE = 20
INTRUDER_ITERS = 8
DENSE = 1 << 16  # top-k by a dense SVD up to this many entries (256×256): exact, and ≤ a few ms
SMALL = 1 << 20  # matrices with at most this many entries are handled in float64 throughout


@dataclass
class BaseMetrics:
    """One module against its base weight (see the module docstring for each definition)."""

    base_key: str
    w_fro: float
    w_sigma1: float
    delta_fro: float
    delta_sigma1: float
    relative_fro: float | None
    relative_spectral: float | None
    projection: float
    amplification: float | None
    overlap: float
    overlap_k: int
    overlap_random: float
    energy_in_top: float
    intruders: int | None = None  # None when not computed
    intruder_similarity: list[float] | None = None  # c_j, j ≤ k
    effective_singular_values: list[float] | None = None  # DoRA: σ of ΔW_eff
    flags: list[str] = field(default_factory=list)


@dataclass
class BaseAnalysis:
    """Base-aware metrics of a whole adapter (the optional part of a :class:`~lora_inspect.analysis.RankReport`)."""

    path: str
    intruders: bool
    modules: dict[str, BaseMetrics]
    skipped: list[str] = field(default_factory=list)  # modules without a finite, non-zero update
    large_update: float = LARGE_UPDATE
    intruder_k: int = INTRUDER_K
    intruder_eps: float = INTRUDER_EPS

    @property
    def flags(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.modules.values():
            for f in m.flags:
                out[f] = out.get(f, 0) + 1
        return dict(sorted(out.items()))


def _seeded(shape: tuple[int, int], q: int, dtype: np.dtype) -> np.ndarray:
    """The (in, q) float64 normal start matrix of the subspace iteration, deterministic per shape: the
    numbers ``torch.randn(in, q, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)`` gives
    (:class:`lora_inspect.cpu_random.CpuGenerator`), so results are those of the torch implementation
    before it."""
    seed = shape[0] * 1_000_003 + shape[1]
    return CpuGenerator(seed).randn(shape[1], q).astype(dtype)


def top_subspace(w: np.ndarray, k: int, iters: int = SUBSPACE_ITERS,
                 oversample: int = OVERSAMPLE) -> tuple[np.ndarray, np.ndarray]:
    """Top-k left singular vectors (out, k) and values (k,) of w, both float64, by seeded subspace
    iteration with q = k + oversample columns (Halko et al. 2011, Alg. 4.4, QR between steps); exact (a dense
    SVD, float64) when min(out, in) ≤ 2q or the matrix has at most :data:`DENSE` entries.
    Cost ≈ 2(2·iters + 2)·out·in·q flops."""
    out_dim, in_dim = w.shape
    k = max(1, min(k, out_dim, in_dim))
    q = k + oversample
    if min(out_dim, in_dim) <= 2 * q or w.size <= DENSE:
        u, s, _ = np.linalg.svd(np.asarray(w, dtype=np.float64), full_matrices=False)
        return u[:, :k], s[:k]
    y = w @ _seeded((out_dim, in_dim), q, w.dtype)
    for _ in range(iters):
        qy = np.linalg.qr(y)[0]
        z = np.linalg.qr(w.T @ qy)[0]
        y = w @ z
    qy = np.linalg.qr(y)[0]
    ub, s, _ = np.linalg.svd((qy.T @ w).astype(np.float64), full_matrices=False)  # (q, in): small
    return qy.astype(np.float64) @ ub[:, :k], s[:k]


def intruder_similarity(u_tuned: np.ndarray, u_base: np.ndarray) -> np.ndarray:
    """c_j = max_i |u_tuned_jᵀ u_base_i| (Shuttleworth et al. Alg. 1; their code takes |U_tunedᵀ U_base| and
    the max over base vectors). u_tuned (out, k), u_base (out, p): returns (k,) float64."""
    return np.abs(np.asarray(u_tuned.T, dtype=np.float64) @ np.asarray(u_base, dtype=np.float64)).max(axis=1)


class BasisCache:
    """The complete left singular basis of base tensors (for intruder dimensions): an in-process LRU of
    at most ``max_bytes``, and optionally a directory of safetensors files named by the SHA-256 of the
    tensor's identity (resolved file, key, data offset and size, mtime in ns, orientation), so an edited
    or replaced checkpoint never hits a stale entry."""

    def __init__(self, directory: Path | None = None, max_bytes: int = 1 << 30):
        self.directory = directory
        self.max_bytes = max_bytes
        self._mem: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.hits = self.misses = 0
        self._lock = threading.Lock()  # modules run in worker threads; a basis is computed outside the lock

    def _file(self, key: tuple) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / (hashlib.sha256(repr(key).encode()).hexdigest()[:32] + ".safetensors")

    def get(self, key: tuple, compute) -> tuple[np.ndarray, np.ndarray]:
        """(U (out, p) float32, S (p,) float64) for the base tensor ``key``; ``compute()`` on a miss."""
        with self._lock:
            if key in self._mem:
                self._mem.move_to_end(key)
                self.hits += 1
                return self._mem[key]
        path = self._file(key)
        val = self._load(path) if path is not None and path.is_file() else None
        with self._lock:
            if val is None:
                self.misses += 1
            else:
                self.hits += 1
        if val is None:
            val = compute()
            if path is not None:
                self._store(path, val)
        with self._lock:
            self._mem[key] = val
            while len(self._mem) > 1 and sum(u.size * 4 for u, _ in self._mem.values()) > self.max_bytes:
                self._mem.popitem(last=False)
        return val

    @staticmethod
    def _load(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
        from .formats.tensors import SafetensorsSource

        try:
            src = SafetensorsSource(path)
            return src.get("u").astype(np.float32), src.get("s").astype(np.float64)
        except InspectError:
            return None  # a damaged cache entry is recomputed (and rewritten)

    @staticmethod
    def _store(path: Path, val: tuple[np.ndarray, np.ndarray]) -> None:
        """Atomically (:func:`lora_inspect.files.atomic_path`): readers never see half an entry."""
        from .files import atomic_path, os_error, write_safetensors

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise os_error(path.parent, e) from None
        with atomic_path(path) as tmp:
            write_safetensors(tmp, {"u": np.ascontiguousarray(val[0], dtype=np.float32),
                                    "s": np.ascontiguousarray(val[1], dtype=np.float64)})


def _work_dtype(w: np.ndarray) -> np.dtype:
    return np.dtype(np.float64) if w.size <= SMALL else np.dtype(np.float32)


def dora_effective_delta(w: np.ndarray, delta: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    """ΔW_eff = m·(W + ΔW)/‖W + ΔW‖_row − W (PEFT DoRA: ``lora_magnitude_vector`` over the output rows;
    docs/metrics.md). All (out, in) in W's dtype."""
    v = w + delta
    norm = np.linalg.norm(v, axis=1)
    return (np.asarray(magnitude, dtype=w.dtype) / norm).reshape(-1, 1) * v - w


_DeltaSVD = tuple[np.ndarray, np.ndarray, np.ndarray, "list[float] | None", float]


def _delta_svd(module: Module, w: np.ndarray) -> _DeltaSVD:
    """(U_Δ (out, r'), S (r',), V_Δ (in, r'), every σ of ΔW_eff for DoRA or None, ‖ΔW‖_F); float64,
    the directions with σ above rounding only (at most r for DoRA: the adapter's rank)."""
    b, a = module.factors(np.dtype(np.float64))
    eff = None
    mag = module.magnitude() if module.kind != "embedding" else None
    if mag is not None:
        d = dora_effective_delta(w, (module.scale * (b @ a)).astype(w.dtype), mag)
        u, s, vh = np.linalg.svd(d.astype(np.float64) if d.size <= SMALL else d, full_matrices=False)
        u, s, vh = u.astype(np.float64), s.astype(np.float64), vh.astype(np.float64)
        eff = [float(x) for x in s]
        energy = float((s**2).sum())
        u, s, vh = u[:, : module.rank], s[: module.rank], vh[: module.rank]
        s_all = math.sqrt(energy)
    else:
        u, s, vh = svd_factors(b, a, module.scale)
        s_all = float(np.linalg.norm(s))
    tol = float(s[0]) * max(w.shape) * float(np.finfo(np.float64).eps) if s.size else 0.0
    keep = int((s > tol).sum())
    return u[:, :keep], s[:keep], vh[:keep].T, eff, s_all


def module_base_metrics(module: Module, w: np.ndarray, key: str = "", *,
                        basis: tuple[np.ndarray, np.ndarray] | None = None) -> BaseMetrics | None:
    """Every base-aware metric of one module; ``w`` is its base weight (out, in) (float32 or float64).
    ``basis`` = the complete left singular basis of W (U, S) turns on intruder dimensions (and gives
    σ₁(W) exactly). None when ΔW is zero."""
    w = w.astype(_work_dtype(w), copy=False)
    u_d, s_d, v_d, eff, d_fro = _delta_svd(module, w)
    r = int(s_d.size)
    if r == 0:
        return None
    w_fro = float(np.linalg.norm(w.astype(np.float64, copy=False)))
    k = min(r, OVERLAP_K)
    if basis is not None:
        u_w, s_w = basis[0][:, :k].astype(np.float64), basis[1]
    else:
        u_w, s_w = top_subspace(w, k)
    proj = float(np.linalg.norm(u_d.T @ (w @ v_d.astype(w.dtype)).astype(np.float64)))
    k = min(k, u_w.shape[1])
    cos = u_d.T @ u_w[:, :k]  # (r, k): every direction of ΔW against W's top-k
    in_top = float(((s_d.reshape(-1, 1) * cos) ** 2).sum() / (d_fro**2)) if d_fro > 0 else 0.0
    w1, d1 = float(s_w[0]), float(s_d[0])
    m = BaseMetrics(
        base_key=key, w_fro=w_fro, w_sigma1=w1, delta_fro=d_fro, delta_sigma1=d1,
        relative_fro=d_fro / w_fro if w_fro > 0 else None, relative_spectral=d1 / w1 if w1 > 0 else None,
        projection=proj, amplification=d_fro / proj if proj > 0 else None,
        overlap=float((cos[:k] ** 2).sum()) / max(k, 1), overlap_k=k, overlap_random=k / w.shape[0],
        energy_in_top=min(in_top, 1.0), effective_singular_values=eff,
    )
    if basis is not None:
        _intruders(m, module, w, basis[0])
    if m.relative_spectral is not None and m.relative_spectral >= LARGE_UPDATE:
        m.flags.append(FLAG_LARGE_UPDATE)
    return m


def _intruders(m: BaseMetrics, module: Module, w: np.ndarray, u_base: np.ndarray) -> None:
    b, a = module.factors(w.dtype)
    mag = module.magnitude() if module.kind != "embedding" else None
    delta = module.scale * (b @ a)
    tuned = w + (dora_effective_delta(w, delta, mag) if mag is not None else delta)
    # near-degenerate σ around the k-th make the k-th vector fragile: oversample more (planted sample, a
    # 176×64 gate_proj with σ₁₀/σ₁₁ = 1.003: q = k + 8 missed c₁₀ by 0.26, q = k + 20 by 4e-4)
    u_t, _ = top_subspace(tuned, INTRUDER_K, iters=INTRUDER_ITERS, oversample=INTRUDER_OVERSAMPLE)
    c = intruder_similarity(u_t, u_base)
    m.intruder_similarity = [float(x) for x in c]
    m.intruders = int((c < INTRUDER_EPS).sum())
    if m.intruders:
        m.flags.append(FLAG_INTRUDERS)


def full_basis(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The complete (thin) left singular basis of W: U (out, min(out, in)) float32, S float64."""
    u, s, _ = np.linalg.svd(w.astype(_work_dtype(w), copy=False), full_matrices=False)
    # as a cache file gives it back
    return np.ascontiguousarray(u, dtype=np.float32), np.ascontiguousarray(s, dtype=np.float64)


def analyse_base(modules: list[Module], checkpoint: BaseCheckpoint, tensors: list[BaseTensor], *,
                 intruders: bool = False, cache: BasisCache | None = None,
                 progress=None, workers: int | None = None) -> BaseAnalysis:
    """Base-aware metrics for ``modules`` (finite, non-zero updates), streaming: each base weight is read
    once, used, and dropped (at most ``workers`` in memory at a time). ``tensors`` are the modules' base
    tensors (``checkpoint.check``). Modules run in worker threads with single-threaded BLAS
    (:func:`lora_inspect.spectrum.parallel_map`): on a loaded 2-core machine a two-thread QR of a 4096×72
    panel took 0.8 s, a one-thread one 3 ms."""
    basis_cache = cache if cache is not None else BasisCache()

    def one(item: tuple[Module, BaseTensor]) -> tuple[str, BaseMetrics | None]:
        mod, bt = item
        w = checkpoint.weight(bt)
        if not all_finite(w):
            raise InspectError(f"{bt.path}: base tensor {bt.key!r} holds NaN or inf")
        basis = basis_cache.get(bt.cache_key, lambda: full_basis(w)) if intruders else None
        try:
            return mod.name, module_base_metrics(mod, w, bt.name or bt.key, basis=basis)
        except (RuntimeError, ValueError):  # NaN/inf factors: the spectrum already says so
            return mod.name, None

    results = parallel_map(one, list(zip(modules, tensors)), workers=workers, progress=progress)
    out = {name: res for name, res in results if res is not None}
    return BaseAnalysis(str(checkpoint.path), intruders, out, [name for name, res in results if res is None])
