"""peft_rules against PEFT itself, and files.write_safetensors (the writer `train` can call)."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file

from lora_inspect.peft_rules import PEFT_DEFAULT_ALPHA, pattern_lookup, scale_for, strip_prefix, target_matches

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "q_proj", "xq_proj",
         "model.embed_tokens", "lm_head", "model.layers.10.self_attn.o_proj"]


@pytest.mark.parametrize("targets", [["q_proj"], ["q_proj", "down_proj"], ["self_attn.q_proj"], ["lm_head"],
                                     "lm_head", "q_proj", "model.embed_tokens"])
@pytest.mark.parametrize("name", NAMES)
def test_target_matches_is_peft_rule(targets, name):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    cfg = LoraConfig(target_modules=targets)
    assert target_matches(name, targets) == bool(check_target_module_exists(cfg, name))


def test_target_none_matches_nothing():
    assert not any(target_matches(n, None) for n in NAMES)


def test_scale_and_defaults_are_peft():
    from peft import LoraConfig

    assert LoraConfig().lora_alpha == PEFT_DEFAULT_ALPHA
    assert scale_for(16, 4) == 4.0 and scale_for(16, 4, rslora=True) == 8.0 and scale_for(8, 0) == 0.0
    assert strip_prefix("base_model.model.model.layers.0.q_proj") == "model.layers.0.q_proj"
    assert strip_prefix("lora_unet_x") == "lora_unet_x"


def test_pattern_lookup_plain_keys_first_match_wins():
    pattern = {"q_proj": 2, "self_attn.q_proj": 3}
    assert pattern_lookup(pattern, "model.layers.0.self_attn.q_proj", 1) == 2
    assert pattern_lookup(pattern, "model.layers.0.self_attn.xq_proj", 1) == 1


def test_write_safetensors_deterministic_and_readable(tmp_path):
    from lora_inspect.files import write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(3, i + 1, generator=g).to(dt) for i, dt in
               enumerate([torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64])}
    meta = {f"k{i}": str(i) for i in range(8)}
    items = list(tensors.items())
    random.Random(1).shuffle(items)
    n1 = write_safetensors(tmp_path / "a.safetensors", tensors, meta)
    n2 = write_safetensors(tmp_path / "b.safetensors", dict(items), dict(reversed(list(meta.items()))))
    a, b = (tmp_path / "a.safetensors").read_bytes(), (tmp_path / "b.safetensors").read_bytes()
    assert a == b and n1 == n2 == len(a)
    back = load_file(str(tmp_path / "a.safetensors"))
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t)


@pytest.mark.parametrize("orient, a_shape, b_shape, want", [
    ("PEFT", (3, 5), (7, 3), (7, 5, 3, "linear", None)),
    ("PEFT", (3, 5, 2, 2), (7, 3, 1, 1), (7, 20, 3, "conv", (2, 2))),
    ("EMBEDDING", (3, 11), (6, 3), (11, 6, 3, "embedding", None)),
    ("MLX", (5, 3), (3, 7), (7, 5, 3, "linear", None)),
])
def test_orientation_round_trip(orient, a_shape, b_shape, want):
    """shapes() agrees with to_linear(), and to_stored() inverts it (the product B@A is ΔW (out, in))."""
    from lora_inspect import orientation

    o = getattr(orientation, orient)
    sh = o.shapes("m", a_shape, b_shape)
    assert (sh.out, sh.inp, sh.rank_a, sh.kind, sh.kernel) == want and sh.rank_a == sh.rank_b
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(a_shape, generator=g), torch.randn(b_shape, generator=g)
    b_lin, a_lin = o.to_linear(a, b)
    assert (b_lin @ a_lin).shape == (sh.out, sh.inp)
    a_back, b_back = o.to_stored(b_lin, a_lin, a_shape, b_shape)
    assert torch.equal(a_back, a) and torch.equal(b_back, b)
