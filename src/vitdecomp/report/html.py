"""Self-contained HTML reports: a tiny document model, a renderer and a well-formedness check.

Standard library only (PIL is imported inside :meth:`Figure.from_pil`, when needed). A report is one
HTML5 file that opens from disk with no network and no JavaScript: styles are inline, and
every image is embedded as a ``data:`` URI (PNG, or SVG for charts).

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
import html
import io
import numbers
import os
import re
import secrets
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Union
from urllib.parse import unquote

__all__ = ["Table", "Figure", "Grid", "Section", "Report", "check_html", "format_value"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Modes PNG can store as they are; anything else is converted to RGB(A) first.
_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})


def _esc(text: object) -> str:
    """HTML-escape ``text`` (as ``str``) for element content and quoted attribute values."""
    return html.escape(str(text), quote=True)


def format_value(value: Any, numeric_format: str = "{:.3f}") -> str:
    """Format one table or meta cell as plain (unescaped) text.

    ``None`` is shown as an em dash, booleans (also numpy's) as ``yes``/``no``, integers
    as they are, other real numbers (Python or numpy floats) with ``numeric_format``;
    anything else with ``str``.
    """
    if value is None:
        return "\u2014"
    if isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", None) == "b":
        return "yes" if bool(value) else "no"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return numeric_format.format(float(value))
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

    def render(self) -> str:
        """HTML of the table (wrapped in a horizontally scrollable div)."""
        out = ['<div class="table-wrap">', "<table>"]
        if self.caption:
            out.append(f"<caption>{_esc(self.caption)}</caption>")
        out.append("<thead><tr>" + "".join(f'<th scope="col">{_esc(c)}</th>' for c in self.columns) + "</tr></thead>")
        out.append("<tbody>")
        for row in self.rows:
            cells = []
            for value in row:
                cls = ' class="num"' if _is_number(value) else ""
                cells.append(f"<td{cls}>{_esc(format_value(value, self.numeric_format))}</td>")
            out.append("<tr>" + "".join(cells) + "</tr>")
        out.append("</tbody>")
        out.append("</table>")
        out.append("</div>")
        return "\n".join(out)


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
        width = f' width="{int(self.width)}"' if self.width is not None else ""
        return f'<img src="{self.data_uri}" alt="{_esc(self.alt or self.caption)}"{width}>'

    def render(self, css_class: str = "figure") -> str:
        """HTML of the figure: ``<figure>`` with the image and its caption."""
        caption = f"<figcaption>{_esc(self.caption)}</figcaption>" if self.caption else ""
        return f'<figure class="{css_class}">{self.img_tag()}{caption}</figure>'


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
        style = f"grid-template-columns: repeat({int(self.columns)}, minmax(0, 1fr))"
        tiles = "\n".join(fig.render("tile") for fig in self.figures)
        caption = f"<figcaption>{_esc(self.caption)}</figcaption>" if self.caption else ""
        return f'<figure class="grid">\n<div class="grid-items" style="{style}">\n{tiles}\n</div>{caption}</figure>'


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

    def render(self) -> str:
        """HTML of the section."""
        out = [f'<section id="{_esc(self.id)}">', f"<h2>{_esc(self.title)}</h2>"]
        out.extend(f"<p>{_esc(p)}</p>" for p in self.paragraphs)
        for item in self.items:
            if isinstance(item, str):
                out.append(f"<p>{_esc(item)}</p>")
            elif isinstance(item, (Table, Figure, Grid)):
                out.append(item.render())
            else:
                kind = type(item).__name__
                raise TypeError(f"Section {self.id!r}: unsupported item {kind}; expected Table, Figure, Grid or str")
        out.append("</section>")
        return "\n".join(out)


_CSS = """
:root { color-scheme: light; --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --zebra: #f6f8fa; --accent: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
  font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
.page { max-width: 1100px; margin: 0 auto; padding: 2rem 1.5rem 3rem; }
header h1 { margin: 0 0 .25rem; font-size: 1.9rem; line-height: 1.2; }
.subtitle { margin: 0; color: var(--muted); font-size: 1.1rem; }
h2 { margin: 2.5rem 0 .75rem; padding-bottom: .3rem; border-bottom: 1px solid var(--line); font-size: 1.4rem; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
nav.toc { margin: 1.5rem 0; padding: .75rem 1.25rem; background: var(--zebra);
  border: 1px solid var(--line); border-radius: 6px; }
nav.toc h2 { margin: 0 0 .25rem; border: 0; font-size: 1rem; }
nav.toc ol { margin: 0; padding-left: 1.5rem; }
.table-wrap { overflow-x: auto; margin: 1rem 0; }
table { border-collapse: collapse; font-size: .92rem; }
caption { caption-side: top; text-align: left; color: var(--muted); padding: .25rem 0; }
th, td { padding: .3rem .75rem; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
thead th { border-bottom: 2px solid var(--line); }
tbody tr:nth-child(even) { background: var(--zebra); }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; }
figcaption { color: var(--muted); font-size: .9rem; margin-top: .3rem; }
.grid-items { display: grid; gap: .75rem; }
figure.tile { margin: 0; text-align: center; }
figure.tile img { width: 100%; image-rendering: pixelated; border: 1px solid var(--line); }
figure.tile figcaption { font-size: .8rem; overflow-wrap: anywhere; }
footer { margin-top: 3rem; padding-top: 1rem; border-top: 1px solid var(--line);
  color: var(--muted); font-size: .8rem; }
footer table { font-size: .8rem; }
footer th { font-weight: 600; }
""".strip()


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
        """The report as one self-contained HTML5 document.

        Raises:
            ValueError: Two sections share an id.
        """
        seen: set[str] = set()
        for section in self.sections:
            if section.id in seen:
                raise ValueError(f"duplicate section id {section.id!r}")
            seen.add(section.id)
        out = [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_esc(self.title)}</title>",
            f"<style>\n{_CSS}\n</style>",
            "</head>",
            "<body>",
            '<div class="page">',
            "<header>",
            f"<h1>{_esc(self.title)}</h1>",
        ]
        if self.subtitle:
            out.append(f'<p class="subtitle">{_esc(self.subtitle)}</p>')
        out.append("</header>")
        if self.sections:
            out.append('<nav class="toc" aria-label="Contents">')
            out.append("<h2>Contents</h2>")
            out.append("<ol>")
            out.extend(f'<li><a href="#{_esc(s.id)}">{_esc(s.title)}</a></li>' for s in self.sections)
            out.append("</ol>")
            out.append("</nav>")
        out.append("<main>")
        out.extend(section.render() for section in self.sections)
        out.append("</main>")
        if self.meta:
            out.append("<footer>")
            out.append('<table class="meta">')
            out.append("<tbody>")
            for key, value in self.meta.items():
                out.append(f'<tr><th scope="row">{_esc(key)}</th><td>{_esc(format_value(value, "{:.6g}"))}</td></tr>')
            out.append("</tbody>")
            out.append("</table>")
            out.append("</footer>")
        out += ["</div>", "</body>", "</html>", ""]
        return "\n".join(out)

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
