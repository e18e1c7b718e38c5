"""Conv kernels are part of the model (docs/formats.md, "Conv kernels"; lora_inspect/kernels.py): flattened
LyCORIS/PEFT LoHa and LoKr convs recover their kernel from their UNet names or from ``--base``, or say it is
unknown (``conv?``); truncate, convert and merge write a known kernel 4-D; merge adds a conv's flattened and
4-D forms. LoHa/LoKr/LoCon files are built by lycoris-lora (its ``forward`` is the ΔW oracle) and renamed to
kohya UNet names; the other cases are hand-built. Rewrites are written in float32 (the default for a float64
source), hence 1e-6 relative."""

from __future__ import annotations

import json

import pytest
import torch
from builders import run_cli
from safetensors.torch import load_file, save_file

from lora_inspect.arrays import to_torch
from lora_inspect.formats import load_adapter
from lora_inspect.kernels import named_kernel

pytest.importorskip("lycoris")
from lycoris_oracle import Tiny, forward_delta, make_network  # noqa: E402

G = torch.Generator().manual_seed(11)


def rnd(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G, dtype=torch.float64)


@pytest.mark.parametrize("comp,path,want", [
    ("unet", "down_blocks.0.resnets.1.conv1", (3, 3)), ("unet", "mid_block.resnets.0.conv2", (3, 3)),
    ("unet", "down_blocks.2.downsamplers.0.conv", (3, 3)), ("unet", "up_blocks.1.upsamplers.0.conv", (3, 3)),
    ("unet", "conv_in", (3, 3)), ("unet", "conv_out", (3, 3)), (None, "up_blocks.3.resnets.0.conv_shortcut", (1, 1)),
    ("unet", "down_blocks.1.attentions.0.proj_in", "proj"), ("unet", "down_blocks.1.resnets.0.time_emb_proj", None),
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", None), ("text_encoder", "conv_in", None),
    ("unet", "double_blocks.0.img_attn.proj", None), (None, "conv1", None), (None, "unet.conv_out", (3, 3)),
])
def test_named_kernel(comp, path, want):
    assert named_kernel(comp, path) == want


def _lycoris_file(tmp_path, algo: str, name: str, seed: int = 3, **kw):
    """A lycoris-lora network on Tiny's conv, saved, its conv renamed to the kohya ``name``; (path, model, base)."""
    model, base, net = make_network(algo, seed, **kw)
    raw = tmp_path / "raw.safetensors"
    net.save_weights(str(raw), torch.float64, {})
    sd = {k.replace("lycoris_conv", name): v for k, v in load_file(str(raw)).items() if k.startswith("lycoris_conv")}
    path = tmp_path / f"{algo}-{name}.safetensors"
    save_file(sd, str(path))
    return path, model, base


SGM_CONV1 = "lora_unet_input_blocks_1_0_in_layers_2"  # SGM name of down_blocks.0.resnets.0.conv1


@pytest.mark.parametrize("algo,kw", [("loha", {}), ("lokr", {"dim": 2, "model_conv": (32, 48)})])
def test_flattened_conv_gets_its_kernel_from_its_name_and_is_written_4d(algo, kw, tmp_path):
    conv = kw.pop("model_conv", (8, 12))
    path, model, base = _lycoris_file(tmp_path, algo, SGM_CONV1, model=Tiny(conv=conv), **kw)
    assert all(len(v.shape) == 2 for v in load_file(str(path)).values() if v.dim())  # stored flattened
    (m,) = load_adapter(path).modules
    assert m.kind == "conv" and m.kernel == (3, 3) and m.shape == (conv[1], conv[0] * 9)
    info = json.loads(run_cli("info", path, "--json").stdout)
    assert info["kinds"] == {"conv": 1} and any("kernel from the UNet name" in n for n in info["notes"])
    want = forward_delta(model, base, "conv")
    for cmd in (("truncate", "--rank", str(min(m.shape))), ("convert", "--to", "kohya")):
        out = tmp_path / f"{cmd[0]}.safetensors"
        res = run_cli(cmd[0], path, *cmd[1:], "-o", out)
        assert res.exit_code == 0, res.stderr
        sd = load_file(str(out))
        assert sd[f"{SGM_CONV1}.lora_down.weight"].shape[1:] == (conv[0], 3, 3)
        assert sd[f"{SGM_CONV1}.lora_up.weight"].shape[2:] == (1, 1)
        (got,) = load_adapter(out).modules
        assert float((to_torch(got.delta()) - want).abs().max()) <= 1e-6 * float(want.abs().max())


def _loha(prefix: str, out: int, width: int, r: int = 2) -> dict[str, torch.Tensor]:
    return {f"{prefix}.hada_w1_a": rnd(out, r), f"{prefix}.hada_w1_b": rnd(r, width),
            f"{prefix}.hada_w2_a": rnd(out, r), f"{prefix}.hada_w2_b": rnd(r, width)}


def test_a_name_that_does_not_fit_is_conv_unknown_and_written_flat(tmp_path):
    sd = _loha("lora_unet_down_blocks_0_resnets_0_conv2", 8, 70)  # 70 is not in·9
    # LoKr: width 45 = 5·9 but W₂'s own width 5 is not a multiple of 9
    mid = "lora_unet_mid_block_resnets_0_conv1"
    sd.update({f"{mid}.lokr_w1": rnd(2, 9), f"{mid}.lokr_w2_a": rnd(4, 2), f"{mid}.lokr_w2_b": rnd(2, 5)})
    save_file(sd, str(tmp_path / "f.safetensors"))
    ad = load_adapter(tmp_path / "f.safetensors")
    assert {m.kind for m in ad.modules} == {"conv?"} and all(m.kernel is None for m in ad.modules)
    note = next(n for n in ad.notes if "unknown kernel" in n)
    assert "not a multiple of 3×3" in note and "--base" in note
    assert json.loads(run_cli("info", tmp_path / "f.safetensors", "--json").stdout)["kinds"] == {"conv?": 2}
    out = tmp_path / "t.safetensors"
    assert run_cli("truncate", tmp_path / "f.safetensors", "--rank", "2", "-o", out).exit_code == 0
    assert load_file(str(out))["lora_unet_down_blocks_0_resnets_0_conv2.lora_down.weight"].shape == (2, 70)


@pytest.mark.parametrize("context,want", [(768, ("conv", (1, 1))), (2048, ("linear", None)), (None, ("conv?", None))])
def test_proj_in_is_1x1_only_in_an_sd1_unet(context, want, tmp_path):
    sd = _loha("lora_unet_down_blocks_1_attentions_0_proj_in", 16, 16)
    if context is not None:
        sd.update(_loha("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 16, context))
    save_file(sd, str(tmp_path / "p.safetensors"))
    m = load_adapter(tmp_path / "p.safetensors").module("lora_unet_down_blocks_1_attentions_0_proj_in")
    assert (m.kind, m.kernel) == want


def _base_file(tmp_path, key: str, w: torch.Tensor):
    save_file({key: w.contiguous()}, str(tmp_path / "base.safetensors"))
    return tmp_path / "base.safetensors"


def test_base_gives_the_kernel_of_an_unknown_name(tmp_path):
    name = "lora_unet_foo_conv"  # a UNet module no rule knows: flattened, so read as linear
    path, model, base = _lycoris_file(tmp_path, "loha", name)
    assert load_adapter(path).modules[0].kind == "linear"
    bpath = _base_file(tmp_path, "unet.foo.conv.weight", base.conv.weight.detach())
    doc = json.loads(run_cli("rank", path, "--base", bpath, "--json").stdout)
    assert doc["modules"][0]["kind"] == "conv"
    out = tmp_path / "o.safetensors"
    res = run_cli("convert", path, "--to", "kohya", "-o", out, "--base", bpath)
    assert res.exit_code == 0, res.stderr
    assert load_file(str(out))[f"{name}.lora_down.weight"].shape[1:] == (8, 3, 3)
    want = forward_delta(model, base, "conv")
    assert float((to_torch(load_adapter(out).modules[0].delta()) - want).abs().max()) <= 1e-6 * float(want.abs().max())


def test_base_with_another_kernel_is_refused(tmp_path):
    path, _, _ = _lycoris_file(tmp_path, "loha", "lora_unet_down_blocks_0_resnets_0_conv1")
    bpath = _base_file(tmp_path, "unet.down_blocks.0.resnets.0.conv1.weight", rnd(12, 72, 1, 1))  # same flat shape
    res = run_cli("rank", path, "--base", bpath)
    assert res.exit_code == 2 and len(res.stderr.splitlines()) == 1
    assert "3×3" in res.stderr and "1×1" in res.stderr and "do not match" in res.stderr


def test_merge_adds_the_flattened_and_4d_forms_of_a_conv(tmp_path):
    name = "lora_unet_foo_conv"
    flat, m1, b1 = _lycoris_file(tmp_path, "loha", name, seed=3)
    full, m2, b2 = _lycoris_file(tmp_path, "locon", name, seed=4)
    out = tmp_path / "m.safetensors"
    res = run_cli("merge", flat, full, "-o", out, "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["modules"][0]["kind"] == "conv"
    assert load_file(str(out))[f"{name}.lora_down.weight"].dim() == 4
    want = forward_delta(m1, b1, "conv") + forward_delta(m2, b2, "conv")
    assert float((to_torch(load_adapter(out).modules[0].delta()) - want).abs().max()) <= 1e-6 * float(want.abs().max())
    other = tmp_path / "k1.safetensors"  # a 1×1 conv of the same flattened shape (12, 72): not the same module
    save_file({f"{name}.lora_down.weight": rnd(2, 72, 1, 1), f"{name}.lora_up.weight": rnd(12, 2, 1, 1)}, str(other))
    res = run_cli("merge", full, other, "-o", tmp_path / "no.safetensors")
    assert res.exit_code == 2 and "cannot be added" in res.stderr
    assert "conv 3×3" in res.stderr and "conv 1×1" in res.stderr


class _Res(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(8, 12, 3, padding=1)


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.resnets = torch.nn.ModuleList([_Res()])


class _UNet(torch.nn.Module):
    """diffusers' UNet paths (down_blocks.0.resnets.0.conv1), as a PEFT adapter of a UNet names its modules."""

    def __init__(self) -> None:
        super().__init__()
        self.down_blocks = torch.nn.ModuleList([_Block()])


def test_peft_loha_conv_gets_its_kernel(tmp_path):
    from peft import LoHaConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_UNet().double(), LoHaConfig(r=2, alpha=3, target_modules=["conv1"]))
    layer = model.base_model.model.down_blocks[0].resnets[0].conv1
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=G, dtype=torch.float64))
    want = layer.get_delta_weight("default").detach().reshape(12, -1)
    model.save_pretrained(str(tmp_path / "ad"))
    (m,) = load_adapter(tmp_path / "ad").modules
    assert m.kind == "conv" and m.kernel == (3, 3)
    assert float((to_torch(m.delta()) - want).abs().max()) <= 1e-6 * float(want.abs().max())
    res = run_cli("truncate", tmp_path / "ad", "--rank", "4", "-o", tmp_path / "t")
    assert res.exit_code == 0, res.stderr
    sd = load_file(str(tmp_path / "t" / "adapter_model.safetensors"))
    assert next(v for k, v in sd.items() if k.endswith("lora_A.weight")).shape == (4, 8, 3, 3)
