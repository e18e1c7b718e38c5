"""The report's figures (matplotlib, the optional ``plot`` extra, imported lazily).

What is plotted (definitions in :mod:`lora_inspect.spectrum` and ``docs/metrics.md``):
- heatmaps of layers × module types coloured by energy rank at τ (smallest k with
  Σ_{i≤k} σᵢ² ≥ τ·Σ σᵢ²) and by σ₁ = ‖ΔW‖₂, the maximum over the modules in a cell; every
  adapter of one report shares the same two colour scales, so equal colours mean equal values;
- per module type, the singular values σᵢ of ΔW = s·B@A (log scale) and the cumulative energy
  Σ_{i≤k} σᵢ² / Σ σᵢ² (the fraction a rank-k truncation keeps, Eckart–Young), with τ and the
  recommended rank marked.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..adapter import module_layer, module_type
from ..analysis import RankReport
from ..naming import natural_key, natural_sorted
from ..optional import require
from ..units import plural

__all__ = ["PLOT_HINT", "require_matplotlib", "Figure", "AdapterFigures", "render_figures", "short_labels"]

PLOT_HINT = "pip install 'lora-inspect[plot]'"


def require_matplotlib():
    """Import matplotlib's object API (no pyplot, no global state) or fail with the install hint in one
    line (:func:`lora_inspect.optional.require`)."""
    return require("matplotlib", "report"), _mpl("figure", "Figure")[0]


def _mpl(module: str, *names: str) -> tuple[Any, ...]:
    """``names`` from ``matplotlib.<module>``, through the optional-dependency gate."""
    m = require(f"matplotlib.{module}", "report")
    return tuple(getattr(m, n) for n in names)


@dataclass
class Figure:
    key: str  # file-name part: "heatmap" or the module type
    title: str
    png: bytes


@dataclass
class AdapterFigures:
    heatmap: Figure | None
    types: dict[str, Figure] = field(default_factory=dict)  # one per module type


def short_labels(names: list[str]) -> tuple[list[str], str]:
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


@dataclass
class _Grid:
    types: list[str]
    layers: list[str]
    energy_rank: np.ndarray  # (types, layers), NaN where no module
    sigma1: np.ndarray


def _grid(report: RankReport) -> _Grid | None:
    ok = [r for r in report.modules if r.energy_rank is not None]
    if not ok:
        return None
    layers = natural_sorted({module_layer(r.name) for r in report.modules})
    types = natural_sorted({module_type(r.name) for r in report.modules})
    ti, li = {t: i for i, t in enumerate(types)}, {lay: j for j, lay in enumerate(layers)}
    er = np.full((len(types), len(layers)), np.nan)
    s1 = np.full((len(types), len(layers)), np.nan)
    for r in ok:
        i, j = ti[module_type(r.name)], li[module_layer(r.name)]
        er[i, j] = np.nanmax([er[i, j], r.energy_rank])
        s1[i, j] = np.nanmax([s1[i, j], r.sigma1 or 0.0])
    return _Grid(types, layers, er, s1)


@dataclass
class Scales:
    """The colour scales every adapter's heatmap shares: energy rank 0…max rank, σ₁ over all cells
    (log when it spans more than a decade)."""

    max_rank: int
    sigma_lo: float
    sigma_hi: float
    sigma_log: bool


def shared_scales(reports: list[RankReport]) -> Scales:
    sig = np.array([r.sigma1 for rep in reports for r in rep.modules
                    if r.energy_rank is not None and r.sigma1 is not None], dtype=np.float64)
    pos = sig[np.isfinite(sig) & (sig > 0)]
    log = bool(pos.size and pos.max() > 10 * pos.min())
    lo = float(pos.min() if log else (sig.min() if sig.size else 0.0))
    hi = float(pos.max() if log else (sig.max() if sig.size else 1.0))
    return Scales(max(max((rep.summary.max_rank for rep in reports), default=1), 1), lo, hi, log)


def _annotate(ax: Any, grid: np.ndarray, cmap: Any, norm: Any, fmt: Callable[[float], str]) -> None:
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            v = grid[i, j]
            if np.isfinite(v):
                rgba = cmap(norm(v))
                light = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] > 0.55
                ax.text(j, i, fmt(v), ha="center", va="center", fontsize=7, color="black" if light else "white")


def _heatmap(report: RankReport, scales: Scales, mpl: Any) -> Figure | None:
    """Two panels stacked (energy rank, σ₁); module types down, layers across (deep models stay wide)."""
    matplotlib, MplFigure = mpl
    LogNorm, Normalize = _mpl("colors", "LogNorm", "Normalize")

    g = _grid(report)
    if g is None:
        return None
    xlabels, xname = short_labels(g.layers)
    nt, nl = len(g.types), len(g.layers)
    cell_w = 0.42 if nl <= 24 else max(0.12, 11.0 / nl)
    width = min(13.0, max(6.4, 2.6 + cell_w * nl))
    panel_h = 0.55 + 0.32 * min(nt, 24)
    fig = MplFigure(figsize=(width, 2 * panel_h + 0.9), layout="constrained")
    axes = fig.subplots(2, 1)
    cell_in = (width - 2.6) / nl
    s1_norm = (LogNorm(vmin=scales.sigma_lo, vmax=scales.sigma_hi) if scales.sigma_log
               else Normalize(vmin=scales.sigma_lo, vmax=scales.sigma_hi))
    panels = (
        (axes[0], g.energy_rank, Normalize(vmin=0, vmax=scales.max_rank), "viridis",
         f"energy rank at τ = {report.energy:g}", lambda v: f"{int(v)}", cell_in >= 0.2),
        (axes[1], g.sigma1, s1_norm, "magma", r"$\sigma_1 = \Vert\Delta W\Vert_2$", lambda v: f"{v:.2g}", cell_in >= 0.4),
    )
    for ax, grid, norm, cmap_name, title, fmt, annotate in panels:
        cmap = matplotlib.colormaps[cmap_name].with_extremes(bad="#eeeeee")
        im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        step = max(1, nl // 48)
        ax.set_xticks(range(0, nl, step), xlabels[::step], fontsize=7, rotation=0 if max(map(len, xlabels)) <= 3 else 60)
        ax.set_yticks(range(nt), g.types, fontsize=8)
        ax.set_xlabel(xname or "layer", fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.95, pad=0.01)
        if annotate and nl * nt <= 1500:
            _annotate(ax, grid, cmap, norm, fmt)
    fig.suptitle("module types × layers (max over the modules in a cell; grey: not adapted)", fontsize=10)
    return Figure("heatmap", "energy rank and σ₁ by layer × module type", _png(fig))


def _label_axes(ax_sv: Any, ax_cum: Any) -> None:
    (MaxNLocator,) = _mpl("ticker", "MaxNLocator")

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


def _type_figure(report: RankReport, mtype: str, mpl: Any) -> Figure:
    matplotlib, MplFigure = mpl
    (ScalarMappable,) = _mpl("cm", "ScalarMappable")
    (Normalize,) = _mpl("colors", "Normalize")

    tau = report.energy
    res = [r for r in report.modules if module_type(r.name) == mtype]
    res.sort(key=lambda r: natural_key(module_layer(r.name)))
    drawn = [r for r in res if r.singular_values is not None and len(r.singular_values) and r.singular_values[0] > 0]
    ranks = sorted({r.module.rank for r in res})
    k_type = max((r.energy_rank for r in drawn if r.energy_rank is not None), default=None)
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
        k = r.energy_rank or 1
        ax_sv.plot([k], [shown[k - 1]], "o", color=color, ms=4, mec="black", mew=0.5)
        e = (sv / sv[0]) ** 2  # relative: σ² of huge float64 weights would overflow
        cum = np.cumsum(e) / e.sum()
        ax_cum.plot(np.concatenate([[0], x]), np.concatenate([[0.0], cum]), "-", color=color, lw=1.1, alpha=0.85)
    if k_type is not None:
        for ax in (ax_sv, ax_cum):
            ax.axvline(k_type, color="crimson", ls="--", lw=1.2, label=f"recommended rank {k_type}")
    ax_cum.axhline(tau, color="black", ls=":", lw=1.2, label=f"τ = {tau:g}")
    uni = report.summary.uniform_rank
    if k_type is not None and uni != k_type:
        ax_cum.axvline(uni, color="grey", ls="-.", lw=1.0, label=f"uniform rank {uni}")
    _label_axes(ax_sv, ax_cum)
    if len(drawn) > 1:
        cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax_cum, shrink=0.9)
        labels, _ = short_labels([module_layer(r.name) for r in res])
        ticks = sorted(set(np.linspace(0, len(res) - 1, min(len(res), 6)).round().astype(int)))
        cb.set_ticks(ticks, labels=[labels[t] for t in ticks])
        cb.set_label("layer", fontsize=8)
    skipped = len(res) - len(drawn)
    fig.suptitle(
        f"{mtype}: {plural(len(res), 'module')}, r = {', '.join(map(str, ranks))}, rank@{tau:g} ≤ {k_type if k_type is not None else '-'}"
        + (f"  ({skipped} zero or non-finite, not drawn)" if skipped else ""),
        fontsize=10,
    )
    return Figure(mtype, f"{mtype} spectra", _png(fig))


def render_figures(reports: list[RankReport]) -> list[AdapterFigures]:
    """The heatmap (on scales shared by all ``reports``) and one figure per module type, per adapter."""
    mpl = require_matplotlib()
    scales = shared_scales(reports)
    out = []
    for rep in reports:
        types = natural_sorted({module_type(r.name) for r in rep.modules})
        out.append(AdapterFigures(_heatmap(rep, scales, mpl), {t: _type_figure(rep, t, mpl) for t in types}))
    return out
