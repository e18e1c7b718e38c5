"""``info`` and ``rank``: JSON schemas, exact counts and the summary a user acts on, recomputed here
independently from the tensors; markdown output; ``--module`` filtering."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from builders import cli_json, read_st, run_cli, sv_close
from safetensors.torch import save_file

P = "base_model.model.model.layers"
# module → (out, in, stored r, planted rank k, dtype)
MODS = {
    f"{P}.0.self_attn.q_proj": (32, 24, 8, 3, torch.float32),
    f"{P}.0.self_attn.v_proj": (16, 24, 8, 1, torch.float32),
    f"{P}.1.self_attn.q_proj": (32, 24, 8, 2, torch.bfloat16),
    f"{P}.1.self_attn.o_proj": (24, 32, 4, 2, torch.float32),  # r=4 through rank_pattern
}
FULL = {"base_model.model.lm_head.weight": (50, 24)}  # modules_to_save-style full tensor
CFG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "rank_pattern": {"o_proj": 4}, "alpha_pattern": {"o_proj": 2},
       "target_modules": ["q_proj", "v_proj", "o_proj"], "base_model_name_or_path": "tiny/llama"}


def _planted(out_dim, in_dim, r, k, seed):
    """B (out, r), A (r, in) with B@A = U·diag(σ)·Vᵀ, σ flat-ish over k directions: energy rank k at any τ ≥ 0.9."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(out_dim, r, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(in_dim, r, generator=g, dtype=torch.float64))[0]
    sigma = torch.zeros(r, dtype=torch.float64)
    sigma[:k] = torch.linspace(1.0, 0.8, k, dtype=torch.float64)
    return (u * sigma).contiguous(), v.T.contiguous()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "adapter"
    d.mkdir()
    sd = {}
    for i, (name, (o, n, r, k, dt)) in enumerate(MODS.items()):
        b, a = _planted(o, n, r, k, i)
        sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = a.to(dt), b.to(dt)
    for name, shape in FULL.items():
        sd[name] = torch.randn(shape)
    save_file(sd, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    (d / "adapter_config.json").write_text(json.dumps(CFG))
    return d


def _short(name):
    return name.removeprefix("base_model.model.")


def test_info_json(adapter):
    doc = cli_json("info", adapter)
    assert doc["schema"] == "lora-inspect/info/1"
    assert doc["adapter"] == {"path": str(adapter), "format": "peft", "peft_type": "LORA", "base_model": "tiny/llama",
                              "r": 8, "alpha": 16.0, "use_rslora": False, "use_dora": False}
    st = read_st(adapter / "adapter_model.safetensors")
    lora = {k: v for k, v in st.items() if "lora_" in k}
    assert doc["modules"] == len(MODS)
    assert doc["params"] == sum(v.numel() for v in lora.values()) == sum(r * (o + n) for o, n, r, _, _ in MODS.values())
    assert doc["extra_params"] == sum(math.prod(s) for s in FULL.values())
    assert [e["key"] for e in doc["extras"]] == list(FULL)
    assert doc["extra_bytes"] == doc["extra_params"] * 4
    lora_bytes = sum(r * (o + n) * (2 if dt == torch.bfloat16 else 4) for o, n, r, _, dt in MODS.values())
    assert doc["lora_bytes"] == lora_bytes
    assert doc["tensor_bytes"] == lora_bytes + doc["extra_bytes"]
    assert doc["file_bytes"] == (adapter / "adapter_model.safetensors").stat().st_size
    assert doc["ranks"] == {"4": 1, "8": 3} and doc["alphas"] == {"2": 1, "16": 3}
    assert doc["dtypes"] == {"BF16": 2, "F32": 7}
    assert doc["kinds"] == {"linear": 4}


REQUIRED = {"name", "kind", "shape", "rank", "alpha", "scale", "singular_values", "energy_rank", "stable_rank",
            "entropy_rank", "recommended_rank", "flags"}


@pytest.mark.parametrize("energy", [0.9, 0.99])
def test_rank_json_schema_and_summary(adapter, energy):
    doc = cli_json("rank", adapter, "--energy", str(energy))
    assert doc["schema"] == "lora-inspect/rank/1"
    assert doc["energy"] == energy
    assert {"path", "format", "r", "alpha", "use_rslora", "use_dora"} <= set(doc["adapter"])
    assert doc["adapter"]["format"] == "peft" and doc["adapter"]["r"] == 8
    mods = {m["name"]: m for m in doc["modules"]}
    assert set(mods) == {_short(n) for n in MODS}
    for full, (o, n, r, k, dt) in MODS.items():
        m = mods[_short(full)]
        assert set(m) >= REQUIRED
        alpha = 2.0 if "o_proj" in full else 16.0
        assert (m["kind"], m["shape"], m["rank"], m["alpha"]) == ("linear", [o, n], r, alpha)
        assert m["scale"] == pytest.approx(alpha / r)
        assert m["energy_rank"] == m["recommended_rank"] == k
        sigma = torch.zeros(r, dtype=torch.float64)
        sigma[:k] = torch.linspace(1.0, 0.8, k, dtype=torch.float64) * (alpha / r)
        sv_close(m["singular_values"], sigma, 1e-2 if dt == torch.bfloat16 else 1e-6)
        assert m["flags"] == ([] if k > 1 else ["spike"])

    # the summary, recomputed from the module entries
    s = doc["summary"]
    ks = [m["energy_rank"] for m in doc["modules"]]
    max_r = max(m["rank"] for m in doc["modules"])
    uni = 1
    while uni < max(ks):
        uni *= 2
    uni = min(uni, max_r)
    assert s["uniform_rank"] == uni == 4
    assert s["max_rank"] == 8 and s["modules"] == s["analysed"] == 4
    assert s["rank_pattern"] == {m["name"]: m["energy_rank"] for m in doc["modules"]}

    def count(rank_of):
        params = nbytes = 0
        for _full, (o, n, r, k, dt) in MODS.items():
            p = rank_of(r, k) * (o + n)
            params += p
            nbytes += p * (2 if dt == torch.bfloat16 else 4)
        return params, nbytes

    for key, rank_of in (("now", lambda r, k: r), ("uniform", lambda r, k: min(uni, r)), ("pattern", lambda r, k: k)):
        assert (s["params"][key], s["bytes"][key]) == count(rank_of), key
    assert s["params"]["now"] == cli_json("info", adapter)["params"]


def test_uniform_rank_is_capped_at_max_r(tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    b, a = _planted(16, 16, 6, 5, 0)  # energy rank 5 → 8, capped at r = 6
    save_file({f"{P}.0.mlp.up_proj.lora_A.weight": a.float(), f"{P}.0.mlp.up_proj.lora_B.weight": b.float()},
              str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 6, "lora_alpha": 6}))
    s = cli_json("rank", d, "--energy", "0.99")["summary"]
    assert s["uniform_rank"] == 6 and s["params"]["uniform"] == s["params"]["now"] == 6 * 32


def test_markdown_table(adapter):
    res = run_cli("rank", adapter, "--format", "markdown")
    assert res.exit_code == 0 and res.stderr == ""
    lines = res.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| module |"))
    assert re.fullmatch(r"\|(-{3}:?\|)+", lines[head + 1]), lines[head + 1]
    ncols = lines[head].count(" | ") + 1
    rows = []
    for line in lines[head + 2 :]:
        if not line.startswith("|"):
            break
        assert line.endswith(" |") and line.count(" | ") + 1 == ncols
        rows.append(line)
    assert sorted(r.split(" | ")[0].lstrip("| ") for r in rows) == sorted(_short(n) for n in MODS)
    info = run_cli("info", adapter, "--format", "markdown")
    assert info.exit_code == 0 and "| field | value |" in info.stdout


def test_table_output(adapter):
    res = run_cli("rank", adapter)
    assert res.exit_code == 0
    assert "model.layers.0.self_attn.q_proj" in res.stdout and "truncate --rank 4" in res.stdout
    assert run_cli("info", adapter).exit_code == 0


def test_module_filter(adapter):
    doc = cli_json("rank", adapter, "--module", r"q_proj$")
    names = [m["name"] for m in doc["modules"]]
    assert sorted(names) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert doc["summary"]["modules"] == 2
    assert doc["summary"]["params"]["now"] == 2 * 8 * (32 + 24)
    doc = cli_json("rank", adapter, "--module", "layers\\.1\\.")
    assert {m["name"] for m in doc["modules"]} == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.o_proj"}


def test_json_and_markdown_contradict(adapter):
    res = run_cli("rank", adapter, "--json", "--format", "markdown")
    assert res.exit_code == 2 and res.stdout == "" and len(res.stderr.splitlines()) == 1


def test_info_reads_the_header_only_without_torch(tmp_path):
    """`info` must stay header-only: in a fresh interpreter it prints its document without importing
    torch (kohya alphas included: they are read straight from the file)."""
    import subprocess
    import sys

    from builders import write_kohya

    g = torch.Generator().manual_seed(0)
    path = write_kohya(tmp_path / "k.safetensors", {
        "lora_unet_mid_block_attentions_0_proj_in": (torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g), 2.0),
        "lora_te_text_model_encoder_layers_0_mlp_fc1": (torch.randn(4, 8, 3, 3, generator=g),
                                                         torch.randn(5, 4, 1, 1, generator=g), None),
    }, dtype=torch.bfloat16)
    code = ("import sys, json; from lora_inspect.cli import main\n"
            "try:\n    main(['info', sys.argv[1], '--json'])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'info imported torch'\n")
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["alphas"] == {"2": 1, "4": 1}  # α read from bf16 bytes; the missing one is α = r = 4
    assert doc["params"] == 4 * (6 + 8) + 4 * (5 + 8 * 9)


def test_rank_default_energy_is_the_library_default():
    """commands.inspect keeps its own copy of the default τ so that `info` need not import torch."""
    from lora_inspect import analysis
    from lora_inspect.commands import inspect as cmd

    assert cmd.DEFAULT_ENERGY == analysis.DEFAULT_ENERGY


def test_reader_that_goes_away_does_not_change_the_exit_code(tmp_path):
    """`lora-inspect rank … --json | head -1` (issue 9): the command's exit code stays its own."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(300):  # ~300 KB of JSON: more than a pipe buffer
        n = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        sd[f"{n}.lora_A.weight"], sd[f"{n}.lora_B.weight"] = torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g)
    d = tmp_path / "many"
    d.mkdir()
    save_file(sd, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["q_proj"]}))
    root = Path(__file__).resolve().parent.parent
    for args in (["rank", str(d), "--json"], ["check", str(d), "--no-config", "--json"]):
        p = subprocess.Popen([sys.executable, "-m", "lora_inspect", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(root)})
        assert p.stdout is not None and p.stdout.readline()
        p.stdout.close()
        err = p.stderr.read().decode() if p.stderr else ""
        assert p.wait(timeout=120) == 0, err
        assert "Broken pipe" not in err and "Traceback" not in err


def test_huge_float64_weights_no_runtime_warning(tmp_path):
    """σ² of float64 factors near 1e150 overflows a plain sum of squares: every metric is computed on
    σ/σ₁ (scale-invariant), so `rank` gives the same numbers as for the unscaled adapter and no warning."""
    import warnings

    d = {}
    for scale, name in ((1.0, "small"), (1e150, "huge")):
        p = tmp_path / name
        p.mkdir()
        sd = {}
        for i in range(2):
            b, a = _planted(16, 12, 4, 2, 10 + i)
            sd[f"{P}.{i}.self_attn.q_proj.lora_A.weight"] = (a * scale).contiguous()
            sd[f"{P}.{i}.self_attn.q_proj.lora_B.weight"] = (b * scale).contiguous()
        save_file(sd, str(p / "adapter_model.safetensors"), metadata={"format": "pt"})
        (p / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4,
                                                           "target_modules": ["q_proj"]}))
        d[name] = p
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small, huge = cli_json("rank", d["small"]), cli_json("rank", d["huge"])
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
    for ms, mh in zip(small["modules"], huge["modules"]):
        assert mh["energy_rank"] == ms["energy_rank"] == 2
        assert mh["stable_rank"] == pytest.approx(ms["stable_rank"], rel=1e-9)
        assert mh["singular_values"][0] == pytest.approx(ms["singular_values"][0] * 1e300, rel=1e-9)
