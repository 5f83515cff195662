"""Finding and reading image files, skipping (and reporting) the ones that cannot be used.

Every command that reads image files (``decompose``, ``heatmap``, ``segment``, ``demo``, dataset
runs) reads them with :func:`load_image`, so the same files are skipped everywhere, with the
same one-line reason. A file is skipped when

* it cannot be read (missing, no permission);
* PIL cannot identify it as an image;
* decoding fails (truncated or corrupt data);
* it is smaller than :data:`MIN_SIDE` pixels on a side (e.g. a 1x1 tracking pixel);
* its header declares more than :data:`MAX_PIXELS` pixels (a decompression bomb, or a scan far
  larger than any model input): it is refused before anything is decoded.

Nothing else stops a run. The reason recorded for a skipped file is :func:`skip_reason` of the
error (the text without the file name, which is the key it is recorded under) and the log line
is ``skipping NAME: REASON`` (:func:`record_skip`).
"""
from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = [
    "IMAGE_SUFFIXES", "MIN_SIDE", "MAX_PIXELS", "UnusableImageError", "find_images", "load_image",
    "check_image_size", "skip_reason", "record_skip", "ImageBatch", "iter_image_batches",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
#: Smallest accepted side, in pixels.
MIN_SIDE = 8
#: Largest accepted image, in pixels (width x height, read from the file header before decoding):
#: 100 megapixels, about PIL's own decompression-bomb threshold (89.5 MP warns, 179 MP fails) and
#: 1,000 times a 320 x 320 model input. Decoding one takes ~300 MB as RGB. Override per call with
#: ``load_image(..., max_pixels=N)`` (None: no limit).
MAX_PIXELS = 100_000_000

_PIL_LIMIT_LOCK = threading.Lock()


class UnusableImageError(InputError):
    """An image file (or item) the shared skip rules refuse.

    Attributes:
        name: the file (or dataset item id) it is about.
        reason: one line saying why, without the name (what a skip is recorded with).
    """

    def __init__(self, name: str | Path, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = str(name)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across DataLoader workers
        return (type(self), (self.name, self.reason))


def skip_reason(exc: BaseException, name: str | Path | None = None) -> str:
    """The one-line reason recorded for a skipped file or item.

    ``exc.reason`` for an :class:`UnusableImageError`; else the message, without a leading
    ``"NAME: "`` when ``name`` is given (the name is the key the reason is recorded under).
    """
    if isinstance(exc, UnusableImageError):
        return exc.reason
    text = str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
    if name is not None:
        text = text.removeprefix(f"{name}: ")
    return text


def record_skip(skipped: dict[str, str], name: str | Path, exc: BaseException) -> str:
    """Log ``skipping NAME: REASON`` once and record ``skipped[NAME] = REASON``; returns the reason."""
    reason = skip_reason(exc, name)
    log.warning("skipping %s: %s", name, reason)
    skipped[str(name)] = reason
    return reason


def check_image_size(
    size: tuple[int, int],
    name: str | Path,
    *,
    min_side: int = MIN_SIDE,
    max_pixels: int | None = MAX_PIXELS,
) -> None:
    """Apply the size rules to an image of ``size = (width, height)``.

    Raises:
        UnusableImageError: a side below ``min_side``, or more than ``max_pixels`` pixels.
    """
    width, height = int(size[0]), int(size[1])
    if min(width, height) < min_side:
        raise UnusableImageError(name, f"image is {width}x{height}, smaller than {min_side} px on a side")
    if max_pixels is not None and width * height > max_pixels:
        raise UnusableImageError(name, _too_large(width * height, max_pixels, f"{width}x{height}"))


def _too_large(pixels: int, max_pixels: int, size: str) -> str:
    """The one wording of "too large"."""
    return f"image is {size} = {pixels / 1e6:.1f} megapixels, above the limit of {max_pixels / 1e6:g} megapixels"


def find_images(paths: Iterable[str | Path]) -> list[Path]:
    """Image files named directly or found (recursively) under directories, in sorted order.

    Raises:
        InputError: a path that does not exist.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise InputError(f"no such file or directory: {path}")
    return found


def load_image(
    path: str | Path,
    *,
    min_side: int = MIN_SIDE,
    max_pixels: int | None = MAX_PIXELS,
) -> Image.Image:
    """Open and fully decode an image as RGB, applying the shared skip rules (module docs).

    The size is checked from the header, before decoding, so an over-large file costs nothing;
    PIL's own ``DecompressionBombWarning`` / ``DecompressionBombError`` never reach the caller.

    Args:
        path: the image file.
        min_side: smallest accepted side in pixels (default :data:`MIN_SIDE`).
        max_pixels: largest accepted ``width * height`` (default :data:`MAX_PIXELS`; None: no limit).

    Raises:
        UnusableImageError: unreadable, not an image, corrupt or truncated, too small or too large
            (an :class:`~vitdecomp.errors.InputError`; ``exc.reason`` is the line to record).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _open(path) as im:
                check_image_size(im.size, path, min_side=min_side, max_pixels=max_pixels)
                im.load()
                image = im.convert("RGB")
    except UnusableImageError:
        raise
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise UnusableImageError(path, f"cannot read the file ({exc.strerror or exc})") from exc
    except UnidentifiedImageError as exc:
        raise UnusableImageError(path, "not an image file PIL can read") from exc
    except Image.DecompressionBombError as exc:  # a plugin checking again while decoding (max_pixels above PIL's)
        raise UnusableImageError(path, f"image is too large for PIL to decode ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnusableImageError(path, f"corrupt or truncated image ({exc})") from exc
    return image


def _open(path: str | Path) -> Image.Image:
    """``Image.open`` (header only, nothing decoded) without PIL's hard decompression-bomb limit, so
    that the caller applies its own ``max_pixels`` to the declared size, with the size in the reason."""
    from PIL import Image

    try:
        return Image.open(path)
    except Image.DecompressionBombError:
        with _PIL_LIMIT_LOCK:  # PIL reads its limit from a module global: off for this one open only
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                return Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved


@dataclass
class ImageBatch:
    """One batch of preprocessed images and the files skipped while reading it."""

    paths: list[Path]
    pixels: torch.Tensor | None
    skipped: dict[str, str] = field(default_factory=dict)


def iter_image_batches(
    paths: Sequence[Path], transform: Callable[[Any], torch.Tensor], batch_size: int
) -> Iterator[ImageBatch]:
    """Read ``paths`` in order, ``batch_size`` at a time, with :func:`load_image`; unusable files are
    skipped and reported (``ImageBatch.skipped``: ``{path: reason}``)."""
    import torch

    if batch_size < 1:
        raise InputError("batch size must be at least 1")
    for start in range(0, len(paths), batch_size):
        good: list[Path] = []
        tensors: list[torch.Tensor] = []
        skipped: dict[str, str] = {}
        for path in paths[start : start + batch_size]:
            try:
                tensors.append(transform(load_image(path)))
                good.append(path)
            except InputError as exc:
                record_skip(skipped, path, exc)
        yield ImageBatch(good, torch.stack(tensors) if tensors else None, skipped)
