"""Write a rewritten adapter atomically and check it before it appears.

The output is written under a temporary name (:class:`~lora_inspect.files.AtomicOutput`), re-read
with ``load_adapter`` and each module's spectrum recomputed by the same QR route ``rank`` uses; only
when every module matches the intended spectrum within its tolerance is it renamed onto OUT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..adapter import Adapter
from ..defaults import UNIT_ROUNDOFF
from ..errors import InspectError
from ..files import AtomicOutput
from ..formats.layout import Layout, Rewrite

__all__ = ["Expected", "sv_tolerance", "verify", "write_checked"]


@dataclass
class Expected:
    """What a module must look like after writing: its singular values, stored rank and dtype."""

    singular_values: np.ndarray
    rank: int
    dtype: str


def _dtype_u(st: str) -> float:
    """Unit roundoff of a stored dtype (2^-p, p = mantissa bits + 1)."""
    return UNIT_ROUNDOFF.get(st, 2.0**-24)


def sv_tolerance(sv: np.ndarray, keep: int, st_dtype: str) -> float:
    """Bound on |σᵢ(stored) − σᵢ(intended)| from Weyl's inequality: rounding B′, A′ to unit roundoff u
    perturbs B′A′ by ≤ 2u‖B′‖_F‖A′‖_F = 2u·Σ_{i≤k} σᵢ (each factor carries √σᵢ); the re-read spectrum
    is itself computed in float32 for 16-bit data. Slack factor 8."""
    s = float(np.sum(sv[:keep])) if keep else 0.0
    u = max(_dtype_u(st_dtype), 2.0**-24 if st_dtype in ("BF16", "F16", "F32") else 2.0**-52)
    top = float(sv[0]) if len(sv) else 0.0
    return 8 * (2 * u * s + u * top * math.sqrt(max(len(sv), 1))) + 1e-300


def _check_structure(new: Adapter, expected: dict[str, Expected], dropped: set[str], extras: list[str]) -> None:
    names = {m.name for m in new.modules}
    if names != set(expected):
        missing = sorted(set(expected) - names)[:3]
        extra = sorted(names - set(expected))[:3]
        raise InspectError(f"self-check failed: modules differ after writing (missing {missing}, unexpected {extra})")
    if set(new.extras) != set(extras):
        raise InspectError("self-check failed: the full tensors (modules_to_save …) were not carried over intact")
    if dropped & names:
        raise InspectError(f"self-check failed: dropped modules still present: {sorted(dropped & names)[:3]}")
    for m in new.modules:
        if m.rank != expected[m.name].rank:
            raise InspectError(f"self-check failed: {m.name} stored rank {m.rank}, intended {expected[m.name].rank}")


def _padded(a: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n)
    out[: len(a)] = a
    return out


def verify(out_tmp: Path, expected: dict[str, Expected], dropped: set[str], extras: list[str]) -> float:
    """Re-read the written adapter and check each module's spectrum; an InspectError on any mismatch.
    Returns the largest |σ′ − σ| relative to that module's tolerance."""
    from ..analysis import compute_spectra

    try:
        new = load(out_tmp)
    except InspectError as e:
        raise InspectError(f"self-check failed: the written adapter does not load ({e})") from e
    _check_structure(new, expected, dropped, extras)
    spectra = compute_spectra(new.modules)  # the same QR route `rank` uses, in worker threads
    worst = 0.0
    for m in new.modules:
        want = expected[m.name]
        got, _ = spectra[m.name]
        if got is None:
            raise InspectError(f"self-check failed: {m.name} holds NaN/inf after writing")
        n = max(len(got), len(want.singular_values))
        g, w = _padded(got, n), _padded(want.singular_values, n)
        tol = sv_tolerance(w, int((w > 0).sum()), want.dtype)
        err = float(np.abs(g - w).max()) if n else 0.0
        if not err <= tol:
            raise InspectError(
                f"self-check failed: {m.name} spectrum after writing differs from the intended one by {err:.3g} "
                f"(tolerance {tol:.3g}); nothing was written"
            )
        worst = max(worst, err / tol if tol > 0 else 0.0)
    return worst


def load(path: Path) -> Adapter:
    from ..formats import load_adapter

    return load_adapter(path)


def write_checked(ad: Adapter, layout: Layout, out: Path, rw: Rewrite, expected: dict[str, Expected],
                  dropped: set[str]) -> tuple[int, float, list[str]]:
    """Write ``rw`` through ``layout`` at a temporary path, verify it, rename it onto ``out``.
    Returns (bytes of the output's weight file, worst error/tolerance, notes from the writer)."""
    with AtomicOutput(out, suffix=layout.tmp_suffix(ad, rw.fmt)) as atomic:
        layout.write(atomic, ad, rw)
        try:
            max_err = verify(atomic.tmp, expected, dropped, list(ad.extras))
        except InspectError as e:  # about what was written from ad: name the input, nothing was written
            raise e.located(ad.path) from e
        atomic.commit()
    weights = layout.weights_file(out)
    size = weights.stat().st_size if weights.is_file() else 0
    return size, max_err, atomic.notes
