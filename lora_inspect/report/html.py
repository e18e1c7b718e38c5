"""The report as one self-contained HTML page: inline CSS, every image a PNG in a ``data:`` URI, no
script, no request of any kind (it opens in any browser offline)."""

from __future__ import annotations

import base64
import html
from collections.abc import Callable

from .. import __version__
from ..views.render import Table, fmt_bytes
from .sections import (
    Bars,
    Block,
    Bullets,
    Cell,
    Commands,
    Details,
    Grid,
    Image,
    Section,
    TableBlock,
    Text,
)

__all__ = ["write_html"]

_CSS = """
:root{--fg:#1d2430;--muted:#5b6574;--line:#d9dee6;--bg:#ffffff;--soft:#f5f7fa;--acc:#b0123f}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1240px;margin:0 auto;padding:20px 24px 48px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 10px;padding-bottom:4px;border-bottom:2px solid var(--line)}
h3{font-size:15px;margin:18px 0 6px}h4{font-size:13px;margin:0 0 6px;color:var(--muted);font-weight:600}
.meta{color:var(--muted);margin:0 0 12px}nav a{margin-right:14px;color:var(--acc);text-decoration:none}
.grid{display:grid;gap:16px;grid-template-columns:repeat(var(--n),minmax(0,1fr))}
.cell{min-width:0}
table{border-collapse:collapse;width:100%;font-size:12.5px;margin:4px 0 10px}
th,td{border-bottom:1px solid var(--line);padding:3px 8px;text-align:left;vertical-align:top}
th{background:var(--soft);font-weight:600}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
td.k{color:var(--muted);white-space:nowrap}
img.plot{width:100%;height:auto;border:1px solid var(--line);border-radius:4px;background:#fff}
.bar{height:10px;background:var(--acc);border-radius:2px;min-width:1px}
.barbox{width:140px;background:var(--soft);border-radius:2px}
pre{background:#0f1720;color:#e6edf3;padding:10px 12px;border-radius:6px;white-space:pre-wrap;overflow-wrap:anywhere;font-size:12.5px}
pre .c{color:#8b98a9}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
ul.flags{margin:4px 0;padding-left:18px}.warn{color:var(--acc)}
.empty{color:var(--muted);font-style:italic;padding:8px 0}
details summary{cursor:pointer;color:var(--acc);margin:6px 0}
footer{margin-top:36px;color:var(--muted);font-size:12px}
"""


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _table(t: Table, key_column: bool = False) -> str:
    just = list(t.justify) if t.justify else ["left"] + ["right"] * (len(t.columns) - 1)
    out = [f"<h4>{_e(t.title)}</h4>" if t.title else "", "<table><thead><tr>"]
    out += [f'<th class="{"n" if j == "right" else ""}">{_e(c)}</th>' for c, j in zip(t.columns, just)]
    out.append("</tr></thead><tbody>")
    for row in t.rows:
        cells = []
        for i, (v, j) in enumerate(zip(row, just)):
            cls = "k" if key_column and i == 0 else ("n" if j == "right" else "")
            cells.append(f'<td class="{cls}">{_e(v)}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _text(b: Text) -> str:
    if b.label is not None:
        return f"<p><b>{_e(b.label)}</b>: {_e(b.text)}</p>"
    return f'<p class="{b.style}">{_e(b.text)}</p>' if b.style else f"<p>{_e(b.text)}</p>"


def _bullets(b: Bullets) -> str:
    items = "".join(f'<li class="{"warn" if sev == "!" else ""}">{_e(("note: " if sev == "note" else "") + text)}</li>'
                    for sev, text in b.items)
    return f'<ul class="flags">{items}</ul>'


def _bars(b: Bars) -> str:
    rows = "".join(
        f'<tr><td>{_e(name)}</td><td class="n">{p:,}</td><td class="n">{_e(fmt_bytes(n))}</td>'
        f'<td class="n">{frac * 100:.1f}%</td><td><div class="barbox"><div class="bar" '
        f'style="width:{min(frac, 1) * 100:.1f}%"></div></div></td></tr>'
        for name, p, n, frac in b.rows)
    return ('<table><thead><tr><th></th><th class="n">params</th><th class="n">bytes</th>'
            f'<th class="n">of now</th><th></th></tr></thead><tbody>{rows}</tbody></table>'
            f'<p class="meta">{_e(b.caption)}</p>')


def _image(b: Image) -> str:
    data = base64.b64encode(b.figure.png).decode("ascii")
    return (f'<img class="plot {b.kind}" data-kind="{b.kind}" data-key="{_e(b.figure.key)}" '
            f'alt="{_e(b.label)}: {_e(b.figure.title)}" src="data:image/png;base64,{data}">')


def _commands(b: Commands) -> str:
    body = "\n".join(f'<span class="c"># {_e(c)}</span>\n{_e(cmd)}' for c, cmd in b.items)
    return f"<pre><code>{body}</code></pre>"


def _details(b: Details) -> str:
    return f"<details><summary>{_e(b.summary)}</summary>{''.join(block(x) for x in b.blocks)}</details>"


_WRITERS: dict[type, Callable] = {
    Text: _text, Bullets: _bullets, Bars: _bars, Image: _image, Commands: _commands, Details: _details,
    TableBlock: lambda b: _table(b.table, b.key_column),
}


def block(b: Block) -> str:
    return _WRITERS[type(b)](b)


def _cell(c: Cell, sub: bool) -> str:
    head = "" if c.label is None else (f"<h4>{_e(c.label)}</h4>" if sub else f"<h3>{_e(c.label)}</h3>")
    return f'<div class="cell">{head}{"".join(block(b) for b in c.blocks)}</div>'


def _grid(g: Grid) -> str:
    head = f"<h3>{_e(g.heading)}</h3>" if g.heading else ""
    cells = "".join(_cell(c, g.heading is not None) for c in g.cells)
    return f'{head}<div class="grid" style="--n:{len(g.cells)}">{cells}</div>'


def _section(s: Section) -> str:
    body = "".join(block(b) for b in s.intro) + "".join(_grid(g) for g in s.grids)
    return f'<section id="{s.sid}"><h2>{_e(s.title)}</h2>{body}</section>'


def write_html(sections: list[Section], labels: list[str], tau: str, command: str | None) -> str:
    """The page around the sections."""
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>lora-inspect report: {_e(', '.join(labels))}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        "<h1>LoRA adapter report</h1>",
        f'<p class="meta">{_e(", ".join(labels))} · energy τ = {_e(tau)} · spectra exact (QR of the factors, '
        f"no dense ΔW) · lora-inspect {_e(__version__)}</p>",
        "<nav>" + "".join(f'<a href="#{s.sid}">{_e(s.title)}</a>' for s in sections) + "</nav>",
    ]
    parts += [_section(s) for s in sections]
    parts.append(f"<footer>Generated by lora-inspect {_e(__version__)}"
                 + (f": <code>{_e(command)}</code>" if command else "") + ". Definitions: energy rank, stable rank and "
                 "entropy rank as in <code>lora-inspect rank</code>.</footer>")
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"
