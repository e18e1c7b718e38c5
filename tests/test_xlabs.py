"""XLabs Flux LoRAs (x-flux's processor keys, ``double_blocks.N.processor.qkv_lora1.down.weight`` …): read,
rewritten (truncate, rescale) and converted (kohya, diffusers). Oracles: diffusers' own XLabs converter
(``lora_conversion_utils._convert_xlabs_flux_lora_to_diffusers``) for the names and ΔW, its loader
(``FluxPipeline.lora_state_dict`` → ``load_lora_into_transformer`` → ``fuse_lora``) on a tiny
FluxTransformer2DModel for the applied weights, and ΔW and its SVD computed here in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders import tiny_flux as build_tiny_flux
from safetensors.torch import load_file, save_file

from lora_inspect.formats import detect_format, load_adapter
from lora_inspect.formats.tensors import open_tensors
from tests.builders import cli_json, run_cli, sv_close

H, MLP = 16, 64  # the tiny model: hidden 2 heads × 8, Flux's MLP ratio 4
# XLabs module → the diffusers paths it covers, in row order, and the BFL weight it adapts (our module name);
# written out here, independent of lora_inspect and of diffusers
XL: dict[str, tuple[list[str], str]] = {}
for _i in (0, 1):
    XL |= {f"double_blocks.{_i}.processor.qkv_lora1": ([f"transformer_blocks.{_i}.attn.to_{c}" for c in "qkv"],
                                                        f"double_blocks.{_i}.img_attn.qkv"),
           f"double_blocks.{_i}.processor.proj_lora1": ([f"transformer_blocks.{_i}.attn.to_out.0"],
                                                         f"double_blocks.{_i}.img_attn.proj"),
           f"double_blocks.{_i}.processor.qkv_lora2": ([f"transformer_blocks.{_i}.attn.add_{c}_proj" for c in "qkv"],
                                                        f"double_blocks.{_i}.txt_attn.qkv"),
           f"double_blocks.{_i}.processor.proj_lora2": ([f"transformer_blocks.{_i}.attn.to_add_out"],
                                                         f"double_blocks.{_i}.txt_attn.proj")}
XL |= {"single_blocks.0.processor.qkv_lora": ([f"single_transformer_blocks.0.attn.to_{c}" for c in "qkv"],
                                              "single_blocks.0.linear1"),
       "single_blocks.0.processor.proj_lora": (["single_transformer_blocks.0.proj_out"], "single_blocks.0.linear2"),
       # no proj_lora in single block 1: linear1's MLP height is taken as 4·h
       "single_blocks.1.processor.qkv_lora": ([f"single_transformer_blocks.1.attn.to_{c}" for c in "qkv"],
                                              "single_blocks.1.linear1")}
RANKS = [2, 3, 4, 5, 3, 2, 5, 4, 3, 2, 4]  # per module, in XL's order
REL = 1e-6


def tiny_flux():
    return build_tiny_flux(layers=2, single_layers=2)


def _weights(model) -> dict[str, torch.Tensor]:
    return {name.removesuffix(".base_layer"): mod.weight.detach().double().clone()
            for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and not name.split(".")[-1].startswith("lora_")}


def applied(state_dict) -> dict[str, torch.Tensor]:
    """diffusers' loader on a fresh tiny model, then fuse_lora: every Linear weight."""
    from diffusers import FluxPipeline

    model = tiny_flux()
    FluxPipeline.load_lora_into_transformer(dict(state_dict), network_alphas=None, transformer=model)
    model.fuse_lora()
    return _weights(model)


def close(x: torch.Tensor, y: torch.Tensor, ref: torch.Tensor, tol: float = REL) -> bool:
    return float((x.double() - y.double()).norm()) <= tol * max(float(ref.double().norm()), 1e-30)


def _in_width(paths: list[str]) -> int:
    return H + MLP if paths[0].endswith("proj_out") else H


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """The XLabs file (float64, seeded, a rank per module), ΔW = up·down per XLabs module and per diffusers path."""
    tmp = tmp_path_factory.mktemp("xlabs")
    g = torch.Generator().manual_seed(19)
    sd, dense, deltas = {}, {}, {}
    for (mod, (paths, _)), r in zip(XL.items(), RANKS):
        down = torch.randn(r, _in_width(paths), generator=g, dtype=torch.float64)
        up = torch.randn(H * len(paths), r, generator=g, dtype=torch.float64)
        sd[mod + ".down.weight"], sd[mod + ".up.weight"] = down, up
        dense[mod] = up @ down
        deltas |= dict(zip(paths, torch.split(dense[mod], H)))
    src = tmp / "xlabs.safetensors"
    save_file(sd, str(src))
    diff = tmp / "ours_diffusers.safetensors"
    res = run_cli("convert", src, "--to", "diffusers", "-o", diff)
    assert res.exit_code == 0, res.stderr
    return {"tmp": tmp, "src": src, "sd": sd, "dense": dense, "deltas": deltas, "diffusers": diff}


def _pairs(sd: dict, a: str, b: str) -> dict[str, torch.Tensor]:
    """{module: B·A} of a state dict whose keys end in ``a``/``b`` (no alpha: scale 1)."""
    return {k[: -len(a)]: sd[k[: -len(a)] + b].double() @ sd[k].double() for k in sd if k.endswith(a)}


def test_reads_every_module_with_its_shape_and_exact_spectrum(xl):
    ad = load_adapter(xl["src"])
    assert ad.layout is not None and ad.layout.name == "xlabs"
    assert detect_format(open_tensors(xl["src"])) == "xlabs"
    doc = cli_json("info", xl["src"])
    assert doc["adapter"]["format"] == "xlabs"
    assert doc["modules"] == len(XL)
    assert doc["params"] == sum(v.numel() for v in xl["sd"].values())  # stored parameters, no padding counted
    assert any("XLabs" in n for n in doc["notes"]) and any("4·hidden" in n for n in doc["notes"])
    got = {m["name"]: m for m in cli_json("rank", xl["src"], "--all")["modules"]}
    assert set(got) == set(XL)  # XLabs' own module names
    for (mod, (paths, bfl)), r in zip(XL.items(), RANKS):
        m = got[mod]
        out = 3 * H + MLP if bfl.endswith("linear1") else H * len(paths)  # linear1: the weight x-flux adds to
        assert m["shape"] == [out, _in_width(paths)] and m["rank"] == r and m["scale"] == 1.0, bfl
        sv_close(m["singular_values"], torch.linalg.svdvals(xl["dense"][mod]), 1e-9)


def test_diffusers_output_has_the_delta_of_diffusers_own_converter(xl):
    """Per target weight, our `convert --to diffusers` ΔW equals that of the state dict diffusers' XLabs converter
    makes of the same file (and the ΔW computed here); our only extra modules are linear1's proj_mlp, ΔW = 0."""
    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

    theirs = _pairs(_convert_xlabs_flux_lora_to_diffusers(dict(load_file(str(xl["src"])))), ".lora_A.weight",
                    ".lora_B.weight")
    ours_sd = load_file(str(xl["diffusers"]))
    assert not any("alpha" in k for k in ours_sd)
    ours = _pairs(ours_sd, ".lora_A.weight", ".lora_B.weight")
    assert set(theirs) == {"transformer." + p for p in xl["deltas"]}
    assert set(ours) - set(theirs) == {f"transformer.single_transformer_blocks.{i}.proj_mlp" for i in (0, 1)}
    for k, d in theirs.items():
        assert close(ours[k], d, d) and close(d, xl["deltas"][k.removeprefix("transformer.")], d), k
    for k in set(ours) - set(theirs):
        assert float(ours[k].abs().max()) == 0.0, k


def test_diffusers_loads_our_output_as_it_loads_the_xlabs_file(xl):
    from diffusers import FluxPipeline

    w0 = _weights(tiny_flux())
    ours = applied(FluxPipeline.lora_state_dict(str(xl["diffusers"])))
    theirs = applied(FluxPipeline.lora_state_dict(str(xl["src"])))  # diffusers detects XLabs keys itself
    for p, w in w0.items():
        d = xl["deltas"].get(p)
        assert close(ours[p], theirs[p], w if d is None else d), p
        assert close(theirs[p], w if d is None else w + d, w if d is None else d), p


def test_kohya_output_round_trips_to_the_same_delta(xl, tmp_path):
    """XLabs → kohya (BFL names, α = r): each ΔW as computed here (linear1: zero MLP rows); kohya → diffusers gives
    diffusers' XLabs ΔW again, and diffusers' own kohya converter loads the block modules equally."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    k = tmp_path / "k.safetensors"
    assert run_cli("convert", xl["src"], "--to", "kohya", "-o", k).exit_code == 0
    ksd = load_file(str(k))
    got = {n: float(ksd[n + ".alpha"]) / ksd[n + ".lora_down.weight"].shape[0] * d
           for n, d in _pairs(ksd, ".lora_down.weight", ".lora_up.weight").items()}
    assert set(got) == {"lora_unet_" + bfl.replace(".", "_") for _, bfl in XL.values()}
    for mod, (_, bfl) in XL.items():
        d, want = got["lora_unet_" + bfl.replace(".", "_")], xl["dense"][mod]
        assert close(d[: want.shape[0]], want, want) and not d[want.shape[0]:].any(), bfl
    back = tmp_path / "back.safetensors"
    assert run_cli("convert", k, "--to", "diffusers", "-o", back).exit_code == 0
    again = _pairs(load_file(str(back)), ".lora_A.weight", ".lora_B.weight")
    for p, d in xl["deltas"].items():
        assert close(again["transformer." + p], d, d), p
    # diffusers' kohya converter hard-codes Flux.1's linear1 split [3072, 3072, 3072, 12288]: linear1 left out
    w0 = _weights(tiny_flux())
    w = applied(_convert_kohya_flux_lora_to_diffusers({n: v for n, v in ksd.items() if "_linear1." not in n}))
    for p, d in xl["deltas"].items():
        if not p.startswith("single_transformer_blocks.") or p.endswith("proj_out"):
            assert close(w[p], w0[p] + d, d), p


def test_merge_meets_the_kohya_flux_modules(xl, tmp_path):
    """merge pairs XLabs modules with a kohya Flux file's by canonical name: 0.25·ΔW + 0.75·ΔW = ΔW, written as kohya."""
    k, m = tmp_path / "k.safetensors", tmp_path / "m.safetensors"
    assert run_cli("convert", xl["src"], "--to", "kohya", "-o", k).exit_code == 0
    res = run_cli("merge", xl["src"], k, "--weights", "0.25,0.75", "-o", m)
    assert res.exit_code == 0, res.stderr
    msd = load_file(str(m))
    got = {n: float(msd[n + ".alpha"]) / msd[n + ".lora_down.weight"].shape[0] * d
           for n, d in _pairs(msd, ".lora_down.weight", ".lora_up.weight").items()}
    assert set(got) == {"lora_unet_" + bfl.replace(".", "_") for _, bfl in XL.values()}
    for mod, (_, bfl) in XL.items():
        want = xl["dense"][mod]
        assert close(got["lora_unet_" + bfl.replace(".", "_")][: want.shape[0]], want, want), bfl


def _best(d: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def test_truncate_writes_xlabs_with_the_eckart_young_delta(xl, tmp_path):
    out = tmp_path / "t.safetensors"
    res = run_cli("truncate", xl["src"], "--rank", "3", "-o", out)
    assert res.exit_code == 0, res.stderr
    t = load_file(str(out))
    assert set(t) == set(xl["sd"])  # the same XLabs keys
    # one rank everywhere (x-flux builds every processor with the first down's rank): rank-2 modules padded to 3
    assert {v.shape[0] for k, v in t.items() if k.endswith(".down.weight")} == {3}
    got = _pairs(t, ".down.weight", ".up.weight")
    for mod, d in xl["dense"].items():
        assert close(got[mod], _best(d, 3), d, 1e-9), mod
    ad = load_adapter(out)
    assert ad.layout is not None and ad.layout.name == "xlabs"
    spectra = {m["name"]: m["singular_values"] for m in cli_json("rank", out, "--all")["modules"]}
    for mod in XL:
        sv_close(spectra[mod], torch.linalg.svdvals(xl["dense"][mod])[:3], 1e-9)
    # diffusers loads the truncated file as XLabs: the truncated ΔW lands on every weight
    from diffusers import FluxPipeline

    w0, w = _weights(tiny_flux()), applied(FluxPipeline.lora_state_dict(str(out)))
    for mod, (paths, _) in XL.items():
        for p, part in zip(paths, torch.split(_best(xl["dense"][mod], 3), H)):
            assert close(w[p], w0[p] + part, part), p
    # an energy target also gives one rank for every module
    e = tmp_path / "e.safetensors"
    assert run_cli("truncate", xl["src"], "--energy", "0.9", "-o", e).exit_code == 0
    assert len({v.shape[0] for k, v in load_file(str(e)).items() if k.endswith(".down.weight")}) == 1


def test_rescale_bakes_the_factor_into_up(xl, tmp_path):
    out = tmp_path / "r.safetensors"
    res = run_cli("rescale", xl["src"], "--factor", "0.5", "-o", out)
    assert res.exit_code == 2 and "--bake" in res.stderr and res.stderr.strip().count("\n") == 0
    assert not out.exists()  # no α to scale in an XLabs file
    assert run_cli("rescale", xl["src"], "--factor", "0.5", "--bake", "-o", out).exit_code == 0
    r = load_file(str(out))
    assert set(r) == set(xl["sd"])
    for k, v in xl["sd"].items():
        assert torch.equal(r[k], v * 0.5 if k.endswith(".up.weight") else v), k
    got = _pairs(r, ".down.weight", ".up.weight")
    for mod, d in xl["dense"].items():
        assert close(got[mod], 0.5 * d, d, 1e-12), mod


def _broken(sd: dict, how: str) -> dict:
    sd = dict(sd)
    if how == "unpaired":
        del sd["double_blocks.1.processor.proj_lora2.up.weight"]
    elif how == "rank":
        sd["double_blocks.1.processor.qkv_lora1.up.weight"] = torch.ones(3 * H, RANKS[4] + 1, dtype=torch.float64)
    elif how == "nan":
        up = sd["double_blocks.1.processor.qkv_lora1.up.weight"].clone()
        up[5, 1] = float("nan")
        sd["double_blocks.1.processor.qkv_lora1.up.weight"] = up
    elif how == "unknown":
        sd["double_blocks.0.processor.lin_lora.down.weight"] = torch.ones(2, H, dtype=torch.float64)
    elif how == "rows":
        sd["double_blocks.1.processor.qkv_lora1.up.weight"] = torch.ones(3 * H - 1, RANKS[4], dtype=torch.float64)
    elif how == "twice":
        sd["diffusion_model.double_blocks.0.processor.qkv_lora1.down.weight"] = torch.ones(2, H, dtype=torch.float64)
    return sd


NAMED = {"unpaired": "'double_blocks.1.processor.proj_lora2.down.weight'",
         "rank": "'double_blocks.1.processor.qkv_lora1.up.weight'",
         "unknown": "'double_blocks.0.processor.lin_lora.down.weight'",
         "rows": "'double_blocks.1.processor.qkv_lora1.up.weight'",
         "twice": "'diffusion_model.double_blocks.0.processor.qkv_lora1.down.weight'",
         "nan": "'double_blocks.1.processor.qkv_lora1'"}  # found when the data is read: convert names the module


@pytest.mark.parametrize("how", list(NAMED))
def test_malformed_files_are_refused_in_one_line(xl, tmp_path, how):
    src = tmp_path / f"{how}.safetensors"
    save_file(_broken(xl["sd"], how), str(src))
    commands = [("convert", "--to", "diffusers"), ("convert", "--to", "kohya"), ("truncate", "--rank", "2")]
    for i, cmd in enumerate(commands + ([] if how == "nan" else [("info",)])):
        out = tmp_path / f"{how}_{i}.safetensors"
        res = run_cli(cmd[0], src, *cmd[1:], *(["-o", out] if cmd[0] != "info" else []))
        err = res.stderr.strip()
        assert res.exit_code == 2 and err.count("\n") == 0, (cmd, res.stderr)
        assert str(src) in err and NAMED[how] in err, (cmd, err)
        assert not out.exists()
    if how == "nan":  # truncate reads the factors itself and also names the key
        res = run_cli("truncate", src, "--rank", "2", "-o", tmp_path / "t.safetensors")
        assert "'double_blocks.1.processor.qkv_lora1.up.weight' holds NaN" in res.stderr


def test_detection_takes_only_xlabs_files(xl, tmp_path):
    """A ComfyUI-prefixed XLabs file reads and converts as the plain one (diffusers' converter takes both); the
    file the old one-line refusal was tested on now reads; attention-processor and ComfyUI kohya files keep
    their layouts."""
    pre = tmp_path / "prefixed.safetensors"
    save_file({"diffusion_model." + k: v for k, v in xl["sd"].items()}, str(pre))
    a, b = load_adapter(pre), load_adapter(xl["src"])
    assert [m.name for m in a.modules] == [m.name for m in b.modules]
    assert all(np.array_equal(ma.delta(), mb.delta()) for ma, mb in zip(a.modules, b.modules))
    old = tmp_path / "old_refusal.safetensors"
    save_file({"diffusion_model.double_blocks.0.processor.qkv_lora1.down.weight": torch.zeros(2, 16),
               "diffusion_model.double_blocks.0.processor.qkv_lora1.up.weight": torch.zeros(48, 2)}, str(old))
    assert [m.name for m in load_adapter(old).modules] == ["double_blocks.0.processor.qkv_lora1"]
    g = torch.Generator().manual_seed(1)
    others = {
        "diffusers-attn-procs": {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight":
                                 (2, 8), "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up"
                                 ".weight": (8, 2)},
        "kohya": {"diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": (2, 16),
                  "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": (48, 2)},
    }
    for layout, shapes in others.items():
        p = tmp_path / f"{layout}.safetensors"
        save_file({k: torch.randn(*s, generator=g) for k, s in shapes.items()}, str(p))
        ad = load_adapter(p)
        assert ad.layout is not None and ad.layout.name == layout
