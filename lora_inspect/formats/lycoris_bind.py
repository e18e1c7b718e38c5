"""Diag-OFT, BOFT and (IA)³ modules read from a LyCORIS file, and completed by the base checkpoint (``--base``):
what the file alone cannot say — a base-dependent module's ΔW, and a flattened conv's kernel
(:func:`complete_with_base`). The updates and their formulas: :mod:`.lycoris_base`.

Without ``--base`` such a module is listed (``info``: counts and parameters; ``rank``: a row flagged
``needs_base``, no spectrum) when other modules can be analysed; a selection of nothing else is refused in
one line naming ``--base`` (:func:`analysable`), and rewrites refuse it in one line.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..adapter import Adapter, Module
from ..errors import InspectError
from ..kernels import apply_base_kernel, is_flattened
from ..kinds import Kind
from ..units import plural, verb
from .lycoris_base import BaseDependentUpdate, BOFTUpdate, BoundUpdate, IA3Update, OFTUpdate, rank_bound

if TYPE_CHECKING:  # pragma: no cover
    from ..basecheckpoint import BaseCheckpoint, BaseTensor
    from .lycoris import ReadContext

__all__ = ["base_module", "base_notes", "complete_with_base", "adapter_with_base", "analysable", "NEEDS_BASE"]

NEEDS_BASE = "needs_base"  # rank's flag on a module whose ΔW needs --base


def _scalar(c: ReadContext, role: str) -> float:
    key = c.roles[role]
    value = c.source.scalar(key)
    if not math.isfinite(value):
        raise InspectError(f"{c.source.path}: module {c.name!r}: {role} tensor {key!r} is {value}")
    return value


def _rescale(c: ReadContext, out: int) -> bool | None:
    """The conv hint of an OFT ``rescale`` (out, 1[, 1, 1]) after checking its shape; None without one."""
    if "rescale" not in c.roles:
        return None
    sh = c.dims("rescale", (1, 2, 3, 4))
    if sh[0] != out or any(d != 1 for d in sh[1:]):
        raise c.fail(f"rescale must be ({out}, 1[, 1, 1]): one factor per output row of the {out} that oft_blocks "
                     "rotate")
    return len(sh) > 2


def _oft(c: ReadContext) -> OFTUpdate:
    sh = c.dims("oft_blocks", (3, 4))
    if sh[-1] != sh[-2]:
        raise c.fail("oft_blocks must hold square b×b blocks: (n, b, b) for OFT, (m, n, b, b) for BOFT")
    n, b = sh[-3], sh[-1]
    if len(sh) == 4 and (b % 2 or n % 2 ** (sh[0] - 1)):
        raise c.fail(f"BOFT needs an even block size and n divisible by 2^(m−1) = {2 ** (sh[0] - 1)} for its "
                     f"{sh[0]} butterfly stages")
    hint = _rescale(c, n * b)
    constraint = _scalar(c, "alpha") * n * b if "alpha" in c.roles else 0.0
    numel = math.prod(sh) + (n * b if hint is not None else 0)
    cls = BOFTUpdate if len(sh) == 4 else OFTUpdate
    return cls(c.name, c.roles, rank_bound(sh, hint is not None), n * b, hint, constraint=constraint, _numel=numel)


def _ia3(c: ReadContext) -> IA3Update:
    c.need("weight", "on_input")
    sh = c.dims("weight", (1, 3, 4))
    if len(sh) > 1 and (sh[0] != 1 or any(d != 1 for d in sh[2:])):
        raise c.fail("(IA)³ weight must be (n,) for a Linear or (1, n, 1, 1) for a conv")
    flag = _scalar(c, "on_input")
    if flag not in (0.0, 1.0):
        raise InspectError(f"{c.source.path}: module {c.name!r}: on_input tensor {c.roles['on_input']!r} is {flag:g}, "
                           "expected 0 (scale output rows) or 1 (input channels)")
    side = sh[0] if len(sh) == 1 else sh[1]
    return IA3Update(c.name, c.roles, side, side, len(sh) > 1, input_side=flag == 1.0, _numel=side)


def base_module(c: ReadContext) -> Module | None:
    """The Diag-OFT, BOFT or (IA)³ module of ``c`` (None for another algorithm); its shape has 0 where only the
    base weight knows it (OFT, BOFT, (IA)³ on rows: in; (IA)³ on_input: out, and in for a conv)."""
    if "oft_blocks" in c.roles:
        upd: BaseDependentUpdate = _oft(c)
    elif "on_input" in c.roles:
        upd = _ia3(c)
    else:
        return None
    if upd.input_side:
        shape = (0, 0 if upd.conv_hint else upd.side)
    else:
        shape = (upd.side, 0)
    kind = Kind.CONV_UNKNOWN if upd.conv_hint else Kind.LINEAR
    first = upd.keys[0]
    return Module(name=c.name, kind=kind, shape=shape, rank=upd.rank, alpha=0.0, scale=1.0, update=upd,
                  source=c.source, dtype=c.source.info(first).dtype)


def _counts(modules: Sequence[Module]) -> str:
    got = Counter(m.update.label for m in modules if isinstance(m.update, BaseDependentUpdate))
    return ", ".join(f"{k} ×{v}" for k, v in sorted(got.items()))


def base_notes(modules: Sequence[Module]) -> list[str]:
    """The reader's note on its base-dependent modules (none when it has none)."""
    mods = [m for m in modules if m.update.needs_base]
    if not mods:
        return []
    params = sum(m.params for m in mods)
    one = len(mods) == 1
    return [f"{plural(len(mods), 'module')} ({_counts(mods)}; {params:,} parameters) {verb(len(mods), 'changes')} W "
            f"through W itself: {'its' if one else 'their'} ΔW is computed from the base weight with --base "
            f"(rank --base BASE, convert --base BASE); without it {'it is' if one else 'they are'} listed, not analysed"]


def _base_info(ck: BaseCheckpoint, m: Module) -> tuple[Path, str, tuple[int, ...]] | None:
    key = ck.key_for(m.name)
    if key is None:
        return None
    p, file_key = ck.files[key]
    info = ck.source(p).tensors.get(file_key)
    if info is None:
        raise InspectError(f"{p}: no tensor named {file_key!r} (the index lists it in this file)")
    return p, file_key, tuple(info.shape)


def _bind(m: Module, ck: BaseCheckpoint) -> None:
    upd = m.update
    assert isinstance(upd, BaseDependentUpdate)
    found = _base_info(ck, m)
    if found is None:
        raise InspectError(f"{ck.path}: the base has no weight for module {m.name!r} ({upd.label}: its ΔW is "
                           "computed from it; adapter and base do not match)")
    p, key, shape = found
    why = upd.misfit(shape) if len(shape) in (2, 4) else f"{upd.label} is read on Linear and Conv2d weights only"
    if why is not None:
        raise InspectError(f"{p}: module {m.name!r}: base weight {key!r} has shape {'×'.join(map(str, shape))}: {why} "
                           "(adapter and base do not match)")
    m.shape = (shape[0], math.prod(shape[1:]))
    m.kind, m.kernel = (Kind.CONV, (shape[2], shape[3])) if len(shape) == 4 else (Kind.LINEAR, None)
    m.rank = min(upd.rank, *m.shape)
    bt = ck.locate(m)  # the dtype checks (a quantised base is refused); the shape fits now
    m.update = BoundUpdate(upd, partial(ck.weight, bt, np.dtype(np.float64)), m.rank)


def complete_with_base(modules: Sequence[Module], ck: BaseCheckpoint) -> None:
    """Bind each base-dependent module to its base weight (refused in one line when the base has none or
    another shape) and give each flattened conv the kernel of a 4-D base weight (:mod:`lora_inspect.kernels`)."""
    for m in modules:
        if m.update.needs_base:
            _bind(m, ck)
        elif m.kernel is not None or is_flattened(m):  # a known kernel must be the base's too
            found = _base_info(ck, m)
            if found is not None:
                apply_base_kernel(m, found[2], found[0], found[1])


def adapter_with_base(ad: Adapter, base: Path | None) -> Adapter:
    """``ad`` completed by the base checkpoint at ``base`` (``convert --base``): a layout's ``with_base``. A base
    that is no checkpoint (a GGUF target's config.json) is refused only when a module needs its weights."""
    needs = any(m.update.needs_base for m in ad.modules)
    if base is None or not (needs or any(is_flattened(m) for m in ad.modules)):
        return ad
    from ..basecheckpoint import open_base_checkpoint

    try:
        ck = open_base_checkpoint(base)
    except InspectError:
        if needs:
            raise
        return ad  # kernels are a bonus there: the base was given for the target
    complete_with_base(ad.modules, ck)
    return ad


def analysable(ad: Adapter, modules: list[Module], base: BaseCheckpoint | None
               ) -> tuple[list[Module], list[BaseTensor] | None]:
    """(the modules whose spectra ``rank`` computes, their base tensors or None): with ``base``, all of them once
    it completes them, and their base tensors (``BaseCheckpoint.check``: mismatches refused before any work);
    else those that do not need it, one line naming --base when none is left."""
    if base is not None:
        complete_with_base(modules, base)
        return modules, base.check(ad, modules)
    todo = [m for m in modules if not m.update.needs_base]
    if modules and not todo:
        raise InspectError(f"{ad.path}: every module ({_counts(modules)}) changes W through W itself: its ΔW needs "
                           "the base weight; give --base BASE (the base checkpoint)")
    return todo, None
