"""Render the example report(s) and photograph them in a real headless Chromium.

    python benchmarks/screenshot_report.py                 # reports/report-*.html + reports/report-*.png
    python benchmarks/screenshot_report.py --install       # first pip-install matplotlib / apt-get chromium if missing
    python benchmarks/screenshot_report.py --adapters a b  # report these instead

Adapters: those named with --adapters; else every adapter in ``samples/`` (one report each); else two
small deterministic demo adapters built here (Llama-shaped, planted spectra — see :func:`demo_adapters`)
shown side by side in ``reports/report-demo.html``. Nothing is installed unless ``--install`` is given.
Existing reports are overwritten (they are generated files).
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

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--force-device-scale-factor=1",
]


def install(need_chromium: bool) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "matplotlib>=3.7"], check=True)
    if need_chromium and not find_chromium():
        subprocess.run(["apt-get", "update"], check=True)
        subprocess.run(["apt-get", "install", "-y", "chromium"], check=True)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


def demo_adapters(where: Path) -> list[Path]:
    """Two PEFT directories with planted, deterministic spectra (seeded; float32 on disk).

    demo-r16: 6 layers × 7 module types of a Llama-shaped model (hidden 128, GQA kv 64, MLP 344), r = 16,
    α = 32. σᵢ = σ₁·exp(−(i−1)/d) with d per type (attention q/k concentrated, MLP broad), σ₁ growing with
    depth; layer 2's v_proj is dominated by one direction (spike), layer 5's o_proj has B = 0 (untrained).
    demo-r8: the same model, q_proj and v_proj only, r = 8, another seed.
    """
    import torch
    from safetensors.torch import save_file

    hidden, kv, inter, layers = 128, 64, 344, 6
    shapes = {
        "self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
    decay = {"q_proj": 1.2, "k_proj": 1.0, "v_proj": 2.0, "o_proj": 2.2, "gate_proj": 2.6, "up_proj": 2.8,
             "down_proj": 3.0}

    level = {"q_proj": 0.8, "k_proj": 0.6, "v_proj": 1.6, "o_proj": 1.3, "gate_proj": 1.0, "up_proj": 1.1,
             "down_proj": 1.9}

    def orth(n, k, g):
        q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
        return q

    def build(name: str, r: int, alpha: float, types: list[str], seed: int) -> Path:
        g = torch.Generator().manual_seed(seed)
        sd = {}
        scale = alpha / r
        for layer in range(layers):
            for path, (out, inp) in shapes.items():
                t = path.split(".")[-1]
                if t not in types:
                    continue
                i = torch.arange(r, dtype=torch.float64)
                d = decay[t] * (1 + 0.08 * layer) * (1 + 0.1 * torch.rand(1, generator=g, dtype=torch.float64))
                s = 0.02 * (1 + 0.25 * layer) * level[t] * torch.exp(-i / d)
                if t == "v_proj" and layer == 2:
                    s[1:] *= 0.05  # one dominant direction
                u, v = orth(out, r, g), orth(inp, r, g)
                root = (s / scale).sqrt()
                b = u * root  # B (out, r)
                a = root[:, None] * v.T  # A (r, in)
                if t == "o_proj" and layer == 5:
                    b = torch.zeros_like(b)  # as initialised, never trained
                key = f"base_model.model.model.layers.{layer}.{path}"
                sd[f"{key}.lora_A.weight"] = a.float().contiguous()
                sd[f"{key}.lora_B.weight"] = b.float().contiguous()
        out_dir = where / name
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
        cfg = {"base_model_name_or_path": "demo/llama-tiny", "peft_type": "LORA", "r": r, "lora_alpha": alpha,
               "target_modules": sorted(types), "task_type": "CAUSAL_LM", "use_rslora": False, "use_dora": False}
        (out_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        return out_dir

    return [
        build("demo-r16", 16, 32.0, list(decay), seed=0),
        build("demo-r8", 8, 16.0, ["q_proj", "v_proj"], seed=1),
    ]


def sample_adapters() -> list[Path]:
    d = ROOT / "samples"
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if not p.name.startswith(".") and (p.is_dir() or p.suffix == ".safetensors"))


def run_report(adapters: list[Path], out: Path) -> None:
    """`lora-inspect report` in a subprocess, exactly as a user runs it, from the adapters' directory
    (so the page names them as a user would type them)."""
    cwd = Path(os.path.commonpath([a.parent for a in adapters]))
    cmd = [sys.executable, "-c", "from lora_inspect.cli import main; main()", "report",
           *[os.path.relpath(a, cwd) for a in adapters], "-o", str(out.resolve()), "--force"]
    subprocess.run(cmd, check=True, cwd=cwd)


def screenshot(page: Path, png: Path, size: str) -> None:
    exe = find_chromium()
    if not exe:
        raise SystemExit("no chromium found: run with --install, or apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={size}",
             page.resolve().as_uri()],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120,
        )
    print(f"wrote {png.relative_to(ROOT) if png.is_relative_to(ROOT) else png} ({png.stat().st_size:,} bytes)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--install", action="store_true", help="pip-install matplotlib and apt-get chromium if missing")
    ap.add_argument("--adapters", nargs="+", type=Path, help="report these adapters (side by side)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "reports")
    ap.add_argument("--window-size", default="1280,4900", help="Chromium window WIDTH,HEIGHT (the screenshot)")
    ap.add_argument("--no-screenshot", action="store_true")
    args = ap.parse_args()
    if args.install:
        install(not args.no_screenshot)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, list[Path]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.adapters:
            jobs.append(("custom", [p.resolve() for p in args.adapters]))
        elif sample_adapters():
            jobs += [(p.stem, [p]) for p in sample_adapters()]
        else:
            print("samples/ is empty: building two deterministic demo adapters (see demo_adapters)")
            jobs.append(("demo", demo_adapters(Path(tmp))))
        for name, adapters in jobs:
            page = args.out_dir / f"report-{name}.html"
            run_report(adapters, page)
            print(f"wrote {page} ({page.stat().st_size:,} bytes)")
            if not args.no_screenshot:
                screenshot(page, page.with_suffix(".png"), args.window_size)


if __name__ == "__main__":
    main()
