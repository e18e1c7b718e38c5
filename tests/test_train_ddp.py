"""Two gloo processes on CPU take the same steps as one process with the same global batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from lora_inspect.train import TrainConfig, run_training

CFG = dict(steps=8, batch_size=8, grad_accum=2, lr=1e-2, eval_every=0, seed=3, progress=False, device="cpu")
RUN = dict(task="planted", planted_rank=2, rank=4, targets=["q_proj", "v_proj", "down_proj"], seq_len=16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        run_training(out, train_cfg=TrainConfig(**CFG), **RUN)
    finally:
        dist.destroy_process_group()


def _torchrun_worker(rank: int, world: int, port: int, out: str) -> None:
    """As under torchrun: only the environment says the rank; the loop joins the process group."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    import lora_inspect.train.run as run_mod

    real = run_mod.save_adapter

    def spy(*a, **k):
        open(os.path.join(os.path.dirname(out), f"saved-by-{rank}"), "w").close()
        return real(*a, **k)

    run_mod.save_adapter = spy
    try:
        run_training(out, train_cfg=TrainConfig(**{**CFG, "steps": 2}), **RUN)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_torchrun_only_rank_0_writes(tmp_path):
    """Under torchrun the process group does not exist yet when run_training starts: rank 1 used to
    count as the main process and wrote adapter, base and a task.json without eval results."""
    out = tmp_path / "ddp"
    mp.spawn(_torchrun_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    assert (tmp_path / "saved-by-0").is_file()
    assert not (tmp_path / "saved-by-1").exists()
    import json

    assert json.loads((out / "task.json").read_text())["result"]["final"]


def test_two_process_ddp_equals_single_process(tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = tmp_path / "single"
        s = run_training(single, train_cfg=TrainConfig(**CFG), **RUN)
        assert s["world_size"] == 1
    finally:
        torch.set_num_threads(n)
    ddp = tmp_path / "ddp"
    mp.spawn(_worker, args=(2, _free_port(), str(ddp)), nprocs=2, join=True)

    a = load_file(str(single / "adapter_model.safetensors"))
    b = load_file(str(ddp / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    moved = 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)
        moved += int(k.endswith("lora_B.weight") and a[k].abs().max() > 1e-3)
    assert moved == 6  # every B left zero: the runs really trained
    import json

    log = [json.loads(x) for x in (ddp / "log.jsonl").read_text().splitlines()]
    assert log[0]["world_size"] == 2
    assert (ddp / "base" / "model.safetensors").is_file()


def test_batch_must_divide(tmp_path):
    from lora_inspect.errors import InspectError

    with pytest.raises(InspectError, match="divisible"):
        run_training(tmp_path, train_cfg=TrainConfig(**{**CFG, "batch_size": 7}), **RUN)
