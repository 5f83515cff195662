"""Finding and reading image files, skipping (and reporting) the ones that cannot be used.

A file is skipped, with its reason, when PIL cannot identify it, when decoding fails
(truncated or corrupt data), or when it is smaller than :data:`MIN_SIDE` pixels on a side.
Nothing else stops a run.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = ["IMAGE_SUFFIXES", "MIN_SIDE", "find_images", "load_image", "ImageBatch", "iter_image_batches"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
MIN_SIDE = 8


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


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image as RGB.

    Raises:
        InputError: unreadable, corrupt or truncated file, or smaller than MIN_SIDE pixels.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            image = im.convert("RGB")
    except UnidentifiedImageError as exc:
        raise InputError(f"{path}: not an image PIL can read") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: corrupt or truncated image ({exc})") from exc
    if min(image.size) < MIN_SIDE:
        raise InputError(f"{path}: image is {image.size[0]}x{image.size[1]}, smaller than {MIN_SIDE} px")
    return image


@dataclass
class ImageBatch:
    """One batch of preprocessed images and the files skipped while reading it."""

    paths: list[Path]
    pixels: torch.Tensor | None
    skipped: dict[str, str] = field(default_factory=dict)


def iter_image_batches(
    paths: Sequence[Path], transform: Callable[[Any], torch.Tensor], batch_size: int
) -> Iterator[ImageBatch]:
    """Read ``paths`` in order, ``batch_size`` at a time; unusable files are skipped and reported."""
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
                log.warning("skipping %s", exc)
                skipped[str(path)] = str(exc)
        yield ImageBatch(good, torch.stack(tensors) if tensors else None, skipped)
