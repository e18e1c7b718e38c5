"""Compare two adapters module by module without forming a dense ΔW. Pure maths: no files opened or
written (factors come through :meth:`Module.factors` of adapters the caller has loaded).

For X = s₁B₁A₁ and Y = s₂B₂A₂ (B (out, r), A (r, in)):

- inner product from r×r cores: ⟨X, Y⟩_F = tr(XᵀY) = s₁s₂·tr((B₁ᵀB₂)(A₂A₁ᵀ)) — an (r₁×r₂)(r₂×r₁)
  product, cost O((out + in)·r₁r₂);
- norms ‖X‖_F = ‖σ(X)‖₂ from the QR-route singular values (:func:`spectrum.svd_factors`);
- the distance ‖X − Y‖_F is *not* taken as √(‖X‖² + ‖Y‖² − 2⟨X, Y⟩), which loses half the digits when
  X ≈ Y (cancellation: a 1e-9 relative distance would come out as ~1e-8 noise). X − Y is itself a
  low-rank product, [s₁B₁, −s₂B₂] @ [A₁; A₂] of rank ≤ r₁ + r₂, so its Frobenius norm is the 2-norm of
  its singular values from the same QR route (:func:`spectrum.singular_values`), accurate to
  O(eps·‖X‖). Its spectral norm comes for free;
- cosine similarity ⟨X, Y⟩ / (‖X‖‖Y‖);
- subspace similarity (Hu et al. 2021, "LoRA", §7): φ(i, j) = ‖U_iᵀ U'_j‖_F² / min(i, j) over the top-i
  and top-j *left* singular vectors (the output space; ``../shared/docs/metrics.md``). It lies in
  [0, 1], is 1 when one subspace contains the other and does not depend on the vectors' signs. We
  report φ(i, i) at i = min(top, k₁, k₂), kᵢ the energy rank at τ of each side, so that directions with
  (near-)zero σ — whose vectors are arbitrary — never enter it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from .adapter import Adapter, module_layer, module_type
from .errors import InspectError
from .spectrum import energy_rank, singular_values, svd_factors

__all__ = [
    "ModuleDiff",
    "DiffResult",
    "factor_inner",
    "factor_distance",
    "subspace_similarity",
    "compare_factors",
    "diff_adapters",
    "STATUS_OK",
    "STATUS_SHAPE",
    "STATUS_NON_FINITE",
]

STATUS_OK = "ok"
STATUS_SHAPE = "shape_mismatch"
STATUS_NON_FINITE = "non_finite"


def factor_inner(b1: torch.Tensor, a1: torch.Tensor, s1: float, b2: torch.Tensor, a2: torch.Tensor, s2: float) -> float:
    """⟨s₁B₁A₁, s₂B₂A₂⟩_F = s₁s₂·tr((B₁ᵀB₂)(A₂A₁ᵀ)) in float64, from r₁×r₂ products only."""
    b1, a1, b2, a2 = (t.to(torch.float64) for t in (b1, a1, b2, a2))
    return float(s1 * s2 * torch.trace((b1.T @ b2) @ (a2 @ a1.T)))


def factor_distance(
    b1: torch.Tensor, a1: torch.Tensor, s1: float, b2: torch.Tensor, a2: torch.Tensor, s2: float
) -> tuple[float, float]:
    """(‖X − Y‖_F, ‖X − Y‖₂) for X = s₁B₁A₁, Y = s₂B₂A₂, via the spectrum of the stacked product
    [s₁B₁, −s₂B₂] @ [A₁; A₂] (QR route, no dense out×in matrix, no cancellation)."""
    b = torch.cat([s1 * b1.to(torch.float64), -s2 * b2.to(torch.float64)], dim=1)
    a = torch.cat([a1.to(torch.float64), a2.to(torch.float64)], dim=0)
    if b.shape[1] == 0:
        return 0.0, 0.0
    sv = singular_values(b, a, 1.0)
    return float(np.sqrt(np.sum(sv**2))), float(sv[0]) if len(sv) else 0.0


def subspace_similarity(u1: torch.Tensor, u2: torch.Tensor, i: int, j: int | None = None) -> float:
    """φ(i, j) = ‖U_iᵀ U'_j‖_F² / min(i, j) (LoRA paper §7) for column-orthonormal U (n, ≥i), U' (n, ≥j)."""
    j = i if j is None else j
    if i <= 0 or j <= 0:
        raise ValueError("subspace_similarity needs i, j ≥ 1")
    g = u1[:, :i].T @ u2[:, :j]
    return float(min(1.0, (g**2).sum() / min(i, j)))  # ≤ 1 in exact arithmetic; rounding can exceed it


@dataclass
class ModuleDiff:
    """One module compared: every number is None where it is undefined (see ``status``/``notes``)."""

    name: str
    shape_a: tuple[int, int]
    shape_b: tuple[int, int]
    rank_a: int
    rank_b: int
    status: str = STATUS_OK
    norm_a: float | None = None  # ‖ΔW_A‖_F
    norm_b: float | None = None
    distance: float | None = None  # ‖ΔW_A − ΔW_B‖_F
    spectral_distance: float | None = None  # ‖ΔW_A − ΔW_B‖₂
    rel_distance: float | None = None  # ‖ΔW_A − ΔW_B‖_F / ‖ΔW_A‖_F
    cosine: float | None = None
    phi: float | None = None  # φ(phi_dim, phi_dim)
    phi_dim: int | None = None
    energy_rank_a: int | None = None
    energy_rank_b: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def type(self) -> str:
        return module_type(self.name)

    @property
    def layer(self) -> str:
        return module_layer(self.name)


def compare_factors(
    name: str,
    b1: torch.Tensor, a1: torch.Tensor, s1: float,
    b2: torch.Tensor, a2: torch.Tensor, s2: float,
    *,
    top: int = 1,
    energy: float = 0.95,
) -> ModuleDiff:
    """Every per-module number of ``diff`` for ΔW_A = s₁B₁A₁ and ΔW_B = s₂B₂A₂ (linear orientation)."""
    shape_a = (b1.shape[0], a1.shape[1])
    shape_b = (b2.shape[0], a2.shape[1])
    d = ModuleDiff(name, shape_a, shape_b, a1.shape[0], a2.shape[0])
    if shape_a != shape_b:
        d.status = STATUS_SHAPE
        return d
    b1, a1, b2, a2 = (t.to(torch.float64) for t in (b1, a1, b2, a2))
    if not all(bool(torch.isfinite(t).all()) for t in (b1, a1, b2, a2)) or not (math.isfinite(s1) and math.isfinite(s2)):
        d.status = STATUS_NON_FINITE
        return d
    u1, sv1, _ = svd_factors(b1, a1, s1)
    u2, sv2, _ = svd_factors(b2, a2, s2)
    sv1n, sv2n = sv1.numpy(), sv2.numpy()
    d.norm_a = float(np.sqrt(np.sum(sv1n**2)))
    d.norm_b = float(np.sqrt(np.sum(sv2n**2)))
    d.energy_rank_a = energy_rank(sv1n, energy)
    d.energy_rank_b = energy_rank(sv2n, energy)
    if torch.equal(b1, b2) and torch.equal(a1, a2) and s1 == s2:
        d.distance = d.spectral_distance = 0.0  # the same factors: exactly the same ΔW
    else:
        d.distance, d.spectral_distance = factor_distance(b1, a1, s1, b2, a2, s2)
    if d.norm_a > 0:
        d.rel_distance = d.distance / d.norm_a
    else:
        d.notes.append("ΔW_A is zero: relative distance undefined")
    if d.norm_a > 0 and d.norm_b > 0:
        c = factor_inner(b1, a1, s1, b2, a2, s2) / (d.norm_a * d.norm_b)
        d.cosine = float(min(1.0, max(-1.0, c)))
        d.phi_dim = max(1, min(top, d.energy_rank_a, d.energy_rank_b))
        d.phi = subspace_similarity(u1, u2, d.phi_dim)
    else:
        d.notes.append("a zero ΔW: cosine and φ undefined")
    return d


@dataclass
class DiffResult:
    a: Adapter
    b: Adapter
    top: int
    energy: float
    modules: list[ModuleDiff]
    only_in_a: list[str]
    only_in_b: list[str]
    summary: dict = field(default_factory=dict)


def _stats(ds: list[ModuleDiff]) -> dict:
    dist = [d for d in ds if d.rel_distance is not None]
    cos = [d for d in ds if d.cosine is not None]
    phi = [d for d in ds if d.phi is not None]
    worst_d = max(dist, key=lambda d: d.rel_distance, default=None)
    worst_c = min(cos, key=lambda d: d.cosine, default=None)
    worst_p = min(phi, key=lambda d: d.phi, default=None)
    return {
        "modules": len(ds),
        "compared": sum(d.status == STATUS_OK for d in ds),
        "mean_rel_distance": float(np.mean([d.rel_distance for d in dist])) if dist else None,
        "max_rel_distance": worst_d.rel_distance if worst_d else None,
        "max_rel_distance_module": worst_d.name if worst_d else None,
        "mean_cosine": float(np.mean([d.cosine for d in cos])) if cos else None,
        "min_cosine": worst_c.cosine if worst_c else None,
        "min_cosine_module": worst_c.name if worst_c else None,
        "mean_phi": float(np.mean([d.phi for d in phi])) if phi else None,
        "min_phi": worst_p.phi if worst_p else None,
        "min_phi_module": worst_p.name if worst_p else None,
    }


def summarise(diffs: list[ModuleDiff]) -> dict:
    """Mean and worst relative distance / cosine / φ, overall and by module type."""
    by_type: dict[str, list[ModuleDiff]] = defaultdict(list)
    for d in diffs:
        by_type[d.type].append(d)
    out = _stats(diffs)
    out["shape_mismatches"] = sum(d.status == STATUS_SHAPE for d in diffs)
    out["non_finite"] = sum(d.status == STATUS_NON_FINITE for d in diffs)
    out["by_type"] = {t: _stats(v) for t, v in sorted(by_type.items())}
    return out


def diff_adapters(a: Adapter, b: Adapter, *, top: int = 1, energy: float = 0.95) -> DiffResult:
    """Pair modules by name and compare each pair (:func:`compare_factors`), in A's module order."""
    if top < 1:
        raise InspectError(f"top (the number of singular directions φ compares) must be ≥ 1, got {top}")
    if not 0 < energy <= 1:
        raise InspectError(f"energy τ must be in (0, 1], got {energy}")
    names_b = {m.name: m for m in b.modules}
    names_a = {m.name for m in a.modules}
    common = [m for m in a.modules if m.name in names_b]
    only_a = [m.name for m in a.modules if m.name not in names_b]
    only_b = [m.name for m in b.modules if m.name not in names_a]
    if not common:
        ex_a = a.modules[0].name if a.modules else "(none)"
        ex_b = b.modules[0].name if b.modules else "(none)"
        raise InspectError(
            f"no module names in common ({a.format} {ex_a!r}… vs {b.format} {ex_b!r}…)",
            hint="diff pairs modules by name: compare PEFT with PEFT, kohya with kohya",
        )
    diffs = []
    for ma in common:
        mb = names_b[ma.name]
        b1, a1 = ma.factors(torch.float64)
        b2, a2 = mb.factors(torch.float64)
        diffs.append(compare_factors(ma.name, b1, a1, ma.scale, b2, a2, mb.scale, top=top, energy=energy))
    res = DiffResult(a, b, top, energy, diffs, only_a, only_b)
    res.summary = summarise(diffs)
    res.summary["only_in_a"] = len(only_a)
    res.summary["only_in_b"] = len(only_b)
    return res
