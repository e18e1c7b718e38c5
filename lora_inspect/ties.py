"""Which module a summary names when several share the extreme value: the rule that makes "worst
module" and "smallest φ" independent of the last bits of a float (other BLAS kernels, other CPUs).

Ties are values within :data:`TIE_RTOL` of the extreme; they go to the lowest layer, then to the name
in natural order (:func:`tie_key`) — the tied module listed first in every table.
"""

from __future__ import annotations

from collections.abc import Iterable

from .adapter import module_layer
from .naming import natural_key

__all__ = ["TIE_RTOL", "tie_key", "extreme_module"]

TIE_RTOL = 1e-12
"""Two modules' values of a metric (φ, cosine, a relative distance, a relative error: dimensionless
numbers of order one) that differ by at most ``TIE_RTOL·max(1, |v|)`` are a tie: rounding noise, far
below any difference a metric resolves, and what other BLAS kernels change (≈1e-16 here)."""


def tie_key(name: str) -> tuple:
    """How ties between modules are broken: the lowest layer first (:func:`~lora_inspect.adapter.module_layer`
    in natural order: ``layers.2`` before ``layers.10``), then the module name in natural order — so the
    winner is the tied module listed first in every table."""
    return natural_key(module_layer(name)), natural_key(name)


def extreme_module(values: Iterable[tuple[float, str]], *, largest: bool) -> tuple[float | None, str | None]:
    """(extreme value, its module) over ``(value, module name)`` pairs; ``(None, None)`` for none.

    The value is the exact largest (``largest``) or smallest value. The module is chosen among those
    whose value is within ``TIE_RTOL·max(1, |extreme|)`` of it by :func:`tie_key` (lowest layer, then
    name), never by the last bits of the values: the same adapters analysed with other CPU kernels
    name the same module. (A module whose value sits right at the edge of that band, ~1e-12 from the
    extreme, can still go either way; that is a real near-tie, not rounding.)"""
    pairs = list(values)
    if not pairs:
        return None, None
    best = max(v for v, _ in pairs) if largest else min(v for v, _ in pairs)
    band = TIE_RTOL * max(1.0, abs(best))
    return best, min((n for v, n in pairs if abs(v - best) <= band), key=tie_key)
