"""``rescale``: multiply every module's ΔW by F, in the same layout.

PEFT's s = α/r (α/√r with rsLoRA), kohya's α/r and mlx-lm's absolute scale are all linear in α, so
multiplying every α (``lora_alpha`` and each ``alpha_pattern`` entry, or every ``.alpha`` tensor, or
``lora_parameters.scale``: the layout knows where) by F multiplies every ΔW by F; ``bake`` multiplies
B (and a LoRA bias) instead. F must be positive and finite, and F·(what is stored) must stay
representable in the stored dtype: larger is refused as an overflow, smaller than the dtype's
smallest normal number as an underflow.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..adapter import Adapter, module_type
from ..arrays import NUMPY_OF, decode, scaled
from ..defaults import SCALE_RANGE
from ..errors import InspectError, OptionError
from ..formats import check_output, layout_of, refuse_inexpressible
from ..formats.layout import Layout
from ..units import plural, verb
from .results import ModuleRescale, RescaleResult
from .selfcheck import Expected, write_checked
from .tensors import extras_tensors, module_tensors, storage_dtype

__all__ = ["rescale", "resolve_factor"]


def resolve_factor(ad: Adapter, layout: Layout, factor: float | None, alpha: float | None) -> tuple[float, float | None]:
    """(F, α before) from a factor or a new α; F must be finite and positive."""
    if (factor is None) == (alpha is None):
        raise InspectError("give exactly one of alpha and factor")  # the command checks its flags first
    alpha_before = layout.global_alpha(ad) if alpha is not None else _safe_alpha(ad, layout)
    if alpha is not None:
        if not math.isfinite(alpha) or alpha <= 0:
            raise OptionError("alpha", f"alpha must be a finite positive number, got {alpha:g}")
        if alpha_before is None:
            raise InspectError(f"{ad.path}: no single alpha to set (per-module alphas differ or none is stored)",
                               hint="give a factor instead", option="factor")
        factor = alpha / alpha_before
    assert factor is not None
    if not math.isfinite(factor) or factor <= 0:
        raise OptionError("factor", f"factor must be a finite positive number, got {factor:g}")
    return factor, alpha_before


def _safe_alpha(ad: Adapter, layout: Layout) -> float | None:
    try:
        return layout.global_alpha(ad)
    except InspectError:
        return None


@dataclass(frozen=True)
class _Range:
    max: float  # largest finite number
    tiny: float  # smallest normal number


# bfloat16 (numpy has none): float32's exponent range with 8 significant bits
_BF16_RANGE = _Range(max=float.fromhex("0x1.fep127"), tiny=float.fromhex("0x1p-126"))


def _finfo(st: str) -> _Range:
    """The range of a stored dtype (float32's for a non-float one, as the factors are read in float)."""
    storage_dtype(st)
    if st == "BF16":
        return _BF16_RANGE
    fi = np.finfo(NUMPY_OF[st] if st in ("F16", "F32", "F64") else np.float32)
    return _Range(max=float(fi.max), tiny=float(fi.tiny))


def _check_range(ad: Adapter, spectra: dict, factor: float, bake: bool, tensors: dict[str, np.ndarray]) -> None:
    """Refuse F when F·(stored values) leaves the stored dtype's range: 'overflow' above its largest
    finite number, 'underflow' below its smallest normal one (the result would lose its precision or be 0)."""
    for m in ad.modules:
        fi = _finfo(m.dtype)
        sv = spectra[m.name][0]
        top = float(sv[0]) if len(sv) else 0.0
        values = [(top * factor, fi)]
        if bake:
            b = decode(tensors[m.update.bake_key])
            values.append((float(np.abs(b).max()) * factor if b.size else 0.0, fi))
        elif m.alpha_key:  # a stored .alpha tensor × F must fit its own dtype
            values.append((abs(m.alpha) * factor, _finfo(m.source.info(m.alpha_key).dtype)))
        for x, fi in values:
            if not math.isfinite(x) or x > fi.max:
                raise InspectError(f"{ad.path}: factor {factor:g} overflows {m.dtype} in module {m.name!r} "
                                  f"(largest value would be {x:.3g}, the dtype holds up to {fi.max:.3g})")
            if 0 < x < fi.tiny or (x == 0 and top > 0):
                raise InspectError(f"{ad.path}: factor {factor:g} underflows {m.dtype} in module {m.name!r} "
                                  f"(largest value would be {x:.3g}, below the smallest normal {fi.tiny:.3g})")


def _bake(ad: Adapter, tensors: dict[str, np.ndarray], factor: float) -> None:
    for m in ad.modules:
        for key in (m.update.bake_key, m.bias_key):
            if key:
                x = tensors[key]  # as stored: F·x computed in float64, stored back in x's dtype
                tensors[key] = scaled(x, factor)


def _records(ad: Adapter, spectra: dict, factor: float, bake: bool) -> tuple[list[ModuleRescale], dict[str, Expected]]:
    docs, expected = [], {}
    for m in ad.modules:
        sv = spectra[m.name][0]
        s1 = float(sv[0]) if len(sv) else 0.0
        docs.append(ModuleRescale(
            name=m.name, type=module_type(m.name), rank=m.rank, alpha_before=m.alpha,
            alpha_after=m.alpha if bake else m.alpha * factor, scale_before=m.scale, scale_after=m.scale * factor,
            sigma1_before=s1, sigma1_after=s1 * factor))
        expected[m.name] = Expected(np.asarray(sv) * factor, m.rank, m.dtype)
    return docs, expected


def _warnings(ad: Adapter, layout: Layout, docs: list[ModuleRescale]) -> list[str]:
    out = []
    if ad.use_dora:
        out.append("DoRA: alpha is not a pure strength knob (rows are renormalised to the magnitude m); "
                   "the low-rank part scales by F, the merged change does not")
    if layout.caps.alpha != "scale":
        off = sum(not SCALE_RANGE[0] <= abs(d.scale_after) <= SCALE_RANGE[1] for d in docs)
        if off:
            kind = "α/√r" if ad.use_rslora else "α/r"
            out.append(f"{off:,} of {plural(len(ad.modules), 'module')} now {verb(off, 'has')} {kind} outside the usual "
                       f"{SCALE_RANGE[0]:g}–{SCALE_RANGE[1]:g} range")
    return out


def rescale(ad: Adapter, out: Path, *, factor: float | None = None, alpha: float | None = None, bake: bool = False,
            force: bool = False, progress: Callable[[int], None] | None = None) -> RescaleResult:
    """Write ``ad`` with every module's ΔW multiplied by F (from ``factor``, or ``alpha``/current α)."""
    from ..analysis import compute_spectra

    out = Path(out)
    check_output(ad, out, force)
    layout = layout_of(ad)
    out_fmt = layout.output_format(ad, out)
    refuse_inexpressible(ad, out_fmt)  # as truncate: e.g. PEFT DoRA on an embedding, mlx-lm DoRA on some modules only
    factor, alpha_before = resolve_factor(ad, layout, factor, alpha)
    spectra = compute_spectra(ad.modules, progress=progress)
    for m in ad.modules:
        if spectra[m.name][0] is None:
            raise InspectError(f"{ad.path}: module {m.name!r} holds NaN/inf values: refusing to rewrite a corrupt adapter")
    tensors = module_tensors(ad)
    _check_range(ad, spectra, factor, bake, tensors)
    if bake:
        _bake(ad, tensors, factor)
    tensors.update(extras_tensors(ad))
    rw = layout.baked(ad, out_fmt, tensors) if bake else layout.rescaled(ad, out_fmt, tensors, factor)
    docs, expected = _records(ad, spectra, factor, bake)
    size, max_err, written = write_checked(ad, layout, out, rw, expected, set())
    return RescaleResult(
        adapter=ad, output=out, factor=float(factor), method="bake" if bake else "config", alpha_before=alpha_before,
        alpha_after=None if alpha_before is None else alpha_before * (1 if bake else factor), modules=docs,
        warnings=_warnings(ad, layout, docs), notes=written,
        readme_copied=bool(layout.copied_files(ad, out_fmt)), max_check_error=max_err,
    )
