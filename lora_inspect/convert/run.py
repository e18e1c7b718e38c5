"""``convert``: an adapter into another layout, ΔW of every module unchanged (to the output dtype's
rounding), written atomically and checked by re-reading before it appears (GGUF: read back with
``gguf.GGUFReader`` and ΔW rebuilt by llama.cpp's rule, scale = α/r per tensor)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import InspectError, OptionError
from ..files import AtomicOutput
from ..formats import check_output, layout_for_target, layout_of
from ..formats.gguf import PERMUTE_ARCHS
from ..formats.layout import Converted, Held, Layout, WriteOptions
from .canon import Canon, CanonModule, from_adapter
from .checked import compare
from .flux import flux_for_target
from .gguf_out import (
    GgufPlan,
    base_config,
    llama_permute,
    plan_gguf,
    read_gguf,
    write_gguf,
)
from .results import ConvertResult, ModuleOut

__all__ = ["convert", "write_canon", "write_gguf_checked", "DTYPES", "default_dtype"]

DTYPES = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}  # --dtype → the storage dtype written
_ST = {"F16": "fp16", "BF16": "bf16"}


def default_dtype(ad) -> str:
    """The source's common factor dtype (16-bit kept, everything else fp32)."""
    c = Counter(m.dtype for m in ad.modules).most_common(1)
    return _ST.get(c[0][0], "fp32") if c else "fp32"


def _gguf_modules(path: Path, canon: Canon, plan: GgufPlan, records: list[ModuleOut]) -> list[CanonModule]:
    """The written GGUF as canonical modules: ΔW = (α/r)·lora_b@lora_a (an embedding: lora_a@lora_bᵀ), Q/K
    rows un-permuted by comparing against the permuted expectation (so the check covers the permutation too)."""
    from .gguf_out import canon_factors

    fields, tensors = read_gguf(path)
    want = {"general.type": "adapter", "adapter.type": "lora", "general.architecture": plan.arch}
    for k, val in want.items():
        if fields.get(k) != val:
            raise InspectError(f"self-check failed: GGUF field {k} is {fields.get(k)!r}, expected {val!r}")
    alpha = float(fields["adapter.lora.alpha"])  # type: ignore[arg-type]
    out = []
    for m, rec in zip(canon.modules, records):
        b, a = canon_factors(m.kind, *(tensors[rec.target + s].astype(np.float64) for s in (".lora_a", ".lora_b")))
        if plan.arch in PERMUTE_ARCHS and rec.target.endswith(("attn_q.weight", "attn_k.weight")):
            b = _unpermute(b, plan, rec.target.endswith("attn_k.weight"))
        r = b.shape[1]
        s = alpha / r if alpha else 1.0
        out.append(CanonModule(m.component, m.path, m.kind, b, a, s))
    return out


def _unpermute(b: np.ndarray, plan: GgufPlan, is_k: bool) -> np.ndarray:
    assert plan.n_head is not None
    idx = np.arange(b.shape[0]).reshape(-1, 1)
    perm = llama_permute(idx, plan.n_head, plan.n_kv_head if is_k else plan.n_head).reshape(-1)
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.shape[0])
    return b[inv]


def write_gguf_checked(canon: Canon, out: Path, opts: WriteOptions) -> Converted:
    """Write ``canon`` as a GGUF LoRA atomically, read it back with ``gguf.GGUFReader`` and compare every ΔW
    by llama.cpp's rule (the GGUF layout's :meth:`~lora_inspect.formats.gguf.GgufLayout.write_converted`)."""
    where = str(opts.base) if opts.base else "base config"
    plan = plan_gguf(canon, opts.arch, base_config(opts.base), where)
    with AtomicOutput(out, suffix=".gguf") as atomic:
        records = write_gguf(canon, atomic.tmp, plan, opts.dtype)
        got = _gguf_modules(atomic.tmp, canon, plan, records)
        worst, ratio = compare(canon.modules, got, opts.dtype, records)
        atomic.commit()
    return Converted(records, [f"general.architecture = {plan.arch}, adapter.lora.alpha = {plan.alpha:g}"]
                     + atomic.notes, worst, ratio)


def write_canon(canon: Canon, out: Path, layout: Layout, opts: WriteOptions, carry_extras: bool = False) -> Converted:
    """Write ``canon`` to ``out`` as ``layout`` atomically, re-read it and compare every ΔW. What the layout
    cannot hold (its capabilities) is refused in one line first, before anything is written; ``carry_extras``:
    the source's full tensors (``canon.extras``) are of a kind a layout may store (PEFT's modules_to_save)."""
    held = [Held(m.source_name or m.name, m.kind, m.magnitude is not None, m.component) for m in canon.modules]
    why = layout.refusal(held, canon.extras, carry_extras)
    if why is not None:
        raise InspectError(why)
    return layout.write_converted(canon, out, opts)


def _size(out: Path) -> tuple[int, list[str]]:
    if out.is_dir():
        files = sorted(p for p in out.iterdir() if p.is_file())
        return sum(p.stat().st_size for p in files), [p.name for p in files]
    return out.stat().st_size, [out.name]


@contextmanager
def named_file(src: object, out: Path) -> Iterator[None]:
    """Errors from the conversion name the file they are about: the source (:meth:`InspectError.located`),
    unless they already name OUT."""
    try:
        yield
    except OptionError:
        raise
    except InspectError as e:
        if e.message.startswith(str(out)):
            raise
        raise e.located(src) from e


def place_in(canon: Canon, component: str) -> None:
    """Name the pipeline component (``unet``, ``transformer`` …) of a one-model adapter (PEFT, mlx-lm), so
    that pipeline layouts (diffusers, kohya) can name its modules."""
    from .names import COMPONENTS

    if component not in COMPONENTS:
        raise InspectError(f"unknown pipeline component {component!r} (one of {', '.join(COMPONENTS)})")
    named = sorted(c for c in canon.components() if c is not None)
    if named:
        raise InspectError(f"the adapter's modules already belong to {', '.join(named)}; a component is only given to "
                           "one-model adapters (PEFT, mlx-lm)")
    for m in canon.modules:
        m.component = component


def convert(ad, out: Path, target: str, *, dtype: str | None = None, arch: str | None = None,
            base: Path | None = None, force: bool = False, component: str | None = None,
            unet_names: str = "auto") -> ConvertResult:
    """Convert adapter ``ad`` into ``target`` at ``out`` (see the module docstring). ``component`` places a
    one-model adapter in a pipeline (:func:`place_in`)."""
    layout = layout_for_target(target)
    out = Path(out)
    check_output(ad, out, force)
    dt_name = dtype or layout.default_dtype(default_dtype(ad))
    with named_file(ad.path, out):
        canon = from_adapter(layout_of(ad).with_base(ad, base) if base is not None else ad, native=True)
        if component is not None:
            place_in(canon, component)
        canon = flux_for_target(canon, layout.naming)  # Flux: BFL fused ↔ diffusers split names
        carry = layout_of(ad).caps.full_tensors
        extras = {k: ad.source.raw(k) for k in canon.extras} if carry and layout.caps.full_tensors else {}
        opts = WriteOptions(DTYPES[dt_name], extras, unet_names, arch, layout.locate_base(ad, base))
        done = write_canon(canon, out, layout, opts, carry)
    size, files = _size(out)
    return ConvertResult(Path(ad.path), ad.format, out, target, dt_name, done.records, files, size,
                         canon.notes + done.notes + list(ad.notes), done.worst, done.ratio)
