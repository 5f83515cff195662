"""Self-contained HTML reports (one file, figures embedded, opens from disk, no JavaScript).

* :mod:`vitdecomp.report.html`: the document model (:class:`Report`, :class:`Section`,
  :class:`Table`, :class:`Figure`, :class:`Grid`), its renderer and :func:`check_html`;
  standard library only.
* :mod:`vitdecomp.report.figures`: image grids (PIL) and bar/line charts (SVG text), numpy
  and PIL only; imported on first use of ``report.figures`` or one of its functions.

Example::

    from vitdecomp import report

    grid = report.image_grid(crops, columns=4, labels=names)
    doc = report.Report("Retrieval", sections=[
        report.Section("top", "Top images", items=[report.Figure.from_pil(grid, caption="head L11.H03")]),
    ])
    assert report.check_html(doc.render()) == []
    doc.write("runs/demo/report.html")
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .html import Figure, Grid, Report, Section, Table, check_html, format_value

_FIGURE_EXPORTS = ("image_grid", "label_height", "bar_chart", "line_chart", "png_bytes")

__all__ = [
    "Report",
    "Section",
    "Table",
    "Figure",
    "Grid",
    "check_html",
    "format_value",
    "figures",
    *_FIGURE_EXPORTS,
]

if TYPE_CHECKING:
    from . import figures
    from .figures import bar_chart, image_grid, label_height, line_chart, png_bytes


def __getattr__(name: str) -> Any:
    if name == "figures":
        return import_module("vitdecomp.report.figures")
    if name in _FIGURE_EXPORTS:
        value = getattr(import_module("vitdecomp.report.figures"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vitdecomp.report' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
