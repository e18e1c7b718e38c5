"""The rules of ``check`` on one adapter: sizes, energy, integrity, serving profiles, base match."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..adapter import Adapter
from ..integrity import bit_view, nonfinite_and_zero
from ..naming import names_line, natural_sorted
from ..ties import extreme_module
from ..units import fmt_bytes, plural, verb
from .policy import Policy
from .result import Result
from .serving import extra_module, largest, profile_results

if TYPE_CHECKING:  # pragma: no cover
    from ..analysis import RankReport
    from ..basemodels import BaseModel

__all__ = ["ValueScan", "scan_values", "nonfinite_tensors", "base_results", "evaluate", "unreadable_results"]

@dataclass
class ValueScan:
    """What the integrity rule needs from tensor data: keys of floating-point tensors holding NaN or
    ±inf (None when not scanned), and modules whose B factor is all zero — a LoRA's B starts at zero
    (Hu et al. 2021, §4.1), so an all-zero B is an adapter saved before any training step."""

    nonfinite: list[str] | None
    zero_b: list[str]


def scan_values(adapter: Adapter, report: "RankReport | None" = None, *, finite: bool = True) -> ValueScan:
    """One pass over the tensor data (each tensor read at most once).

    With a ``report`` from ``analysis.analyse``, what it already established is not read again: its
    ``zero_b`` modules, and the factors it found finite. Flagged (non-finite) modules are read again
    to name the bad tensor exactly."""
    done: set[str] = set()
    zero_b: list[str] = []
    b_keys = zero_keys(adapter)
    if report is not None:
        done = {k for r in report.modules if "non_finite" not in r.flags for k in (r.module.a_key, r.module.b_key)}
        zero_b = list(report.summary.zero_b)
    bad: list[str] = []
    for key in adapter.source.keys():  # noqa: SIM118 (a tensor source, not a dict)
        if key in done or (not finite and key not in b_keys):
            continue
        nonfinite, zero = _values(adapter, key)
        if finite and nonfinite:
            bad.append(key)
        if key in b_keys and report is None and zero and b_keys[key] not in zero_b:
            zero_b.append(b_keys[key])
    return ValueScan(natural_sorted(bad) if finite else None, natural_sorted(zero_b))


def _values(adapter: Adapter, key: str) -> tuple[bool, bool]:
    """(holds NaN/±inf, is all zero) for one non-empty tensor: on the raw bits of the memory map for float
    tensors in a safetensors file, else through the tensor source (numpy arrays)."""
    view = bit_view(adapter.source, key)
    if view is not None:
        return nonfinite_and_zero(view)
    from ..spectrum import all_finite

    t = adapter.source.get(key)
    if not t.size:
        return False, False
    return t.dtype.kind == "f" and not all_finite(t), not bool(t.any())


def zero_keys(adapter: Adapter) -> dict[str, str]:
    """Tensor key → module, for the tensors that make a module's update zero when they are all zero: B of a
    LoRA pair (A starts random, B at zero: Hu et al. 2021, §4.1), and every factor of a product update (LoHa
    (W₁a W₁b) ⊙ (W₂a W₂b), LoKr W₁ ⊗ W₂, a Tucker LoCon, a full ΔW): PEFT's LoHa starts with hada_w2_b = 0."""
    from ..adapter import LowRankUpdate

    out = {}
    for m in adapter.modules:
        keys = [m.b_key] if isinstance(m.update, LowRankUpdate) else list(m.update.keys)
        out.update({k: m.name for k in keys})
    return out


def nonfinite_tensors(adapter: Adapter, report: "RankReport | None" = None) -> list[str]:
    """Keys of floating-point tensors holding NaN or ±inf (reads tensor data; see :func:`scan_values`)."""
    return scan_values(adapter, report).nonfinite or []


def _size_rules(ad: Adapter, p: Policy) -> list[Result]:
    out = []
    if p.max_rank is not None:
        worst = largest(ad.modules, lambda m: m.rank)
        r = worst.rank if worst else 0
        out.append(Result("max-rank", r <= p.max_rank, r, p.max_rank,
                          "" if r <= p.max_rank else f"rank {r} > {p.max_rank} ({worst.name})"))
    if p.max_params is not None:
        ok = ad.params <= p.max_params
        out.append(Result("max-params", ok, ad.params, p.max_params,
                          "" if ok else f"{ad.params:,} LoRA params > {p.max_params:,}"))
    if p.max_extra_params is not None:
        ok = ad.extra_params <= p.max_extra_params
        biggest = largest(ad.extras, lambda k: ad.source.info(k).numel)
        out.append(Result("max-extra-params", ok, ad.extra_params, p.max_extra_params,
                          "" if ok else f"{ad.extra_params:,} full-tensor params > {p.max_extra_params:,} (largest: {biggest})"))
    if p.max_size is not None:
        size = ad.file_bytes
        ok = size <= p.max_size
        out.append(Result("max-size", ok, size, p.max_size,
                          "" if ok else f"{ad.weights_path.name} is {size:,} B ({fmt_bytes(size)}) > {p.max_size:,} B"))
    return out


def _energy_rule(report: "RankReport", tau: float, k: int) -> Result:
    from ..analysis import unit_spectrum  # the spectra: only when one is asked for
    from ..spectrum import retained_energy

    unknown, kept = [], []
    for r in report.modules:
        if r.singular_values is None:
            unknown.append(r.name)
            continue
        kept.append((retained_energy(unit_spectrum(r.singular_values), min(k, len(r.singular_values))), r.name))
    worst_value, worst_name = extreme_module(kept, largest=False)  # ties: lowest layer, then name
    worst = 2.0 if worst_value is None else worst_value
    limit = f"{tau:g}@{k}"
    if unknown:
        return Result("min-energy", False, None, limit,
                      f"{plural(len(unknown), 'module')} {verb(len(unknown), 'has')} non-finite factors (e.g. {unknown[0]})")
    if worst_name is None:
        return Result("min-energy", True, 1.0, limit)
    ok = worst >= tau
    return Result("min-energy", ok, round(worst, 6), limit,
                  "" if ok else f"{worst_name} keeps {worst:.4f} of its energy at rank {k} < {tau:g}")


def base_results(ad: Adapter, base: "BaseModel") -> list[Result]:
    """Every module's name must be one of the base's modules and its ΔW shape must equal that module's."""
    known = base.modules
    missing, wrong = [], []
    for m in ad.modules:
        ms = known.get(m.name)
        if ms is None:
            missing.append(m.name)
        elif (ms.out, ms.inp) != tuple(m.shape):
            wrong.append(f"{m.name} {m.shape[0]}×{m.shape[1]} vs base {ms.out}×{ms.inp}")
    for k in ad.extras:
        ms = known.get(extra_module(k))
        shape = ad.source.info(k).shape
        if ms is not None and len(shape) == 2 and tuple(shape) != (ms.out, ms.inp):
            wrong.append(f"{k} {shape[0]}×{shape[1]} vs base {ms.out}×{ms.inp} (vocabulary resized differently?)")
    msg = ""
    if missing:
        first = missing[0]
        hint = ""
        for bn in known:
            if first.endswith("." + bn):
                hint = f": extra prefix {first[: len(first) - len(bn)]!r} — PEFT would load it as a silent no-op"
                break
            if bn.endswith("." + first):
                hint = f": missing prefix {bn[: len(bn) - len(first)]!r} — PEFT would load it as a silent no-op"
                break
        msg = (f"{len(missing):,} of {plural(len(ad.modules), 'module')} {verb(len(missing), 'matches')} no module of "
               f"{base.name}, e.g. {first!r}{hint}")
    return [
        Result("base: names", not missing, len(missing), 0, msg),
        Result("base: shapes", not wrong, len(wrong), 0, "" if not wrong else f"{plural(len(wrong), 'shape mismatch')}, e.g. {wrong[0]}"),
    ]


def _integrity_rules(values: ValueScan, finite: bool) -> list[Result]:
    out = []
    bad = values.nonfinite
    if finite and bad is not None:
        out.append(Result("finite", not bad, len(bad), 0,
                          "" if not bad else f"{plural(len(bad), 'tensor')} {verb(len(bad), 'holds')} NaN/inf: {names_line(bad)}"))
    zb = values.zero_b
    out.append(Result("trained", not zb, len(zb), 0, "" if not zb else (
        f"{plural(len(zb), 'module')} {verb(len(zb), 'has')} an all-zero B factor (LoHa/LoKr: any factor), so "
        f"{'it changes' if len(zb) == 1 else 'they change'} nothing (saved "
        f"before training?): "
        f"{names_line(zb)}")))
    return out


def evaluate(
    ad: Adapter,
    policy: Policy,
    *,
    base: "BaseModel | None" = None,
    report: "RankReport | None" = None,
    values: ValueScan | None = None,
) -> list[Result]:
    """All rule rows for one adapter. The rules that read tensor data use ``report`` (the spectra,
    for min-energy) and ``values`` (:func:`scan_values`, for the integrity rule) when given, and
    compute them when not (pass them to reuse one read across calls)."""
    out = _size_rules(ad, policy)
    if policy.min_energy is not None:
        if report is None:
            from ..analysis import analyse

            report = analyse(ad)
        out.append(_energy_rule(report, *policy.min_energy))
    if policy.allow_dora is not None:
        ok = policy.allow_dora or not ad.use_dora
        out.append(Result("dora", ok, "DoRA" if ad.use_dora else "LoRA", "allowed" if policy.allow_dora else "denied",
                          "" if ok else "DoRA adapters are denied (--deny-dora)"))
    if policy.integrity:
        if values is None:
            values = scan_values(ad, report)
        out.extend(_integrity_rules(values, policy.require_finite))
    for name, rank in policy.serving:
        out.extend(profile_results(name, rank, ad, base))
    if base is not None:
        out.extend(base_results(ad, base))
    return out


def unreadable_results(message: str) -> list[Result]:
    """An adapter whose factors are unpaired cannot be loaded by any server (llama.cpp's converter exits)."""
    return [Result("paired factors", False, "unpaired", "every A has its B", message)]
