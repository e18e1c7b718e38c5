"""Hostile values that are not malformed: finite factors whose product overflows float64 (values ~1e200),
and special files where an adapter's files should be. No command may crash, hang or pretend.
`rank`/`report`/`diff`/`footprint` flag the module as non-finite; rewrites refuse it in one line."""

from __future__ import annotations

import json

import pytest
import torch
from builders import run_cli
from safetensors.torch import save_file

HUGE = "l.q_proj"


@pytest.fixture
def huge(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {
        f"base_model.model.{HUGE}.lora_A.weight": torch.randn(4, 16, generator=g, dtype=torch.float64) * 1e200,
        f"base_model.model.{HUGE}.lora_B.weight": torch.randn(8, 4, generator=g, dtype=torch.float64) * 1e200,
        "base_model.model.l.v_proj.lora_A.weight": torch.randn(4, 16, generator=g, dtype=torch.float64),
        "base_model.model.l.v_proj.lora_B.weight": torch.randn(8, 4, generator=g, dtype=torch.float64),
    }
    d = tmp_path / "huge"
    d.mkdir()
    save_file(sd, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}))
    return d


def test_rank_flags_the_overflowing_module_and_analyses_the_rest(huge):
    res = run_cli("rank", huge, "--json")
    assert res.exit_code == 0, res.stderr
    mods = {m["name"]: m for m in json.loads(res.stdout)["modules"]}
    assert "non_finite" in mods[HUGE]["flags"] and mods[HUGE]["singular_values"] is None
    sv = mods["l.v_proj"]["singular_values"]
    assert sv is not None and all(x >= 0 for x in sv) and sv[0] > 0


@pytest.mark.parametrize("cmd", [["truncate", "--rank", "2"], ["rescale", "--factor", "2"]])
def test_rewrites_refuse_it_in_one_line_naming_the_module(huge, tmp_path, cmd):
    out = tmp_path / "out"
    res = run_cli(cmd[0], huge, *cmd[1:], "-o", out)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and HUGE in lines[0] and "unexpected" not in lines[0], res.stderr
    assert not out.exists()


def test_diff_report_and_footprint_do_not_crash(huge, tmp_path):
    res = run_cli("diff", huge, huge, "--json")
    assert res.exit_code == 0, res.stderr
    mods = {m["name"]: m for m in json.loads(res.stdout)["modules"]}
    # a self-diff's distance is zero up to rounding, not bit-exactly: identical factors take a shortcut to 0.0
    # today, but through the QR route ‖[B, −B]·[A; A]‖ is 0 only if BLAS rounds both halves alike; l.v_proj's
    # ‖ΔW‖ ≈ 20, so rounding would leave ~1e-14 at most, far below 1e-12
    assert mods[HUGE]["status"] != "ok" and mods["l.v_proj"]["distance"] == pytest.approx(0.0, abs=1e-12)
    assert run_cli("report", huge, "-o", tmp_path / "r.html").exit_code == 0
    assert run_cli("footprint", huge, "--json").exit_code == 0


def test_a_special_file_named_like_the_config_is_named_as_such(tmp_path):
    """A FIFO (or a directory) called adapter_config.json is reported as what it is, not as missing,
    and reading it never blocks."""
    import os
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for kind in ("fifo", "dir"):
        d = tmp_path / kind
        d.mkdir()
        shutil.copy(root / "samples" / "planted" / "adapter_model.safetensors", d)
        if kind == "fifo":
            os.mkfifo(d / "adapter_config.json")
        else:
            (d / "adapter_config.json").mkdir()
        res = run_cli("info", d)
        assert res.exit_code == 2
        line = res.stderr.strip()
        assert "adapter_config.json" in line and "not a regular file" in line and "\n" not in line


def test_huge_integer_pattern_values_are_one_line(tmp_path):
    """An alpha_pattern value of 10**40 (a JSON integer beyond float range) is refused in one line; it
    used to escape as OverflowError from math.isfinite (found by the long fuzz run, input #4125)."""
    import shutil
    from pathlib import Path

    from lora_inspect.validate import is_count, is_number

    assert not is_number(10**40) and not is_number(float("inf")) and is_number(2**53) and not is_count(10**400)
    d = tmp_path / "a"
    shutil.copytree(Path(__file__).resolve().parent.parent / "samples" / "planted", d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["alpha_pattern"] = {"q_proj": 7}
    (d / "adapter_config.json").write_text(json.dumps(cfg).replace('"q_proj": 7', '"q_proj": ' + "1" + "0" * 40))
    res = run_cli("info", d)
    assert res.exit_code == 2
    line = res.stderr.strip()
    assert "alpha_pattern" in line and "unexpected" not in line and "\n" not in line
