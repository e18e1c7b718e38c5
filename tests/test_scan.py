"""`scan`: discovery, rows against independent computations, error rows = the single-file line, limits,
the journal (torn lines, resume after kills), Parquet, and Ray = local."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import _hub_peft, run_cli, write_hub, write_kohya, write_mlx

from lora_inspect.scan import ScanConfig, discover, run_scan, scan_one, summarise_rows
from lora_inspect.scan.journal import Journal, read_rows
from lora_inspect.views.schemas import SCAN_ROW_SCHEMA

ROOT = Path(__file__).resolve().parents[1]
CFG = ScanConfig(row_schema=SCAN_ROW_SCHEMA)


def _mods(seed: int, r: int = 4, hidden: int = 16):
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.0.self_attn.{p}": (torch.randn(hidden, r, generator=g), torch.randn(r, hidden, generator=g))
            for p in ("q_proj", "v_proj")}


def _tree(tmp: Path) -> Path:
    root = tmp / "hub"
    peft = _hub_peft(root / "b" / "peft", _mods(0), 4)
    (peft / "stray.safetensors").write_bytes(b"not listed: the directory is one adapter")
    _hub_peft(peft / "second", _mods(1, r=2), 2)  # save_pretrained's named adapter in a subfolder
    write_mlx(root / "a" / "mlx", _mods(2))
    write_kohya(root / "a" / "k.safetensors",
                {"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (torch.ones(2, 8), torch.ones(8, 2), 2.0)})
    (root / "a" / "notes.txt").write_text("ignored")
    os.symlink(root, root / "a" / "loop")  # a symlink loop: entered once
    os.mkfifo(root / "a" / "pipe.safetensors")  # listed, refused without being opened
    return root


def test_discovery_order_nesting_loops_and_special_files(tmp_path):
    root = _tree(tmp_path)
    found = [str(p.relative_to(root)) for p in discover([root])]
    assert found == ["a/k.safetensors", "a/pipe.safetensors", "a/mlx", "b/peft", "b/peft/second"]  # files, then subfolders


def test_manifest_relative_paths_comments_and_missing(tmp_path):
    from lora_inspect.errors import InspectError

    _tree(tmp_path)
    man = tmp_path / "list.txt"
    man.write_text("# adapters\nhub/b/peft\n\nhub/a/k.safetensors\nhub/missing\n")
    assert discover([], [man]) == [tmp_path / "hub/b/peft", tmp_path / "hub/a/k.safetensors", tmp_path / "hub/missing"]
    with pytest.raises(InspectError, match="--manifest"):  # read as a list only when named as one
        discover([man])


def test_row_against_dense_svd(tmp_path):
    mods = _mods(3, r=8, hidden=24)
    for (b, _a) in mods.values():
        b[:, 3:] *= 1e-4  # three strong directions in each module
    path = _hub_peft(tmp_path / "p", mods, 8)
    row = scan_one(str(path), CFG)
    assert row.error is None and row.layout == "peft" and row.modules == 2 and row.r == 8 and row.alpha == 16.0
    ranks = []
    for b, a in mods.values():
        s = np.linalg.svd((2.0 * b.double() @ a.double()).numpy(), compute_uv=False)
        e = np.cumsum(s**2) / np.sum(s**2)
        ranks.append(int(np.searchsorted(e, 0.95) + 1))
    assert row.energy_rank_max == max(ranks) and row.uniform_rank == 4  # next power of two ≥ 3
    assert row.params == 2 * 8 * 48 and row.params_uniform == 2 * 4 * 48 and row.bytes == 4 * row.params
    import hashlib
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        data = (path / name).read_bytes()
        h.update(f"{name}\0{len(data)}\0".encode() + data)
    assert row.digest == h.hexdigest() and row.check_ok is True


def test_error_rows_carry_the_single_file_line(tmp_path):
    root = _tree(tmp_path)
    bad = root / "a" / "k.safetensors"
    bad.write_bytes(bad.read_bytes()[:40])
    row = scan_one(str(bad), CFG)
    res = run_cli("info", str(bad))
    assert res.exit_code == 2
    assert row.error and row.error in res.stderr and row.digest is not None
    fifo = scan_one(str(root / "a" / "pipe.safetensors"), CFG)
    assert fifo.error and "regular file" in fifo.error or "FIFO" in fifo.error


def test_policy_failures_in_rows(tmp_path):
    from lora_inspect.checks import Policy

    path = _hub_peft(tmp_path / "p", _mods(4, r=8), 8)
    row = scan_one(str(path), ScanConfig(policy=Policy(max_rank=4), row_schema=SCAN_ROW_SCHEMA))
    assert row.check_ok is False and row.check_failed == ["max-rank"]


def test_time_and_memory_limits_give_error_rows(tmp_path):
    root = _tree(tmp_path)
    rows = run_scan([str(root)], tmp_path / "t.jsonl", CFG, jobs=2, timeout=1e-6).rows
    assert len(rows) == 5 and all("time limit" in r["error"] for r in rows)
    rows = run_scan([str(root / "b")], tmp_path / "m.jsonl", CFG, jobs=1, memory=1 << 16).rows
    assert len(rows) == 2 and all(r["error"] for r in rows)  # 64 KiB of address space: nothing fits


def test_journal_drops_a_torn_last_line(tmp_path):
    p = tmp_path / "j.jsonl"
    with Journal(p, resume=False) as j:
        j.append({"path": "x", "digest": "1"})
    p.write_bytes(p.read_bytes() + b'{"path": "y", "dig')
    with Journal(p, resume=True) as j:
        j.append({"path": "z", "digest": "2"})
    assert [r["path"] for r in read_rows(p)] == ["x", "z"]


def _canon(rows):
    return sorted(json.dumps(r, sort_keys=True) for r in rows)


@pytest.mark.slow
def test_killed_scans_resume_to_the_rows_of_an_uninterrupted_scan(tmp_path):
    hub = tmp_path / "hub"
    write_hub(hub, 40, seed=1, corrupt=0.1)
    full = run_scan([str(hub)], tmp_path / "full.jsonl", CFG, jobs=2).rows
    out = tmp_path / "killed.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "lora_inspect", "scan", str(hub), "-o", str(out), "--jobs", "2", "--json"]
    rnd = random.Random(7)
    cut_short = 0
    for attempt in range(3):
        before = len(read_rows(out))
        if before == len(full):  # an earlier run finished before its kill landed: nothing left to cut
            break
        target = rnd.randint(before + 1, before + 8)  # kill mid-scan: after a few more rows, mid-write or not
        proc = subprocess.Popen(cmd + (["--resume"] if attempt else []), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and (
                not out.exists() or out.read_bytes().count(b"\n") < target):
            time.sleep(0.01)
        time.sleep(rnd.uniform(0, 0.005))
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers
        proc.wait()
        got = len(read_rows(out))
        assert before < got <= len(full)  # each run added rows (a loaded machine may let one finish first)
        cut_short += got < len(full)
    assert cut_short, "no kill landed before the scan finished"
    res = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == (1 if any(r["error"] for r in full) else 0), res.stderr  # corrupt adapters: 1
    assert _canon(read_rows(out)) == _canon(full)
    assert len(full) == 44  # 40 adapters + the named adapters in subfolders (seeded)


def test_parquet_holds_the_journal_rows(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    root = _tree(tmp_path)
    outcome = run_scan([str(root)], tmp_path / "r.parquet", CFG)
    table = pq.read_table(tmp_path / "r.parquet").to_pylist()
    assert _canon(table) == _canon(read_rows(tmp_path / "r.parquet.jsonl")) == _canon(outcome.rows)


def test_summary_counts(tmp_path):
    root = _tree(tmp_path)
    rows = run_scan([str(root)], tmp_path / "s.jsonl", CFG).rows
    s = summarise_rows(rows)
    assert (s.adapters, s.analysed, s.errors) == (5, 4, 1)
    assert s.by_layout == {"peft": 2, "(error)": 1, "kohya": 1, "mlx": 1}
    assert s.bytes_saved == sum(r["bytes"] - r["bytes_uniform"] for r in rows if not r["error"])


def test_cli_json_summary_and_refusals(tmp_path):
    root = _tree(tmp_path)
    out = tmp_path / "c.jsonl"
    res = run_cli("scan", str(root), "-o", str(out), "--json")
    assert res.exit_code == 1, res.stderr  # the FIFO's error row
    doc = json.loads(res.stdout)
    assert doc["schema"] == "lora-inspect/scan/1" and doc["adapters"] == 5 and doc["new_rows"] == 5
    again = run_cli("scan", str(root), "-o", str(out))
    assert again.exit_code == 2 and "already exists" in again.stderr
    resumed = json.loads(run_cli("scan", str(root), "-o", str(out), "--resume", "--json").stdout)
    assert resumed["new_rows"] == 0 and resumed["skipped"] == 5 and len(read_rows(out)) == 5


def test_help_fits_80_columns_and_says_what_scan_does():
    r = run_cli("scan", "--help")
    assert r.exit_code == 0 and "--manifest FILE" in r.stdout
    assert max(len(line) for line in r.stdout.splitlines()) <= 80  # conftest sets COLUMNS=200
    from lora_inspect.commands.scan import scan as command

    assert command.short_help and command.short_help.startswith("Analyse and check every adapter")


@pytest.mark.slow
def test_ray_rows_equal_local_rows(tmp_path):
    ray = pytest.importorskip("ray")
    hub = tmp_path / "hub"
    write_hub(hub, 12, seed=2, corrupt=0.2)
    local = run_scan([str(hub)], tmp_path / "l.jsonl", CFG, jobs=2).rows
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        remote = run_scan([str(hub)], tmp_path / "r.jsonl", CFG, backend="ray", jobs=2).rows
    finally:
        ray.shutdown()
    assert _canon(remote) == _canon(local) and len(local) >= 12


def test_workers_start_with_one_blas_thread_and_the_driver_env_is_restored(tmp_path, monkeypatch):
    """BLAS reads its thread count when numpy loads, so the forkserver (which preloads the worker and numpy)
    and each worker are started with one thread in their environment; the driver's own values come back."""
    import multiprocessing as mp

    from lora_inspect.scan.local import ONE_BLAS_THREAD, one_blas_thread

    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "7")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    out = tmp_path / "env.txt"
    show = 'printf "%s %s %s" "$OPENBLAS_NUM_THREADS" "$OMP_NUM_THREADS" "$MKL_NUM_THREADS" > "$0"'
    ctx = mp.get_context("forkserver")
    proc = ctx.Process(target=subprocess.run, args=(["sh", "-c", show, str(out)],), kwargs={"check": True})
    with one_blas_thread():
        assert all(os.environ[k] == "1" for k in ONE_BLAS_THREAD)
        proc.start()
    proc.join(60)
    assert proc.exitcode == 0 and out.read_text() == "1 1 1"
    assert os.environ["OPENBLAS_NUM_THREADS"] == "7"
    assert "OMP_NUM_THREADS" not in os.environ and "MKL_NUM_THREADS" not in os.environ
