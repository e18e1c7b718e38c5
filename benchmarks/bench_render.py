"""Linear-time claims of issue 9, measured (tests assert only correctness):

- the table renderer on one module name of 10⁵, 10⁶ and 10⁷ characters;
- the file-pattern matcher (``validate.compile_pattern``) on pathological keys against names of
  10⁴, 10⁵ and 10⁶ characters (Python's ``re`` does not finish on these).

Prints seconds per size and the ratio to the smallest size (linear ⇒ ratio ≈ size ratio), and writes
the table to reports/render.md.

    python benchmarks/bench_render.py
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

from lora_inspect import validate
from lora_inspect.views.render import Table, View, to_text


def _best(fn, runs: int = 3) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def render(n: int) -> float:
    name = "model.layers.7." + "x" * n + ".q_proj"
    t = Table("t", ["module", "shape", "flags"], [(name, "64×176", "spike")], kinds=["name", "fixed", "fixed"])
    return _best(lambda: to_text(View({}, [t]), 80))


def pattern(key: str, n: int) -> float:
    match = validate.compile_pattern(key, "bench")
    name = "a" * n
    return _best(lambda: match(name))


def main() -> None:
    rows = []
    sizes = (10**5, 10**6, 10**7)
    base = render(sizes[0])
    for n in sizes:
        s = render(n)
        rows.append(("render one name", n, s, s / base))
    for key in ("(.*)*x", "(a|aa)*b", "(a+)+$"):
        psizes = (10**4, 10**5, 10**6)
        pbase = pattern(key, psizes[0])
        for n in psizes:
            s = pattern(key, n)
            rows.append((f"pattern {key}", n, s, s / pbase))
    lines = [
        "# Linear-time rendering and pattern matching",
        "",
        f"`python benchmarks/bench_render.py` on {platform.machine()}, best of 3. Linear ⇒ the ratio grows with",
        "the size ratio (×10 per row).",
        "",
        "| what | characters | seconds | ratio to the smallest |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {w} | {n:,} | {s:.4f} | {r:.1f}× |" for w, n, s, r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).resolve().parent.parent / "reports" / "render.md"
    out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
