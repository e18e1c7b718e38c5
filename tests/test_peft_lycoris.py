"""PEFT LoHa/LoKr directories (peft_type LOHA/LOKR), against PEFT itself: adapters built with
``LoHaConfig``/``LoKrConfig`` on a tiny Llama and a tiny conv model (α ≠ r, rank_pattern/alpha_pattern,
``decompose_both``, ``use_effective_conv2d``, LoKr with both factors whole), factors randomised, saved
with ``save_pretrained``. Oracle: PEFT's ``get_delta_weight("default")`` in float64 for ΔW, a dense SVD
for spectra, ``PeftModel.from_pretrained`` logits for convert/truncate/rescale outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from builders import rel_close, run_cli, sv_close, tiny_llama
from safetensors.torch import load_file, save_file

from lora_inspect.analysis import compute_spectra
from lora_inspect.arrays import to_torch
from lora_inspect.formats import load_adapter


class TinyConv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv1 = torch.nn.Conv2d(16, 24, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(24, 16, 1)
        self.head = torch.nn.Linear(16, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv2(torch.relu(self.conv1(x))).mean((2, 3)))


def _configs() -> dict:
    from peft import LoHaConfig, LoKrConfig

    llama = ["q_proj", "v_proj", "gate_proj"]
    return {
        "loha-llama": ("llama", LoHaConfig(r=4, alpha=6, target_modules=llama,
                                           rank_pattern={"model.layers.1.self_attn.q_proj": 2},
                                           alpha_pattern={"v_proj": 3})),
        # q_proj: W₁ whole, W₂ = w2a@w2b; gate_proj (r=1): both decomposed; v_proj (r=6): both whole, s = α/r
        "lokr-llama": ("llama", LoKrConfig(r=2, alpha=5, target_modules=llama, decompose_both=True,
                                           rank_pattern={"gate_proj": 1, "v_proj": 6}, alpha_pattern={"q_proj": 3})),
        "loha-conv-eff": ("conv", LoHaConfig(r=3, alpha=2, target_modules=["conv1", "conv2", "head"],
                                             use_effective_conv2d=True, alpha_pattern={"conv2": 5})),
        "loha-conv-flat": ("conv", LoHaConfig(r=3, alpha=7, target_modules=["conv1", "conv2"])),
        "lokr-conv-eff": ("conv", LoKrConfig(r=2, alpha=3, target_modules=["conv1", "conv2"],
                                             use_effective_conv2d=True, rank_pattern={"conv2": 4})),
        "lokr-conv-flat": ("conv", LoKrConfig(r=2, alpha=3, target_modules=["conv1", "conv2"], decompose_both=True,
                                              rank_pattern={"conv2": 1})),
    }


def _base(kind: str) -> torch.nn.Module:
    return tiny_llama() if kind == "llama" else TinyConv().eval()


def _build(case: str, root: Path):
    from peft import get_peft_model

    kind, cfg = _configs()[case]
    model = get_peft_model(_base(kind), cfg)
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    for n, p in model.named_parameters():
        if ".hada_" in n or ".lokr_" in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.5)
    out = root / case
    model.save_pretrained(out)
    return model.double(), out


def _layers(model) -> dict:
    from peft.tuners.lycoris_utils import LycorisLayer

    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
            if isinstance(m, LycorisLayer) and "default" in m.r}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("peftlyco")
    return {case: _build(case, root) for case in _configs()}


@pytest.mark.parametrize("case", list(_configs()))
def test_delta_and_spectra_equal_peft(case, built):
    model, path = built[case]
    ad = load_adapter(path)
    layers = _layers(model)
    assert ad.peft_type == case.split("-")[0].upper() and ad.format == "peft"
    assert sorted(m.name for m in ad.modules) == sorted(layers)
    spectra = compute_spectra(ad.modules)
    for m in ad.modules:
        layer = layers[m.name]
        want = layer.get_delta_weight("default").detach().double()
        want = want.reshape(want.shape[0], -1)
        assert m.scale == pytest.approx(layer.scaling["default"], rel=1e-15)
        assert rel_close(m.delta(), want, 1e-6), m.name  # PEFT's LoHa rounds s to float32
        sv_close(spectra[m.name][0], torch.linalg.svdvals(to_torch(m.delta())), 1e-8)


def test_scale_rules_follow_peft_not_lycoris(built):
    """LoKr with both Kronecker factors whole: PEFT keeps s = α/r (LyCORIS files use 1)."""
    ad = load_adapter(built["lokr-llama"][1])
    by = {m.name: m for m in ad.modules}
    v = by["model.layers.0.self_attn.v_proj"]
    assert v.update.full_full and v.scale == pytest.approx(5 / 6)  # type: ignore[attr-defined]
    assert by["model.layers.0.self_attn.q_proj"].scale == pytest.approx(3 / 2)
    assert by["model.layers.0.mlp.gate_proj"].scale == pytest.approx(5.0)
    loha = {m.name: m for m in load_adapter(built["loha-llama"][1]).modules}
    assert loha["model.layers.1.self_attn.q_proj"].scale == pytest.approx(3.0)  # α 6, rank_pattern r 2
    assert loha["model.layers.0.self_attn.v_proj"].scale == pytest.approx(0.75)  # alpha_pattern α 3, r 4


def _logits(model, kind: str) -> torch.Tensor:
    torch.manual_seed(11)
    with torch.no_grad():
        if kind == "llama":
            return model(torch.randint(0, 96, (2, 7))).logits
        return model(torch.randn(2, 16, 6, 6, dtype=torch.float64))


def _peft_logits(path: Path, kind: str) -> torch.Tensor:
    from peft import PeftModel

    return _logits(PeftModel.from_pretrained(_base(kind), path).double().eval(), kind)


@pytest.mark.parametrize("case", ["loha-llama", "lokr-llama", "loha-conv-eff"])
def test_convert_to_peft_lora_gives_peft_logits(case, built, tmp_path):
    kind = _configs()[case][0]
    _, path = built[case]
    src = path
    if case == "loha-conv-eff":  # the 3×3 Tucker module alone (a 1×1 or flattened conv is stored 2-D)
        src = _only(path, tmp_path / "only", "conv1")
    res = run_cli("convert", src, "--to", "peft", "-o", tmp_path / "lora", "--json")
    assert res.exit_code == 0, res.stderr
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    if case == "loha-llama":  # exact LoRA of a LoHa: rank r₁·r₂
        sd = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
        assert sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 16
        assert sd["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape[0] == 4
    want, got = _peft_logits(src, kind), _peft_logits(tmp_path / "lora", kind)
    assert rel_close(got, want, 1e-5)
    base = _logits(_base(kind).double().eval(), kind)
    assert not rel_close(base, want, 1e-3)  # the adapter changes the output


def _only(path: Path, out: Path, module: str) -> Path:
    sd = load_file(str(path / "adapter_model.safetensors"))
    out.mkdir()
    save_file({k: t for k, t in sd.items() if f".{module}." in k}, str(out / "adapter_model.safetensors"))
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["target_modules"] = [module]
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def test_truncate_writes_peft_lora_of_the_eckart_young_delta(built, tmp_path):
    from peft import PeftModel

    model, path = built["lokr-llama"]
    res = run_cli("truncate", path, "--rank", "3", "-o", tmp_path / "t")
    assert res.exit_code == 0, res.stderr
    lora = PeftModel.from_pretrained(tiny_llama(), tmp_path / "t").double()
    got = {n.removeprefix("base_model.model."): m for n, m in lora.named_modules() if hasattr(m, "lora_A")}
    for name, layer in _layers(model).items():
        u, s, vh = torch.linalg.svd(layer.get_delta_weight("default").detach().double())
        best = (u[:, :3] * s[:3]) @ vh[:3]
        assert rel_close(got[name].get_delta_weight("default").detach(), best, 1e-5), name


@pytest.mark.parametrize("bake", [False, True])
def test_rescale_loads_in_peft_with_scaled_delta(bake, built, tmp_path):
    from peft import PeftModel

    model, path = built["loha-conv-eff"]
    args = ["rescale", path, "--factor", "0.5", "-o", tmp_path / "r"] + (["--bake"] if bake else [])
    res = run_cli(*args)
    assert res.exit_code == 0, res.stderr
    cfg = json.loads((tmp_path / "r" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LOHA" and cfg["alpha"] == (2 if bake else 1)
    assert cfg["alpha_pattern"] == {"conv2": 5 if bake else 2.5}
    again = _layers(PeftModel.from_pretrained(TinyConv().eval(), tmp_path / "r").double())
    for name, layer in _layers(model).items():
        want = 0.5 * layer.get_delta_weight("default").detach().double()
        assert rel_close(again[name].get_delta_weight("default").detach(), want, 1e-6), name


def test_every_reading_command_and_merge(built, tmp_path):
    _, path = built["lokr-conv-flat"]
    for cmd in ("info", "rank", "check", "footprint"):
        res = run_cli(cmd, path, "--json")
        assert res.exit_code == 0 and json.loads(res.stdout), (cmd, res.stderr)
    doc = json.loads(run_cli("rank", path, "--json").stdout)
    assert {d["algo"] for d in doc["modules"]} == {"lokr"}
    assert run_cli("diff", path, built["lokr-conv-eff"][1]).exit_code == 0
    assert run_cli("report", path, "-o", tmp_path / "r.md").exit_code == 0
    res = run_cli("merge", path, path, "--weights", "0.25,0.75", "-o", tmp_path / "m", "--to", "peft")
    assert res.exit_code == 0, res.stderr
    merged = {m.name: m for m in load_adapter(tmp_path / "m").modules}
    for m in load_adapter(path).modules:
        assert rel_close(merged[m.name].delta(), m.delta(), 1e-6)


def _edit(path: Path, out: Path, tensors=None, **cfg_changes) -> Path:
    sd = load_file(str(path / "adapter_model.safetensors"))
    if tensors:
        tensors(sd)
    out.mkdir()
    save_file(sd, str(out / "adapter_model.safetensors"))
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(cfg_changes)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


Q = "base_model.model.model.layers.0.self_attn.q_proj"
BAD = {
    "missing-factor": (lambda sd: sd.pop(f"{Q}.hada_w2_a"), {}, "missing half"),
    "wrong-shape": (lambda sd: sd.update({f"{Q}.hada_w2_b": torch.zeros(4, 31)}), {}, "do not multiply"),
    "negative-alpha": (None, {"alpha": -2}, "alpha must be ≥ 0"),
    "negative-alpha-pattern": (None, {"alpha_pattern": {"q_proj": -1}}, "alpha_pattern"),
    "rank-vs-config": (None, {"r": 5}, "config gives r=5"),
    "bad-rank-pattern": (None, {"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2(case, built, tmp_path):
    edit, cfg, words = BAD[case]
    path = _edit(built["loha-llama"][1], tmp_path / "bad", edit, **cfg)
    res = run_cli("rank", path)
    assert res.exit_code == 2 and res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and words in lines[0], res.stderr


def test_serving_profiles_refuse_loha(built):
    """No serving profile (vLLM, llama.cpp, LoRAX, SGLang, Ollama) loads LoHa/LoKr: check says so."""
    for profile in ("vllm", "ollama"):
        res = run_cli("check", built["loha-llama"][1], "--serving", profile, "--json")
        assert res.exit_code == 1
        rows = {r["rule"]: r for r in json.loads(res.stdout)["adapters"][0]["results"]}
        assert rows[f"{profile}: algorithm"]["ok"] is False and rows[f"{profile}: algorithm"]["value"] == "loha"


@pytest.mark.parametrize("factor", ["hada_w2_b", "hada_w1_a"])
def test_untrained_loha_fails_the_trained_row(tmp_path, factor):
    """PEFT starts a LoHa with hada_w2_b = 0, so ΔW = 0: `check` fails its `trained` row like an all-zero LoRA B
    (found by the fuzzer: zeroing one LoHa factor passed `check`)."""
    from safetensors.torch import load_file, save_file

    from tests.fuzz.seeds import make_seeds

    seed = next(s for s in make_seeds(tmp_path / "seeds") if s.name == "peft-loha")
    sd = load_file(str(seed.weights))
    key = next(k for k in sd if k.endswith(factor) and "layers.1" in k)
    sd[key] = torch.zeros_like(sd[key])
    save_file(sd, str(seed.weights))
    res = run_cli("check", seed.path, "--json")
    assert res.exit_code == 1, res.stdout
    rows = {r["rule"]: r for r in json.loads(res.stdout)["adapters"][0]["results"]}
    assert not rows["trained"]["ok"] and "layers.1" in rows["trained"]["message"]
    res = run_cli("rank", seed.path, "--json")
    flagged = [m["name"] for m in json.loads(res.stdout)["modules"] if "zero_b" in m["flags"]]
    assert flagged == ["model.layers.1.self_attn.v_proj"]
