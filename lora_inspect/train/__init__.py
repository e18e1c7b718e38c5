"""A compact PyTorch LoRA training core (plain PyTorch; transformers optional).

Read in this order: :mod:`.model` (the base transformer), :mod:`.lora` (the adapter layer, injection,
PEFT-layout save/merge), :mod:`.tasks` (planted-rank distillation, byte-level text), :mod:`.loop`
(the training loop), :mod:`.run` (one run → output directory), :mod:`.verify` (re-evaluation).
"""

from __future__ import annotations

from .loop import TrainConfig, evaluate, train
from .lora import LoRALinear, inject_lora, lora_scale, lora_state_dict, merge, save_adapter, target_matches
from .model import PRESETS, CausalLM, ModelConfig, build_model, load_base, load_model, save_model
from .run import ALL_LINEAR, DEFAULT_TARGETS, run_training
from .tasks import PlantedTask, TextTask

__all__ = [
    "ModelConfig", "CausalLM", "PRESETS", "build_model", "save_model", "load_model", "load_base",
    "LoRALinear", "inject_lora", "lora_scale", "lora_state_dict", "merge", "save_adapter", "target_matches",
    "PlantedTask", "TextTask",
    "TrainConfig", "train", "evaluate",
    "run_training", "DEFAULT_TARGETS", "ALL_LINEAR",
]
