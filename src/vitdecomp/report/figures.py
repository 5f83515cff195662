"""Figures for reports: image grids (PIL) and charts and heat maps drawn with matplotlib.

Every chart function (:func:`bar_chart`, :func:`line_chart`, :func:`ablation_curves`,
:func:`debias_chart`, :func:`heatmap`, :func:`score_heatmap`, :func:`overlay_grid`) returns
**SVG text** made by matplotlib's SVG backend (text drawn as paths, so it looks the same in
every browser; no fonts or files are referenced, images are embedded), starting with ``<svg``: write it to a
``.svg`` file or embed it with :meth:`vitdecomp.report.Figure.from_svg`. Each has a
``*_figure`` twin that returns the :class:`matplotlib.figure.Figure` before saving, for tests
and for callers who want another format (``fig.savefig("x.png")``).

Conventions, the same in every figure and table of every report:

* shares, accuracies and other proportions are **fractions in [0, 1]**, never percent
  (axis labels say "(fraction)");
* signed maps use a diverging colour map centred at 0 with symmetric limits ``[-m, m]``
  (``RdBu_r`` for charts, blue–white–red for overlays on images, red = positive); unsigned
  maps a sequential one from 0; every heat map has a colour bar whose label states the units;
* layout is ``constrained`` and saving uses ``bbox_inches="tight"``: titles, tick labels and
  legends are never clipped (long titles are wrapped).

matplotlib is imported inside the functions (Agg measures the text for the layout) and never
through ``pyplot``, so importing this module stays cheap and no global figure state is touched.
Series colours are the Okabe–Ito palette (distinguishable with colour-vision deficiencies).

Example::

    from vitdecomp.report import Figure, figures

    grid = figures.image_grid(crops, columns=4, scale=3, labels=["dog", "cat", ...])
    Figure.from_pil(grid, caption="top images")
    Figure.from_svg(figures.bar_chart({"L10": 0.21, "L11": 0.64}, title="share per layer",
                                      ylabel="share of |z|² (fraction)"))
"""
from __future__ import annotations

import contextlib
import io
import math
import numbers
import re
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .html import png_from_pil

if TYPE_CHECKING:
    from matplotlib.figure import Figure as MplFigure

__all__ = [
    "image_grid",
    "label_height",
    "png_bytes",
    "bar_chart",
    "bar_chart_figure",
    "line_chart",
    "line_chart_figure",
    "ablation_curves",
    "ablation_curves_figure",
    "debias_chart",
    "debias_chart_figure",
    "accuracy_bars",
    "accuracy_bars_figure",
    "heatmap",
    "heatmap_figure",
    "score_heatmap",
    "score_heatmap_figure",
    "score_units",
    "OverlayColumn",
    "overlay_grid",
    "overlay_grid_figure",
    "svg_text",
    "PALETTE",
    "SIGNED_CMAP",
    "UNSIGNED_CMAP",
    "FRACTION",
]

#: Okabe–Ito colours, in the order series get them (then repeated).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#7F7F7F")
#: Colour map of signed chart heat maps (centred at 0, symmetric limits).
SIGNED_CMAP = "RdBu_r"
#: Colour map of non-negative chart heat maps (from 0).
UNSIGNED_CMAP = "Reds"
#: Suffix of every axis or colour-bar label whose values are shares or accuracies.
FRACTION = "(fraction)"
#: Chart font size in points; 100 dpi, so sizes in pixels are ``inches * 100``.
_FONT_PT = 9.0
_DPI = 100
_AVG_CHAR_PX = 6.2  # mean glyph width at _FONT_PT (DejaVu Sans), for wrapping titles before drawing
_NAN_COLOUR = "#BDBDBD"


# --------------------------------------------------------------------------- raster


def png_bytes(image: Image.Image) -> bytes:
    """Encode a PIL image as PNG (lossless); modes PNG cannot store are converted to RGB(A)."""
    return png_from_pil(image)


def _to_rgb(image: np.ndarray | Image.Image, index: int) -> Image.Image:
    """One grid input as an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image {index}: expected a uint8 array (0..255), got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return Image.fromarray(array, mode="L").convert("RGB")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
    raise ValueError(f"image {index}: expected HxW, HxWx3 or HxWx4, got shape {tuple(array.shape)}")


def _default_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def label_height() -> int:
    """Height in pixels of the label band :func:`image_grid` adds under each tile."""
    font = _default_font()
    bbox = font.getbbox("Agjy|")
    return int(math.ceil(bbox[3])) + 2


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: Any, max_width: int) -> str:
    """``text``, shortened with ".." until it fits ``max_width`` pixels."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "..", font=font) > max_width:
        text = text[:-1]
    return text + ".." if text else ""


def image_grid(
    images: Sequence[np.ndarray | Image.Image],
    columns: int,
    scale: int = 2,
    labels: Sequence[str] | None = None,
    pad: int = 2,
) -> Image.Image:
    """Tile images into one RGB image, upscaled with nearest-neighbour (pixels stay crisp).

    Layout: every tile is ``tile_w × tile_h`` = (largest image width × ``scale``) ×
    (largest image height × ``scale``); smaller images are centred in their tile on white.
    With ``cols = min(columns, len(images))`` and ``rows = ceil(len(images) / cols)``::

        width  = cols * tile_w + (cols + 1) * pad
        height = rows * (tile_h + band) + (rows + 1) * pad

    where ``band`` is 0 without labels and :func:`label_height` with them (each label is
    drawn centred under its tile, shortened with ".." if too wide).

    Args:
        images: uint8 arrays HxW, HxWx3 or HxWx4 (alpha dropped), or PIL images.
        columns: Tiles per row (at most; fewer if there are fewer images).
        scale: Integer upscaling factor (>= 1).
        labels: Optional short text per image.
        pad: Gap in pixels around and between tiles (>= 0).

    Returns:
        The grid as an RGB PIL image.
    """
    if len(images) == 0:
        raise ValueError("image_grid needs at least one image")
    if columns < 1 or scale < 1 or pad < 0:
        raise ValueError(f"image_grid needs columns >= 1, scale >= 1, pad >= 0; got {columns}, {scale}, {pad}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    tiles = [_to_rgb(image, i) for i, image in enumerate(images)]
    tile_w = max(t.width for t in tiles) * scale
    tile_h = max(t.height for t in tiles) * scale
    band = label_height() if labels is not None else 0
    cols = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    canvas = Image.new(
        "RGB", (cols * tile_w + (cols + 1) * pad, rows * (tile_h + band) + (rows + 1) * pad), (255, 255, 255)
    )
    draw = ImageDraw.Draw(canvas)
    font = _default_font()
    for i, tile in enumerate(tiles):
        row, col = divmod(i, cols)
        x = pad + col * (tile_w + pad)
        y = pad + row * (tile_h + band + pad)
        big = tile.resize((tile.width * scale, tile.height * scale), Image.Resampling.NEAREST)
        canvas.paste(big, (x + (tile_w - big.width) // 2, y + (tile_h - big.height) // 2))
        if labels is not None and labels[i]:
            text = _fit_text(draw, str(labels[i]), font, tile_w)
            text_w = draw.textlength(text, font=font)
            draw.text((x + (tile_w - text_w) / 2, y + tile_h + 1), text, fill=(31, 35, 40), font=font)
    return canvas


# --------------------------------------------------------------------------- matplotlib plumbing


@contextlib.contextmanager
def _style() -> Iterator[None]:
    """The charts' matplotlib settings, for the duration of one figure (global rcParams untouched)."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # no-op once a backend is chosen; figures never go through pyplot
    from cycler import cycler

    rc = {
        "font.size": _FONT_PT,
        "axes.titlesize": _FONT_PT + 1,
        "axes.labelsize": _FONT_PT,
        "figure.titlesize": _FONT_PT + 2,
        "figure.titleweight": "bold",
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.edgecolor": "#59636E",
        "axes.prop_cycle": cycler(color=list(PALETTE)),
        "grid.color": "#D1D9E0",
        "grid.linewidth": 0.6,
        "axes.axisbelow": True,
        "legend.frameon": False,
        "svg.fonttype": "path",
        "svg.hashsalt": "vitdecomp",  # reproducible element ids
        "figure.dpi": _DPI,
        "savefig.dpi": _DPI,
    }
    with matplotlib.rc_context(rc):
        yield


def _new_figure(width: float, height: float) -> MplFigure:
    """An empty constrained-layout figure of ``width × height`` pixels (at 100 dpi)."""
    from matplotlib.figure import Figure as MplFigureClass

    if width < 80 or height < 60:
        raise ValueError(f"a chart of {width:.0f}x{height:.0f} px leaves no room to plot")
    return MplFigureClass(figsize=(width / _DPI, height / _DPI), dpi=_DPI, layout="constrained")


def _renderer(fig: MplFigure) -> Any:
    """An Agg renderer of the figure, to measure text before saving."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    return canvas.get_renderer()


def _fit(artist: Any, text: str, limit_px: float, along: str = "width") -> None:
    """Set ``text`` on a text artist, wrapped at word boundaries until it is at most ``limit_px`` long
    (``along="height"`` for text rotated by 90 degrees, such as a vertical colour bar's label)."""
    renderer = _renderer(artist.figure)
    chars = len(text)
    artist.set_text(text)

    def length() -> float:
        extent = artist.get_window_extent(renderer)
        return extent.height if along == "height" else extent.width

    # spaces inside $...$ (mathtext) must not become line breaks
    guarded = re.sub(r"\$[^$]*\$", lambda m: m.group(0).replace(" ", "\0"), text)
    while length() > limit_px and chars > 8:
        chars = max(8, int(chars * 0.85))
        lines = textwrap.wrap(guarded, chars, break_long_words=False)
        artist.set_text("\n".join(lines).replace("\0", " "))


def _title(fig: MplFigure, title: str) -> None:
    """The figure's title, wrapped to 96 % of the figure's width (never clipped); the figure grows by
    the height of every line after the first, so a long title does not squeeze the plot."""
    if title:
        artist = fig.suptitle(" ")
        _fit(artist, str(title), fig.bbox.width * 0.96)
        extra = artist.get_text().count("\n")
        if extra:
            width, height = fig.get_size_inches()
            fig.set_size_inches(width, height + extra * 1.25 * artist.get_fontsize() / 72.0)


def _legend(ax: Any, n: int) -> None:
    """The legend in a row just above the plot, below the title (the layout makes room for it)."""
    if n:
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=min(n, 4), borderaxespad=0.4,
                  handlelength=1.4, columnspacing=1.2)


def svg_text(fig: MplFigure) -> str:
    """The figure as SVG text (``bbox_inches="tight"``), starting at ``<svg`` (no XML prolog).

    Text is drawn as paths (no font needed to view it, identical everywhere), so the words are
    also written where a reader or a search can find them: the figure's title as the SVG's
    ``<title>``, and every line series as ``<g class="series">`` with its name as ``<title>``.
    No date is written: the same figure gives the same bytes.
    """
    from html import escape

    buffer = io.BytesIO()
    with _style():
        fig.savefig(buffer, format="svg", bbox_inches="tight", pad_inches=0.06,
                    metadata={"Date": None, "Creator": None}, facecolor="white")
    text = buffer.getvalue().decode("utf-8")
    text = text[text.index("<svg"):]
    names = {a.get_gid(): a.get_label() for a in fig.findobj(lambda a: str(a.get_gid() or "").startswith("series-"))}
    for gid, name in names.items():
        text = text.replace(f'<g id="{gid}">', f'<g id="{gid}" class="series"><title>{escape(str(name))}</title>', 1)
    title = fig.get_suptitle()
    if title:
        head = text.index(">") + 1
        text = f"{text[:head]}\n <title>{escape(' '.join(title.split()))}</title>{text[head:]}"
    return text


def _fmt(value: float) -> str:
    """A value printed on a chart: as :func:`vitdecomp.report.format_value` (3 decimals, or 2 significant
    digits in scientific notation below 0.001)."""
    from .html import format_value

    return format_value(float(value))


def _categories_axis(ax: Any, categories: Sequence[str], width_px: float) -> None:
    """Category tick labels under bars: horizontal when they fit their group (measured with the
    renderer), else rotated; only every n-th when groups are narrower than a line of text."""
    n = len(categories)
    group_px = width_px * 0.82 / max(n, 1)  # the plot takes ~82 % of the figure's width
    every = max(1, math.ceil(14.0 / group_px))
    shown = [c if len(c) <= 40 else c[:39] + "\u2026" for c in categories]
    ax.set_xticks(np.arange(n), shown)
    ax.set_xlim(-0.6, n - 0.4)
    renderer = _renderer(ax.figure)
    widest = max(label.get_window_extent(renderer).width for label in ax.get_xticklabels())
    if widest <= group_px * 0.95:
        return
    if every > 1:
        ax.set_xticks(np.arange(n), [c if i % every == 0 else "" for i, c in enumerate(shown)])
    steep = n > 30
    for label in ax.get_xticklabels():
        label.set_rotation(90 if steep else 35)
        label.set_horizontalalignment("right")
        label.set_verticalalignment("center" if steep else "top")
        label.set_rotation_mode("anchor")


# --------------------------------------------------------------------------- charts


def _bar_groups(values: Mapping[str, Sequence[float]] | Mapping[str, float]) -> tuple[list[str], np.ndarray]:
    """Categories and a ``[category, series]`` float array from the two accepted forms of ``values``."""
    if not values:
        raise ValueError("bar_chart needs at least one category")
    categories = [str(key) for key in values]
    scalar = all(isinstance(v, numbers.Real) for v in values.values())
    groups: list[list[float]] = []
    for key, value in values.items():
        if scalar:
            groups.append([float(value)])  # type: ignore[arg-type]
        elif isinstance(value, numbers.Real):
            raise ValueError(f"bar_chart: category {key!r} has one number but others have sequences")
        else:
            groups.append([float(v) for v in value])  # type: ignore[union-attr]
    k = len(groups[0])
    if k == 0 or any(len(g) != k for g in groups):
        raise ValueError(f"bar_chart: every category needs the same number (>= 1) of values, "
                         f"got {[len(g) for g in groups]}")
    return categories, np.asarray(groups, dtype=np.float64)


def bar_chart_figure(
    values: Mapping[str, Sequence[float]] | Mapping[str, float],
    *,
    title: str = "",
    ylabel: str = "",
    xlabel: str = "",
    series: Sequence[str] | None = None,
    errors: Mapping[str, Sequence[float]] | Mapping[str, float] | None = None,
    ylim: tuple[float, float] | None = None,
    annotate: bool | None = None,
    width: int = 640,
    height: int = 320,
) -> MplFigure:
    """The matplotlib figure of :func:`bar_chart` (same arguments)."""
    categories, data = _bar_groups(values)
    n, k = data.shape
    if series is not None and len(series) != k:
        raise ValueError(f"bar_chart: {len(series)} series names for {k} values per category")
    if series is not None:
        names = [str(s) for s in series]
    else:
        names = [] if k == 1 else [f"series {j + 1}" for j in range(k)]
    err = None
    if errors is not None:
        unknown = [c for c in errors if str(c) not in categories]
        if unknown:
            raise ValueError(f"bar_chart: errors for unknown categories {unknown}")
        err = np.full((n, k), np.nan)
        for c, e in errors.items():
            row = np.atleast_1d(np.asarray(e, dtype=np.float64))
            if row.shape != (k,):
                raise ValueError(f"bar_chart: errors of {c!r} need {k} values")
            err[categories.index(str(c))] = row
    show_values = annotate if annotate is not None else n * k <= 24
    with _style():
        fig = _new_figure(width, height)
        ax = fig.add_subplot()
        ax.grid(axis="y")
        x = np.arange(n)
        bar_w = 0.8 / k
        for j in range(k):
            offsets = x - 0.4 + bar_w * (j + 0.5)
            finite = np.isfinite(data[:, j])
            ax.bar(offsets[finite], data[finite, j], width=bar_w * 0.92, color=PALETTE[j % len(PALETTE)],
                   label=names[j] if names else None)
            spread = np.zeros(n) if err is None else np.where(np.isfinite(err[:, j]), err[:, j], 0.0)
            if err is not None:
                has = finite & np.isfinite(err[:, j])
                ax.errorbar(offsets[has], data[has, j], yerr=err[has, j], fmt="none", ecolor="#1F2328",
                            elinewidth=1, capsize=3)
            if show_values:
                for xi, v, e in zip(offsets[finite], data[finite, j], spread[finite]):
                    top = v + e if v >= 0 else v - e
                    ax.annotate(_fmt(v), (xi, top), xytext=(0, 2 if v >= 0 else -2), textcoords="offset points",
                                ha="center", va="bottom" if v >= 0 else "top", fontsize=_FONT_PT - 1)
        ax.axhline(0.0, color="#59636E", linewidth=0.8)
        _categories_axis(ax, categories, width)
        if ylim is not None:
            ax.set_ylim(*ylim)
        if show_values:
            ax.margins(y=0.12)
        if ylabel:
            ax.set_ylabel(ylabel)
        if xlabel:
            ax.set_xlabel(xlabel)
        _legend(ax, len(names))
        _title(fig, title)
    return fig


def bar_chart(
    values: Mapping[str, Sequence[float]] | Mapping[str, float],
    *,
    title: str = "",
    ylabel: str = "",
    xlabel: str = "",
    series: Sequence[str] | None = None,
    errors: Mapping[str, Sequence[float]] | Mapping[str, float] | None = None,
    ylim: tuple[float, float] | None = None,
    annotate: bool | None = None,
    width: int = 640,
    height: int = 320,
) -> str:
    """A (grouped) bar chart, as SVG text.

    Bar ``(i, j)`` rises from (or hangs below) 0 to ``values[category_i][j]``; non-finite
    values are left out. Categories keep mapping order; their names are rotated when too wide
    for their group (and only every n-th is shown when groups are very narrow).

    Args:
        values: Category → value (one series), or category → one value per series
            (grouped bars, all sequences the same length).
        title: Title on top (wrapped to the width).
        ylabel: Label of the value axis, with its units (shares and accuracies: "(fraction)").
        xlabel: Label of the category axis.
        series: Series names for the legend (one per value in each group). Without it,
            grouped values are named "series 1", "series 2", ... and a single series gets
            no legend.
        errors: Optional category → half-length of an error bar per series (e.g. one sd).
        ylim: Value-axis limits (e.g. ``(0, 1)`` for accuracies); default from the data.
        annotate: Print each value above its bar (default: when there are at most 24 bars).
        width: Width in pixels (at 100 dpi).
        height: Height in pixels.

    Returns:
        An SVG document (text starting with ``<svg``).
    """
    return svg_text(bar_chart_figure(values, title=title, ylabel=ylabel, xlabel=xlabel, series=series,
                                      errors=errors, ylim=ylim, annotate=annotate, width=width, height=height))


def line_chart_figure(
    x: Sequence[float],
    ys: Mapping[str, Sequence[float]],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    ylim: tuple[float, float] | None = None,
    integer_x: bool = False,
    width: int = 640,
    height: int = 320,
) -> MplFigure:
    """The matplotlib figure of :func:`line_chart` (same arguments)."""
    xs = np.asarray([float(v) for v in x], dtype=np.float64)
    if xs.size == 0 or not np.all(np.isfinite(xs)):
        raise ValueError("line_chart needs at least one x value, all finite")
    if not ys:
        raise ValueError("line_chart needs at least one series")
    series = {str(name): np.asarray([float(v) for v in values], dtype=np.float64) for name, values in ys.items()}
    for name, values in series.items():
        if len(values) != len(xs):
            raise ValueError(f"line_chart: series {name!r} has {len(values)} values for {len(xs)} x values")
    from matplotlib.ticker import MaxNLocator

    with _style():
        fig = _new_figure(width, height)
        ax = fig.add_subplot()
        ax.grid(True)
        markers = "o" if len(xs) <= 40 else None
        for j, (name, values) in enumerate(series.items()):
            ax.plot(xs, values, marker=markers, markersize=3.5, linewidth=1.8, color=PALETTE[j % len(PALETTE)],
                    label=name, gid=f"series-{j}")  # NaN values break the line
        if integer_x:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ylim is not None:
            ax.set_ylim(*ylim)
        if xlabel:
            ax.set_xlabel(xlabel)
        if ylabel:
            ax.set_ylabel(ylabel)
        _legend(ax, len(series))
        _title(fig, title)
    return fig


def line_chart(
    x: Sequence[float],
    ys: Mapping[str, Sequence[float]],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    ylim: tuple[float, float] | None = None,
    integer_x: bool = False,
    width: int = 640,
    height: int = 320,
) -> str:
    """A line chart of one or more series over shared x values, as SVG text.

    Args:
        x: The x values (finite), shared by every series.
        ys: Series name → y values, each as long as ``x``. Non-finite y values break the line.
        title: Title on top (wrapped to the width).
        xlabel: Label of the x axis.
        ylabel: Label of the y axis, with its units (shares and accuracies: "(fraction)").
        ylim: y limits; default from the data.
        integer_x: Only whole-number ticks on the x axis (counts).
        width: Width in pixels (at 100 dpi).
        height: Height in pixels.

    Returns:
        An SVG document: one line per series (with a marker per point when there are at most
        40 points) and a legend above the plot.
    """
    return svg_text(line_chart_figure(x, ys, title=title, xlabel=xlabel, ylabel=ylabel, ylim=ylim,
                                        integer_x=integer_x, width=width, height=height))


def ablation_curves_figure(
    curves: Mapping[str, Sequence[tuple[float, float | None]]],
    *,
    title: str = "cumulative block ablation",
    xlabel: str = "blocks ablated",
    ylabel: str = f"accuracy {FRACTION}",
    width: int = 640,
    height: int = 320,
) -> MplFigure:
    """The matplotlib figure of :func:`ablation_curves` (same arguments)."""
    if not curves:
        raise ValueError("ablation_curves needs at least one curve")
    xs = sorted({float(n) for points in curves.values() for n, _ in points})
    ys = {}
    for name, points in curves.items():
        lookup = {float(n): (math.nan if v is None else float(v)) for n, v in points}
        ys[str(name)] = [lookup.get(x, math.nan) for x in xs]
    finite = [v for vs in ys.values() for v in vs if math.isfinite(v)]
    in_unit = bool(finite) and min(finite) >= 0.0 and max(finite) <= 1.0
    return line_chart_figure(xs, ys, title=title, xlabel=xlabel, ylabel=ylabel, width=width, height=height,
                             ylim=(0.0, 1.02) if in_unit else None, integer_x=True)


def ablation_curves(
    curves: Mapping[str, Sequence[tuple[float, float | None]]],
    *,
    title: str = "cumulative block ablation",
    xlabel: str = "blocks ablated",
    ylabel: str = f"accuracy {FRACTION}",
    width: int = 640,
    height: int = 320,
) -> str:
    """Cumulative ablation curves (:func:`line_chart`), as SVG text.

    Accuracy after ablating the first ``n`` blocks, one line per direction; the y axis spans
    ``[0, 1]`` when every score is a fraction, and x ticks are whole numbers.

    Args:
        curves: series name -> ``[(n, score), ...]``; x values may differ between series (the
            chart uses their union; a series is broken where it has no point or a None score).

    Returns:
        The SVG document as text.
    """
    return svg_text(ablation_curves_figure(curves, title=title, xlabel=xlabel, ylabel=ylabel, width=width,
                                           height=height))


def debias_chart_figure(result: Any, title: str = "") -> MplFigure:
    """The matplotlib figure of :func:`debias_chart`."""
    s = result.random_summary()
    k = result.k
    values = {
        "baseline": [result.baseline["worst_group"], result.baseline["average_group"]],
        f"top-{k}\ncontrastive\nablated": [result.ablated["worst_group"], result.ablated["average_group"]],
        f"top-{k}\nvariance\nablated": [result.variance_control["worst_group"],
                                        result.variance_control["average_group"]],
        f"random {k}\n(mean ± sd)": [s["worst_group_mean"], s["average_group_mean"]],
        f"random {k}\n(max)": [s["worst_group_max"], s["average_group_max"]],
    }
    errors = {f"random {k}\n(mean ± sd)": [s["worst_group_sd"], s["average_group_sd"]]}
    return accuracy_bars_figure(values, errors=errors, title=title or "Waterbirds test accuracy")


def accuracy_bars_figure(values: Mapping[str, Sequence[float]], *,
                         errors: Mapping[str, Sequence[float]] | None = None, title: str = "") -> MplFigure:
    """The matplotlib figure of :func:`accuracy_bars` (same arguments)."""
    return bar_chart_figure(values, title=title, ylabel=f"test accuracy {FRACTION}", errors=errors,
                            series=["worst-group", "average-group (unweighted)"], ylim=(0.0, 1.1), annotate=True,
                            width=720, height=340)


def accuracy_bars(values: Mapping[str, Sequence[float]], *, errors: Mapping[str, Sequence[float]] | None = None,
                  title: str = "") -> str:
    """Worst-group and unweighted average-group accuracy per intervention, as SVG text.

    Args:
        values: intervention -> ``[worst-group, average-group]`` accuracies (fractions).
        errors: intervention -> ``[sd, sd]`` drawn as error bars (e.g. over random draws).
        title: Title (wrapped).

    Returns:
        A grouped bar chart on a ``[0, 1]`` axis with every value printed above its bar.
    """
    return svg_text(accuracy_bars_figure(values, errors=errors, title=title))


def debias_chart(result: Any, title: str = "") -> str:
    """Worst-group and unweighted average-group test accuracy of a
    :class:`~vitdecomp.apps.debias.DebiasResult`, as SVG text: baseline, the top-k contrastive
    components ablated, the top-k variance control, random draws (mean with ± one sd error bars,
    and max). Accuracies are fractions on a ``[0, 1]`` axis, each printed above its bar."""
    return svg_text(debias_chart_figure(result, title=title))


# --------------------------------------------------------------------------- heat maps


def _limits(data: np.ndarray, signed: bool | None) -> tuple[bool, float]:
    """(signed, m): signed maps get ``[-m, m]``, ``m = max |x|``; unsigned ``[0, m]``, ``m = max x``."""
    finite = data[np.isfinite(data)]
    if signed is None:
        signed = bool(finite.size and finite.min() < 0)
    m = float(np.max(np.abs(finite))) if finite.size else 1.0
    return signed, (m if m > 0 else 1.0)


def heatmap_figure(
    values: Any,
    rows: Sequence[str],
    columns: Sequence[str],
    *,
    cbar_label: str,
    title: str = "",
    signed: bool | None = None,
    annotate: bool | None = None,
    nan_label: str = "undefined",
    cell: float = 18.0,
    marks: Any = None,
    mark_label: str = "marked",
) -> MplFigure:
    """The matplotlib figure of :func:`heatmap` (same arguments; ``marks``: bool ``[rows, columns]``
    cells framed in black and named ``mark_label`` in the legend, e.g. significant scores)."""
    from matplotlib.colors import Normalize, TwoSlopeNorm
    from matplotlib.patches import Patch, Rectangle

    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 2 or data.shape != (len(rows), len(columns)):
        raise ValueError(f"heatmap: values of shape {data.shape} for {len(rows)} rows x {len(columns)} columns")
    if data.size == 0:
        raise ValueError("heatmap needs at least one cell")
    if not cbar_label:
        raise ValueError("heatmap needs cbar_label: what the colours mean, with units")
    signed, m = _limits(data, signed)
    n_rows, n_cols = data.shape
    show = annotate if annotate is not None else n_rows * n_cols <= 400
    col_w = max(52.0, min(110.0, 7.0 * max(len(c) for c in columns)))
    row_label_px = 7.0 * max(len(r) for r in rows)
    rotate = max(len(c) for c in columns) * _AVG_CHAR_PX > col_w - 4
    column_label_px = 0.6 * _AVG_CHAR_PX * max(len(c) for c in columns) if rotate else 0.0
    width = max(360.0, row_label_px + col_w * n_cols + 170)
    height = max(220.0, cell * n_rows + 100 + column_label_px)
    with _style():
        import matplotlib

        fig = _new_figure(width, height)
        ax = fig.add_subplot()
        cmap = matplotlib.colormaps[SIGNED_CMAP if signed else UNSIGNED_CMAP].with_extremes(bad=_NAN_COLOUR)
        norm = TwoSlopeNorm(vcenter=0.0, vmin=-m, vmax=m) if signed else Normalize(vmin=0.0, vmax=m)
        mesh = ax.pcolormesh(np.ma.masked_invalid(data), cmap=cmap, norm=norm, edgecolors="white", linewidth=0.5)
        ax.set_xlim(0, n_cols)
        ax.set_ylim(n_rows, 0)  # first row on top
        ax.set_xticks(np.arange(n_cols) + 0.5, [str(c) for c in columns])
        ax.set_yticks(np.arange(n_rows) + 0.5, [str(r) for r in rows])
        ax.tick_params(length=0)
        ax.xaxis.tick_top()
        ax.spines[:].set_visible(False)
        if rotate:
            for label in ax.get_xticklabels():
                label.set_rotation(35)
                label.set_horizontalalignment("left")
                label.set_rotation_mode("anchor")
        if show:
            for i in range(n_rows):
                for j in range(n_cols):
                    v = data[i, j]
                    if not math.isfinite(v):
                        continue
                    dark = abs(float(norm(v)) - (0.5 if signed else 0.0)) > (0.3 if signed else 0.6)
                    ax.text(j + 0.5, i + 0.5, f"{v:.2f}" if abs(v) >= 0.005 or v == 0 else f"{v:.0e}",
                            ha="center", va="center", fontsize=_FONT_PT - 1.5,
                            color="white" if dark else "#1F2328")
        bar = fig.colorbar(mesh, ax=ax, shrink=1.0 if n_rows <= 40 else 0.6, aspect=max(20, min(40, n_rows)),
                           pad=0.02)
        bar.set_label(" ")
        _fit(bar.ax.yaxis.label, cbar_label, max(100.0, cell * n_rows * (1.0 if n_rows <= 40 else 0.6)) * 0.95,
             along="height")
        bar.ax.set_gid("colorbar")
        handles = []
        if marks is not None:
            marked = np.asarray(marks, dtype=bool)
            if marked.shape != data.shape:
                raise ValueError(f"heatmap: marks of shape {marked.shape} for values of shape {data.shape}")
            for i, j in zip(*np.nonzero(marked)):
                ax.add_patch(Rectangle((j + 0.06, i + 0.06), 0.88, 0.88, fill=False, edgecolor="black", linewidth=1.2))
            handles.append(Patch(facecolor="white", edgecolor="black", linewidth=1.2, label=mark_label))
        if not np.all(np.isfinite(data)):
            handles.append(Patch(facecolor=_NAN_COLOUR, label=nan_label))
        if handles:
            fig.legend(handles=handles, loc="outside lower center", ncols=len(handles))
        _title(fig, title)
    return fig


def heatmap(
    values: Any,
    rows: Sequence[str],
    columns: Sequence[str],
    *,
    cbar_label: str,
    title: str = "",
    signed: bool | None = None,
    annotate: bool | None = None,
    nan_label: str = "undefined",
    cell: float = 18.0,
) -> str:
    """A labelled heat map of a ``[rows, columns]`` table with a colour bar, as SVG text.

    Colours: with ``m = max |x|`` over the finite cells, a signed map (``signed=True``, or by
    default when any value is negative) uses ``RdBu_r`` on ``[-m, m]`` centred at 0
    (``TwoSlopeNorm``), an unsigned one ``Reds`` on ``[0, m]``. Non-finite cells are grey and
    named ``nan_label`` in a legend. Every cell gets its value printed (2 decimals) when there
    are at most 400 cells.

    Args:
        values: ``[len(rows), len(columns)]`` numbers.
        rows: Row labels, top to bottom.
        columns: Column labels, left to right (on top).
        cbar_label: What the colours are, with units (required).
        title: Title (wrapped).
        signed: Force a diverging (True) or sequential (False) map.
        annotate: Print the values in the cells (default: at most 400 cells).
        nan_label: Legend text of grey cells.
        cell: Row height in pixels.

    Returns:
        The SVG document as text.
    """
    return svg_text(heatmap_figure(values, rows, columns, cbar_label=cbar_label, title=title, signed=signed,
                                   annotate=annotate, nan_label=nan_label, cell=cell))


def score_units(kind: str, share: bool = False) -> str:
    """The colour-bar label of a score table's kind (``"corr"``, ``"var_attributed"``, ...), with units."""
    base = kind.split("[", 1)[1].rstrip("]") if kind.startswith("selectivity[") else kind
    names = {
        "corr": "correlation score (Pearson r, -1 to 1)",
        "var_attributed": ("share of the feature's variance " + FRACTION) if share else
                          "variance attributed (squared representation units)",
        "var_explained": f"variance explained {FRACTION}",
    }
    text = names.get(base, base)
    return f"selectivity: {text} minus the mean over the other features" if kind.startswith("selectivity[") else text


def score_heatmap_figure(table: Any, *, components: Sequence[str] | None = None, title: str | None = None,
                         significant: Any = None, alpha: float = 0.05) -> MplFigure:
    """The matplotlib figure of :func:`score_heatmap` (same arguments)."""
    labels = [str(x) for x in table.labels]
    rows = list(range(len(labels))) if components is None else [labels.index(str(c)) for c in components]
    data = np.asarray(table.scores, dtype=np.float64)[rows]
    share = bool(getattr(table, "meta", {}).get("share", False))
    signed = True if str(table.kind).startswith(("corr", "selectivity")) else None
    return heatmap_figure(data, [labels[i] for i in rows], list(table.features),
                          cbar_label=score_units(str(table.kind), share), title=title or str(table.kind),
                          signed=signed, nan_label="undefined (constant component, e.g. a bias)",
                          marks=None if significant is None else np.asarray(significant, dtype=bool)[rows],
                          mark_label=f"significant against random text bases (BH q <= {alpha:g})")


def score_heatmap(table: Any, *, components: Sequence[str] | None = None, title: str | None = None,
                  significant: Any = None, alpha: float = 0.05) -> str:
    """A :class:`~vitdecomp.interpret.score.ScoreTable` as a heat map (components × features), as SVG text.

    Rows are components (``components`` picks and orders them; default all), columns features;
    correlation and selectivity scores use a diverging map centred at 0 with symmetric limits,
    the colour bar names the score and its units, and components whose score is undefined (a
    constant row such as a bias has no correlation) are grey. ``significant`` (bool
    ``[comp, feature]``, e.g. :attr:`ScoreNulls.significant <vitdecomp.interpret.score.ScoreNulls>`)
    frames the scores that beat their null, with a legend entry. See :func:`heatmap`.
    """
    return svg_text(score_heatmap_figure(table, components=components, title=title, significant=significant,
                                         alpha=alpha))


@dataclass(frozen=True)
class OverlayColumn:
    """One column of :func:`overlay_grid`: a map per image, drawn over the image.

    Attributes:
        title: Column heading (e.g. ``"decomposition (colour texts)"``).
        maps: One ``[h, w]`` map per image (any grid; resized to the image bilinearly).
        units: Colour-bar label: what the values are, with units.
        signed: Diverging blue–white–red on ``[-m, m]`` (True), or white–red on ``[0, m]``.
    """

    title: str
    maps: Sequence[Any]
    units: str
    signed: bool = True


def overlay_grid_figure(images: Sequence[Any], columns: Sequence[OverlayColumn], *, title: str = "",
                        alpha: float = 0.6, tile: float = 150.0, image_title: str = "image") -> MplFigure:
    """The matplotlib figure of :func:`overlay_grid` (same arguments)."""
    from matplotlib.colors import Normalize, TwoSlopeNorm

    from ..apps.heatmap import overlay_colormap, render_overlay

    if not images or not columns:
        raise ValueError("overlay_grid needs at least one image and one column")
    for col in columns:
        if len(col.maps) != len(images):
            raise ValueError(f"overlay_grid: column {col.title!r} has {len(col.maps)} maps for {len(images)} images")
    from matplotlib.cm import ScalarMappable
    from matplotlib.ticker import FuncFormatter

    n_rows, n_cols = len(images), len(columns) + 1
    first = np.asarray(images[0])
    aspect = first.shape[0] / max(1, first.shape[1])
    with _style():
        fig = _new_figure(tile * n_cols + 20, tile * aspect * n_rows + 125 + (30 if title else 0))
        axes = fig.subplots(n_rows, n_cols, squeeze=False)
        for i, image in enumerate(images):
            axes[i, 0].imshow(np.asarray(image), interpolation="none")  # embedded as is, drawn pixelated
        for j, col in enumerate(columns, start=1):
            maps = [_as_array(x) for x in col.maps]
            m = max(float(np.max(np.abs(x))) for x in maps) or 1.0
            for i, (image, h) in enumerate(zip(images, maps)):
                axes[i, j].imshow(np.asarray(render_overlay(image, h, alpha=alpha, vmax=m)), interpolation="none")
            norm = TwoSlopeNorm(vcenter=0.0, vmin=-m, vmax=m) if col.signed else Normalize(vmin=0.0, vmax=m)
            bar = fig.colorbar(ScalarMappable(norm=norm, cmap=overlay_colormap(col.signed)), ax=axes[:, j],
                               location="bottom", shrink=0.8, aspect=12, pad=0.03)
            bar.set_label(" ")
            _fit(bar.ax.xaxis.label, col.units, tile * 0.95)
            bar.ax.tick_params(labelsize=_FONT_PT - 1)
            bar.ax.set_gid("colorbar")
            bar.ax.xaxis.set_major_locator(_symmetric_locator(m, col.signed))
            bar.ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: "0" if v == 0 else f"{v:.3g}"))
        for j, heading in enumerate([image_title, *(c.title for c in columns)]):
            _fit(axes[0, j].set_title(" ", fontsize=_FONT_PT), heading, tile * 0.95)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.spines[:].set_visible(True)
            ax.spines[:].set_color("#D1D9E0")
        # the image column gets an empty colour-bar slot so that the rows stay aligned
        spacer = fig.colorbar(_blank_mappable(), ax=axes[:, 0], location="bottom", shrink=0.8, aspect=12, pad=0.03)
        spacer.ax.set_visible(False)
        _title(fig, title)
    return fig


def _as_array(value: Any) -> np.ndarray:
    """A map (numpy array or torch tensor) as a float32 numpy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float32)


def _blank_mappable() -> Any:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    return ScalarMappable(norm=Normalize(0.0, 1.0), cmap="Greys")


def _symmetric_locator(m: float, signed: bool) -> Any:
    """Ticks at ``-m, 0, m`` (signed) or ``0, m``: the ends of the scale and its centre are labelled."""
    from matplotlib.ticker import FixedLocator

    return FixedLocator([-m, 0.0, m] if signed else [0.0, m])


def overlay_grid(images: Sequence[Any], columns: Sequence[OverlayColumn], *, title: str = "", alpha: float = 0.6,
                 tile: float = 150.0, image_title: str = "image") -> str:
    """Images (one per row) with maps drawn over them (one column per kind of map), as SVG text.

    Each map is drawn by :func:`vitdecomp.apps.heatmap.render_overlay` over its image. A column
    shares one scale across its rows, ``m = max |h|`` over the column, so that the colour bar
    under the column (labelled with ``units``) holds for every tile in it: signed columns
    ``[-m, m]`` blue–white–red centred at 0, unsigned ones ``[0, m]`` white–red.

    Args:
        images: uint8 ``[H, W, 3]`` arrays or PIL images, one per row.
        columns: The maps, one :class:`OverlayColumn` per column after the image column.
        title: Title (wrapped).
        alpha: Weight of the colours in the blend over the image.
        tile: Size of a tile in pixels.
        image_title: Heading of the first column.

    Returns:
        The SVG document as text.
    """
    return svg_text(overlay_grid_figure(images, columns, title=title, alpha=alpha, tile=tile,
                                        image_title=image_title))
