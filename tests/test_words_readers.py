"""Counts in words (issues 18/19), continued: the messages of merge, of ``rank --module`` and of the LyCORIS
and GGUF readers agree with their count — each driven with a count of 1 and of 2 (tests/test_words.py
has the rest)."""

from __future__ import annotations

import pytest
import torch
from builders import write_kohya

from lora_inspect import load_adapter
from lora_inspect.errors import InspectError
from lora_inspect.units import plural

ONE_TWO = pytest.mark.parametrize("n", [1, 2])


@ONE_TWO
def test_merge_weight_count(n):
    from lora_inspect.convert.merge import _parse_weights

    with pytest.raises(InspectError, match=f"^--weights has {plural(n, 'weight')} for {plural(3 - n, 'adapter')}: give one per adapter"):
        _parse_weights([1.0] * n, 3 - n)


@ONE_TWO
def test_a_module_pattern_that_matches_nothing(tmp_path, n):
    from lora_inspect.analysis import analyse

    g = torch.Generator().manual_seed(0)
    mods = {f"lora_te_text_model_encoder_layers_{i}_mlp_fc1": (torch.randn(2, 6, generator=g),
                                                              torch.randn(8, 2, generator=g), 2.0) for i in range(n)}
    ad = load_adapter(write_kohya(tmp_path / "k.safetensors", mods))
    with pytest.raises(InspectError, match=f"matches none of the adapter's {plural(n, 'module')}$"):
        analyse(ad, module_regex="nothing_like_it")


@ONE_TWO
def test_lycoris_notes_on_modules_not_analysed(n):
    from lora_inspect.formats.lycoris import _note_unread

    glora, norm, other = _note_unread({"glora": [n, 52], "norm": [n, 16], "xyz": [n, 4]})
    assert glora.startswith(f"{plural(n, 'GLoRA module')} (52 parameters): {'its' if n == 1 else 'their'} ΔW depends")
    assert norm.startswith(f"{plural(n, 'Norm module')} (w_norm/b_norm, 16 parameters)")
    assert other.startswith(f"{plural(n, 'module')} with xyz keys (4 parameters)")


@ONE_TWO
def test_gguf_norm_tensors_note(n):
    from lora_inspect.formats.gguf_read import _notes

    extras = [f"blk.{i}.attn_norm.weight" for i in range(n)]
    assert f"{plural(n, 'norm tensor')} (blk.0.attn_norm.weight …): llama.cpp skips {'it' if n == 1 else 'them'}" \
        in _notes("gpt2", 1.0, [], {}, extras)
