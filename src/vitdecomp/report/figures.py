"""Figures for reports with numpy and PIL only: image grids (PNG) and simple charts (SVG text).

matplotlib is not a dependency. Charts are small hand-written SVG documents meant to be
embedded with :meth:`vitdecomp.report.Figure.from_svg`; every label in them is escaped, so
arbitrary category or series names are safe. Colours are the Okabe–Ito palette
(distinguishable with colour-vision deficiencies).

Example::

    from vitdecomp.report import Figure, figures

    grid = figures.image_grid(crops, columns=4, scale=3, labels=["dog", "cat", ...])
    Figure.from_pil(grid, caption="top images")
    Figure.from_svg(figures.bar_chart({"L10": 0.21, "L11": 0.64}, title="share per layer"))
"""
from __future__ import annotations

import html
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .html import png_from_pil as _png_from_pil

__all__ = ["image_grid", "label_height", "bar_chart", "line_chart", "ablation_curves", "debias_chart", "png_bytes",
           "PALETTE"]

#: Okabe–Ito colours, in the order series get them (then repeated).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#7F7F7F")
_FONT_FAMILY = "system-ui, -apple-system, 'Segoe UI', Roboto, Arial, sans-serif"
_FONT_SIZE = 11
_CHAR_W = 6.8  # generous mean glyph width at _FONT_SIZE, for fitting labels without a font engine
_LABEL_ANGLE = 40.0  # degrees; category labels too wide for their group are drawn rotated
_MAX_LABEL_PX = 120.0  # longest rotated category label, in pixels along the text
_GRID_COLOR = "#D1D9E0"
_AXIS_COLOR = "#59636E"
_TEXT_COLOR = "#1F2328"


# --------------------------------------------------------------------------- raster


def png_bytes(image: Image.Image) -> bytes:
    """Encode a PIL image as PNG (lossless); modes PNG cannot store are converted to RGB(A)."""
    return _png_from_pil(image)


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
    drawn centred under its tile in PIL's default font, shortened with ".." if too wide).

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


# --------------------------------------------------------------------------- SVG helpers


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _n(value: float) -> str:
    """A coordinate, compactly."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _text(x: float, y: float, text: str, anchor: str = "middle", extra: str = "") -> str:
    """An SVG ``<text>`` element with escaped content."""
    return f'<text x="{_n(x)}" y="{_n(y)}" text-anchor="{anchor}"{extra}>{_esc(text)}</text>'


def _line(x1: float, x2: float, y1: float, y2: float, stroke: str, css_class: str = "") -> str:
    """An SVG ``<line>`` element."""
    cls = f' class="{css_class}"' if css_class else ""
    return f'<line{cls} x1="{_n(x1)}" x2="{_n(x2)}" y1="{_n(y1)}" y2="{_n(y2)}" stroke="{stroke}"/>'


def _nice_step(span: float, target: int) -> float:
    raw = span / max(target, 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    for factor in (1.0, 2.0, 5.0, 10.0):
        if raw <= factor * magnitude * (1 + 1e-9):
            return factor * magnitude
    return 10.0 * magnitude


def _nice_ticks(lo: float, hi: float, target: int = 5) -> tuple[list[float], float]:
    """Round tick values (1, 2, 5 × 10^k apart) covering ``[lo, hi]``, and their step."""
    if not hi > lo:
        margin = abs(lo) * 0.1 or 0.5
        lo, hi = lo - margin, hi + margin
    step = _nice_step(hi - lo, target)
    start = math.floor(lo / step + 1e-9) * step
    stop = math.ceil(hi / step - 1e-9) * step
    count = int(round((stop - start) / step))
    return [float(f"{start + i * step:.12g}") for i in range(count + 1)], step


def _format_tick(value: float, step: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or step < 1e-4:
        return f"{value:.3g}"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{value:.{decimals}f}"


def _truncate(text: str, width: float) -> str:
    """``text`` shortened with "…" to about ``width`` pixels at the chart font size."""
    max_chars = max(1, int(width / _CHAR_W))
    return text if len(text) <= max_chars else text[: max(1, max_chars - 1)] + "\u2026"


def _legend_layout(names: Sequence[str], x0: float, x_max: float) -> tuple[list[tuple[float, int]], int]:
    """Position ``(x, row)`` of each legend entry, wrapping rows at ``x_max``; and the row count."""
    positions: list[tuple[float, int]] = []
    x, row = x0, 0
    for name in names:
        item_w = 16 + len(name) * _CHAR_W + 14
        if positions and x + item_w > x_max:
            x, row = x0, row + 1
        positions.append((x, row))
        x += item_w
    return positions, (row + 1 if names else 0)


_LEGEND_ROW = 16


def _legend(names: Sequence[str], positions: list[tuple[float, int]], y0: float) -> list[str]:
    out = ['<g class="legend">']
    for j, (name, (x, row)) in enumerate(zip(names, positions)):
        y = y0 + row * _LEGEND_ROW
        color = PALETTE[j % len(PALETTE)]
        out.append(f'<rect class="swatch" x="{_n(x)}" y="{_n(y - 9)}" width="10" height="10" fill="{color}"/>')
        out.append(_text(x + 14, y, name, anchor="start"))
    out.append("</g>")
    return out


def _svg_open(width: int, height: int, title: str) -> list[str]:
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="{_FONT_FAMILY}" font-size="{_FONT_SIZE}" '
        f'fill="{_TEXT_COLOR}" role="img">'
    ]
    if title:
        out.append(f"<title>{_esc(title)}</title>")
    out.append(f'<rect class="background" width="{width}" height="{height}" fill="#ffffff"/>')
    if title:
        out.append(_text(width / 2, 17, title, extra=' font-size="13" font-weight="600"'))
    return out


def _y_axis(
    ticks: list[float], step: float, y_of: Any, left: float, right_x: float, ylabel: str, mid_y: float
) -> list[str]:
    """Horizontal grid lines with tick labels, and the rotated axis label."""
    out = ['<g class="y-axis">']
    for tick in ticks:
        y = y_of(tick)
        out.append(_line(left, right_x, y, y, _GRID_COLOR))
        out.append(_text(left - 5, y + 4, _format_tick(tick, step), anchor="end"))
    if ylabel:
        out.append(_text(0, 0, ylabel, extra=f' transform="translate(13 {_n(mid_y)}) rotate(-90)"'))
    out.append("</g>")
    return out


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _check_size(width: int, height: int, plot_w: float, plot_h: float) -> None:
    if plot_w < 20 or plot_h < 20:
        raise ValueError(f"chart of {width}x{height} px leaves no room to plot (titles, legend and axes need space)")


# --------------------------------------------------------------------------- charts


def bar_chart(
    values: Mapping[str, Sequence[float]] | Mapping[str, float],
    *,
    title: str = "",
    ylabel: str = "",
    series: Sequence[str] | None = None,
    width: int = 640,
    height: int = 320,
) -> str:
    """A (grouped) bar chart as SVG text.

    Args:
        values: Category → value (one series), or category → one value per series
            (grouped bars, all sequences the same length). Categories keep mapping order.
        title: Title on top.
        ylabel: Label of the value axis.
        series: Series names for the legend (one per value in each group). Without it,
            grouped values are named "series 1", "series 2", ... and a single series gets
            no legend.
        width: Width in pixels.
        height: Height in pixels.

    Returns:
        An SVG document: one ``<rect class="bar">`` per finite value (non-finite values are
        left out), bars rising from (or hanging below) zero, a value axis with round ticks,
        category names under the groups (rotated when too wide for their group, then
        shortened with "…" past 120 px, and only every n-th one when groups are very narrow)
        and a legend.
    """
    if not values:
        raise ValueError("bar_chart needs at least one category")
    categories = [str(key) for key in values]
    groups: list[list[float]] = []
    scalar = all(isinstance(v, numbers.Real) for v in values.values())
    for key, value in values.items():
        if scalar:
            groups.append([float(value)])  # type: ignore[arg-type]
        elif isinstance(value, numbers.Real):
            raise ValueError(f"bar_chart: category {key!r} has one number but others have sequences")
        else:
            groups.append([float(v) for v in value])  # type: ignore[union-attr]
    k = len(groups[0])
    if k == 0 or any(len(g) != k for g in groups):
        counts = [len(g) for g in groups]
        raise ValueError(f"bar_chart: every category needs the same number (>= 1) of values, got {counts}")
    if series is not None and len(series) != k:
        raise ValueError(f"bar_chart: {len(series)} series names for {k} values per category")
    if series is not None:
        names = [str(s) for s in series]
    else:
        names = [] if k == 1 else [f"series {j + 1}" for j in range(k)]

    left, right = (70.0 if ylabel else 54.0), 12.0
    group_w = (width - left - right) / len(categories)
    longest = max(len(c) for c in categories) * _CHAR_W
    rotate = longest > group_w - 4
    label_px = min(longest, _MAX_LABEL_PX)
    bottom = 24.0 + label_px * math.sin(math.radians(_LABEL_ANGLE)) if rotate else 34.0
    label_every = max(1, math.ceil(18.0 / group_w)) if rotate else 1  # rotated labels need ~18 px each
    positions, legend_rows = _legend_layout(names, left, width - right)
    legend_y = (36.0 if title else 16.0) if names else 0.0
    top = (28.0 if title else 10.0) + legend_rows * _LEGEND_ROW + (6.0 if names else 0.0)
    plot_w, plot_h = width - left - right, height - top - bottom
    _check_size(width, height, plot_w, plot_h)

    finite = _finite([v for g in groups for v in g])
    ticks, step = _nice_ticks(min([0.0, *finite]), max([0.0, *finite]))
    lo, hi = ticks[0], ticks[-1]

    def y_of(value: float) -> float:
        return top + plot_h * (hi - value) / (hi - lo)

    out = _svg_open(width, height, title)
    out += _y_axis(ticks, step, y_of, left, left + plot_w, ylabel, top + plot_h / 2)
    bar_w = group_w * 0.8 / k
    zero = y_of(0.0)
    out.append('<g class="bars">')
    for i, (category, group) in enumerate(zip(categories, groups)):
        for j, value in enumerate(group):
            if not math.isfinite(value):
                continue
            x = left + i * group_w + group_w * 0.1 + j * bar_w
            y = min(y_of(value), zero)
            label = f"{category} · {names[j]}: {value:.4g}" if names else f"{category}: {value:.4g}"
            out.append(
                f'<rect class="bar" x="{_n(x)}" y="{_n(y)}" width="{_n(max(bar_w - 1, 1))}" '
                f'height="{_n(abs(y_of(value) - zero))}" fill="{PALETTE[j % len(PALETTE)]}">'
                f"<title>{_esc(label)}</title></rect>"
            )
    out.append("</g>")
    out.append(_line(left, left + plot_w, zero, zero, _AXIS_COLOR, "baseline"))
    out.append('<g class="x-axis">')
    for i, category in enumerate(categories):
        x = left + (i + 0.5) * group_w
        if i % label_every:
            continue
        if rotate:
            y = top + plot_h + 12
            turn = f' transform="rotate(-{_LABEL_ANGLE:g} {_n(x + 3)} {_n(y)})"'
            out.append(_text(x + 3, y, _truncate(category, label_px), anchor="end", extra=turn))
        else:
            out.append(_text(x, top + plot_h + 15, category))
    out.append("</g>")
    if names:
        out += _legend(names, positions, legend_y)
    out.append("</svg>")
    return "\n".join(out)


def line_chart(
    x: Sequence[float],
    ys: Mapping[str, Sequence[float]],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    width: int = 640,
    height: int = 320,
) -> str:
    """A line chart of one or more series over shared x values, as SVG text.

    Args:
        x: The x values (finite), shared by every series.
        ys: Series name → y values, each as long as ``x``. Non-finite y values break the line.
        title: Title on top.
        xlabel: Label of the x axis.
        ylabel: Label of the y axis.
        width: Width in pixels.
        height: Height in pixels.

    Returns:
        An SVG document: one ``<path class="series">`` per series (plus a
        ``<circle class="point">`` per finite point when there are at most 40 points),
        axes with round ticks and a legend.
    """
    xs = [float(v) for v in x]
    if not xs or not all(math.isfinite(v) for v in xs):
        raise ValueError("line_chart needs at least one x value, all finite")
    if not ys:
        raise ValueError("line_chart needs at least one series")
    series = {str(name): [float(v) for v in values] for name, values in ys.items()}
    for name, values in series.items():
        if len(values) != len(xs):
            raise ValueError(f"line_chart: series {name!r} has {len(values)} values for {len(xs)} x values")
    names = list(series)

    left, right, bottom = (70.0 if ylabel else 54.0), 16.0, (48.0 if xlabel else 30.0)
    positions, legend_rows = _legend_layout(names, left, width - right)
    legend_y = 36.0 if title else 16.0
    top = (28.0 if title else 10.0) + legend_rows * _LEGEND_ROW + 6.0
    plot_w, plot_h = width - left - right, height - top - bottom
    _check_size(width, height, plot_w, plot_h)

    x_lo, x_hi = min(xs), max(xs)
    x_ticks, x_step = _nice_ticks(x_lo, x_hi)
    if x_hi == x_lo:
        x_lo, x_hi = x_ticks[0], x_ticks[-1]
    else:
        x_ticks = [t for t in x_ticks if x_lo - 1e-9 * x_step <= t <= x_hi + 1e-9 * x_step]
    finite = _finite([v for values in series.values() for v in values]) or [0.0]
    y_ticks, y_step = _nice_ticks(min(finite), max(finite))
    y_lo, y_hi = y_ticks[0], y_ticks[-1]

    def x_of(value: float) -> float:
        return left + plot_w * (value - x_lo) / (x_hi - x_lo)

    def y_of(value: float) -> float:
        return top + plot_h * (y_hi - value) / (y_hi - y_lo)

    out = _svg_open(width, height, title)
    out += _y_axis(y_ticks, y_step, y_of, left, left + plot_w, ylabel, top + plot_h / 2)
    out.append('<g class="x-axis">')
    axis_y = top + plot_h
    out.append(_line(left, left + plot_w, axis_y, axis_y, _AXIS_COLOR))
    for tick in x_ticks:
        px = x_of(tick)
        out.append(_line(px, px, axis_y, axis_y + 4, _AXIS_COLOR))
        out.append(_text(px, axis_y + 16, _format_tick(tick, x_step)))
    if xlabel:
        out.append(_text(left + plot_w / 2, axis_y + 34, xlabel))
    out.append("</g>")
    markers = len(xs) <= 40
    for j, (name, values) in enumerate(series.items()):
        color = PALETTE[j % len(PALETTE)]
        commands: list[str] = []
        pen_down = False
        for xv, yv in zip(xs, values):
            if not math.isfinite(yv):
                pen_down = False
                continue
            commands.append(f"{'L' if pen_down else 'M'}{_n(x_of(xv))} {_n(y_of(yv))}")
            pen_down = True
        out.append(f'<g class="line"><title>{_esc(name)}</title>')
        out.append(f'<path class="series" d="{" ".join(commands)}" fill="none" stroke="{color}" stroke-width="2"/>')
        if markers:
            out.extend(
                f'<circle class="point" cx="{_n(x_of(xv))}" cy="{_n(y_of(yv))}" r="2.5" fill="{color}"/>'
                for xv, yv in zip(xs, values)
                if math.isfinite(yv)
            )
        out.append("</g>")
    out += _legend(names, positions, legend_y)
    out.append("</svg>")
    return "\n".join(out)


def ablation_curves(
    curves: Mapping[str, Sequence[tuple[float, float | None]]],
    *,
    title: str = "cumulative block ablation",
    xlabel: str = "blocks ablated",
    ylabel: str = "accuracy",
    width: int = 640,
    height: int = 320,
) -> str:
    """SVG line chart of cumulative ablation curves (:func:`line_chart`).

    Args:
        curves: series name -> ``[(n, score), ...]``; x values may differ between series (the
            chart uses their union; a series is broken where it has no point or a None score).

    Returns:
        The SVG document as text.
    """
    if not curves:
        raise ValueError("ablation_curves needs at least one curve")
    xs = sorted({float(n) for points in curves.values() for n, _ in points})
    ys = {}
    for name, points in curves.items():
        lookup = {float(n): (math.nan if v is None else float(v)) for n, v in points}
        ys[str(name)] = [lookup.get(x, math.nan) for x in xs]
    return line_chart(xs, ys, title=title, xlabel=xlabel, ylabel=ylabel, width=width, height=height)

def debias_chart(result: Any, title: str = "") -> str:
    """SVG: worst-group and average-group accuracy of a :class:`~vitdecomp.apps.debias.DebiasResult`:
    baseline, ablated, variance control, random mean / max."""
    s = result.random_summary()
    values = {
        "baseline": [result.baseline["worst_group"], result.baseline["average_group"]],
        f"top-{result.k} contrastive": [result.ablated["worst_group"], result.ablated["average_group"]],
        f"top-{result.k} variance": [result.variance_control["worst_group"], result.variance_control["average_group"]],
        f"random mean (sd {s['worst_group_sd']:.2f})": [s["worst_group_mean"], s["average_group_mean"]],
        "random max": [s["worst_group_max"], s["average_group_max"]],
    }
    return bar_chart(values, title=title or "Waterbirds test accuracy", ylabel="accuracy",
                     series=["worst-group", "average-group (unweighted)"], width=720)
