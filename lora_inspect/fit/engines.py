"""What each serving engine can apply, for ``fit`` (docs/serving.md, "fit").

One :class:`Engine` per name ``fit --for`` and ``check --applied`` take. An engine names the layout its
adapters are written in (a ``convert`` target: :func:`lora_inspect.formats.layout_for_target`), which
module kinds it applies, whether it keeps DoRA, its rank rule and the ``check --serving`` profile that
must pass on the output. The facts come from the engines' sources (docs/serving.md cites file and line):

- vLLM 0.33 ``vllm/config/lora.py``: ``MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]``,
  default 16; ``vllm/lora/peft_helper.py``: no DoRA, ``modules_to_save`` only ``classifier``/``score``,
  ``rank_pattern``/``alpha_pattern`` honoured; Llama's ``embedding_modules`` (embed_tokens, lm_head).
- llama.cpp ``convert_lora_to_gguf.py``: no DoRA, no full tensors, one α (per-tensor rank).
- mlx-lm ``mlx_lm/tuner/utils.py``: Linear layers only, one rank, DoRA for every layer or none.
- diffusers (``load_lora_weights``) and ComfyUI (``comfy/lora.py``): linear and conv LoRA; diffusers keeps
  DoRA magnitudes (PEFT), the kohya file ComfyUI reads is written without them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..checks.serving import VLLM_DEFAULT_RANK, VLLM_RANKS
from ..errors import OptionError
from ..kinds import Choice

__all__ = ["EngineName", "Engine", "ENGINES", "ENGINE_NAMES", "engine_named", "rank_limit"]


class EngineName(Choice):
    VLLM = "vllm"
    LORAX = "lorax"
    SGLANG = "sglang"
    OLLAMA = "ollama"
    LLAMACPP = "llama.cpp"
    MLX = "mlx-lm"
    DIFFUSERS = "diffusers"
    COMFYUI = "comfyui"


@dataclass(frozen=True)
class Engine:
    """What one serving engine applies (module docstring)."""

    name: EngineName
    target: str  # the convert target its adapters are written as (peft, gguf, mlx, diffusers, kohya)
    profile: str | None  # the check --serving profile the output must pass (None: no profile)
    ranks: tuple[int, ...] | None = None  # the allowed maximum ranks (vLLM's max_lora_rank); None: any
    default_rank: int | None = None  # R when --max-rank is not given (None: ranks are kept)
    embeddings: bool = False  # applies LoRA on embeddings / lm_head as an embedding module
    conv: bool = False
    dora: bool = False  # applies DoRA magnitudes (else DoRA is folded into plain LoRA with --base)
    saved_modules: frozenset[str] = frozenset()  # modules_to_save it takes as full tensors (vLLM: classifier, score)
    needs_base: bool = False  # the output itself needs --base (GGUF: the head counts)
    one_model: bool = True  # a language model (False: an image pipeline)


ENGINES: dict[EngineName, Engine] = {e.name: e for e in (
    Engine(EngineName.VLLM, "peft", "vllm", VLLM_RANKS, VLLM_DEFAULT_RANK, embeddings=True,
           saved_modules=frozenset({"classifier", "score"})),
    Engine(EngineName.LORAX, "peft", "lorax"),
    Engine(EngineName.SGLANG, "peft", "sglang"),
    Engine(EngineName.OLLAMA, "peft", "ollama"),
    Engine(EngineName.LLAMACPP, "gguf", "llamacpp", embeddings=True, needs_base=True),
    Engine(EngineName.MLX, "mlx", None, dora=True),
    Engine(EngineName.DIFFUSERS, "diffusers", None, conv=True, dora=True, one_model=False),
    Engine(EngineName.COMFYUI, "kohya", None, conv=True, one_model=False),
)}
ENGINE_NAMES: tuple[str, ...] = tuple(str(n) for n in ENGINES)
_ALIASES = {"llamacpp": EngineName.LLAMACPP, "llama-cpp": EngineName.LLAMACPP, "mlx": EngineName.MLX,
            "mlxlm": EngineName.MLX, "comfy": EngineName.COMFYUI}


def engine_named(text: str) -> Engine:
    """The engine called ``text`` (case-insensitive; ``llamacpp`` and ``mlx`` are accepted too)."""
    t = str(text).strip().lower()
    name = _ALIASES.get(t) or next((n for n in ENGINES if str(n) == t), None)
    if name is None:
        raise OptionError("engine", f"unknown engine {text!r} (one of {', '.join(ENGINE_NAMES)})")
    return ENGINES[name]


def rank_limit(engine: Engine, max_rank: int | None) -> int | None:
    """R, the largest rank written: ``max_rank``, else the engine's default (vLLM: 16), else None (keep).
    For vLLM, R must be one of its ``max_lora_rank`` values: another value is refused, never rounded (a
    server started with ``--max-lora-rank 16`` refuses rank 20, and rounding down would silently cut more)."""
    if max_rank is not None and max_rank < 1:
        raise OptionError("max_rank", f"--max-rank must be ≥ 1, got {max_rank}")
    r = engine.default_rank if max_rank is None else max_rank
    if engine.ranks is not None and r is not None and r not in engine.ranks:
        raise OptionError("max_rank", f"--max-rank {r}: {engine.name}'s max_lora_rank is one of "
                                      f"{', '.join(map(str, engine.ranks))}")
    return r
