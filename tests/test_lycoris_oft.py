"""Diag-OFT, BOFT and (IA)³ LyCORIS files (docs/formats.md, "Base-dependent algorithms"), against lycoris-lora
itself: networks built with ``create_lycoris`` (or ``IA3Module(train_on_input=True)``) on a Linear 24 → 32 and a
3×3 Conv2d 8 → 16, parameters randomised, saved with LyCORIS's own ``save_weights``; the base weights saved as a
base checkpoint. Oracle: the wrapped module's forward minus the base's on unit inputs. LyCORIS inverts
I − Q in float32 (``get_r``: ``.float().inverse()``; float64 modules raise), so the oracle is float32 and the
tolerance is 1e-5 relative (measured ≤ 5e-7); an independent float64 construction from explicit
block-diagonal and permutation matrices checks the same files to 1e-12."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from builders import run_cli
from safetensors.torch import load_file, save_file

from lora_inspect.analysis import analyse
from lora_inspect.arrays import to_torch
from lora_inspect.basecheckpoint import open_base_checkpoint
from lora_inspect.formats import load_adapter

pytest.importorskip("lycoris")
from lycoris_oracle import Tiny  # noqa: E402

logging.getLogger("LyCORIS").setLevel(logging.ERROR)
ORACLE_TOL = 1e-5  # float32 oracle
EXACT_TOL = 1e-12
CASES = {
    "oft": ("diag-oft", {}),
    "oft-constrained-rescaled": ("diag-oft", {"constraint": 1e-3, "rescaled": True}),
    "boft": ("boft", {}),
    "boft-rescaled": ("boft", {"rescaled": True, "constraint": 1e-3}),
    "ia3": ("ia3", {}),
    "ia3-on-input": ("ia3-input", {}),
}


def _randomise(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _network(algo: str, seed: int, **kwargs) -> tuple[Tiny, Tiny, dict[str, torch.Tensor]]:
    """(wrapped model, base copy, the LyCORIS state dict as saved) in float32."""
    from lycoris import LycorisNetwork, create_lycoris
    from lycoris.modules.ia3 import IA3Module

    torch.manual_seed(seed)
    model = Tiny((24, 32), (8, 16))
    base = copy.deepcopy(model)
    if algo == "ia3-input":  # LyCORIS's presets set train_on_input per module; build the modules directly
        mods = {n: IA3Module(f"lycoris_{n}", getattr(model, n), 1.0, train_on_input=True) for n in ("lin", "conv")}
        for m in mods.values():
            m.apply_to()
        _randomise([m.weight for m in mods.values()], seed)
        return model, base, {f"lycoris_{n}.{k}": v.detach().clone() for n, m in mods.items()
                             for k, v in m.state_dict().items()}
    LycorisNetwork.apply_preset({"target_module": [], "target_name": ["lin", "conv"]})
    net = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=1, conv_dim=4, conv_alpha=1, algo=algo, **kwargs)
    net.apply_to()
    _randomise(net.parameters(), seed)
    return model, base, {k: v.detach().clone() for k, v in net.state_dict().items()}


@torch.no_grad()
def _forward_delta(model: Tiny, base: Tiny, name: str) -> torch.Tensor:
    mod, ref = getattr(model, name), getattr(base, name)
    if isinstance(ref, torch.nn.Linear):
        x = torch.eye(ref.in_features)
    else:
        n = ref.in_channels * 9
        x = torch.eye(n).reshape(n, ref.in_channels, 3, 3)
    z = torch.zeros_like(x[:1])
    return ((mod(x) - ref(x)) - (mod(z) - ref(z))).reshape(x.shape[0], -1).T.double()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("oft")
    out = {}
    for i, (case, (algo, kw)) in enumerate(CASES.items()):
        model, base, sd = _network(algo, 10 + i, **kw)
        path = root / f"{case}.safetensors"
        save_file({k: v.double().contiguous() for k, v in sd.items()}, str(path))
        bpath = root / f"{case}-base.safetensors"
        save_file({f"lycoris_{n}.weight": getattr(base, n).weight.detach().double().contiguous()
                   for n in ("lin", "conv")}, str(bpath))
        out[case] = (path, bpath, model, base)
    return out


def _cayley64(blocks: torch.Tensor, c: float) -> torch.Tensor:
    q = blocks - blocks.transpose(-1, -2)
    if c > 0 and float(q.norm()) + 1e-8 > c:
        q = q * c / (float(q.norm()) + 1e-8)
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


def _independent(sd: dict, name: str, w: torch.Tensor) -> torch.Tensor:
    """ΔW from explicit matrices: blockdiag(R)ᵀ (OFT), Pᵀ·blockdiag(R_i)·P per stage (BOFT), diagonals ((IA)³)."""
    w = w.reshape(w.shape[0], -1)
    if f"{name}.on_input" in sd:
        v = sd[f"{name}.weight"].reshape(-1)
        if float(sd[f"{name}.on_input"]) == 1:
            return w @ torch.diag(v.repeat_interleave(w.shape[1] // v.numel()))
        return torch.diag(v) @ w
    blocks = sd[f"{name}.oft_blocks"]
    r = _cayley64(blocks, float(sd[f"{name}.alpha"]) * w.shape[0])
    if blocks.dim() == 3:
        total = torch.block_diag(*r).T
    else:
        total, b = torch.eye(w.shape[0], dtype=w.dtype), blocks.shape[-1]
        for i in range(blocks.shape[0]):
            k = 2**i * (b // 2)
            perm = torch.arange(w.shape[0]).reshape(-1, 2, k).transpose(1, 2).reshape(-1)
            p = torch.eye(w.shape[0], dtype=w.dtype)[perm]
            total = p.T @ torch.block_diag(*r[i]) @ p @ total
    rescale = sd.get(f"{name}.rescale")
    scale = torch.diag(rescale.reshape(-1)) if rescale is not None else torch.eye(w.shape[0], dtype=w.dtype)
    return scale @ total @ w - w


@pytest.mark.parametrize("case", list(CASES))
def test_delta_and_spectrum_match_lycoris(case, built):
    path, bpath, model, base = built[case]
    ad = load_adapter(path)
    report = analyse(ad, base=open_base_checkpoint(bpath))
    sd, bsd = load_file(str(path)), load_file(str(bpath))
    for r in report.modules:
        part = r.name.removeprefix("lycoris_")
        want = _forward_delta(model, base, part)
        got = to_torch(r.module.delta())
        assert r.module.shape == tuple(want.shape) and r.module.kind == ("conv" if part == "conv" else "linear")
        assert float((got - want).abs().max()) <= ORACLE_TOL * float(want.abs().max()), case
        exact = _independent(sd, r.name, bsd[f"{r.name}.weight"])
        assert float((got - exact).abs().max()) <= EXACT_TOL * float(exact.abs().max()), case
        dense = torch.linalg.svdvals(want).numpy()
        sv = r.singular_values
        assert sv is not None and abs(sv[: len(dense)] - dense).max() <= ORACLE_TOL * dense[0]
        assert r.module.kernel == ((3, 3) if part == "conv" else None)


def test_info_lists_them_with_parameter_counts(built):
    res = run_cli("info", built["oft-constrained-rescaled"][0], "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    # oft_blocks (8, 4, 4) + rescale 32, oft_blocks (4, 4, 4) + rescale 16
    assert doc["modules"] == 2 and doc["algos"] == {"oft": 2} and doc["params"] == 8 * 16 + 32 + 4 * 16 + 16
    assert any("OFT ×2" in n and "--base" in n for n in doc["notes"])
    doc = json.loads(run_cli("info", built["ia3"][0], "--json").stdout)
    assert doc["algos"] == {"ia3": 2} and doc["params"] == 32 + 16 and doc["kinds"] == {"conv?": 1, "linear": 1}


def _mixed(built, tmp_path) -> tuple:
    """The BOFT file with a LoHa module beside it, and a base holding all three weights."""
    path, bpath, _, _ = built["boft"]
    sd, bsd = load_file(str(path)), load_file(str(bpath))
    g = torch.Generator().manual_seed(5)
    sd.update({f"lycoris_other.hada_w{i}_{s}": torch.randn(*sh, generator=g, dtype=torch.float64)
               for i in (1, 2) for s, sh in (("a", (8, 2)), ("b", (2, 6)))})
    bsd["lycoris_other.weight"] = torch.randn(8, 6, generator=g, dtype=torch.float64)
    save_file(sd, str(tmp_path / "mixed.safetensors"))
    save_file(bsd, str(tmp_path / "base.safetensors"))
    return tmp_path / "mixed.safetensors", tmp_path / "base.safetensors"


def test_rank_without_base_lists_them_as_needing_it(built, tmp_path):
    mixed, base = _mixed(built, tmp_path)
    res = run_cli("rank", mixed, "--json")
    assert res.exit_code == 0, res.stderr
    mods = {m["name"]: m for m in json.loads(res.stdout)["modules"]}
    for name in ("lycoris_lin", "lycoris_conv"):
        assert mods[name]["flags"] == ["needs_base"] and mods[name]["singular_values"] is None
        assert mods[name]["algo"] == "boft" and mods[name]["shape"][1] == 0
    assert mods["lycoris_other"]["singular_values"] and mods["lycoris_other"]["flags"] == []
    table = run_cli("rank", mixed)
    assert "needs_base" in table.stdout and "32×?" in table.stdout and "convert --base" in table.stdout
    only = run_cli("rank", built["boft"][0])
    assert only.exit_code == 2 and only.stdout == "" and len(only.stderr.splitlines()) == 1
    assert "--base" in only.stderr and "BOFT" in only.stderr
    with_base = json.loads(run_cli("rank", mixed, "--base", base, "--json").stdout)
    got = {m["name"]: m for m in with_base["modules"]}
    assert got["lycoris_conv"]["shape"] == [16, 72] and got["lycoris_conv"]["kind"] == "conv"
    assert got["lycoris_lin"]["singular_values"] and got["lycoris_lin"]["base"]["relative_fro"] > 0


def test_convert_with_base_writes_the_exact_lora(built, tmp_path):
    path, bpath, model, base = built["oft-constrained-rescaled"]
    named = {}
    for k, v in load_file(str(path)).items():  # kohya UNet names, so that the kohya target names them
        k = k.replace("lycoris_conv", "lora_unet_conv_in")
        named[k.replace("lycoris_lin", "lora_unet_time_embedding_linear_1")] = v
    save_file(named, str(tmp_path / "named.safetensors"))
    save_file({"unet.conv_in.weight": base.conv.weight.detach().double().contiguous(),
               "unet.time_embedding.linear_1.weight": base.lin.weight.detach().double().contiguous()},
              str(tmp_path / "base.safetensors"))
    out = tmp_path / "out.safetensors"
    res = run_cli("convert", tmp_path / "named.safetensors", "--to", "kohya", "-o", out, "--base",
                  tmp_path / "base.safetensors", "--json")
    assert res.exit_code == 0, res.stderr
    written = load_file(str(out))
    assert written["lora_unet_conv_in.lora_down.weight"].shape[1:] == (8, 3, 3)
    assert written["lora_unet_conv_in.lora_up.weight"].shape[2:] == (1, 1)
    ad = load_adapter(out)
    for m in ad.modules:
        want = _forward_delta(model, base, "conv" if m.name.endswith("conv_in") else "lin")
        assert float((to_torch(m.delta()) - want).abs().max()) <= ORACLE_TOL * float(want.abs().max())
    refused = run_cli("convert", tmp_path / "named.safetensors", "--to", "kohya", "-o", tmp_path / "no.safetensors")
    assert refused.exit_code == 2 and "needs the base weight" in refused.stderr
    assert len(refused.stderr.splitlines()) == 1 and not (tmp_path / "no.safetensors").exists()


@pytest.mark.parametrize("cmd", [("truncate", "--rank", "2"), ("rescale", "--factor", "2"), ("merge",)])
def test_rewrites_without_base_refuse_in_one_line(cmd, built, tmp_path):
    path = built["ia3"][0]
    args = [cmd[0], path, *([path] if cmd[0] == "merge" else []), *cmd[1:], "-o", tmp_path / "x.safetensors"]
    res = run_cli(*args)
    assert res.exit_code == 2 and len(res.stderr.splitlines()) == 1, res.stderr
    assert "(IA)³" in res.stderr and "lycoris_" in res.stderr and not (tmp_path / "x.safetensors").exists()


BAD = {
    "not-square": ({"x.oft_blocks": (2, 4, 3)}, "square"),
    "boft-stages": ({"x.oft_blocks": (3, 3, 4, 4)}, "butterfly"),
    "rescale-rows": ({"x.oft_blocks": (2, 4, 4), "x.rescale": (7, 1)}, "rescale"),
    "ia3-shape": ({"x.weight": (2, 8, 1, 1), "x.on_input": ()}, "(IA)³ weight"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_are_one_line(case, tmp_path):
    shapes, words = BAD[case]
    sd = {"lycoris_" + k: torch.randn(*s) if s else torch.tensor(0) for k, s in shapes.items()}
    save_file(sd, str(tmp_path / "b.safetensors"))
    res = run_cli("info", tmp_path / "b.safetensors")
    assert res.exit_code == 2 and res.stdout == "" and len(res.stderr.splitlines()) == 1
    assert words in res.stderr and "lycoris_x" in res.stderr, res.stderr


def test_on_input_must_be_0_or_1_and_base_must_fit(built, tmp_path):
    save_file({"lycoris_x.weight": torch.randn(8), "lycoris_x.on_input": torch.tensor(2)},
              str(tmp_path / "f.safetensors"))
    res = run_cli("info", tmp_path / "f.safetensors")
    assert res.exit_code == 2 and "on_input" in res.stderr and "expected 0" in res.stderr
    path, bpath, _, _ = built["oft"]
    bsd = load_file(str(bpath))
    bsd["lycoris_lin.weight"] = bsd["lycoris_lin.weight"][:16].contiguous()  # 16 rows, OFT rotates 32
    save_file(bsd, str(tmp_path / "base.safetensors"))
    res = run_cli("rank", path, "--base", tmp_path / "base.safetensors")
    assert res.exit_code == 2 and len(res.stderr.splitlines()) == 1
    assert "lycoris_lin" in res.stderr and "32 output rows" in res.stderr and "do not match" in res.stderr
