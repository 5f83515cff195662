"""Self-contained HTML reports (one file, figures embedded, opens from disk, no JavaScript).

* :mod:`vitdecomp.report.html`: the document model (:class:`Report`, :class:`Section`,
  :class:`Table`, :class:`Figure`, :class:`Grid`), rendered from the Jinja2 templates in
  ``report/templates/`` (Jinja2 imported on the first render), :func:`check_html` and
  :func:`format_value`.
* :mod:`vitdecomp.report.figures`: image grids (PIL) and charts and heat maps drawn with
  matplotlib (Agg, imported inside the functions), returned as SVG text; imported on first use
  of ``report.figures`` or one of its functions.

One convention for numbers in every report, table and figure (:data:`NUMBER_CONVENTION`):
shares and accuracies are fractions in [0, 1], never percent; tables show 3 decimals and
scientific notation below 0.001 (``5.0e-07``); every heat map has a colour bar with units, signed
maps a diverging colour map centred at 0.

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

from .html import NUMBER_CONVENTION, Figure, Grid, Report, Section, Table, check_html, format_value

_FIGURE_EXPORTS = ("image_grid", "label_height", "bar_chart", "line_chart", "png_bytes", "ablation_curves",
                   "debias_chart", "accuracy_bars", "heatmap", "score_heatmap", "overlay_grid", "OverlayColumn")

__all__ = [
    "Report",
    "Section",
    "Table",
    "Figure",
    "Grid",
    "check_html",
    "format_value",
    "NUMBER_CONVENTION",
    "figures",
    *_FIGURE_EXPORTS,
]

if TYPE_CHECKING:
    from . import figures
    from .figures import (
        OverlayColumn,
        ablation_curves,
        accuracy_bars,
        bar_chart,
        debias_chart,
        heatmap,
        image_grid,
        label_height,
        line_chart,
        overlay_grid,
        png_bytes,
        score_heatmap,
    )


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
