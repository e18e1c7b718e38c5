"""``verify ADAPTER … --base HF_DIR``: oracle against PEFT's own merged model on tiny Llama and GPT-2
(built from configs, saved with save_pretrained: nothing downloaded)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from builders import TINY_TEXT, run_cli, tiny_hf_model, tiny_hf_peft  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from lora_inspect.hf.verify import verify_hf  # noqa: E402

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request, tmp_path_factory):
    arch = request.param
    d = tmp_path_factory.mktemp(arch)
    base = tiny_hf_model(d / "base", arch)
    a1 = tiny_hf_peft(base, d / "a1", TARGETS[arch], seed=1, std=0.6)
    a2 = tiny_hf_peft(base, d / "a2", TARGETS[arch], r=2, seed=2, std=0.6)
    text = d / "text.txt"
    text.write_text(TINY_TEXT)
    return arch, base, a1, a2, text


def _oracle(base: Path, adapter: Path | None, text: Path, ctx: int = 128) -> torch.Tensor:
    """Next-token log-probs of PEFT's merged model, computed directly (one sequence per chunk)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.eval()
    ids = AutoTokenizer.from_pretrained(str(base))(text.read_text(), add_special_tokens=False)["input_ids"]
    outs = []
    with torch.no_grad():
        for i in range(0, len(ids), ctx):
            x = torch.tensor([ids[i : i + ctx]])
            outs.append(F.log_softmax(model(x).logits[0, :-1].double(), -1))
            outs[-1] = (outs[-1], x[0, 1:])
    return outs


def _loss(outs) -> float:
    lp = torch.cat([o[0] for o in outs])
    tgt = torch.cat([o[1] for o in outs])
    return float(-lp.gather(1, tgt[:, None]).mean())


def test_loss_kl_agreement_equal_peft_merged_model(setup):
    arch, base, a1, a2, text = setup
    res = verify_hf([a1, a2], base, text, device="cpu", batch=3)
    o_base, o1, o2 = _oracle(base, None, text), _oracle(base, a1, text), _oracle(base, a2, text)
    assert res.tokens == sum(len(o[1]) for o in o1)
    assert abs(res.base_loss - _loss(o_base)) < 1e-6
    assert abs(res.results[0].loss - _loss(o1)) < 1e-6
    assert abs(res.results[1].loss - _loss(o2)) < 1e-6
    assert abs(res.results[1].perplexity - math.exp(_loss(o2))) < 1e-5 * math.exp(_loss(o2))
    p1, p2 = torch.cat([o[0] for o in o1]), torch.cat([o[0] for o in o2])
    kl = float((p1.exp() * (p1 - p2)).sum(-1).mean())
    agree = float((p1.argmax(-1) == p2.argmax(-1)).double().mean())
    assert kl > 1e-4  # the adapters differ: the check below can fail
    assert abs(res.results[1].kl_to_first - kl) < 1e-6
    assert res.results[0].kl_to_first == 0.0
    assert abs(res.results[1].top1_agreement - agree) < 1e-12
    assert abs(res.results[0].loss - res.base_loss) > 1e-4  # the adapter changes the model


def _to_kohya(peft_dir: Path, out: Path) -> Path:
    """The same adapter as a kohya-style file: lora_te_<path with _>.lora_down/.lora_up/.alpha."""
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    sd = load_file(str(peft_dir / "adapter_model.safetensors"))
    tensors = {}
    for k, v in sd.items():
        name = k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0].replace(".", "_")
        part = "lora_down" if ".lora_A." in k else "lora_up"
        tensors[f"lora_te_{name}.{part}.weight"] = v.contiguous()
        tensors[f"lora_te_{name}.alpha"] = torch.tensor(float(cfg["lora_alpha"]))
    save_file(tensors, str(out))
    return out


def test_kohya_file_equals_peft_path(setup, tmp_path):
    arch, base, a1, _, text = setup
    kohya = _to_kohya(a1, tmp_path / "a1.safetensors")
    res = verify_hf([a1, kohya], base, text, device="cpu", batch=2)
    assert abs(res.results[0].loss - res.results[1].loss) < 1e-6
    assert res.results[1].kl_to_first < 1e-9
    assert res.results[1].top1_agreement == 1.0


def test_cli_json_and_jsonl(setup, tmp_path):
    arch, base, a1, a2, text = setup
    jl = tmp_path / "t.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t}) for t in TINY_TEXT.split(" the ")[:8]))
    r = run_cli("verify", str(a1), str(a2), "--base", str(base), "--data", str(jl), "--json", "--device", "cpu",
                "--max-tokens", "40")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["schema"] == "lora-inspect/verify/1" and doc["task"] == "hf"
    assert [x["adapter"] for x in doc["results"]] == [str(a1), str(a2)]
    assert doc["tokens"] <= 40


def test_one_line_errors(setup, tmp_path):
    arch, base, a1, _, text = setup
    notok = tiny_hf_model(tmp_path / "notok", arch, tokenizer=False)
    r = run_cli("verify", str(a1), "--base", str(notok), "--data", str(text), "--device", "cpu")
    assert r.exit_code == 2 and "tokenizer" in r.output and "Traceback" not in r.output
    other = tiny_hf_model(tmp_path / "other", "gpt2" if arch == "llama" else "llama")
    r = run_cli("verify", str(a1), "--base", str(other), "--data", str(text), "--device", "cpu")
    assert r.exit_code == 2 and "not a linear layer of the base model" in r.output
    r = run_cli("verify", str(a1), "--base", str(base))
    assert r.exit_code == 2 and "--data" in r.output
