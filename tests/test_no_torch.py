"""Analysis needs no torch (issue 20): every analysis command — info, rank, check, footprint, diff, report,
truncate, rescale, convert, merge, scan — runs with ``import torch`` made to fail (:mod:`notorch`) and gives
the same output as a normal run in-process: the same JSON document and exit code, and byte-identical files.
Inputs cover every layout the registry reads (``layout_builders.BUILDERS``), a bf16 PEFT adapter and a DoRA
one; torch builds them here, where it is allowed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from builders import build_peft, run_cli
from layout_builders import BUILDERS
from notorch import blocked_env, run_blocked, run_many_blocked
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    return blocked_env(tmp_path_factory.mktemp("site"))


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Every layout's builder output, a bf16 PEFT adapter and a DoRA adapter."""
    root = tmp_path_factory.mktemp("src")
    out = {name: build(root / name).path for name, build in BUILDERS.items() if not (root / name).mkdir()}
    out["peft-bf16"] = build_peft(root / "bf16", arch="llama", seed=3, r=6, lora_alpha=12,
                                  target_modules=["q_proj", "v_proj"]).path
    weights = out["peft-bf16"] / "adapter_model.safetensors"
    save_file({k: v.bfloat16() for k, v in load_file(str(weights)).items()}, str(weights))
    out["peft-dora"] = build_peft(root / "dora", arch="llama", seed=4, r=4, lora_alpha=8, use_dora=True,
                                  target_modules=["q_proj", "down_proj"]).path
    return out


def _same(jobs: list[list], cwd: Path, env: dict[str, str]) -> None:
    """Each job's exit code and --json document, in-process (torch importable) and in one blocked
    interpreter: equal."""
    blocked = run_many_blocked([[*job, "--json"] for job in jobs], cwd, env)
    for job, (code, out, err) in zip(jobs, blocked):
        normal = run_cli(*job, "--json")
        assert code == normal.exit_code, (job, err)
        assert json.loads(out) == json.loads(normal.stdout), job


@pytest.mark.parametrize("layout", [*BUILDERS, "peft-bf16", "peft-dora"])
def test_reading_commands_without_torch(layout, sources, env, tmp_path):
    src = sources[layout]
    _same([["info", src], ["rank", src], ["footprint", src], ["check", src, "--max-size", "1GB"]], tmp_path, env)


@pytest.mark.parametrize("layout", ["peft", "kohya", "peft-bf16", "peft-dora", "lycoris", "mlx"])
def test_writing_commands_without_torch(layout, sources, env, tmp_path):
    """truncate, rescale and convert write the same bytes with torch blocked as without it."""
    src = sources[layout]
    suffix = "" if src.is_dir() else src.suffix
    jobs = [(["truncate", src, "--rank", "2"], "t" + suffix), (["rescale", src, "--factor", "0.5"], "r" + suffix),
            (["convert", src, "--to", "kohya"], "k.safetensors"), (["convert", src, "--to", "peft"], "p")]
    for side in ("normal", "blocked"):
        (tmp_path / side).mkdir()
    blocked = run_many_blocked([[*args, "-o", tmp_path / "blocked" / name] for args, name in jobs], tmp_path, env)
    for (args, name), (code, _, err) in zip(jobs, blocked):
        normal = run_cli(*args, "-o", tmp_path / "normal" / name)
        assert code == normal.exit_code, (args, err, normal.stdout)
        if code == 0:
            assert _files(tmp_path / "normal" / name) == _files(tmp_path / "blocked" / name), args


def _files(p: Path) -> dict[str, bytes]:
    if p.is_file():
        return {p.name: p.read_bytes()}
    return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}


def test_diff_merge_report_scan_without_torch(sources, env, tmp_path):
    a, b = sources["peft"], sources["peft-bf16"]
    _same([["diff", a, a], ["diff", sources["kohya"], sources["kohya"]]], tmp_path, env)
    for name, runner in (("normal", None), ("blocked", env)):
        out = tmp_path / name
        out.mkdir()
        args = ["merge", a, a, "--weights", "0.5,0.25", "-o", out / "m"]
        res = run_cli(*args) if runner is None else run_blocked(args, tmp_path, runner)
        assert (res.exit_code if runner is None else res.returncode) == 0
        rep = ["report", b, "-o", out / "r.md"]
        res = run_cli(*rep) if runner is None else run_blocked(rep, tmp_path, runner)
        assert (res.exit_code if runner is None else res.returncode) == 0, getattr(res, "stderr", "")
    assert _files(tmp_path / "normal" / "m") == _files(tmp_path / "blocked" / "m")
    assert (tmp_path / "normal" / "r.md").read_text().replace("normal", "X") == \
        (tmp_path / "blocked" / "r.md").read_text().replace("blocked", "X")
    hub = tmp_path / "hub"
    hub.mkdir()
    for name in ("peft", "kohya", "peft-bf16"):
        src = sources[name]
        (hub / (name if src.is_dir() else src.name)).symlink_to(src, target_is_directory=src.is_dir())
    rows = {}
    for name, runner in (("normal", None), ("blocked", env)):
        out = tmp_path / f"scan-{name}.jsonl"
        args = ["scan", hub, "-o", out, "--jobs", "2"]
        res = run_cli(*args) if runner is None else run_blocked(args, tmp_path, runner)
        assert (res.exit_code if runner is None else res.returncode) == 0, getattr(res, "stderr", "")
        rows[name] = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["path"])
    strip = ("seconds", "wall", "time", "started", "finished", "elapsed")
    for r in rows["normal"] + rows["blocked"]:
        for k in [k for k in r if any(s in k for s in strip)]:
            r.pop(k)
    assert rows["normal"] == rows["blocked"] and len(rows["normal"]) == 3


def test_the_torch_engine_says_in_one_line_how_to_get_torch(sources, env, tmp_path):
    """Where torch is the engine (a .bin read, training, calibration) and it is missing: exit 2, one line
    naming the command and the install; --help still works."""
    import torch

    torch.save({"base_model.model.q.lora_A.weight": torch.ones(2, 3),
                "base_model.model.q.lora_B.weight": torch.ones(3, 2)}, str(tmp_path / "adapter_model.bin"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    peft = sources["peft"]
    jobs = [["info", tmp_path / "adapter_model.bin"], ["train", "--task", "planted", "--rank", "4", "--steps", "2", "--out", tmp_path / "run"],
            ["truncate", peft, "-o", tmp_path / "c", "--rank", "2", "--calibrate", tmp_path / "adapter_model.bin"],
            ["train", "--help"], ["verify", "--help"]]
    got = run_many_blocked(jobs, tmp_path, env)
    for job, (code, _out, err) in zip(jobs[:3], got[:3]):
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "needs torch" in lines[0] and "pip install torch" in lines[0], (job, err)
        assert lines[0].startswith(f"lora-inspect: error: lora-inspect {job[0]} needs torch"), lines
    assert [code for code, _, _ in got[3:]] == [0, 0] and all("Usage" in out for _, out, _ in got[3:])


def test_another_missing_module_is_still_one_line(monkeypatch):
    """Only a missing torch gets the torch line; any other ImportError inside a command is the usual one line
    and exit 2, never a traceback."""
    from pathlib import Path

    import lora_inspect.analysis as analysis

    def broken(*a, **k):
        raise ModuleNotFoundError("No module named 'scipy'", name="scipy")

    monkeypatch.setattr(analysis, "analyse", broken)
    planted = Path(__file__).resolve().parents[1] / "samples" / "planted"
    res = run_cli("rank", planted)
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and "unexpected ModuleNotFoundError" in lines[0], res.stderr
    assert "torch" not in lines[0]
