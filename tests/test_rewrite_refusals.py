"""``rescale`` and calibrated ``truncate`` refuse what the layout they write cannot hold, as ``truncate`` does
(:func:`lora_inspect.formats.refuse_inexpressible`): one line, exit 2, nothing written — and calibrated
truncation refuses before it loads the base model or reads the calibration data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from builders import run_cli, write_mlx
from safetensors.torch import load_file, save_file

from lora_inspect import load_adapter
from lora_inspect.errors import InspectError
from lora_inspect.rewrite import TruncateSpec
from lora_inspect.rewrite.calibrate import calibrated_truncate

PEFT = "base_model.model."
PROC = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor."


def _one_line_refusal(res, *words: str) -> None:
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), res.stderr


@pytest.fixture
def peft_dora_embedding(tmp_path) -> Path:
    """PEFT DoRA with a DoRA embedding: PEFT reads it, but the PEFT layout does not write DoRA on an embedding."""
    g = torch.Generator().manual_seed(0)
    d = tmp_path / "dora"
    d.mkdir()
    save_file({
        f"{PEFT}model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 16, generator=g),
        f"{PEFT}model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(16, 4, generator=g),
        f"{PEFT}model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.rand(16, generator=g) + 1,
        f"{PEFT}model.embed_tokens.lora_embedding_A": torch.randn(4, 32, generator=g),
        f"{PEFT}model.embed_tokens.lora_embedding_B": torch.randn(16, 4, generator=g),
        f"{PEFT}model.embed_tokens.lora_magnitude_vector": torch.rand(16, generator=g) + 1,
    }, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True,
                                                       "target_modules": ["q_proj", "embed_tokens"]}))
    return d


@pytest.fixture
def mlx_partial_dora(tmp_path) -> Path:
    """mlx-lm with fine_tune_type dora but a magnitude on one module only: mlx-lm's DoRA covers every layer."""
    g = torch.Generator().manual_seed(0)
    d = write_mlx(tmp_path / "mlx", {f"model.layers.{i}.self_attn.q_proj": (torch.randn(8, 2, generator=g),
                                                                          torch.randn(2, 6, generator=g))
                                     for i in range(2)})
    sd = load_file(str(d / "adapters.safetensors"))
    sd["model.layers.0.self_attn.q_proj.m"] = torch.rand(8, generator=g) + 1
    save_file(sd, str(d / "adapters.safetensors"))
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "fine_tune_type": "dora"}))
    return d


@pytest.fixture
def attn_procs_conv(tmp_path) -> Path:
    """A diffusers attention-processor file with a conv factor: read, but the layout holds no conv LoRA."""
    g = torch.Generator().manual_seed(0)
    f = tmp_path / "procs.safetensors"
    save_file({f"{PROC}to_q_lora.down.weight": torch.randn(2, 8, generator=g),
               f"{PROC}to_q_lora.up.weight": torch.randn(8, 2, generator=g),
               f"{PROC}to_k_lora.down.weight": torch.randn(2, 4, 3, 3, generator=g),
               f"{PROC}to_k_lora.up.weight": torch.randn(8, 2, 1, 1, generator=g)}, str(f))
    return f


@pytest.mark.parametrize("how", [["--factor", "0.5"], ["--factor", "0.5", "--bake"]])
def test_rescale_refuses_dora_on_an_embedding_and_writes_nothing(peft_dora_embedding, tmp_path, how):
    out = tmp_path / "out"
    _one_line_refusal(run_cli("rescale", peft_dora_embedding, "-o", out, *how), "model.embed_tokens",
                      "DoRA on an embedding")
    assert not out.exists() and list(tmp_path.iterdir()) == [peft_dora_embedding]
    # the same refusal, the same words, as truncate
    _one_line_refusal(run_cli("truncate", peft_dora_embedding, "--rank", "2", "-o", out), "DoRA on an embedding")


def test_rescale_refuses_partial_dora_in_mlx_and_writes_nothing(mlx_partial_dora, tmp_path):
    out = tmp_path / "out"
    _one_line_refusal(run_cli("rescale", mlx_partial_dora, "--factor", "2", "-o", out),
                      "model.layers.1.self_attn.q_proj", "mlx-lm cannot hold it", "no DoRA magnitude")
    assert not out.exists()


def test_calibrated_truncation_refuses_conv_in_attention_processors_and_writes_nothing(attn_procs_conv, tmp_path):
    ad = load_adapter(attn_procs_conv)
    moments = {m.name: torch.eye(m.shape[1], dtype=torch.float64) for m in ad.modules}
    out = tmp_path / "out.safetensors"
    with pytest.raises(InspectError, match=r"attn1\.to_k': diffusers-attn-procs cannot hold it: conv LoRA$"):
        calibrated_truncate(ad, out, TruncateSpec(rank=1), moments)
    assert not out.exists() and sorted(tmp_path.iterdir()) == [attn_procs_conv]


def _base_that_must_not_load(tmp_path: Path, monkeypatch) -> Path:
    """A Llama base folder whose loading fails the test, and a calibration text beside it (cal.txt)."""
    import lora_inspect.hf.model as hf_model

    def never(*args, **kwargs):
        raise AssertionError("the base was loaded before the refusal")

    monkeypatch.setattr(hf_model, "load_hf", never)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "cal.txt").write_text("some calibration text")
    return base


def test_truncate_calibrate_refuses_before_loading_the_base(attn_procs_conv, tmp_path, monkeypatch):
    base = _base_that_must_not_load(tmp_path, monkeypatch)
    out = tmp_path / "out.safetensors"
    res = run_cli("truncate", attn_procs_conv, "--rank", "1", "-o", out, "--calibrate", tmp_path / "cal.txt",
                  "--base", base)
    _one_line_refusal(res, "diffusers-attn-procs cannot hold it: conv LoRA")
    assert not out.exists()


def test_truncate_calibrate_refuses_an_existing_out_before_loading_the_base(tmp_path, monkeypatch):
    """Without --force an existing OUT is refused before the model is loaded and the text is read."""
    base = _base_that_must_not_load(tmp_path, monkeypatch)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    planted = Path(__file__).resolve().parents[1] / "samples" / "planted"
    res = run_cli("truncate", planted, "--rank", "1", "-o", out, "--calibrate", tmp_path / "cal.txt", "--base", base)
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "--force" in res.stderr and "base was loaded" not in res.stderr, res.stderr
    assert (out / "keep.txt").read_text() == "mine"
