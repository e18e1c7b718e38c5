"""The LoRA layer: forward equals the merged weight, only adapter params train, PEFT matching, layout."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from lora_inspect.errors import InspectError
from lora_inspect.formats import load_adapter
from lora_inspect.train import LoRALinear, build_model, inject_lora, lora_scale, merge, save_adapter, target_matches
from lora_inspect.train.lora import adapter_config, lora_modules, lora_state_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")




@pytest.mark.parametrize("rslora", [False, True])
def test_forward_equals_merged_weight(rslora):
    torch.manual_seed(0)
    lin = nn.Linear(24, 40, bias=True, dtype=torch.float64)
    lo = LoRALinear(lin, r=6, alpha=12.0, rslora=rslora)
    nn.init.normal_(lo.lora_B.weight)
    assert lo.scale == pytest.approx(12.0 / math.sqrt(6) if rslora else 2.0)
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    merged = nn.functional.linear(x, lin.weight + lo.scale * lo.lora_B.weight @ lo.lora_A.weight, lin.bias)
    torch.testing.assert_close(lo(x), merged, rtol=0, atol=1e-12)
    torch.testing.assert_close(lo.delta(), lo.scale * lo.lora_B.weight @ lo.lora_A.weight)


def test_init_like_peft():
    torch.manual_seed(0)
    lo = LoRALinear(nn.Linear(100, 30), r=8, alpha=8)
    assert torch.count_nonzero(lo.lora_B.weight) == 0
    bound = 1 / math.sqrt(100)  # kaiming_uniform(a=√5) on fan_in 100
    assert lo.lora_A.weight.abs().max() <= bound
    assert lo.lora_A.weight.abs().max() > 0.9 * bound
    x = torch.randn(2, 100)
    torch.testing.assert_close(lo(x), lo.base(x))  # ΔW = 0 at step 0


def test_only_adapter_parameters_receive_gradients():
    torch.manual_seed(0)
    model = build_model("tiny", seed=0)
    names = inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    assert len(names) == 2 * model.config.n_layers
    for m in lora_modules(model).values():
        nn.init.normal_(m.lora_B.weight, std=0.01)  # so that A gets a gradient too
    ids = torch.randint(0, 256, (2, 16))
    model(ids).logsumexp(-1).mean().backward()
    for n, p in model.named_parameters():
        is_lora = ".lora_A." in n or ".lora_B." in n
        assert p.requires_grad == is_lora, n
        if is_lora:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_target_matching_is_peft_rule():
    assert target_matches("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert target_matches("q_proj", ["q_proj"])
    assert not target_matches("model.layers.0.self_attn.xq_proj", ["q_proj"])
    assert target_matches("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"])
    assert not target_matches("model.layers.0.self_attn.q_proj", r"q_proj")  # regex must match the whole path
    assert target_matches("model.layers.1.self_attn.q_proj", r".*layers\.1\..*q_proj")
    model = build_model("tiny", seed=0)
    names = inject_lora(model, r".*\.1\.mlp\.(up|down)_proj", r=2, alpha=2)
    assert names == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(InspectError, match="no nn.Linear"):
        inject_lora(build_model("tiny"), ["nope"], r=2, alpha=2)


def test_merge_and_errors():
    model = build_model("tiny", seed=0)
    sd = model.state_dict()
    d = torch.randn(64, 64, dtype=torch.float64)
    out = merge(sd, {"model.layers.0.self_attn.q_proj": d})
    torch.testing.assert_close(out["model.layers.0.self_attn.q_proj.weight"], (sd["model.layers.0.self_attn.q_proj.weight"].double() + d).float())
    assert out["model.layers.1.self_attn.q_proj.weight"] is sd["model.layers.1.self_attn.q_proj.weight"]
    with pytest.raises(InspectError, match="not a module"):
        merge(sd, {"model.layers.9.self_attn.q_proj": d})
    with pytest.raises(InspectError, match="shape"):
        merge(sd, {"model.layers.0.mlp.up_proj": d})
    with pytest.raises(InspectError):
        lora_scale(0, 1.0)


def test_saved_layout_is_peft(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny", seed=0)
    inject_lora(model, ["q_proj", "down_proj"], r=4, alpha=16, rslora=True)
    cfg = adapter_config(r=4, alpha=16, targets=["q_proj", "down_proj"], rslora=True)
    save_adapter(model, tmp_path, cfg)
    raw = (tmp_path / "adapter_config.json").read_text()
    js = json.loads(raw)
    assert list(js) == sorted(js)
    assert js["peft_type"] == "LORA" and js["r"] == 4 and js["lora_alpha"] == 16 and js["use_rslora"] is True
    assert js["target_modules"] == ["down_proj", "q_proj"] and js["task_type"] is None and js["bias"] == "none"
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        assert f.get_tensor("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight").shape == (4, 176)
        assert f.get_tensor("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight").shape == (64, 4)
    assert keys == set(lora_state_dict(model))
    assert len(keys) == 2 * 2 * model.config.n_layers
    ad = load_adapter(tmp_path)  # the project's reader sees every module with the saved scale α/√r
    assert {m.name for m in ad.modules} == set(lora_modules(model))
    assert all(m.scale == pytest.approx(16 / 2) for m in ad.modules)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_training_targets_are_computed_outside_autocast(monkeypatch):
    """The planted teacher is the reference: under (CUDA) bf16 autocast the training targets were
    computed in bf16 while evaluation computed them in float32. Simulated here with CPU autocast."""
    from lora_inspect.train import loop
    from lora_inspect.train.loop import TrainConfig, train
    from lora_inspect.train.tasks import PlantedTask

    model = build_model("tiny", seed=0)
    task = PlantedTask(model, ["q_proj"], 2, seq_len=8, n_heldout=4)
    inject_lora(model, ["q_proj"], r=2, alpha=2)
    seen = []
    real = task.targets

    def spy(b):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(b)

    monkeypatch.setattr(task, "targets", spy)
    monkeypatch.setattr(loop, "_autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    train(model, task, TrainConfig(steps=2, batch_size=2, eval_every=0, progress=False, device="cpu"))
    assert seen and not any(seen)
