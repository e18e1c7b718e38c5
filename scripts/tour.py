"""Run the tour commands on the bundled samples and put their real output into README.md and docs/.

    python scripts/tour.py            # rewrite every tour block (README.md and docs/*.md)
    python scripts/tour.py --check    # exit 1 (and show a diff) when a block is stale; nothing rewritten
    python scripts/tour.py --only rank --only check
    python scripts/tour.py --doc README.md --only info

Each block sits between ``<!-- tour:NAME -->`` and ``<!-- /tour -->`` in README.md or a page under docs/
(a name stands in one document only); TOURS below says which commands produce it and how it is shown,
and its order is the order they run in. The commands run in a scratch directory holding a copy of
``samples/`` (so paths print as ``samples/planted``, and files the tour writes such as ``planted-r4`` are
shared by later blocks), with this tree's package, ``COLUMNS=100``, ``NO_COLOR=1`` and one thread.
A block is stale when its text differs or a number differs by more than :data:`REL_TOL` relative:
the last bits of a float depend on the CPU's kernels. Timings (tokens/s, seconds) are masked before
comparing: they come from ``benchmarks/``, not from here. Blocks marked ``slow`` (training) run only
with ``--slow``; ``--check`` leaves them as they are unless ``--slow`` is given.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
COLUMNS = 100
BLOCK = re.compile(r"(<!-- tour:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /tour -->)", re.S)


@dataclass(frozen=True)
class Tour:
    commands: tuple[str, ...]  # arguments after `lora-inspect`
    fence: str | None = "console"  # None: the output is Markdown and goes in as is
    prompt: bool = True  # show `$ lora-inspect …` before the output
    head: int | None = None  # abridge: keep the first `head` lines …
    tail: int = 0  # … and the last `tail`
    json_abridge: bool = False
    slow: bool = False
    rel_tol: float = 1e-9  # numbers compare to this, relative (see REL_TOL); looser only where stated


TOURS: dict[str, Tour] = {
    "info": Tour(("info samples/planted",)),
    "rank": Tour(("rank samples/planted",), head=6, tail=2),
    "rank-json": Tour(("rank samples/planted --json",), fence="json", prompt=False, json_abridge=True),
    "truncate": Tour(("truncate samples/planted -o planted-r4 --rank 4",), head=8, tail=3),
    "truncate-budget": Tour(("truncate samples/text -o text-budget --max-params 4k",), head=1, tail=5),
    "rescale": Tour(("rescale samples/planted -o planted-half --factor 0.5",), head=8, tail=2),
    # verify evaluates a float32 torch model over ~2,000 positions: its sums round differently with other
    # kernels (AVX2/AVX-512) and batchings, so its numbers compare to 1e-4 relative
    "verify": Tour(("verify samples/planted planted-r4 planted-half samples/planted-kohya.safetensors",),
                   rel_tol=1e-4),
    "train": Tour(("train --task planted --planted-rank 4 --rank 32 --targets all-linear --steps 400 "
                   "--out runs/planted",), slow=True),
    "footprint": Tour(("footprint samples/planted",)),
    "check": Tour(("check samples/planted --serving vllm:16 --max-size 1MB",)),
    "check-markdown": Tour(("check planted-r4 --serving vllm:16 --max-size 1MB --min-energy 0.95@4 "
                            "--format markdown",), fence=None, prompt=False),
    # fit's output (14 rows) abridged; the check that follows it is shown whole
    "fit": Tour(("fit samples/planted --for vllm -o planted-vllm", "check planted-vllm --serving vllm:16"), head=8,
                tail=5),
    "check-applied": Tour(("check --applied vllm samples/planted --base samples/planted/base",)),
    "diff": Tour(("diff samples/planted planted-r4 --format markdown",), fence=None, prompt=False, head=14),
    "report": Tour(("report samples/planted planted-r4 -o report.html",)),
    "scan": Tour(("scan samples -o scan.jsonl",)),
    "convert": Tour(("convert samples/planted --to mlx -o planted-mlx",), head=6, tail=2),
    "extract": Tour(("extract samples/planted/base samples/planted-merged.safetensors -o planted-x4 --rank 4",),
                    head=7, tail=3),
    "merge": Tour(("merge samples/planted samples/text --weights 0.7,0.3 --rank 8 -o merged",), head=8, tail=4),
    "merge-ties": Tour(("merge samples/planted samples/text --method ties --density 0.5 -o merged-ties",), head=4,
                       tail=5),
    "rank-base": Tour(("rank samples/planted --base samples/planted/base --intruders",), head=0, tail=23),
}

# Timings vary from run to run; they are replaced by a placeholder before comparing.
TIMINGS = [
    (re.compile(r"\(\d[\d,.]* tokens/s\)"), "(… tokens/s)"),
    (re.compile(r"\b\d+(\.\d+)? ?(s|ms|µs) (wall|elapsed)\b"), "… s wall"),
    (re.compile(r"\b\d+(\.\d+)? ?(s|ms|µs) (of it scanning|scanning)\b"), "… s scanning"),
]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORA_INSPECT_", "FORCE_COLOR"))}
    env.update(PYTHONPATH=str(ROOT), COLUMNS=str(COLUMNS), LINES="50", NO_COLOR="1", TERM="dumb",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("GITHUB_STEP_SUMMARY", None)
    return env


def _abridge_json(text: str) -> str:
    doc = json.loads(text)
    if isinstance(doc.get("modules"), list) and doc["modules"]:
        first = dict(doc["modules"][0])
        if isinstance(first.get("singular_values"), list) and len(first["singular_values"]) > 6:
            first["singular_values"] = first["singular_values"][:6] + ["…"]
        doc["modules"] = [first, "…"] if len(doc["modules"]) > 1 else [first]
    return json.dumps(doc, indent=1, ensure_ascii=False)


def _abridge_lines(text: str, head: int | None, tail: int, mark: str = "…") -> str:
    lines = text.splitlines()
    if head is None or len(lines) <= head + tail + 1:
        return text
    return "\n".join(lines[:head] + [mark] + (lines[-tail:] if tail else []))


def run_tour(name: str, tour: Tour, workdir: Path) -> str:
    """The block's new body (without the surrounding markers)."""
    parts = []
    for cmd in tour.commands:
        # stderr (notes, "wrote …") interleaved with stdout as a terminal shows them, except for JSON
        stderr = subprocess.PIPE if tour.json_abridge else subprocess.STDOUT
        res = subprocess.run([sys.executable, "-m", "lora_inspect", *shlex.split(cmd)], cwd=workdir, env=_env(),
                             stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=1800)
        out = _abridge_json(res.stdout) if tour.json_abridge and res.returncode == 0 else res.stdout
        # in a Markdown table the elision is a row of its own, so that the table does not end there
        out = _abridge_lines(out.rstrip("\n"), tour.head, tour.tail, "…" if tour.fence else "| … |")
        if res.returncode:
            out += f"\n[exit {res.returncode}]"
        parts.append((f"$ lora-inspect {cmd}\n" if tour.prompt else "") + out)
    body = "\n".join(parts)
    body = "\n".join(line.rstrip() for line in body.splitlines())
    return f"```{tour.fence}\n{body}\n```\n" if tour.fence else f"{body}\n"


def normalise(text: str) -> str:
    """What the comparison ignores: timings, trailing spaces, this machine's paths."""
    for pattern, repl in TIMINGS:
        text = pattern.sub(repl, text)
    text = text.replace(str(ROOT) + os.sep, "").replace(tempfile.gettempdir(), "<tmp>")
    return "\n".join(line.rstrip() for line in text.splitlines())


def blocks(readme: str) -> dict[str, str]:
    return {m["name"]: m["body"] for m in BLOCK.finditer(readme)}


def documents() -> list[Path]:
    """README.md, then every page under docs/ that holds a tour block."""
    pages = sorted(p for p in (ROOT / "docs").glob("*.md") if "<!-- tour:" in p.read_text(encoding="utf-8"))
    return [README, *pages]


def all_blocks(docs: list[Path]) -> dict[str, tuple[Path, str]]:
    """Every tour block of ``docs``: name → (document, body). A name may stand in one document only."""
    found: dict[str, tuple[Path, str]] = {}
    for doc in docs:
        for name, body in blocks(doc.read_text(encoding="utf-8")).items():
            if name in found:
                raise SystemExit(f"tour block {name} stands in both {found[name][0]} and {doc}")
            found[name] = (doc, body)
    return found


_NUM = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
REL_TOL = 1e-9  # numbers in a block may differ by this much, relative (abs 1e-12 near zero): the last bits of
# a float64 depend on the CPU's kernels (AVX2 or AVX-512 BLAS), never on what the tool does


def _close(a: str, b: str, rel_tol: float) -> bool:
    x, y = float(a), float(b)
    return abs(x - y) <= max(rel_tol * max(abs(x), abs(y)), 1e-12)


def same(old: str, new: str, rel_tol: float = REL_TOL) -> bool:
    """Whether two blocks say the same: text exactly, every number to ``rel_tol`` relative (after
    :func:`normalise`). Digits are compared as numbers only where both sides have a number at that place."""
    a, b = normalise(old), normalise(new)
    if a == b:
        return True
    ta, tb = _NUM.split(a), _NUM.split(b)
    na, nb = _NUM.findall(a), _NUM.findall(b)
    return ta == tb and len(na) == len(nb) and all(_close(x, y, rel_tol) for x, y in zip(na, nb))


def regenerate(known: dict[str, tuple[Path, str]], names: list[str], slow: bool) -> dict[str, str]:
    """New bodies for the blocks ``names``, computed in a scratch directory. Every tour runs in the order
    of :data:`TOURS` (later ones read files written by earlier ones), up to the last one requested."""
    unknown = [n for n in known if n not in TOURS]
    if unknown:
        raise SystemExit(f"tour blocks that scripts/tour.py does not know: {unknown}")
    new: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="lora-inspect-tour-") as tmp:
        work = Path(tmp)
        shutil.copytree(ROOT / "samples", work / "samples")
        for name in TOURS:
            tour = TOURS[name]
            if tour.slow and not slow:
                continue
            body = run_tour(name, tour, work)
            if name in names:  # only the requested ones are replaced
                new[name] = body
            if all(n in new or (TOURS[n].slow and not slow) for n in names):
                break  # nothing requested comes later
    return new


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare only; exit 1 when a block is stale")
    ap.add_argument("--only", action="append", help="only this block (repeatable)")
    ap.add_argument("--slow", action="store_true", help="also run the slow blocks (training)")
    ap.add_argument("--doc", "--readme", dest="docs", action="append", type=Path,
                    help="a document to check or rewrite (repeatable; default: README.md and docs/*.md)")
    args = ap.parse_args(argv)
    docs = args.docs or documents()
    known = all_blocks(docs)
    names = args.only or list(known)
    missing = [n for n in names if n not in known]
    if missing:
        print(f"no such tour block in {', '.join(map(str, docs))}: {missing}", file=sys.stderr)
        return 2
    new = regenerate(known, names, args.slow)
    stale = [n for n, body in new.items() if not same(known[n][1], body, TOURS[n].rel_tol)]
    if args.check:
        for n in stale:
            diff = difflib.unified_diff(normalise(known[n][1]).splitlines(), normalise(new[n]).splitlines(),
                                        f"{known[n][0].name} tour:{n}", "now", lineterm="")
            print("\n".join(diff))
        if stale:
            print(f"stale tour blocks: {', '.join(stale)} (run: python scripts/tour.py)", file=sys.stderr)
        return 1 if stale else 0
    for doc in docs:
        text = doc.read_text(encoding="utf-8")
        doc.write_text(BLOCK.sub(lambda m: m.group(1) + new.get(m["name"], m["body"]) + m.group(4), text),
                       encoding="utf-8")
    print(f"updated {len(stale)} of {len(new)} tour blocks" + (f": {', '.join(stale)}" if stale else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
