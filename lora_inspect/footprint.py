"""What an adapter costs: parameters and bytes, serving memory, training and inference VRAM.

Pure estimator (no I/O): it takes an :class:`~lora_inspect.adapter.Adapter` (header facts only), an
optional :class:`~lora_inspect.analysis.RankReport` (for the costs at the recommended rank) and an
optional :class:`~lora_inspect.basemodels.BaseModel`, and returns JSON-ready dicts (the body of the
``lora-inspect/footprint/1`` document); :func:`lora_inspect.views.footprint.footprint_view` adds the
schema id and draws the tables.

Every memory term below names its formula and source. Sources (``docs/metrics.md`` collects them):

- [QLoRA] Dettmers et al. 2023, "QLoRA", §2: NF4 4 bits + double-quantized constants 0.127 bit/param;
  bitsandbytes dequantizes one weight to 16-bit per matmul.
- [LLM.int8] Dettmers et al. 2022: int8 weights 1 B/param on linear layers.
- [PEFT] peft 0.21 ``LoraModel``: adapters kept in fp32 by default (``autocast_adapter_dtype=True``).
- [Adam] torch.optim.AdamW keeps ``exp_avg`` and ``exp_avg_sq`` in the parameter's dtype (2 × its bytes);
  bitsandbytes ``AdamW8bit`` keeps both states in 8 bits (2 B/param).
- [act] metrics.md, "Activations": bytes per token per layer per hidden unit measured on saved tensors
  (bf16, SDPA): LoRA q,v ≈ 34; all-linear ≈ 42; all-linear with fp32 adapters ≈ 68; dropout adds ≈ 24;
  gradient checkpointing ≈ 2 (layer inputs) plus one layer's working set.
- [HF-loss] transformers ``ForCausalLMLoss`` upcasts logits to fp32: batch·seq·vocab·(2 + 4) bytes, plus
  the fp32 gradient of the upcast logits (4 B each).
- [CUDA] metrics.md: CUDA context ≈ 0.3–0.5 GB (0.4 GB used here).
- [KV] K and V per token: 2 · layers · kv_heads·head_dim · 2 B (bf16) — Llama-2-7B 512 KiB, Llama-3-8B 128 KiB.
- [vLLM] vllm/lora/layers ``BaseLinearLayerWithLoRA.create_lora_weights``: for every LoRA-capable linear
  module of every layer (packed qkv/gate_up as one module with several slices), ``lora_a_stacked``
  (max_loras, 1, max_lora_rank, in) and ``lora_b_stacked`` (max_loras, 1, out, max_lora_rank) in the
  LoRA dtype (the model dtype by default), allocated at start-up whatever adapters arrive later.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .adapter import Adapter, module_type
from .naming import natural_sorted
from .units import fmt_bytes, plural

if TYPE_CHECKING:  # pragma: no cover
    from .analysis import RankReport
    from .basemodels import BaseModel

__all__ = [
    "QUANT_BYTES", "ADAPTER_DTYPE_BYTES", "SERVING_DTYPE_BYTES",
    "Term", "adapter_costs", "training_vram", "inference_vram", "serving_memory", "vllm_pool_bytes",
    "activation_bytes_per_unit", "layer_paths", "footprint", "DEFAULTS",
]

# Base weight bytes per parameter *on decoder linear layers*; embeddings, lm_head, norms stay 16-bit.
QUANT_BYTES = {"bf16": 2.0, "fp16": 2.0, "int8": 1.0, "nf4": (4 + 0.127) / 8}  # nf4 ≈ 0.516 [QLoRA]
SERVING_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
ADAPTER_DTYPE_BYTES = {"fp32": 4, "bf16": 2}

ACT_ATTN_ONLY = 34.0  # [act] LoRA on attention projections only (q,v measured)
ACT_WITH_MLP = 42.0  # [act] LoRA on MLP projections too (all-linear measured)
ACT_FP32_EXTRA = 68.0 - 42.0  # [act] fp32 adapters: PEFT casts each targeted input to fp32 and keeps it
ACT_DROPOUT = 24.0  # [act] dropout masks/outputs (all-linear measured)
ACT_CHECKPOINTED = 2.0  # [act] bf16 layer input kept per layer under gradient checkpointing
CUDA_CONTEXT_BYTES = 400_000_000  # [CUDA]

DEFAULTS = {
    "quant": "bf16", "batch": 1, "seq": 2048, "grad_checkpointing": False, "optimizer": "adamw",
    "adapter_dtype": "fp32", "serving_dtype": "bf16", "max_loras": 1, "max_lora_rank": 16, "dropout": None,
}


@dataclass
class Term:
    name: str
    bytes: int
    formula: str
    source: str


def _total(terms: list[Term]) -> dict[str, Any]:
    return {"terms": [asdict(t) for t in terms], "total_bytes": int(sum(t.bytes for t in terms))}


# ---------------------------------------------------------------- adapter parameters and bytes
def adapter_costs(adapter: Adapter, report: "RankReport | None" = None) -> dict[str, Any]:
    """Exact counts from the header: LoRA params r·(out+in) per module, full-tensor params, bytes by dtype.

    With a :class:`RankReport`, also the params/bytes at the uniform recommended rank (every module cut
    to min(uniform, r)) and at per-module energy ranks — the numbers ``rank`` prints, split by type.
    Modules whose spectrum is unknown (non-finite) keep their rank, as in ``analysis.summarise``.
    """
    by_type: dict[str, dict[str, Any]] = {}
    for m in adapter.modules:
        t = by_type.setdefault(module_type(m.name), {"modules": 0, "ranks": set(), "params": 0, "bytes": 0})
        t["modules"] += 1
        t["ranks"].add(m.rank)
        t["params"] += m.params
        t["bytes"] += m.nbytes
    for name, t in by_type.items():
        t["ranks"] = sorted(t["ranks"])
        if report is not None:  # the recommendation's sizes, as `rank` computed them for this type
            g = report.summary.by_type[name]
            t.update({"params_uniform": g.params_uniform, "params_pattern": g.params_pattern,
                      "bytes_uniform": g.bytes_uniform, "bytes_pattern": g.bytes_pattern})
    by_dtype: dict[str, int] = defaultdict(int)
    for info in adapter.source.tensors.values():
        by_dtype[info.dtype] += info.nbytes
    out: dict[str, Any] = {
        "params": adapter.params,
        "extra_params": adapter.extra_params,
        "trainable_params": sum(i.numel for i in adapter.source.tensors.values()),
        "lora_bytes": sum(m.nbytes for m in adapter.modules),
        "extra_bytes": adapter.extra_bytes,
        "tensor_bytes": adapter.tensor_bytes,
        "file_bytes": adapter.file_bytes,
        "bytes": dict(sorted(by_dtype.items())),
        "by_type": {k: by_type[k] for k in natural_sorted(by_type)},
    }
    if report is not None:
        s = report.summary
        out["recommended"] = {
            "energy": report.energy, "uniform_rank": s.uniform_rank, "max_rank": s.max_rank,
            "params_uniform": s.params.uniform, "params_pattern": s.params.pattern,
            "bytes_uniform": s.bytes.uniform, "bytes_pattern": s.bytes.pattern,
        }
    return out


# ---------------------------------------------------------------- serving
def vllm_pool_bytes(shapes: Iterable[tuple[int, int]], max_loras: int, max_lora_rank: int, dtype_bytes: int) -> int:
    """[vLLM] Σ over LoRA-capable modules of max_loras · max_lora_rank · (in + out) · dtype bytes.

    ``lora_a_stacked`` holds max_loras·max_rank·in elements and ``lora_b_stacked`` max_loras·out·max_rank;
    a packed module (qkv_proj, gate_up_proj) is the sum of its slices, so counting q, k, v separately is
    the same number. Every adapter occupies a slot padded to max_lora_rank, whatever its own rank.
    """
    return int(max_loras * max_lora_rank * dtype_bytes * sum(o + i for o, i in shapes))


def serving_memory(
    adapter: Adapter,
    base: "BaseModel | None" = None,
    *,
    dtype: str = "bf16",
    max_loras: int = 1,
    max_lora_rank: int = 16,
) -> dict[str, Any]:
    """GPU bytes for one loaded (unmerged) adapter in the serving dtype, and vLLM's preallocated pool.

    One adapter: every stored tensor's elements × the serving dtype's bytes (servers cast on load).
    Pool: :func:`vllm_pool_bytes` over the base's decoder linear modules when a base is known (that is
    what vLLM allocates); without a base, over the adapter's own modules only — a lower bound.
    """
    b = SERVING_DTYPE_BYTES[dtype]
    elements = sum(i.numel for i in adapter.source.tensors.values())
    if base is not None:
        shapes = [(ms.out, ms.inp) for ms in base.modules.values() if ms.layer is not None]
        scope = f"all {plural(len(shapes), 'decoder linear module')} of {base.name}"
    else:
        shapes = [m.shape for m in adapter.modules if m.kind != "embedding"]
        scope = f"the adapter's {plural(len(shapes), 'module')} only (give --base for every LoRA-capable layer)"
    max_r = max((m.rank for m in adapter.modules), default=0)
    return {
        "dtype": dtype,
        "per_adapter_bytes": int(elements * b),
        "per_adapter_formula": f"{elements:,} elements × {b} B",
        "vllm": {
            "max_loras": max_loras,
            "max_lora_rank": max_lora_rank,
            "pool_bytes": vllm_pool_bytes(shapes, max_loras, max_lora_rank, b),
            "slot_bytes": vllm_pool_bytes(shapes, 1, max_lora_rank, b),
            "scope": scope,
            "fits": max_r <= max_lora_rank,
            "formula": "max_loras · max_lora_rank · Σ(in + out) · dtype bytes",
            "source": "vllm/lora/layers: BaseLinearLayerWithLoRA.create_lora_weights (lora_a_stacked, lora_b_stacked)",
        },
    }


# ---------------------------------------------------------------- training / inference VRAM
_LAYER_PATH = re.compile(r"(?:^|\.)(?:layers|h)\.\d+\.(.+)$")


def layer_paths(names: Iterable[str]) -> set[str]:
    """Per-layer module paths targeted (``self_attn.q_proj``, ``mlp.c_proj``) from full module names."""
    out = set()
    for n in names:
        m = _LAYER_PATH.search(n)
        if m:
            out.add(m.group(1))
    return out


def activation_bytes_per_unit(base: "BaseModel", targeted: set[str], adapter_dtype: str, dropout: bool) -> tuple[float, str]:
    """Saved-activation bytes per token per layer per hidden unit, and how it was obtained.

    [act] gives 34 (LoRA on q,v) and 42 (all linear) for bf16 adapters. Attention-only targets use 34;
    any MLP target uses 42. fp32 adapters (PEFT's default) add 68 − 42 = 26 and dropout adds 24 at
    all-linear; both are scaled here by the fraction of per-layer linear modules targeted (each targeted
    module keeps its own cast/dropped copy of its input) — an interpolation, said so in the output.
    """
    paths = set(base.layer_linears())
    hit = targeted & paths
    frac = len(hit) / len(paths) if paths else 0.0
    mlp = any(p.startswith("mlp.") for p in hit)
    c = ACT_WITH_MLP if mlp else ACT_ATTN_ONLY
    how = [f"{c:g} ({'MLP targeted' if mlp else 'attention only'})"]
    if adapter_dtype == "fp32" and hit:
        c += ACT_FP32_EXTRA * frac
        how.append(f"+ 26 × {len(hit)}/{len(paths)} (fp32 adapters)")
    if dropout and hit:
        c += ACT_DROPOUT * frac
        how.append(f"+ 24 × {len(hit)}/{len(paths)} (dropout)")
    return c, " ".join(how)


def _base_weight_terms(base: "BaseModel", quant: str) -> list[Term]:
    pc = base.param_counts()
    q = QUANT_BYTES[quant]
    rest = pc["embedding"] + pc["lm_head"] + pc["other"]
    if quant in ("bf16", "fp16"):
        return [Term("base weights", int(pc["total"] * 2), f"{pc['total']:,} params × 2 B ({quant})", "metrics.md: bf16 2 B/param")]
    src = "QLoRA §2: 4 + 0.127 bits" if quant == "nf4" else "LLM.int8: 1 B/param"
    return [
        Term(f"base linear layers ({quant})", int(pc["linear"] * q), f"{pc['linear']:,} params × {q:.4g} B", src),
        Term("base embeddings, lm_head, norms (16-bit)", int(rest * 2), f"{rest:,} params × 2 B",
             "metrics.md: embeddings/norms/lm_head stay 16-bit"),
        Term("dequantized weight (transient)", int(max(o * i for o, i in base.layer_linears().values()) * 2),
             "largest linear out·in × 2 B", "bitsandbytes dequantizes one weight per matmul [QLoRA]"),
    ]


def training_vram(
    base: "BaseModel",
    *,
    trainable_params: int,
    targeted: set[str],
    quant: str = "bf16",
    batch: int = 1,
    seq: int = 2048,
    grad_checkpointing: bool = False,
    optimizer: str = "adamw",
    adapter_dtype: str = "fp32",
    dropout: bool = False,
) -> dict[str, Any]:
    """Peak training memory ≈ base weights + LoRA weights + grads + optimizer state + activations
    + logits + CUDA context (metrics.md, "Training memory"). ``targeted``: per-layer paths (:func:`layer_paths`)."""
    a = ADAPTER_DTYPE_BYTES[adapter_dtype]
    P = int(trainable_params)
    state = {"adamw": 2 * a, "adamw8bit": 2, "sgd": 0}[optimizer]
    tokens = batch * seq
    h, L, V = base.hidden, base.layers, base.vocab
    c, how = activation_bytes_per_unit(base, targeted, adapter_dtype, dropout)
    terms = _base_weight_terms(base, quant)
    terms += [
        Term("LoRA weights", P * a, f"{P:,} trainable × {a} B ({adapter_dtype})", "PEFT: adapters in fp32 by default"),
        Term("LoRA gradients", P * a, f"{P:,} × {a} B", "one gradient per trainable parameter, its dtype"),
        Term(f"optimizer state ({optimizer})", P * state, f"{P:,} × {state} B",
             "AdamW: exp_avg + exp_avg_sq in the param dtype; AdamW8bit: 2 × 1 B; SGD (no momentum): 0"),
    ]
    if grad_checkpointing:
        kept = int(ACT_CHECKPOINTED * tokens * h * L)
        work = int(c * tokens * h)
        terms += [
            Term("activations: checkpointed layer inputs", kept, f"2 B × {plural(tokens, 'token')} × {h} hidden × {plural(L, 'layer')}",
                 "metrics.md [act]: checkpointing ≈ 2 B/token/layer/hidden"),
            Term("activations: one layer recomputed", work, f"{c:.3g} B × {plural(tokens, 'token')} × {h} hidden ({how})",
                 "metrics.md [act]: one layer's working set"),
        ]
    else:
        terms.append(Term("activations", int(c * tokens * h * L), f"{c:.3g} B × {plural(tokens, 'token')} × {h} hidden × {plural(L, 'layer')} ({how})",
                          "metrics.md [act]: measured saved tensors, bf16, SDPA"))
    terms += [
        Term("logits (bf16 + fp32 upcast)", int(tokens * V * 6), f"{tokens:,} tokens × {V:,} vocab × (2 + 4) B",
             "transformers ForCausalLMLoss upcasts logits to fp32"),
        Term("logits gradient (fp32)", int(tokens * V * 4), f"{tokens:,} × {V:,} × 4 B", "gradient of the fp32 logits"),
        Term("CUDA context", CUDA_CONTEXT_BYTES, "≈ 0.4 GB", "metrics.md: 0.3–0.5 GB"),
    ]
    doc = _total(terms)
    doc["settings"] = {"quant": quant, "batch": batch, "seq": seq, "grad_checkpointing": grad_checkpointing,
                       "optimizer": optimizer, "adapter_dtype": adapter_dtype, "dropout": dropout,
                       "activation_bytes_per_token_layer_hidden": c, "trainable_params": P}
    return doc


def inference_vram(
    base: "BaseModel",
    *,
    adapter_elements: int,
    quant: str = "bf16",
    batch: int = 1,
    seq: int = 2048,
    dtype: str = "bf16",
    merged: bool = False,
) -> dict[str, Any]:
    """Inference memory ≈ base weights + adapter (unmerged: elements × dtype bytes; merged: 0) + KV cache
    (2 · layers · kv_dim · 2 B per token [KV]) + CUDA context. Decoding activations are ignored (small)."""
    b = SERVING_DTYPE_BYTES[dtype]
    per_token = 2 * base.layers * base.kv_dim * 2
    tokens = batch * seq
    terms = [t for t in _base_weight_terms(base, quant)]
    terms += [
        Term("adapter (merged)" if merged else "adapter (unmerged)", 0 if merged else adapter_elements * b,
             "0: folded into W" if merged else f"{adapter_elements:,} elements × {b} B ({dtype})", "metrics.md: Inference"),
        Term("KV cache", per_token * tokens, f"{plural(tokens, 'token')} × 2 · {plural(base.layers, 'layer')} · {base.kv_dim} kv_dim · 2 B "
             f"({fmt_bytes(per_token)}/token)", "metrics.md: 2·layers·kv_dim·2 B per token"),
        Term("CUDA context", CUDA_CONTEXT_BYTES, "≈ 0.4 GB", "metrics.md: 0.3–0.5 GB"),
    ]
    doc = _total(terms)
    doc["kv_bytes_per_token"] = per_token
    doc["settings"] = {"quant": quant, "batch": batch, "seq": seq, "dtype": dtype, "merged": merged}
    return doc


# ---------------------------------------------------------------- the whole estimate
def _dropout_of(adapter: Adapter) -> bool:
    cfg = adapter.config or {}
    d = cfg.get("lora_dropout")
    if d is None:
        d = (cfg.get("lora_parameters") or {}).get("dropout") if isinstance(cfg.get("lora_parameters"), dict) else None
    return isinstance(d, (int, float)) and not isinstance(d, bool) and d > 0


def footprint(
    adapter: Adapter,
    report: "RankReport | None" = None,
    base: "BaseModel | None" = None,
    **opts: Any,
) -> dict[str, Any]:
    """Everything ``lora-inspect footprint`` reports, as one JSON-ready dict (the body of ``lora-inspect/footprint/1``).

    ``opts``: quant, batch, seq, grad_checkpointing, optimizer, adapter_dtype, serving_dtype, max_loras,
    max_lora_rank, dropout (None: from the adapter's config) — defaults in :data:`DEFAULTS`.
    """
    o = {**DEFAULTS, **{k: v for k, v in opts.items() if v is not None}}
    unknown = set(opts) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown footprint options: {sorted(unknown)}")
    costs = adapter_costs(adapter, report)
    doc: dict[str, Any] = dict(costs)
    doc["serving"] = serving_memory(adapter, base, dtype=o["serving_dtype"], max_loras=o["max_loras"],
                                    max_lora_rank=o["max_lora_rank"])
    doc["base"] = base.summary() if base is not None else None
    if base is not None:
        doc["base"]["unmatched_modules"] = sum(
            1 for m in adapter.modules
            if m.name not in base.modules or (base.modules[m.name].out, base.modules[m.name].inp) != tuple(m.shape))
    doc["vram"] = None
    if base is not None:
        dropout = _dropout_of(adapter) if o["dropout"] is None else bool(o["dropout"])
        targeted = layer_paths(m.name for m in adapter.modules)
        doc["vram"] = {
            "training": training_vram(
                base, trainable_params=costs["trainable_params"], targeted=targeted, quant=o["quant"],
                batch=o["batch"], seq=o["seq"], grad_checkpointing=o["grad_checkpointing"],
                optimizer=o["optimizer"], adapter_dtype=o["adapter_dtype"], dropout=dropout,
            ),
            "inference": inference_vram(
                base, adapter_elements=costs["trainable_params"], quant=o["quant"], batch=o["batch"],
                seq=o["seq"], dtype=o["serving_dtype"],
            ),
        }
    return doc
