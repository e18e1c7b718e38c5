"""check's integrity rules on the raw bits of the memory map (``lora_inspect.integrity``): the same verdicts
as torch's ``isfinite``/``any`` on every float dtype, and ``check`` runs with ``import torch`` made to fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from notorch import blocked_env
from safetensors.torch import save_file

from lora_inspect.formats.tensors import SafetensorsSource
from lora_inspect.integrity import all_finite_bits, all_zero_bits, bit_view, nonfinite_and_zero

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
SPECIALS = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1e-40, -65504.0]


def _cases(seed: int) -> dict[str, torch.Tensor]:
    """Seeded tensors: random, with one special value planted at a random place, all +0/-0, a lone NaN."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for dt in DTYPES:
        name = str(dt).split(".")[-1]
        base = torch.randn(37, 11, generator=g, dtype=torch.float64)
        for i, v in enumerate(SPECIALS):
            t = base.clone()
            t.view(-1)[int(torch.randint(0, t.numel(), (1,), generator=g))] = v
            out[f"{name}.special{i}"] = t.to(dt)
        zeros = torch.zeros(5, 7, dtype=torch.float64)
        zeros.view(-1)[::3] = -0.0
        out[f"{name}.zeros"] = zeros.to(dt)
        out[f"{name}.nan_only"] = torch.full((3, 3), float("nan"), dtype=torch.float64).to(dt)
        out[f"{name}.tiny"] = torch.full((2, 2), 1e-30, dtype=torch.float64).to(dt)  # bf16 keeps it, fp16 → 0
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_bits_say_what_torch_says(tmp_path, seed):
    tensors = _cases(seed)
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    source = SafetensorsSource(path)
    for key, t in tensors.items():
        view = bit_view(source, key)
        assert view is not None, key
        assert all_finite_bits(view) == bool(torch.isfinite(t).all()), key
        assert all_zero_bits(view) == (not bool(t.any())), key
        assert nonfinite_and_zero(view) == (not bool(torch.isfinite(t).all()), not bool(t.any())), key
    # the poisoned ones really are flagged (the comparison above is not vacuous)
    assert not all_finite_bits(bit_view(source, "bfloat16.special0"))
    assert all_zero_bits(bit_view(source, "float16.zeros")) and not all_zero_bits(bit_view(source, "float16.nan_only"))


def test_other_dtypes_are_read_as_values(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"i": torch.arange(6, dtype=torch.int32), "e": torch.zeros(0)}, str(path))
    source = SafetensorsSource(path)
    assert bit_view(source, "i") is None and bit_view(source, "e") is None


def _check_json(args: list[str], cwd: Path, block: bool, tmp: Path) -> tuple[int, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORA_INSPECT_")}
    env.update(NO_COLOR="1", PYTHONPATH=str(ROOT))
    if block:
        env = blocked_env(tmp)
    res = subprocess.run([sys.executable, "-m", "lora_inspect", "check", *args, "--json"], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode in (0, 1), res.stderr
    return res.returncode, json.loads(res.stdout)


def test_check_runs_without_torch_and_says_the_same(tmp_path):
    """The integrity rules (NaN/inf, all-zero B) and the header rules need no torch: with ``import torch``
    made to fail, check gives the same verdicts, the poisoned adapter included."""
    from builders import write_kohya

    work = tmp_path / "w"
    work.mkdir()
    g = torch.Generator().manual_seed(7)
    down, up = torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g)
    bad_up = up.clone()
    bad_up[3, 1] = float("nan")
    write_kohya(work / "ok.safetensors", {"lora_unet_a": (down, up, 4.0)})
    write_kohya(work / "nan.safetensors", {"lora_unet_a": (down, bad_up, 4.0), "lora_unet_b": (down.clone(), up, 4.0)})
    write_kohya(work / "zero.safetensors", {"lora_unet_a": (down.bfloat16(), torch.zeros(8, 4).bfloat16(), 4.0)})
    (work / "pyproject.toml").write_text("")  # no policy from the tree around the test
    for args in (["ok.safetensors", "nan.safetensors", "zero.safetensors", "--max-size", "1MB"],
                 [str(ROOT / "samples" / "planted"), "--serving", "vllm:16"]):
        code, doc = _check_json(args, work, False, tmp_path)
        code_blocked, doc_blocked = _check_json(args, work, True, tmp_path)
        assert (code_blocked, doc_blocked) == (code, doc)
    code, doc = _check_json(["nan.safetensors", "zero.safetensors"], work, True, tmp_path)
    failed = {(Path(a["path"]).name, r["rule"]) for a in doc["adapters"] for r in a["results"] if not r["ok"]}
    assert code == 1 and failed == {("nan.safetensors", "finite"), ("zero.safetensors", "trained")}
