"""``convert``: an adapter into another layout, ΔW of every module unchanged (to the output dtype's
rounding), written atomically and checked by re-reading before it appears (GGUF: read back with
``gguf.GGUFReader`` and ΔW rebuilt by llama.cpp's rule, scale = α/r per tensor)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import InspectError, OptionError
from ..files import AtomicOutput, check_output_path, dump_json, write_safetensors, write_text
from .canon import Canon, CanonModule, from_adapter, times
from .check import Sketch, tolerance, unit_roundoff
from .flux import flux_for_target
from .gguf_out import PERMUTE_ARCHS, GgufPlan, base_config, config_path, llama_permute, plan_gguf, read_gguf, write_gguf
from .results import ConvertResult, ModuleOut
from .writers import WRITERS, Written, write_kohya

__all__ = ["convert", "write_canon", "TARGETS", "DTYPES", "default_dtype"]

TARGETS = ("peft", "kohya", "diffusers", "mlx", "gguf")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ST = {"F16": "fp16", "BF16": "bf16"}


def default_dtype(ad) -> str:
    """The source's common factor dtype (16-bit kept, everything else fp32)."""
    c = Counter(m.dtype for m in ad.modules).most_common(1)
    return _ST.get(c[0][0], "fp32") if c else "fp32"


def _markers() -> tuple[str, ...]:
    from ..formats import ADAPTER_MARKERS

    return ADAPTER_MARKERS


def _extras(ad, canon: Canon, target: str) -> dict[str, torch.Tensor]:
    if not canon.extras:
        return {}
    if target == "peft" and ad.format.startswith("peft"):
        return {k: ad.source.get(k) for k in canon.extras}
    raise InspectError(f"{ad.path}: full tensors ({canon.extras[0]!r} …, modules_to_save) cannot be written to "
                       f"{target}")


def _key(m: CanonModule, flat: bool) -> str:
    return m.path if flat else m.name


def _compare(expected: list[CanonModule], got: list[CanonModule], dtype: torch.dtype,
             records: list[ModuleOut]) -> tuple[float, float]:
    """Every module's written ΔW against the expected one, by a Gaussian sketch (:mod:`.check`).
    Returns (worst relative error estimate, worst error/tolerance)."""
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
            and g.a.shape == m.a.shape and torch.equal(g.a, m.a) and torch.equal(g.b, m.b))


def _same_factors(m: CanonModule, g: CanonModule) -> tuple[float, float]:
    """Bit-identical factors: ΔW differs by |s′ − s|/|s| exactly (nothing when B or A is zero, e.g. an unadapted
    part split out of a fused module); the scale may only round as an fp32 α does."""
    if g.scale == m.scale or not (bool(m.b.any()) and bool(m.a.any())):
        return 0.0, 0.0
    rel = abs(g.scale - m.scale) / abs(m.scale) if m.scale else abs(g.scale)
    return rel, rel / (4 * unit_roundoff(torch.float32))


def _sketched(sk: Sketch, m: CanonModule, g: CanonModule, dtype: torch.dtype) -> tuple[float, float]:
    """Changed factors: the sketched ‖ΔW′ − ΔW‖_F against 3× the rounding bound (:mod:`.check`)."""
    b, a = m.b.double(), m.a.double()  # once, for the sketch and the tolerance
    y = sk.apply(b, a, m.scale)
    err = sk.norm(sk.apply(g.b, g.a, g.scale) - y)
    norm = sk.norm(y)
    return (err / norm if norm > 0 else err), err / (3 * tolerance(b, a, dtype, m.scale))


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
        b, a = canon_factors(m.kind, *(torch.from_numpy(tensors[rec.target + s].astype("float64"))
                                       for s in (".lora_a", ".lora_b")))
        if plan.arch in PERMUTE_ARCHS and rec.target.endswith(("attn_q.weight", "attn_k.weight")):
            b = _unpermute(b, plan, rec.target.endswith("attn_k.weight"))
        r = b.shape[1]
        s = alpha / r if alpha else 1.0
        out.append(CanonModule(m.component, m.path, m.kind, b, a, s))
    return out


def _unpermute(b: torch.Tensor, plan: GgufPlan, is_k: bool) -> torch.Tensor:
    assert plan.n_head is not None
    idx = torch.arange(b.shape[0], dtype=torch.float64).reshape(-1, 1)
    perm = llama_permute(idx, plan.n_head, plan.n_kv_head if is_k else plan.n_head).reshape(-1).long()
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.shape[0])
    return b[inv]


def _positive_scales(canon: Canon) -> tuple[Canon, list[str]]:
    """A module whose scale is zero or negative (an mlx-lm ``scale`` of 0 or below) gets it baked into B with
    s = 1: a stored α of 0 means α = r to kohya and diffusers readers, and a negative α is refused."""
    bad = [m for m in canon.modules if not m.scale > 0]
    if not bad:
        return canon, []
    mods = [replace(m, b=times(m.b, m.scale), scale=1.0) if not m.scale > 0 else m for m in canon.modules]
    n = f"{len(bad)} module{'s' if len(bad) > 1 else ''}"
    return replace(canon, modules=mods), [f"{n} with a scale ≤ 0 (first {bad[0].name}: s = {bad[0].scale:g}): "
                                          "baked into B"]


def write_canon(canon: Canon, out: Path, target: str, dtype: torch.dtype, extras: dict[str, torch.Tensor],
                arch: str | None = None, base: Path | None = None, unet_names: str = "auto"
                ) -> tuple[list[ModuleOut], list[str], float, float]:
    """Write ``canon`` to ``out`` in ``target`` atomically, re-read it and compare every ΔW.
    Returns (per-module records, notes, worst relative error, worst error/tolerance)."""
    from ..formats import load_adapter
    from ..spectrum import single_threaded_torch

    if target == "gguf":
        where = str(base) if base else "base config"
        plan = plan_gguf(canon, arch, base_config(base), where)
        with AtomicOutput(out, suffix=".gguf") as atomic:
            records = write_gguf(canon, atomic.tmp, plan, dtype)
            got = _gguf_modules(atomic.tmp, canon, plan, records)
            worst, ratio = _compare(canon.modules, got, dtype, records)
            atomic.commit()
        return records, [f"general.architecture = {plan.arch}, adapter.lora.alpha = {plan.alpha:g}"] + atomic.notes, \
            worst, ratio
    canon, baked = _positive_scales(canon)
    w: Written = write_kohya(canon, dtype, extras, unet_names) if target == "kohya" else \
        WRITERS[target](canon, dtype, extras)
    w.notes += baked
    if w.weights_name is not None and out.suffix in (".safetensors", ".bin", ".gguf"):
        raise InspectError(f"{out}: a {target} adapter is a directory; name a directory, not a {out.suffix} file")
    if w.weights_name is None and out.suffix != ".safetensors":
        raise InspectError(f"{out}: a {target} adapter is one .safetensors file; name OUT …​.safetensors")
    with AtomicOutput(out, suffix="" if w.weights_name else ".safetensors") as atomic:
        if w.weights_name is None:
            write_safetensors(atomic.tmp, w.tensors, w.metadata or None)
        else:
            d = atomic.mkdir()
            write_safetensors(d / w.weights_name, w.tensors, w.metadata or None)
            if w.config is not None:
                write_text(d / "adapter_config.json", dump_json(w.config))
        with single_threaded_torch():
            try:
                back = from_adapter(load_adapter(atomic.tmp), native=True, finite=False)
            except InspectError as e:
                raise InspectError(f"self-check failed: the written adapter does not load ({e})") from e
            worst, ratio = _compare(canon.modules, back.modules, dtype, w.records)
        atomic.commit()
    return w.records, w.notes + atomic.notes, worst, ratio


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
    if target not in TARGETS:
        raise InspectError(f"unknown target layout {target!r} (one of {', '.join(TARGETS)})")
    out = Path(out)
    check_output_path(ad.path, ad.weights_path, out, force, _markers())
    dt_name = dtype or default_dtype(ad)
    if target == "gguf" and dtype is None and dt_name == "bf16":
        dt_name = "fp16"
    with named_file(ad.path, out):
        canon = from_adapter(ad, native=True)
        if component is not None:
            place_in(canon, component)
        canon = flux_for_target(canon, target)  # Flux: BFL fused ↔ diffusers split names
        extras = _extras(ad, canon, target)
        if base is None and ad.base_model and target == "gguf":
            home = Path(ad.path) if Path(ad.path).is_dir() else Path(ad.path).parent
            cand = Path(ad.base_model) if Path(ad.base_model).is_absolute() else home / ad.base_model
            base = cand if cand.exists() and config_path(cand).is_file() else None  # a folder with a config
        records, notes, worst, ratio = write_canon(canon, out, target, DTYPES[dt_name], extras, arch, base,
                                                   unet_names)
    size, files = _size(out)
    return ConvertResult(Path(ad.path), ad.format, out, target, dt_name, records, files, size,
                         canon.notes + notes + list(ad.notes), worst, ratio)
