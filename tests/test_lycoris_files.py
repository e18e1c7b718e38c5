"""Hand-built LyCORIS files with SDXL and Flux key names (as LyCORIS's kohya naming writes them), the
scale rules, the base-dependent algorithms, and bad input (one line, exit 2). Independent checks: the
dense ΔW from the formulas in docs/formats.md ("LyCORIS"), spectra by dense SVD."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from builders import run_cli
from safetensors.torch import save_file

from lora_inspect.analysis import compute_spectra
from lora_inspect.formats import load_adapter

G = torch.Generator().manual_seed(7)


def rnd(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G, dtype=torch.float64)


def loha(prefix: str, out: int, inp: int, r: int, alpha: float | None) -> dict[str, torch.Tensor]:
    d = {f"{prefix}.hada_w1_a": rnd(out, r), f"{prefix}.hada_w1_b": rnd(r, inp),
         f"{prefix}.hada_w2_a": rnd(out, r), f"{prefix}.hada_w2_b": rnd(r, inp)}
    if alpha is not None:
        d[f"{prefix}.alpha"] = torch.tensor(alpha)
    return d


def loha_delta(d: dict, prefix: str, r: int, alpha: float | None) -> torch.Tensor:
    s = 1.0 if not alpha else alpha / r
    return s * (d[f"{prefix}.hada_w1_a"] @ d[f"{prefix}.hada_w1_b"]) * (d[f"{prefix}.hada_w2_a"] @ d[f"{prefix}.hada_w2_b"])


def lokr(prefix: str, a: int, b: int, c: int, d_: int, r: int, alpha: float) -> dict[str, torch.Tensor]:
    return {f"{prefix}.lokr_w1": rnd(a, c), f"{prefix}.lokr_w2_a": rnd(b, r), f"{prefix}.lokr_w2_b": rnd(r, d_),
            f"{prefix}.alpha": torch.tensor(alpha)}


SDXL = ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_0_mlp_fc1",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"]
FLUX = ["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_3_linear1",
        "lora_transformer_single_transformer_blocks_0_attn_to_q"]


@pytest.mark.parametrize("names", [SDXL, FLUX], ids=["sdxl", "flux"])
def test_named_files_read_with_exact_delta_and_spectrum(names, tmp_path):
    sd: dict[str, torch.Tensor] = {}
    sd.update(loha(names[0], 40, 32, 4, 2.0))
    sd.update(loha(names[1], 48, 32, 3, None))  # α absent: s = 1
    sd.update(lokr(names[2], 4, 12, 8, 6, 2, 1.0))  # (48, 48), s = α/r = 0.5
    path = tmp_path / "x.safetensors"
    save_file(sd, str(path))
    ad = load_adapter(path)
    assert ad.format == "lycoris" and [m.name for m in ad.modules] == sorted(names)
    want = {names[0]: loha_delta(sd, names[0], 4, 2.0), names[1]: loha_delta(sd, names[1], 3, None),
            names[2]: 0.5 * torch.kron(sd[f"{names[2]}.lokr_w1"], sd[f"{names[2]}.lokr_w2_a"] @ sd[f"{names[2]}.lokr_w2_b"])}
    spectra = compute_spectra(ad.modules)
    for m in ad.modules:
        assert np.allclose(m.delta(), want[m.name].numpy(), rtol=0, atol=1e-12 * float(want[m.name].abs().max()))
        dense = torch.linalg.svdvals(want[m.name]).numpy()
        sv = spectra[m.name][0]
        assert abs(sv - dense[: len(sv)]).max() <= 1e-10 * dense[0]
    doc = json.loads(run_cli("rank", path, "--json").stdout)
    assert {d["name"]: d["algo"] for d in doc["modules"]} == {names[0]: "loha", names[1]: "loha", names[2]: "lokr"}


def test_alpha_zero_means_scale_one(tmp_path):
    sd = loha("lora_unet_x", 8, 6, 2, 0.0)
    save_file(sd, str(tmp_path / "a.safetensors"))
    (m,) = load_adapter(tmp_path / "a.safetensors").modules
    assert m.scale == 1.0 and m.alpha == 2.0


def test_plain_locon_stays_kohya(tmp_path):
    save_file({"lora_unet_x.lora_down.weight": rnd(2, 6), "lora_unet_x.lora_up.weight": rnd(8, 2)},
              str(tmp_path / "k.safetensors"))
    assert load_adapter(tmp_path / "k.safetensors").format == "kohya"


def test_base_dependent_modules_are_named_not_unknown(tmp_path):
    sd = loha("lora_unet_a", 8, 6, 2, 1.0)
    sd.update({"lora_unet_b.oft_blocks": rnd(2, 4, 4), "lora_unet_b.alpha": torch.tensor(0.0),
               "lora_unet_c.weight": rnd(8), "lora_unet_c.on_input": torch.tensor(0.0),
               "lora_unet_d.a1.weight": rnd(6, 2), "lora_unet_d.a2.weight": rnd(2, 6),
               "lora_unet_d.b1.weight": rnd(8, 2), "lora_unet_d.b2.weight": rnd(2, 6), "lora_unet_d.alpha": torch.tensor(1.0),
               "lora_unet_e.w_norm": rnd(8), "lora_unet_e.b_norm": rnd(8)})
    save_file(sd, str(tmp_path / "m.safetensors"))
    res = run_cli("rank", tmp_path / "m.safetensors")
    assert res.exit_code == 0, res.stderr
    for word in ("OFT", "(IA)³", "GLoRA", "Norm", "--base"):
        assert word in res.stdout, word
    info = json.loads(run_cli("info", tmp_path / "m.safetensors", "--json").stdout)
    # OFT and (IA)³ are modules (their ΔW with --base: tests/test_lycoris_oft.py); GLoRA is named and carried
    assert info["modules"] == 3 and info["algos"] == {"ia3": 1, "loha": 1, "oft": 1}
    assert info["params"] == 8 * 2 + 2 * 6 + 8 * 2 + 2 * 6 + 2 * 16 + 8
    assert any("1 GLoRA module (52 parameters)" in n for n in info["notes"])
    only = {k: v for k, v in sd.items() if k.startswith("lora_unet_b")}
    save_file(only, str(tmp_path / "oft.safetensors"))
    err = run_cli("rank", tmp_path / "oft.safetensors")
    assert err.exit_code == 2 and "OFT" in err.stderr and "--base" in err.stderr and len(err.stderr.splitlines()) == 1


BAD = {
    "missing-half": ({"lora_unet_x.hada_w1_a": (8, 2), "lora_unet_x.hada_w1_b": (2, 6)}, "missing half"),
    "loha-shapes": ({"lora_unet_x.hada_w1_a": (8, 2), "lora_unet_x.hada_w1_b": (2, 6),
                     "lora_unet_x.hada_w2_a": (8, 2), "lora_unet_x.hada_w2_b": (2, 7)}, "do not multiply"),
    "lokr-inner": ({"lora_unet_x.lokr_w1": (2, 2), "lora_unet_x.lokr_w2_a": (4, 3),
                    "lora_unet_x.lokr_w2_b": (2, 5)}, "disagree on r"),
    "lokr-w1-half": ({"lora_unet_x.lokr_w1_a": (2, 1), "lora_unet_x.lokr_w2": (4, 4)}, "missing half"),
    "dora-axis": ({"lora_unet_x.lora_down.weight": (2, 6), "lora_unet_x.lora_up.weight": (8, 2),
                   "lora_unet_x.dora_scale": (3, 1)}, "dora_scale"),
    "tucker-mid": ({"lora_unet_x.lora_down.weight": (2, 6, 1, 1), "lora_unet_x.lora_up.weight": (8, 2, 1, 1),
                    "lora_unet_x.lora_mid.weight": (3, 2, 3, 3)}, "Tucker"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("cmd", ["info", "rank"])
def test_bad_input_is_one_line_exit_2(case, cmd, tmp_path):
    shapes, words = BAD[case]
    save_file({k: torch.randn(*s) for k, s in shapes.items()}, str(tmp_path / "b.safetensors"))
    res = run_cli(cmd, tmp_path / "b.safetensors")
    assert res.exit_code == 2 and res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and words in lines[0] and "lora_unet_x" in lines[0], res.stderr
