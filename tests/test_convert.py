"""convert: PEFT → X → PEFT round trips, and the real consumers as oracles (PEFT's loader on tiny
Llama / GPT-2 models, mlx-lm's loader, gguf.GGUFReader with llama.cpp's scale and permutation)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lora_inspect.convert.run import convert
from lora_inspect.formats import load_adapter
from tests.builders import build_peft, run_cli, tiny_gpt2, tiny_llama

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _ids(vocab: int = 80) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(5))


def _peft_logits(base, path) -> torch.Tensor:
    from peft import PeftModel

    pm = PeftModel.from_pretrained(base, str(path)).eval()
    with torch.no_grad():
        return pm(_ids()).logits.double()


@pytest.fixture(scope="module")
def llama_rs(tmp_path_factory):
    """Per-module ranks and alphas, rsLoRA: every scale rule at once."""
    tmp = tmp_path_factory.mktemp("llama")
    return build_peft(tmp, arch="llama", seed=3, r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, use_rslora=True,
                      rank_pattern={"q_proj": 6, "model.layers.1.mlp.down_proj": 2}, alpha_pattern={"v_proj": 3})


def _ref_logits(build) -> torch.Tensor:
    build.model.eval()  # GPT-2 has dropout
    with torch.no_grad():
        return build.model(_ids()).logits.double()


@pytest.mark.parametrize("via", ["kohya", "mlx"])
def test_round_trip_through_layout_peft_loader_logits(llama_rs, tmp_path, via):
    mid = tmp_path / ("mid.safetensors" if via == "kohya" else "mid")
    convert(load_adapter(llama_rs.path), mid, via)
    back = tmp_path / "back"
    res = convert(load_adapter(mid), back, "peft")
    assert res.max_check_error < 1e-6
    got = _peft_logits(tiny_llama(3), back)
    ref = _ref_logits(llama_rs)
    assert torch.allclose(got, ref, atol=1e-5, rtol=0), float((got - ref).abs().max())
    src, new = load_adapter(llama_rs.path), load_adapter(back)
    for m in src.modules:  # ΔW per module, float64
        d_new = new.module(m.name).delta()
        assert np.allclose(d_new, m.delta(), atol=1e-6 * float(np.abs(m.delta()).max()))


def test_peft_to_peft_patterns_escaped_full_names(llama_rs, tmp_path):
    out = tmp_path / "p"
    convert(load_adapter(llama_rs.path), out, "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False
    assert all("\\." in k for k in list(cfg["rank_pattern"]) + list(cfg["alpha_pattern"]))
    got = _peft_logits(tiny_llama(3), out)
    assert torch.allclose(got, _ref_logits(llama_rs), atol=1e-5, rtol=0)


def test_gpt2_conv1d_through_kohya(tmp_path):
    b = build_peft(tmp_path, arch="gpt2", seed=1, r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"],
                   fan_in_fan_out=True)
    convert(load_adapter(b.path), tmp_path / "k.safetensors", "kohya")
    convert(load_adapter(tmp_path / "k.safetensors"), tmp_path / "back", "peft")
    cfg = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is False  # kohya does not know it: the user is told by the loader, see below
    # kohya carries no fan_in_fan_out: ΔW is in (out, in) orientation; PEFT on GPT-2 needs the flag set
    cfg["fan_in_fan_out"] = True
    (tmp_path / "back" / "adapter_config.json").write_text(json.dumps(cfg))
    got = _peft_logits(tiny_gpt2(1), tmp_path / "back")
    ref = _ref_logits(b)
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)


def test_gpt2_peft_to_peft_keeps_fan_in_fan_out(tmp_path):
    b = build_peft(tmp_path, arch="gpt2", seed=2, r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    convert(load_adapter(b.path), tmp_path / "p", "peft")
    got = _peft_logits(tiny_gpt2(2), tmp_path / "p")
    ref = _ref_logits(b)
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute, written out independently."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_gguf_names_metadata_and_llamacpp_delta(llama_rs, tmp_path):
    gguf = pytest.importorskip("gguf")
    base = tmp_path / "base"
    tiny_llama(3).config.save_pretrained(base)
    out = tmp_path / "lora.gguf"
    res = run_cli("convert", llama_rs.path, "--to", "gguf", "-o", out, "--base", base, "--dtype", "fp32", "--json")
    assert res.exit_code == 0, res.output
    r = gguf.GGUFReader(str(out))
    f = {k: v.contents() for k, v in r.fields.items()}
    assert (f["general.architecture"], f["general.type"], f["adapter.type"]) == ("llama", "adapter", "lora")
    alpha = float(f["adapter.lora.alpha"])
    t = {x.name: x.data.astype(np.float64) for x in r.tensors}
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    assert len(t) == 2 * 2 * len(names)
    for layer in range(2):
        for hf, gg in names.items():
            a, b = t[f"blk.{layer}.{gg}.weight.lora_a"], t[f"blk.{layer}.{gg}.weight.lora_b"]
            assert a.shape[0] == b.shape[1]
            applied = alpha / b.shape[1] * (b @ a)  # llama-adapter.h: scale = alpha / rank(lora_b)
            mod = ("self_attn." if hf in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp.") + hf
            want = llama_rs.delta(f"model.layers.{layer}.{mod}").numpy()
            if hf == "q_proj":
                want = _llama_permute(want, 4)
            elif hf == "k_proj":
                want = _llama_permute(want, 2)
            np.testing.assert_allclose(applied, want, atol=1e-5 * np.abs(want).max())


def test_mlx_loader_fused_weights(llama_rs, tmp_path):
    pytest.importorskip("mlx_lm")
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from mlx_lm.tuner.utils import load_adapters

    out = tmp_path / "mlx"
    convert(load_adapter(llama_rs.path), out, "mlx")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["lora_parameters"]["rank"] == 6  # zero-padded to the largest rank
    args = llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=56,
                           num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=96, num_key_value_heads=2,
                           tie_word_embeddings=False)
    model = llama.Model(args)
    base = {k: np.array(v.astype(mx.float32)).astype(np.float64) for k, v in tree_flatten(model.parameters())}
    load_adapters(model, str(out))
    fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "lora_a") and hasattr(m, "fuse")]
    assert len(fused) == 2 * len(LLAMA_TARGETS)
    for name, lin in fused:
        d = np.array(lin.weight.astype(mx.float32)).astype(np.float64) - base[name + ".weight"]
        want = llama_rs.delta(name).numpy()
        np.testing.assert_allclose(d, want, atol=2e-6 * np.abs(want).max() + 1e-6)


def test_dora_to_mlx_fuses_like_peft(tmp_path):
    """PEFT DoRA → mlx-lm ``fine_tune_type: dora``: mlx-lm's DoRALinear.fuse on the same base weights gives
    PEFT's merged weights."""
    pytest.importorskip("mlx_lm")
    import mlx.core as mx
    from mlx_lm.models import llama
    from mlx_lm.tuner.utils import load_adapters

    dora = build_peft(tmp_path, arch="llama", seed=6, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      use_dora=True, rank_pattern={"v_proj": 2})
    out = tmp_path / "mlx"
    res = convert(load_adapter(dora.path), out, "mlx", dtype="fp32")
    assert json.loads((out / "adapter_config.json").read_text())["fine_tune_type"] == "dora"
    assert res.max_check_error < 1e-6
    args = llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=56,
                           num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=96, num_key_value_heads=2,
                           tie_word_embeddings=False)
    model = llama.Model(args)
    model.load_weights([(k, mx.array(v.float().numpy())) for k, v in dora.base_state.items()], strict=False)
    load_adapters(model, str(out))
    fused = {n: m.fuse() for n, m in model.named_modules() if hasattr(m, "m") and hasattr(m, "fuse")}
    assert len(fused) == 4
    for name, lin in fused.items():
        got = np.array(lin.weight.astype(mx.float32)).astype(np.float64)
        want = dora.merged_state[name + ".weight"].numpy()
        np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())
    # poisoned control: the same file read as plain LoRA is not PEFT's DoRA weight
    plain = dora.base_state["model.layers.0.self_attn.q_proj.weight"] + torch.from_numpy(load_adapter(out).module(
        "model.layers.0.self_attn.q_proj").delta())
    assert float((plain - dora.merged_state["model.layers.0.self_attn.q_proj.weight"]).abs().max()) > 1e-3


def test_refusals_one_line(tmp_path):
    dora = build_peft(tmp_path, arch="llama", seed=4, r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    base = tmp_path / "base"
    tiny_llama(4).config.save_pretrained(base)
    res = run_cli("convert", dora.path, "--to", "gguf", "-o", tmp_path / "x.gguf", "--base", base)
    assert res.exit_code == 2 and "DoRA" in res.stderr and "q_proj" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = run_cli("convert", dora.path, "--to", "kohya", "-o", tmp_path / "k.safetensors")
    assert res.exit_code == 2 and "DoRA" in res.stderr
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "k.safetensors").exists()
    # DoRA to PEFT and diffusers-style PEFT keeps the magnitudes: same logits
    convert(load_adapter(dora.path), tmp_path / "p", "peft")
    got = _peft_logits(tiny_llama(4), tmp_path / "p")
    ref = _ref_logits(dora)
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)


def test_conv_to_mlx_refused_and_kohya_diffusers_round_trip(tmp_path):
    from tests.builders import write_kohya

    g = torch.Generator().manual_seed(0)
    mods = {
        "lora_unet_down_blocks_0_resnets_0_conv1": (torch.randn(4, 8, 3, 3, generator=g), torch.randn(16, 4, 1, 1, generator=g), 2.0),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g), 8.0),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g), None),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1": (torch.randn(2, 32, generator=g), torch.randn(64, 2, generator=g), 1.0),
    }
    src = write_kohya(tmp_path / "k.safetensors", mods)
    res = run_cli("convert", src, "--to", "mlx", "-o", tmp_path / "m")
    assert res.exit_code == 2 and "pipeline" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    conv = write_kohya(tmp_path / "conv.safetensors", {k: v for k, v in mods.items() if k.endswith("conv1")})
    res = run_cli("convert", conv, "--to", "mlx", "-o", tmp_path / "m")
    assert res.exit_code == 2 and "conv1" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()
    d = convert(load_adapter(src), tmp_path / "d.safetensors", "diffusers")
    names = {m.target for m in d.modules}
    assert "unet.down_blocks.0.resnets.0.conv1" in names
    assert "text_encoder_2.text_model.encoder.layers.0.mlp.fc1" in names
    k2 = convert(load_adapter(tmp_path / "d.safetensors"), tmp_path / "k2.safetensors", "kohya")
    # an SDXL pipeline (two text encoders): the UNet gets SGM names, as sd-scripts writes them (test_convert_sd.py)
    sgm = {"lora_unet_down_blocks_0_resnets_0_conv1": "lora_unet_input_blocks_1_0_in_layers_2",
           "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
           "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"}
    assert {m.target for m in k2.modules} == {sgm.get(k, k) for k in mods}
    a, b = load_adapter(src), load_adapter(tmp_path / "k2.safetensors")
    for m in a.modules:
        assert np.allclose(b.module(sgm.get(m.name, m.name)).delta(), m.delta(), atol=1e-5)


def test_convert_json_and_existing_output(llama_rs, tmp_path):
    out = tmp_path / "k.safetensors"
    res = run_cli("convert", llama_rs.path, "--to", "kohya", "-o", out, "--json")
    assert res.exit_code == 0
    doc = json.loads(res.stdout)
    assert doc["schema"] == "lora-inspect/convert/1" and doc["self_check"]["passed"]
    assert len(doc["modules"]) == 14
    res = run_cli("convert", llama_rs.path, "--to", "kohya", "-o", out)
    assert res.exit_code == 2 and "exists" in res.stderr


@pytest.mark.slow
def test_diffusers_loader_applies_our_diffusers_file(tmp_path):
    """kohya (linear, 1×1 and 3×3 conv) → our diffusers file → diffusers' own loader on a tiny UNet built from a
    config: the fused weights change by exactly kohya's (α/r)·up@down."""
    diffusers = pytest.importorskip("diffusers")
    from tests.builders import kohya_delta, write_kohya

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    base = {k: v.double().clone() for k, v in unet.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    mods = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g), 2.0),
        "down_blocks.0.attentions.0.proj_in": (torch.randn(4, 32, 1, 1, generator=g), torch.randn(32, 4, 1, 1, generator=g), 8.0),
        "down_blocks.0.resnets.0.conv1": (torch.randn(4, 32, 3, 3, generator=g), torch.randn(32, 4, 1, 1, generator=g), 1.0),
    }
    src = write_kohya(tmp_path / "k.safetensors", {"lora_unet_" + k.replace(".", "_"): v for k, v in mods.items()})
    convert(load_adapter(src), tmp_path / "d.safetensors", "diffusers")
    sd, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(tmp_path / "d.safetensors"))
    diffusers.StableDiffusionPipeline.load_lora_into_unet(sd, alphas, unet, adapter_name="x")
    unet.fuse_lora()
    unet.unload_lora()
    st = unet.state_dict()
    for path, (down, up, alpha) in mods.items():
        key = path + ".weight"
        d = (st[key].double() - base[key]).reshape(st[key].shape[0], -1)
        want = kohya_delta(down, up, alpha)
        assert float((d - want).abs().max() / want.abs().max()) < 1e-6, path


def _as_bf16(src, dst):
    """A copy of a PEFT adapter with its factors stored as bf16 (rounded by torch)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    w = str(dst / "adapter_model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(w).items()}, w)
    return dst


def test_bf16_source_bits_kept_and_checked_as_before(llama_rs, tmp_path):
    """A bf16 adapter read natively: bf16 → bf16 copies the bits (each module checked ``identical``); bf16 → fp32
    widens exactly (a dtype change is ``sketched``, as under torch, with no error but the α's); bf16 → fp16 rounds like torch."""
    from safetensors.torch import load_file

    src = _as_bf16(llama_rs.path, tmp_path / "bf16")
    want = {k.replace("base_model.model.", "").replace(".weight", ""): v
            for k, v in load_file(str(src / "adapter_model.safetensors")).items()}
    for dtype, check in (("bf16", "identical"), ("fp32", "sketched"), ("fp16", "sketched")):
        out = tmp_path / f"k-{dtype}.safetensors"
        res = convert(load_adapter(src), out, "kohya", dtype=dtype)
        assert {m.check for m in res.modules} == {check}, dtype
        if dtype != "fp16":  # only the fp32 α's rounding (rsLoRA's α·√r)
            assert res.max_check_error <= 2.0**-22, dtype
        got = load_file(str(out))
        names = {m.source: m.target for m in res.modules}
        for name, target in names.items():
            for mine, theirs in (("lora_A", "lora_down"), ("lora_B", "lora_up")):
                stored = got[f"{target}.{theirs}.weight"]
                ref = want[f"{name}.{mine}"]
                expect = {"bf16": ref, "fp32": ref.float(), "fp16": ref.to(torch.float16)}[dtype]
                assert stored.dtype == expect.dtype and torch.equal(stored, expect), (dtype, name, mine)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_gguf_16_bit_is_the_fp32_file_rounded_like_torch(llama_rs, tmp_path, dtype):
    """GGUF BF16/F16 tensors read back as the fp32 file's rounded by torch, bit for bit (no llama.cpp needed)."""
    pytest.importorskip("gguf")
    from lora_inspect.convert.gguf_out import read_gguf

    base = tmp_path / "base"
    tiny_llama(3).config.save_pretrained(base)
    files = {}
    for dt in ("fp32", dtype):
        files[dt] = tmp_path / f"lora-{dt}.gguf"
        res = run_cli("convert", llama_rs.path, "--to", "gguf", "-o", files[dt], "--base", base, "--dtype", dt)
        assert res.exit_code == 0, res.output
    torch_dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    want = {k: torch.from_numpy(np.array(t)).to(torch_dt).float() for k, t in read_gguf(files["fp32"])[1].items()}
    got = read_gguf(files[dtype])[1]
    assert set(got) == set(want) and want
    for k, w in want.items():
        assert torch.equal(torch.from_numpy(np.array(got[k], dtype=np.float32)), w), k
