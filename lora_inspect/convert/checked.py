"""A conversion written and checked before it appears: the target layout's tensors go to a temporary
path (:class:`~lora_inspect.files.AtomicOutput`), which is re-read with ``load_adapter`` and every
module's ΔW compared with the expected one (:func:`compare`: bit-identical factors exactly, changed
ones by a Gaussian sketch against the rounding bound of :mod:`.check`); only then is it renamed onto OUT.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InspectError
from ..files import AtomicOutput, dump_json, write_safetensors, write_text
from ..units import plural
from .canon import Canon, CanonModule, from_adapter, numbers, same_values, times
from .check import Sketch, tolerance, unit_roundoff
from .results import ModuleOut

if TYPE_CHECKING:  # pragma: no cover
    from ..formats.layout import Converted, Layout, WriteOptions

__all__ = ["write_checked", "compare", "positive_scales"]


def _key(m: CanonModule, flat: bool) -> str:
    return m.path if flat else m.name


def compare(expected: list[CanonModule], got: list[CanonModule], dtype: str,
            records: list[ModuleOut]) -> tuple[float, float]:
    """Every module's written ΔW against the expected one, by a Gaussian sketch (:mod:`.check`); ``dtype``
    is the storage dtype written (a safetensors name). Returns (worst relative error estimate, worst error/tolerance)."""
    flat = len({m.component for m in expected}) <= 1 and len({m.component for m in got}) <= 1
    have = {_key(m, flat): m for m in got}
    if set(have) != {_key(m, flat) for m in expected}:
        missing = sorted({_key(m, flat) for m in expected} - set(have))[:3]
        extra = sorted(set(have) - {_key(m, flat) for m in expected})[:3]
        raise InspectError(f"self-check failed: modules differ after writing (missing {missing}, unexpected {extra})")
    sk = Sketch()
    worst = worst_ratio = 0.0
    for m, rec in zip(expected, records):
        g = have[_key(m, flat)]
        if g.shape != m.shape:
            raise InspectError(f"self-check failed: {m.name} reads back as {g.shape[0]}×{g.shape[1]}, expected "
                               f"{m.shape[0]}×{m.shape[1]}; nothing was written")
        same = _identical(m, g)
        rel, ratio = _same_factors(m, g) if same else _sketched(sk, m, g, dtype)
        rec.check = "identical" if same else "sketched"
        if not ratio <= 1.0:
            raise InspectError(f"self-check failed: {m.name} ΔW after writing differs by {rel:.3g} of its norm "
                               f"({ratio:.3g}× the rounding tolerance); nothing was written")
        rec.check_error = rel
        worst, worst_ratio = max(worst, rel), max(worst_ratio, ratio)
    return worst, worst_ratio


def _identical(m: CanonModule, g: CanonModule) -> bool:
    return (g.b.dtype == m.b.dtype and g.a.dtype == m.a.dtype and g.b.shape == m.b.shape
            and same_values(g.a, m.a) and same_values(g.b, m.b))


def _same_factors(m: CanonModule, g: CanonModule) -> tuple[float, float]:
    """Bit-identical factors: ΔW differs by |s′ − s|/|s| exactly (nothing when B or A is zero, e.g. an unadapted
    part split out of a fused module); the scale may only round as an fp32 α does."""
    if g.scale == m.scale or not (bool(numbers(m.b).any()) and bool(numbers(m.a).any())):
        return 0.0, 0.0
    rel = abs(g.scale - m.scale) / abs(m.scale) if m.scale else abs(g.scale)
    return rel, rel / (4 * unit_roundoff("F32"))


def _sketched(sk: Sketch, m: CanonModule, g: CanonModule, dtype: str) -> tuple[float, float]:
    """Changed factors: the sketched ‖ΔW′ − ΔW‖_F against 3× the rounding bound (:mod:`.check`)."""
    b, a = numbers(m.b).astype(np.float64), numbers(m.a).astype(np.float64)  # once, for the sketch and the tolerance
    y = sk.apply(b, a, m.scale)
    err = sk.norm(sk.apply(g.b, g.a, g.scale) - y)
    norm = sk.norm(y)
    return (err / norm if norm > 0 else err), err / (3 * tolerance(b, a, dtype, m.scale))


def positive_scales(canon: Canon) -> tuple[Canon, list[str]]:
    """A module whose scale is zero or negative (an mlx-lm ``scale`` of 0 or below) gets it baked into B with
    s = 1: a stored α of 0 means α = r to kohya and diffusers readers, and a negative α is refused."""
    bad = [m for m in canon.modules if not m.scale > 0]
    if not bad:
        return canon, []
    mods = [replace(m, b=times(m.b, m.scale), scale=1.0) if not m.scale > 0 else m for m in canon.modules]
    n = plural(len(bad), "module")
    return replace(canon, modules=mods), [f"{n} with a scale ≤ 0 (first {bad[0].name}: s = {bad[0].scale:g}): "
                                          "baked into B"]


def write_checked(layout: "Layout", canon: Canon, out: Path, opts: "WriteOptions") -> "Converted":
    """Write ``canon`` as ``layout`` (:meth:`~lora_inspect.formats.layout.Layout.convert_tensors`: one
    safetensors file, or a directory with a weight file and ``adapter_config.json``) to ``out`` atomically,
    re-read it and compare every ΔW."""
    from ..formats import load_adapter
    from ..formats.layout import Converted

    canon, baked = positive_scales(canon)
    w = layout.convert_tensors(canon, opts)
    w.notes += baked
    if w.weights_name is not None and out.suffix in (".safetensors", ".bin", ".gguf"):
        raise InspectError(f"{out}: a {layout.target} adapter is a directory; name a directory, not a {out.suffix} file")
    if w.weights_name is None and out.suffix != layout.file_suffix:
        raise InspectError(f"{out}: a {layout.target} adapter is one {layout.file_suffix} file; name OUT "
                           f"…​{layout.file_suffix}")
    with AtomicOutput(out, suffix="" if w.weights_name else layout.file_suffix) as atomic:
        if w.weights_name is None:
            write_safetensors(atomic.tmp, w.tensors, w.metadata or None)
        else:
            d = atomic.mkdir()
            write_safetensors(d / w.weights_name, w.tensors, w.metadata or None)
            if w.config is not None:
                write_text(d / "adapter_config.json", dump_json(w.config))
        try:
            back = from_adapter(load_adapter(atomic.tmp), native=True, finite=False)
        except InspectError as e:
            raise InspectError(f"self-check failed: the written adapter does not load ({e})") from e
        worst, ratio = compare(canon.modules, back.modules, opts.dtype, w.records)
        atomic.commit()
    return Converted(w.records, w.notes + atomic.notes, worst, ratio)
