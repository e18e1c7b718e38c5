"""``check``: the rules a CI gate enforces, and what each serving stack refuses (pure; no I/O).

A :class:`Policy` holds the limits (from ``[tool.lora-inspect.check]`` in pyproject.toml and the
command line); :func:`evaluate` turns one adapter into a list of :class:`Result` rows, each naming the
rule, the adapter's value and the limit. Only ``min-energy`` (spectra) and ``integrity`` (values: no
NaN/inf anywhere, no module with an all-zero B) need tensor data; the caller passes them in
(:func:`scan_values`, ``analysis.analyse``) only when those rules are on, so every other rule runs on
the file header alone.

Serving profiles encode ``docs/serving.md``:

- ``vllm[:R]`` — ``--max-lora-rank`` R from {1, 8, 16, 32, 64, 128, 256, 320, 512} (default 16): every
  module's rank ≤ R (vLLM takes the max over ``rank_pattern``); no DoRA; ``modules_to_save`` /
  full tensors only for ``classifier``/``score``; ``bias`` none and no ``lora_bias``; one global scale
  α/r (per-module alphas, or per-module ranks whose α/r differs, are mis-scaled).
- ``llamacpp[:R]`` — ``convert_lora_to_gguf``: no DoRA; no full embedding / lm_head tensors; one global α
  (per-tensor rank is fine); factors paired.
- ``lorax[:R]`` — target modules outside LoRAX's supported set for the architecture are ignored.
- ``sglang[:R]`` — prefixed module names (``language_model.``, a doubled ``base_model.``) rejected; α only
  in a safetensors header (no ``lora_alpha`` in adapter_config.json) is read as α = r.
- ``ollama[:R]`` — a PEFT directory with ``adapter_config.json`` + ``adapter_model.safetensors``; Llama,
  Mistral or Gemma family.
Where a profile takes ``:R``, R is a maximum rank (for vLLM, its ``--max-lora-rank``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from .adapter import Adapter, module_type
from .errors import InspectError
from .naming import names_line, natural_sorted
from .spectrum import retained_energy
from .units import fmt_bytes, parse_count, parse_size

if TYPE_CHECKING:  # pragma: no cover
    from .analysis import RankReport
    from .basemodels import BaseModel

__all__ = [
    "VLLM_RANKS", "PROFILES", "Policy", "Result", "parse_min_energy", "parse_serving",
    "policy_from_table", "evaluate", "nonfinite_tensors", "scan_values", "ValueScan", "base_results", "POLICY_KEYS",
    "unreadable_results",
]

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_RANK = 16
PROFILES = ("vllm", "llamacpp", "lorax", "sglang", "ollama")
VLLM_SAVE_OK = {"classifier", "score"}
EMBEDDING_TYPES = {"embed_tokens", "lm_head", "wte", "wpe", "tok_embeddings", "output", "embed_out", "word_embeddings"}
LORAX_TARGETS = {
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"},
    "gpt2": {"c_attn", "c_proj", "c_fc", "lm_head"},
}
OLLAMA_FAMILIES = ("llama", "mistral", "gemma")
PEFT_PREFIX = "base_model.model."
_SCALE_RTOL = 1e-6


@dataclass
class Result:
    rule: str
    ok: bool
    value: Any
    limit: Any
    message: str = ""


@dataclass
class Policy:
    """The limits to enforce; ``None`` means the rule is off."""

    max_rank: int | None = None
    max_params: int | None = None
    max_size: int | None = None
    max_extra_params: int | None = None
    min_energy: tuple[float, int] | None = None
    allow_dora: bool | None = None  # False: --deny-dora; True: --allow-dora (explicitly fine)
    require_finite: bool = True  # the "finite" row of the integrity rule (off: only "trained" runs)
    integrity: bool = True  # the integrity rule: no NaN/inf in any tensor, no module with an all-zero B
    serving: list[tuple[str, int | None]] = field(default_factory=list)
    base: str | None = None  # preset name or config.json path

    @property
    def needs_spectra(self) -> bool:
        return self.min_energy is not None

    @property
    def needs_values(self) -> bool:
        return self.integrity

    def describe(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["min_energy"] = None if self.min_energy is None else {"energy": self.min_energy[0], "rank": self.min_energy[1]}
        d["serving"] = [p if r is None else f"{p}:{r}" for p, r in self.serving]
        return d


# ---------------------------------------------------------------- parsing rule values
def parse_min_energy(text: str) -> tuple[float, int]:
    """``"0.9@16"`` → (0.9, 16): every module keeps ≥ 90% of Σσ² in its top 16 directions."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*@\s*([0-9]+)\s*", str(text))
    if not m:
        raise InspectError(f"--min-energy {text!r}: expected τ@K, e.g. 0.9@16 (keep 90% of the energy at rank 16)")
    tau, k = float(m.group(1)), int(m.group(2))
    if not 0 < tau <= 1:
        raise InspectError(f"--min-energy {text!r}: τ must be in (0, 1]")
    if k < 1:
        raise InspectError(f"--min-energy {text!r}: K must be at least 1")
    return tau, k


def parse_serving(text: str) -> tuple[str, int | None]:
    """``"vllm:16"`` → ("vllm", 16); ``"llamacpp"`` → ("llamacpp", None); vLLM's rank must be one it accepts."""
    name, _, rank = str(text).strip().partition(":")
    name = name.lower().replace("-", "").replace(".", "")
    if name == "llama" or name == "llamacpp":
        name = "llamacpp"
    if name not in PROFILES:
        raise InspectError(f"--serving {text!r}: unknown profile (choose from {', '.join(PROFILES)}, optionally :MAX_RANK)")
    r: int | None = None
    if rank:
        if not rank.isdigit() or int(rank) < 1:
            raise InspectError(f"--serving {text!r}: the rank after ':' must be a positive integer")
        r = int(rank)
    if name == "vllm":
        r = VLLM_DEFAULT_RANK if r is None else r
        if r not in VLLM_RANKS:
            raise InspectError(
                f"--serving {text!r}: vLLM's --max-lora-rank must be one of {', '.join(map(str, VLLM_RANKS))}"
            )
    return name, r


POLICY_KEYS = ("max-rank", "max-params", "max-size", "max-extra-params", "min-energy", "allow-dora", "dora",
               "require-finite", "integrity", "serving", "base")


def _pos_int(v: Any, key: str, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InspectError(f"{where}: {key} must be a positive integer, found {v!r}")
    return v


def policy_from_table(table: dict[str, Any], where: str = "[tool.lora-inspect.check]") -> dict[str, Any]:
    """Validate a ``[tool.lora-inspect.check]`` table into Policy fields; unknown keys are an error naming the key."""
    if not isinstance(table, dict):
        raise InspectError(f"{where}: expected a table")
    out: dict[str, Any] = {}
    for raw_key, v in table.items():
        key = str(raw_key).replace("_", "-")
        if key not in POLICY_KEYS:
            raise InspectError(f"{where}: unknown key {raw_key!r} (known: {', '.join(POLICY_KEYS)})")
        if key == "max-rank":
            out["max_rank"] = _pos_int(v, key, where)
        elif key == "max-params":
            out["max_params"] = parse_count(v, f"{where} max-params")
        elif key == "max-extra-params":
            out["max_extra_params"] = parse_count(v, f"{where} max-extra-params")
        elif key == "max-size":
            out["max_size"] = parse_size(v, f"{where} max-size")
        elif key == "min-energy":
            out["min_energy"] = parse_min_energy(v)
        elif key in ("allow-dora", "require-finite", "integrity"):
            if not isinstance(v, bool):
                raise InspectError(f"{where}: {key} must be true or false, found {v!r}")
            out[key.replace("-", "_")] = v
        elif key == "dora":
            if v not in ("allow", "deny"):
                raise InspectError(f"{where}: dora must be \"allow\" or \"deny\", found {v!r}")
            out["allow_dora"] = v == "allow"
        elif key == "serving":
            items = [v] if isinstance(v, str) else v
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise InspectError(f"{where}: serving must be a string or a list of strings such as \"vllm:16\"")
            out["serving"] = [parse_serving(i) for i in items]
        elif key == "base":
            if not isinstance(v, str):
                raise InspectError(f"{where}: base must be a preset name or a config.json path")
            out["base"] = v
    return out


# ---------------------------------------------------------------- tensor-data helpers
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
    from .spectrum import all_finite

    done: set[str] = set()
    zero_b: list[str] = []
    b_keys = {m.b_key: m.name for m in adapter.modules}
    if report is not None:
        done = {k for r in report.modules if "non_finite" not in r.flags for k in (r.module.a_key, r.module.b_key)}
        zero_b = list(report.summary.zero_b)
    bad: list[str] = []
    for key in adapter.source.keys():
        if key in done or (not finite and key not in b_keys):
            continue
        t = adapter.source.get(key)
        if finite and t.is_floating_point() and t.numel() and not all_finite(t):
            bad.append(key)
        if key in b_keys and report is None and t.numel() and not bool(t.any()):
            zero_b.append(b_keys[key])
    return ValueScan(natural_sorted(bad) if finite else None, natural_sorted(zero_b))


def nonfinite_tensors(adapter: Adapter, report: "RankReport | None" = None) -> list[str]:
    """Keys of floating-point tensors holding NaN or ±inf (reads tensor data; see :func:`scan_values`)."""
    return scan_values(adapter, report).nonfinite or []


# ---------------------------------------------------------------- the rules
def _extra_module(key: str) -> str:
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    for wrapper in (".modules_to_save.default", ".original_module", ".base_layer", ".modules_to_save"):
        name = name.replace(wrapper, "")
    return name


def _worst(modules, value) -> Any:
    return max(modules, key=value) if modules else None


def _size_rules(ad: Adapter, p: Policy) -> list[Result]:
    out = []
    if p.max_rank is not None:
        worst = _worst(ad.modules, lambda m: m.rank)
        r = worst.rank if worst else 0
        out.append(Result("max-rank", r <= p.max_rank, r, p.max_rank,
                          "" if r <= p.max_rank else f"rank {r} > {p.max_rank} ({worst.name})"))
    if p.max_params is not None:
        ok = ad.params <= p.max_params
        out.append(Result("max-params", ok, ad.params, p.max_params,
                          "" if ok else f"{ad.params:,} LoRA params > {p.max_params:,}"))
    if p.max_extra_params is not None:
        ok = ad.extra_params <= p.max_extra_params
        biggest = _worst(ad.extras, lambda k: ad.source.info(k).numel)
        out.append(Result("max-extra-params", ok, ad.extra_params, p.max_extra_params,
                          "" if ok else f"{ad.extra_params:,} full-tensor params > {p.max_extra_params:,} (largest: {biggest})"))
    if p.max_size is not None:
        size = ad.file_bytes
        ok = size <= p.max_size
        out.append(Result("max-size", ok, size, p.max_size,
                          "" if ok else f"{ad.weights_path.name} is {size:,} B ({fmt_bytes(size)}) > {p.max_size:,} B"))
    return out


def _energy_rule(report: "RankReport", tau: float, k: int) -> Result:
    worst_name, worst = None, 2.0
    unknown = []
    for r in report.modules:
        if r.singular_values is None:
            unknown.append(r.name)
            continue
        e = retained_energy(r.singular_values, min(k, len(r.singular_values)))
        if e < worst:
            worst_name, worst = r.name, e
    limit = f"{tau:g}@{k}"
    if unknown:
        return Result("min-energy", False, None, limit, f"{len(unknown)} modules have non-finite factors (e.g. {unknown[0]})")
    if worst_name is None:
        return Result("min-energy", True, 1.0, limit)
    ok = worst >= tau
    return Result("min-energy", ok, round(worst, 6), limit,
                  "" if ok else f"{worst_name} keeps {worst:.4f} of its energy at rank {k} < {tau:g}")


def _scales(ad: Adapter) -> list[float]:
    out: list[float] = []
    for m in ad.modules:
        if not any(math.isclose(m.scale, s, rel_tol=_SCALE_RTOL) for s in out):
            out.append(m.scale)
    return out


def _rank_rule(name: str, ad: Adapter, limit: int | None) -> list[Result]:
    if limit is None:
        return []
    worst = _worst(ad.modules, lambda m: m.rank)
    r = worst.rank if worst else 0
    ok = r <= limit
    return [Result(f"{name}: rank", ok, r, limit, "" if ok else f"rank {r} > max rank {limit} ({worst.name})")]


def _dora_rule(name: str, ad: Adapter) -> Result:
    return Result(f"{name}: dora", not ad.use_dora, "DoRA" if ad.use_dora else "LoRA", "no DoRA",
                  "DoRA adapters are refused" if ad.use_dora else "")


def _family(ad: Adapter, base: "BaseModel | None") -> str | None:
    if base is not None:
        return base.model_type
    cfg = ad.config or {}
    cls = (cfg.get("auto_mapping") or {}).get("base_model_class") if isinstance(cfg.get("auto_mapping"), dict) else None
    for text in (cls, ad.base_model):
        if text:
            return str(text).lower()
    return None


def _profile(name: str, rank: int | None, ad: Adapter, base: "BaseModel | None") -> list[Result]:
    cfg = ad.config or {}
    out = _rank_rule(name, ad, rank)
    if name == "vllm":
        out.append(_dora_rule(name, ad))
        saved = sorted({_extra_module(k) for k in ad.extras} | set(cfg.get("modules_to_save") or []))
        bad = [s for s in saved if module_type(s) not in VLLM_SAVE_OK]
        out.append(Result(f"{name}: modules_to_save", not bad, len(bad), "classifier/score",
                          "" if not bad else f"full tensors for {', '.join(bad[:3])}{' …' if len(bad) > 3 else ''} are refused"))
        bias = cfg.get("bias", "none") or "none"
        lora_bias = bool(cfg.get("lora_bias")) or any(m.bias_key for m in ad.modules)
        ok = bias == "none" and not lora_bias
        out.append(Result(f"{name}: bias", ok, f"{bias}{', lora_bias' if lora_bias else ''}", "none",
                          "" if ok else "adapters with bias terms are refused"))
        scales = _scales(ad)
        ok = len(scales) <= 1
        msg = "" if ok else (f"{len(scales)} different per-module scales (alpha_pattern/rank_pattern); vLLM applies "
                             "one α/r to every module")
        # one shared scale is still wrong when it is not the config's global α/r (patterns covering every module);
        # r is the config's, or the largest rank_pattern value (newer vLLM)
        r_cfg, a_cfg = cfg.get("r"), cfg.get("lora_alpha")
        if ok and scales and ad.peft_type == "LORA" and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (r_cfg, a_cfg)):
            pats = [v for v in (cfg.get("rank_pattern") or {}).values() if isinstance(v, (int, float))]
            root = math.sqrt if ad.use_rslora else (lambda x: x)
            glob = [a_cfg / root(r) for r in {r_cfg, max([r_cfg, *pats])}]
            if not any(math.isclose(scales[0], g, rel_tol=_SCALE_RTOL) for g in glob):
                ok = False
                msg = (f"every module's scale is {scales[0]:g} but vLLM applies the config's global "
                       f"{'α/√r' if ad.use_rslora else 'α/r'} = {glob[0]:g} (rank_pattern/alpha_pattern cover every module)")
        out.append(Result(f"{name}: one scale", ok, len(scales), 1, msg))
    elif name == "llamacpp":
        out.append(_dora_rule(name, ad))
        full = [k for k in ad.extras if module_type(_extra_module(k)) in EMBEDDING_TYPES]
        out.append(Result(f"{name}: full embeddings", not full, len(full), 0,
                          "" if not full else f"convert_lora_to_gguf exits on full tensors such as {full[0]}"))
        alphas = sorted({m.alpha for m in ad.modules})
        ok = len(alphas) <= 1
        out.append(Result(f"{name}: one alpha", ok, len(alphas), 1,
                          "" if ok else f"per-module alphas {', '.join(f'{a:g}' for a in alphas[:4])}: GGUF stores one α"))
    elif name == "lorax":
        fam = "gpt2" if (base is not None and base.family == "gpt2") or any(".h." in m.name or m.name.startswith("h.") for m in ad.modules) else "llama"
        allowed = LORAX_TARGETS[fam]
        bad = sorted({module_type(m.name) for m in ad.modules} - allowed)
        out.append(Result(f"{name}: targets", not bad, ", ".join(bad) or "-", f"{fam} projections",
                          "" if not bad else f"unsupported target modules {', '.join(bad)} would be ignored"))
    elif name == "sglang":
        pref = [m.name for m in ad.modules if "language_model." in m.name or m.name.startswith(("base_model.", "model.model."))]
        unprefixed = [m.a_key for m in ad.modules if ad.format.startswith("peft") and not m.a_key.startswith(PEFT_PREFIX)]
        bad = pref + unprefixed
        out.append(Result(f"{name}: module names", not bad, len(bad), 0,
                          "" if not bad else f"prefixed or non-standard module names such as {bad[0]!r} are rejected"))
        in_config = "lora_alpha" in cfg and ad.config_path is not None  # not a config kept in the header
        mismatch = [m for m in ad.modules if not math.isclose(m.alpha, m.rank)]
        ok = in_config or not mismatch
        out.append(Result(f"{name}: alpha in config", ok, "config" if in_config else "header/unknown", "adapter_config.json",
                          "" if ok else f"α = {mismatch[0].alpha:g} is not in adapter_config.json: SGLang reads α = r = {mismatch[0].rank}"))
    elif name == "ollama":
        ok = ad.format == "peft" and ad.weights_path.name == "adapter_model.safetensors" and ad.config is not None
        out.append(Result(f"{name}: layout", ok, f"{ad.format} ({ad.weights_path.name})",
                          "PEFT dir, .safetensors",
                          "" if ok else "Ollama's ADAPTER needs a directory with adapter_config.json and adapter_model.safetensors"))
        fam = _family(ad, base)
        ok = fam is not None and any(f in fam for f in OLLAMA_FAMILIES)
        out.append(Result(f"{name}: architecture", ok, fam or "unknown", "/".join(OLLAMA_FAMILIES),
                          "" if ok else ("base architecture unknown (give --base)" if fam is None
                                         else f"{fam} is not a Llama, Mistral or Gemma family model")))
    return out


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
        ms = known.get(_extra_module(k))
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
        msg = f"{len(missing)} of {len(ad.modules)} modules match no module of {base.name}, e.g. {first!r}{hint}"
    return [
        Result("base: names", not missing, len(missing), 0, msg),
        Result("base: shapes", not wrong, len(wrong), 0, "" if not wrong else f"{len(wrong)} shape mismatches, e.g. {wrong[0]}"),
    ]


def _integrity_rules(values: ValueScan, finite: bool) -> list[Result]:
    out = []
    bad = values.nonfinite
    if finite and bad is not None:
        out.append(Result("finite", not bad, len(bad), 0,
                          "" if not bad else f"{len(bad)} tensors hold NaN/inf: {names_line(bad)}"))
    zb = values.zero_b
    out.append(Result("trained", not zb, len(zb), 0, "" if not zb else (
        f"{len(zb)} modules have an all-zero B factor, so they change nothing (saved before training?): "
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
    """All rule rows for one adapter. ``report`` is required for min-energy, ``values``
    (:func:`scan_values`) for the integrity rule."""
    out = _size_rules(ad, policy)
    if policy.min_energy is not None:
        if report is None:
            raise ValueError("min-energy needs the adapter's spectra (analysis.analyse)")
        out.append(_energy_rule(report, *policy.min_energy))
    if policy.allow_dora is not None:
        ok = policy.allow_dora or not ad.use_dora
        out.append(Result("dora", ok, "DoRA" if ad.use_dora else "LoRA", "allowed" if policy.allow_dora else "denied",
                          "" if ok else "DoRA adapters are denied (--deny-dora)"))
    if policy.integrity:
        if values is None:
            raise ValueError("the integrity rule needs scan_values(adapter)")
        out.extend(_integrity_rules(values, policy.require_finite))
    for name, rank in policy.serving:
        out.extend(_profile(name, rank, ad, base))
    if base is not None:
        out.extend(base_results(ad, base))
    return out


def unreadable_results(message: str) -> list[Result]:
    """An adapter whose factors are unpaired cannot be loaded by any server (llama.cpp's converter exits)."""
    return [Result("paired factors", False, "unpaired", "every A has its B", message)]
