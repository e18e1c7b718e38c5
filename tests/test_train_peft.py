"""PEFT loads what we save, onto the same base, and reproduces our logits."""

from __future__ import annotations

import json

import pytest
import torch

from lora_inspect.formats import load_adapter
from lora_inspect.train import TrainConfig, load_model, run_training
from lora_inspect.train.lora import lora_modules, merge
from lora_inspect.train.model import load_base, logits_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")

peft = pytest.importorskip("peft")




def _train(out, **kw):
    cfg = TrainConfig(steps=12, batch_size=4, eval_every=0, progress=False, lr=1e-2)
    return run_training(out, task="planted", planted_rank=2, seq_len=16, train_cfg=cfg, **kw)


def _deltas(path):
    """{module path: ΔW} through the project's own PEFT reader — the thing under test against PEFT."""
    return {m.name: torch.from_numpy(m.delta()) for m in load_adapter(path).modules}


@pytest.mark.parametrize("rslora,targets", [(False, ["q_proj", "v_proj"]), (True, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])])
def test_peft_reproduces_logits(tmp_path, rslora, targets):
    _train(tmp_path, rank=4, alpha=8, rslora=rslora, targets=targets)
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    # ours: base + ΔW merged
    ours = load_model(tmp_path / "base")
    deltas = _deltas(tmp_path)
    assert all(d.abs().max() > 0 for d in deltas.values())  # the adapter did train
    ours.load_state_dict(merge(ours.state_dict(), deltas))
    # PEFT: the same base, adapter loaded by PEFT itself
    pm = peft.PeftModel.from_pretrained(load_model(tmp_path / "base"), str(tmp_path))
    pm.eval()
    n_lora = sum(1 for n, _ in pm.named_modules() if n.endswith(".lora_A"))
    assert n_lora == len(deltas)
    with torch.no_grad():
        torch.testing.assert_close(pm(ids), ours(ids), rtol=0, atol=1e-5)
        # and against PEFT's own merge
        merged = pm.merge_and_unload()
        torch.testing.assert_close(merged(ids), ours(ids), rtol=0, atol=1e-5)


def test_unmerged_lora_forward_matches_peft(tmp_path):
    """Our LoRALinear forward (not merged) equals PEFT's forward on the same factors."""
    _train(tmp_path, rank=3, alpha=6)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    from safetensors.torch import load_file

    from lora_inspect.train import inject_lora

    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    ours = load_model(tmp_path / "base")
    inject_lora(ours, cfg["target_modules"], r=cfg["r"], alpha=cfg["lora_alpha"])
    for name, m in lora_modules(ours).items():
        m.lora_A.weight.data.copy_(sd[f"base_model.model.{name}.lora_A.weight"])
        m.lora_B.weight.data.copy_(sd[f"base_model.model.{name}.lora_B.weight"])
    pm = peft.PeftModel.from_pretrained(load_model(tmp_path / "base"), str(tmp_path))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(pm(ids), ours(ids), rtol=0, atol=1e-5)


def test_hf_base_directory(tmp_path):
    """A local Hugging Face Llama directory as the base: PEFT (task CAUSAL_LM) agrees with us."""
    transformers = pytest.importorskip("transformers")
    hf_dir = tmp_path / "hf"
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(hf_dir)
    out = tmp_path / "run"
    _train(out, rank=4, model=str(hf_dir))
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert acfg["task_type"] == "CAUSAL_LM"
    assert json.loads((out / "base.json").read_text())["kind"] == "hf"
    base, _ = load_base(hf_dir)
    deltas = _deltas(out)
    base.load_state_dict(merge(base.state_dict(), deltas))
    base2, _ = load_base(hf_dir)
    pm = peft.PeftModel.from_pretrained(base2, str(out)).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(logits_of(pm, ids), logits_of(base.eval(), ids), rtol=0, atol=1e-5)
    from lora_inspect.train.verify import verify

    r = verify(out)
    assert r["results"][0]["loss"] < r["base_loss"]
