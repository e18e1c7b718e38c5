"""verify refuses adapters made for another base and notes adapters trained on another task.

Issue 9, class 7: "verify of adapters trained on another base or task evaluates silently".
Decision: another base (module names or shapes that do not fit, or — for a training output directory —
another base/config.json, other base weights or another Hugging Face base) is refused with one line
naming the first difference, exit 2: ΔW was learned against other weights. Another task on the same
base is evaluated (the numbers are that adapter's loss on DIR's held-out data, a fair question) with
one note line on stderr.
"""

from __future__ import annotations

import json
import shutil

import pytest
from builders import run_cli

from lora_inspect.errors import InspectError
from lora_inspect.train import TrainConfig, run_training
from lora_inspect.train.verify import verify

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = "The quick brown fox jumps over the lazy dog; the dog, unbothered, sleeps on. " * 40


def _run(out, *, task="planted", seed=0, targets=("q_proj",), model="tiny", data=None):
    cfg = TrainConfig(steps=3, batch_size=2, eval_every=0, seed=seed, progress=False)
    run_training(out, task=task, data=data, rank=2, targets=list(targets), model=model, seq_len=8, train_cfg=cfg)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("origin")
    (d / "corpus.txt").write_text(TEXT, encoding="utf-8")
    r = {
        "a": _run(d / "a"),
        "same": _run(d / "same"),  # the same base and task, another copy
        "seed1": _run(d / "seed1", seed=1),  # base weights from another seed
        "small": _run(d / "small", model="small"),
        "text": _run(d / "text", task="text", data=d / "corpus.txt"),
        "other_teacher": _run(d / "other_teacher", targets=("q_proj", "v_proj")),
    }
    torch.set_num_threads(n)
    return r


def test_same_base_and_task_is_silent(runs):
    notes: list[str] = []
    r = verify(runs["a"], [runs["same"], runs["a"]], note=notes.append)
    assert notes == [] and len(r["results"]) == 3


def test_other_base_weights_are_refused(runs):
    with pytest.raises(InspectError, match=r"seed1: trained on another base .*model\.safetensors holds other weights"):
        verify(runs["a"], [runs["seed1"]])


def test_other_base_config_is_refused_naming_the_key(runs):
    with pytest.raises(InspectError, match=r"trained on another base .*base/config\.json dim is 128, not 64"):
        verify(runs["a"], [runs["small"]])


def test_plain_adapter_for_another_base_is_refused_by_shape(runs, tmp_path):
    # the small run's adapter alone (a PEFT dir without task.json): its shapes name the mismatch
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(runs["small"] / f, bare / f)
    with pytest.raises(InspectError, match=r"q_proj.* ΔW shape \(128, 128\) but the base's weight is \(64, 64\)"):
        verify(runs["a"], [bare])


@pytest.mark.parametrize("which,says", [("text", "trained on the text task"),
                                        ("other_teacher", "another planted teacher")])
def test_other_task_is_evaluated_with_a_note(runs, which, says):
    notes: list[str] = []
    r = verify(runs["a"], [runs[which]], note=notes.append)
    assert len(r["results"]) == 2
    (note,) = notes
    assert says in note and str(runs[which]) in note


def test_other_text_is_noted(runs, tmp_path):
    other = tmp_path / "t2"
    shutil.copytree(runs["text"], other)
    tj = json.loads((other / "task.json").read_text())
    tj["sha256"] = "0" * 64
    (other / "task.json").write_text(json.dumps(tj))
    notes: list[str] = []
    verify(runs["text"], [other], note=notes.append)
    assert len(notes) == 1 and "another text" in notes[0]


def test_hf_base_record_differs(runs, tmp_path):
    # a run whose base is a Hugging Face directory against one of ours: refused, no model is loaded
    other = tmp_path / "hf"
    shutil.copytree(runs["a"], other)
    shutil.rmtree(other / "base")
    (other / "base.json").write_text(json.dumps({"kind": "hf", "path": str(tmp_path / "llama")}))
    with pytest.raises(InspectError, match="lora-inspect model, the other a Hugging Face model"):
        verify(runs["a"], [other])


def test_cli(runs):
    res = run_cli("verify", runs["a"], runs["seed1"], "--json")
    assert res.exit_code == 2 and res.stdout == ""
    (line,) = res.stderr.strip().splitlines()
    assert "trained on another base" in line
    res = run_cli("verify", runs["a"], runs["text"], "--json")
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)["results"]) == 2
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("lora-inspect: note:") and "text task" in line


@pytest.mark.parametrize("edit,msg", [({"seq_len": "8"}, "seq_len must be a number"), ({"seq_len": 0}, "seq_len must be ≥ 1"),
                                      ({"task": "vision"}, "task must be 'planted' or 'text'"),
                                      ({"planted_rank": None}, "planted_rank is missing"),
                                      ({"strength": float("nan")}, "strength must be finite"),
                                      ({"targets": [1]}, r"targets\[0\] must be a string")])
def test_task_json_values_are_checked(runs, tmp_path, edit, msg):
    bad = tmp_path / "bad"
    shutil.copytree(runs["a"], bad)
    tj = json.loads((bad / "task.json").read_text())
    tj.update(edit)
    (bad / "task.json").write_text(json.dumps(tj))
    with pytest.raises(InspectError, match=msg):
        verify(bad)
    res = run_cli("verify", bad)
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1 and "unexpected" not in res.stderr
