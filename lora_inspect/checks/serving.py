"""What each serving stack refuses (pure: header facts only).

The profiles encode ``docs/serving.md``:

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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..adapter import Adapter, module_type
from ..errors import InspectError
from ..formats import layout_of
from ..formats.peft import PeftLayout
from ..peft_rules import PEFT_PREFIX
from .result import Result

if TYPE_CHECKING:  # pragma: no cover
    from ..basemodels import BaseModel

__all__ = ["VLLM_RANKS", "VLLM_DEFAULT_RANK", "PROFILES", "parse_serving", "profile_results",
           "extra_module", "largest"]

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
_SCALE_RTOL = 1e-6


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


def extra_module(key: str) -> str:
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    for wrapper in (".modules_to_save.default", ".original_module", ".base_layer", ".modules_to_save"):
        name = name.replace(wrapper, "")
    return name


def largest(modules, value) -> Any:
    return max(modules, key=value) if modules else None


def _scales(ad: Adapter) -> list[float]:
    out: list[float] = []
    for m in ad.modules:
        if not any(math.isclose(m.scale, s, rel_tol=_SCALE_RTOL) for s in out):
            out.append(m.scale)
    return out


def _rank_rule(name: str, ad: Adapter, limit: int | None) -> list[Result]:
    if limit is None:
        return []
    worst = largest(ad.modules, lambda m: m.rank)
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


def _vllm_scale(ad: Adapter, cfg: dict[str, Any]) -> Result:
    name = "vllm"
    scales = _scales(ad)
    ok = len(scales) <= 1
    msg = "" if ok else (f"{len(scales)} different per-module scales (alpha_pattern/rank_pattern); vLLM applies "
                         "one α/r to every module")
    # one shared scale is still wrong when it is not the config's global α/r (patterns covering every module);
    # r is the config's, or the largest rank_pattern value (newer vLLM)
    r_cfg, a_cfg = cfg.get("r"), cfg.get("lora_alpha")
    if ok and scales and ad.peft_type == "LORA" and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (r_cfg, a_cfg)):
        pats = [float(v) for v in (cfg.get("rank_pattern") or {}).values() if isinstance(v, (int, float))]
        root = math.sqrt if ad.use_rslora else (lambda x: x)
        glob = [float(a_cfg) / root(r) for r in {float(r_cfg), max([float(r_cfg), *pats])}]  # type: ignore[arg-type]
        if not any(math.isclose(scales[0], g, rel_tol=_SCALE_RTOL) for g in glob):
            ok = False
            msg = (f"every module's scale is {scales[0]:g} but vLLM applies the config's global "
                   f"{'α/√r' if ad.use_rslora else 'α/r'} = {glob[0]:g} (rank_pattern/alpha_pattern cover every module)")
    return Result(f"{name}: one scale", ok, len(scales), 1, msg)


def _vllm(ad: Adapter, cfg: dict[str, Any], base: "BaseModel | None") -> list[Result]:
    name = "vllm"
    out = [_dora_rule(name, ad)]
    saved = sorted({extra_module(k) for k in ad.extras} | set(cfg.get("modules_to_save") or []))
    bad = [s for s in saved if module_type(s) not in VLLM_SAVE_OK]
    out.append(Result(f"{name}: modules_to_save", not bad, len(bad), "classifier/score",
                      "" if not bad else f"full tensors for {', '.join(bad[:3])}{' …' if len(bad) > 3 else ''} are refused"))
    bias = cfg.get("bias", "none") or "none"
    lora_bias = bool(cfg.get("lora_bias")) or any(m.bias_key for m in ad.modules)
    ok = bias == "none" and not lora_bias
    out.append(Result(f"{name}: bias", ok, f"{bias}{', lora_bias' if lora_bias else ''}", "none",
                      "" if ok else "adapters with bias terms are refused"))
    out.append(_vllm_scale(ad, cfg))
    return out


def _llamacpp(ad: Adapter, cfg: dict[str, Any], base: "BaseModel | None") -> list[Result]:
    name = "llamacpp"
    out = [_dora_rule(name, ad)]
    full = [k for k in ad.extras if module_type(extra_module(k)) in EMBEDDING_TYPES]
    out.append(Result(f"{name}: full embeddings", not full, len(full), 0,
                      "" if not full else f"convert_lora_to_gguf exits on full tensors such as {full[0]}"))
    alphas = sorted({m.alpha for m in ad.modules})
    ok = len(alphas) <= 1
    out.append(Result(f"{name}: one alpha", ok, len(alphas), 1,
                      "" if ok else f"per-module alphas {', '.join(f'{a:g}' for a in alphas[:4])}: GGUF stores one α"))
    return out


def _lorax(ad: Adapter, cfg: dict[str, Any], base: "BaseModel | None") -> list[Result]:
    gpt2 = (base is not None and base.family == "gpt2") or any(".h." in m.name or m.name.startswith("h.") for m in ad.modules)
    fam = "gpt2" if gpt2 else "llama"
    bad = sorted({module_type(m.name) for m in ad.modules} - LORAX_TARGETS[fam])
    return [Result("lorax: targets", not bad, ", ".join(bad) or "-", f"{fam} projections",
                   "" if not bad else f"unsupported target modules {', '.join(bad)} would be ignored")]


def _sglang(ad: Adapter, cfg: dict[str, Any], base: "BaseModel | None") -> list[Result]:
    name = "sglang"
    pref = [m.name for m in ad.modules if "language_model." in m.name or m.name.startswith(("base_model.", "model.model."))]
    prefix = layout_of(ad).key_prefix  # PEFT's base_model.model.
    unprefixed = [m.a_key for m in ad.modules if not m.a_key.startswith(prefix)]
    bad = pref + unprefixed
    out = [Result(f"{name}: module names", not bad, len(bad), 0,
                  "" if not bad else f"prefixed or non-standard module names such as {bad[0]!r} are rejected")]
    in_config = "lora_alpha" in cfg and ad.config_path is not None  # not a config kept in the header
    mismatch = [m for m in ad.modules if not math.isclose(m.alpha, m.rank)]
    ok = in_config or not mismatch
    out.append(Result(f"{name}: alpha in config", ok, "config" if in_config else "header/unknown", "adapter_config.json",
                      "" if ok else f"α = {mismatch[0].alpha:g} is not in adapter_config.json: SGLang reads α = r = {mismatch[0].rank}"))
    return out


def _ollama(ad: Adapter, cfg: dict[str, Any], base: "BaseModel | None") -> list[Result]:
    name = "ollama"
    ok = (isinstance(layout_of(ad), PeftLayout) and ad.path.is_dir()  # a PEFT directory
          and ad.weights_path.name == "adapter_model.safetensors" and ad.config is not None)
    out = [Result(f"{name}: layout", ok, f"{ad.format} ({ad.weights_path.name})", "PEFT dir, .safetensors",
                  "" if ok else "Ollama's ADAPTER needs a directory with adapter_config.json and adapter_model.safetensors")]
    family = _family(ad, base)
    ok = family is not None and any(f in family for f in OLLAMA_FAMILIES)
    out.append(Result(f"{name}: architecture", ok, family or "unknown", "/".join(OLLAMA_FAMILIES),
                      "" if ok else ("base architecture unknown (give --base)" if family is None
                                     else f"{family} is not a Llama, Mistral or Gemma family model")))
    return out


_PROFILE_RULES: dict[str, Callable[[Adapter, dict[str, Any], "BaseModel | None"], list[Result]]] = {
    "vllm": _vllm, "llamacpp": _llamacpp, "lorax": _lorax, "sglang": _sglang, "ollama": _ollama,
}


def _algo_rule(name: str, ad: Adapter) -> list[Result]:
    """Every profile serves B·A pairs only: LoHa, LoKr, Tucker LoCon and full modules (LyCORIS files, PEFT
    LOHA/LOKR) fail; a row only when there are such modules (plain LoRA adapters keep their rows)."""
    other = sorted({m.algo for m in ad.modules} - {"lora"})
    if not other:
        return []
    return [Result(f"{name}: algorithm", False, ", ".join(other), "LoRA",
                   f"{name} serves LoRA pairs only, not {'/'.join(other)} (convert writes their exact LoRA)")]


def profile_results(name: str, rank: int | None, ad: Adapter, base: "BaseModel | None") -> list[Result]:
    """The rows of one serving profile (``name`` from :data:`PROFILES`, ``rank`` its maximum rank)."""
    return _algo_rule(name, ad) + _rank_rule(name, ad, rank) + _PROFILE_RULES[name](ad, ad.config or {}, base)
