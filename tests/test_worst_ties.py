"""The worst module of a truncation or a merge is chosen by :func:`lora_inspect.ties.extreme_module`: values
within ``TIE_RTOL`` of the largest error tie and go to the lowest layer, then the name — never to the last
bits of the floats (which other BLAS kernels change) nor to the largest name."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from builders import run_cli, write_kohya

from lora_inspect.convert.results import MergeModule, MergeResult
from lora_inspect.kinds import Kind
from lora_inspect.views.algebra import merge_view
from lora_inspect.views.rewrite import worst_change

LOW, HIGH = "model.layers.2.self_attn.q_proj", "model.layers.10.self_attn.q_proj"


@pytest.mark.parametrize("noise", [0.0, 1e-15, -1e-15])
def test_a_near_tie_goes_to_the_lowest_layer(noise):
    changes = [SimpleNamespace(name=HIGH, relative_error=0.25 + noise), SimpleNamespace(name=LOW, relative_error=0.25)]
    assert worst_change(changes).name == LOW
    assert worst_change(changes[::-1]).name == LOW


def test_a_real_difference_still_wins():
    changes = [SimpleNamespace(name=HIGH, relative_error=0.25 + 1e-6), SimpleNamespace(name=LOW, relative_error=0.25)]
    assert worst_change(changes).name == HIGH
    assert worst_change([]) is None


def _merge_result(errors: dict[str, float]) -> MergeResult:
    mods = [MergeModule(name=n, kind=Kind.LINEAR, shape=(8, 8), inputs=[2, 2], rank_concat=4, numerical_rank=2,
                        rank_out=2, retained_energy=1.0, relative_error=e, sigma1=1.0) for n, e in errors.items()]
    return MergeResult(inputs=[Path("a"), Path("b")], input_formats=[], weights=[1.0, 1.0], mode="exact",
                       output=Path("out"), target="peft", dtype="fp32", modules=mods, written=[], output_bytes=0,
                       notes=[], max_check_error=0.0, max_check_ratio=0.0)


@pytest.mark.parametrize("noise", [1e-33, 1e-16])
def test_merge_names_the_lowest_layer_among_rounding_level_errors(noise):
    """An exact merge's relative errors are rounding noise (~1e-33 .. 1e-16): the worst module named is the
    lowest layer's, whichever noise happens to be largest."""
    view = merge_view(_merge_result({HIGH: 2 * noise, LOW: noise}))
    assert any(line.startswith(f"worst module: {LOW} ") for line in view.footer), view.footer


def test_truncate_names_the_lowest_layer_when_every_error_is_zero(tmp_path):
    """Every module already fits the rank: every error is 0.0, and the first module in layer order is named
    (the old rule, the largest name, gave layers_2 here)."""
    g = torch.Generator().manual_seed(0)
    mods = {f"lora_te_text_model_encoder_layers_{i}_mlp_fc1": (torch.randn(2, 6, generator=g),
                                                              torch.randn(8, 2, generator=g), 2.0) for i in (10, 2, 1)}
    src = write_kohya(tmp_path / "k.safetensors", mods)
    res = run_cli("truncate", src, "--rank", "2", "-o", tmp_path / "t.safetensors", "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    first = "lora_te_text_model_encoder_layers_1_mlp_fc1"
    assert doc["worst_module"]["name"] == first and doc["total"]["worst_module"] == first
    assert {g["worst_module"] for g in doc["by_type"].values()} == {first}
