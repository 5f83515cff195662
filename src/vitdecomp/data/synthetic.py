"""Readers of the synthetic world's on-disk layout (written by ``vitdecomp synth generate``).

The layout (see :mod:`vitdecomp.synth.dataset`, which writes it)::

    {split}/{class}/{id}.png    one ImageFolder root per split
    masks/{id}_{k}.png          exact mask of object k: 8-bit grey, 0 or 255
    factors.csv                 one row per image (id, file, split, class, every factor, masks, caption)
    task.json                   the task in the world's own words (class texts, core/spurious texts)
    classes.txt                 line k names target k

Readers live here, below the applications that read a generated world (segmentation pairs,
debias defaults); the generator that writes it lives in :mod:`vitdecomp.synth`.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

__all__ = ["SPLITS", "FORMAT", "TASK_FILE", "TASK_FORMAT", "CLASSES_FILE", "read_task", "read_factors", "read_masks"]

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: ``summary.json`` format of a generated dataset
FORMAT = {"name": "vitdecomp-synth", "version": 1}
TASK_FILE = "task.json"
#: line k names target k in the world's words (``a red object``)
CLASSES_FILE = "classes.txt"
TASK_FORMAT = {"name": "vitdecomp-synth-task", "version": 1}


def read_task(root: str | Path) -> dict[str, Any] | None:
    """The task of the generated dataset at ``root`` (as :func:`vitdecomp.synth.dataset.task_description` wrote it), or None for any other folder.

    Reads ``root/task.json`` (datasets generated before that file existed: generate them again,
    the same arguments give byte-identical files).

    Raises:
        InputError: a ``task.json`` that is not valid JSON or not a task description.
    """
    base = Path(root)
    path = base / TASK_FILE
    if path.is_file():
        try:
            task = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: not a readable task description: {exc}") from exc
        fmt = task.get("format") if isinstance(task, dict) else None
        if not isinstance(fmt, dict) or fmt.get("name") != TASK_FORMAT["name"]:
            raise InputError(f"{path}: not a vitdecomp synthetic task description (format {fmt!r})")
        classes, texts = task.get("classes"), task.get("class_texts")
        if (not isinstance(classes, list) or not isinstance(texts, list) or len(classes) != len(texts)
                or len(classes) < 2
                or not all(isinstance(t, list) and t and all(isinstance(x, str) for x in t) for t in texts)):
            raise InputError(f"{path}: 'classes' and 'class_texts' must be lists of the same length (>= 2), "
                             "one non-empty list of texts per class")
        return task
    return None


def read_factors(root: str | Path) -> list[dict[str, str]]:
    """Rows of ``root/factors.csv`` as dicts of strings (``Scene.from_factors(row)`` rebuilds the scene)."""
    path = Path(root) / "factors.csv"
    if not path.is_file():
        raise InputError(f"{path} not found: not a dataset written by generate_dataset")
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def read_masks(root: str | Path, row: Mapping[str, str]) -> list[np.ndarray]:
    """The object masks of one ``factors.csv`` row: bool ``[H, W]`` each, in object order."""
    from PIL import Image

    masks = []
    for rel in filter(None, row["masks"].split(";")):
        with Image.open(Path(root) / rel) as im:
            masks.append(np.asarray(im.convert("L")) > 127)
    return masks
