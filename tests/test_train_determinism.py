"""train writes deterministic bytes and picks a sane CPU thread count by itself.

- The safetensors files go through the project's writer (``lora_inspect.files.write_safetensors``: sorted
  header keys and metadata), not ``safetensors.torch.save_file`` (metadata in hash order).
- Without ``--threads``, the tiny model trains on one thread (torch's default, all cores, made a
  100-step run about 9× slower on a busy 2-core machine: see ``default_threads``) and the caller's
  thread count is restored.
"""

from __future__ import annotations

import json

import pytest
import torch

from lora_inspect.files import write_safetensors
from lora_inspect.train import TrainConfig, run_training
from lora_inspect.train.io import atomic_save_safetensors, load_safetensors
from lora_inspect.train.loop import ONE_THREAD_MAX_DIM, cpu_threads, default_threads


def _header(path) -> bytes:
    raw = path.read_bytes()
    return raw[8 : 8 + int.from_bytes(raw[:8], "little")]


def test_atomic_save_is_the_deterministic_writer(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(3, 4, generator=g), "a.weight": torch.randn(2, generator=g).to(torch.float16),
               "ids": torch.arange(5, dtype=torch.int32)}
    meta = {"format": "pt", "zeta": "1", "alpha": "2"}
    atomic_save_safetensors(tensors, tmp_path / "x.safetensors", metadata=meta)
    write_safetensors(tmp_path / "y.safetensors", tensors, meta)
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "y.safetensors").read_bytes()
    header = json.loads(_header(tmp_path / "x.safetensors"))
    assert list(header["__metadata__"]) == ["alpha", "format", "zeta"]
    assert list(header["b.weight"]) == sorted(header["b.weight"])  # dtype/shape/data_offsets in sorted order
    assert [p.name for p in tmp_path.iterdir()] != [] and not list(tmp_path.glob(".*.tmp"))
    back = load_safetensors(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_a_failed_write_is_one_line_and_leaves_no_temp(tmp_path):
    from lora_inspect.errors import InspectError

    with pytest.raises(InspectError, match=r"cannot store tensor"):
        atomic_save_safetensors({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "c.safetensors")
    with pytest.raises(InspectError, match="cannot write"):
        atomic_save_safetensors({"w": torch.zeros(2)}, tmp_path / "missing-dir" / "w.safetensors")
    assert list(tmp_path.iterdir()) == []


def _short_run(out, threads=None):
    cfg = TrainConfig(steps=3, batch_size=2, eval_every=0, progress=False, threads=threads)
    run_training(out, task="planted", rank=2, targets=["q_proj", "v_proj"], seq_len=8, train_cfg=cfg)


def test_two_runs_write_identical_files(tmp_path):
    _short_run(tmp_path / "a", threads=1)
    _short_run(tmp_path / "b", threads=1)
    for f in ("adapter_model.safetensors", "adapter_config.json", "base/model.safetensors", "base/config.json",
              "heldout.safetensors", "teacher_delta.safetensors"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    header = json.loads(_header(tmp_path / "a" / "adapter_model.safetensors"))
    key = next(k for k in header if k != "__metadata__")
    assert list(header[key]) == ["data_offsets", "dtype", "shape"]  # written by write_safetensors


def test_default_threads_rule(monkeypatch):
    assert default_threads(64) == default_threads(ONE_THREAD_MAX_DIM) == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_threads(4096) == 4 and default_threads(None) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert default_threads(4096) == 1


def test_training_uses_the_default_and_restores(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _short_run(tmp_path / "o")  # threads=None: the tiny model → 1
        assert torch.get_num_threads() == 2
        config = json.loads((tmp_path / "o" / "log.jsonl").read_text().splitlines()[0])
        assert config["event"] == "config" and config["threads"] == 1
        with cpu_threads(TrainConfig(threads=3), 64) as n:
            assert n == torch.get_num_threads() == 3
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_full_disk_while_training_is_one_line_and_leaves_no_temp(tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: the 0.5 MB base model cannot be written."""
    import os
    import resource
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "o"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    res = subprocess.run(
        [sys.executable, "-m", "lora_inspect", "train", "--task", "planted", "--rank", "2", "--steps", "2",
         "--batch-size", "2", "--seq-len", "8", "--targets", "q_proj", "--no-progress", "--out", str(out)],
        env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=600, preexec_fn=limit)
    assert res.returncode == 2, res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert "cannot write" in line and "model.safetensors" in line and "unexpected" not in line
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
