"""A short planted run learns the teacher, its spectrum shows the planted rank, truncation to K is free."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_inspect.train import TrainConfig, run_training
from lora_inspect.train.verify import verify

K = 4
R = 16
TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("planted")
    cfg = TrainConfig(steps=200, batch_size=16, lr=5e-3, eval_every=100, seed=0, progress=False)
    summary = run_training(out, task="planted", planted_rank=K, rank=R, alpha=R, targets=TARGETS, train_cfg=cfg)
    torch.set_num_threads(n)
    return out, summary


def _energy_rank(s: torch.Tensor, tau: float) -> int:
    e = s.double() ** 2
    c = torch.cumsum(e, 0) / e.sum()
    return int((c < tau).sum().item()) + 1


def _deltas(out):
    cfg = json.loads((out / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    sd = load_file(str(out / "adapter_model.safetensors"))
    res = {}
    for k, a in sd.items():
        if k.endswith(".lora_A.weight"):
            p = k[: -len(".lora_A.weight")]
            res[p[len("base_model.model.") :]] = scale * (sd[p + ".lora_B.weight"].double() @ a.double())
    return res


def test_output_directory_is_complete(run):
    out, _ = run
    for f in ["adapter_config.json", "adapter_model.safetensors", "base/config.json", "base/model.safetensors",
              "task.json", "teacher_delta.safetensors", "heldout.safetensors", "log.jsonl"]:
        assert (out / f).is_file(), f
    task = json.loads((out / "task.json").read_text())
    assert task["task"] == "planted" and task["planted_rank"] == K
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "train"] == list(range(1, 201))
    assert [r["step"] for r in log if r["event"] == "eval"] == [0, 100, 200]
    teacher = load_file(str(out / "teacher_delta.safetensors"))
    for k, b in teacher.items():
        if k.endswith(".delta_B"):
            d = b.double() @ teacher[k[: -len("B")] + "A"].double()
            assert torch.linalg.matrix_rank(d).item() == K


def test_kl_drops_by_90_percent(run):
    _, s = run
    assert s["final"]["loss"] <= 0.1 * s["initial"]["loss"], (s["initial"], s["final"])


def test_spectrum_shows_planted_rank(run):
    out, _ = run
    deltas = _deltas(out)
    assert len(deltas) == 2 * len(TARGETS)
    for name, d in deltas.items():
        s = torch.linalg.svdvals(d)
        assert _energy_rank(s, 0.95) <= K + 1, (name, (s[: K + 3] / s[0]).tolist())


def test_truncation_to_planted_rank_is_nearly_free(run, tmp_path):
    out, _ = run
    tensors = {}
    for name, d in _deltas(out).items():
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        tensors[f"base_model.model.{name}.lora_B.weight"] = (u[:, :K] * s[:K]).float().contiguous()
        tensors[f"base_model.model.{name}.lora_A.weight"] = vh[:K].float().contiguous()
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg.update(r=K, lora_alpha=K)
    (trunc / "adapter_config.json").write_text(json.dumps(cfg, sort_keys=True))
    save_file(tensors, str(trunc / "adapter_model.safetensors"), metadata={"format": "pt"})
    r = verify(out, [trunc])
    trained, cut = r["results"]
    assert cut["loss"] <= 1.05 * trained["loss"], r
    assert r["base_loss"] > 10 * trained["loss"]
    assert cut["top1_agreement"] > 0.95


def test_kohya_copy_gives_the_same_model(run, tmp_path):
    out, _ = run
    cfg = json.loads((out / "adapter_config.json").read_text())
    sd = load_file(str(out / "adapter_model.safetensors"))
    alpha = float(cfg["lora_alpha"])
    kohya = {}
    for k, a in sd.items():
        if k.endswith(".lora_A.weight"):
            p = k[: -len(".lora_A.weight")]
            stem = "lora_te_" + p[len("base_model.model.") :].replace(".", "_")
            kohya[f"{stem}.lora_down.weight"] = a
            kohya[f"{stem}.lora_up.weight"] = sd[p + ".lora_B.weight"]
            kohya[f"{stem}.alpha"] = torch.tensor(alpha, dtype=a.dtype)
    f = tmp_path / "k.safetensors"
    save_file(kohya, str(f))
    r = verify(out, [f])
    a, b = r["results"]
    assert b["kl_to_first"] < 1e-9 and b["top1_agreement"] == 1.0
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)


def test_committed_sample_shows_rank_4():
    """samples/planted (made by samples/make_samples.py): energy rank ≤ 5 at τ=0.95 in every module."""
    from pathlib import Path

    sample = Path(__file__).resolve().parents[1] / "samples" / "planted"
    deltas = _deltas(sample)
    assert len(deltas) == 14
    for name, d in deltas.items():
        assert _energy_rank(torch.linalg.svdvals(d), 0.95) <= 5, name
    r = verify(sample, [sample.parent / "planted-kohya.safetensors"])
    own, kohya = r["results"]
    assert own["loss"] < 0.01 * r["base_loss"]
    assert kohya["kl_to_first"] < 1e-9 and kohya["top1_agreement"] == 1.0


def test_project_rank_command_agrees_on_the_run(run):
    """Cross-check with the project's `lora-inspect rank --json` when that command is available."""
    try:
        from lora_inspect.cli import main
    except ImportError:
        pytest.skip("lora_inspect.cli not available")
    import click
    from click.testing import CliRunner

    if main.get_command(click.Context(main), "rank") is None:
        pytest.skip("no rank command")

    out, _ = run
    res = CliRunner().invoke(main, ["rank", str(out), "--json"])
    assert res.exit_code == 0, res.output
    mods = json.loads(res.stdout)["modules"]
    assert len(mods) == 2 * len(TARGETS)
    ours = {n: _energy_rank(torch.linalg.svdvals(d), 0.95) for n, d in _deltas(out).items()}
    for m in mods:
        assert m["energy_rank"] == ours[m["name"]] <= K + 1, m["name"]
