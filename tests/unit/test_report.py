"""vitdecomp.report: HTML document model, renderer, check_html, and the numpy/PIL figures."""
from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitdecomp.report import Figure, Grid, Report, Section, Table, check_html, format_value
from vitdecomp.report import figures

SVG_NS = "{http://www.w3.org/2000/svg}"
EVIL = '<script>alert("x")</script> & friends'


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
                items=[Table(["name", "value", "ok"], [["a", 1.23456, True], ["b", None, False]], caption="t")],
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
    """Collects img srcs and the TOC's hrefs."""

    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.toc: list[str] = []
        self.section_ids: list[str] = []
        self._in_nav = False

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

    def handle_endtag(self, tag: str) -> None:
        if tag == "nav":
            self._in_nav = False


def _collect(text: str) -> _Collector:
    collector = _Collector()
    collector.feed(text)
    return collector


# --------------------------------------------------------------------------- rendering


def test_report_with_every_item_type_passes_check() -> None:
    text = _full_report().render()
    assert check_html(text) == []
    assert text.startswith("<!DOCTYPE html>")
    assert '<meta charset="utf-8">' in text
    assert "<table" in text and '<figure class="grid">' in text and "<p>A paragraph between figures.</p>" in text
    assert text.count("data:image/svg+xml;base64,") == 2
    assert "<script" not in text.lower() and "http://" not in text and "https://" not in text
    # table cells: floats formatted, None as a dash, booleans as yes/no
    assert '<td class="num">1.235</td>' in text and "<td>\u2014</td>" in text
    assert "<td>yes</td>" in text and "<td>no</td>" in text


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


# --------------------------------------------------------------------------- figures


def _bars(svg: str) -> list[ET.Element]:
    root = ET.fromstring(svg)
    return [el for el in root.iter(f"{SVG_NS}rect") if el.get("class") == "bar"]


def test_bar_chart_grouped_is_valid_svg_with_one_bar_per_value() -> None:
    values = {"L09": [1.0, 2.0], "L10 <&>": [-1.0, 4.0], "L11": [0.0, 3.0]}
    svg = figures.bar_chart(values, title="a & b", ylabel="share", series=["mean", "max"])
    bars = _bars(svg)
    assert len(bars) == 6
    heights = [float(b.get("height", "nan")) for b in bars]
    assert heights[1] == pytest.approx(2 * heights[0], rel=1e-2)  # height proportional to the value
    assert heights[2] == pytest.approx(heights[0], rel=1e-2)  # -1 hangs as far as +1 rises
    assert heights[4] == 0.0
    texts = [el.text for el in ET.fromstring(svg).iter(f"{SVG_NS}text")]
    assert "L10 <&>" in texts and "mean" in texts and "max" in texts and "a & b" in texts


def test_bar_chart_single_series_and_nan() -> None:
    assert len(_bars(figures.bar_chart({"a": 1.0, "b": 2.5, "c": np.float32(0.5), "d": -3.0}))) == 4
    assert len(_bars(figures.bar_chart({"a": [1.0, float("nan")], "b": [2.0, 3.0]}))) == 3
    crowded = figures.bar_chart({f"category {i}": float(i) for i in range(80)})
    assert len(_bars(crowded)) == 80
    labels = [el for el in ET.fromstring(crowded).iter(f"{SVG_NS}text") if "rotate(" in el.get("transform", "")]
    assert 0 < len(labels) < 80  # too wide for their groups: rotated, and thinned out
    with pytest.raises(ValueError, match="same number"):
        figures.bar_chart({"a": [1.0, 2.0], "b": [1.0]})
    with pytest.raises(ValueError, match="series names"):
        figures.bar_chart({"a": [1.0, 2.0]}, series=["only one"])


def test_line_chart_is_valid_svg_with_one_path_per_series() -> None:
    svg = figures.line_chart(
        [0, 1, 2, 3], {"train": [1.0, 0.5, float("nan"), 0.2], "val <x>": [1.1, 0.6, 0.4, 0.3]},
        title="loss", xlabel="epoch", ylabel="loss",
    )
    root = ET.fromstring(svg)
    paths = [el for el in root.iter(f"{SVG_NS}path") if el.get("class") == "series"]
    assert len(paths) == 2
    assert paths[0].get("d", "").count("M") == 2  # the NaN breaks the line
    assert paths[1].get("d", "").count("M") == 1 and paths[1].get("d", "").count("L") == 3
    assert len([el for el in root.iter(f"{SVG_NS}circle")]) == 7
    with pytest.raises(ValueError, match="3 values for 4"):
        figures.line_chart([0, 1, 2, 3], {"a": [1.0, 2.0, 3.0]})


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


def test_html_module_needs_only_the_standard_library() -> None:
    code = (
        "import sys, vitdecomp.report as r; "
        "assert 'numpy' not in sys.modules and 'PIL' not in sys.modules, 'eager import'; "
        "r.Report('t').render(); "
        "assert r.bar_chart is r.figures.bar_chart and 'PIL' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
