"""A compact PyTorch LoRA training core (plain PyTorch; transformers optional).

Read in this order: :mod:`.model` (the base transformer), :mod:`.lora` (the adapter layer, injection,
PEFT-layout save/merge), :mod:`.tasks` (planted-rank distillation, byte-level text), :mod:`.loop`
(the training loop), :mod:`.run` (one run → output directory), :mod:`.verify` (re-evaluation).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# name → submodule; imported on first use, so that ``lora-inspect train --help`` needs no torch
_HOMES = {
    "TrainConfig": "loop", "train": "loop", "evaluate": "loop",
    "LoRALinear": "lora", "inject_lora": "lora", "lora_scale": "lora", "lora_state_dict": "lora", "merge": "lora",
    "save_adapter": "lora", "target_matches": "lora",
    "PRESETS": "model", "CausalLM": "model", "ModelConfig": "model", "build_model": "model", "load_base": "model",
    "load_model": "model", "save_model": "model",
    "ALL_LINEAR": "run", "DEFAULT_TARGETS": "run", "run_training": "run",
    "PlantedTask": "tasks", "TextTask": "tasks",
}

__all__ = [
    "ModelConfig", "CausalLM", "PRESETS", "build_model", "save_model", "load_model", "load_base",
    "LoRALinear", "inject_lora", "lora_scale", "lora_state_dict", "merge", "save_adapter", "target_matches",
    "PlantedTask", "TextTask",
    "TrainConfig", "train", "evaluate",
    "run_training", "DEFAULT_TARGETS", "ALL_LINEAR",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'lora_inspect.train' has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
