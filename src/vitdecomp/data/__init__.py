"""Readers that turn files into model inputs.

* :mod:`vitdecomp.data.images`: find and decode single image files (skipping unusable ones).
* :mod:`vitdecomp.data.datasets`: dataset readers for dataset-scale runs, all
  :class:`~vitdecomp.data.datasets.ImageSource` s: :class:`ImageFolder`, :class:`ImageNetVal`,
  :class:`Waterbirds`, :class:`ImageNetSegmentation` (needs ``h5py``, extra ``datasets``);
  :func:`open_dataset` detects the kind, :func:`load_batch` / :func:`iter_batches` produce
  :class:`DatasetBatch` es (one per store chunk, optionally decoded in DataLoader workers).

The names below are re-exported lazily, so ``import vitdecomp.data`` stays light.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "images": ("IMAGE_SUFFIXES", "MIN_SIDE", "MAX_PIXELS", "UnusableImageError", "find_images", "load_image",
               "check_image_size", "skip_reason", "record_skip", "ImageBatch", "iter_image_batches"),
    "datasets": ("ImageSource", "ImageSourceBase", "ImageFolder", "ImageNetVal", "Waterbirds",
                 "ImageNetSegmentation", "DatasetBatch", "load_batch", "iter_batches", "chunk_rows",
                 "open_dataset", "KINDS"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
