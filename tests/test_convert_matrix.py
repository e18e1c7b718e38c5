"""convert for every (source layout, target layout) pair: the written ΔW equals an independent
computation from the source's raw tensors, or the command refuses in one line and writes nothing.
Also the self-check itself: it catches a poisoned writer, and its sketch estimates ‖ΔW′ − ΔW‖_F."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_inspect.convert.canon import from_adapter
from lora_inspect.convert.check import Sketch
from lora_inspect.formats import TARGETS, load_adapter
from tests.builders import build_peft, run_cli, write_mlx
from tests.layout_builders import BUILDERS, llama_config

# one builder per layout, ΔW from the raw tensors (tests/layout_builders.py, shared with test_layout_registry)
SOURCES = {name: BUILDERS[name] for name in ("peft", "kohya", "mlx", "diffusers", "lycoris")}
# what each target can hold: a one-model target refuses a pipeline, diffusers refuses a module without a
# pipeline component, mlx refuses conv, GGUF needs an LLM architecture
OK = {"peft": {"peft", "kohya", "mlx", "gguf"}, "kohya": {"kohya", "diffusers"}, "mlx": {"peft", "kohya", "mlx", "gguf"},
      "diffusers": {"kohya", "diffusers"}, "lycoris": {"kohya", "diffusers"}}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    out = {}
    for name, make in SOURCES.items():
        built = make(tmp_path_factory.mktemp(name))
        out[name] = built.path, built.expected
    return out


def _out_path(tmp: Path, target: str) -> Path:
    return tmp / {"kohya": "out.safetensors", "diffusers": "out.safetensors", "gguf": "out.gguf"}.get(target, "out")


def _written_deltas(out: Path) -> dict:
    c = from_adapter(load_adapter(out))
    return {(m.component, m.path): torch.from_numpy(m.delta()) for m in c.modules}


def _gguf_deltas(out: Path, expected: dict) -> dict:
    """llama.cpp's rule on the file as gguf.GGUFReader reads it: ΔW = (α/r)·lora_b@lora_a (v/o/MLP only:
    Q and K rows are permuted; test_convert and the llama.cpp test cover them)."""
    import gguf

    r = gguf.GGUFReader(str(out))
    alpha = float(r.fields["adapter.lora.alpha"].contents())
    t = {x.name: torch.from_numpy(np.array(x.data, dtype=np.float64)) for x in r.tensors}
    names = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.down_proj": "ffn_down"}
    got = {}
    for comp, path in expected:
        layer, rest = path.split(".")[2], ".".join(path.split(".")[3:])
        if rest in names:
            base = f"blk.{layer}.{names[rest]}.weight"
            b, a = t[base + ".lora_b"], t[base + ".lora_a"]
            got[(comp, path)] = (alpha / b.shape[1]) * (b @ a)
    assert got, "no v/o/MLP module to check"
    return got


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("source", list(SOURCES))
def test_pair(sources, source, target, tmp_path):
    src, expected = sources[source]
    out = _out_path(tmp_path, target)
    extra = ["--base", str(llama_config(tmp_path / "base"))] if target == "gguf" else []
    res = run_cli("convert", src, "--to", target, "-o", out, "--dtype", "fp32", *extra)
    if target not in OK[source]:
        assert res.exit_code == 2, res.stdout
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if "lora-inspect-tmp" in p.name]
        return
    assert res.exit_code == 0, res.stderr
    got = _gguf_deltas(out, expected) if target == "gguf" else _written_deltas(out)
    one_model = len({c for c, _ in expected}) == 1 and len({c for c, _ in got}) == 1
    key = (lambda k: k[1]) if one_model else (lambda k: k)
    got_by = {key(k): v for k, v in got.items()}
    if target != "gguf":
        assert set(got_by) == {key(k) for k in expected}
    for k, want in expected.items():
        if key(k) not in got_by:
            continue
        have = got_by[key(k)].reshape(want.shape)
        assert float((have - want).norm() / want.norm()) < 1e-6, (source, target, k)


def test_round_trips_back_to_peft_are_exact(sources, tmp_path):
    """PEFT → X → PEFT for every X that reads back (GGUF is written, not read); diffusers files name a
    pipeline part, so the adapter is placed in one (``--component transformer``) on the way out."""
    src, expected = sources["peft"]
    for via in ("kohya", "mlx", "peft", "diffusers"):
        mid, back = _out_path(tmp_path / via, via), tmp_path / via / "back"
        mid.parent.mkdir(exist_ok=True)
        place = ["--component", "transformer"] if via == "diffusers" else []
        assert run_cli("convert", src, "--to", via, "-o", mid, "--dtype", "fp32", *place).exit_code == 0
        res = run_cli("convert", mid, "--to", "peft", "-o", back, "--dtype", "fp32")
        assert res.exit_code == 0, res.stderr
        got = {p: d for (_, p), d in _written_deltas(back).items()}
        for (_, p), want in expected.items():
            assert float((got[p] - want).norm() / want.norm()) < 1e-6, (via, p)


def test_loha_written_as_its_exact_lora(sources, tmp_path):
    src, expected = sources["lycoris"]
    res = run_cli("convert", src, "--to", "kohya", "-o", tmp_path / "k.safetensors", "--json")
    doc = json.loads(res.stdout)
    hows = {m["source"]: " ".join(m["how"]) for m in doc["modules"]}
    assert "LoHa as its exact LoRA" in hows["lora_unet_down_blocks_0_attentions_0_proj_in"]
    ranks = {m["source"]: m["rank_out"] for m in doc["modules"]}
    assert ranks["lora_unet_down_blocks_0_attentions_0_proj_in"] == 9  # r₁·r₂ = 3·3


def test_rename_only_copies_bytes_and_checks_scale_exactly(sources, tmp_path):
    """kohya → kohya keeps the stored factors bit for bit; the self-check's error is the scale's rounding only."""
    src, _ = sources["kohya"]
    res = run_cli("convert", src, "--to", "kohya", "-o", tmp_path / "k.safetensors", "--json")
    doc = json.loads(res.stdout)
    assert doc["self_check"]["max_relative_error"] <= 2.0**-22
    a, b = load_adapter(src), load_adapter(tmp_path / "k.safetensors")
    for ma, mb in zip(a.modules, b.modules):
        for ka, kb in ((ma.a_key, mb.a_key), (ma.b_key, mb.b_key)):
            xa, xb = ma.source.raw(ka), mb.source.raw(kb)
            assert xa.dtype == xb.dtype and np.array_equal(xa, xb)


@pytest.mark.parametrize("how", ["factor", "scale"])
def test_poisoned_writer_is_caught_and_nothing_written(sources, tmp_path, monkeypatch, how):
    """A writer that changes one ΔW by 1e-3 (a factor entry, or the stored α) fails the self-check."""
    from lora_inspect.formats.kohya import KohyaLayout

    real = KohyaLayout.convert_tensors

    def poisoned(self, canon, opts):
        w = real(self, canon, opts)
        key = next(k for k in w.tensors if k.endswith(".alpha" if how == "scale" else ".lora_up.weight"))
        w.tensors[key] = w.tensors[key] * (1 + 1e-3)
        return w

    monkeypatch.setattr(KohyaLayout, "convert_tensors", poisoned)
    src, _ = sources["kohya"]
    out = tmp_path / "k.safetensors"
    res = run_cli("convert", src, "--to", "kohya", "-o", out)
    assert res.exit_code == 2
    assert "self-check failed" in res.stderr and res.stderr.count("\n") == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def diff_norm(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> float:
    """Exact ‖B1@A1 − B2@A2‖_F: [B1, −B2] = Q_b R_b and [A1; A2]ᵀ = Q_a R_a, so it is ‖R_b R_aᵀ‖_F."""
    rb = torch.linalg.qr(torch.cat([b1, -b2], dim=1), mode="r")[1]
    ra = torch.linalg.qr(torch.cat([a1, a2], dim=0).T, mode="r")[1]
    return float(torch.linalg.matrix_norm(rb @ ra.T))


def test_sketch_estimates_the_frobenius_difference():
    """The sketched norm is within [1/4, 3]× the exact ‖B₁A₁ − B₂A₂‖_F (QR route) over many random cases."""
    g = torch.Generator().manual_seed(7)
    ratios = []
    for i in range(120):
        out, inp, r = 20 + i % 13, 30 + i % 7, 1 + i % 5
        b1, a1 = torch.randn(out, r, generator=g, dtype=torch.float64), torch.randn(r, inp, generator=g, dtype=torch.float64)
        b2, a2 = b1 + 1e-3 * torch.randn(out, r, generator=g, dtype=torch.float64), a1
        sk = Sketch(seed=i)
        est = sk.norm(sk.apply(b1.numpy(), a1.numpy(), 1.0) - sk.apply(b2.numpy(), a2.numpy(), 1.0))
        ratios.append(est / diff_norm(b1, a1, b2, a2))
    assert min(ratios) > 0.25 and max(ratios) < 3
    assert 0.8 < float(np.mean(np.square(ratios))) < 1.2  # E‖DX‖²/p = ‖D‖²


def test_sketch_probe_is_torch_randn():
    """The sketch's Gaussian X is what torch.randn drew for it (float64, widths below, at and past 16 elements)."""
    for seed in (0, 3):
        sk = Sketch(seed=seed)
        for width in (1, 2, 3, 5, 16, 17, 333):
            g = torch.Generator().manual_seed(seed * 1_000_003 + width)
            want = torch.randn(width, sk.columns, generator=g, dtype=torch.float64).numpy()
            np.testing.assert_allclose(sk.probe(width), want, rtol=1e-14, atol=0)


def _tiny_unet(seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=2, norm_num_groups=4).eval()


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_unet_adapter_placed_in_a_pipeline_loads_in_diffusers(tmp_path, dora):
    """A PEFT adapter trained on a UNet, `convert --component unet --to diffusers`: diffusers' own
    load_lora_adapter + fuse_lora gives PEFT's merged weights (DoRA magnitudes included)."""
    pytest.importorskip("diffusers")
    import copy

    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(_tiny_unet(0), LoraConfig(r=4, lora_alpha=6, target_modules=["to_q", "to_v", "proj_in"],
                                                  rank_pattern={"to_v": 2}, use_dora=dora))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "magnitude" in n:
                p.copy_(p.abs() * (1 + 0.2 * torch.rand(p.shape, generator=g)))
            elif "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(str(tmp_path / "peft"))
    merged = copy.deepcopy(pm).merge_and_unload().state_dict()
    res = run_cli("convert", tmp_path / "peft", "--to", "diffusers", "-o", tmp_path / "d.safetensors")
    assert res.exit_code == 2 and "component" in res.stderr and res.stderr.count("\n") == 1
    res = run_cli("convert", tmp_path / "peft", "--component", "unet", "--to", "diffusers", "-o",
                  tmp_path / "d.safetensors", "--dtype", "fp32")
    assert res.exit_code == 0, res.stderr
    unet = _tiny_unet(0)
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.load_lora_adapter(str(tmp_path / "d.safetensors"), prefix="unet")
    unet.fuse_lora()
    got = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}
    changed = [k for k in merged if not torch.equal(merged[k], base[k])]
    assert len(changed) >= 6
    for k in changed:
        assert torch.allclose(got[k].double(), merged[k].double(), atol=1e-5, rtol=0), k
    if dora:
        return  # kohya refuses DoRA (test_convert: test_refusals_one_line)
    # the kohya layout of the same adapter reads back with the same ΔW
    res = run_cli("convert", tmp_path / "peft", "--component", "unet", "--to", "kohya", "-o", tmp_path / "k.safetensors")
    assert res.exit_code == 0, res.stderr
    k = _written_deltas(tmp_path / "k.safetensors")
    d = _written_deltas(tmp_path / "d.safetensors")
    assert set(k) == set(d) and all(torch.allclose(k[n], d[n], atol=1e-6) for n in k)


def _tiny_bert(seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def test_bert_with_modules_to_save_peft_to_peft_same_logits(tmp_path):
    """PEFT → PEFT keeps modules_to_save (the classifier head) and rank/alpha patterns: PEFT's loader gives
    the source's logits; a layout that cannot hold full tensors refuses in one line."""
    from peft import LoraConfig, PeftModel, get_peft_model

    cfg = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"],
                     modules_to_save=["classifier"], alpha_pattern={"value": 2})
    pm = get_peft_model(_tiny_bert(0), cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(str(tmp_path / "src"))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))

    def logits(path: Path) -> torch.Tensor:
        m = PeftModel.from_pretrained(_tiny_bert(0), str(path)).eval()
        with torch.no_grad():
            return m(input_ids=ids).logits.double()

    res = run_cli("convert", tmp_path / "src", "--to", "peft", "-o", tmp_path / "out", "--dtype", "fp32")
    assert res.exit_code == 0, res.stderr
    ref, got = logits(tmp_path / "src"), logits(tmp_path / "out")
    base = _tiny_bert(0)
    with torch.no_grad():
        plain = base(input_ids=ids).logits.double()
    assert float((ref - plain).abs().max()) > 1e-2  # the adapter and head change the logits
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)
    res = run_cli("convert", tmp_path / "src", "--to", "kohya", "-o", tmp_path / "k.safetensors")
    assert res.exit_code == 2 and "modules_to_save" in res.stderr and res.stderr.count("\n") == 1


@pytest.mark.parametrize("scale", [0.0, -0.0, -2.0])
@pytest.mark.parametrize("target", ["kohya", "peft", "diffusers"])
def test_zero_or_negative_scale_is_baked(tmp_path, scale, target):
    """An mlx-lm scale ≤ 0 cannot be a stored α (0 means α = r; negative α is refused): it is baked into B and
    the written ΔW is still scale·B@A."""
    g = torch.Generator().manual_seed(9)
    b, a = torch.randn(16, 4, generator=g), torch.randn(4, 16, generator=g)
    src = write_mlx(tmp_path / "mx", {"model.layers.0.self_attn.q_proj": (b, a)}, scale=scale)
    out = _out_path(tmp_path, target)
    place = ["--component", "transformer"] if target == "diffusers" else []
    res = run_cli("convert", src, "--to", target, "-o", out, "--dtype", "fp32", *place)
    assert res.exit_code == 0, res.stderr
    (got,) = _written_deltas(out).values()
    want = scale * (b.double() @ a.double())
    assert float((got - want).norm()) <= 1e-6 * max(float(want.norm()), 1.0)


def test_error_paths_are_one_line_naming_the_file(sources, tmp_path):
    """Refusals from inside the conversion name the source file: --component on a pipeline, a module the
    kohya writer cannot name, DoRA on only some modules to mlx-lm."""
    from safetensors.torch import load_file, save_file

    ksrc, _ = sources["kohya"]
    res = run_cli("convert", ksrc, "--component", "unet", "--to", "diffusers", "-o", tmp_path / "d.safetensors")
    assert res.exit_code == 2 and res.stderr.count("\n") == 1
    assert str(ksrc) in res.stderr and "already belong to" in res.stderr
    # a PEFT module name whose kohya form cannot map back (dots in the name)
    psrc, _ = sources["peft"]
    bad = tmp_path / "bad"
    shutil.copytree(psrc, bad)
    sd = load_file(str(bad / "adapter_model.safetensors"))
    sd = {k.replace("layers.0.self_attn.q_proj", "layers.0.self_attn.q_proj.._x"): v for k, v in sd.items()}
    save_file(sd, str(bad / "adapter_model.safetensors"))
    res = run_cli("convert", bad, "--to", "kohya", "-o", tmp_path / "k.safetensors")
    assert res.exit_code == 2 and res.stderr.count("\n") == 1
    assert str(bad) in res.stderr and "cannot be mapped to kohya" in res.stderr
    assert not (tmp_path / "k.safetensors").exists()


def test_mlx_refuses_dora_on_only_some_modules(tmp_path):
    dora = build_peft(tmp_path, arch="llama", seed=8, r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    from safetensors.torch import load_file

    weights = str(dora.path / "adapter_model.safetensors")
    save_file({k: v for k, v in load_file(weights).items() if not ("layers.1" in k and "magnitude" in k)}, weights)
    res = run_cli("convert", dora.path, "--to", "mlx", "-o", tmp_path / "m")
    assert res.exit_code == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "layers.1" in res.stderr and "fine_tune_type dora" in res.stderr and str(dora.path) in res.stderr
    assert not (tmp_path / "m").exists()
