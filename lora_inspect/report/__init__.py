"""Pages for ``report``: a self-contained HTML file, or Markdown with PNGs beside it. Building only:
no files are read or written here; the command writes.

The content is built once, as a list of sections (:mod:`.sections`), from the typed results of
:mod:`lora_inspect.analysis`; :mod:`.html` and :mod:`.markdown` render the same list. Figures come
from :mod:`.figures` (matplotlib, the optional ``plot`` extra).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..analysis import RankReport
from ..errors import InspectError
from .figures import PLOT_HINT, AdapterFigures, Figure, render_figures, require_matplotlib
from .html import write_html
from .markdown import write_markdown
from .sections import SECTIONS, build_sections, labels_for, truncate_commands

__all__ = ["PLOT_HINT", "require_matplotlib", "Figure", "AdapterFigures", "render_figures", "ReportOutput",
           "build_report", "page_html", "page_markdown", "truncate_commands", "SECTIONS", "REPORT_FORMATS"]

REPORT_FORMATS = {".html": "html", ".htm": "html", ".md": "md", ".markdown": "md"}  # output suffix → format


def _tau(reports: list[RankReport]) -> str:
    return ", ".join(sorted({f"{r.energy:g}" for r in reports}))


def page_html(reports: list[RankReport], figs: list[AdapterFigures], *, command: str | None = None) -> str:
    """One self-contained HTML page (inline CSS, PNGs as data: URIs, no script)."""
    return write_html(build_sections(reports, figs), labels_for(reports), _tau(reports), command)


def page_markdown(reports: list[RankReport], figs: list[AdapterFigures], names: dict[tuple[int, str], str],
                  *, command: str | None = None) -> str:
    """The same page as Markdown for a pull-request comment; images by file name (beside the .md)."""
    return write_markdown(build_sections(reports, figs), labels_for(reports), _tau(reports), names, command)


@dataclass
class ReportOutput:
    text: str  # the HTML page or the Markdown document
    images: dict[str, bytes] = field(default_factory=dict)  # Markdown only: file name → PNG


def build_report(reports: list[RankReport], fmt: str = "html", *, image_prefix: str = "report",
                 command: str | None = None) -> ReportOutput:
    """Render figures and lay out the page; ``fmt`` is "html" (images inline) or "md" (images returned)."""
    if fmt not in ("html", "md"):
        raise InspectError(f"unknown report format {fmt!r} (html or md)")
    figs = render_figures(reports)
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
