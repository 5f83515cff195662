"""vitdecomp.report: HTML from templates, check_html, format_value, and the matplotlib figures.

The figure tests inspect the matplotlib Figure before it is saved (the ``*_figure`` twins):
every heat map has a colour bar labelled with units, signed maps are centred at 0 with
symmetric limits, and every piece of text lies inside the figure, measured with the renderer.
"""
from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitdecomp.report import NUMBER_CONVENTION, Figure, Grid, Report, Section, Table, check_html, format_value
from vitdecomp.report import figures
from vitdecomp.report.html import TEMPLATES

SVG_NS = "{http://www.w3.org/2000/svg}"
EVIL = '<script>alert("x")</script> & friends'
LONG = "a rather long title that names the model, the store, the head and the split " * 3


def _pixels(seed: int, shape: tuple[int, ...] = (5, 7, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _full_report() -> Report:
    image = _pixels(0)
    bars = figures.bar_chart({"L10": [0.2, 0.1], "L11": [0.6, -0.1]}, title="share", series=["mean", "min"])
    lines = figures.line_chart([0, 1, 2], {"loss": [1.0, 0.5, 0.25]}, title="loss", xlabel="step", ylabel="loss")
    grid = figures.image_grid([_pixels(i) for i in range(3)], columns=3, labels=["a", "b", "c"])
    return Report(
        "Demo report",
        subtitle="tiny",
        sections=[
            Section(
                "numbers",
                "Numbers",
                paragraphs=["First paragraph."],
                items=[Table(["name", "value", "ok"], [["a", 1.23456, True], ["b", None, False], ["c", 5e-7, True]],
                             caption="t")],
            ),
            Section(
                "pictures",
                "Pictures",
                items=[
                    Figure.from_pil(Image.fromarray(image), caption="one image", width=140),
                    Grid([Figure.from_pil(_pixels(i), caption=f"tile {i}") for i in range(5)], columns=3),
                    Figure.from_pil(grid, caption="a PIL grid"),
                    "A paragraph between figures.",
                    Figure.from_svg(bars, caption="bars"),
                    Figure.from_svg(lines, caption="lines"),
                ],
            ),
        ],
        meta={"model": "timm:test_vit", "error": 3.2e-7, "seed": 0},
    )


class _Collector(HTMLParser):
    """Collects img srcs, the TOC's hrefs, section ids and the cells of every table row."""

    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.toc: list[str] = []
        self.section_ids: list[str] = []
        self.cells: list[tuple[str | None, str]] = []
        self._in_nav = False
        self._cell: str | None = None
        self._cls: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.srcs.append(values["src"] or "")
        elif tag == "nav":
            self._in_nav = True
        elif tag == "a" and self._in_nav:
            self.toc.append(values["href"] or "")
        elif tag == "section":
            self.section_ids.append(values["id"] or "")
        elif tag == "td":
            self._cell, self._cls = "", values.get("class")

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "nav":
            self._in_nav = False
        elif tag == "td" and self._cell is not None:
            self.cells.append((self._cls, self._cell))
            self._cell = None


def _collect(text: str) -> _Collector:
    collector = _Collector()
    collector.feed(text)
    return collector


# --------------------------------------------------------------------------- rendering from templates


def test_report_with_every_item_type_passes_check() -> None:
    text = _full_report().render()
    assert check_html(text) == []
    assert text.startswith("<!DOCTYPE html>")
    assert '<meta charset="utf-8">' in text
    assert "<table" in text and '<figure class="grid">' in text and "<p>A paragraph between figures.</p>" in text
    assert text.count("data:image/svg+xml;base64,") == 2
    # self-contained: no script, no link, nothing fetched (only data: URIs)
    assert "<script" not in text.lower() and "<link" not in text.lower()
    assert "http://" not in text and "https://" not in text
    srcs = _collect(text).srcs
    assert len(srcs) == 9 and all(src.startswith("data:image/") for src in srcs)
    # table cells: floats formatted, None as a dash, booleans as yes/no, numbers right-aligned
    cells = _collect(text).cells
    assert ("num", "1.235") in cells and ("num", "5.0e-07") in cells
    assert (None, "yes") in cells and (None, "no") in cells
    assert ("num", "\u2014") in cells  # the None of a numeric column lines up with its numbers
    # the unit convention is stated on every page, with the meta values in scientific notation
    assert NUMBER_CONVENTION in text and "<td>3.2e-07</td>" in text


def test_templates_are_shipped_as_package_data() -> None:
    names = sorted(p.name for p in TEMPLATES.iterdir())
    assert {"report.html.j2", "items.html.j2", "report.css"} <= set(names)
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text(encoding="utf-8")
    assert '"report/templates/*"' in pyproject
    for dep in ("matplotlib", "jinja2"):
        assert re.search(rf'^\s*"{dep}[>=<~]', pyproject, re.MULTILINE), f"{dep} is not a dependency"


def test_item_render_methods_use_the_same_templates() -> None:
    table = Table(["a"], [[0.5]], caption="cap")
    section = Section("s", "S", paragraphs=["p"], items=[table, "q"])
    page = Report("r", sections=[section]).render()
    assert table.render() in page and section.render() in page
    assert section.render().index("<p>p</p>") < section.render().index("<table>") < section.render().index("<p>q</p>")


def test_embedded_png_decodes_to_the_same_pixels() -> None:
    image = _pixels(42, (6, 9, 3))
    report = Report("png", sections=[Section("s", "S", items=[Figure.from_pil(Image.fromarray(image))])])
    (src,) = _collect(report.render()).srcs
    assert src.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    np.testing.assert_array_equal(np.asarray(decoded.convert("RGB")), image)


def test_svg_figure_embeds_the_svg_text() -> None:
    svg = figures.bar_chart({"a": 1.0})
    (src,) = _collect(Report("svg", sections=[Section("s", "S", items=[Figure.from_svg(svg)])]).render()).srcs
    assert src.startswith("data:image/svg+xml;base64,")
    assert base64.b64decode(src.split(",", 1)[1]).decode("utf-8") == svg


def test_user_text_is_escaped() -> None:
    report = Report(
        EVIL,
        subtitle=EVIL,
        sections=[
            Section(
                'x"><script>',
                EVIL,
                paragraphs=[EVIL],
                items=[
                    EVIL,
                    Table([EVIL], [[EVIL]], caption=EVIL),
                    Figure.from_pil(Image.fromarray(_pixels(1)), caption=EVIL, alt=EVIL),
                    Grid([Figure.from_pil(Image.fromarray(_pixels(2)), caption=EVIL)], caption=EVIL),
                ],
            )
        ],
        meta={EVIL: EVIL},
    )
    text = report.render()
    assert "<script" not in text.lower()
    assert "&lt;script&gt;" in text and "&amp; friends" in text
    assert " & " not in text
    assert check_html(text) == []


def test_toc_links_every_section_in_order() -> None:
    report = _full_report()
    report.sections.append(Section("extra-3", "Extra"))
    collected = _collect(report.render())
    assert collected.toc == ["#numbers", "#pictures", "#extra-3"]
    assert collected.section_ids == ["numbers", "pictures", "extra-3"]


def test_format_value() -> None:
    assert format_value(1.23456) == "1.235"
    assert format_value(np.float32(0.5)) == "0.500"
    assert format_value(np.int64(3)) == "3"
    assert format_value(None) == "\u2014"
    assert format_value(True) == "yes" and format_value(np.bool_(False)) == "no"
    assert format_value(2.0, "{:.1e}") == "2.0e+00"
    assert format_value("x") == "x"


@pytest.mark.parametrize(
    ("value", "fmt", "expected"),
    [
        (5e-7, "{:.3f}", "5.0e-07"),  # an exactness error is never "0.000"
        (-2.5e-5, "{:.3f}", "-2.5e-05"),
        (np.float64(3.48e-7), "{:.3f}", "3.5e-07"),
        (0.0009, "{:.3f}", "9.0e-04"),
        (0.001, "{:.3f}", "0.001"),
        (0.0, "{:.3f}", "0.000"),  # an exact zero stays a zero
        (1_234_567.0, "{:.3f}", "1.2e+06"),
        (999_999.0, "{:.3f}", "999999.000"),
        (0.04, "{:.1f}", "4.0e-02"),  # a coarser format switches earlier: 0.04 is not "0.0"
        (0.25, "{:.1f}", "0.2"),
        (5e-7, "{:.3g}", "5e-07"),  # non-fixed formats are left alone
        (float("nan"), "{:.3f}", "nan"),
    ],
)
def test_format_value_uses_scientific_notation_for_small_and_large_magnitudes(value, fmt, expected) -> None:
    assert format_value(value, fmt) == expected


def test_numeric_text_columns_are_right_aligned() -> None:
    cells = Table(["what", "acc"], [["random", "0.744 ± 0.059"], ["max", 0.81], ["none", None]]).cells()
    assert [c[1] for c in cells] == [("0.744 ± 0.059", True), ("0.810", True), ("\u2014", True)]
    assert [c[0][1] for c in cells] == [False, False, False]


def test_invalid_documents_raise() -> None:
    with pytest.raises(ValueError, match="row 0"):
        Table(["a", "b"], [[1]])
    with pytest.raises(ValueError, match="not PNG"):
        Figure(b"GIF89a")
    with pytest.raises(ValueError, match="duplicate section id"):
        Report("r", sections=[Section("a", "A"), Section("a", "B")]).render()
    with pytest.raises(TypeError, match="unsupported item"):
        Section("a", "A", items=[3.0]).render()  # type: ignore[list-item]


# --------------------------------------------------------------------------- check_html

GOOD = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>t</title><style>body { color: red; }</style></head>
<body><div id="a"><p>text<br>more</p><a href="#a">self</a>
<img src="data:image/png;base64,AAAA" alt=""></div>
</body></html>
"""


def test_check_html_accepts_the_reference_document() -> None:
    assert check_html(GOOD) == []


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("<p>text", "<div><p>text", "<div>"),  # unclosed div
        ('src="data:image/png;base64,AAAA"', 'src="http://example.com/x.png"', "http://example.com/x.png"),
        ('<p>text', '<p id="a">text', "duplicate id 'a'"),
        ('href="#a"', 'href="#nowhere"', "#nowhere"),
        ("<title>t</title>", '<title>t</title><link rel="stylesheet" href="http://cdn.example/x.css">', "<link"),
        ("<title>t</title>", '<title>t</title><script src="x.js"></script>', "<script src"),
        ("color: red;", "background: url(http://example.com/bg.png);", "url(http://example.com/bg.png)"),
        ('<div id="a">', '<div id="a" style="background: url(https://x.example/y.png)">', "url(https://x.example"),
        ("<title>t</title>", "<title>t</title><title>u</title>", "exactly one <title>"),
        ("<!DOCTYPE html>", "", "DOCTYPE"),
        ("</p>", "</p></span>", "</span> closes nothing"),
    ],
)
def test_check_html_catches(old: str, new: str, expected: str) -> None:
    assert old in GOOD
    problems = check_html(GOOD.replace(old, new, 1))
    assert problems, f"no problem found after replacing {old!r} with {new!r}"
    assert any(expected in problem for problem in problems), problems


# --------------------------------------------------------------------------- write


def test_write_is_atomic_and_utf8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = Report("Σ error ≤ 1e-5 — ünïcödé", sections=[Section("s", "Σ", paragraphs=["日本語"])])
    target = tmp_path / "sub" / "report.html"
    assert report.write(target) == target
    assert os.listdir(target.parent) == ["report.html"]
    assert target.read_text(encoding="utf-8") == report.render()

    # a failing replace leaves the old file intact and no temp file behind
    old = target.read_bytes()

    def boom(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        Report("new").write(target)
    assert os.listdir(target.parent) == ["report.html"]
    assert target.read_bytes() == old


# --------------------------------------------------------------------------- figure helpers


def _drawn(fig):
    """The figure drawn with Agg (constrained layout applied) and its renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def _texts_outside(fig) -> list[str]:
    """What is drawn outside the figure by more than half a pixel: the extent of everything drawn
    (titles, tick labels that are shown, axis labels, legends, colour bars, annotations), measured
    with the renderer after the layout ran, against the figure's own box."""
    from matplotlib.text import Text

    renderer = _drawn(fig)
    tight = fig.get_tightbbox(renderer)  # inches, union of every drawn artist
    width, height = fig.get_size_inches()
    tol = 0.5 / fig.dpi
    if tight.x0 >= -tol and tight.y0 >= -tol and tight.x1 <= width + tol and tight.y1 <= height + tol:
        return []
    box = fig.bbox  # name the culprits (texts outside the figure) for the failure message
    culprits = [t.get_text() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()
                and not box.contains(*t.get_window_extent(renderer).min)]
    return [f"drawn extent {tight.bounds} exceeds the figure {width:.2f}x{height:.2f} in; e.g. {culprits[:3]}"]


def _colorbar_objects(fig) -> list:
    """The visible colour bars of a figure (matplotlib marks a colour bar's axes with it)."""
    from matplotlib.colorbar import Colorbar

    return [ax._colorbar for ax in fig.axes
            if isinstance(getattr(ax, "_colorbar", None), Colorbar) and ax.get_visible()]


def _bar_label(cb) -> str:
    return (cb.ax.get_xlabel() if cb.orientation == "horizontal" else cb.ax.get_ylabel()).replace("\n", " ")


def _debias_result():
    """A DebiasResult as debias() returns it: baseline 0.427, ablated 0.960, random draws 0.217 / 0.641."""
    from vitdecomp.apps.debias import DebiasResult

    def m(worst: float, average: float) -> dict[str, float]:
        return {"worst_group": worst, "average_group": average, "weighted": average}

    draws = [{"components": [f"L00.H0{i}"], **m(w, 0.6)} for i, w in enumerate((0.217, 0.641))]
    return DebiasResult(selected=["L03.H01"], scores={}, baseline=m(0.427, 0.70), ablated=m(0.96, 0.97),
                        variance_control=m(0.0, 0.5), random=draws, k=10, seed=0, head={}, n={"test": 100})


def _score_table(with_nan: bool = True):
    from vitdecomp.interpret.score import ScoreTable

    rng = np.random.default_rng(0)
    scores = np.tanh(rng.normal(size=(9, 4)))
    scores[2, 1] = -0.95
    if with_nan:
        scores[-1] = np.nan  # a constant component
    labels = ("embed", *(f"L00.H{i:02d}" for i in range(7)), "bias")
    return ScoreTable(scores, labels, ("shape", "colour", "a very long feature name", "background"), "corr",
                      {"count": 100})


# --------------------------------------------------------------------------- heat maps


def _heatmap_figures() -> dict[str, object]:
    from vitdecomp.apps.heatmap import panel_figure, render_original

    rng = np.random.default_rng(1)
    images = [_pixels(i, (32, 48, 3)) for i in range(2)]
    signed = [rng.normal(size=(4, 6)) for _ in images]
    positive = [np.abs(rng.normal(size=(4, 6))) for _ in images]
    overlay = Image.fromarray(_pixels(9, (40, 60, 3)))
    return {
        "heatmap": figures.heatmap_figure(rng.normal(size=(5, 3)) - 0.3, [f"r{i}" for i in range(5)], ["a", "b", "c"],
                                          cbar_label="score (units)", title=LONG),
        "score": figures.score_heatmap_figure(_score_table(), title=LONG),
        "overlay": figures.overlay_grid_figure(images, [
            figures.OverlayColumn("signed map with a long column heading", signed, "contribution to <y, z> (logit "
                                  "units)"),
            figures.OverlayColumn("attention", positive, "attention weight (fraction)", signed=False),
        ], title=LONG),
        "panel": panel_figure(overlay, vmax=2.5, prefix={"cls": 1.0, "reg0": -0.5}, title=LONG,
                              label="contribution to the logit (logit units)"),
        "panel-original": panel_figure(render_original(np.asarray(overlay), signed[0], _full_box(60, 40)),
                                       vmax=1.0, prefix=None),
    }


def _full_box(width: int, height: int):
    from vitdecomp.apps.heatmap import CropBox

    return CropBox(image_width=width, image_height=height, left=0.0, top=0.0, right=float(width),
                   bottom=float(height), input_width=width, input_height=height)


def test_every_heat_map_has_a_colour_bar_labelled_with_units() -> None:
    for name, fig in _heatmap_figures().items():
        bars = _colorbar_objects(fig)
        expected = 2 if name == "overlay" else 1
        assert len(bars) == expected, f"{name}: {len(bars)} colour bars"
        for cb in bars:
            label = _bar_label(cb)
            assert label.strip(), f"{name}: colour bar without a label"
            assert "(" in label or "<" in label, f"{name}: colour bar label {label!r} names no units"
    assert _bar_label(_colorbar_objects(_heatmap_figures()["score"])[0]).startswith("correlation score (Pearson r")


def test_signed_maps_are_centred_at_zero_with_symmetric_limits() -> None:
    # data mostly positive: the limits must still be symmetric, so 0 is the centre colour
    data = np.array([[0.9, 0.2], [-0.1, 0.5]])
    fig = figures.heatmap_figure(data, ["a", "b"], ["x", "y"], cbar_label="r (Pearson)")
    (cb,) = _colorbar_objects(fig)
    norm = cb.mappable.norm
    assert norm.vmin == pytest.approx(-0.9) and norm.vmax == pytest.approx(0.9)
    assert float(norm(0.0)) == pytest.approx(0.5)
    assert cb.mappable.get_cmap().name.startswith(figures.SIGNED_CMAP)
    # the colour at 0 is the colour map's centre (white-ish), at +max the red end, at -max the blue end
    rgba = cb.mappable.get_cmap()(np.array([0.0, 0.5, 1.0]))
    assert rgba[1, :3].min() > 0.9 and rgba[2, 0] > rgba[2, 2] and rgba[0, 2] > rgba[0, 0]
    # a non-negative map with signed=None gets a sequential map from 0
    unsigned = figures.heatmap_figure(np.abs(data), ["a", "b"], ["x", "y"], cbar_label="share (fraction)")
    (ucb,) = _colorbar_objects(unsigned)
    assert ucb.mappable.norm.vmin == 0.0 and ucb.mappable.norm.vmax == pytest.approx(0.9)
    # correlation scores are always diverging, even when all positive
    table = _score_table(with_nan=False)
    table.scores[:] = np.abs(table.scores)
    (scb,) = _colorbar_objects(figures.score_heatmap_figure(table))
    assert scb.mappable.norm.vmin == pytest.approx(-scb.mappable.norm.vmax)


def test_overlay_and_panel_colour_bars_are_symmetric_and_match_the_overlay_colours() -> None:
    from vitdecomp.apps.heatmap import overlay_colormap, render_overlay

    figs = _heatmap_figures()
    signed_bar, positive_bar = _colorbar_objects(figs["overlay"])
    assert signed_bar.mappable.norm.vmin == pytest.approx(-signed_bar.mappable.norm.vmax)
    assert positive_bar.mappable.norm.vmin == 0.0
    (panel_bar,) = _colorbar_objects(figs["panel"])
    assert (panel_bar.mappable.norm.vmin, panel_bar.mappable.norm.vmax) == (-2.5, 2.5)
    assert [t for t in panel_bar.get_ticks()] == pytest.approx([-2.5, -1.25, 0.0, 1.25, 2.5])
    # the colour bar's colour map is render_overlay's colours: at alpha 1 over any image they coincide
    values = np.linspace(-1.0, 1.0, 9, dtype=np.float32)[None, :]
    drawn = np.asarray(render_overlay(np.zeros((1, 9, 3), np.uint8), values, alpha=1.0, vmax=1.0)).astype(float)
    cmap = overlay_colormap(True)
    np.testing.assert_allclose(cmap((values[0] + 1) / 2)[:, :3] * 255, drawn[0], atol=1.01)
    assert tuple(np.rint(np.asarray(cmap(0.5)[:3]) * 255)) == (255, 255, 255)
    assert tuple(np.rint(np.asarray(overlay_colormap(False)(0.0)[:3]) * 255)) == (255, 255, 255)


def test_no_text_is_clipped() -> None:
    charts = {
        "bar": figures.bar_chart_figure({f"category with a long name {i}": float(i) - 3 for i in range(8)},
                                        title=LONG, ylabel="share (fraction)", series=None),
        "bar-crowded": figures.bar_chart_figure({f"c{i}": float(i) for i in range(80)}, title="crowded"),
        "bar-grouped": figures.bar_chart_figure({"a": [1.0, 2.0], "b": [3.0, -1.0]}, series=["first series",
                                                "second series with a long name"], title=LONG, ylabel="y"),
        "line": figures.line_chart_figure([0, 1, 2], {f"series {i}": [i, i + 1, i + 2] for i in range(6)},
                                          title=LONG, xlabel="x label", ylabel="y label"),
        "ablation": figures.ablation_curves_figure({"from_last": [(0, 0.9), (1, 0.5)], "from_first": [(0, 0.9)]},
                                                   title=LONG),
        "debias": figures.debias_chart_figure(_debias_result(), title=LONG),
        **_heatmap_figures(),
    }
    for name, fig in charts.items():
        assert _texts_outside(fig) == [], name


def test_clipping_check_catches_a_clipped_title() -> None:
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(2, 1))
    fig.suptitle(LONG)
    assert _texts_outside(fig)


# --------------------------------------------------------------------------- charts


def _svg_root(svg: str) -> ET.Element:
    assert svg.startswith("<svg"), svg[:60]
    return ET.fromstring(svg)


def test_charts_are_self_contained_reproducible_svg() -> None:
    svg = figures.bar_chart({"L09": [1.0, 2.0], "L10 <&>": [-1.0, 4.0]}, title="a & b", series=["mean", "max"])
    root = _svg_root(svg)
    assert root.tag == f"{SVG_NS}svg"
    assert root.find(f"{SVG_NS}title").text == "a & b"  # the title is readable text, escaped
    refs = [v for el in root.iter() for k, v in el.attrib.items() if k.endswith("href")]
    assert all(v.startswith(("#", "data:")) for v in refs), refs  # nothing external
    assert svg == figures.bar_chart({"L09": [1.0, 2.0], "L10 <&>": [-1.0, 4.0]}, title="a & b",
                                    series=["mean", "max"])


def test_bar_chart_draws_one_bar_per_finite_value_at_its_height() -> None:
    from matplotlib.patches import Rectangle

    fig = figures.bar_chart_figure({"a": [1.0, float("nan")], "b": [2.0, -3.0]}, series=["x", "y"])
    ax = fig.axes[0]
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert sorted(b.get_height() for b in bars) == [-3.0, 1.0, 2.0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["x", "y"]
    # every bar's value is printed (as format_value prints it) when there are few bars
    assert sorted(t.get_text() for t in ax.texts) == ["-3.000", "1.000", "2.000"]
    with pytest.raises(ValueError, match="same number"):
        figures.bar_chart({"a": [1.0, 2.0], "b": [1.0]})
    with pytest.raises(ValueError, match="series names"):
        figures.bar_chart({"a": [1.0, 2.0]}, series=["only one"])


def test_crowded_bar_labels_are_rotated_and_thinned() -> None:
    fig = figures.bar_chart_figure({f"category {i}": float(i) for i in range(80)})
    labels = [t for t in fig.axes[0].get_xticklabels() if t.get_text()]
    assert 0 < len(labels) < 80 and all(t.get_rotation() == 90 for t in labels)
    few = figures.bar_chart_figure({"a": 1.0, "b": 2.0})
    assert all(t.get_rotation() == 0 for t in few.axes[0].get_xticklabels())


def test_line_chart_draws_one_line_per_series_broken_at_nan() -> None:
    fig = figures.line_chart_figure([0, 1, 2, 3], {"train": [1.0, 0.5, float("nan"), 0.2], "val": [1, 2, 3, 4]})
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["train", "val"]
    assert np.isnan(lines[0].get_ydata()[2])
    with pytest.raises(ValueError, match="3 values for 4"):
        figures.line_chart([0, 1, 2, 3], {"a": [1.0, 2.0, 3.0]})


def test_accuracy_charts_use_fractions_on_a_unit_axis() -> None:
    curves = figures.ablation_curves_figure({"from_last": [(0, 0.9), (1, 0.5), (2, 0.1)],
                                             "from_first": [(0, 0.9), (2, None)]})
    ax = curves.axes[0]
    assert ax.get_ylabel() == f"accuracy {figures.FRACTION}" and ax.get_ylim() == pytest.approx((0.0, 1.02))
    assert all(float(t).is_integer() for t in ax.get_xticks())
    debias = figures.debias_chart_figure(_debias_result())
    dax = debias.axes[0]
    assert dax.get_ylabel().endswith(figures.FRACTION) and dax.get_ylim() == (0.0, 1.1)
    shown = {t.get_text() for t in dax.texts}
    assert {"0.427", "0.960", "0.429", "0.641", "0.000"} <= shown  # fractions, never "42.7"; 0.429 = mean of draws
    # error bars on the random draws' bars only: ± one population sd (worst-group, then average-group)
    worst_err, average_err = [c.get_segments() for c in dax.collections if len(c.get_segments())]
    assert len(worst_err) == len(average_err) == 1
    assert abs(worst_err[0][1, 1] - worst_err[0][0, 1]) == pytest.approx(2 * 0.212)
    assert abs(average_err[0][1, 1] - average_err[0][0, 1]) == pytest.approx(0.0)


def test_ablation_curves_svg_names_each_series() -> None:
    svg = figures.ablation_curves({"from_last": [(0, 0.9), (1, 0.5)], "from_first": [(0, 0.9), (2, None)]})
    root = _svg_root(svg)
    series = [g for g in root.iter(f"{SVG_NS}g") if g.get("class") == "series"]
    assert [g.find(f"{SVG_NS}title").text for g in series] == ["from_last", "from_first"]
    with pytest.raises(ValueError):
        figures.ablation_curves({})


def test_score_heatmap_shows_every_component_and_greys_undefined_scores() -> None:
    table = _score_table()
    fig = figures.score_heatmap_figure(table)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(table.labels)  # the last row is there
    mesh = ax.collections[0]
    assert mesh.get_array().shape == table.scores.shape
    assert mesh.get_array().mask[-1].all()  # NaN row masked -> drawn in the 'bad' grey, named in the legend
    legend = fig.legends[0]
    assert "undefined" in legend.get_texts()[0].get_text()
    # values printed in the cells (2 decimals), none for the undefined row
    assert "-0.95" in {t.get_text() for t in ax.texts}
    assert len(ax.texts) == table.scores[:-1].size
    assert figures.score_heatmap(table).startswith("<svg")


def test_overlay_grid_checks_its_inputs() -> None:
    with pytest.raises(ValueError, match="2 maps for 1"):
        figures.overlay_grid([_pixels(0, (8, 8, 3))], [figures.OverlayColumn("x", [np.zeros((2, 2))] * 2, "u")])


# --------------------------------------------------------------------------- panels (apps.heatmap)


def test_render_panel_keeps_the_overlay_pixels_and_adds_a_labelled_scale(tmp_path: Path) -> None:
    from vitdecomp.apps.heatmap import render_panel

    overlay = Image.fromarray(_pixels(5, (300, 500, 3)))
    path = tmp_path / "p.png"
    panel = render_panel(overlay, vmax=1.5, prefix={"cls": 1.5}, title="t", path=path, label="x (logit units)")
    assert path.is_file() and Image.open(path).size == panel.size
    assert panel.width <= overlay.width + 160 and panel.height > overlay.height
    array = np.asarray(panel)
    # the overlay is drawn 1:1 (no resampling): find it by its first row and compare it whole
    first = np.asarray(overlay)
    top_left = [(y, x) for y in range(60) for x in range(30) if np.array_equal(array[y, x:x + 40], first[0, :40])]
    assert top_left, "overlay not found unchanged in the panel"
    y, x = top_left[0]
    np.testing.assert_array_equal(array[y:y + 300, x:x + 500], first)
    # the prefix swatch of +vmax is pure red somewhere below the overlay
    below = array[y + 300:]
    assert ((below[..., 0] == 255) & (below[..., 1] == 0) & (below[..., 2] == 0)).any()
    # a small overlay is enlarged by a whole factor (nearest neighbour) to min_height
    small = render_panel(Image.fromarray(_pixels(6, (20, 30, 3))), vmax=0.0, min_height=100)
    assert small.height > 100 and small.width <= 30 * 5 + 160


def test_render_overlay_colours_are_centred_at_zero() -> None:
    from vitdecomp.apps.heatmap import render_overlay

    white = np.full((4, 3, 3), 255, dtype=np.uint8)
    heat = np.array([[2.0, 0.0, -2.0]] * 4)
    out = np.asarray(render_overlay(white, heat, alpha=1.0))
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 1]) == (255, 255, 255) and tuple(out[0, 2]) == (0, 0, 255)
    # one-sided data keeps symmetric limits: -1 with vmax 2 is half-saturated blue, not full blue
    half = np.asarray(render_overlay(white[:1, :2], np.array([[2.0, -1.0]]), alpha=1.0))
    assert tuple(half[0, 1]) == (128, 128, 255)


# --------------------------------------------------------------------------- grids and imports


def test_image_grid_size_and_pixels() -> None:
    images = [_pixels(i, (5, 7, 3)) for i in range(5)]  # H=5, W=7
    grid = figures.image_grid(images, columns=3, scale=2, pad=2)
    tile_w, tile_h = 7 * 2, 5 * 2
    assert grid.mode == "RGB"
    assert grid.size == (3 * tile_w + 4 * 2, 2 * tile_h + 3 * 2)
    array = np.asarray(grid)
    upscaled = np.repeat(np.repeat(images[4], 2, axis=0), 2, axis=1)
    x, y = 2 + 1 * (tile_w + 2), 2 + 1 * (tile_h + 2)  # image 4 is row 1, column 1
    np.testing.assert_array_equal(array[y : y + tile_h, x : x + tile_w], upscaled)

    labelled = figures.image_grid(images, columns=3, scale=2, pad=2, labels=[f"img {i}" for i in range(5)])
    band = figures.label_height()
    assert band > 0
    assert labelled.size == (grid.width, 2 * (tile_h + band) + 3 * 2)

    # fewer images than columns: the grid narrows; PIL and grayscale inputs work
    small = figures.image_grid([Image.fromarray(images[0]), images[1][:, :, 0]], columns=4, scale=1, pad=0)
    assert small.size == (2 * 7, 5)
    with pytest.raises(ValueError, match="uint8"):
        figures.image_grid([images[0].astype(np.float32)], columns=1)


def test_png_bytes_roundtrip() -> None:
    image = Image.fromarray(_pixels(3))
    data = figures.png_bytes(image)
    assert data.startswith(b"\x89PNG")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(image))
    assert figures.png_bytes(Image.new("CMYK", (2, 2))).startswith(b"\x89PNG")  # converted to RGB


def test_heavy_libraries_are_imported_only_when_used() -> None:
    code = (
        "import sys, vitdecomp.report as r; "
        "heavy = ('numpy', 'PIL', 'jinja2', 'matplotlib'); "
        "assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]; "
        "r.Report('t').render(); "
        "assert 'jinja2' in sys.modules and 'matplotlib' not in sys.modules; "
        "import vitdecomp.report.figures; "
        "assert 'matplotlib' not in sys.modules, 'figures imports matplotlib eagerly'; "
        "assert r.bar_chart is r.figures.bar_chart; r.bar_chart({'a': 1.0}); "
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot (global figure state) used'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_score_heatmap_frames_significant_cells():
    import numpy as np

    from vitdecomp.interpret.score import ScoreTable
    from vitdecomp.report.figures import score_heatmap, score_heatmap_figure

    table = ScoreTable(np.array([[0.5, 0.1], [0.2, -0.3]]), ("L00.H00", "L00.H01"), ("colour", "shape"))
    marks = np.array([[True, False], [False, False]])
    fig = score_heatmap_figure(table, significant=marks)
    ax = fig.axes[0]
    framed = [p for p in ax.patches if not p.get_fill()]
    assert len(framed) == 1 and framed[0].get_xy() == pytest.approx((0.06, 0.06))
    assert any("significant" in t.get_text() for leg in fig.legends for t in leg.get_texts())
    assert "significant" not in score_heatmap(table)  # no marks, no legend entry
