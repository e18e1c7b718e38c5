"""``merge --method ties|dare_linear|dare_ties|magnitude_prune``: merges that act on the dense ΔW.

These are PEFT's ``*_svd`` combination types (``peft · src/peft/tuners/lora/model.py ·
_svd_generalized_task_arithmetic_weighted_adapter`` with ``src/peft/utils/merge_utils.py``, peft 0.21.2),
done module by module: form every input's dense update ΔWᵢ = (BᵢAᵢ)·sᵢ (PEFT's ``get_delta_weight``,
the scale applied once), stack them as τ (n × out × in, only the inputs that have the module, as PEFT
keeps only its ``valid_adapters``) and apply

- ``magnitude_prune``: τᵢ ← τᵢ with all but its k = ⌊d·numel⌋ largest |entries| zeroed; Σ wᵢτᵢ;
- ``dare_linear``: τᵢ ← τᵢ·mᵢ/d with mᵢ ~ Bernoulli(d) elementwise; Σ wᵢτᵢ;
- ``ties``: magnitude prune; elect the sign per entry, σ = sign(Σᵢ τᵢ) (``total``) or sign(Σᵢ sign τᵢ)
  (``frequency``), σ = +1 where that is 0, on the pruned and *unweighted* τ; then the disjoint mean
  Σᵢ wᵢτᵢ·[sign τᵢ = σ] / max(Σᵢ [sign τᵢ = σ], 1);
- ``dare_ties``: the random prune of ``dare_linear``, then the election and disjoint mean of ``ties``.

A density d ≥ 1 prunes nothing and draws nothing (``merge_utils.prune``). The results are elementwise
functions of the ΔWᵢ, not of the factors (TIES/DARE on A and B separately, PEFT's ``ties``/``dare_*``
types, are gauge-dependent) and, for ``ties``/``dare_*``, not a weighted sum. The pruned ΔW has full
rank in general: it is truncated by a dense SVD (Eckart–Young) to max rᵢ of the module's inputs (PEFT's
``svd_rank=None`` takes max r over the whole configs, rank patterns included) or by the rank rules of
``truncate``. DARE is random: module ``key`` draws what ``torch.Generator().manual_seed(module_seed(seed,
key))`` draws (:class:`~lora_inspect.cpu_random.CpuGenerator`, the same stream on numpy), so a file
depends on the seed only, not on the order of the modules; masks are drawn in float32 (as PEFT does on a
float32 model) whatever the compute dtype. Memory per module is estimated by
:func:`peak_bytes` and refused above a limit; only one module's dense tensors are alive at a time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..cpu_random import CpuGenerator
from ..errors import InspectError, OptionError
from ..rewrite.ranks import TruncateSpec, choose_ranks
from ..spectrum import energy_rank, relative_error, retained_energy
from .canon import Canon, CanonModule
from .merge import check_row, keyed_modules, numerical_rank
from .results import MergeModule

__all__ = ["METHODS", "SIGNS", "PRECISIONS", "DEFAULT_SEED", "DEFAULT_LIMIT", "DenseSpec", "module_seed",
           "peak_bytes", "dense_updates", "combine", "dense_delta", "dense_merge_modules"]

METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGNS = ("total", "frequency")
PRECISIONS: dict[str, np.dtype] = {"fp64": np.dtype(np.float64), "fp32": np.dtype(np.float32)}
DEFAULT_SEED = 0
DEFAULT_LIMIT = 8 * 2**30  # bytes per module


@dataclass
class DenseSpec:
    """A dense merge: the method, its density d ∈ (0, 1], the sign election, the DARE seed, the dtype of
    the dense tensors and the per-module memory limit in bytes."""

    method: str
    density: float
    majority_sign: str = "total"
    seed: int = DEFAULT_SEED
    precision: str = "fp64"
    max_bytes: int = DEFAULT_LIMIT

    def validate(self) -> None:
        if self.method not in METHODS:
            raise OptionError("method", f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not (isinstance(self.density, float | int) and 0 < self.density <= 1):
            raise OptionError("density", f"density must be in (0, 1], got {self.density}")
        if self.majority_sign not in SIGNS:
            raise OptionError("majority_sign", f"majority_sign must be total or frequency, got {self.majority_sign!r}")
        if not 0 <= self.seed < 2**63:
            raise OptionError("seed", f"seed must be in [0, 2**63), got {self.seed}")
        if self.precision not in PRECISIONS:
            raise OptionError("precision", f"precision must be fp64 or fp32, got {self.precision!r}")
        if self.max_bytes < 1:
            raise OptionError("max_bytes_dense", f"the memory limit must be ≥ 1 byte, got {self.max_bytes}")

    @property
    def dtype(self) -> np.dtype:
        return PRECISIONS[self.precision]

    @property
    def random(self) -> bool:
        return self.method.startswith("dare")


def module_seed(seed: int, key: str) -> int:
    """The DARE seed of one module: the first 63 bits of SHA-256(seed, key) (independent of module order)."""
    h = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def peak_bytes(n: int, shape: tuple[int, int], dtype: np.dtype) -> int:
    """Estimated peak memory of one module: ((2n + 3)·itemsize + 8)·out·in bytes — the stacked updates,
    their signs, the election, the merged ΔW and its SVD's U, Vᵀ and workspace, plus the boolean masks and
    the partition's int64 indices. Measured peaks (resident set, 2048×3072): n=2 fp64 297 MiB (estimate 384),
    n=3 fp64 391 MiB (480), n=2 fp32 196 MiB (216)."""
    item = np.dtype(dtype).itemsize
    return ((2 * n + 3) * item + 8) * shape[0] * shape[1]


def dense_updates(mods: list[CanonModule], dtype: np.dtype) -> np.ndarray:
    """τ (n × out × in): τᵢ = (BᵢAᵢ)·sᵢ in ``dtype``, as PEFT's ``get_delta_weight`` forms it."""
    first = mods[0]
    t = np.empty((len(mods), *first.shape), dtype=dtype)
    for i, m in enumerate(mods):
        np.matmul(m.b.astype(dtype, copy=False), m.a.astype(dtype, copy=False), out=t[i])
        t[i] *= m.scale
    return t


def _magnitude_prune_(x: np.ndarray, density: float) -> None:
    """``merge_utils.magnitude_based_pruning`` in place: keep the top ⌊d·numel⌋ |entries|."""
    size = np.abs(x).reshape(-1)
    k = int(density * size.size)
    keep = np.zeros(size.shape, dtype=np.bool_)
    if k > 0:
        keep[np.argpartition(size, size.size - k)[size.size - k:]] = True
    x *= keep.reshape(x.shape)


def _random_prune_(x: np.ndarray, density: float, gen: CpuGenerator) -> None:
    """``merge_utils.random_pruning(rescale=True)`` in place: x·Bernoulli(d)/d (mask drawn in float32)."""
    x *= gen.bernoulli(x.shape, density)
    x /= density


def _disjoint_(t: np.ndarray, w: np.ndarray, how: str) -> np.ndarray:
    """``calculate_majority_sign_mask`` on the unweighted τ, then the weights, then ``disjoint_merge``."""
    sign = np.sign(t)
    mag = t.sum(axis=0) if how == "total" else sign.sum(axis=0)
    majority = (mag >= 0).astype(t.dtype)
    majority *= 2
    majority -= 1
    del mag
    mask = sign == majority
    del sign, majority
    t *= w
    t *= mask
    kept = mask.sum(axis=0, dtype=t.dtype)
    np.maximum(kept, 1.0, out=kept)
    del mask
    out = t.sum(axis=0)
    out /= kept
    return out


def combine(t: np.ndarray, weights: list[float], spec: DenseSpec, gen: CpuGenerator | None = None) -> np.ndarray:
    """The merged dense ΔW of the stacked updates ``t`` (modified in place) with ``weights``, as
    ``merge_utils.<method>(list(t), torch.tensor(weights), density[, majority_sign])`` computes it; ``gen``
    draws DARE's masks (torch's CPU stream: :class:`~lora_inspect.cpu_random.CpuGenerator`)."""
    d = float(spec.density)
    if d < 1:
        for i in range(t.shape[0]):
            if spec.random:
                if gen is None:
                    raise InspectError("a DARE merge needs a random generator")
                _random_prune_(t[i], d, gen)
            else:
                _magnitude_prune_(t[i], d)
    w = np.array(weights, dtype=t.dtype).reshape(-1, *([1] * (t.ndim - 1)))
    if spec.method in ("ties", "dare_ties"):
        return _disjoint_(t, w, spec.majority_sign)
    t *= w
    return t.sum(axis=0)


def dense_delta(mods: list[CanonModule], weights: list[float], spec: DenseSpec, key: str) -> np.ndarray:
    """The merged dense ΔW (before any SVD) of one module's present inputs ``mods`` with their weights."""
    gen = CpuGenerator(module_seed(spec.seed, key)) if spec.random else None
    return combine(dense_updates(mods, spec.dtype), weights, spec, gen)


def _present(row: list[CanonModule | None], weights: list[float]) -> tuple[list[CanonModule], list[float]]:
    pairs = [(m, w) for m, w in zip(row, weights) if m is not None]
    return [m for m, _ in pairs], [w for _, w in pairs]


def _svd(mods: list[CanonModule], weights: list[float], spec: DenseSpec, key: str
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    delta = dense_delta(mods, weights, spec, key)
    if not bool(np.isfinite(delta).all()):
        raise InspectError(f"module {key!r}: the dense {spec.method} merge is not finite (overflow in the inputs?)")
    u, s, vh = np.linalg.svd(delta, full_matrices=False)
    return u, s, vh


def _factors(u: np.ndarray, s: np.ndarray, vh: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Balanced split of the rank-k truncation: B = U_k√S_k, A = √S_k V_kᵀ (float64)."""
    root = np.sqrt(s[:k].astype(np.float64))
    return u[:, :k].astype(np.float64) * root, root[:, None] * vh[:k].astype(np.float64)


def _local_k(sv: np.ndarray, ranks: list[int], spec: TruncateSpec | None) -> int:
    if spec is None:
        return max(ranks)
    if spec.rank is not None:
        return min(spec.rank, len(sv))
    assert spec.energy is not None
    return energy_rank(sv, spec.energy)


@dataclass
class _Slot:  # what choose_ranks reads of a module
    dtype: str
    rank: int
    shape: tuple[int, int]


def check_memory(keys: list[str], rows: list[list[CanonModule | None]], spec: DenseSpec
                 ) -> None:
    """Refuse, before any work, a module whose dense merge would need more than ``spec.max_bytes``."""
    from ..units import fmt_bytes

    for key, row in zip(keys, rows):
        mods = [m for m in row if m is not None]
        need = peak_bytes(len(mods), mods[0].shape, spec.dtype)
        if need > spec.max_bytes:
            o, i = mods[0].shape
            raise InspectError(
                f"module {key!r}: a dense {spec.method} merge of {len(mods)} × {o}×{i} {spec.precision} updates "
                f"needs about {fmt_bytes(need)}, above the limit of {fmt_bytes(spec.max_bytes)}",
                option="max_bytes_dense")


def dense_merge_modules(canons: list[Canon], weights: list[float], spec: TruncateSpec | None, paths: list,
                        dense: DenseSpec) -> tuple[list[CanonModule], list[MergeModule]]:
    """Merged modules (scale 1) and per-module facts (energy and error against the pre-SVD dense merge).

    Rank: max rᵢ of the module's inputs without ``spec``; with a budget the ranks need every spectrum
    first, so the modules are merged twice (the per-module seed makes the second pass identical)."""
    order, table = keyed_modules(canons, paths)
    rows = [table[key] for key in order]
    firsts = [check_row(key, row, paths) for key, row in zip(order, rows)]
    check_memory(order, rows, dense)
    budget = spec is not None and spec.rank is None and spec.energy is None
    spectra, keep, kept = [], [], {}
    for key, row, first in zip(order, rows, firsts):
        mods, ws = _present(row, weights)
        u, s, vh = _svd(mods, ws, dense, key)
        sv = s.astype(np.float64)
        spectra.append(sv)
        k = 0 if budget else min(_local_k(sv, [m.rank for m in mods], spec), numerical_rank(sv, first.shape))
        keep.append(k)
        if k > 0:
            kept[key] = _factors(u, s, vh, k)
        del u, s, vh
    if budget:
        assert spec is not None
        slots = [_Slot("F32", len(sv), f.shape) for sv, f in zip(spectra, firsts)]
        choice = choose_ranks(slots, spectra, spec)  # type: ignore[arg-type]
        keep = [min(k, numerical_rank(sv, f.shape)) for k, sv, f in zip(choice.keep, spectra, firsts)]
        for key, row, k in zip(order, rows, keep):
            if k > 0:
                mods, ws = _present(row, weights)
                u, s, vh = _svd(mods, ws, dense, key)
                kept[key] = _factors(u, s, vh, k)
                del u, s, vh
    merged, facts = [], []
    for key, row, first, sv, k in zip(order, rows, firsts, spectra, keep):
        ranks = [m.rank if m else 0 for m in row]
        facts.append(MergeModule(key, first.kind, first.shape, ranks, sum(ranks), numerical_rank(sv, first.shape),
                                 k, retained_energy(sv, k), relative_error(sv, k), float(sv[0]) if len(sv) else 0.0,
                                 [float(x) for x in sv]))
        if k > 0:
            b, a = kept.pop(key)
            merged.append(CanonModule(first.component, first.path, first.kind, b, a, 1.0, first.kernel,
                                      first.conv_ndim, None, key))
    return merged, facts
