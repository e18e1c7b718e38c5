"""GGUF LoRA adapters read as a layout (lora_inspect/formats/gguf_read.py), against llama.cpp's own converter.

The oracle is tests/data/gguf (README.md there): GGUF files written by llama.cpp's ``convert_lora_to_gguf.py``
from the PEFT adapters beside them (tiny Llama and Qwen2; plain, and rsLoRA with rank/alpha patterns). What
llama.cpp applies is computed here from the PEFT tensors alone (safetensors, no lora_inspect code): per module
(α / r)·B·A with α the config's lora_alpha (all the converter keeps) and r the module's rank
(``llama-adapter.h · get_scale``); a written PEFT adapter's ΔW comes from PEFT itself (``get_delta_weight``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import cli_json, peft_lora_layers, read_st, run_cli, sv_close, write_mlx

from lora_inspect.adapter import Adapter
from lora_inspect.arrays import to_torch
from lora_inspect.errors import InspectError
from lora_inspect.formats import load_adapter
from lora_inspect.formats.gguf_read import GgufReadLayout
from lora_inspect.formats.layout import Layout

gguf = pytest.importorskip("gguf")

DATA = Path(__file__).parent / "data" / "gguf"
# oracle file → (arch, its PEFT adapter, relative tolerance of its factors against PEFT's fp32 ones)
CASES = {
    "llama-plain-f32": ("llama", "llama-plain", 1e-5),
    "llama-rslora-f32": ("llama", "llama-rslora", 1e-5),
    "qwen2-plain-f32": ("qwen2", "qwen2-plain", 1e-5),
    "qwen2-rslora-f32": ("qwen2", "qwen2-rslora", 1e-5),
    "llama-plain-f16": ("llama", "llama-plain", 2e-3),  # fp16 factors: 2⁻¹¹ per entry
}
F32 = [c for c in CASES if c.endswith("f32")]
# GGUF tensor → transformers module, written out here (the reader derives it from gguf's name map)
_GGUF_TO_HF = {"output": "lm_head", "token_embd": "model.embed_tokens", "attn_q": "self_attn.q_proj",
               "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_down": "mlp.down_proj"}
# the interface hook convert() calls on the source layout once it exists (formats/gguf_read.py: with_base)
WIRED = "with_base" in Layout.__dict__


def with_base(ad: Adapter, base: Path) -> Adapter:
    """What convert() is to do with --base before it reads a GGUF source's factors (the layout's hook)."""
    assert isinstance(ad.layout, GgufReadLayout)
    return ad.layout.with_base(ad, base)


def _hf(gname: str) -> str:
    parts = gname.removesuffix(".weight").split(".")
    return _GGUF_TO_HF[parts[0]] if len(parts) == 1 else f"model.layers.{parts[1]}.{_GGUF_TO_HF[parts[2]]}"


def llamacpp_deltas(case: str) -> dict[str, torch.Tensor]:
    """Module path → the ΔW llama.cpp applies for ``case``, from its PEFT adapter's tensors (float64)."""
    peft_dir = DATA / CASES[case][1]
    alpha = json.loads((peft_dir / "adapter_config.json").read_text())["lora_alpha"]
    st = read_st(peft_dir / "adapter_model.safetensors")
    out = {}
    for key, a in st.items():
        name = key.removeprefix("base_model.model.")
        if key.endswith(".lora_A.weight"):
            out[name.removesuffix(".lora_A.weight")] = alpha / a.shape[0] * (st[key.replace("lora_A", "lora_B")] @ a)
        elif key.endswith(".lora_embedding_A"):  # PEFT applies (B·A)ᵀ: ΔW (vocab, dim)
            out[name.removesuffix(".lora_embedding_A")] = alpha / a.shape[0] * (st[key[:-1] + "B"] @ a).T
    return out


def peft_deltas(adapter_dir: Path, arch: str) -> dict[str, torch.Tensor]:
    """Module path → ΔW of a PEFT adapter as PEFT loads and applies it (``get_delta_weight``), float64."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(DATA / f"{arch}-base")))
    pm = PeftModel.from_pretrained(model, str(adapter_dir))
    return {name: layer.get_delta_weight("default").double() for name, layer in peft_lora_layers(pm).items()}


def assert_deltas(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float) -> None:
    assert set(got) == set(want)
    for name, w in want.items():
        err = float((got[name] - w).abs().max()) / float(w.abs().max())
        assert err <= tol, (name, err)


def gguf_pairs(path: Path) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(metadata, GGUF tensor → (lora_a, lora_b) float64) as gguf.GGUFReader reads the file."""
    r = gguf.GGUFReader(str(path))
    tensors = {t.name: np.array(t.data, dtype=np.float64) for t in r.tensors}
    pairs = {n.removesuffix(".lora_a"): (tensors[n], tensors[n[:-1] + "b"]) for n in tensors if n.endswith(".lora_a")}
    return {k: f.contents() for k, f in r.fields.items()}, pairs


def one_line_error(res, *needles: str) -> None:
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr)
    assert len(res.stderr.splitlines()) == 1 and "Traceback" not in res.stderr, res.stderr
    for n in needles:
        assert n in res.stderr, (n, res.stderr)


# ------------------------------------------------------------------ info and rank: no head counts needed

@pytest.mark.parametrize("case", CASES)
def test_info_lists_the_modules_with_their_ranks_and_alpha(case):
    peft_cfg = json.loads((DATA / CASES[case][1] / "adapter_config.json").read_text())
    doc = cli_json("info", DATA / f"{case}.gguf")
    assert doc["adapter"]["format"] == "gguf" and doc["adapter"]["alpha"] == peft_cfg["lora_alpha"]
    assert doc["alphas"] == {f"{peft_cfg['lora_alpha']:g}": doc["modules"]}  # one α for every tensor
    notes = " ".join(doc["notes"])
    assert "α/r per tensor" in notes and "taken as the truth" in notes and "rsLoRA" in notes
    ranks = {m["name"]: m["rank"] for m in cli_json("rank", DATA / f"{case}.gguf")["modules"]}
    want = {name: d.shape for name, d in llamacpp_deltas(case).items()}
    assert set(ranks) == set(want)
    st = read_st(DATA / CASES[case][1] / "adapter_model.safetensors")
    for name, r in ranks.items():
        key = next(k for k in st if f"model.{name}.lora_" in k and ("_A" in k))
        assert r == st[key].shape[0], name
    if "rslora" in case:
        assert "ranks differ per tensor (2, 4, 6)" in notes


@pytest.mark.parametrize("case", CASES)
def test_rank_gives_the_singular_values_of_what_llamacpp_applies(case):
    """σ of (α/r)·B·A from PEFT's factors (float64), also for the row-permuted Q/K of llama (no --base)."""
    doc = cli_json("rank", DATA / f"{case}.gguf")
    want = llamacpp_deltas(case)
    assert {m["name"] for m in doc["modules"]} == set(want)
    for m in doc["modules"]:
        sv_close(m["singular_values"], torch.linalg.svdvals(want[m["name"]]), CASES[case][2])


# ------------------------------------------------------------------ convert and merge: the transformers-space ΔW

def _convert_peft(case: str, out: Path):
    """convert --to peft --base through the library, with the source hook convert() is to call."""
    from lora_inspect.convert.run import convert

    ad = load_adapter(DATA / f"{case}.gguf")
    base = DATA / f"{CASES[case][0]}-base"
    return convert(with_base(ad, base), out, "peft", base=base)


@pytest.mark.parametrize("case", F32)
def test_convert_to_peft_gives_the_delta_llamacpp_applies(case, tmp_path):
    arch = CASES[case][0]
    _convert_peft(case, tmp_path / "out")
    assert_deltas(peft_deltas(tmp_path / "out", arch), llamacpp_deltas(case), 1e-5)


@pytest.mark.parametrize("case", F32)
def test_convert_cli_undoes_the_permutation_with_base_and_refuses_without(case, tmp_path):
    arch = CASES[case][0]
    src, out, base = DATA / f"{case}.gguf", tmp_path / "out", DATA / f"{arch}-base"
    if arch == "llama":
        one_line_error(run_cli("convert", src, "--to", "peft", "-o", out), "--base", "attn_")
        assert not out.exists()
    res = run_cli("convert", src, "--to", "peft", "-o", out, "--base", base)
    if arch == "llama" and not WIRED:  # convert() does not pass --base to the source yet: refused, never wrong
        one_line_error(res, "--base")
        assert not out.exists()
        return
    assert res.exit_code == 0, res.stderr
    assert_deltas(peft_deltas(out, arch), llamacpp_deltas(case), 1e-5)


def test_with_base_refuses_another_model(tmp_path):
    ad = load_adapter(DATA / "llama-plain-f32.gguf")
    with pytest.raises(InspectError, match="model_type 'qwen2'.*llama adapter"):
        with_base(ad, DATA / "qwen2-base")
    with pytest.raises(InspectError, match="--base"):
        with_base(ad, tmp_path)  # no config.json there


def test_merge_of_a_gguf_and_itself_is_twice_its_delta(tmp_path):
    from lora_inspect.convert.merge import merge

    res = run_cli("merge", DATA / "qwen2-rslora-f32.gguf", DATA / "qwen2-rslora-f32.gguf", "--to", "peft", "-o",
                  tmp_path / "q")
    assert res.exit_code == 0, res.stderr
    assert_deltas(peft_deltas(tmp_path / "q", "qwen2"),
                  {k: 2 * d for k, d in llamacpp_deltas("qwen2-rslora-f32").items()}, 1e-5)
    one_line_error(run_cli("merge", DATA / "llama-plain-f32.gguf", DATA / "llama-plain-f32.gguf", "--to", "peft", "-o",
                           tmp_path / "l"), "--base")
    ads = [load_adapter(DATA / "llama-rslora-f32.gguf") for _ in range(2)]
    merge([with_base(ad, DATA / "llama-base") for ad in ads], tmp_path / "l", target="peft")
    assert_deltas(peft_deltas(tmp_path / "l", "llama"),
                  {k: 2 * d for k, d in llamacpp_deltas("llama-rslora-f32").items()}, 1e-5)


LLAMA_F32 = [c for c in F32 if CASES[c][0] == "llama"]


@pytest.mark.parametrize("case", LLAMA_F32)
def test_merge_cli_with_base_of_a_llama_gguf_and_itself_is_twice_what_llamacpp_applies(case, tmp_path):
    src, out = DATA / f"{case}.gguf", tmp_path / "m"
    res = run_cli("merge", src, src, "--to", "peft", "--base", DATA / "llama-base", "-o", out)
    assert res.exit_code == 0, res.stderr
    assert_deltas(peft_deltas(out, "llama"), {k: 2 * d for k, d in llamacpp_deltas(case).items()}, 1e-5)


@pytest.mark.parametrize("gguf_first", [True, False])
def test_merge_cli_with_base_of_a_llama_gguf_and_its_peft_source_is_twice_peft(gguf_first, tmp_path):
    """llama-plain has one α and no rsLoRA, so its GGUF applies PEFT's ΔW; either input order, --base as a
    directory or its config.json (a PEFT first input needs no --to)."""
    base = DATA / "llama-base" if gguf_first else DATA / "llama-base" / "config.json"
    pair = [DATA / "llama-plain-f32.gguf", DATA / "llama-plain"]
    out = tmp_path / "m"
    res = run_cli("merge", *(pair if gguf_first else pair[::-1]), "--base", base, "-o", out,
                  *(("--to", "peft") if gguf_first else ()))
    assert res.exit_code == 0, res.stderr
    want = peft_deltas(DATA / "llama-plain", "llama")
    assert_deltas(peft_deltas(out, "llama"), {k: 2 * d for k, d in want.items()}, 1e-5)


def test_merge_and_diff_cli_refuse_a_llama_gguf_without_base_in_one_line(tmp_path):
    gg, peft = DATA / "llama-plain-f32.gguf", DATA / "llama-plain"
    for args in ((gg, gg, "--to", "peft"), (peft, gg), (gg, peft, "--to", "peft", "--method", "ties", "--density",
                                                        "0.5")):
        one_line_error(run_cli("merge", *args, "-o", tmp_path / "m"), "--base", str(gg), "Q/K")
        assert not (tmp_path / "m").exists() and not list(tmp_path.iterdir())
    one_line_error(run_cli("diff", gg, peft), "--base", str(gg), "Q/K")
    one_line_error(run_cli("merge", gg, peft, "--to", "peft", "--base", DATA / "qwen2-base", "-o", tmp_path / "m"),
                   "--base", "model_type 'qwen2'")
    assert not list(tmp_path.iterdir())


def test_diff_cli_with_base_compares_a_llama_gguf_in_transformers_space():
    """The GGUF against its PEFT source: the same ΔW (its factors are PEFT's, Q/K un-permuted); f32 against
    f16: the f16 rounding only."""
    gg, base = DATA / "llama-plain-f32.gguf", DATA / "llama-base"
    doc = cli_json("diff", gg, DATA / "llama-plain", "--base", base)
    assert doc["summary"]["compared"] == len(llamacpp_deltas("llama-plain-f32")) == len(doc["modules"])
    assert doc["summary"]["max_rel_distance"] <= 1e-12 and doc["summary"]["min_cosine"] >= 1 - 1e-12
    doc = cli_json("diff", gg, DATA / "llama-plain-f16.gguf", "--base", base)
    assert 0 < doc["summary"]["max_rel_distance"] <= 2e-3 and doc["summary"]["min_cosine"] >= 1 - 1e-6


# ------------------------------------------------------------------ truncate and rescale: GGUF written back

def test_truncate_writes_a_gguf_with_the_intended_spectrum(tmp_path):
    """Ranks 2/4/6 cut to ≤ 3: α becomes the most common new rank (3) and k_proj (rank 2) has 2/3 baked into B."""
    out = tmp_path / "t.gguf"
    res = run_cli("truncate", DATA / "llama-rslora-f32.gguf", "--rank", "3", "-o", out)
    assert res.exit_code == 0, res.stderr
    fields, pairs = gguf_pairs(out)
    src_fields, _ = gguf_pairs(DATA / "llama-rslora-f32.gguf")
    assert fields["adapter.lora.alpha"] == 3.0
    for k in ("general.type", "adapter.type", "general.architecture", "general.name"):
        assert fields[k] == src_fields[k], k
    want = llamacpp_deltas("llama-rslora-f32")
    assert {_hf(g) for g in pairs} == set(want)
    for g, (a, b) in pairs.items():
        r = b.shape[1]
        assert a.shape[0] == r == min(3, torch.linalg.matrix_rank(want[_hf(g)]))
        got = torch.linalg.svdvals(torch.from_numpy(3.0 / r * (b @ a)))
        sv_close(got, torch.linalg.svdvals(want[_hf(g)])[:r], 1e-5)


def test_rescale_multiplies_alpha_or_bakes_into_b(tmp_path):
    src = DATA / "qwen2-plain-f32.gguf"
    _, before = gguf_pairs(src)
    for args, alpha, b_factor in ((("--factor", "0.5"), 6.0, 1.0), (("--alpha", "24"), 24.0, 1.0),
                                  (("--factor", "2", "--bake"), 12.0, 2.0)):
        out = tmp_path / f"r{alpha}{b_factor}.gguf"
        res = run_cli("rescale", src, *args, "-o", out)
        assert res.exit_code == 0, res.stderr
        fields, after = gguf_pairs(out)
        assert fields["adapter.lora.alpha"] == alpha
        for g, (a, b) in after.items():
            assert np.array_equal(a, before[g][0]) and np.allclose(b, b_factor * before[g][1], rtol=1e-7, atol=0)


# ------------------------------------------------------------------ our own GGUF output reads back

@pytest.mark.parametrize("peft_dir", ["llama-rslora", "qwen2-plain"])
def test_convert_to_gguf_reads_back_with_the_same_delta(peft_dir, tmp_path):
    """PEFT → convert --to gguf (α/√r and patterns baked into B) → read: ΔW = PEFT's (1e-5); bf16 = fp32 rounded."""
    arch = peft_dir.split("-")[0]
    base = DATA / f"{arch}-base"
    for dt in ("fp32", "bf16"):
        res = run_cli("convert", DATA / peft_dir, "--to", "gguf", "--base", base, "--dtype", dt, "-o", tmp_path / f"{dt}.gguf")
        assert res.exit_code == 0, res.stderr
    ad, ad16 = (load_adapter(tmp_path / f"{dt}.gguf") for dt in ("fp32", "bf16"))
    ad, ad16 = (with_base(x, base) for x in (ad, ad16))
    assert_deltas({m.name: to_torch(m.delta()) for m in ad.modules}, peft_deltas(DATA / peft_dir, arch), 1e-5)
    assert {m.dtype for m in ad16.modules} == {"BF16"}
    for m in ad.modules:
        assert torch.equal(to_torch(ad16.source.raw(m.b_key)), to_torch(ad.source.get(m.b_key)).to(torch.bfloat16))
        assert np.array_equal(ad16.source.get(m.b_key), to_torch(ad16.source.raw(m.b_key)).float().numpy())


# ------------------------------------------------------------------ malformed files: one line, exit 2, nothing written

def _write(path: Path, *, alpha: object = 4.0, general_type: str = "adapter", tensors: dict | None = None,
           quantise: str | None = None) -> Path:
    g = torch.Generator().manual_seed(5)
    if tensors is None:
        tensors = {"blk.0.attn_v.weight.lora_a": (4, 32), "blk.0.attn_v.weight.lora_b": (16, 4)}
    w = gguf.GGUFWriter(str(path), arch="qwen2")
    w.add_type(general_type)
    w.add_string("adapter.type", "lora")
    if isinstance(alpha, str):
        w.add_string("adapter.lora.alpha", alpha)
    else:
        w.add_float32("adapter.lora.alpha", float(alpha))  # type: ignore[arg-type]
    for name, shape in tensors.items():
        data = torch.randn(shape, generator=g).numpy()
        if name == quantise:
            w.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


BAD = {
    "nan-alpha": (dict(alpha=math.nan), ["adapter.lora.alpha must be finite"]),
    "negative-alpha": (dict(alpha=-4.0), ["adapter.lora.alpha must be ≥ 0"]),
    "string-alpha": (dict(alpha="4"), ["adapter.lora.alpha is STRING, expected FLOAT32"]),
    "model": (dict(general_type="model"), ["general.type is 'model'"]),
    "unpaired": (dict(tensors={"blk.0.attn_v.weight.lora_a": (4, 32)}), ["blk.0.attn_v.weight.lora_a", "unpaired"]),
    "rank-mismatch": (dict(tensors={"blk.0.attn_v.weight.lora_a": (4, 32), "blk.0.attn_v.weight.lora_b": (16, 3)}),
                      ["blk.0.attn_v.weight", "rank mismatch"]),
    "quantised": (dict(quantise="blk.0.attn_v.weight.lora_a"), ["blk.0.attn_v.weight.lora_a", "Q8_0 (quantised)"]),
    "stray-tensor": (dict(tensors={"blk.0.attn_v.weight": (16, 32)}), ["'blk.0.attn_v.weight'", "llama.cpp refuses"]),
    "expert-stack": (dict(tensors={"blk.0.ffn_up_exps.weight.lora_a": (2, 4, 32),
                                   "blk.0.ffn_up_exps.weight.lora_b": (2, 64, 4)}), ["ffn_up_exps", "2-D"]),
}


@pytest.mark.parametrize("variant", BAD)
def test_malformed_gguf_is_one_line_exit_2_and_nothing_written(variant, tmp_path):
    kwargs, needles = BAD[variant]
    path = _write(tmp_path / "bad.gguf", **kwargs)
    one_line_error(run_cli("info", path), str(path), *needles)
    one_line_error(run_cli("truncate", path, "--rank", "1", "-o", tmp_path / "out.gguf"), str(path), *needles)
    assert not (tmp_path / "out.gguf").exists()


def test_truncated_and_non_gguf_files_are_one_line(tmp_path):
    good = (DATA / "qwen2-plain-f32.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(good[:5000])
    one_line_error(run_cli("info", tmp_path / "cut.gguf"), "cut.gguf", "not a readable GGUF file")
    (tmp_path / "text.gguf").write_text("hello")
    one_line_error(run_cli("info", tmp_path / "text.gguf"), "text.gguf")


# ------------------------------------------------------------------ detection of other files is unchanged

def test_detection_by_magic_leaves_other_layouts_alone(tmp_path, monkeypatch):
    import sys

    g = torch.Generator().manual_seed(0)
    mlx = write_mlx(tmp_path / "mlx", {"model.layers.0.self_attn.q_proj": (torch.randn(32, 4, generator=g),
                                                                           torch.randn(4, 32, generator=g))})
    assert cli_json("info", mlx)["adapter"]["format"] == "mlx"  # its keys end in .lora_a too
    (tmp_path / "x.bin").write_bytes((DATA / "qwen2-plain-f32.gguf").read_bytes())
    assert cli_json("info", tmp_path / "x.bin")["adapter"]["format"] == "gguf"  # by its magic, whatever its name
    monkeypatch.setitem(sys.modules, "gguf", None)  # gguf not installed: only GGUF files need it
    assert cli_json("info", mlx)["adapter"]["format"] == "mlx"
    one_line_error(run_cli("info", DATA / "qwen2-plain-f32.gguf"), "needs gguf", "lora-inspect[convert]")


def _gguf_model(path: Path) -> None:
    """A model GGUF (general.type = model), as llama.cpp's base converter writes one: weights, no LoRA."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type("model")
    w.add_block_count(1)
    w.add_tensor("blk.0.attn_q.weight", np.ones((8, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_scan_and_check_skip_a_model_gguf_beside_an_adapter(tmp_path):
    """A hub folder often holds the base model as GGUF too: it is not an adapter, so it gets no row (scan)
    and no verdict (check), as a safetensors base does — not an error row that fails the scan."""
    hub = tmp_path / "hub"
    (hub / "a").mkdir(parents=True)
    (hub / "a" / "qwen2.gguf").write_bytes((DATA / "qwen2-plain-f32.gguf").read_bytes())
    _gguf_model(hub / "model.gguf")
    res = run_cli("scan", hub, "-o", tmp_path / "rows.jsonl", "--json")
    assert res.exit_code == 0, res.stderr
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["qwen2.gguf"] and rows[0]["error"] is None
    doc = cli_json("check", hub)
    assert [Path(a["path"]).name for a in doc["adapters"]] == ["qwen2.gguf"]
    assert [Path(p).name for p in doc["not_adapters"]] == ["model.gguf"]
