"""Bad inputs: exit 2, exactly one line on stderr (``lora-inspect: error: …``), no traceback, nothing on
stdout. Damaged weights that can still be read (NaN, all-zero B) are flags, not errors."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import cli_json, run_cli, write_safetensors_raw
from safetensors.torch import save, save_file

R = 4
MOD = "base_model.model.model.layers.0.self_attn.q_proj"


def _peft_state(nan=False, zero_b=False):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name in [MOD, "base_model.model.model.layers.0.self_attn.v_proj"]:
        sd[f"{name}.lora_A.weight"] = torch.randn(R, 16, generator=g)
        sd[f"{name}.lora_B.weight"] = torch.randn(12, R, generator=g)
    if nan:
        sd[f"{MOD}.lora_B.weight"][3, 1] = float("nan")
    if zero_b:
        sd[f"{MOD}.lora_B.weight"].zero_()
    return sd


def _peft_dir(tmp: Path, sd=None, cfg=None) -> Path:
    d = tmp / "adapter"
    d.mkdir()
    save_file(sd if sd is not None else _peft_state(), str(d / "adapter_model.safetensors"))
    cfg = cfg if cfg is not None else {"peft_type": "LORA", "r": R, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    (d / "adapter_config.json").write_text(json.dumps(cfg) if isinstance(cfg, dict) else cfg)
    return d


def _split(blob: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def assert_bad(*args, contains: tuple[str, ...] = ()) -> str:
    res = run_cli(*args)
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr)
    assert res.stdout == ""
    assert "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("lora-inspect: error: "), lines[0]
    for c in contains:
        assert c in lines[0], (c, lines[0])
    return lines[0]


COMMANDS = pytest.mark.parametrize("cmd", ["info", "rank"])


# --- damaged safetensors containers ------------------------------------------------------------------


@COMMANDS
def test_truncated_file(tmp_path, cmd):
    blob = save(_peft_state())
    f = tmp_path / "a.safetensors"
    f.write_bytes(blob[:-10])
    assert_bad(cmd, f, contains=("truncated",))


@COMMANDS
def test_file_shorter_than_length_prefix(tmp_path, cmd):
    f = tmp_path / "a.safetensors"
    f.write_bytes(b"\x10\x00\x00")
    assert_bad(cmd, f, contains=("not a safetensors file",))


@COMMANDS
def test_header_length_beyond_file(tmp_path, cmd):
    header, data = _split(save(_peft_state()))
    f = write_safetensors_raw(tmp_path / "a.safetensors", header, data, header_len=10**6)
    assert_bad(cmd, f, contains=("header claims",))


@COMMANDS
def test_invalid_header_json(tmp_path, cmd):
    f = tmp_path / "a.safetensors"
    raw = b'{"x": {"dtype": "F32", '
    f.write_bytes(len(raw).to_bytes(8, "little") + raw)
    assert_bad(cmd, f, contains=("not valid JSON",))


@COMMANDS
def test_offsets_outside_file(tmp_path, cmd):
    header, data = _split(save(_peft_state()))
    key = f"{MOD}.lora_A.weight"
    s, e = header[key]["data_offsets"]
    header[key]["data_offsets"] = [s + len(data), e + len(data)]
    f = write_safetensors_raw(tmp_path / "a.safetensors", header, data)
    assert_bad(cmd, f, contains=(key,))


@COMMANDS
def test_overlapping_offsets(tmp_path, cmd):
    header, data = _split(save(_peft_state()))
    keys = sorted(header, key=lambda k: header[k]["data_offsets"][0] if k != "__metadata__" else -1)[1:]
    k0, k1 = keys[0], keys[1]
    size = header[k1]["data_offsets"][1] - header[k1]["data_offsets"][0]
    start = header[k0]["data_offsets"][0] + 4
    header[k1]["data_offsets"] = [start, start + size]
    f = write_safetensors_raw(tmp_path / "a.safetensors", header, data)
    assert_bad(cmd, f, contains=("overlap",))


@COMMANDS
def test_wrong_byte_count_for_dtype_and_shape(tmp_path, cmd):
    header, data = _split(save(_peft_state()))
    key = f"{MOD}.lora_B.weight"
    header[key]["dtype"] = "F64"  # same bytes, twice the size needed
    f = write_safetensors_raw(tmp_path / "a.safetensors", header, data)
    assert_bad(cmd, f, contains=(key, "needs"))


def test_header_not_an_object_and_bad_metadata(tmp_path):
    f = write_safetensors_raw(tmp_path / "a.safetensors", [1, 2])  # type: ignore[arg-type]
    assert_bad("info", f, contains=("not a JSON object",))
    f = write_safetensors_raw(tmp_path / "b.safetensors", {"__metadata__": {"a": 1}})
    assert_bad("info", f, contains=("__metadata__",))


@pytest.mark.parametrize("meta", ["[1, 2]", "{not json"])
def test_bad_lora_adapter_metadata(tmp_path, meta):
    f = tmp_path / "a.safetensors"
    save_file(_peft_state(), str(f), metadata={"lora_adapter_metadata": meta})
    assert_bad("info", f, contains=("lora_adapter_metadata",))


# --- configs, paths, directories -----------------------------------------------------------------------


@COMMANDS
def test_broken_adapter_config(tmp_path, cmd):
    d = _peft_dir(tmp_path, cfg='{"r": 4, "lora_alpha": ')
    assert_bad(cmd, d, contains=("adapter_config.json", "not valid JSON"))


def test_config_field_of_wrong_type(tmp_path):
    d = _peft_dir(tmp_path, cfg={"peft_type": "LORA", "r": "four", "lora_alpha": 8})
    assert_bad("info", d, contains=("r must be a number",))


def test_config_r_disagrees_with_shapes(tmp_path):
    d = _peft_dir(tmp_path, cfg={"peft_type": "LORA", "r": 16, "lora_alpha": 8})
    assert_bad("rank", d, contains=("stored rank 4", "r=16"))


@COMMANDS
def test_empty_directory(tmp_path, cmd):
    assert_bad(cmd, tmp_path, contains=("no adapter here",))


@COMMANDS
def test_missing_path(tmp_path, cmd):
    assert_bad(cmd, tmp_path / "nope", contains=("no such file",))


def test_not_an_adapter_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    assert_bad("info", f, contains=("not an adapter file",))
    g = tmp_path / "x.safetensors"
    save_file({"model.weight": torch.zeros(2, 2)}, str(g))
    assert_bad("info", g, contains=("no LoRA layout",))


# --- factor pairing ------------------------------------------------------------------------------------


@COMMANDS
def test_unpaired_factor_names_the_module(tmp_path, cmd):
    sd = _peft_state()
    del sd[f"{MOD}.lora_B.weight"]
    f = tmp_path / "a.safetensors"
    save_file(sd, str(f))
    line = assert_bad(cmd, f, contains=("unpaired",))
    assert "'model.layers.0.self_attn.q_proj'" in line


@COMMANDS
def test_rank_mismatch_names_the_module(tmp_path, cmd):
    sd = _peft_state()
    sd[f"{MOD}.lora_B.weight"] = torch.randn(12, R + 1)
    f = tmp_path / "a.safetensors"
    save_file(sd, str(f))
    assert_bad(cmd, f, contains=("rank mismatch", "'model.layers.0.self_attn.q_proj'"))


def test_kohya_unpaired_and_mismatch(tmp_path):
    f = tmp_path / "k.safetensors"
    save_file({"lora_unet_x_proj.lora_down.weight": torch.randn(4, 8)}, str(f))
    assert_bad("info", f, contains=("lora_unet_x_proj", "unpaired"))
    save_file({"lora_unet_x_proj.lora_down.weight": torch.randn(4, 8),
               "lora_unet_x_proj.lora_up.weight": torch.randn(8, 3)}, str(f))
    assert_bad("info", f, contains=("lora_unet_x_proj", "rank mismatch"))


# --- readable but damaged weights: flags, exit 0 ---------------------------------------------------------


def test_nan_weights_are_flagged_not_fatal(tmp_path):
    d = _peft_dir(tmp_path, _peft_state(nan=True))
    res = run_cli("rank", d, "--json")
    assert res.exit_code == 0 and res.stderr == ""
    doc = json.loads(res.stdout)
    mods = {m["name"]: m for m in doc["modules"]}
    bad = mods["model.layers.0.self_attn.q_proj"]
    assert bad["flags"] == ["non_finite"] and bad["singular_values"] is None and bad["energy_rank"] is None
    assert mods["model.layers.0.self_attn.v_proj"]["flags"] == []
    assert doc["summary"]["flags"] == {"non_finite": 1} and doc["summary"]["analysed"] == 1
    # the table view says so too, and still exits 0
    table = run_cli("rank", d)
    assert table.exit_code == 0 and "NaN" in table.stdout


def test_all_zero_b_is_flagged(tmp_path):
    d = _peft_dir(tmp_path, _peft_state(zero_b=True))
    doc = cli_json("rank", d)
    bad = next(m for m in doc["modules"] if m["name"] == "model.layers.0.self_attn.q_proj")
    assert bad["flags"] == ["zero_b"] and bad["singular_values"] == [0.0] * R and bad["energy_rank"] == 0
    assert doc["summary"]["flags"] == {"zero_b": 1}


# --- pickles that would run code -----------------------------------------------------------------------


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilOpen(_Evil):
    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("evil", [_Evil, _EvilOpen])
@pytest.mark.parametrize("layout", ["peft_dir", "torch_zip", "raw_pickle"])
def test_malicious_bin_never_runs(tmp_path, evil, layout):
    marker = tmp_path / "pwned"
    state = _peft_state()
    state["base_model.model.payload"] = evil(marker)
    if layout == "peft_dir":
        d = tmp_path / "adapter"
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": R, "lora_alpha": 8}))
        torch.save(state, d / "adapter_model.bin")
        target = d
    elif layout == "torch_zip":
        target = tmp_path / "evil.bin"
        torch.save(state, target)
    else:
        target = tmp_path / "evil.bin"
        target.write_bytes(pickle.dumps(state))
    assert not marker.exists()
    for cmd in ("info", "rank"):
        assert_bad(cmd, target)
    assert not marker.exists(), "the pickle ran code"


def test_truncated_bin(tmp_path):
    f = tmp_path / "adapter.bin"
    torch.save(_peft_state(), f)
    f.write_bytes(f.read_bytes()[:200])
    assert_bad("info", f, contains=("adapter.bin",))


# --- options ---------------------------------------------------------------------------------------------


def test_module_regex_matching_nothing(tmp_path):
    d = _peft_dir(tmp_path)
    assert_bad("rank", d, "--module", "lm_head", contains=("matches none",))
    assert_bad("rank", d, "--module", "q_proj(", contains=("not a valid regular expression",))


@pytest.mark.parametrize("energy", ["0", "-0.5", "1.5", "nan", "abc"])
def test_invalid_energy(tmp_path, energy):
    d = _peft_dir(tmp_path)
    assert_bad("rank", d, "--energy", energy, contains=("energy",))


def test_subprocess_one_line_exit_2(tmp_path):
    """A real process (``python -m lora_inspect``): one stderr line, exit 2, nothing on stdout."""
    f = tmp_path / "a.safetensors"
    f.write_bytes(save(_peft_state())[:-10])
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    for args in (["rank", str(f), "--json"],):
        p = subprocess.run([sys.executable, "-m", "lora_inspect", *args], capture_output=True, text=True, env=env,
                           timeout=120)
        assert p.returncode == 2, p
        assert p.stdout == ""
        lines = p.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("lora-inspect: error: "), p.stderr


# --- a PeftModel.state_dict() saved instead of save_pretrained's output ---------------------------------


@pytest.mark.parametrize("layout", ["file", "dir"])
def test_state_dict_with_adapter_name_is_refused_clearly(tmp_path, layout):
    """`model.state_dict()` of a PeftModel keeps the adapter name (`lora_A.default.weight`); PEFT would load
    it as a no-op. It must be refused naming the cause, not with a generic "no LoRA layout" message."""
    sd = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
          for k, v in _peft_state().items()}
    if layout == "dir":
        target = _peft_dir(tmp_path, sd)
    else:
        target = tmp_path / "model_state.safetensors"
        save_file(sd, str(target))
    line = assert_bad("info", target, contains=("adapter name", "save_pretrained"))
    assert "lora_A.default.weight" in line


def test_directory_with_adapters_only_in_subfolders_names_them(tmp_path):
    """save_pretrained(selected_adapters=["other"]) writes DIR/other/…: point the user at the subfolder."""
    _peft_dir(tmp_path)
    (tmp_path / "adapter").rename(tmp_path / "other")
    assert_bad("info", tmp_path, contains=("subfolders", "other"))
    assert run_cli("info", tmp_path / "other").exit_code == 0


@pytest.mark.parametrize("shape", [(0,), (4, 0)])
def test_zero3_empty_factors_name_the_cause(tmp_path, shape):
    """A ZeRO-3 save without gathering leaves empty (or 1-D) lora_A / lora_B tensors: say so."""
    sd = {k: torch.zeros(shape) for k in _peft_state()}
    assert_bad("info", _peft_dir(tmp_path, sd), contains=("ZeRO-3",))


def test_top_level_adapter_with_named_adapters_in_subfolders_notes_them(tmp_path):
    """save_pretrained with several adapters: "default" at the top, the others in subfolders; say so."""
    top = _peft_dir(tmp_path)
    sub = _peft_dir(top)
    sub.rename(top / "other")
    doc = cli_json("info", top)
    assert any("other" in n and "subfolder" in n for n in doc["notes"]), doc["notes"]


def test_lycoris_file_is_refused_not_misread(tmp_path):
    """A LyCORIS LoHa file uses kohya prefixes but other factors; reading it as plain LoRA would be wrong."""
    f = tmp_path / "loha.safetensors"
    save_file({
        "lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.randn(8, 4),
        "lora_unet_mid_block_attentions_0_proj_in.hada_w1_b": torch.randn(4, 8),
        "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(4.0),
    }, str(f))
    assert_bad("info", f, contains=("LyCORIS", "hada_w1_a"))
