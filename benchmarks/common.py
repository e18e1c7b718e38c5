"""Shared benchmark fixtures: big, realistically shaped adapters generated on the fly (never committed)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench-data"  # ignored by git

# The read floor of a bf16 safetensors file (argv[1]), as a script for a fresh process: numpy only, the file
# memory-mapped, every tensor decoded bf16 → float32 bits into one reused buffer — what any analysis must do.
READ_FLOOR = """
import json, struct, sys
import numpy as np
with open(sys.argv[1], "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
header.pop("__metadata__", None)
data = np.memmap(sys.argv[1], dtype=np.uint8, mode="r", offset=8 + n)
wide = np.empty(max(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values()) // 2, np.uint32)
for e in header.values():
    bits = data[e["data_offsets"][0]:e["data_offsets"][1]].view(np.uint16)
    np.left_shift(bits, 16, out=wide[:bits.size], dtype=np.uint32)
"""

# Llama-3-8B (hidden 4096, intermediate 14336, 32 layers, 8 KV heads of 128): module → (out, in)
LLAMA3_8B_SHAPES = {
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (1024, 4096),
    "self_attn.v_proj": (1024, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (14336, 4096),
    "mlp.up_proj": (14336, 4096),
    "mlp.down_proj": (4096, 14336),
}


def llama3_8b_adapter(r: int = 64, dtype: torch.dtype = torch.bfloat16, layers: int = 32, seed: int = 0,
                      out: Path | None = None) -> Path:
    """A PEFT directory shaped like an all-linear Llama-3-8B adapter (r=64 bf16: 167.8 M params, 336 MB).

    Factors are seeded Gaussian with a decaying column scale so the spectrum is not flat.
    Reused when it already exists.
    """
    out = out or DATA / f"llama3-8b-r{r}-{str(dtype).split('.')[-1]}"
    weights = out / "adapter_model.safetensors"
    if weights.is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    decay = torch.logspace(0, -2, r)  # column i scaled by 10^(-2 i/r)
    sd = {}
    for layer in range(layers):
        for mod, (o, i) in LLAMA3_8B_SHAPES.items():
            name = f"base_model.model.model.layers.{layer}.{mod}"
            sd[f"{name}.lora_A.weight"] = (torch.randn(r, i, generator=g) / i**0.5).to(dtype)
            sd[f"{name}.lora_B.weight"] = (torch.randn(o, r, generator=g) * decay / r**0.5).to(dtype)
    save_file(sd, str(weights), metadata={"format": "pt"})
    cfg = {
        "base_model_name_or_path": "meta-llama/Meta-Llama-3-8B", "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
        "target_modules": sorted(m.split(".")[-1] for m in LLAMA3_8B_SHAPES),
    }
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return out


def time_cmd(cmd: list[str], **kw) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kw)
    return time.perf_counter() - t0


def alternate(cmds: dict[str, list[str]], runs: int) -> dict[str, list[float]]:
    """Run each command once per round, alternating, so drift and cache state hit all alike."""
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(runs):
        for k, c in cmds.items():
            times[k].append(time_cmd(c))
    return times


def median(xs):
    return statistics.median(xs)


def write_section(report: Path, heading: str, body: str) -> None:
    """Replace (or append) one `## heading` section of a markdown report, leaving the others alone."""
    text = report.read_text() if report.exists() else "# Benchmarks\n\nMeasured on this project's 2-core CPU machine unless a section says otherwise.\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == f"## {heading}"), None)
    new = [f"## {heading}", "", *body.rstrip().splitlines(), ""]
    if start is None:
        lines += ["", *new]
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = new
    report.write_text("\n".join(lines).rstrip() + "\n")


PY = sys.executable
