"""``truncate``: replace every ΔW by its best rank-k approximation, in the same layout.

Truncation (Eckart–Young–Mirsky: the best rank-k approximation in Frobenius and spectral norm keeps
the k largest singular triplets). For ΔW = s·B@A, Householder QR B = Q_b R_b, Aᵀ = Q_a R_a, SVD of the
r×r core s·R_b R_aᵀ = U S Vᵀ (docs/formats.md, "Writing a PEFT adapter"):
B′ = Q_b U_k √S_k (out, k), A′ = √S_k V_kᵀ Q_aᵀ (k, in), so B′@A′ is the truncated ΔW with the scale
baked in (the layout then stores α so that s′ = 1). The QR route (Gram/Cholesky when well conditioned,
Householder otherwise) is :func:`lora_inspect.spectrum.decompose`'s, in numpy. 16-bit data is
decomposed in float32 (it carries 8–11 significant bits), everything else in float64; the core is
always float64. Rank choice: :mod:`lora_inspect.rewrite.ranks`; layout specifics: the adapter's
:class:`~lora_inspect.formats.layout.Layout`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..adapter import Adapter, LowRankUpdate, Module, module_type
from ..arrays import decode, encode
from ..errors import InspectError
from ..formats import check_output, layout_of, refuse_inexpressible
from ..formats.tensors import DTYPE_SIZES
from ..spectrum import (
    Decomposition,
    all_finite,
    compute_dtype,
    parallel_map,
    relative_error,
    retained_energy,
)
from ..units import noun, plural, verb
from .ranks import RankChoice, TruncateSpec, choose_ranks
from .results import ModuleChange, TruncateResult
from .selfcheck import Expected, write_checked
from .tensors import check_finite, extras_tensors, header_reserve, storage_dtype

__all__ = ["truncate", "to_stored", "Factored", "assemble", "rank_independent_bytes",
           "truncation_warnings"]


_TORCH_NAME = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}  # as messages name them


def _stored(x: np.ndarray, st: str) -> np.ndarray:
    y = encode(x, st)
    return y if y.flags.c_contiguous else np.ascontiguousarray(y)


def to_stored(m: Module, b_lin: np.ndarray, a_lin: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Linear-orientation factors → (A_stored, B_stored) in the module's orientation and storage ``dtype``
    (a safetensors name)."""
    dtype = storage_dtype(dtype)
    if not isinstance(m.update, LowRankUpdate):  # another update type: written as a kohya LoRA/LoCon pair
        k = b_lin.shape[1]
        if m.kernel is not None:
            kh, kw = m.kernel
            return (_stored(a_lin.reshape(k, m.shape[1] // (kh * kw), kh, kw), dtype),
                    _stored(b_lin.reshape(m.shape[0], k, 1, 1), dtype))
        return _stored(a_lin, dtype), _stored(b_lin, dtype)
    lr = m.low_rank
    a_st, b_st = lr.orient.to_stored(b_lin, a_lin, m.source.info(lr.a_key).shape, m.source.info(lr.b_key).shape)
    a_st, b_st = _stored(a_st, dtype), _stored(b_st, dtype)
    if not (all_finite(decode(a_st)) and all_finite(decode(b_st))):  # the scale, baked in, leaves the dtype's range
        raise InspectError(f"{m.source.path}: module {m.name!r}: overflow: the truncated factors (scale {m.scale:g} "
                           f"baked in) exceed the range of {_TORCH_NAME.get(dtype, dtype.lower())}")
    return a_st, b_st


@dataclass
class Factored:
    """Per-module spectra, and the new factors (or the decompositions to cut once ranks are known)."""

    spectra: list[np.ndarray] = field(default_factory=list)
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    decomps: dict[str, Decomposition] = field(default_factory=dict)


def _decompose_all(ad: Adapter, spec: TruncateSpec, one_rank: bool,
                   progress: Callable[[int], None] | None) -> Factored:
    stream = spec.rank is not None and not one_rank  # ranks known up front: no need to keep decompositions

    def work(m: Module):
        try:  # the QR/core SVD of the factors, or the update's own (LoKr products, dense SVD)
            d = m.update.decomposition(m.source, compute_dtype(m.dtype), m.scale)
        except ValueError:
            raise InspectError(f"{ad.path}: module {m.name!r} holds NaN/inf values: refusing to rewrite a "
                               "corrupt adapter") from None
        except InspectError as e:
            raise InspectError(f"{ad.path}: module {m.name!r}: {e}") from e
        sv = np.zeros(m.rank)
        sv[: d.s.shape[0]] = d.s
        if stream:
            assert spec.rank is not None
            b_new, a_new = d.factors(min(spec.rank, m.rank))
            return sv, None, to_stored(m, b_new, a_new, m.dtype)
        return sv, d, None

    got = Factored()
    for m, (sv, d, f) in zip(ad.modules, parallel_map(work, ad.modules, progress=progress)):
        got.spectra.append(sv)
        if d is None:
            got.factors[m.name] = f
        else:
            got.decomps[m.name] = d
    return got


def rank_independent_bytes(ad: Adapter, extras: dict[str, np.ndarray]) -> int:
    """What every output keeps regardless of rank: full tensors, magnitudes, biases, alphas, header."""
    n = sum(int(x.nbytes) for x in extras.values())
    for m in ad.modules:
        n += sum(m.source.info(k).nbytes for k in (m.magnitude_key, m.bias_key, m.alpha_key) if k)
    return n + header_reserve(ad)


def _change(m: Module, sv: np.ndarray, k: int, st: int) -> ModuleChange:
    size = DTYPE_SIZES.get(m.dtype, 4)
    fixed_b = sum(m.source.info(key).nbytes for key in (m.magnitude_key, m.bias_key, m.alpha_key) if key)
    per = m.shape[0] + m.shape[1]
    return ModuleChange(
        name=m.name, type=module_type(m.name), kind=m.kind, shape=m.shape, rank_before=m.rank, rank_after=k,
        stored_rank=st, params_before=m.params, params_after=st * per, bytes_before=m.nbytes,
        bytes_after=(st * per * size + fixed_b) if st else 0, retained_energy=retained_energy(sv, k),
        relative_error=relative_error(sv, k), singular_values=[float(x) for x in sv],
    )


def _module_out(ad: Adapter, m: Module, factors: tuple[np.ndarray, np.ndarray],
                tensors: dict[str, np.ndarray]) -> None:
    """The module's new factors, its magnitude unchanged and its bias with s baked in (merge adds s·bias)."""
    tensors[m.a_key], tensors[m.b_key] = factors
    if m.magnitude_key:
        tensors[m.magnitude_key] = m.source.raw(m.magnitude_key)
    if m.bias_key:
        bias = m.source.get(m.bias_key)
        check_finite(ad, m.name, bias)
        tensors[m.bias_key] = encode(bias.astype(np.float64) * m.scale, m.source.info(m.bias_key).dtype)
    if m.alpha_key:  # the layout sets its value
        tensors[m.alpha_key] = m.source.raw(m.alpha_key)


def assemble(ad: Adapter, got: Factored, choice: RankChoice):
    tensors: dict[str, np.ndarray] = {}
    changes, dropped, expected, ranks = [], [], {}, {}
    for m, sv, k, st in zip(ad.modules, got.spectra, choice.keep, choice.stored):
        if st == 0:
            dropped.append(m.name)
        else:
            _module_out(ad, m, got.factors.pop(m.name), tensors)
            kept = np.zeros(st)
            kept[: min(k, len(sv))] = sv[: min(k, len(sv))]
            expected[m.name] = Expected(kept, st, m.dtype)
            ranks[m.name] = st
        changes.append(_change(m, sv, k, st))
    if not ranks:
        raise InspectError("every module would be dropped (rank 0): nothing would be left of the adapter")
    return tensors, changes, dropped, expected, ranks


def truncation_warnings(ad: Adapter, spec: TruncateSpec, dropped: list[str],
                        changes: list[ModuleChange] | None = None) -> list[str]:
    out = []
    if ad.use_dora:
        out.append("DoRA: magnitudes copied unchanged; truncating the low-rank part is not the optimal approximation "
                   "of DoRA's full-rank change (rows are renormalised to m)")
    if spec.rank is not None:
        same = [m.name for m in ad.modules if m.rank <= spec.rank and isinstance(m.update, LowRankUpdate)]
        exact = [m.name for m in ad.modules if m.rank <= spec.rank and not isinstance(m.update, LowRankUpdate)]
        if exact:
            out.append(f"{plural(len(exact), 'LyCORIS module')} {verb(len(exact), 'has')} rank(ΔW) ≤ {spec.rank}: "
                       f"written as LoRA {noun(len(exact), 'pair')} holding {'its' if len(exact) == 1 else 'their'} exact ΔW")
        if same:
            every = len(same) == len(ad.modules)
            what = "every module" if every else f"{len(same):,} of {plural(len(ad.modules), 'module')}"
            out.append(f"{what} already {'has' if every else verb(len(same), 'has')} rank ≤ {spec.rank}: copied unchanged "
                       "(same ΔW, scale baked into the factors)")
    larger = [m.name for m, c in zip(ad.modules, changes or []) if c.params_after > m.params]
    if larger:
        shown = ", ".join(larger[:3]) + (" …" if len(larger) > 3 else "")
        out.append(f"{plural(len(larger), 'module')} {verb(len(larger), 'is')} larger as LoRA at the chosen rank "
                   f"than as stored ({shown}): LoHa/LoKr/full store ΔW more compactly")
    if dropped:
        n = len(dropped)
        out.append(f"{plural(n, 'module')} {verb(n, 'keeps')} rank 0 and {verb(n, 'is')} dropped: {', '.join(dropped[:3])}"
                   + (" …" if n > 3 else ""))
    return out


def truncate(ad: Adapter, out: Path, spec: TruncateSpec, *, force: bool = False,
             progress: Callable[[int], None] | None = None) -> TruncateResult:
    """Write the truncated adapter to ``out`` (atomically, self-checked) and return what was done."""
    spec.validate()
    out = Path(out)
    check_output(ad, out, force)
    if ad.peft_type == "ADALORA":
        raise InspectError(f"{ad.path}: AdaLoRA adapters cannot be truncated (convert to LoRA first)")
    layout = layout_of(ad)
    out_fmt = layout.output_format(ad, out)
    refuse_inexpressible(ad, out_fmt)
    one_rank = layout.caps.one_rank_only
    notes = []
    if one_rank and not spec.uniform and spec.rank is None:
        notes.append(f"{layout.name} needs one rank for all modules: ranks padded to a uniform rank")
    got = _decompose_all(ad, spec, one_rank, progress)
    extras = extras_tensors(ad)
    choice = choose_ranks(ad.modules, got.spectra, spec, fixed_bytes=rank_independent_bytes(ad, extras),
                          force_uniform=one_rank)
    for m, k, st in zip(ad.modules, choice.keep, choice.stored):
        if m.name not in got.factors and st > 0:
            got.factors[m.name] = to_stored(m, *got.decomps.pop(m.name).factors(k, st), m.dtype)
    got.decomps.clear()
    tensors, changes, dropped, expected, ranks = assemble(ad, got, choice)
    tensors.update(extras)
    rw = layout.truncated(ad, out_fmt, tensors, ranks, dropped)
    size, max_err, written = write_checked(ad, layout, out, rw, expected, set(dropped))
    return TruncateResult(
        adapter=ad, output=out, output_format=out_fmt, spec=spec, modules=changes, choice=choice.facts,
        file_bytes_before=ad.file_bytes, file_bytes_after=size, warnings=truncation_warnings(ad, spec, dropped, changes),
        notes=notes + written, readme_copied=bool(layout.copied_files(ad, out_fmt)), max_check_error=max_err,
    )
