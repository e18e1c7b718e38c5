"""`lora-inspect extract` on a 1B-shaped pair against mergekit's `mergekit-extract-lora` (issue 21: at equal rank
our error ≤ mergekit's, ≥ 5× faster on CPU on the same pair, in one run).

    python benchmarks/bench_extract.py [--data DIR] [--rank 16] [--runs 1] [--dtype fp32] [--no-peer]
                                       [--no-oracle] [--max-load 1.5] [--no-write] [--quick]

The pair, generated once into --data (default bench-data/extract-1b, ~5 GB; reused while its meta.json matches):
Llama-3.2-1B shapes (hidden 2048, intermediate 8192, 16 layers, 32 heads, 8 KV heads, vocabulary 128256, tied
lm_head) as bf16 safetensors shards with model.safetensors.index.json and config.json (model_type llama). BASE
is seeded Gaussian (std 0.02; norms 1); TUNED = BASE + a planted rank-16 change (decaying spectrum, element rms
2e-3) + noise (rms 2e-4) on every linear weight, rounded to bf16. ``--quick``: 2 layers, hidden 512 (a smoke run).

Timed in fresh processes, alternating, after the pair is read once (page cache warm): ours
(``lora-inspect extract BASE TUNED -o OUT --rank 16 --json --device cpu``) and the peer (``mergekit-extract-lora
--model TUNED --base-model BASE --out-path OUT2 --max-rank 16``): wall time, CPU time and peak RSS of each command
alone (getrusage(RUSAGE_CHILDREN) of a wrapper process; ours also reports its peak in the JSON). Then, from the
last run's outputs, every module's ‖ΔW − s·B@A‖_F/‖ΔW‖_F in float64 against ΔW = TUNED − BASE for both sides,
and the Eckart–Young optimum at the rank from a float64 Gram eigen-decomposition per module (independent of
lora_inspect; a few minutes at 1B size; --no-oracle takes the JSON's certified rel_optimum instead).

mergekit is the peer, not a project dependency: ``pip install mergekit`` (with transformers 5 it adds only
datasets and its pure-Python dependencies). Prints the load average at the start and the end and the torch
thread count; a 1-minute load average above --max-load at the start, or --quick, marks the result NOT
REPORTABLE (exit 3). Writes reports/extract.md (one section per mode) unless --no-write.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from bench_rank_peer import cpu_model, fmt_load, version  # noqa: E402  (the machine/version lines of every report)

REPORT = ROOT / "reports" / "extract.md"
PY = sys.executable
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
PEER = "mergekit-extract-lora"
GEN_VERSION = 1  # bump when the generated pair changes


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    def linears(self) -> dict[str, tuple[int, int]]:
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * (self.hidden // self.heads)
        return {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}

    def config(self) -> dict:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
                "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
                "head_dim": self.hidden // self.heads, "vocab_size": self.vocab, "tie_word_embeddings": True,
                "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
                "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"}

    def params(self) -> int:
        lin = sum(o * i for o, i in self.linears().values())
        return self.vocab * self.hidden + self.layers * (lin + 2 * self.hidden) + self.hidden


FULL = Shape(2048, 8192, 16, 32, 8, 128256)  # Llama-3.2-1B
QUICK = Shape(512, 2048, 2, 8, 2, 16384)
PLANTED_RMS, NOISE_RMS = 2e-3, 2e-4


# --- the pair ------------------------------------------------------------------------------------------


def _gen(name: str, seed: int):
    import torch

    return torch.Generator().manual_seed(zlib.crc32(name.encode()) ^ seed)


def _linear_pair(name: str, out: int, inp: int, rank: int, seed: int):
    """(W, W + planted rank-`rank` change + noise), both bf16."""
    import torch

    g = _gen(name, seed)
    w = torch.randn(out, inp, generator=g) * 0.02
    decay = torch.logspace(0, -1, rank)
    b = torch.randn(out, rank, generator=g) * decay
    a = torch.randn(rank, inp, generator=g)
    b *= PLANTED_RMS / float(torch.sqrt(torch.mean(decay ** 2)) * rank ** 0.5)
    t = w + b @ a + NOISE_RMS * torch.randn(out, inp, generator=g)
    return w.to(torch.bfloat16), t.to(torch.bfloat16)


def _shards(s: Shape) -> list[list[int]]:
    per = max(1, s.layers // 4)
    return [list(range(i, min(i + per, s.layers))) for i in range(0, s.layers, per)]


def generate(data: Path, s: Shape, rank: int, seed: int) -> None:
    """Write BASE and TUNED (sharded bf16 safetensors + index + config) into data/base, data/tuned."""
    import torch
    from safetensors.torch import save_file

    for side in ("base", "tuned"):
        (data / side).mkdir(parents=True, exist_ok=True)
        (data / side / "config.json").write_text(json.dumps(s.config(), indent=2))
    groups = [[]] + _shards(s)  # shard 1: embeddings and the final norm
    wmap: dict[str, str] = {}
    total = 0
    for n, layers in enumerate(groups, 1):
        fname = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        sides: dict[str, dict] = {"base": {}, "tuned": {}}
        if not layers:
            emb = (torch.randn(s.vocab, s.hidden, generator=_gen("embed", seed)) * 0.02).to(torch.bfloat16)
            for side in sides.values():
                side["model.embed_tokens.weight"] = emb
                side["model.norm.weight"] = torch.ones(s.hidden, dtype=torch.bfloat16)
        for layer in layers:
            pre = f"model.layers.{layer}."
            for mod, (o, i) in s.linears().items():
                sides["base"][pre + mod + ".weight"], sides["tuned"][pre + mod + ".weight"] = \
                    _linear_pair(pre + mod, o, i, rank, seed)
            for norm in ("input_layernorm", "post_attention_layernorm"):
                for side in sides.values():
                    side[pre + norm + ".weight"] = torch.ones(s.hidden, dtype=torch.bfloat16)
        for side, sd in sides.items():
            save_file(sd, str(data / side / fname), metadata={"format": "pt"})
        wmap |= {k: fname for k in sides["base"]}
        total += sum(t.numel() * t.element_size() for t in sides["base"].values())
        print(f"  wrote shard {n}/{len(groups)} ({fname})", flush=True)
    for side in ("base", "tuned"):
        index = {"metadata": {"total_size": total}, "weight_map": wmap}
        (data / side / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def ensure_pair(data: Path, s: Shape, rank: int, seed: int) -> None:
    meta = {"version": GEN_VERSION, "shape": asdict(s), "planted_rank": rank, "seed": seed,
            "planted_rms": PLANTED_RMS, "noise_rms": NOISE_RMS}
    mfile = data / "meta.json"
    if mfile.is_file() and json.loads(mfile.read_text()) == meta:
        print(f"pair: reusing {data}")
        return
    if data.exists() and any(data.iterdir()) and not mfile.is_file():
        sys.exit(f"{data} exists and was not written by this benchmark (no meta.json): choose another --data")
    need = 2 * 2 * s.params() * 1.05 + 2 * 2 * s.vocab * s.hidden  # the pair + mergekit's full embedding copy
    free = shutil.disk_usage(data.parent if data.parent.exists() else ROOT).free
    print(f"pair: generating {need / 1e9:.1f} GB into {data} ({free / 1e9:.0f} GB free)")
    if free < need * 1.2:
        sys.exit(f"not enough free disk for the pair: {free / 1e9:.1f} GB free, need ≈ {need * 1.2 / 1e9:.1f} GB")
    for side in ("base", "tuned"):
        shutil.rmtree(data / side, ignore_errors=True)
    mfile.unlink(missing_ok=True)
    generate(data, s, rank, seed)
    mfile.write_text(json.dumps(meta, indent=2))


# --- timing ---------------------------------------------------------------------------------------------

# one command in a wrapper process: its wall time and the peak RSS of it alone (RUSAGE_CHILDREN of the wrapper)
WRAP = """
import json, resource, subprocess, sys, time
with open(sys.argv[1], "wb") as out:
    t0 = time.perf_counter()
    p = subprocess.run(sys.argv[2:], stdout=out, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
sys.stderr.buffer.write(p.stderr[-4000:])
print(json.dumps({"rc": p.returncode, "wall": wall, "maxrss": ru.ru_maxrss * 1024, "cpu": ru.ru_utime + ru.ru_stime}))
"""


@dataclass
class Run:
    wall: float
    peak_rss: int  # bytes
    cpu: float  # user + system seconds


def measure(cmd: list[str], stdout: Path) -> Run:
    p = subprocess.run([PY, "-c", WRAP, str(stdout), *cmd], capture_output=True, env=ENV, cwd=ROOT)
    if p.returncode != 0 or not p.stdout.strip():
        sys.exit(f"wrapper failed: {shlex.join(cmd)}\n{p.stderr.decode(errors='replace')[-3000:]}")
    r = json.loads(p.stdout.decode().strip().splitlines()[-1])
    if r["rc"] != 0:
        sys.exit(f"failed (exit {r['rc']}): {shlex.join(cmd)}\n{p.stderr.decode(errors='replace')[-3000:]}")
    return Run(r["wall"], r["maxrss"], r["cpu"])


def warm(paths: list[Path]) -> float:
    """Read every file of the pair once (page cache warm for both sides alike); returns the seconds."""
    t0 = time.perf_counter()
    for d in paths:
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass
    return time.perf_counter() - t0


# --- errors ---------------------------------------------------------------------------------------------


def _pattern(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches the module name or a dotted suffix of it."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(?:.*\.)?{key}", module):
            return value
    return default


def read_peft(d: Path) -> dict[str, tuple]:
    """{module: (A, B, scale)} of a PEFT LoRA directory (safetensors, any dtype), as PEFT would apply it."""
    from safetensors import safe_open

    cfg = json.loads((d / "adapter_config.json").read_text())
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                if k.endswith(".lora_A.weight"):
                    m = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                    a, b = st.get_tensor(k), st.get_tensor(k.replace(".lora_A.", ".lora_B."))
                    r = _pattern(cfg.get("rank_pattern"), m, cfg["r"])
                    alpha = _pattern(cfg.get("alpha_pattern"), m, cfg["lora_alpha"])
                    if r != a.shape[0]:
                        sys.exit(f"{d}: {m}: rank {a.shape[0]} in the file, {r} in adapter_config.json")
                    out[m] = (a, b, alpha / (r ** 0.5 if cfg.get("use_rslora") else r))
    return out


def true_delta(data: Path, module: str):
    import torch
    from safetensors import safe_open

    key = module + ".weight"
    got = []
    for side in ("base", "tuned"):
        wmap = json.loads((data / side / "model.safetensors.index.json").read_text())["weight_map"]
        with safe_open(str(data / side / wmap[key]), framework="pt") as st:
            got.append(st.get_tensor(key).to(torch.float64))
    return got[1] - got[0]


def optimum(d, k: int) -> float:
    """The Eckart–Young relative error at rank k: √(Σ_{i>k} σᵢ²/‖ΔW‖²) from the float64 Gram's eigenvalues."""
    import torch

    g = d.T @ d if d.shape[0] >= d.shape[1] else d @ d.T
    lam = torch.linalg.eigvalsh(g).flip(0).clamp(min=0)
    total = float(torch.sum(d * d))
    return (max(total - float(lam[:k].sum()), 0.0) / total) ** 0.5


def rel_error(d, factors) -> float:
    import torch

    a, b, scale = factors
    return float(torch.linalg.norm(d - scale * (b.double() @ a.double())) / torch.linalg.norm(d))


@dataclass
class ModuleErr:
    name: str
    shape: tuple[int, int]
    opt: float  # Eckart–Young relative error (Gram oracle, or the JSON's certified bound with --no-oracle)
    ours: float  # from our file
    ours_json: float  # our JSON's rel_error
    peer: float | None


def errors(data: Path, doc: dict, ours_dir: Path, peer_dir: Path | None, rank: int, oracle: bool) -> list[ModuleErr]:
    ours, peer = read_peft(ours_dir), (read_peft(peer_dir) if peer_dir else None)
    rows = {m["name"]: m for m in doc["modules"]}
    if set(rows) != set(ours) or (peer is not None and set(peer) != set(ours)):
        sys.exit(f"module sets differ: JSON {len(rows)}, ours {len(ours)}, peer {len(peer or ours)}; "
                 f"e.g. {sorted(set(rows) ^ set(ours) ^ set(peer or ours))[:3]}")
    out = []
    for name in sorted(ours, key=lambda n: [int(x) if x.isdigit() else x for x in n.split(".")]):
        d = true_delta(data, name)
        opt = optimum(d, rank) if oracle else rows[name]["rel_optimum"]
        out.append(ModuleErr(name, tuple(d.shape), opt, rel_error(d, ours[name]), rows[name]["rel_error"],
                             rel_error(d, peer[name]) if peer else None))
    return out


# --- report ---------------------------------------------------------------------------------------------


def timing_table(times: dict[str, list[Run]], json_rss: int, labels: dict[str, str], work: Path) -> list[str]:
    ours = statistics.median(r.wall for r in times["ours"])
    lines = ["| command | wall (median) | min | max | CPU s | peak RSS (getrusage) | peak RSS (own report) | "
             "output | ÷ ours |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, runs in times.items():
        w = [r.wall for r in runs]
        own = f"{json_rss / 1e6:.0f} MB" if k == "ours" else "—"
        size = sum(f.stat().st_size for f in (work / k).iterdir()) / 1e6
        lines.append(f"| {labels[k]} | {statistics.median(w):.1f} s | {min(w):.1f} s | {max(w):.1f} s | "
                     f"{statistics.median(r.cpu for r in runs):.0f} | {max(r.peak_rss for r in runs) / 1e6:.0f} MB | "
                     f"{own} | {size:.1f} MB | {statistics.median(w) / ours:.2f}× |")
    return lines


def error_table(errs: list[ModuleErr]) -> list[str]:
    kinds: dict[str, list[ModuleErr]] = {}
    for e in errs:
        kinds.setdefault(e.name.rsplit(".", 1)[-1], []).append(e)
    peer = errs[0].peer is not None
    lines = ["| module | n | ΔW shape | optimum (median) | ours ÷ optimum (max) | JSON vs file (max abs) | "
             "peer ÷ optimum (max) | ours ≤ peer |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for kind, es in kinds.items():
        ratio = max(e.ours / e.opt for e in es)
        js = max(abs(e.ours_json - e.ours) for e in es)
        pr = f"{max(e.peer / e.opt for e in es):.6f}" if peer else "—"
        le = f"{sum(e.ours <= e.peer for e in es)}/{len(es)}" if peer else "—"
        lines.append(f"| {kind} | {len(es)} | {es[0].shape[0]}×{es[0].shape[1]} | "
                     f"{statistics.median(e.opt for e in es):.4f} | {ratio:.6f} | {js:.1e} | {pr} | {le} |")
    return lines


def write_report(heading: str, body: list[str]) -> None:
    from common import write_section

    if not REPORT.exists():
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        REPORT.write_text("# extract against mergekit\n\nWritten by `benchmarks/bench_extract.py` (issue 21: "
                          "`lora-inspect extract` at equal rank no worse than `mergekit-extract-lora`, ≥ 5× faster "
                          "on CPU on the same pair).\n")
    write_section(REPORT, heading, "\n".join(body))


# --- main -----------------------------------------------------------------------------------------------


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="where the pair lives (default bench-data/extract-1b, "
                    "with --quick bench-data/extract-quick)")
    ap.add_argument("--rank", type=int, default=16, help="extraction rank = planted rank (default 16)")
    ap.add_argument("--runs", type=int, default=1, help="timed rounds, alternating (default 1)")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="our factor dtype "
                    "(mergekit writes the checkpoint's dtype, bf16 here)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="2 layers, hidden 512: a smoke run")
    ap.add_argument("--no-peer", action="store_true", help="skip mergekit")
    ap.add_argument("--no-oracle", action="store_true", help="use the JSON's rel_optimum, no Gram per module")
    ap.add_argument("--max-load", type=float, default=1.5)
    ap.add_argument("--no-write", action="store_true", help="print only; leave reports/ alone")
    args = ap.parse_args()
    args.data = (args.data or ROOT / "bench-data" / ("extract-quick" if args.quick else "extract-1b")).resolve()
    return args


def run_all(args, base: Path, tuned: Path, work: Path) -> tuple[dict, dict, dict]:
    cmds = {"ours": [PY, "-m", "lora_inspect", "extract", str(base), str(tuned), "-o", str(work / "ours"),
                     "--rank", str(args.rank), "--json", "--device", "cpu", "--dtype", args.dtype, "--force"]}
    labels = {"ours": f"**ours** `lora-inspect extract BASE TUNED -o OUT --rank {args.rank} --json --device cpu"
                      + (f" --dtype {args.dtype}`" if args.dtype != "fp32" else "`")}
    if not args.no_peer:
        cmds["peer"] = [PEER, "--model", str(tuned), "--base-model", str(base), "--out-path", str(work / "peer"),
                        "--max-rank", str(args.rank)]
        labels["peer"] = f"**peer** `{PEER} --model TUNED --base-model BASE --out-path OUT2 --max-rank {args.rank}`"
    times: dict[str, list[Run]] = {k: [] for k in cmds}
    for i in range(args.runs):
        for k, c in cmds.items():
            if k == "peer":
                shutil.rmtree(work / "peer", ignore_errors=True)
            times[k].append(measure(c, work / f"{k}.out"))
        print(f"round {i + 1}/{args.runs}: " + ", ".join(
            f"{k} {times[k][-1].wall:.1f} s, {times[k][-1].peak_rss / 1e6:.0f} MB" for k in cmds), flush=True)
    return cmds, labels, times


def main() -> int:
    args = parse()
    import torch

    shape = QUICK if args.quick else FULL
    load0 = os.getloadavg()
    threads = f"torch threads {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"
    print(f"load average at start: {fmt_load(load0)}; {os.cpu_count()} CPUs; {threads}")
    if not args.no_peer and shutil.which(PEER) is None:
        sys.exit(f"{PEER} is not installed (pip install mergekit), or pass --no-peer")
    ensure_pair(args.data, shape, args.rank, args.seed)
    base, tuned, work = args.data / "base", args.data / "tuned", args.data / "runs"
    work.mkdir(exist_ok=True)
    read_s = warm([base, tuned])
    print(f"read the pair once in {read_s:.1f} s (page cache warm)")
    cmds, labels, times = run_all(args, base, tuned, work)
    load1 = os.getloadavg()
    print(f"load average at end of the timed runs: {fmt_load(load1)}")
    doc = json.loads((work / "ours.out").read_text())
    errs = errors(args.data, doc, work / "ours", None if args.no_peer else work / "peer", args.rank,
                  not args.no_oracle)
    quiet = load0[0] <= args.max_load
    t_tab, e_tab = timing_table(times, doc["memory"]["peak_rss_bytes"], labels, work), error_table(errs)
    verdict = _verdict(times, errs, quiet, args.quick)
    print("\n".join(["", *t_tab, "", *e_tab, "", verdict]))
    if not args.no_write:
        heading = ("1B-shaped pair, --quick smoke run" if args.quick else "1B-shaped pair") + (
            f", ours --dtype {args.dtype}" if args.dtype != "fp32" else "")
        write_report(heading, _body(args, shape, doc, (load0, load1), threads, read_s, cmds, t_tab, e_tab, verdict))
        print(f"wrote {REPORT.relative_to(ROOT)} (## {heading})")
    return 0 if quiet else 3


def _verdict(times: dict, errs: list[ModuleErr], quiet: bool, quick: bool) -> str:
    worst = max(e.ours / e.opt for e in errs)
    parts = [f"ours within {worst - 1:.1e} of the optimum in the worst module (certificate: 1e-3 + storage rounding)"]
    if "peer" in times:
        ratio = statistics.median(times["peer"][i].wall / times["ours"][i].wall for i in range(len(times["ours"])))
        le = sum(e.ours <= e.peer for e in errs)
        parts.append(f"peer ÷ ours wall time **{ratio:.2f}×** (issue 21 target ≥ 5×)")
        parts.append(f"ours ≤ peer in {le}/{len(errs)} modules; worst peer ÷ optimum "
                     f"{max(e.peer / e.opt for e in errs):.6f}")
    why = [w for w, bad in (("--quick smoke run", quick), ("machine not quiet at the start", not quiet)) if bad]
    return ("NOT REPORTABLE (" + "; ".join(why) + ") — " if why else "") + "; ".join(parts) + "."


def _body(args, shape: Shape, doc: dict, loads, threads: str, read_s: float, cmds: dict, t_tab, e_tab,
          verdict: str) -> list[str]:
    argv = shlex.join(sys.argv[1:])
    versions = ", ".join(f"{d} {version(d)}" for d in ("torch", "numpy", "scipy", "safetensors", "transformers",
                                                      "lora-inspect", "mergekit"))
    pair_gb = sum(f.stat().st_size for s in ("base", "tuned") for f in (args.data / s).glob("*.safetensors")) / 1e9
    lines = [
        f"`python benchmarks/bench_extract.py{' ' + argv if argv else ''}` — "
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- Machine: {cpu_model()}, {os.cpu_count()} CPUs; Python {sys.version.split()[0]}; {versions}; {threads}.",
        f"- Load average (1/5/15 min): at the start {fmt_load(loads[0])}, after the timed runs {fmt_load(loads[1])} "
        f"(limit {args.max_load} on the 1-minute value at the start).",
        f"- Pair: `{args.data.relative_to(ROOT) if args.data.is_relative_to(ROOT) else args.data}` — hidden "
        f"{shape.hidden}, intermediate {shape.intermediate}, {shape.layers} layers, {shape.heads} heads, "
        f"{shape.kv_heads} KV heads, vocabulary {shape.vocab}, tied lm_head; bf16 shards; {pair_gb:.2f} GB both "
        f"sides (read once in {read_s:.1f} s before timing). TUNED = BASE + planted rank-{args.rank} (element rms "
        f"{PLANTED_RMS}) + noise (rms {NOISE_RMS}) on all {len(doc['modules'])} linear weights.",
        f"- Method: {args.runs} timed round(s), each command in a fresh process, alternating; wall time and peak RSS "
        "of the command alone (getrusage(RUSAGE_CHILDREN) of a wrapper process); HF_HUB_OFFLINE=1.",
        "- Errors: ‖ΔW − s·B@A‖_F/‖ΔW‖_F in float64 against ΔW = TUNED − BASE, from each output file; optimum "
        + ("from the JSON's certified rel_optimum." if args.no_oracle else
           "from a float64 Gram eigen-decomposition per module (independent of lora_inspect)."),
        f"- Factor dtype: ours {args.dtype}; mergekit writes the checkpoints' dtype (bf16), whose rounding is in "
        "its error. mergekit's output also carries embed_tokens, lm_head and every norm whole (its modules_to_save "
        "for embeddings and unsupported modules, changed or not); ours carries only what changed.",
        "", *t_tab, "", *e_tab, "", verdict, "", "Commands (`python` = the interpreter running the benchmark):", ""]
    for k, c in cmds.items():
        lines.append(f"- {k}: `{shlex.join(c).replace(PY, 'python').replace(str(ROOT) + '/', '')}`")
    return lines


if __name__ == "__main__":
    sys.exit(main())
