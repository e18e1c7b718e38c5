"""Are the files this tree writes the files an earlier tree wrote? (issue 20: "nothing lost")

    python scripts/same_outputs.py --before /tmp/old-tree [--keep DIR]

``--before`` is a checkout of an earlier commit (``git worktree add /tmp/old-tree f4146b6``). Inputs: the
bundled samples and one small adapter of every layout the registry reads (``tests/layout_builders.py``),
plus a bf16 PEFT adapter. Every writing command — truncate, rescale (``--factor``, ``--bake``), convert to
each target that accepts the input, merge of an adapter with itself — runs once per tree, each in a fresh
process whose working directory is the tree. The outputs are compared file by file:

- identical bytes: ``same``;
- otherwise, for safetensors files, tensor by tensor: the same names, dtypes and shapes, and values within
  one unit in the last place of the stored dtype relative to the tensor's largest entry (``rounding``);
  for a factor pair that differs by more, ΔW = B@A per module is compared instead, to 16 units in the last
  place of the stored dtype relative to its largest entry (an SVD may flip the signs of singular vectors,
  which changes the factors but not ΔW): ``same ΔW``;
- anything else is ``DIFFERENT`` and the script exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ULP = {"F64": 2.0**-52, "F32": 2.0**-23, "F16": 2.0**-10, "BF16": 2.0**-7}


def _inputs(work: Path) -> dict[str, Path]:
    import torch
    from safetensors.torch import load_file, save_file

    from tests.builders import build_peft
    from tests.layout_builders import BUILDERS

    out = {"planted": ROOT / "samples" / "planted", "planted-kohya": ROOT / "samples" / "planted-kohya.safetensors"}
    for name, build in BUILDERS.items():
        (work / name).mkdir(parents=True)
        out[name] = build(work / name).path
    b = build_peft(work / "bf16", arch="llama", seed=3, r=6, lora_alpha=12, target_modules=["q_proj", "v_proj"]).path
    weights = b / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(weights)).items()}, str(weights))
    out["peft-bf16"] = b
    return out


def _jobs(src: Path) -> list[tuple[str, list[str]]]:
    suffix = "" if src.is_dir() else src.suffix
    jobs = [("truncate" + suffix, ["truncate", str(src), "--rank", "2"]),
            ("rescale" + suffix, ["rescale", str(src), "--factor", "0.5"]),
            ("bake" + suffix, ["rescale", str(src), "--factor", "1.5", "--bake"]),
            ("merge", ["merge", str(src), str(src), "--weights", "0.5,0.25"])]
    for to, name in (("peft", "peft"), ("kohya", "k.safetensors"), ("diffusers", "d.safetensors"), ("mlx", "mlx")):
        jobs.append((f"to-{name}", ["convert", str(src), "--to", to]))
    return jobs


def _run(tree: Path, args: list[str], out: Path) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORA_INSPECT_")}
    env.update(PYTHONPATH=str(tree), NO_COLOR="1")
    res = subprocess.run([sys.executable, "-m", "lora_inspect", *args, "-o", str(out)], cwd=tree, env=env,
                         capture_output=True, text=True, timeout=600)
    return res.returncode


def _tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    from lora_inspect.arrays import decode
    from lora_inspect.formats.tensors import SafetensorsSource

    src = SafetensorsSource(path)
    return {k: (src.tensors[k].dtype, np.asarray(decode(src.raw(k)), dtype=np.float64)) for k in src.tensors}


def _delta(up: np.ndarray, down: np.ndarray) -> np.ndarray:
    return up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)


def _compare_safetensors(a: Path, b: Path) -> str:
    ta, tb = _tensors(a), _tensors(b)
    if {k: (d, x.shape) for k, (d, x) in ta.items()} != {k: (d, x.shape) for k, (d, x) in tb.items()}:
        return "DIFFERENT (names, dtypes or shapes)"
    far = [k for k, (d, x) in ta.items() if x.size and np.abs(x - tb[k][1]).max() > ULP.get(d, 0) * max(np.abs(x).max(), 1e-300)]
    if not far:
        return "rounding"
    for k in far:  # a factor: compare ΔW = up @ down of its pair (PEFT lora_B/lora_A, kohya lora_up/lora_down)
        names = next(((up, down) for up, down in (("lora_B", "lora_A"), ("lora_up", "lora_down")) if up in k or down in k),
                     None)
        if names is None:
            return f"DIFFERENT ({k})"
        up_key = k.replace(names[1], names[0])
        down_key = k.replace(names[0], names[1])
        if up_key not in ta or down_key not in ta:
            return f"DIFFERENT ({k})"
        da, db = (_delta(t[up_key][1], t[down_key][1]) for t in (ta, tb))
        if np.abs(da - db).max() > 16 * ULP.get(ta[k][0], 0) * max(np.abs(da).max(), 1e-300):
            return f"DIFFERENT (ΔW of {k})"
    return "same ΔW"


def _compare(a: Path, b: Path) -> str:
    if a.is_file() != b.is_file():
        return "DIFFERENT (one is missing)"
    files_a = [a] if a.is_file() else sorted(p for p in a.rglob("*") if p.is_file())
    verdicts = []
    for fa in files_a:
        fb = b if a.is_file() else b / fa.relative_to(a)
        if not fb.is_file():
            return f"DIFFERENT ({fa.name} missing)"
        if fa.read_bytes() == fb.read_bytes():
            verdicts.append("same")
        elif fa.suffix == ".safetensors":
            verdicts.append(_compare_safetensors(fa, fb))
        elif fa.suffix == ".json" and json.loads(fa.read_text()) == json.loads(fb.read_text()):
            verdicts.append("same")
        else:
            verdicts.append(f"DIFFERENT ({fa.name})")
    order = ["DIFFERENT", "same ΔW", "rounding", "same"]
    return min(verdicts, key=lambda v: next(i for i, o in enumerate(order) if v.startswith(o)), default="same")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--keep", type=Path, help="write the outputs here instead of a temporary folder")
    ap.add_argument("--only", nargs="*", help="these inputs only (names as printed)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="same-outputs-"))
    counts: dict[str, int] = {}
    bad = []
    for name, src in _inputs(work / "in").items():
        if args.only and name not in args.only:
            continue
        for label, job in _jobs(src):
            outs = [work / side / name / label for side in ("before", "after")]
            for o in outs:
                o.parent.mkdir(parents=True, exist_ok=True)
            codes = [_run(args.before.resolve(), job, outs[0]), _run(ROOT, job, outs[1])]
            if codes[0] != codes[1]:
                verdict = f"DIFFERENT (exit {codes[0]} before, {codes[1]} after)"
            elif codes[0] != 0:
                verdict = "both refused"
            else:
                verdict = _compare(*outs)
            key = verdict.split(" (")[0]
            counts[key] = counts.get(key, 0) + 1
            print(f"{name:22} {label:20} {verdict}")
            if key == "DIFFERENT":
                bad.append((name, label, verdict))
    print("\n" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
