"""verify and the train/verify commands: text task, JSON schema, bad input as one-line InspectError."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lora_inspect.errors import InspectError
from lora_inspect.train import TrainConfig, run_training
from lora_inspect.train.cli import train as train_cmd
from lora_inspect.train.cli import verify as verify_cmd
from lora_inspect.train.verify import verify

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = ("It was a bright cold day in April, and the clocks were striking thirteen. " * 3
        + "The quick brown fox jumps over the lazy dog; the dog, unbothered, sleeps on. " * 4
        + "Rain fell on the harbour all night and the boats knocked softly together. " * 4) * 6




@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("text")
    data = d / "corpus.txt"
    data.write_text(TEXT, encoding="utf-8")
    out = d / "run"
    s = run_training(out, task="text", data=data, rank=8, targets=["q_proj", "v_proj", "up_proj"], seq_len=32,
                     train_cfg=TrainConfig(steps=60, batch_size=8, lr=1e-2, eval_every=0, progress=False))
    torch.set_num_threads(n)
    return out, data, s


def test_text_run_learns_and_verifies(text_run):
    out, data, s = text_run
    assert s["final"]["loss"] < s["initial"]["loss"] - 0.2
    r = verify(out)
    (own,) = r["results"]
    assert own["loss"] == pytest.approx(s["final"]["loss"], rel=1e-4)
    assert own["perplexity"] == pytest.approx(torch.tensor(own["loss"]).exp().item(), rel=1e-6)
    assert r["base_loss"] > own["loss"]
    assert not (out / "teacher_delta.safetensors").exists()
    # --data: evaluate on another text
    r2 = verify(out, data=data)
    assert r2["results"][0]["loss"] != own["loss"]


def test_cli_verify_json(text_run, tmp_path):
    out, _, _ = text_run
    # a "rewrite": the same adapter at half the scale (alpha halved) — a PEFT dir
    half = tmp_path / "half"
    half.mkdir()
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["lora_alpha"] = cfg["lora_alpha"] / 2
    (half / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(load_file(str(out / "adapter_model.safetensors")), str(half / "adapter_model.safetensors"), metadata={"format": "pt"})
    res = CliRunner().invoke(verify_cmd, [str(out), str(half), "--json"])
    assert res.exit_code == 0, res.output
    js = json.loads(res.stdout)
    assert js["schema"] == "lora-inspect/verify/1" and set(js) == {"schema", "task", "base_loss", "results"}
    assert js["task"] == "text"
    a, b = js["results"]
    assert set(a) == {"adapter", "loss", "perplexity", "kl_to_first", "top1_agreement"}
    assert a["kl_to_first"] == 0.0 and a["top1_agreement"] == 1.0
    assert b["kl_to_first"] > 1e-4 and b["loss"] > a["loss"]
    table = CliRunner().invoke(verify_cmd, [str(out), str(half)])
    assert table.exit_code == 0 and "top-1 agreement" in table.output
    assert "perplexity = exp(loss)" in table.stdout and "┃" not in table.stdout  # the View table, explained
    # markdown, through the same View: the table, then what the columns are
    md = CliRunner().invoke(verify_cmd, [str(out), str(half), "--format", "markdown"])
    assert md.exit_code == 0, md.output
    lines = md.stdout.splitlines()
    assert lines[0].startswith("**verify ") and "text task" in lines[0]
    assert lines[2] == "| adapter | loss | Δ vs base | perplexity | KL to first | top-1 agreement |"
    assert sum(ln.startswith(f"| {out}") or ln.startswith(f"| {half}") for ln in lines) == 2
    assert any("next-byte cross-entropy" in ln for ln in lines)
    assert f"{a['loss']:.6g}" in md.stdout and f"{b['top1_agreement']:.2%}" in md.stdout
    bad = CliRunner().invoke(verify_cmd, [str(out), "--json", "--format", "markdown"])
    assert bad.exit_code == 2


def test_cli_verify_explains_the_planted_numbers():
    """A planted run: the loss is a KL to the teacher, the perplexity includes the teacher's entropy — said
    under the table, with the teacher's own perplexity."""
    from pathlib import Path

    planted = Path(__file__).resolve().parents[1] / "samples" / "planted"
    res = CliRunner().invoke(verify_cmd, [str(planted)], env={"COLUMNS": "80", "NO_COLOR": "1"})
    assert res.exit_code == 0, res.output
    text = res.stdout
    assert "KL(teacher ‖ model)" in text and "teacher's own perplexity" in text
    assert all(len(ln) <= 80 for ln in text.splitlines())


@pytest.mark.parametrize("what", ["adapter_dir", "file", "no_heldout"])
def test_cli_verify_of_something_else_points_to_base_and_data(text_run, tmp_path, what):
    """verify DIR on an adapter that is not a training output: exit 2, one line naming --base and --data."""
    import shutil

    out, _, _ = text_run
    if what == "adapter_dir":
        target = tmp_path / "adapter"
        target.mkdir()
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(out / f, target / f)
    elif what == "file":
        target = tmp_path / "lora.safetensors"
        shutil.copy(out / "adapter_model.safetensors", target)
    else:
        target = tmp_path / "run"
        shutil.copytree(out, target)
        (target / "heldout.safetensors").unlink()
    from builders import run_cli

    res = run_cli("verify", target)
    assert res.exit_code == 2 and res.stdout == ""
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("lora-inspect: error: ") and "not a training output directory" in line
    assert "--base HF_DIR" in line and "--data FILE" in line


def test_cli_train_and_refuse_non_empty(tmp_path):
    out = tmp_path / "o"
    args = ["--task", "planted", "--rank", "2", "--steps", "3", "--batch-size", "2", "--seq-len", "8",
            "--targets", "q_proj", "--no-progress", "--out", str(out)]
    res = CliRunner().invoke(train_cmd, args)
    assert res.exit_code == 0, res.output
    assert (out / "adapter_model.safetensors").is_file()
    res = CliRunner().invoke(train_cmd, args)
    assert isinstance(res.exception, InspectError) and "not empty" in str(res.exception)
    assert CliRunner().invoke(train_cmd, args + ["--force"]).exit_code == 0
    assert "Example" in CliRunner().invoke(train_cmd, ["--help"]).output
    for bad in ("1.5", "-0.1", "1"):  # was an "unexpected ValueError" from nn.Dropout
        res = CliRunner().invoke(train_cmd, args[:-2] + ["--dropout", bad, "--out", str(tmp_path / "d")])
        assert isinstance(res.exception, InspectError) and "--dropout" in str(res.exception), res.output
    assert "Example" in CliRunner().invoke(verify_cmd, ["--help"]).output


def test_bad_inputs(text_run, tmp_path):
    out, _, _ = text_run
    with pytest.raises(InspectError, match="no such directory"):
        verify(tmp_path / "missing")
    with pytest.raises(InspectError, match="task.json"):
        verify(tmp_path)
    sd = load_file(str(out / "adapter_model.safetensors"))
    cfg = (out / "adapter_config.json").read_text()
    # unknown module name
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(cfg)
    save_file({k.replace("layers.0", "layers.7"): v for k, v in sd.items()}, str(bad / "adapter_model.safetensors"))
    with pytest.raises(InspectError, match="not a module of the base model"):
        verify(out, [bad])
    # shape mismatch: a q_proj factor put on up_proj
    shp = tmp_path / "shape"
    shp.mkdir()
    (shp / "adapter_config.json").write_text(cfg)
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    u = "base_model.model.model.layers.0.mlp.down_proj"
    save_file({f"{u}.lora_A.weight": sd[f"{q}.lora_A.weight"], f"{u}.lora_B.weight": sd[f"{q}.lora_B.weight"]},
              str(shp / "adapter_model.safetensors"))
    with pytest.raises(InspectError, match="shape"):
        verify(out, [shp])
    with pytest.raises(InspectError):
        verify(out, [tmp_path / "nothing-here"])
    with pytest.raises(InspectError, match="--data"):
        run_training(tmp_path / "x", task="text", rank=2, train_cfg=TrainConfig(steps=1, progress=False))
    with pytest.raises(InspectError, match="neither a size"):
        run_training(tmp_path / "y", task="planted", rank=2, model="huge", train_cfg=TrainConfig(steps=1, progress=False))


def test_damaged_files_are_one_line_errors(text_run, tmp_path):
    import shutil

    out, _, _ = text_run
    bad = tmp_path / "copy"
    shutil.copytree(out, bad)
    (bad / "heldout.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(InspectError, match="not a readable safetensors"):
        verify(bad)
    shutil.copy(out / "heldout.safetensors", bad / "heldout.safetensors")
    (bad / "task.json").write_text("{")
    with pytest.raises(InspectError, match="not valid JSON"):
        verify(bad)


def test_force_leaves_no_stale_files(tmp_path, text_run):
    _, data, _ = text_run
    out = tmp_path / "o"
    cfg = TrainConfig(steps=2, batch_size=2, eval_every=0, progress=False)
    run_training(out, task="planted", rank=2, targets=["q_proj"], seq_len=8, train_cfg=cfg)
    (out / "notes.txt").write_text("mine")
    run_training(out, task="text", data=data, rank=2, targets=["q_proj"], seq_len=8, train_cfg=cfg, force=True)
    assert not (out / "teacher_delta.safetensors").exists()
    assert (out / "notes.txt").read_text() == "mine"  # files a run does not write are left alone
    assert verify(out)["task"] == "text"


def test_train_refuses_negative_schedule_options(tmp_path):
    from builders import run_cli

    for opt in ("--warmup", "--eval-every"):
        res = run_cli("train", "--task", "planted", "--rank", "2", "--steps", "1", opt, "-1", "--out", tmp_path / "o")
        assert res.exit_code == 2
        assert opt in res.stderr and len(res.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "o").exists()
