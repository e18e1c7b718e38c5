"""Every train option is checked before anything is built or written: one line naming it, exit 2.

Issue 9, class 7: ``train --alpha 0``, ``--lr -1`` and an invalid ``--targets`` regex were accepted.
"""

from __future__ import annotations

import math

import pytest
import torch
from builders import run_cli

from lora_inspect.errors import InspectError
from lora_inspect.train import TrainConfig, run_training

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = ["train", "--task", "planted", "--rank", "2", "--steps", "2", "--batch-size", "2", "--seq-len", "8",
        "--targets", "q_proj", "--no-progress"]


def _with(args: list[str], *extra: str) -> list[str]:
    """BASE with each ``--opt value`` pair in ``extra`` replacing BASE's own value of that option."""
    out = list(args)
    for opt, val in zip(extra[::2], extra[1::2]):
        if opt in out:
            out[out.index(opt) + 1] = val
        else:
            out += [opt, val]
    return out


@pytest.mark.parametrize("bad,named", [
    (("--alpha", "0"), "--alpha"), (("--alpha", "-16"), "--alpha"), (("--alpha", "nan"), "--alpha"),
    (("--alpha", "inf"), "--alpha"),
    (("--lr", "-1"), "--lr"), (("--lr", "0"), "--lr"), (("--lr", "nan"), "--lr"), (("--lr", "inf"), "--lr"),
    (("--weight-decay", "-0.1"), "--weight-decay"), (("--weight-decay", "nan"), "--weight-decay"),
    (("--dropout", "nan"), "--dropout"), (("--dropout", "1"), "--dropout"),
    (("--targets", "re:(q_proj"), "--targets"), (("--targets", "re:"), "--targets"), (("--targets", " , "), "--targets"),
    (("--steps", "0"), "--steps"), (("--steps", "-5"), "--steps"),
    (("--batch-size", "0"), "--batch-size"), (("--batch-size", "-2"), "--batch-size"),
    (("--grad-accum", "0"), "--grad-accum"), (("--batch-size", "4", "--grad-accum", "3"), "--batch-size"),
    (("--seq-len", "0"), "--seq-len"), (("--rank", "0"), "--rank"), (("--rank", "-4"), "--rank"),
    (("--planted-rank", "0"), "--planted-rank"),
    (("--seed", "-1"), "--seed"), (("--seed", str(2**64)), "--seed"),
    (("--threads", "0"), "--threads"), (("--threads", "two"), "--threads"),
    (("--device", "tpu"), "--device"),
    (("--seq-len", "100000"), "100000"),  # longer than the tiny model's 512 positions
    (("--planted-rank", "65"), "planted rank 65"),  # larger than a 64×64 module
    (("--targets", "re:nothing_matches"), "nothing_matches"),
])
def test_bad_option_is_one_line_and_writes_nothing(tmp_path, bad, named):
    out = tmp_path / "o"
    res = run_cli(*_with(BASE, *bad), "--out", str(out))
    assert res.exit_code == 2, (bad, res.output)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], (bad, res.stderr)
    assert "unexpected" not in res.stderr and "Traceback" not in res.stderr
    assert not out.exists(), bad


def test_good_values_at_the_edges_train(tmp_path):
    # the smallest accepted values of each checked option still train
    res = run_cli(*_with(BASE, "--alpha", "1e-3", "--lr", "1e-6", "--weight-decay", "0", "--dropout", "0",
                         "--seed", str(2**32 - 1), "--threads", "1", "--targets", r"re:.*\.q_proj"),
                  "--out", str(tmp_path / "o"))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file()


def test_out_below_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    res = run_cli(*BASE, "--out", str(tmp_path / "f" / "o"))
    assert res.exit_code == 2
    (line,) = res.stderr.strip().splitlines()
    assert str(tmp_path / "f") in line and "unexpected" not in line


@pytest.mark.parametrize("field,value", [
    ("lr", -1.0), ("lr", 0.0), ("lr", math.nan), ("weight_decay", -1.0), ("steps", 0), ("batch_size", 0),
    ("grad_accum", 0), ("warmup_steps", -1), ("eval_every", -1), ("threads", 0), ("grad_clip", math.inf),
])
def test_train_config_refuses(field, value):
    with pytest.raises(InspectError, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("kw,msg", [({"alpha": 0.0}, "alpha"), ({"alpha": -1.0}, "alpha"), ({"rank": 0}, "rank"),
                                    ({"seq_len": 0}, "sequence length"), ({"seq_len": 513}, "sequence length 513")])
def test_run_training_refuses_before_writing(tmp_path, kw, msg):
    args = {"rank": 2, "targets": ["q_proj"], "seq_len": 8, **kw}
    with pytest.raises(InspectError, match=msg):
        run_training(tmp_path / "o", task="planted", train_cfg=TrainConfig(steps=1, batch_size=2, progress=False), **args)
    assert not (tmp_path / "o").exists()


def test_threads_option_is_documented():
    res = run_cli("train", "--help")
    assert res.exit_code == 0 and "--threads" in res.output and "auto" in res.output
    assert torch.get_num_threads() == 1  # the fixture's setting, untouched by --help
