"""vLLM's own loader as the oracle of ``fit --for vllm`` (issue 22).

``WorkerLoRAManager._load_adapter`` runs unmodified: ``PEFTHelper.from_local_dir``, ``validate_legal``
against ``LoRAConfig(max_lora_rank=R)`` and ``LoRAModel.from_local_checkpoint`` (on CPU). Only the GPU model
manager is replaced by a stand-in holding what ``_load_adapter`` reads of it (the supported LoRA modules and
packed-module mapping of vLLM 0.33's ``LlamaForCausalLM``). The ΔW vLLM applies, scaling·lora_b@lora_a, is
compared in float64 with PEFT's merged ΔW of the original cut to rank R (Eckart–Young, torch SVD).

Skipped unless ``vllm`` (0.33, ``pip install --no-deps vllm==0.33.0``) and the pure-Python packages its
loader imports are installed (the ``vllm-oracle`` test extra)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from tests.builders import build_peft, edit_peft_tensors, run_cli


def _vllm():
    try:
        from vllm.config.lora import LoRAConfig
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.request import LoRARequest
        from vllm.lora.worker_manager import WorkerLoRAManager
    except Exception as e:  # noqa: BLE001 - any import failure means: no oracle here
        pytest.skip(f"vLLM's LoRA loader is not importable ({type(e).__name__}: {e}); "
                    "pip install --no-deps vllm==0.33.0 and its pure-Python imports")
    import vllm.lora.lora_model as lora_model

    lora_model.PIN_MEMORY = False  # pinned memory needs an accelerator: the one stand-in beside the manager
    return LoRAConfig, LoRAModel, LoRARequest, WorkerLoRAManager


# vLLM 0.33 model_executor/models/llama.py: packed_modules_mapping and embedding_modules; every Linear suffix
LLAMA_SUPPORTED = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens", "lm_head"]
LLAMA_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def _load(path: Path, max_rank: int):
    LoRAConfig, LoRAModel, LoRARequest, WorkerLoRAManager = _vllm()
    mgr = object.__new__(WorkerLoRAManager)
    mgr._adapter_manager = types.SimpleNamespace(
        supported_lora_modules=LLAMA_SUPPORTED, packed_modules_mapping=LLAMA_PACKED, model=types.SimpleNamespace(),
        moe_ep_load_spec=None, _validate_moe_lora_format=lambda lora: None,
        _validate_classification_head_lora=lambda lora: None)
    cfg = LoRAConfig(max_lora_rank=max_rank)
    cfg.lora_dtype = torch.float32  # what verify_with_model_config resolves "auto" to for an fp32 model
    mgr.lora_config = cfg
    mgr.max_position_embeddings = None
    mgr.vocab_size = 96
    mgr._lora_model_cls = LoRAModel
    return mgr._load_adapter(LoRARequest("fitted", 1, str(path)))


def _best(d: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


@pytest.mark.parametrize("rank", [8, 16])
def test_vllm_loads_the_fit_and_applies_the_optimum(tmp_path, rank):
    _vllm()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    b = build_peft(tmp_path, seed=21, r=32, lora_alpha=64, use_rslora=True, target_modules=targets,
                   rank_pattern={"v_proj": 4})
    with pytest.raises(ValueError, match="greater than max_lora_rank"):
        _load(b.path, rank)  # the original: refused by vLLM itself
    out = tmp_path / "fit"
    assert run_cli("fit", str(b.path), "--for", "vllm", "--max-rank", str(rank), "-o", str(out)).exit_code == 0
    lora = _load(out, rank)
    assert set(lora.loras) == {n.removesuffix(".weight") for n in b.base_state if n.endswith("_proj.weight")}
    for name, w in lora.loras.items():
        applied = w.scaling * (w.lora_b.double() @ w.lora_a.double())
        d = b.delta(name)
        want = _best(d, min(rank, 4 if name.endswith("v_proj") else 32))
        assert float((applied - want).norm() / d.norm()) < 1e-5, name


def test_vllm_refuses_dora_and_loads_the_folded_fit(tmp_path):
    _vllm()
    from tests.builders import tiny_llama

    model = tiny_llama(22)
    base = tmp_path / "base"
    model.save_pretrained(str(base), safe_serialization=True)
    b = build_peft(tmp_path, seed=22, model=model, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="DoRA"):
        _load(b.path, 16)
    out = tmp_path / "fit"
    assert run_cli("fit", str(b.path), "--for", "vllm", "--base", str(base), "-o", str(out)).exit_code == 0
    for name, w in _load(out, 16).loras.items():
        applied = w.scaling * (w.lora_b.double() @ w.lora_a.double())
        d = b.delta(name)
        assert float((applied - _best(d, 16)).norm() / d.norm()) < 1e-5


def test_vllm_refuses_lm_head_in_modules_to_save_and_loads_the_fit(tmp_path):
    _vllm()
    b = build_peft(tmp_path, seed=23, r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    edit_peft_tensors(b.path, lambda sd: sd)
    with pytest.raises(ValueError, match="modules_to_save"):
        _load(b.path, 16)
    out = tmp_path / "fit"
    assert run_cli("fit", str(b.path), "--for", "vllm", "-o", str(out)).exit_code == 0
    assert not _load(out, 16).modules_to_save
