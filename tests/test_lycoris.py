"""LyCORIS files against lycoris-lora itself: networks of every algorithm built and saved by LyCORIS,
their ΔW measured through the wrapped module's ``forward`` (what consumers apply; never LyCORIS's
``get_diff_weight``, which scales LoHa/LoKr twice), compared in float64 with what we read; spectra
against a dense SVD; truncations against a dense Eckart–Young and loaded back into LyCORIS."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

pytest.importorskip("lycoris")

from builders import run_cli  # noqa: E402
from lycoris_oracle import Tiny, base_weight, dora_delta, forward_delta, make_network, save  # noqa: E402

from lora_inspect.analysis import compute_spectra  # noqa: E402
from lora_inspect.arrays import to_torch  # noqa: E402
from lora_inspect.formats import load_adapter  # noqa: E402

BIG = {"model": lambda: Tiny((64, 48), (16, 32)), "dim": 2, "alpha": 3.0}  # W₂ low-rank in LoKr
CASES = {
    "locon": ("locon", {}),
    "locon-tucker": ("locon", {"use_tucker": True}),
    "locon-dora": ("locon", {"dora_wd": True}),
    "loha": ("loha", {}),
    "loha-tucker": ("loha", {"use_tucker": True}),
    "loha-dora-legacy": ("loha", {"dora_wd": True, "wd_on_output": False}),
    "loha-big": ("loha", {"dim": 2, "alpha": 1.0, "model": lambda: Tiny((64, 48), (16, 32))}),
    "lokr-fullfull": ("lokr", {}),
    "lokr-w2-lowrank": ("lokr", BIG),
    "lokr-both-lowrank": ("lokr", {"decompose_both": True, **BIG}),
    "lokr-tucker": ("lokr", {"decompose_both": True, "use_tucker": True, **BIG}),
    "lokr-full-matrix": ("lokr", {"full_matrix": True, **BIG}),
    "lokr-dora": ("lokr", {"dora_wd": True, **BIG}),
    "full": ("full", {}),
}
ALGO = {"locon": {"lora", "locon"}, "loha": {"loha"}, "lokr": {"lokr"}, "full": {"full"}}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lycoris")
    out = {}
    for i, (case, (algo, kw)) in enumerate(CASES.items()):
        kw = dict(kw)
        if "model" in kw:
            kw["model"] = kw["model"]()
        model, base, net = make_network(algo, 10 + i, **kw)
        out[case] = (model, base, save(net, tmp / f"{case}.safetensors"))
    return out


def _true_delta(model, base, m) -> torch.Tensor:
    return forward_delta(model, base, m.name.split("_", 1)[1])


@pytest.mark.parametrize("case", list(CASES))
def test_delta_matches_lycoris_forward(built, case):
    model, base, path = built[case]
    ad = load_adapter(path)
    assert ad.format == "lycoris" and len(ad.modules) == 2
    for m in ad.modules:
        assert m.algo in ALGO[CASES[case][0]]
        want = _true_delta(model, base, m)
        got = to_torch(m.delta())
        if m.is_dora:  # the file's DoRA: W' = dora_scale·(W+ΔW)/‖W+ΔW‖ on the axis its shape gives
            got = dora_delta(base_weight(base, m.name.split("_", 1)[1]), got, to_torch(m.source.get(m.magnitude_key)).double())
        assert float((got - want).norm() / want.norm()) < 1e-6, (case, m.name)


@pytest.mark.parametrize("case", list(CASES))
def test_spectra_match_dense_svd(built, case):
    _, _, path = built[case]
    ad = load_adapter(path)
    spectra = compute_spectra(ad.modules, precision="fp64")
    for m in ad.modules:
        sv, flags = spectra[m.name]
        dense = torch.linalg.svdvals(to_torch(m.delta())).numpy()
        assert len(sv) == m.rank <= len(dense)
        assert abs(sv - dense[: len(sv)]).max() <= 1e-10 * dense[0], (case, m.name)
        assert dense[len(sv):].max(initial=0) <= 1e-10 * dense[0]  # nothing beyond rank(ΔW)'s bound


def test_lokr_scale_rules(built):
    """s = α/r with r = lokr_w2_b rows; both factors stored whole: α ignored (s = 1)."""
    lowrank = load_adapter(built["lokr-w2-lowrank"][2])
    assert {m.scale for m in lowrank.modules} == {1.5}  # α = 3, r = 2
    full = load_adapter(built["lokr-full-matrix"][2])
    assert {m.scale for m in full.modules} == {1.0} and {m.alpha for m in full.modules} == {2.0}  # LyCORIS stores α = r


def test_lokr_full_full_ignores_any_alpha(built, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(built["lokr-full-matrix"][2]))
    sd = {k: (torch.tensor(7.0, dtype=v.dtype) if k.endswith(".alpha") else v) for k, v in sd.items()}
    save_file(sd, str(tmp_path / "a7.safetensors"))
    ad = load_adapter(tmp_path / "a7.safetensors")
    assert {m.scale for m in ad.modules} == {1.0} and {m.alpha for m in ad.modules} == {7.0}


TRUNC = ["locon-tucker", "loha", "loha-tucker", "loha-big", "lokr-w2-lowrank", "lokr-both-lowrank", "lokr-tucker",
         "lokr-full-matrix", "full"]


@pytest.mark.parametrize("case", TRUNC)
def test_truncate_is_eckart_young_and_loads_in_lycoris(built, case, tmp_path):
    from lycoris import create_lycoris_from_weights

    model, base, path = built[case]
    ad = load_adapter(path)
    k = 3
    out = tmp_path / "lora.safetensors"
    res = run_cli("truncate", path, "-o", out, "--rank", k)
    assert res.exit_code == 0, res.stderr + res.stdout
    new = load_adapter(out)
    assert {m.algo for m in new.modules} == {"lora"}
    from safetensors.torch import load_file

    # LyCORIS stores a non-Tucker LoHa/LoKr conv flattened (r, in·kh·kw): the file does not record the kernel,
    # so such a module is written 2-D and only modules whose shape the file fixes are loaded into LyCORIS here
    fixed = {m.name for m in ad.modules if m.kernel is not None or m.name.endswith("_lin")}
    weights = {k: v for k, v in load_file(str(out)).items() if k.split(".")[0] in fixed}
    fresh = copy.deepcopy(base)
    net, sd = create_lycoris_from_weights(1.0, str(out), fresh, weights_sd=weights)
    assert {type(x).__name__ for x in net.loras} == {"LoConModule"}
    net.apply_to()
    net.load_state_dict(sd, strict=False)
    net.double()
    for m in ad.modules:
        want = _true_delta(model, base, m)
        assert m.kind == "linear" or m.kernel == (3, 3)
        u, s, vh = torch.linalg.svd(want, full_matrices=False)
        best = (u[:, :k] * s[:k]) @ vh[:k]  # dense Eckart–Young
        got = to_torch(new.module(m.name).delta())
        assert float((got - best).norm() / best.norm()) < 1e-8, (case, m.name)
        if m.name not in fixed:
            continue
        applied = forward_delta(fresh, base, m.name.split("_", 1)[1])  # LyCORIS applies the LoRA we wrote
        assert float((applied - best).norm() / best.norm()) < 1e-6, (case, m.name)  # LyCORIS loads in float32


def test_truncate_says_when_lora_is_larger(built, tmp_path):
    res = run_cli("truncate", built["lokr-full-matrix"][2], "-o", tmp_path / "o.safetensors", "--rank", 20)
    assert res.exit_code == 0
    assert "larger as LoRA at the chosen rank than as stored" in res.stdout + res.stderr


@pytest.mark.parametrize("case,args,factor", [
    ("loha", ("--alpha", "4"), 2.0),  # α 2 → 4
    ("lokr-full-matrix", ("--factor", "2.5"), 2.5),  # α ignored: baked into lokr_w1
    ("full", ("--factor", "0.5"), 0.5),
    ("lokr-both-lowrank", ("--factor", "3"), 3.0),
    ("loha-tucker", ("--factor", "2", "--bake"), 2.0),  # baked into hada_w1_a
])
def test_rescale(built, case, args, factor, tmp_path):
    _, _, path = built[case]
    out = tmp_path / "r.safetensors"
    res = run_cli("rescale", path, "-o", out, *args)
    assert res.exit_code == 0, res.stderr + res.stdout
    before, after = load_adapter(path), load_adapter(out)
    for m in before.modules:
        got, d = after.module(m.name).delta(), m.delta()
        assert float(np.linalg.norm(got - factor * d) / np.linalg.norm(d)) < 1e-12
        assert after.module(m.name).algo == m.algo


def test_json_and_tables_show_the_algorithm(built):
    res = run_cli("rank", built["loha-tucker"][2], "--json")
    doc = json.loads(res.stdout)
    assert [m["algo"] for m in doc["modules"]] == ["loha", "loha"]
    assert {m["kind"] for m in doc["modules"]} == {"conv", "linear"}
    info = json.loads(run_cli("info", built["lokr-tucker"][2], "--json").stdout)
    assert info["algos"] == {"lokr": 2}
    text = run_cli("rank", built["lokr-tucker"][2]).stdout
    assert "algo" in text and "lokr" in text
    for cmd in ("footprint", "check"):
        assert run_cli(cmd, built["loha"][2]).exit_code == 0
    assert run_cli("diff", built["loha"][2], built["loha-tucker"][2]).exit_code == 0
