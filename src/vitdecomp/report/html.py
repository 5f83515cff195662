"""Self-contained HTML reports: a tiny document model, rendered from Jinja2 templates, and a check.

A report is one HTML5 file that opens from disk with no network and no JavaScript: styles are
inline, and every image is embedded as a ``data:`` URI (PNG, or SVG for charts). The page is
rendered from the templates shipped in ``vitdecomp/report/templates/`` (``report.html.j2``,
``items.html.j2`` with one macro per item, ``report.css``) with autoescaping on; Jinja2 is
imported on the first render, so importing this module needs the standard library only (PIL is
imported inside :meth:`Figure.from_pil`).

Numbers follow one convention in every report (:data:`NUMBER_CONVENTION`, printed in each
report's footer): shares and accuracies are fractions in [0, 1], never percent; table cells
have 3 decimals, and magnitudes below 0.001 or from 1e6 up are written in scientific notation
(:func:`format_value`: ``5e-7`` is ``5.0e-07``, not ``0.000``).

Document model::

    Report(title, subtitle, sections=[Section(id, title, paragraphs, items=[...])], meta={...})

where a section's ``items`` are :class:`Table`, :class:`Figure`, :class:`Grid` or ``str``
(a paragraph). Everything user-provided (titles, captions, cells, alt text, ids, meta) is
HTML-escaped; no user string is ever emitted as markup.

Example::

    from vitdecomp.report import Figure, Report, Section, Table, check_html

    report = Report(
        "Decomposition of deit_small",
        sections=[Section("error", "Exactness", items=[
            Table(["component", "share"], [["L11.H03", 0.412], ["bias", None]]),
        ])],
        meta={"model": "timm:deit_small_patch16_224"},
    )
    assert check_html(report.render()) == []
    report.write("runs/demo/report.html")
"""
from __future__ import annotations

import base64
import functools
import io
import math
import numbers
import os
import re
import secrets
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Union
from urllib.parse import unquote

__all__ = ["Table", "Figure", "Grid", "Section", "Report", "check_html", "format_value", "NUMBER_CONVENTION",
           "TEMPLATES"]

#: The unit and number convention of every report, table and figure (shown in each report's footer).
NUMBER_CONVENTION = ("Shares and accuracies are fractions in [0, 1] (not percent). Numbers have 3 decimals; "
                     "magnitudes below 0.001 or of 1e6 and more are in scientific notation (5.0e-07).")
#: Folder of the page templates (package data).
TEMPLATES = Path(__file__).with_name("templates")
#: Below this magnitude (and from ``_LARGE`` up) a fixed-point format switches to scientific notation.
_SMALL = 1e-3
_LARGE = 1e6
#: Text that reads as a number, possibly with a spread or a bracketed number: "0.744 ± 0.059", "0.000 (0.000)".
_NUMERIC_TEXT = re.compile(r"^[-+\u2212]?(\d[\d.,]*(e[-+]?\d+)?)( ± [\d.]+(e[-+]?\d+)?)?( \([-+]?[\d.]+\))?$")
_FIXED = re.compile(r"^\{:[^{}]*\.(\d+)f\}$")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Modes PNG can store as they are; anything else is converted to RGB(A) first.
_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})


def format_value(value: Any, numeric_format: str = "{:.3f}") -> str:
    """Format one table or meta cell as plain (unescaped) text.

    ``None`` is shown as an em dash, booleans (also numpy's) as ``yes``/``no``, integers
    as they are, other real numbers (Python or numpy floats) with ``numeric_format``, except
    that a fixed-point format (``"{:.Nf}"``) switches to scientific notation with two
    significant digits (``"{:.1e}"``) for ``0 < |x| < max(0.001, 10^-N)`` and ``|x| >= 1e6``,
    so a small error never prints as ``0.000`` (``5e-7`` -> ``"5.0e-07"``); anything else
    with ``str``.
    """
    if value is None:
        return "\u2014"
    if isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", None) == "b":
        return "yes" if bool(value) else "no"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        x = float(value)
        fixed = _FIXED.match(numeric_format)
        if fixed and math.isfinite(x) and x != 0.0:
            small = max(_SMALL, 10.0 ** -int(fixed.group(1)))
            if abs(x) < small or abs(x) >= _LARGE:
                return f"{x:.1e}"
        return numeric_format.format(x)
    return str(value)


def _is_number(value: Any) -> bool:
    """Whether a cell is numeric (right-aligned), booleans excluded."""
    if isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", None) == "b":
        return False
    return isinstance(value, numbers.Real)


def png_from_pil(image: Any) -> bytes:
    """Encode a PIL image as PNG bytes, converting modes PNG cannot store (CMYK, F, ...)."""
    if image.mode not in _PNG_MODES:
        has_alpha = "A" in image.getbands()
        image = image.convert("RGBA" if has_alpha else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- document model


@dataclass
class Table:
    """A table of values with a header row.

    Args:
        columns: Column headers.
        rows: One list per row, each as long as ``columns``. Cells are formatted by
            :func:`format_value`: floats with ``numeric_format``, ``None`` as "—",
            booleans as yes/no; numeric cells are right-aligned.
        caption: Optional caption shown above the table.
        numeric_format: ``str.format`` pattern for real numbers.
    """

    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""
    numeric_format: str = "{:.3f}"

    def __post_init__(self) -> None:
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(f"Table row {i} has {len(row)} cells, expected {len(self.columns)} (one per column)")

    def cells(self) -> list[list[tuple[str, bool]]]:
        """Every row as ``(text, right-aligned)`` cells, the text from :func:`format_value`.

        Numbers are right-aligned; so is every cell of a column whose cells are all numbers,
        numeric text (``"0.744 ± 0.059"``, ``"0.000 (0.000)"``) or empty (``None``), so that
        the digits of a column line up.
        """
        texts = [[format_value(v, self.numeric_format) for v in row] for row in self.rows]
        numeric_columns = [
            any(_is_number(row[j]) or _NUMERIC_TEXT.match(str(row[j])) for row in self.rows)
            and all(row[j] is None or _is_number(row[j]) or _NUMERIC_TEXT.match(str(row[j])) for row in self.rows)
            for j in range(len(self.columns))
        ]
        return [[(text, _is_number(v) or numeric_columns[j]) for j, (text, v) in enumerate(zip(trow, row))]
                for trow, row in zip(texts, self.rows)]

    def render(self) -> str:
        """HTML of the table (wrapped in a horizontally scrollable div), from the ``table`` macro."""
        return str(_macros().table(self))


@dataclass
class Figure:
    """One embedded image with an optional caption.

    Args:
        png: The encoded image bytes: PNG unless ``mime`` says otherwise (see
            :meth:`from_svg`). Embedded as a ``data:`` URI, never linked.
        caption: Optional caption shown under the image.
        alt: Alternative text; the caption is used when empty.
        width: Display width in CSS pixels (the image never overflows the page).
        mime: MIME type of ``png``: ``image/png`` or ``image/svg+xml``.
    """

    png: bytes
    caption: str = ""
    alt: str = ""
    width: int | None = None
    mime: str = "image/png"

    def __post_init__(self) -> None:
        if self.mime == "image/png" and not bytes(self.png).startswith(_PNG_SIGNATURE):
            raise ValueError("Figure.png is not PNG data; use Figure.from_pil(image) or Figure.from_svg(text)")
        if self.mime not in ("image/png", "image/svg+xml"):
            raise ValueError(f"unsupported Figure mime {self.mime!r}; expected 'image/png' or 'image/svg+xml'")
        if self.width is not None and self.width <= 0:
            raise ValueError(f"Figure width must be positive, got {self.width}")

    @classmethod
    def from_pil(cls, image: Any, caption: str = "", alt: str = "", width: int | None = None) -> Figure:
        """A figure from a PIL image, encoded losslessly as PNG.

        Modes PNG cannot store (CMYK, F, ...) are converted to RGB(A). A uint8 numpy array
        (HxW or HxWxC) is accepted too and goes through ``PIL.Image.fromarray``.
        """
        if not hasattr(image, "save"):
            from PIL import Image

            image = Image.fromarray(image)
        return cls(png_from_pil(image), caption=caption, alt=alt, width=width)

    @classmethod
    def from_svg(cls, svg_text: str, caption: str = "", alt: str = "", width: int | None = None) -> Figure:
        """A figure from SVG text (e.g. :func:`vitdecomp.report.figures.bar_chart`).

        The SVG is embedded as an ``<img>`` with a base64 ``data:image/svg+xml`` URI, so
        it cannot run scripts or load anything, and its markup cannot break the page.
        """
        if "<svg" not in svg_text:
            raise ValueError("Figure.from_svg expects SVG text containing an <svg> element")
        return cls(svg_text.encode("utf-8"), caption=caption, alt=alt, width=width, mime="image/svg+xml")

    @property
    def data_uri(self) -> str:
        """The image as a ``data:`` URI."""
        return f"data:{self.mime};base64,{base64.b64encode(bytes(self.png)).decode('ascii')}"

    def img_tag(self) -> str:
        """The ``<img>`` element alone."""
        return str(_macros().img(self))

    def render(self, css_class: str = "figure") -> str:
        """HTML of the figure: ``<figure>`` with the image and its caption."""
        return str(_macros().figure(self, css_class))


@dataclass
class Grid:
    """A CSS grid of small captioned images, e.g. retrieval results or heatmaps.

    Args:
        figures: The tiles, in reading order; each figure's caption is shown under it.
        columns: Tiles per row, on every screen width (tiles shrink to fit).
        caption: Optional caption under the whole grid.
    """

    figures: list[Figure]
    columns: int = 4
    caption: str = ""

    def __post_init__(self) -> None:
        if self.columns < 1:
            raise ValueError(f"Grid columns must be >= 1, got {self.columns}")

    def render(self) -> str:
        """HTML of the grid."""
        return str(_macros().grid(self))


Item = Union[Table, Figure, Grid, str]


@dataclass
class Section:
    """A titled section, linked from the table of contents.

    Args:
        id: Anchor id (unique within the report), e.g. ``"heads"``; the TOC links ``#id``.
        title: Heading text.
        paragraphs: Paragraphs shown first, as plain escaped text.
        items: Then, in order: tables, figures, grids and ``str`` paragraphs.
    """

    id: str
    title: str
    paragraphs: list[str] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.id or any(ch.isspace() for ch in self.id):
            raise ValueError(f"Section id must be non-empty without whitespace, got {self.id!r}")

    def blocks(self) -> list[tuple[str, Any]]:
        """``(kind, item)`` in page order: the paragraphs, then the items; kind is ``"paragraph"``,
        ``"table"``, ``"figure"`` or ``"grid"``.

        Raises:
            TypeError: an item of another type.
        """
        out: list[tuple[str, Any]] = [("paragraph", p) for p in self.paragraphs]
        for item in self.items:
            if isinstance(item, str):
                out.append(("paragraph", item))
            elif isinstance(item, (Table, Figure, Grid)):
                out.append((type(item).__name__.lower(), item))
            else:
                kind = type(item).__name__
                raise TypeError(f"Section {self.id!r}: unsupported item {kind}; expected Table, Figure, Grid or str")
        return out

    def render(self) -> str:
        """HTML of the section."""
        return str(_macros().section(self))


@functools.lru_cache(maxsize=1)
def _environment() -> Any:
    """The Jinja2 environment of the shipped templates (autoescaping everything, undefined names fail)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.globals.update(meta_rows=_meta_rows, conventions=NUMBER_CONVENTION)
    return env


def _macros() -> Any:
    """The item macros (``table``, ``img``, ``figure``, ``grid``, ``section``) of ``items.html.j2``."""
    return _environment().get_template("items.html.j2").module


def _meta_rows(report: Report) -> list[tuple[str, str]]:
    return [(str(key), format_value(value, "{:.6g}")) for key, value in report.meta.items()]


@dataclass
class Report:
    """A whole report: title, optional subtitle, sections and a footer of run metadata.

    Args:
        title: Page title and main heading.
        subtitle: Optional line under the heading.
        sections: The sections, in order; each gets a table-of-contents entry.
        meta: Key/value facts (model, versions, config hash, ...) shown in the footer.
    """

    title: str
    subtitle: str = ""
    sections: list[Section] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def render(self) -> str:
        """The report as one self-contained HTML5 document, from ``templates/report.html.j2``.

        Raises:
            ValueError: Two sections share an id.
        """
        seen: set[str] = set()
        for section in self.sections:
            if section.id in seen:
                raise ValueError(f"duplicate section id {section.id!r}")
            seen.add(section.id)
        return _environment().get_template("report.html.j2").render(report=self)

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Render and write the report atomically (temp file in the same folder + ``os.replace``).

        Readers never see a half-written file, and no temp file is left behind, also on
        error. The parent folder is created if needed. The file is UTF-8.

        Returns:
            The path written.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.render().encode("utf-8")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        # os.open with 0o666 respects the umask, unlike tempfile's private 0o600 files.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path


# --------------------------------------------------------------------------- checking

#: Elements that never have an end tag.
_VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track", "wbr"}
)
#: Attributes through which a browser would fetch something (plus ``data`` on ``<object>``).
_RESOURCE_ATTRS = frozenset({"src", "srcset", "poster", "background"})
_CSS_URL = re.compile(r"url\(\s*(['\"]?)\s*([^'\")\s]*)", re.IGNORECASE)
_CSS_IMPORT = re.compile(r"@import\b", re.IGNORECASE)


def _is_data_uri(value: str | None) -> bool:
    return value is not None and value.strip().lower().startswith("data:")


class _Checker(HTMLParser):
    """Collects the problems :func:`check_html` reports."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.problems: list[str] = []
        self.stack: list[tuple[str, int]] = []
        self.counts: dict[str, int] = {"html": 0, "head": 0, "body": 0, "title": 0}
        self.ids: dict[str, int] = {}
        self.links: list[tuple[str, int]] = []
        self.doctype = False
        self.charset = False
        self.in_style = False

    def _problem(self, message: str) -> None:
        self.problems.append(f"line {self.getpos()[0]}: {message}")

    def handle_decl(self, decl: str) -> None:
        if decl.strip().lower() == "doctype html":
            self.doctype = True

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._element(tag, attrs)
        if tag not in _VOID:
            self.stack.append((tag, self.getpos()[0]))
        if tag == "style":
            self.in_style = True

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._element(tag, attrs)  # <x/>: opened and closed at once

    def handle_endtag(self, tag: str) -> None:
        if tag == "style":
            self.in_style = False
        if tag in _VOID:
            return
        if not any(open_tag == tag for open_tag, _ in self.stack):
            self._problem(f"</{tag}> closes nothing")
            return
        while self.stack:
            open_tag, line = self.stack.pop()
            if open_tag == tag:
                break
            self._problem(f"<{open_tag}> opened on line {line} is not closed before </{tag}>")

    def handle_data(self, data: str) -> None:
        if self.in_style:
            self._check_css(data, "<style>")

    def _check_css(self, css: str, where: str) -> None:
        for match in _CSS_URL.finditer(css):
            if not _is_data_uri(match.group(2)):
                self._problem(f"external resource url({match.group(2)}) in {where}")
        if _CSS_IMPORT.search(css):
            self._problem(f"@import in {where} loads an external stylesheet")

    def _element(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.counts:
            self.counts[tag] += 1
        values = dict(attrs)
        if tag == "meta" and (values.get("charset") or "").strip().lower() == "utf-8":
            self.charset = True
        if tag == "img" and not values.get("src"):
            self._problem("<img> without src")
        for name, value in attrs:
            if name in _RESOURCE_ATTRS or (tag == "object" and name == "data"):
                if value is not None and not _is_data_uri(value):
                    self._problem(f"<{tag} {name}={value!r}> is not a data: URI (external resource)")
            elif name == "href" and tag == "link" and not _is_data_uri(value):
                self._problem(f"<link href={value!r}> loads an external resource")
            elif name == "style" and value:
                self._check_css(value, f"<{tag} style>")
            elif name == "id":
                if not value:
                    self._problem(f"<{tag}> with an empty id")
                elif value in self.ids:
                    self._problem(f"duplicate id {value!r} (first on line {self.ids[value]})")
                else:
                    self.ids[value] = self.getpos()[0]
            elif name == "name" and tag == "a" and value:
                self.ids.setdefault(value, self.getpos()[0])
            if name == "href" and value is not None and value.startswith("#") and len(value) > 1:
                self.links.append((unquote(value[1:]), self.getpos()[0]))
        if tag == "script" and "src" in values:
            self._problem("<script src=...> loads an external script")


def check_html(text: str) -> list[str]:
    """Browser-free well-formedness and self-containedness check of a whole HTML document.

    Problems reported (each as ``"line N: ..."``, except the whole-document ones):

    * tags not balanced: every non-void element closed, in order (stricter than HTML5,
      which lets ``</p>``, ``</li>``, ``</td>`` ... be omitted; ``<x/>`` counts as opened
      and closed);
    * not exactly one ``<html>``, ``<head>``, ``<body>`` and ``<title>``; no
      ``<!DOCTYPE html>``; no ``<meta charset="utf-8">``;
    * external resources: an ``<img>`` whose ``src`` is not a ``data:`` URI (or missing),
      any ``src``/``srcset``/``poster``/``data`` attribute not a ``data:`` URI (so
      ``<script src=...>``, ``<iframe src=...>``), ``<link href=...>``, and CSS ``url(...)``
      other than ``data:`` or ``@import`` in ``<style>`` or ``style=""``;
    * duplicate or empty ids;
    * in-page links ``href="#x"`` with no element ``id="x"`` (or ``<a name="x">``).

    Args:
        text: The document.

    Returns:
        The problems found; an empty list means the document passed.
    """
    checker = _Checker()
    checker.feed(text)
    checker.close()
    problems = checker.problems
    for tag, line in checker.stack:
        problems.append(f"line {line}: <{tag}> is never closed")
    for tag, count in checker.counts.items():
        if count != 1:
            problems.append(f"expected exactly one <{tag}>, found {count}")
    if not checker.doctype:
        problems.append("missing <!DOCTYPE html>")
    if not checker.charset:
        problems.append('missing <meta charset="utf-8">')
    for target, line in checker.links:
        if target not in checker.ids:
            problems.append(f'line {line}: link to "#{target}" has no target id')
    return problems
