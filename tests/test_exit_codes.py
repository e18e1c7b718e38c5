"""One exit-code rule for every command (issue 18): 0 ok; 1 a rule or policy failed (``scan``: some adapter
failed the policy or was unreadable); 2 bad input or usage, one line on stderr, nothing written.

Each case a newcomer meets in the first hour, with its code: scan ROOTs and manifests, policy files,
check's discovery (scan's), a text file named .safetensors, and convert --to gguf on the bundled sample."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import _hub_peft, run_cli, write_kohya

ROOT = Path(__file__).resolve().parents[1]
PLANTED = ROOT / "samples" / "planted"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no pyproject.toml above a tmp dir
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


def _mods(seed: int, r: int = 4, hidden: int = 16):
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.0.self_attn.{p}": (torch.randn(hidden, r, generator=g), torch.randn(r, hidden, generator=g))
            for p in ("q_proj", "v_proj")}


def _good(d: Path) -> Path:
    """A folder with two good adapters: a PEFT directory (r=8) and a kohya file (r=2)."""
    _hub_peft(d / "peft", _mods(0, r=8), 8)
    write_kohya(d / "k.safetensors",
                {"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (torch.ones(2, 8), torch.ones(8, 2), 2.0)})
    return d


def _one_error_line(res) -> str:
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lora-inspect: error: "), res.stderr
    assert "Traceback" not in res.output
    return lines[0]


def _policy(path: Path, body: str) -> Path:
    path.write_text('[project]\nname = "x"\n\n' + body)
    return path


# ---------------------------------------------------------------- scan
def test_scan_missing_root_is_usage_nothing_written(tmp_path):
    out = tmp_path / "r.jsonl"
    res = run_cli("scan", "/nonexistent", "-o", out)
    assert res.exit_code == 2
    assert "/nonexistent: no such file or directory" in _one_error_line(res)
    assert not out.exists() and res.stdout == ""


def test_scan_only_garbage_is_1_with_error_rows(tmp_path):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "a.safetensors").write_bytes(b"hello")
    (tmp_path / "g" / "b.safetensors").write_bytes(b"\x00" * 3)
    res = run_cli("scan", tmp_path / "g", "-o", tmp_path / "r.jsonl", "--json")
    assert res.exit_code == 1, res.output
    doc = json.loads(res.stdout)
    assert doc["adapters"] == doc["errors"] == 2 and doc["analysed"] == 0


def test_scan_good_adapters_0_policy_failure_1(tmp_path):
    good = _good(tmp_path / "hub")
    res = run_cli("scan", good, "-o", tmp_path / "ok.jsonl", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["analysed"] == 2
    pol = _policy(tmp_path / "pyproject.toml", "[tool.lora-inspect.check]\nmax-rank = 4\n")
    res = run_cli("scan", good, "-o", tmp_path / "fail.jsonl", "--policy", pol, "--json")
    assert res.exit_code == 1, res.output
    doc = json.loads(res.stdout)
    assert doc["check_failed"] == 1 and doc["failing_rules"] == [{"rule": "max-rank", "adapters": 1}]


def test_scan_glob_with_a_stray_text_file_is_usage_and_manifest_is_explicit(tmp_path):
    d = _good(tmp_path / "hub")
    (d / "notes.txt").write_text("peft\nk.safetensors\n")
    out = tmp_path / "r.jsonl"
    glob = sorted(str(p) for p in d.iterdir())  # what `scan hub/*` passes
    res = run_cli("scan", *glob, "-o", out)
    assert res.exit_code == 2
    line = _one_error_line(res)
    assert "notes.txt: not an adapter file" in line and "--manifest" in line and not out.exists()
    res = run_cli("scan", *[g for g in glob if not g.endswith(".txt")], "-o", out, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["adapters"] == 2
    res = run_cli("scan", "--manifest", d / "notes.txt", "-o", tmp_path / "m.jsonl", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["adapters"] == 2  # entries relative to the list
    (d / "more.txt").write_text("# a comment\nmissing-adapter\n")
    res = run_cli("scan", d / "peft", "--manifest", d / "more.txt", "-o", tmp_path / "m2.jsonl", "--json")
    assert res.exit_code == 1  # a listed path that is missing: its error row
    assert json.loads(res.stdout)["errors"] == 1
    assert run_cli("scan", "-o", tmp_path / "none.jsonl").exit_code == 2  # neither ROOT nor --manifest


def test_scan_summary_wall_is_the_process_time(tmp_path):
    from lora_inspect.scan.clock import _start_ticks, process_seconds

    assert _start_ticks("42 (a) b) c) S " + " ".join(str(i) for i in range(4, 30))) == 22
    res = run_cli("scan", _good(tmp_path / "hub"), "-o", tmp_path / "r.jsonl")
    assert res.exit_code == 0
    text = " ".join(res.stdout.split())  # the header line may be folded at the console's width
    if process_seconds() is None:  # not Linux: says what it measured instead
        assert "s scanning, not counting start-up" in text
    else:
        assert "s wall since the process started" in text and "of it scanning" in text
    doc = json.loads(run_cli("scan", tmp_path / "hub", "-o", tmp_path / "j.jsonl", "--json").stdout)
    assert "seconds" in doc and "process_seconds" in doc


# ---------------------------------------------------------------- policy files (one reader: scan and check)
@pytest.mark.parametrize("body", [
    "[tool.lora-inspect]\nmax-rank = 4\n",  # straight under [tool.lora-inspect]: read, not ignored
    "[tool.lora-inspect.check]\nmax-rank = 4\n",
    "[tool.lora-inspect]\nmax-params = \"1M\"\n[tool.lora-inspect.check]\nmax_rank = 4\n",  # both tables, one policy
])
def test_policy_tables_read_by_scan_and_check(tmp_path, body):
    good = _good(tmp_path / "hub")
    pol = _policy(tmp_path / "policy.toml", body)
    res = run_cli("scan", good, "-o", tmp_path / "r.jsonl", "--policy", pol, "--json")
    assert res.exit_code == 1 and json.loads(res.stdout)["failing_rules"][0]["rule"] == "max-rank"
    res = run_cli("check", good / "peft", "--policy", pol, "--json")
    assert res.exit_code == 1 and json.loads(res.stdout)["policy"]["max_rank"] == 4
    (tmp_path / "pyproject.toml").write_text(pol.read_text())  # found by check as the nearest pyproject.toml
    assert run_cli("check", good / "peft").exit_code == 1


@pytest.mark.parametrize("body,words", [
    ("[tool.black]\nline-length = 100\n", ["[tool.lora-inspect.check]", "[tool.lora-inspect]"]),
    ("[tool.lora-inspect.check]\n", ["sets a policy key"]),
    ("[tool.lora-inspect.check]\nmax-rnak = 4\n", ["unknown key 'max-rnak'"]),
    ("[tool.lora-inspect]\nmaxrank = 4\n", ["unknown key 'maxrank'", "[tool.lora-inspect]"]),
    ("[tool.lora-inspect.scan]\njobs = 2\n", ["unknown table [tool.lora-inspect.scan]"]),
    ("[tool.lora-inspect]\nmax-rank = 4\n[tool.lora-inspect.check]\nmax-rank = 8\n", ["max-rank is set in both"]),
])
def test_policy_that_sets_nothing_readable_or_unknown_is_2(tmp_path, body, words):
    good = _good(tmp_path / "hub")
    pol = _policy(tmp_path / "policy.toml", body)
    out = tmp_path / "r.jsonl"
    for args in (("scan", good, "-o", out, "--policy", pol), ("check", good, "--policy", pol)):
        res = run_cli(*args)
        assert res.exit_code == 2, res.output
        line = _one_error_line(res)
        assert str(pol) in line and all(w in line for w in words), line
    assert not out.exists()


def test_a_pyproject_without_the_table_is_fine_when_only_found(tmp_path):
    good = _good(tmp_path / "hub")
    _policy(tmp_path / "pyproject.toml", "[tool.black]\nline-length = 100\n")
    res = run_cli("check", good / "peft", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["policy_source"] is None


# ---------------------------------------------------------------- check: scan's discovery
def test_check_finds_nested_adapters_as_scan_does(tmp_path):
    from lora_inspect.scan import discover

    d = tmp_path / "a"
    _hub_peft(d, _mods(1, r=4), 4)
    _hub_peft(d / "other", _mods(2, r=2), 2)  # save_pretrained's second adapter in a subfolder
    res = run_cli("check", d, "--json")
    assert res.exit_code == 0, res.output
    checked = [a["path"] for a in json.loads(res.stdout)["adapters"]]
    assert checked == ["a", "a/other"]
    assert [str(p.relative_to(tmp_path)) for p in discover([d])] == checked


def test_check_skips_base_weights_in_folders_but_not_named_ones(tmp_path):
    """samples/planted holds base/model.safetensors: a folder's tensor file without LoRA keys is no adapter."""
    res = run_cli("check", PLANTED, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert len(doc["adapters"]) == 1 and doc["not_adapters"][0].endswith("base/model.safetensors")
    assert run_cli("check", PLANTED / "base" / "model.safetensors").exit_code == 2


def test_check_exit_codes(tmp_path):
    good = _good(tmp_path / "hub")
    assert run_cli("check", good).exit_code == 0
    assert run_cli("check", good, "--max-rank", "4").exit_code == 1
    assert run_cli("check", tmp_path / "missing").exit_code == 2
    (tmp_path / "notes.txt").write_text("x")
    res = run_cli("check", tmp_path / "notes.txt")
    assert res.exit_code == 2 and "not an adapter file" in _one_error_line(res) and "--manifest" not in res.stderr
    assert run_cli("check", good, "--policy", tmp_path / "nope.toml").exit_code == 2


# ---------------------------------------------------------------- a text file named .safetensors
@pytest.mark.parametrize("content,words", [
    (b"hello, this is a text file\n", "it is text, 'hello, this is a text file'"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n", "Git LFS pointer"),
    (b"<!DOCTYPE html><html><body>404</body></html>", "HTML"),
])
def test_text_safetensors_is_not_a_safetensors_file(tmp_path, content, words):
    x = tmp_path / "x.safetensors"
    x.write_bytes(content)
    for cmd in (("info", x), ("check", x)):
        res = run_cli(*cmd)
        assert res.exit_code == 2
        line = _one_error_line(res)
        assert f"{x}: not a safetensors file (" in line and words in line and "header length" not in line, line
    res = run_cli("scan", x, "-o", tmp_path / "r.jsonl", "--json")
    assert res.exit_code == 1 and "not a safetensors file" in json.loads(res.stdout)["error_examples"][0]["error"]


def test_a_truncated_safetensors_file_keeps_its_message(tmp_path):
    x = tmp_path / "t.safetensors"
    x.write_bytes((500).to_bytes(8, "little") + b'{"a": ')
    res = run_cli("info", x)
    assert res.exit_code == 2 and "truncated download" in _one_error_line(res)


# ---------------------------------------------------------------- GGUF where users meet it
def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute, written out independently."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_convert_planted_to_gguf_with_its_base(tmp_path):
    gguf = pytest.importorskip("gguf")
    from lora_inspect.formats import load_adapter

    out = tmp_path / "x.gguf"
    res = run_cli("convert", PLANTED, "--to", "gguf", "--arch", "llama", "--base", PLANTED / "base", "-o", out,
                  "--dtype", "fp32")
    assert res.exit_code == 0, res.output
    r = gguf.GGUFReader(str(out))
    f = {k: v.contents() for k, v in r.fields.items()}
    assert (f["general.architecture"], f["general.type"], f["adapter.type"]) == ("llama", "adapter", "lora")
    t = {x.name: x.data.astype(np.float64) for x in r.tensors}
    assert len(t) == 2 * 14
    n_heads = json.loads((PLANTED / "base" / "config.json").read_text())["n_heads"]
    ad = load_adapter(PLANTED)
    for hf, gg in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
        a, b = t[f"blk.1.{gg}.weight.lora_a"], t[f"blk.1.{gg}.weight.lora_b"]
        applied = float(f["adapter.lora.alpha"]) / b.shape[1] * (b @ a)  # llama.cpp: scale = α / rank
        want = ad.module(f"model.layers.1.self_attn.{hf}").delta()
        if hf != "v_proj":
            want = _llama_permute(want, n_heads)  # the head count came from the base's config.json
        np.testing.assert_allclose(applied, want, atol=1e-5 * np.abs(want).max())
    # the same without --arch and --base: model_type and the base folder come from the adapter's config
    res = run_cli("convert", PLANTED, "--to", "gguf", "-o", tmp_path / "y.gguf", "--dtype", "fp32")
    assert res.exit_code == 0, res.output
    assert {x.name for x in gguf.GGUFReader(str(tmp_path / "y.gguf")).tensors} == set(t)


def test_gguf_errors_name_the_flag_that_fixes_them(tmp_path):
    pytest.importorskip("gguf")
    import shutil

    ad = tmp_path / "ad"
    ad.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(PLANTED / name, ad / name)  # no base folder beside it
    (tmp_path / "nohead").mkdir()
    (tmp_path / "nohead" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "empty").mkdir()
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"model_type": "not-an-arch", "num_attention_heads": 4}')
    cases = [
        ((), ["--arch", "--base"]),
        (("--arch", "llama"), ["num_attention_heads", "--base"]),
        (("--base", tmp_path / "nohead"), ["has no num_attention_heads", "--base"]),
        (("--base", tmp_path / "empty"), ["no config.json", "--base"]),
        (("--base", tmp_path / "odd"), ["'not-an-arch'", "--arch"]),
        (("--arch", "foo"), ["--arch 'foo'"]),
    ]
    for args, words in cases:
        res = run_cli("convert", ad, "--to", "gguf", "-o", tmp_path / "x.gguf", *args)
        assert res.exit_code == 2, (args, res.output)
        line = _one_error_line(res)
        assert all(w in line for w in words), (args, line)
        assert not (tmp_path / "x.gguf").exists()


def test_check_names_each_adapter_once_and_policy_flags_that_contradict(tmp_path):
    """An adapter both named and found under a named folder is checked once; --policy with --no-config,
    and a --policy file with no [tool.lora-inspect] table, are one line, exit 2."""
    d = tmp_path / "hub" / "a"
    _hub_peft(d, _mods(1, r=4), 4)
    res = run_cli("check", tmp_path / "hub", d, "--json")  # found under hub/, and named
    assert res.exit_code == 0, res.output
    assert [a["path"] for a in json.loads(res.stdout)["adapters"]] == ["hub/a"]  # once, not twice
    pol = _policy(tmp_path / "policy.toml", "[tool.black]\nline-length = 100\n")
    res = run_cli("check", d, "--policy", pol, "--no-config")
    assert res.exit_code == 2 and "contradict" in _one_error_line(res)
    res = run_cli("check", d, "--policy", pol)
    assert res.exit_code == 2 and "no [tool.lora-inspect.check] or [tool.lora-inspect] table" in _one_error_line(res)
