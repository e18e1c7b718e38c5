"""Exactness checks in factor space: ‖s′B′A′ − sBA‖_F without forming either ΔW.

[s′B′, −sB] (out × (k′+k)) and [A′; A] ((k′+k) × in) multiply to the difference; with Householder
QR of both, [s′B′, −sB] = Q_b R_b and [A′; A]ᵀ = Q_a R_a, the difference's Frobenius norm is
‖R_b R_aᵀ‖_F (Q's have orthonormal columns), computed in float64 with no cancellation between
two large dense matrices. Cost O((out + in)(k′+k)²).
"""

from __future__ import annotations

import torch

__all__ = ["diff_norm", "lowrank_norm", "tolerance", "UNIT_ROUNDOFF"]

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 2.0**-53}


def _r(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x, mode="r")[1]


def lowrank_norm(b: torch.Tensor, a: torch.Tensor) -> float:
    """‖B@A‖_F via the R factors of B and Aᵀ."""
    if b.shape[1] == 0:
        return 0.0
    return float(torch.linalg.matrix_norm(_r(b.double()) @ _r(a.double().T).T))


def diff_norm(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> float:
    """‖B1@A1 − B2@A2‖_F (scales already in the B's)."""
    b = torch.cat([b1.double(), -b2.double()], dim=1)
    a = torch.cat([a1.double(), a2.double()], dim=0)
    return lowrank_norm(b, a)


def tolerance(b: torch.Tensor, a: torch.Tensor, dtype: torch.dtype) -> float:
    """Rounding both stored factors to unit roundoff u changes B@A by ≤ (2u + u²)‖B‖_F‖A‖_F; slack 8."""
    u = UNIT_ROUNDOFF.get(dtype, 2.0**-24)
    return 8 * 3 * u * float(torch.linalg.matrix_norm(b.double())) * float(torch.linalg.matrix_norm(a.double())) + 1e-300
