"""Rewriting adapters: ``truncate`` (best rank-k approximations) and ``rescale`` (strength).

No CLI here: :func:`truncate` and :func:`rescale` take a loaded :class:`~lora_inspect.adapter.Adapter`,
write a new adapter in the same layout through :mod:`lora_inspect.formats.write`, re-read it with
``load_adapter`` and check its spectrum, and return plain data for the views.

Truncation (Eckart–Young–Mirsky: the best rank-k approximation in Frobenius and spectral norm keeps
the k largest singular triplets). For ΔW = s·B@A, Householder QR B = Q_b R_b, Aᵀ = Q_a R_a, SVD of the
r×r core s·R_b R_aᵀ = U S Vᵀ (``../shared/docs/formats.md``, "Writing a PEFT adapter"):
B′ = Q_b U_k √S_k (out, k), A′ = √S_k V_kᵀ Q_aᵀ (k, in), so B′@A′ is the truncated ΔW with the scale
baked in (the new α makes s′ = 1). Q_b and Q_a are never formed: ``torch.ormqr`` applies the
Householder reflectors of ``torch.geqrf`` to the small (·, k) blocks. 16-bit data is decomposed in
float32 (it carries 8–11 significant bits), everything else in float64; the core is always float64.

Per-module ranks:
- ``rank``: min(K, r);
- ``energy``: the energy rank at τ — smallest k with Σ_{i≤k} σᵢ² ≥ τ·Σ σᵢ² (``spectrum.energy_rank``);
- a budget (parameters or bytes): a knapsack — keep the set of singular directions with the most
  retained energy Σσᵢ² whose cost Σ k_m·(out_m + in_m) fits. Solved greedily by σᵢ²/(out+in) (each
  module's ratios are non-increasing in i, so the greedy picks are prefixes, i.e. ranks). Greedy is
  optimal for the fractional relaxation (Dantzig 1957) and only approximately for the 0/1 problem;
  we therefore also evaluate the best single rank that fits and keep whichever retains more energy,
  so the result is never worse than a uniform rank of equal or smaller size.
- ``uniform``: one stored rank for all modules; modules whose own r is smaller are zero-padded.

Rescale: PEFT's s = α/r (α/√r with rsLoRA), kohya's α/r and mlx-lm's absolute scale are all linear in
α, so multiplying every α (``lora_alpha`` and each ``alpha_pattern`` entry, or every ``.alpha``
tensor, or ``lora_parameters.scale``) by F multiplies every ΔW by F; ``bake`` multiplies B instead.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .adapter import ORIENT_EMBEDDING, ORIENT_MLX, Adapter, Module, module_type
from .errors import InspectError
from .formats import load_adapter
from .formats.tensors import DTYPE_SIZES, ST_TO_TORCH
from .formats.write import AtomicOutput, check_output_path, write_adapter
from .analysis import compute_spectra
from .spectrum import (
    Decomposition,
    compute_dtype,
    decompose,
    energy_rank,
    parallel_map,
    relative_error,
    retained_energy,
    single_threaded_torch,
)

__all__ = [
    "TruncateSpec",
    "ModuleChange",
    "TruncateResult",
    "RescaleResult",
    "greedy_budget_ranks",
    "choose_ranks",
    "truncate",
    "rescale",
    "SCALE_RANGE",
]

SCALE_RANGE = (0.5, 2.0)  # the usual α/r (α/√r for rsLoRA) range; outside it a warning is given


# ----------------------------------------------------------------------------- maths


def greedy_budget_ranks(spectra: list[np.ndarray], costs: list[int], caps: list[int], budget: float) -> list[int]:
    """Per-module ranks maximising retained Σσ² with Σ k·cost ≤ budget (greedy on σ²/cost; see module doc)."""
    items = []
    for m, (sv, c) in enumerate(zip(spectra, costs)):
        e = np.asarray(sv, dtype=np.float64)[: caps[m]] ** 2
        for i, ei in enumerate(e):
            if ei > 0:
                items.append((-ei / c, m, i))
    items.sort()
    ks = [0] * len(spectra)
    left = budget
    for _, m, i in items:
        if i == ks[m] and costs[m] <= left:  # prefixes only; a skipped item blocks the rest of its module
            ks[m] += 1
            left -= costs[m]
    return ks


def _kept_energy(spectra: list[np.ndarray], ks: list[int]) -> float:
    return float(sum((np.asarray(sv[:k], dtype=np.float64) ** 2).sum() for sv, k in zip(spectra, ks)))


@dataclass
class TruncateSpec:
    rank: int | None = None
    energy: float | None = None
    max_params: int | None = None
    max_bytes: int | None = None
    uniform: bool = False

    def validate(self) -> None:
        given = [n for n, v in (("--rank", self.rank), ("--energy", self.energy), ("--max-params", self.max_params),
                                ("--max-size", self.max_bytes)) if v is not None]
        if len(given) != 1:
            raise InspectError(
                "give exactly one of --rank, --energy, --max-params, --max-size"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.rank is not None and self.rank < 1:
            raise InspectError(f"--rank must be ≥ 1, got {self.rank}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise InspectError(f"--energy must be in (0, 1], got {self.energy}")
        if self.max_params is not None and self.max_params < 1:
            raise InspectError(f"--max-params must be ≥ 1, got {self.max_params}")
        if self.uniform and self.rank is not None:
            raise InspectError("--uniform goes with --energy or a budget (--rank already gives one rank)")

    @property
    def mode(self) -> str:
        if self.rank is not None:
            return "rank"
        if self.energy is not None:
            return "energy"
        return "max_params" if self.max_params is not None else "max_size"


def choose_ranks(
    modules: list[Module],
    spectra: list[np.ndarray],
    spec: TruncateSpec,
    *,
    fixed_bytes: int = 0,
    force_uniform: bool = False,
) -> tuple[list[int], list[int], dict]:
    """(kept directions per module, stored rank per module, facts about the choice)."""
    caps = [m.rank for m in modules]
    costs = [m.shape[0] + m.shape[1] for m in modules]
    uniform = spec.uniform or force_uniform
    info: dict = {}
    if spec.rank is not None:
        keep = [min(spec.rank, c) for c in caps]
        if force_uniform:
            return keep, [spec.rank if max(caps) >= spec.rank else max(caps)] * len(modules), info
        return keep, keep, info
    if spec.energy is not None:
        keep = [min(energy_rank(sv, spec.energy), c) for sv, c in zip(spectra, caps)]
        if uniform:
            k = max(keep + [0])
            if k == 0:
                raise InspectError("every module is all zero: nothing to keep")
            return [min(k, c) for c in caps], [k] * len(modules), info
        return keep, keep, info
    # budgets
    if spec.max_params is not None:
        unit = [1] * len(modules)
        budget = float(spec.max_params)
        info["budget"] = {"params": spec.max_params}
    else:
        unit = [DTYPE_SIZES.get(m.dtype, 4) for m in modules]
        budget = float(spec.max_bytes - fixed_bytes)
        info["budget"] = {"bytes": spec.max_bytes, "fixed_bytes": fixed_bytes, "for_factors": int(budget)}
        if budget <= 0:
            raise InspectError(
                f"--max-size {spec.max_bytes} bytes is smaller than what every output keeps regardless of rank "
                f"({fixed_bytes} bytes: full tensors, DoRA magnitudes, biases, alphas and the header)"
            )
    cost = [c * u for c, u in zip(costs, unit)]
    per_rank = sum(cost)
    if uniform:
        k = int(budget // per_rank) if per_rank else 0
        k = min(k, max(caps))
        if k < 1:
            raise InspectError(f"the budget does not fit rank 1 in every module (needs {per_rank} {'params' if spec.max_params else 'bytes'})")
        return [min(k, c) for c in caps], [k] * len(modules), info
    greedy = greedy_budget_ranks(spectra, cost, caps, budget)
    # the best single rank that fits (no padding: each module min(k, r))
    best_k, best_uni = 0, [0] * len(modules)
    for k in range(1, max(caps) + 1):
        ks = [min(k, c) for c in caps]
        if sum(kk * cc for kk, cc in zip(ks, cost)) <= budget:
            best_k, best_uni = k, ks
    e_greedy, e_uni = _kept_energy(spectra, greedy), _kept_energy(spectra, best_uni)
    info["greedy_energy"] = e_greedy
    info["uniform_rank_in_budget"] = best_k
    info["uniform_energy"] = e_uni
    keep = greedy if e_greedy >= e_uni else best_uni
    info["chosen"] = "greedy" if e_greedy >= e_uni else "uniform"
    if sum(keep) == 0:
        raise InspectError("the budget is too small to keep a single direction of any module")
    return keep, keep, info


# ----------------------------------------------------------------------------- results


@dataclass
class ModuleChange:
    name: str
    type: str
    kind: str
    shape: tuple[int, int]
    rank_before: int
    rank_after: int  # directions kept
    stored_rank: int  # rank stored (≥ rank_after when padded to a uniform rank)
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    retained_energy: float
    relative_error: float
    singular_values: list[float] = field(repr=False, default_factory=list)


@dataclass
class TruncateResult:
    adapter: Adapter
    output: Path
    output_format: str
    spec: TruncateSpec
    modules: list[ModuleChange]
    choice: dict
    file_bytes_before: int
    file_bytes_after: int
    warnings: list[str]
    notes: list[str]
    readme_copied: bool
    max_check_error: float

    @property
    def ranks(self) -> dict[str, int]:
        return {m.name: m.stored_rank for m in self.modules}


@dataclass
class RescaleResult:
    adapter: Adapter
    output: Path
    factor: float
    method: str  # "config" | "bake"
    alpha_before: float | None
    alpha_after: float | None
    modules: list[dict]
    warnings: list[str]
    notes: list[str]
    readme_copied: bool
    max_check_error: float


# ----------------------------------------------------------------------------- helpers


def _check_finite(ad: Adapter, name: str, *ts: torch.Tensor) -> None:
    for t in ts:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InspectError(f"{ad.path}: module {name!r} holds NaN/inf values: refusing to rewrite a corrupt adapter")


def _torch_dtype(st: str) -> torch.dtype:
    if st not in ST_TO_TORCH:
        raise InspectError(f"tensor dtype {st} cannot be rewritten")
    return ST_TO_TORCH[st]


def _to_stored(m: Module, b_lin: torch.Tensor, a_lin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear-orientation factors → (A_stored, B_stored) with the module's layout and ``dtype``."""
    k = b_lin.shape[1]
    if m.orient == ORIENT_EMBEDDING:  # A_stored (k, vocab) = B_linᵀ, B_stored (dim, k) = A_linᵀ
        a_st, b_st = b_lin.T, a_lin.T
    elif m.orient == ORIENT_MLX:  # lora_a (in, k) = A_linᵀ, lora_b (k, out) = B_linᵀ
        a_st, b_st = a_lin.T, b_lin.T
    else:
        a_shape = m.source.info(m.a_key).shape
        b_shape = m.source.info(m.b_key).shape
        a_st = a_lin.reshape((k,) + tuple(a_shape[1:]))
        b_st = b_lin.reshape((b_shape[0], k) + tuple(b_shape[2:]))
    return a_st.to(dtype).contiguous(), b_st.to(dtype).contiguous()


def _readme(ad: Adapter) -> list[Path]:
    if ad.format == "peft" and ad.path.is_dir() and (ad.path / "README.md").is_file():
        return [ad.path / "README.md"]
    return []


def _output_format(ad: Adapter, out: Path) -> str:
    """The layout written: the input's, except that a bare PEFT file whose config lives beside it
    becomes a PEFT directory (the config must travel with the new ranks)."""
    if ad.format in ("peft-safetensors", "peft-bin") and ad.config_path is not None:
        if out.suffix in (".safetensors", ".bin"):
            raise InspectError(
                f"{ad.path}: its config lives in {ad.config_path}; OUT must be a directory (no .safetensors suffix) "
                "so that the rewritten config travels with it"
            )
        return "peft"
    return ad.format


def _dtype_u(st: str) -> float:
    """Unit roundoff of a stored dtype (2^-p, p = mantissa bits + 1)."""
    return {"BF16": 2.0**-8, "F16": 2.0**-11, "F32": 2.0**-24, "F64": 2.0**-53}.get(st, 2.0**-24)


def _sv_tolerance(sv: np.ndarray, keep: int, st_dtype: str) -> float:
    """Bound on |σᵢ(stored) − σᵢ(intended)| from Weyl's inequality: rounding B′, A′ to unit roundoff u
    perturbs B′A′ by ≤ 2u‖B′‖_F‖A′‖_F = 2u·Σ_{i≤k} σᵢ (each factor carries √σᵢ); the re-read spectrum
    is itself computed in float32 for 16-bit data. Slack factor 8."""
    s = float(np.sum(sv[:keep])) if keep else 0.0
    u = max(_dtype_u(st_dtype), 2.0**-24 if st_dtype in ("BF16", "F16", "F32") else 2.0**-52)
    top = float(sv[0]) if len(sv) else 0.0
    return 8 * (2 * u * s + u * top * math.sqrt(max(len(sv), 1))) + 1e-300


def _verify(
    out_tmp: Path,
    expected: dict[str, tuple[np.ndarray, int, str]],
    dropped: set[str],
    extras: list[str],
    fmt: str,
) -> float:
    """Re-read the written adapter and check each module's spectrum; raise InspectError on any mismatch.

    ``expected``: {name: (singular values intended, stored rank, stored dtype)}. Returns the largest
    |σ′ − σ| relative to that module's tolerance."""
    try:
        new = load_adapter(out_tmp)
    except InspectError as e:
        raise InspectError(f"self-check failed: the written adapter does not load ({e})") from e
    names = {m.name for m in new.modules}
    if names != set(expected):
        missing = sorted(set(expected) - names)[:3]
        extra = sorted(names - set(expected))[:3]
        raise InspectError(f"self-check failed: modules differ after writing (missing {missing}, unexpected {extra})")
    if set(new.extras) != set(extras):
        raise InspectError("self-check failed: the full tensors (modules_to_save …) were not carried over intact")
    if dropped & names:
        raise InspectError(f"self-check failed: dropped modules still present: {sorted(dropped & names)[:3]}")
    worst = 0.0
    for m in new.modules:
        if m.rank != expected[m.name][1]:
            raise InspectError(f"self-check failed: {m.name} stored rank {m.rank}, intended {expected[m.name][1]}")
    spectra = compute_spectra(new.modules)  # the same QR route `rank` uses, in worker threads
    for m in new.modules:
        want, rank, st = expected[m.name]
        got, _ = spectra[m.name]
        if got is None:
            raise InspectError(f"self-check failed: {m.name} holds NaN/inf after writing")
        n = max(len(got), len(want))
        g = np.zeros(n)
        w = np.zeros(n)
        g[: len(got)] = got
        w[: len(want)] = want
        tol = _sv_tolerance(w, int((w > 0).sum()), st)
        err = float(np.abs(g - w).max()) if n else 0.0
        if not err <= tol:
            raise InspectError(
                f"self-check failed: {m.name} spectrum after writing differs from the intended one by {err:.3g} "
                f"(tolerance {tol:.3g}); nothing was written"
            )
        worst = max(worst, err / tol if tol > 0 else 0.0)
    return worst


def _extras_tensors(ad: Adapter) -> dict[str, torch.Tensor]:
    out = {}
    for k in ad.extras:
        t = ad.source.get(k)
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InspectError(f"{ad.path}: full tensor {k!r} holds NaN/inf values: refusing to rewrite a corrupt adapter")
        out[k] = t
    return out


# ----------------------------------------------------------------------------- configs


def _name_in_config(ad: Adapter, m: Module) -> str:
    """The module name the config's patterns are matched against (diffusers: without the component)."""
    if ad.format == "diffusers":
        return m.name.partition(".")[2]
    return m.name


def _truncated_config(cfg: dict, ranks: dict[str, int], dropped: list[str]) -> dict:
    """PEFT config for baked-in scales: α = k per module (s = 1), rsLoRA off, per-module ranks in
    ``rank_pattern``/``alpha_pattern`` under *full* module names; dropped modules in ``exclude_modules``."""
    new = copy.deepcopy(cfg)
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))
    new["r"] = int(r)
    new["lora_alpha"] = int(r)
    new["use_rslora"] = False
    new["rank_pattern"] = {n: int(k) for n, k in sorted(ranks.items()) if k != r}
    new["alpha_pattern"] = {n: int(k) for n, k in sorted(ranks.items()) if k != r}
    if dropped:
        old = new.get("exclude_modules")
        if isinstance(old, str) and old:
            new["exclude_modules"] = f"(?:{old})|" + "|".join(re.escape(n) for n in sorted(dropped))
        else:
            new["exclude_modules"] = sorted(set(old or []) | set(dropped))
    return new


def _config_in_metadata(ad: Adapter) -> dict | None:
    raw = ad.metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    cfg = json.loads(raw)
    if any(k.split(".", 1)[0] in ("unet", "text_encoder", "text_encoder_2", "transformer") and "." in k for k in cfg):
        raise InspectError(
            f"{ad.path}: per-component configs in lora_adapter_metadata are not supported for rewriting "
            "(use --bake for rescale)"
        )
    return cfg


# ----------------------------------------------------------------------------- truncate


def truncate(
    ad: Adapter,
    out: Path,
    spec: TruncateSpec,
    *,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> TruncateResult:
    """Write the truncated adapter to ``out`` (atomically, self-checked) and return what was done."""
    spec.validate()
    warn = warn or (lambda s: None)
    out = Path(out)
    check_output_path(ad.path, ad.weights_path, out, force)
    if ad.peft_type == "ADALORA":
        raise InspectError(f"{ad.path}: AdaLoRA adapters cannot be truncated (convert to LoRA first)")
    out_fmt = _output_format(ad, out)
    warnings: list[str] = []
    notes: list[str] = []
    if ad.use_dora:
        warnings.append(
            "DoRA: magnitudes copied unchanged; truncating the low-rank part is not the optimal approximation of "
            "DoRA's full-rank change (rows are renormalised to m)"
        )
    force_uniform = ad.format == "mlx"
    if force_uniform and not spec.uniform and spec.rank is None:
        notes.append("mlx-lm needs one rank for all modules: ranks padded to a uniform rank")

    modules = ad.modules
    fixed_rank = spec.rank is not None
    decomps: dict[str, Decomposition] = {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    spectra: list[np.ndarray] = []
    def work(m: Module):
        b, a = m.factors(compute_dtype(m.dtype))
        try:
            d = decompose(b, a, m.scale)
        except ValueError:
            _check_finite(ad, m.name, b, a)
            raise
        del b, a
        sv = np.zeros(m.rank)
        sv[: d.s.shape[0]] = d.s.numpy()
        if fixed_rank and not force_uniform:  # stream: no need to keep the decomposition
            return sv, None, _to_stored(m, *d.factors(min(spec.rank, m.rank)), _torch_dtype(m.dtype))
        return sv, d, None

    for m, (sv, d, f) in zip(modules, parallel_map(work, modules, progress=progress)):
        spectra.append(sv)
        if d is None:
            factors[m.name] = f
        else:
            decomps[m.name] = d
    with single_threaded_torch():
        extras = _extras_tensors(ad)
        fixed_bytes = sum(t.numel() * t.element_size() for t in extras.values())
        for m in modules:
            fixed_bytes += sum(m.source.info(k).nbytes for k in (m.magnitude_key, m.bias_key, m.alpha_key) if k)
        fixed_bytes += _header_reserve(ad)
        keep, stored, choice = choose_ranks(modules, spectra, spec, fixed_bytes=fixed_bytes, force_uniform=force_uniform)
        for m, k, st in zip(modules, keep, stored):
            if m.name not in factors and st > 0:
                factors[m.name] = _to_stored(m, *decomps.pop(m.name).factors(k, st), _torch_dtype(m.dtype))
        decomps.clear()

    # assemble tensors in the input's key order
    tensors: dict[str, torch.Tensor] = {}
    changes: list[ModuleChange] = []
    dropped: list[str] = []
    expected: dict[str, tuple[np.ndarray, int, str]] = {}
    new_ranks: dict[str, int] = {}
    for m, sv, k, st in zip(modules, spectra, keep, stored):
        fixed = {key: m.source.get(key) for key in (m.magnitude_key, m.bias_key) if key}
        if st == 0:
            dropped.append(m.name)
        else:
            a_st, b_st = factors.pop(m.name)
            tensors[m.a_key] = a_st
            tensors[m.b_key] = b_st
            if m.magnitude_key:
                tensors[m.magnitude_key] = fixed[m.magnitude_key]
            if m.bias_key:  # merge adds s·bias: bake s in as for B
                bias = fixed[m.bias_key]
                _check_finite(ad, m.name, bias)
                tensors[m.bias_key] = (bias.to(torch.float64) * m.scale).to(bias.dtype)
            if m.alpha_key:  # kohya / diffusers: α = stored rank → s = 1
                at = m.source.get(m.alpha_key)
                tensors[m.alpha_key] = torch.full_like(at, float(st))
            kept_sv = np.zeros(st)
            kept_sv[: min(k, len(sv))] = sv[: min(k, len(sv))]
            expected[m.name] = (kept_sv, st, m.dtype)
            new_ranks[m.name] = st
        size = DTYPE_SIZES.get(m.dtype, 4)
        fixed_b = sum(m.source.info(key).nbytes for key in (m.magnitude_key, m.bias_key, m.alpha_key) if key)
        changes.append(ModuleChange(
            name=m.name, type=module_type(m.name), kind=m.kind, shape=m.shape, rank_before=m.rank, rank_after=k,
            stored_rank=st, params_before=m.params, params_after=st * (m.shape[0] + m.shape[1]),
            bytes_before=m.nbytes, bytes_after=(st * (m.shape[0] + m.shape[1]) * size + fixed_b) if st else 0,
            retained_energy=retained_energy(sv, k), relative_error=relative_error(sv, k),
            singular_values=[float(x) for x in sv],
        ))
    if not new_ranks:
        raise InspectError("every module would be dropped (rank 0): nothing would be left of the adapter")
    if dropped:
        warnings.append(f"{len(dropped)} modules keep rank 0 and are dropped: {', '.join(dropped[:3])}"
                        + (" …" if len(dropped) > 3 else ""))
    tensors.update(extras)
    metadata = dict(ad.metadata)
    config = None
    if out_fmt == "peft":
        if ad.config is None:
            raise InspectError(f"{ad.path}: PEFT directory without a config")
        config = _truncated_config(ad.config, new_ranks, dropped)
    elif out_fmt == "mlx":
        config = copy.deepcopy(ad.config) if ad.config is not None else {"fine_tune_type": "lora"}
        lp = dict(config.get("lora_parameters") or {})
        lp["rank"] = int(max(new_ranks.values()))
        lp["scale"] = 1.0  # mlx-lm's scale is absolute: the old one is baked into the factors
        config["lora_parameters"] = lp
    elif out_fmt in ("peft-safetensors", "peft-bin", "diffusers"):
        meta_cfg = _config_in_metadata(ad)
        if meta_cfg is not None:
            names = {_name_in_config(ad, m): new_ranks[m.name] for m in modules if m.name in new_ranks}
            gone = [_name_in_config(ad, ad.module(n)) for n in dropped]
            metadata["lora_adapter_metadata"] = json.dumps(_truncated_config(meta_cfg, names, gone), sort_keys=True)
        elif out_fmt == "peft-safetensors" and any(k in metadata for k in ("lora_alpha", "alpha")):
            if len(set(new_ranks.values())) != 1:
                raise InspectError(f"{ad.path}: its alpha lives in the header as one number; per-module ranks need "
                                   "--uniform (or a PEFT directory)")
            for key in ("lora_alpha", "alpha"):
                if key in metadata:
                    metadata[key] = str(next(iter(new_ranks.values())))

    result_file, max_err = _write_checked(ad, out, out_fmt, tensors, metadata, config, expected, set(dropped), force)
    return TruncateResult(
        adapter=ad, output=out, output_format=out_fmt, spec=spec, modules=changes, choice=choice,
        file_bytes_before=ad.file_bytes, file_bytes_after=result_file, warnings=warnings, notes=notes,
        readme_copied=bool(_readme(ad)) and out_fmt == "peft", max_check_error=max_err,
    )


def _header_reserve(ad: Adapter) -> int:
    """Bytes the output's container (header) can take: the input header is an upper bound for the same
    keys with smaller shapes and offsets (rank digits never grow), plus the config, if any."""
    if ad.weights_path.suffix == ".safetensors":
        with open(ad.weights_path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
        return 8 + n + 8
    return 4096  # a .bin's pickle overhead, roughly


def _write_checked(ad, out, out_fmt, tensors, metadata, config, expected, dropped, force) -> tuple[int, float]:
    if out_fmt in ("peft", "mlx"):
        suffix = ""
    else:
        suffix = ad.weights_path.suffix
    copy_files = _readme(ad) if out_fmt == "peft" else []
    with AtomicOutput(out, suffix=suffix) as atomic:
        write_adapter(atomic.tmp, fmt=out_fmt, input_weights=ad.weights_path if ad.format == "peft" else
                      Path("adapter_model" + ad.weights_path.suffix), tensors=tensors, metadata=metadata or None,
                      config=config, copy_files=copy_files)
        with single_threaded_torch():
            max_err = _verify(atomic.tmp, expected, dropped, list(ad.extras), out_fmt)
        atomic.commit()
    if out.is_dir():
        w = next((p for p in (out / "adapter_model.safetensors", out / "adapter_model.bin", out / "adapters.safetensors")
                  if p.is_file()), None)
        size = w.stat().st_size if w else 0
    else:
        size = out.stat().st_size
    return size, max_err


# ----------------------------------------------------------------------------- rescale


def rescale(
    ad: Adapter,
    out: Path,
    *,
    factor: float | None = None,
    alpha: float | None = None,
    bake: bool = False,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
) -> RescaleResult:
    """Write ``ad`` with every module's ΔW multiplied by F (from ``factor``, or ``alpha``/current α)."""
    from .analysis import compute_spectra

    if (factor is None) == (alpha is None):
        raise InspectError("give exactly one of --alpha and --factor")
    out = Path(out)
    check_output_path(ad.path, ad.weights_path, out, force)
    out_fmt = _output_format(ad, out)
    warnings: list[str] = []
    notes: list[str] = []
    meta_cfg = (_config_in_metadata(ad) if not bake and ad.format in ("peft-safetensors", "peft-bin", "diffusers")
                and ad.config_path is None else None)
    alpha_before = _global_alpha(ad, meta_cfg)
    if alpha is not None:
        if not math.isfinite(alpha) or alpha == 0:
            raise InspectError(f"--alpha must be a finite non-zero number, got {alpha}")
        if ad.format == "mlx":
            raise InspectError(f"{ad.path}: mlx-lm adapters have an absolute scale, not an alpha; use --factor")
        if alpha_before is None:
            raise InspectError(f"{ad.path}: no single alpha to set (per-module alphas differ or none is stored); use --factor")
        factor = alpha / alpha_before
    assert factor is not None
    if not math.isfinite(factor) or factor == 0:
        raise InspectError(f"--factor must be a finite non-zero number, got {factor}")
    if ad.use_dora:
        warnings.append("DoRA: alpha is not a pure strength knob (rows are renormalised to the magnitude m); "
                        "the low-rank part scales by F, the merged change does not")

    with single_threaded_torch():
        spectra = compute_spectra(ad.modules, progress=progress)
    for m in ad.modules:
        if spectra[m.name][0] is None:
            raise InspectError(f"{ad.path}: module {m.name!r} holds NaN/inf values: refusing to rewrite a corrupt adapter")
    tensors: dict[str, torch.Tensor] = {}
    metadata = dict(ad.metadata)
    config = copy.deepcopy(ad.config) if ad.config is not None else None
    method = "bake" if bake else "config"
    for m in ad.modules:
        for key in m.keys:
            tensors[key] = m.source.get(key)
        if bake:
            for key in (m.b_key, m.bias_key):
                if key:
                    t = tensors[key]
                    tensors[key] = (t.to(torch.float64) * factor).to(t.dtype)
    tensors.update(_extras_tensors(ad))
    alpha_after = None if alpha_before is None else alpha_before * (1 if bake else factor)
    if not bake:
        if ad.format == "mlx":
            config = copy.deepcopy(ad.config) if ad.config is not None else {"fine_tune_type": "lora"}
            lp = dict(config.get("lora_parameters") or {})
            lp["scale"] = float(ad.modules[0].scale * factor)
            config["lora_parameters"] = lp
        elif ad.format in ("kohya",) or (ad.format == "diffusers" and any(m.alpha_key for m in ad.modules)):
            for m in ad.modules:
                if m.alpha_key:
                    at = tensors[m.alpha_key]
                    tensors[m.alpha_key] = (at.to(torch.float64) * factor).to(at.dtype)
                else:  # α = r implied: store it explicitly, scaled
                    key = m.a_key.rsplit(".lora_down.weight", 1)[0] + ".alpha" if ".lora_down" in m.a_key else None
                    if key is None:
                        raise InspectError(f"module {m.name!r}: no .alpha tensor to scale; use --bake")
                    tensors[key] = torch.tensor(float(m.rank) * factor, dtype=_torch_dtype(m.dtype))
        elif config is not None and ad.format not in ("diffusers",):
            config = _rescaled_config(config, factor, ad)
        elif meta_cfg is not None:
            metadata["lora_adapter_metadata"] = json.dumps(_rescaled_config(meta_cfg, factor, ad), sort_keys=True)
        elif ad.format == "peft-safetensors" and any(k in metadata for k in ("lora_alpha", "alpha")):
            for key in ("lora_alpha", "alpha"):
                if key in metadata:
                    metadata[key] = repr(float(metadata[key]) * factor)
        else:
            raise InspectError(f"{ad.path}: no alpha is stored anywhere (α = r assumed), so there is none to scale; "
                               "use --bake to multiply B instead")
    if out_fmt == "peft" and config is None:
        raise InspectError(f"{ad.path}: PEFT directory without a config")

    docs = []
    expected = {}
    off = 0
    for m in ad.modules:
        sv = spectra[m.name][0]
        new_scale = m.scale * factor
        docs.append({"name": m.name, "type": module_type(m.name), "rank": m.rank, "alpha_before": m.alpha,
                     "alpha_after": m.alpha if bake else m.alpha * factor, "scale_before": m.scale,
                     "scale_after": new_scale, "sigma1_before": float(sv[0]) if len(sv) else 0.0,
                     "sigma1_after": float(sv[0]) * abs(factor) if len(sv) else 0.0})
        expected[m.name] = (np.asarray(sv) * abs(factor), m.rank, m.dtype)
        if ad.format != "mlx" and not SCALE_RANGE[0] <= abs(new_scale) <= SCALE_RANGE[1]:
            off += 1
    if off:
        kind = "α/√r" if ad.use_rslora else "α/r"
        warnings.append(f"{off} of {len(ad.modules)} modules now have {kind} outside the usual "
                        f"{SCALE_RANGE[0]:g}–{SCALE_RANGE[1]:g} range")
    _, max_err = _write_checked(ad, out, out_fmt, tensors, metadata, config, expected, set(), force)
    return RescaleResult(
        adapter=ad, output=out, factor=float(factor), method=method, alpha_before=alpha_before,
        alpha_after=alpha_after, modules=docs, warnings=warnings, notes=notes,
        readme_copied=bool(_readme(ad)) and out_fmt == "peft", max_check_error=max_err,
    )


def _global_alpha(ad: Adapter, meta_cfg: dict | None) -> float | None:
    if ad.config is not None and ad.format in ("peft", "peft-safetensors", "peft-bin"):
        a = ad.config.get("lora_alpha")
        return float(a) if isinstance(a, (int, float)) and not isinstance(a, bool) else None
    if meta_cfg is not None and "lora_alpha" in meta_cfg:
        return float(meta_cfg["lora_alpha"])
    if ad.format in ("kohya", "diffusers"):
        alphas = {m.alpha for m in ad.modules}
        return alphas.pop() if len(alphas) == 1 else None
    return ad.alpha


def _rescaled_config(cfg: dict, factor: float, ad: Adapter) -> dict:
    new = copy.deepcopy(cfg)
    if not isinstance(new.get("lora_alpha"), (int, float)) or isinstance(new.get("lora_alpha"), bool):
        raise InspectError(f"{ad.path}: the config has no numeric lora_alpha to scale; use --bake")
    new["lora_alpha"] = _num(new["lora_alpha"] * factor)
    if new.get("alpha_pattern"):
        new["alpha_pattern"] = {k: _num(v * factor) for k, v in new["alpha_pattern"].items()}
    return new


def _num(x: float):
    """Integers stay integers in the JSON when the product is whole (PEFT accepts floats too)."""
    return int(x) if float(x).is_integer() and abs(x) < 2**53 else float(x)


# ----------------------------------------------------------------------------- documents and views

TRUNCATE_SCHEMA = "lora-inspect/truncate/1"
RESCALE_SCHEMA = "lora-inspect/rescale/1"


def _group(changes: list[ModuleChange]) -> dict:
    e_total = sum(float(np.sum(np.square(c.singular_values))) for c in changes)
    e_kept = sum(float(np.sum(np.square(c.singular_values[: c.rank_after]))) for c in changes)
    e_lost = sum(float(np.sum(np.square(c.singular_values[c.rank_after:]))) for c in changes)
    worst = max(changes, key=lambda c: (c.relative_error, c.name)) if changes else None
    return {
        "modules": len(changes),
        "params_before": sum(c.params_before for c in changes),
        "params_after": sum(c.params_after for c in changes),
        "bytes_before": sum(c.bytes_before for c in changes),
        "bytes_after": sum(c.bytes_after for c in changes),
        "ranks_after": sorted({c.stored_rank for c in changes}),
        "retained_energy": 1.0 if not e_total > 0 else min(e_kept / e_total, 1.0),
        "relative_error": 0.0 if not e_total > 0 else math.sqrt(e_lost / e_total),
        "worst_module": None if worst is None else worst.name,
        "worst_relative_error": None if worst is None else worst.relative_error,
    }


def truncate_doc(res: TruncateResult, adapter_block: dict) -> dict:
    spec = res.spec
    by_type: dict[str, list[ModuleChange]] = defaultdict(list)
    for c in res.modules:
        by_type[c.type].append(c)
    worst = max(res.modules, key=lambda c: (c.relative_error, c.name))
    return {
        "schema": TRUNCATE_SCHEMA,
        "adapter": adapter_block,
        "output": {"path": str(res.output), "format": res.output_format, "file_bytes": res.file_bytes_after,
                   "readme_copied": res.readme_copied},
        "request": {"mode": spec.mode, "rank": spec.rank, "energy": spec.energy, "max_params": spec.max_params,
                    "max_bytes": spec.max_bytes, "uniform": spec.uniform},
        "choice": res.choice,
        "ranks": res.ranks,
        "modules": [
            {"name": c.name, "type": c.type, "kind": c.kind, "shape": list(c.shape), "rank_before": c.rank_before,
             "rank_after": c.rank_after, "stored_rank": c.stored_rank, "params_before": c.params_before,
             "params_after": c.params_after, "bytes_before": c.bytes_before, "bytes_after": c.bytes_after,
             "retained_energy": c.retained_energy, "relative_error": c.relative_error}
            for c in res.modules
        ],
        "by_type": {t: _group(v) for t, v in sorted(by_type.items())},
        "total": {**_group(res.modules), "file_bytes_before": res.file_bytes_before,
                  "file_bytes_after": res.file_bytes_after},
        "worst_module": {"name": worst.name, "retained_energy": worst.retained_energy,
                         "relative_error": worst.relative_error, "rank_after": worst.rank_after},
        "self_check": {"passed": True, "max_error_over_tolerance": res.max_check_error},
        "warnings": list(res.warnings),
        "notes": list(res.notes) + list(res.adapter.notes),
    }


def truncate_view(res: TruncateResult, adapter_block: dict, max_rows: int | None = 40):
    from .render import Table, View, fmt_bytes, fmt_count, fmt_float

    doc = truncate_doc(res, adapter_block)
    rows = []
    shown = res.modules if max_rows is None else res.modules[:max_rows]
    for c in shown:
        rows.append((c.name, "×".join(map(str, c.shape)), c.rank_before,
                     f"{c.rank_after}" + (f" (+{c.stored_rank - c.rank_after} pad)" if c.stored_rank > c.rank_after else ""),
                     fmt_count(c.params_after), f"{c.retained_energy:.4f}", fmt_float(c.relative_error)))
    title = f"{len(res.modules)} modules" + (f" (first {max_rows}; --all for every module)"
                                              if max_rows is not None and len(res.modules) > max_rows else "")
    tables = [Table(title, ["module", "shape", "r", "→ k", "params", "energy kept", "rel. error"], rows)]
    trows = []
    for t, g in list(doc["by_type"].items()) + [("total", doc["total"])]:
        trows.append((t, g["modules"], ",".join(map(str, g["ranks_after"])) or "0",
                      f"{fmt_count(g['params_before'])} → {fmt_count(g['params_after'])}",
                      f"{fmt_bytes(g['bytes_before'])} → {fmt_bytes(g['bytes_after'])}",
                      f"{g['retained_energy']:.4f}", fmt_float(g["relative_error"]),
                      f"{g['worst_module']} ({fmt_float(g['worst_relative_error'])})"))
    tables.append(Table("by module type", ["type", "modules", "k", "params", "bytes", "energy kept", "rel. error",
                                           "worst module (rel. error)"], trows))
    w = doc["worst_module"]
    ranks = Counter(res.ranks.values())
    header = [f"wrote {res.output} ({res.output_format}, {fmt_bytes(res.file_bytes_after)}; "
              f"was {fmt_bytes(res.file_bytes_before)})"]
    footer = ["ranks chosen: " + ", ".join(f"k={k} ×{n}" for k, n in sorted(ranks.items())),
              f"worst module: {w['name']} keeps {w['retained_energy']:.4f} of its energy "
              f"(relative error {fmt_float(w['relative_error'])})"]
    if "chosen" in res.choice:
        footer.append(f"budget: per-direction greedy gives {res.choice['greedy_energy']:.6g} Σσ², the best single rank "
                      f"that fits (k={res.choice['uniform_rank_in_budget']}) {res.choice['uniform_energy']:.6g}: "
                      f"kept the {res.choice['chosen']} choice")
    footer += [f"note: {n}" for n in doc["notes"]]
    footer.append("self-check passed: the written adapter re-reads with the intended spectrum")
    return View(doc, tables, header=header, footer=footer)


def rescale_doc(res: RescaleResult, adapter_block: dict) -> dict:
    return {
        "schema": RESCALE_SCHEMA,
        "adapter": adapter_block,
        "output": {"path": str(res.output), "readme_copied": res.readme_copied},
        "factor": res.factor,
        "method": res.method,
        "alpha_before": res.alpha_before,
        "alpha_after": res.alpha_after,
        "modules": res.modules,
        "self_check": {"passed": True, "max_error_over_tolerance": res.max_check_error},
        "warnings": list(res.warnings),
        "notes": list(res.notes) + list(res.adapter.notes),
    }


def rescale_view(res: RescaleResult, adapter_block: dict, max_rows: int | None = 40):
    from .render import Table, View, fmt_float

    doc = rescale_doc(res, adapter_block)
    shown = res.modules if max_rows is None else res.modules[:max_rows]
    rows = [(d["name"], d["rank"], f"{d['alpha_before']:g} → {d['alpha_after']:g}",
             f"{fmt_float(d['scale_before'], 4)} → {fmt_float(d['scale_after'], 4)}",
             f"{fmt_float(d['sigma1_before'], 4)} → {fmt_float(d['sigma1_after'], 4)}") for d in shown]
    title = f"{len(res.modules)} modules" + (f" (first {max_rows}; --all for every module)"
                                              if max_rows is not None and len(res.modules) > max_rows else "")
    how = "B multiplied (config unchanged)" if res.method == "bake" else "alphas scaled"
    header = [f"wrote {res.output}: every ΔW × {res.factor:g} ({how})"
              + (f"; lora_alpha {res.alpha_before:g} → {res.alpha_after:g}" if res.alpha_before is not None and res.method == "config" else "")]
    footer = [f"note: {n}" for n in doc["notes"]]
    footer.append("self-check passed: the written adapter re-reads with σ × |F| in every module")
    return View(doc, [Table(title, ["module", "r", "alpha", "scale", "σ₁"], rows)], header=header, footer=footer)
