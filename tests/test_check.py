"""check: every rule and every serving profile has a passing and a failing case; exit codes; policy files."""

import json
import shutil

import pytest
import torch
from builders import build_peft, edit_peft_tensors, run_cli


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no pyproject.toml above a tmp dir
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("check")


def _build(root, name, **kw):
    d = root / name
    d.mkdir()
    return build_peft(d, **kw).path


@pytest.fixture(scope="module")
def plain(root):  # q,v r=8 α=16 on tiny Llama, every B planted at rank 2
    return _build(root, "plain", target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16, planted={".": 2})


@pytest.fixture(scope="module")
def noisy(root):  # all-linear r=8, full-rank noise
    return _build(root, "noisy", target_modules="all-linear", r=8, lora_alpha=8)


@pytest.fixture(scope="module")
def variants(root):
    v = {
        "dora": _build(root, "dora", target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16, use_dora=True),
        "saved": _build(root, "saved", target_modules=["q_proj"], r=4, lora_alpha=8, modules_to_save=["lm_head"]),
        "bias": _build(root, "bias", arch="gpt2", target_modules=["c_attn"], r=4, lora_alpha=8, lora_bias=True,
                       fan_in_fan_out=True),  # tiny Llama's linears have no bias to merge into
        "alphas": _build(root, "alphas", target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16, alpha_pattern={"v_proj": 32}),
        "ranks": _build(root, "ranks", target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16, rank_pattern={"v_proj": 4}),
        "embed": _build(root, "embed", target_modules=["embed_tokens", "q_proj"], r=4, lora_alpha=4),
        "gpt2": _build(root, "gpt2", arch="gpt2", target_modules=["c_attn"], r=4, lora_alpha=4, fan_in_fan_out=True),
    }
    # NaN in one factor
    nan = _build(root, "nan", target_modules=["q_proj"], r=4, lora_alpha=4)

    def poison(sd):
        k = next(k for k in sorted(sd) if k.endswith("lora_A.weight"))
        sd[k][0, 0] = float("nan")
        return sd

    v["nan"] = edit_peft_tensors(nan, poison)
    unp = _build(root, "unpaired", target_modules=["q_proj"], r=4, lora_alpha=4)
    v["unpaired"] = edit_peft_tensors(unp, lambda sd: {k: t for k, t in sd.items() if "layers.1.self_attn.q_proj.lora_B" not in k})
    pre = _build(root, "prefixed", target_modules=["q_proj"], r=4, lora_alpha=4)
    v["prefixed"] = edit_peft_tensors(pre, lambda sd: {k.replace("base_model.model.model.", "base_model.model.model.language_model."): t
                                                     for k, t in sd.items()})
    # bare safetensors with alpha only in the header (no adapter_config.json)
    hdr = _build(root, "header", target_modules=["q_proj"], r=4, lora_alpha=16)
    from safetensors.torch import load_file, save_file

    bare = root / "bare"
    bare.mkdir()
    save_file(load_file(str(hdr / "adapter_model.safetensors")), str(bare / "lora.safetensors"), metadata={"lora_alpha": "16"})
    v["header"] = bare / "lora.safetensors"
    return v


def _json(r):
    assert r.exit_code in (0, 1), (r.exit_code, r.output)
    doc = json.loads(r.stdout)
    assert doc["schema"] == "lora-inspect/check/1"
    return doc


def _rules(r, adapter=0):
    return {x["rule"]: x for x in _json(r)["adapters"][adapter]["results"]}


def check(*args):
    return run_cli("check", *args, "--json")


# ---------------------------------------------------------------- plain rules
@pytest.mark.parametrize("args,rule,ok", [
    (("--max-rank", "8"), "max-rank", True),
    (("--max-rank", "4"), "max-rank", False),
    (("--max-params", "1,792"), "max-params", True),  # 2 layers × 8·((32+32) + (16+32))
    (("--max-params", "1791"), "max-params", False),
    (("--max-size", "100MB"), "max-size", True),
    (("--max-size", "1KiB"), "max-size", False),
    (("--max-extra-params", "0"), "max-extra-params", True),
    (("--min-energy", "0.999@2"), "min-energy", True),  # planted rank 2
    (("--min-energy", "1@1"), "min-energy", False),
    (("--deny-dora",), "dora", True),
    (("--allow-dora",), "dora", True),
    ((), "finite", True),
])
def test_rules_on_plain(plain, args, rule, ok):
    r = check(plain, *args)
    res = _rules(r)[rule]
    assert res["ok"] is ok and r.exit_code == (0 if ok else 1)
    if not ok:
        assert res["message"] and res["limit"] is not None and res["value"] is not None


def test_max_params_value_and_limit(plain):
    res = _rules(check(plain, "--max-params", "1k"))["max-params"]
    assert (res["value"], res["limit"], res["ok"]) == (1792, 1000, False)


def test_min_energy_fails_on_full_rank_noise(noisy):
    res = _rules(check(noisy, "--min-energy", "0.9@2"))["min-energy"]
    assert not res["ok"] and res["value"] < 0.9 and "keeps" in res["message"]


def test_extra_params_dora_finite_failures(variants):
    res = _rules(check(variants["saved"], "--max-extra-params", "3000"))["max-extra-params"]
    assert not res["ok"] and res["value"] == 96 * 32
    assert not _rules(check(variants["dora"], "--deny-dora"))["dora"]["ok"]
    assert _rules(check(variants["dora"], "--allow-dora"))["dora"]["ok"]
    r = check(variants["nan"])
    assert r.exit_code == 1 and _rules(r)["finite"]["value"] == 1
    assert check(variants["nan"], "--no-require-finite").exit_code == 0
    # with --min-energy the spectra have read the factors already: the finite rule must still name
    # exactly the poisoned tensor (the lora_A), not its clean partner
    rules = _rules(check(variants["nan"], "--min-energy", "0.5@2"))
    assert rules["finite"]["value"] == 1 and "lora_A.weight" in rules["finite"]["message"]


def test_nonfinite_full_tensor_found_with_spectra(variants, tmp_path):
    """A NaN in a full tensor (modules_to_save) is outside every module the spectra read."""
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "saved-nan"
    shutil.copytree(variants["saved"], d)
    sd = load_file(str(d / "adapter_model.safetensors"))
    key = next(k for k in sorted(sd) if "lm_head" in k)
    sd[key][3, 1] = float("inf")
    save_file(sd, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    for extra in ((), ("--min-energy", "0.1@1")):
        rules = _rules(check(d, *extra))
        assert not rules["finite"]["ok"] and key in rules["finite"]["message"]


def test_base_names_and_shapes(plain, variants, tmp_path):
    assert all(x["ok"] for x in _json(check(plain, "--base", "tiny-llama"))["adapters"][0]["results"])
    rules = _rules(check(variants["prefixed"], "--base", "tiny-llama", "--no-require-finite"))
    assert not rules["base: names"]["ok"] and "language_model." in rules["base: names"]["message"]
    cfg = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 56, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 96}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    rules = _rules(check(plain, "--base", tmp_path / "config.json"))
    assert rules["base: names"]["ok"] and not rules["base: shapes"]["ok"]  # v_proj 16×32 vs 32×32
    assert "v_proj" in rules["base: shapes"]["message"]
    one_layer = dict(cfg, num_key_value_heads=2, num_hidden_layers=1)
    (tmp_path / "config.json").write_text(json.dumps(one_layer))
    assert _rules(check(plain, "--base", tmp_path / "config.json"))["base: names"]["value"] == 2


# ---------------------------------------------------------------- serving profiles
def test_profiles_pass_on_plain(plain):
    r = check(plain, *sum((("--serving", p) for p in ("vllm", "llamacpp", "lorax", "sglang", "ollama")), ()))
    doc = _json(r)
    assert r.exit_code == 0 and doc["ok"]
    names = {x["rule"] for x in doc["adapters"][0]["results"]}
    assert {"vllm: rank", "vllm: dora", "llamacpp: one alpha", "lorax: targets", "sglang: module names",
            "ollama: architecture"} <= names


@pytest.mark.parametrize("variant,profile,rule", [
    ("dora", "vllm", "vllm: dora"),
    ("saved", "vllm", "vllm: modules_to_save"),
    ("bias", "vllm", "vllm: bias"),
    ("alphas", "vllm", "vllm: one scale"),
    ("ranks", "vllm", "vllm: one scale"),
    ("dora", "llamacpp", "llamacpp: dora"),
    ("saved", "llamacpp", "llamacpp: full embeddings"),
    ("alphas", "llamacpp", "llamacpp: one alpha"),
    ("embed", "lorax", "lorax: targets"),
    ("prefixed", "sglang", "sglang: module names"),
    ("header", "sglang", "sglang: alpha in config"),
    ("gpt2", "ollama", "ollama: architecture"),
    ("header", "ollama", "ollama: layout"),
])
def test_profile_failures(variants, variant, profile, rule):
    r = check(variants[variant], "--serving", profile, "--no-require-finite")
    res = _rules(r)[rule]
    assert r.exit_code == 1 and not res["ok"] and res["message"]


def test_profile_passes_where_server_accepts(variants):
    # llama.cpp uses α over each tensor's own rank: per-module ranks with one α are fine
    assert _rules(check(variants["ranks"], "--serving", "llamacpp"))["llamacpp: one alpha"]["ok"]
    assert _rules(check(variants["gpt2"], "--serving", "lorax"))["lorax: targets"]["ok"]
    assert _rules(check(variants["gpt2"], "--serving", "ollama", "--base", "tiny-llama"))["ollama: architecture"]["ok"]


def test_vllm_rank(plain):
    res = _rules(check(plain, "--serving", "vllm:1"))["vllm: rank"]
    assert (res["ok"], res["value"], res["limit"]) == (False, 8, 1)
    assert _rules(check(plain, "--serving", "vllm:8"))["vllm: rank"]["ok"]
    assert _rules(check(plain, "--serving", "vllm"))["vllm: rank"]["limit"] == 16  # vLLM's default
    for bad in ("vllm:24", "vllm:x", "triton", "vllm:0"):
        r = run_cli("check", plain, "--serving", bad)
        assert r.exit_code == 2 and "--serving" in r.stderr


def test_unpaired_is_a_failure_for_every_server(variants):
    r = check(variants["unpaired"], "--serving", "llamacpp")
    res = _rules(r)["paired factors"]
    assert r.exit_code == 1 and not res["ok"] and "unpaired" in res["message"]


# ---------------------------------------------------------------- exit codes, several adapters, reports
def test_exit_codes(plain, tmp_path):
    assert run_cli("check", plain).exit_code == 0
    assert run_cli("check", plain, "--max-rank", "2").exit_code == 1
    for args in (("--max-size", "12XB"), ("--max-params", "lots"), ("--min-energy", "0.9"), ("--min-energy", "2@4")):
        r = run_cli("check", plain, *args)
        assert r.exit_code == 2 and r.stderr.startswith("lora-inspect: error:") and r.stderr.count("\n") == 1
    assert run_cli("check", tmp_path / "missing").exit_code == 2
    (tmp_path / "empty").mkdir()
    assert run_cli("check", tmp_path / "empty").exit_code == 2
    (tmp_path / "junk.safetensors").write_bytes(b"nope")
    assert run_cli("check", tmp_path / "junk.safetensors").exit_code == 2


def test_directory_of_adapters_one_table(plain, noisy, tmp_path):
    d = tmp_path / "adapters"
    shutil.copytree(plain, d / "a")
    shutil.copytree(noisy, d / "nested" / "b")
    r = check(d, "--max-params", "2000")
    doc = _json(r)
    assert r.exit_code == 1 and len(doc["adapters"]) == 2
    assert [a["ok"] for a in doc["adapters"]] == [True, False]
    assert doc["failures"] == 1
    t = run_cli("check", d, "--max-params", "2000")
    assert t.stdout.count("max-params") == 2 and "FAIL" in t.stdout and "1 rule failed in 1 of 2 adapters" in t.stdout
    assert run_cli("check", d / "a", d / "nested" / "b", "--max-rank", "8").exit_code == 0


def test_github_step_summary(plain, tmp_path, monkeypatch):
    out = tmp_path / "summary.md"
    out.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(out))
    r = run_cli("check", plain, "--max-rank", "4", "--serving", "vllm:16")
    assert r.exit_code == 1
    text = out.read_text()
    assert text.startswith("earlier step\n")
    assert "| rule | value | limit | result | detail |" in text  # one table per adapter, titled by its path
    assert "| max-rank | 8 | 4 | FAIL |" in text and "1 rule failed" in text


def test_markdown_format(plain):
    r = run_cli("check", plain, "--max-rank", "16", "--format", "markdown")
    assert r.exit_code == 0 and "|---|---:|---:|---|---|" in r.stdout and "all 3 checks passed" in r.stdout


# ---------------------------------------------------------------- pyproject policy
def _pyproject(path, body):
    path.write_text("[project]\nname = \"x\"\n\n[tool.lora-inspect.check]\n" + body)


def test_pyproject_policy_and_overrides(plain, tmp_path, monkeypatch):
    _pyproject(tmp_path / "pyproject.toml", 'max-rank = 4\nmax-size = "100MB"\nserving = ["vllm:16"]\n')
    sub = tmp_path / "deep" / "er"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)  # found by walking up
    doc = _json(check(plain))
    assert doc["policy_source"] == str(tmp_path / "pyproject.toml")
    rules = {x["rule"]: x for x in doc["adapters"][0]["results"]}
    assert not rules["max-rank"]["ok"] and rules["max-size"]["limit"] == 100_000_000 and "vllm: rank" in rules
    assert check(plain, "--max-rank", "8").exit_code == 0  # the flag overrides the file
    assert run_cli("check", plain, "--no-config").exit_code == 0


@pytest.mark.parametrize("body,msg", [
    ("max-rnak = 4\n", "max-rnak"),
    ("max-rank = \"big\"\n", "max-rank"),
    ("serving = [\"vllm:24\"]\n", "vllm"),
    ("dora = \"maybe\"\n", "dora"),
    ("max-rank = \n", "not valid TOML"),
])
def test_pyproject_errors(plain, tmp_path, body, msg):
    _pyproject(tmp_path / "pyproject.toml", body)
    r = run_cli("check", plain)
    assert r.exit_code == 2 and msg in r.stderr


def test_pyproject_underscores_dora_and_base(plain, tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 56, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96}))
    _pyproject(tmp_path / "pyproject.toml", 'max_params = "1M"\ndora = "deny"\nbase = "cfg/config.json"\n')
    rules = _rules(check(plain))
    assert rules["max-params"]["limit"] == 1_000_000 and rules["dora"]["limit"] == "denied"
    assert not rules["base: names"]["ok"]  # layer 1 is not in a 1-layer base; path relative to pyproject


# ---------------------------------------------------------------- tensor data only when needed
def test_header_only_rules_read_no_tensor_data(plain, monkeypatch):
    from lora_inspect.formats import bin_source, tensors

    calls = []
    for cls in (tensors.SafetensorsSource, bin_source.StateDictSource):  # get() and the integrity bits read raw()
        orig = cls.raw
        monkeypatch.setattr(cls, "raw", lambda self, key, _o=orig: calls.append(key) or _o(self, key))
    r = run_cli("check", plain, "--no-integrity", "--max-rank", "8", "--max-size", "1MB", "--serving", "vllm",
                "--serving", "llamacpp", "--serving", "sglang", "--base", "tiny-llama", "--deny-dora")
    assert r.exit_code == 0 and calls == []
    run_cli("check", plain)  # the integrity rule (default) reads every tensor, once
    assert len(calls) == 8
    calls.clear()
    run_cli("check", plain, "--no-integrity", "--min-energy", "0.9@8")
    assert calls


def test_help():
    r = run_cli("check", "--help")
    assert r.exit_code == 0 and "lora-inspect check adapters/ --serving vllm:16 --max-size 100MB" in r.stdout
    assert max(len(line) for line in r.stdout.splitlines()) <= 80  # conftest sets COLUMNS=200
    from lora_inspect.commands.check import check as command

    assert command.short_help and command.short_help.startswith("Gate adapters against a policy")


# ---------------------------------------------------------------- review regressions
def test_vllm_one_shared_scale_that_is_not_the_global_one_fails(root):
    """alpha_pattern covering every module: all modules share α'/r, but vLLM applies the config's α/r."""
    both = {"q_proj": 32, "v_proj": 32}
    bad = _build(root, "all_alpha_pattern", target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16, alpha_pattern=both)
    res = _rules(check(bad, "--serving", "vllm", "--no-require-finite"))["vllm: one scale"]
    assert not res["ok"] and "global" in res["message"]
    # rank_pattern covering every module: the max over rank_pattern is vLLM's r (newer releases) → same scale
    fine = _build(root, "all_rank_pattern", target_modules=["q_proj", "v_proj"], r=8, lora_alpha=32,
                  rank_pattern={"q_proj": 16, "v_proj": 16})
    assert _rules(check(fine, "--serving", "vllm:16", "--no-require-finite"))["vllm: one scale"]["ok"]


def test_sglang_alpha_only_in_header_config_fails(variants, root):
    """A PEFT config kept only in the safetensors header (lora_adapter_metadata) is not adapter_config.json."""
    from safetensors.torch import load_file, save_file

    src = variants["header"]
    f = root / "meta" / "lora.safetensors"
    f.parent.mkdir()
    save_file(load_file(str(src)), str(f), metadata={"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 16})})
    res = _rules(check(f, "--serving", "sglang", "--no-require-finite"))["sglang: alpha in config"]
    assert not res["ok"] and "SGLang reads α = r" in res["message"]


# ---------------------------------------------------------------- the integrity rule (issue 9, class 4)
@pytest.fixture(scope="module")
def untrained(root):
    """Two of four modules with an all-zero B (PEFT initialises B to zero: saved before training)."""
    d = _build(root, "untrained", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)

    def zero(sd):
        for k in sorted(sd):
            if k.endswith("lora_B.weight") and ".layers.1." in k:
                sd[k] = torch.zeros_like(sd[k])
        return sd

    return edit_peft_tensors(d, zero)


def _zero_b_modules(path):
    """Independently: module names whose lora_B is all zero, read straight from the file."""
    from safetensors.torch import load_file

    sd = load_file(str(path / "adapter_model.safetensors"))
    return sorted(k.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
                  for k, t in sd.items() if k.endswith("lora_B.weight") and not t.any())


@pytest.mark.parametrize("extra", [(), ("--min-energy", "0.1@1")])  # from the values scan, and from the spectra
def test_integrity_fails_untrained_modules_by_name(untrained, extra):
    want = _zero_b_modules(untrained)
    assert len(want) == 2
    r = check(untrained, *extra)
    res = _rules(r)["trained"]
    assert r.exit_code == 1 and not res["ok"] and res["value"] == len(want)
    for name in want:
        assert name in res["message"]


def test_integrity_on_by_default_off_by_flag_and_pyproject(untrained, plain, tmp_path, monkeypatch):
    assert _rules(check(plain))["trained"]["ok"]
    r = check(untrained, "--no-integrity")
    assert r.exit_code == 0 and "trained" not in _rules(r) and "finite" not in _rules(r)
    _pyproject(tmp_path / "pyproject.toml", "integrity = false\n")
    monkeypatch.chdir(tmp_path)
    r = run_cli("check", untrained, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["policy"]["integrity"] is False
    r = run_cli("check", untrained, "--integrity", "--json")  # the flag overrides the file
    assert r.exit_code == 1
    _pyproject(tmp_path / "pyproject.toml", 'integrity = "yes"\n')
    r = run_cli("check", untrained)
    assert r.exit_code == 2 and "integrity must be true or false" in r.stderr


def test_integrity_kohya_all_zero_up(tmp_path):
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    src = Path(__file__).resolve().parent.parent / "samples" / "planted-kohya.safetensors"
    sd = load_file(str(src))
    sd = {k: (torch.zeros_like(t) if "lora_up" in k else t) for k, t in sd.items()}
    f = tmp_path / "zero.safetensors"
    save_file(sd, str(f))
    res = _rules(check(f))["trained"]
    assert not res["ok"] and res["value"] == sum(k.endswith("lora_up.weight") for k in sd)


def test_nan_rank_footer_names_modules_and_suggests_nothing_that_refuses(variants):
    from lora_inspect import load_adapter
    from lora_inspect.analysis import analyse
    from lora_inspect.report import truncate_commands

    res = run_cli("rank", variants["nan"])
    assert res.exit_code == 0
    bad = "model.layers.0.self_attn.q_proj"  # the first lora_A in key order was poisoned
    assert bad in res.stdout.splitlines()[-1] and "truncate --" not in res.stdout
    assert truncate_commands(analyse(load_adapter(variants["nan"]))) == []
