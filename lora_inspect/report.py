"""Pages for ``report`` (a self-contained HTML file, or Markdown with PNGs beside it) and the
document/tables for ``diff``. Building only: no files are read or written here; the command writes.

Plots use matplotlib (the optional ``plot`` extra), imported lazily by :func:`require_matplotlib`.
Every image is a PNG embedded as a ``data:`` URI, so the HTML page makes no request of any kind
(no scripts, styles, fonts or images from anywhere else) and opens in any browser offline.

What is plotted (definitions in :mod:`lora_inspect.spectrum` and ``../shared/docs/metrics.md``):
- heatmaps of layers × module types coloured by energy rank at τ (smallest k with
  Σ_{i≤k} σᵢ² ≥ τ·Σ σᵢ²) and by σ₁ = ‖ΔW‖₂, the maximum over the modules in a cell;
- per module type, the singular values σᵢ of ΔW = s·B@A (log scale) and the cumulative energy
  Σ_{i≤k} σᵢ² / Σ σᵢ² (the fraction a rank-k truncation keeps, Eckart–Young), with τ and the
  recommended rank marked.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .adapter import module_layer, module_type
from .analysis import RankReport
from .diff import STATUS_OK, DiffResult
from .errors import InspectError
from .render import Table, View, fmt_bytes, fmt_count, fmt_float, to_markdown
from .views import action_line, adapter_summary, info_view, rank_view

__all__ = [
    "DIFF_SCHEMA",
    "PLOT_HINT",
    "require_matplotlib",
    "diff_view",
    "Figure",
    "AdapterFigures",
    "render_figures",
    "ReportOutput",
    "build_report",
    "page_html",
    "page_markdown",
    "truncate_commands",
]

DIFF_SCHEMA = "lora-inspect/diff/1"
PLOT_HINT = "pip install 'lora-inspect[plot]'"
PHI_DEFINITION = (
    "phi(i, i) = ||U_i^T U'_i||_F^2 / i over the top-i left singular vectors of each side "
    "(Hu et al. 2021, LoRA, section 7), at i = min(top, energy rank at tau of A, of B)"
)


# ----------------------------------------------------------------------------------------- diff


def _num(x: float | None, digits: int = 4) -> str:
    return fmt_float(x, digits)


def _module_diff_doc(d) -> dict:
    return {
        "name": d.name,
        "type": d.type,
        "layer": d.layer,
        "status": d.status,
        "shape_a": list(d.shape_a),
        "shape_b": list(d.shape_b),
        "rank_a": d.rank_a,
        "rank_b": d.rank_b,
        "norm_a": d.norm_a,
        "norm_b": d.norm_b,
        "distance": d.distance,
        "spectral_distance": d.spectral_distance,
        "rel_distance": d.rel_distance,
        "cosine": d.cosine,
        "phi": d.phi,
        "phi_dim": d.phi_dim,
        "energy_rank_a": d.energy_rank_a,
        "energy_rank_b": d.energy_rank_b,
        "notes": list(d.notes),
    }


def _names_line(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def diff_view(res: DiffResult, max_rows: int | None = 40) -> View:
    """The ``diff`` document (schema ``lora-inspect/diff/1``) and its tables."""
    s = res.summary
    data = {
        "schema": DIFF_SCHEMA,
        "a": adapter_summary(res.a),
        "b": adapter_summary(res.b),
        "top": res.top,
        "energy": res.energy,
        "phi_definition": PHI_DEFINITION,
        "modules": [_module_diff_doc(d) for d in res.modules],
        "only_in_a": list(res.only_in_a),
        "only_in_b": list(res.only_in_b),
        "summary": s,
    }
    shown = res.modules if max_rows is None else res.modules[:max_rows]
    rows = []
    for d in shown:
        shape = "×".join(map(str, d.shape_a)) + ("" if d.shape_a == d.shape_b else " vs " + "×".join(map(str, d.shape_b)))
        rows.append((
            d.name, shape, d.rank_a, d.rank_b, _num(d.norm_a, 3), _num(d.rel_distance), _num(d.cosine),
            _num(d.phi), d.phi_dim if d.phi_dim is not None else "-",
            d.status if d.status != STATUS_OK else ("zero ΔW" if d.notes else ""),
        ))
    title = f"{len(res.modules)} modules in both" + (
        f" (first {max_rows}; --all for every module)" if max_rows is not None and len(res.modules) > max_rows else ""
    )
    tables = [Table(
        title,
        ["module", "shape", "r A", "r B", "‖ΔW_A‖", "‖A−B‖/‖A‖", "cosine", "φ", "φ at i", "status"],
        rows,
        justify=["left"] + ["right"] * 8 + ["left"],
    )]
    trows = [
        (t, g["modules"], _num(g["mean_rel_distance"]), _num(g["max_rel_distance"]), _num(g["mean_cosine"]),
         _num(g["min_cosine"]), _num(g["mean_phi"]), _num(g["min_phi"]))
        for t, g in s["by_type"].items()
    ]
    tables.append(Table("by module type", ["type", "modules", "mean dist", "worst dist", "mean cos", "worst cos",
                                           "mean φ", "worst φ"], trows))
    header = [f"A: {res.a.path} ({res.a.format})", f"B: {res.b.path} ({res.b.format})"]
    footer = []
    if s["compared"]:
        footer.append(
            f"{s['compared']} compared: relative distance ‖ΔW_A−ΔW_B‖_F/‖ΔW_A‖_F mean {_num(s['mean_rel_distance'])}, "
            f"worst {_num(s['max_rel_distance'])} ({s['max_rel_distance_module']}); cosine mean {_num(s['mean_cosine'])}, "
            f"worst {_num(s['min_cosine'])} ({s['min_cosine_module']})"
        )
        footer.append(
            f"φ = subspace similarity of the top-i left singular vectors (LoRA §7), i = min(--top {res.top}, "
            f"rank@{res.energy:g} of A, of B): mean {_num(s['mean_phi'])}, worst {_num(s['min_phi'])}"
        )
    if s["shape_mismatches"]:
        footer.append(f"! {s['shape_mismatches']} modules differ in shape: not comparable")
    if s["non_finite"]:
        footer.append(f"! {s['non_finite']} modules hold NaN/inf values: not compared")
    if res.only_in_a:
        footer.append(f"only in A ({len(res.only_in_a)}): {_names_line(res.only_in_a)}")
    if res.only_in_b:
        footer.append(f"only in B ({len(res.only_in_b)}): {_names_line(res.only_in_b)}")
    return View(data, tables, header=header, footer=footer)


# ------------------------------------------------------------------------------------- figures


def require_matplotlib():
    """Import matplotlib's object API (no pyplot, no global state) or fail with the install hint."""
    try:
        import matplotlib
        from matplotlib.figure import Figure as MplFigure
    except ImportError as e:
        raise InspectError("report needs matplotlib for its plots", hint=PLOT_HINT) from e
    return matplotlib, MplFigure


@dataclass
class Figure:
    key: str  # file-name part: "heatmap" or the module type
    title: str
    png: bytes


@dataclass
class AdapterFigures:
    heatmap: Figure | None
    types: dict[str, Figure] = field(default_factory=dict)  # one per module type


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _short_labels(names: list[str]) -> tuple[list[str], str]:
    """Drop the common prefix (up to a separator): model.layers.0 … → 0 …, and the prefix as axis name."""
    if len(names) < 2:
        return names, ""
    pre = os.path.commonprefix(names)
    cut = max(pre.rfind("."), pre.rfind("_")) + 1
    pre = pre[:cut]
    return [n[len(pre):] or n for n in names], (pre + "N" if pre else "")


def _png(fig) -> bytes:
    """PNG bytes, reduced to a 256-colour palette (a third of the size; plots have few colours)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    try:
        from PIL import Image  # matplotlib depends on pillow

        buf.seek(0)
        img = Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        out = io.BytesIO()
        img.save(out, format="PNG", optimize=True)
        return out.getvalue()
    except Exception:  # pragma: no cover - an old pillow: keep matplotlib's PNG
        return buf.getvalue()


def _heatmap(report: RankReport, mpl) -> Figure | None:
    """Two panels stacked (energy rank, σ₁); module types down, layers across (deep models stay wide)."""
    matplotlib, MplFigure = mpl
    from matplotlib.colors import LogNorm, Normalize

    ok = [r for r in report.modules if r.energy_rank is not None]
    if not ok:
        return None
    layers = sorted({module_layer(r.name) for r in report.modules}, key=_natural)
    types = sorted({module_type(r.name) for r in report.modules})
    er = np.full((len(types), len(layers)), np.nan)
    s1 = np.full((len(types), len(layers)), np.nan)
    for r in ok:
        i, j = types.index(module_type(r.name)), layers.index(module_layer(r.name))
        er[i, j] = np.nanmax([er[i, j], r.energy_rank])
        sig = float(r.singular_values[0]) if len(r.singular_values) else 0.0
        s1[i, j] = np.nanmax([s1[i, j], sig])
    xlabels, xname = _short_labels(layers)
    nt, nl = len(types), len(layers)
    cell_w = 0.42 if nl <= 24 else max(0.12, 11.0 / nl)
    width = min(13.0, max(6.4, 2.6 + cell_w * nl))
    panel_h = 0.55 + 0.32 * min(nt, 24)
    fig = MplFigure(figsize=(width, 2 * panel_h + 0.9), layout="constrained")
    axes = fig.subplots(2, 1)
    cell_in = (width - 2.6) / nl
    pos = s1[np.isfinite(s1) & (s1 > 0)]
    s1_norm = (LogNorm(vmin=pos.min(), vmax=pos.max()) if pos.size and pos.max() > 10 * pos.min()
               else Normalize(vmin=np.nanmin(s1), vmax=np.nanmax(s1)))
    panels = (
        (axes[0], er, Normalize(vmin=0, vmax=max(report.summary["max_rank"], 1)), "viridis",
         f"energy rank at τ = {report.energy:g}", lambda v: f"{int(v)}", cell_in >= 0.2),
        (axes[1], s1, s1_norm, "magma", r"$\sigma_1 = \Vert\Delta W\Vert_2$", lambda v: f"{v:.2g}", cell_in >= 0.4),
    )
    for ax, grid, norm, cmap_name, title, fmt, annotate in panels:
        cmap = matplotlib.colormaps[cmap_name].with_extremes(bad="#eeeeee")
        im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        step = max(1, nl // 48)
        ax.set_xticks(range(0, nl, step), xlabels[::step], fontsize=7, rotation=0 if max(map(len, xlabels)) <= 3 else 60)
        ax.set_yticks(range(nt), types, fontsize=8)
        ax.set_xlabel(xname or "layer", fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.95, pad=0.01)
        if annotate and nl * nt <= 1500:
            for i in range(nt):
                for j in range(nl):
                    v = grid[i, j]
                    if np.isfinite(v):
                        rgba = cmap(norm(v))
                        light = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] > 0.55
                        ax.text(j, i, fmt(v), ha="center", va="center", fontsize=7, color="black" if light else "white")
    fig.suptitle("module types × layers (max over the modules in a cell; grey: not adapted)", fontsize=10)
    return Figure("heatmap", "energy rank and σ₁ by layer × module type", _png(fig))


def _type_figure(report: RankReport, mtype: str, mpl) -> Figure:
    matplotlib, MplFigure = mpl
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    tau = report.energy
    res = [r for r in report.modules if module_type(r.name) == mtype]
    res.sort(key=lambda r: _natural(module_layer(r.name)))
    drawn = [r for r in res if r.singular_values is not None and len(r.singular_values) and r.singular_values[0] > 0]
    ranks = sorted({r.module.rank for r in res})
    k_type = max((r.energy_rank for r in drawn), default=None)
    fig = MplFigure(figsize=(9.0, 3.4), layout="constrained")
    ax_sv, ax_cum = fig.subplots(1, 2)
    cmap = matplotlib.colormaps["viridis"]
    norm = Normalize(vmin=0, vmax=max(len(res) - 1, 1))
    for idx, r in enumerate(res):
        if r not in drawn:
            continue
        sv = np.asarray(r.singular_values, dtype=np.float64)
        x = np.arange(1, len(sv) + 1)
        color = cmap(norm(idx))
        shown = np.where(sv > sv[0] * 1e-15, sv, np.nan)  # zeros cannot sit on a log axis
        ax_sv.plot(x, shown, "-", color=color, lw=1.1, alpha=0.85)
        k = r.energy_rank
        ax_sv.plot([k], [shown[k - 1]], "o", color=color, ms=4, mec="black", mew=0.5)
        e = sv**2
        cum = np.cumsum(e) / e.sum()
        ax_cum.plot(np.concatenate([[0], x]), np.concatenate([[0.0], cum]), "-", color=color, lw=1.1, alpha=0.85)
    if k_type is not None:
        for ax in (ax_sv, ax_cum):
            ax.axvline(k_type, color="crimson", ls="--", lw=1.2, label=f"recommended rank {k_type}")
    ax_cum.axhline(tau, color="black", ls=":", lw=1.2, label=f"τ = {tau:g}")
    uni = report.summary["uniform_rank"]
    if k_type is not None and uni != k_type:
        ax_cum.axvline(uni, color="grey", ls="-.", lw=1.0, label=f"uniform rank {uni}")
    ax_sv.set_yscale("log")
    ax_sv.set_xlabel("i")
    ax_sv.set_ylabel(r"$\sigma_i$")
    ax_sv.set_title("singular values (dots: each module's energy rank)", fontsize=9)
    ax_cum.set_xlabel("rank k")
    ax_cum.set_ylabel(r"$\sum_{i\leq k}\sigma_i^2\;/\;\sum_i\sigma_i^2$")
    ax_cum.set_ylim(0, 1.02)
    ax_cum.set_title("cumulative energy kept by a rank-k truncation", fontsize=9)
    for ax in (ax_sv, ax_cum):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, which="major", alpha=0.3)
    ax_cum.legend(loc="lower right", fontsize=8)
    if len(drawn) > 1:
        cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax_cum, shrink=0.9)
        labels, _ = _short_labels([module_layer(r.name) for r in res])
        ticks = sorted(set(np.linspace(0, len(res) - 1, min(len(res), 6)).round().astype(int)))
        cb.set_ticks(ticks, labels=[labels[t] for t in ticks])
        cb.set_label("layer", fontsize=8)
    skipped = len(res) - len(drawn)
    fig.suptitle(
        f"{mtype}: {len(res)} modules, r = {', '.join(map(str, ranks))}, rank@{tau:g} ≤ {k_type if k_type is not None else '-'}"
        + (f"  ({skipped} zero or non-finite, not drawn)" if skipped else ""),
        fontsize=10,
    )
    return Figure(mtype, f"{mtype} spectra", _png(fig))


def render_figures(report: RankReport) -> AdapterFigures:
    """The heatmap and one figure per module type for one adapter (needs matplotlib)."""
    mpl = require_matplotlib()
    types = sorted({module_type(r.name) for r in report.modules})
    return AdapterFigures(_heatmap(report, mpl), {t: _type_figure(report, t, mpl) for t in types})


# ---------------------------------------------------------------------------------------- pages


def _suggested_out(path: Path, tag: str) -> str:
    if path.suffix in (".safetensors", ".bin"):
        return str(path.with_name(f"{path.stem}-{tag}{path.suffix}"))
    return str(path.with_name(f"{path.name.rstrip('/')}-{tag}"))


def truncate_commands(report: RankReport) -> list[tuple[str, str]]:
    """(comment, command line) pairs that apply the recommendation with ``lora-inspect truncate``."""
    s = report.summary
    p = report.adapter.path
    out = []
    if s["analysed"] == 0:
        return out
    if s["uniform_rank"] < s["max_rank"]:
        k = s["uniform_rank"]
        out.append((
            f"one rank for all modules: {fmt_count(s['params']['now'])} → {fmt_count(s['params']['uniform'])} parameters, "
            f"each keeps ≥ {s['uniform_min_retained_energy']:.4f} of its energy",
            f"lora-inspect truncate {shlex.quote(str(p))} -o {shlex.quote(_suggested_out(p, f'r{k}'))} --rank {k}",
        ))
    if s["params"]["pattern"] < s["params"]["now"]:
        out.append((
            f"per-module ranks (energy rank at τ = {report.energy:g}): "
            f"{fmt_count(s['params']['now'])} → {fmt_count(s['params']['pattern'])} parameters",
            f"lora-inspect truncate {shlex.quote(str(p))} -o {shlex.quote(_suggested_out(p, f'e{report.energy:g}'))} "
            f"--energy {report.energy:g}",
        ))
    return out


def _labels(reports: list[RankReport]) -> list[str]:
    names = [r.adapter.path.name or str(r.adapter.path) for r in reports]
    return [n if names.count(n) == 1 else f"{n} [{i + 1}]" for i, n in enumerate(names)]


def _footprint_rows(report: RankReport) -> list[tuple[str, int, int, float]]:
    s = report.summary
    now = max(s["params"]["now"], 1)
    return [
        (label, s["params"][key], s["bytes"][key], s["params"][key] / now)
        for key, label in (
            ("now", f"now (r = {', '.join(map(str, sorted({m.rank for m in report.adapter.modules})))})"),
            ("uniform", f"uniform rank {s['uniform_rank']}"),
            ("pattern", f"per-module ranks at τ = {report.energy:g}"),
        )
    ]


def _integrity(report: RankReport) -> tuple[list[str], list[tuple[str, str]]]:
    """(lines, [(module, flags)]) — flag counts and notes from the ``rank`` view, flagged modules."""
    lines = [ln for ln in rank_view(report, max_rows=0).footer if ln.startswith(("!", "·", "note:"))]
    if report.adapter.use_dora:
        lines.append("note: DoRA adapter — spectra describe the low-rank part s·B@A; the magnitude rescaling is not low rank")
    mods = [(r.name, ", ".join(r.flags)) for r in report.modules if r.flags]
    return lines, mods


@dataclass
class ReportOutput:
    text: str  # the HTML page or the Markdown document
    images: dict[str, bytes] = field(default_factory=dict)  # Markdown only: file name → PNG


def build_report(reports: list[RankReport], fmt: str = "html", *, image_prefix: str = "report",
                 command: str | None = None) -> ReportOutput:
    """Render figures and lay out the page; ``fmt`` is "html" (images inline) or "md" (images returned)."""
    if fmt not in ("html", "md"):
        raise InspectError(f"unknown report format {fmt!r} (html or md)")
    figs = [render_figures(r) for r in reports]
    if fmt == "html":
        return ReportOutput(page_html(reports, figs, command=command))
    names: dict[tuple[int, str], str] = {}
    images: dict[str, bytes] = {}
    for i, f in enumerate(figs):
        for fig in ([f.heatmap] if f.heatmap else []) + list(f.types.values()):
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", fig.key)
            name = f"{image_prefix}-{i + 1}-{slug}.png"
            names[(i, fig.key)] = name
            images[name] = fig.png
    return ReportOutput(page_markdown(reports, figs, names, command=command), images)


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


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _html_table(t: Table, first_col_key: bool = False) -> str:
    just = list(t.justify) if t.justify else ["left"] + ["right"] * (len(t.columns) - 1)
    out = [f"<h4>{_e(t.title)}</h4>" if t.title else "", "<table><thead><tr>"]
    out += [f'<th class="{"n" if j == "right" else ""}">{_e(c)}</th>' for c, j in zip(t.columns, just)]
    out.append("</tr></thead><tbody>")
    for row in t.rows:
        cells = []
        for i, (v, j) in enumerate(zip(row, just)):
            cls = "k" if first_col_key and i == 0 else ("n" if j == "right" else "")
            cells.append(f'<td class="{cls}">{_e(v)}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _img(fig: Figure, kind: str, label: str) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    return (f'<img class="plot {kind}" data-kind="{kind}" data-key="{_e(fig.key)}" '
            f'alt="{_e(label)}: {_e(fig.title)}" src="data:image/png;base64,{data}">')


def _grid(cells: list[str]) -> str:
    return f'<div class="grid" style="--n:{len(cells)}">' + "".join(f'<div class="cell">{c}</div>' for c in cells) + "</div>"


def _overview(reports: list[RankReport], labels: list[str]) -> Table:
    rows = []
    for lab, r in zip(labels, reports):
        s, ad = r.summary, r.adapter
        rows.append((
            lab, ad.format, len(ad.modules), ", ".join(map(str, sorted({m.rank for m in ad.modules}))),
            fmt_count(s["params"]["now"]), s["uniform_rank"], fmt_count(s["params"]["uniform"]),
            fmt_count(s["params"]["pattern"]), sum(s["flags"].values()),
        ))
    return Table(None, ["adapter", "format", "modules", "r", "params", "uniform rank", "params at uniform",
                        "params per-module", "flags"], rows,
                 justify=["left", "left"] + ["right"] * 7)


SECTIONS = [
    ("overview", "Overview"),
    ("info", "Adapter"),
    ("heatmap", "Energy rank and σ₁ by layer × module type"),
    ("spectra", "Singular values and cumulative energy by module type"),
    ("footprint", "Footprint now and at the recommendation"),
    ("integrity", "Integrity"),
    ("apply", "Apply the recommendation"),
    ("modules", "Every module"),
]


def page_html(reports: list[RankReport], figs: list[AdapterFigures], *, command: str | None = None) -> str:
    """One self-contained HTML page (inline CSS, PNGs as data: URIs, no script)."""
    labels = _labels(reports)
    tau = ", ".join(sorted({f"{r.energy:g}" for r in reports}))
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>lora-inspect report: {_e(', '.join(labels))}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        "<h1>LoRA adapter report</h1>",
        f'<p class="meta">{_e(", ".join(labels))} · energy τ = {_e(tau)} · spectra exact (QR of the factors, '
        f"no dense ΔW) · lora-inspect {_e(__version__)}</p>",
        "<nav>" + "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title in SECTIONS) + "</nav>",
    ]

    def section(sid: str, body: str) -> None:
        title = dict(SECTIONS)[sid]
        parts.append(f'<section id="{sid}"><h2>{_e(title)}</h2>{body}</section>')

    def per_adapter(fn) -> str:
        return _grid([f"<h3>{_e(lab)}</h3>" + fn(r, f, lab) for lab, r, f in zip(labels, reports, figs)])

    section("overview", _html_table(_overview(reports, labels)) +
            "".join(f"<p><b>{_e(lab)}</b>: {_e(action_line(r))}</p>" for lab, r in zip(labels, reports)))
    section("info", per_adapter(lambda r, f, lab: "".join(_html_table(t, first_col_key=True)
                                                            for t in info_view(r.adapter).tables)))
    section("heatmap", per_adapter(
        lambda r, f, lab: _img(f.heatmap, "heatmap", lab) if f.heatmap else '<p class="empty">nothing to plot</p>'))
    types = sorted({t for f in figs for t in f.types}, key=_natural)
    body = ['<p class="meta">Left: σᵢ of each module\'s ΔW on a log scale, one line per module coloured by layer, '
            "dots at each module's energy rank. Right: Σ_{i≤k} σᵢ² / Σ σᵢ², the fraction of ‖ΔW‖²_F a rank-k "
            "truncation keeps (Eckart–Young); dotted: τ; dashed: the type's recommended rank.</p>"]
    for t in types:
        cells = [(_img(f.types[t], "spectrum", lab) if t in f.types else '<p class="empty">not adapted</p>')
                 for lab, f in zip(labels, figs)]
        head = f"<h3>{_e(t)}</h3>"
        if len(reports) > 1:
            cells = [f"<h4>{_e(lab)}</h4>{c}" for lab, c in zip(labels, cells)]
        body.append(head + _grid(cells))
    section("spectra", "".join(body))

    def footprint(r, f, lab) -> str:
        rows = "".join(
            f'<tr><td>{_e(name)}</td><td class="n">{p:,}</td><td class="n">{_e(fmt_bytes(b))}</td>'
            f'<td class="n">{frac * 100:.1f}%</td><td><div class="barbox"><div class="bar" '
            f'style="width:{min(frac, 1) * 100:.1f}%"></div></div></td></tr>'
            for name, p, b, frac in _footprint_rows(r))
        return ('<table><thead><tr><th></th><th class="n">params</th><th class="n">bytes</th>'
                f'<th class="n">of now</th><th></th></tr></thead><tbody>{rows}</tbody></table>'
                f'<p class="meta">Bytes of the low-rank factors at their stored dtype; full tensors '
                f"(modules_to_save) add {_e(fmt_bytes(r.adapter.extra_bytes))}. Uniform rank keeps ≥ "
                f"{r.summary['uniform_min_retained_energy']:.4f} of every module's energy.</p>")

    section("footprint", per_adapter(footprint))

    def integrity(r, f, lab) -> str:
        lines, mods = _integrity(r)
        if not lines and not mods:
            return '<p class="empty">no flags: every module is finite, non-zero and not dominated by one direction</p>'
        out = "<ul class=\"flags\">" + "".join(
            f'<li class="{"warn" if ln.startswith("!") else ""}">{_e(ln.lstrip("!· "))}</li>' for ln in lines) + "</ul>"
        if mods:
            out += _html_table(Table(f"{len(mods)} flagged modules", ["module", "flags"], mods[:200],
                                     justify=["left", "left"]))
        return out

    section("integrity", per_adapter(integrity))

    def apply(r, f, lab) -> str:
        cmds = truncate_commands(r)
        out = f"<p>{_e(action_line(r))}</p>"
        if cmds:
            out += "<pre><code>" + "\n".join(f'<span class="c"># {_e(c)}</span>\n{_e(cmd)}' for c, cmd in cmds) + "</code></pre>"
        return out

    section("apply", per_adapter(apply))
    section("modules", per_adapter(lambda r, f, lab: "<details><summary>show the table</summary>" + "".join(
        _html_table(t) for t in rank_view(r, max_rows=None).tables) + "</details>"))
    parts.append(f"<footer>Generated by lora-inspect {_e(__version__)}"
                 + (f": <code>{_e(command)}</code>" if command else "") + ". Definitions: energy rank, stable rank and "
                 "entropy rank as in <code>lora-inspect rank</code>.</footer>")
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


def _md_table(t: Table) -> str:
    return to_markdown(View({}, [t]))


def page_markdown(reports: list[RankReport], figs: list[AdapterFigures], names: dict[tuple[int, str], str],
                  *, command: str | None = None) -> str:
    """The same page as Markdown for a pull-request comment; images by file name (beside the .md)."""
    labels = _labels(reports)
    multi = len(reports) > 1
    out = ["# LoRA adapter report", "",
           f"{', '.join(labels)} · energy τ = {', '.join(sorted({f'{r.energy:g}' for r in reports}))} · lora-inspect {__version__}", ""]

    def head(level: int, text: str) -> None:
        out.extend(["#" * level + " " + text, ""])

    head(2, dict(SECTIONS)["overview"])
    out.append(_md_table(_overview(reports, labels)))
    for lab, r in zip(labels, reports):
        out.extend([f"- **{lab}**: {action_line(r)}"])
    out.append("")
    head(2, dict(SECTIONS)["info"])
    for lab, r in zip(labels, reports):
        if multi:
            head(3, lab)
        out.extend(_md_table(t) for t in info_view(r.adapter).tables)
    head(2, dict(SECTIONS)["heatmap"])
    for i, (lab, f) in enumerate(zip(labels, figs)):
        if f.heatmap:
            out.extend([f"![{lab}: {f.heatmap.title}]({names[(i, 'heatmap')]})", ""])
    head(2, dict(SECTIONS)["spectra"])
    for t in sorted({t for f in figs for t in f.types}, key=_natural):
        head(3, t)
        for i, (lab, f) in enumerate(zip(labels, figs)):
            if t in f.types:
                out.extend([f"![{lab}: {t} spectra]({names[(i, t)]})", ""])
    head(2, dict(SECTIONS)["footprint"])
    for lab, r in zip(labels, reports):
        if multi:
            head(3, lab)
        rows = [(n, f"{p:,}", fmt_bytes(b), f"{frac * 100:.1f}%") for n, p, b, frac in _footprint_rows(r)]
        out.append(_md_table(Table(None, ["", "params", "bytes", "of now"], rows)))
    head(2, dict(SECTIONS)["integrity"])
    for lab, r in zip(labels, reports):
        if multi:
            head(3, lab)
        lines, mods = _integrity(r)
        out.extend(f"- {ln}" for ln in lines)
        if mods:
            out.append("")
            out.append(_md_table(Table(f"{len(mods)} flagged modules", ["module", "flags"], mods[:200],
                                       justify=["left", "left"])))
        if not lines and not mods:
            out.append("no flags")
        out.append("")
    head(2, dict(SECTIONS)["apply"])
    for lab, r in zip(labels, reports):
        if multi:
            head(3, lab)
        out.extend([action_line(r), ""])
        cmds = truncate_commands(r)
        if cmds:
            out.append("```sh")
            for c, cmd in cmds:
                out.extend([f"# {c}", cmd])
            out.extend(["```", ""])
    if command:
        out.extend([f"<sub>generated by `{command}`</sub>", ""])
    return "\n".join(out).rstrip() + "\n"
