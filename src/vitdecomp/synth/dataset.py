"""Write the synthetic world to disk as datasets the project's readers understand.

Layout of ``out_dir`` written by :func:`generate_dataset`::

    train/<class>/<id>.png      one folder per split; each is an ImageFolder root
    val/<class>/<id>.png        (label = index of <class> in sorted class names)
    test/<class>/<id>.png
    masks/<id>_<k>.png          exact mask of object k of image <id>: 8-bit grey, 0 or 255
    factors.csv                 one row per image: id, file, split, class, label, every factor, caption
    metadata.csv                spurious variant only: Waterbirds columns, so out_dir is a Waterbirds root
    summary.json                arguments and counts per split / class / background (/ group)
    task.json                   what the task is, in the world's own words (:func:`task_description`): the
                                class factor, each class's values and their describe() texts, the core and
                                spurious (background) texts and the template set; read by ``vitdecomp debias``
                                (its default texts) and ``vitdecomp segment --pairs`` (its default classes)
    classes.txt                 line k names target k in the world's words (``a red object``): the
                                ``--classes`` file of ``vitdecomp ablate`` / ``align`` / ``label --evaluate``

``open_dataset(out_dir / "train")`` reads a split as an ImageFolder; for the spurious variant
``open_dataset(out_dir)`` reads everything as Waterbirds (``split=`` selects one), with
``y`` = class (0 ``landobject``, 1 ``waterobject``) and ``place`` = background (0 land, 1 water).
``vitdecomp segment --pairs out_dir`` reads the images with the union of their object masks
(:class:`vitdecomp.apps.segmentation.harness.SegmentationPairs`, ``split=`` selects one split).
Ids are zero-padded global indices (train first, then val, then test). The same arguments give
byte-identical files: every item is drawn from its own generator ``default_rng([seed, 0, index])``
and PNGs are written without timestamps.
"""
from __future__ import annotations

import csv
import json
import logging
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data.synthetic import (  # the readers of this layout live with the other readers
    CLASSES_FILE,
    FORMAT,
    SPLITS,
    TASK_FILE,
    TASK_FORMAT,
    read_factors,
    read_masks,
    read_task,
)
from ..errors import InputError
from .generator import (
    OBJECT_FACTORS,
    VOCABULARY,
    Scene,
    check_value as _check_value,
    canonical_factor as _factor,
    pick as _pick,
    caption,
    render_array,
    sample_scene,
)

__all__ = ["SPLITS", "SPURIOUS_CLASSES", "SPURIOUS_GROUPS", "PLACES", "FORMAT", "TASK_FILE", "CLASSES_FILE", "TASK_FORMAT",
           "generate_dataset", "task_description", "read_task", "read_factors", "read_masks"]

log = logging.getLogger(__name__)

#: Split names, in Waterbirds order (split code 0, 1, 2).
#: Class names of the spurious variant, y = 0 and y = 1 (sorted, so ImageFolder labels equal y).
SPURIOUS_CLASSES: tuple[str, str] = ("landobject", "waterobject")
#: Background of each Waterbirds place code (0 land, 1 water).
PLACES: tuple[str, str] = ("land", "water")
#: Default values of the task factor that make up class y = 0 and y = 1 in the spurious variant.
SPURIOUS_GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "shape": (("square", "cross", "star"), ("circle", "triangle")),
    "colour": (("red", "orange", "yellow"), ("green", "blue", "purple", "white")),
    "pattern": (("solid", "dotted"), ("striped", "checkered")),
    "size": (("small",), ("large",)),
}
#: The task sidecar of a generated dataset (:func:`task_description`) and its format tag.
#: Template set of the world's texts (:data:`vitdecomp.interpret.text.templates.TEMPLATES`): describe() phrases carry
#: their article, so the templates add none.
TASK_TEMPLATES = "synth"
_OUTPUTS = (*SPLITS, "masks", "factors.csv", "metadata.csv", "summary.json", TASK_FILE, CLASSES_FILE)


def _split_counts(n: int, splits: Sequence[float] | Sequence[int]) -> list[int]:
    """Items per split: 3 fractions summing to 1 (val and test rounded, train the rest) or 3 ints summing to n."""
    if len(splits) != 3:
        raise InputError(f"splits needs 3 entries (train, val, test), got {len(splits)}")
    if all(isinstance(s, (int, np.integer)) for s in splits):
        counts = [int(s) for s in splits]
        if sum(counts) != n or min(counts) < 0:
            raise InputError(f"split sizes {counts} must be non-negative and sum to n={n}")
        return counts
    fractions = [float(s) for s in splits]
    if min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise InputError(f"split fractions {fractions} must be non-negative and sum to 1")
    val, test = round(n * fractions[1]), round(n * fractions[2])
    return [n - val - test, val, test]


def check_groups(task: str, groups: Sequence[Sequence[str]] | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if groups is None:
        if task not in SPURIOUS_GROUPS:
            raise InputError(f"spurious task {task!r} has no default class groups; pass groups=(values_y0, values_y1)")
        return SPURIOUS_GROUPS[task]
    if len(groups) != 2 or not all(groups):
        raise InputError("groups must be two non-empty sequences of task values (class y=0, class y=1)")
    pair = (tuple(groups[0]), tuple(groups[1]))
    for value in (*pair[0], *pair[1]):
        _check_value(task, value)
    if set(pair[0]) & set(pair[1]):
        raise InputError(f"groups overlap: {sorted(set(pair[0]) & set(pair[1]))}")
    return pair


def _plan_split(rng: np.random.Generator, count: int, classes: Sequence[str], spurious: float | None) -> list[
        tuple[str, int | None]]:
    """(class or task value, place or None) per item of one split, balanced over classes, in random order.

    Classes cycle so that every class appears when ``count >= len(classes)``. With ``spurious``,
    the two classes alternate and, within each class y, ``round(spurious * n_y)`` items get
    place = y, rounded half up (the rest the other place).
    """
    if spurious is None:
        plan: list[tuple[str, int | None]] = [(classes[j % len(classes)], None) for j in range(count)]
    else:
        plan = []
        for y in (0, 1):
            n_y = len(range(y, count, 2))
            aligned = int(np.floor(spurious * n_y + 0.5))
            plan += [(classes[y], y)] * aligned + [(classes[y], 1 - y)] * (n_y - aligned)
    return [plan[int(i)] for i in rng.permutation(len(plan))]


def _save_png(array: np.ndarray, path: Path) -> None:
    """uint8 ``[H, W, 3]`` (RGB) or ``[H, W]`` (grey) as a PNG with fixed options and no metadata."""
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(array)).save(path, format="PNG", compress_level=6)


def _prepare(out: Path, overwrite: bool) -> None:
    present = [name for name in _OUTPUTS if (out / name).exists()]
    if present and not overwrite:
        raise InputError(f"{out} already holds a synthetic dataset ({', '.join(present)}); pass overwrite=True")
    for name in present:
        target = out / name
        shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _write_csv(path: Path, columns: Sequence[str], rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def generate_dataset(
    out_dir: str | Path, n: int, *, seed: int, task: str = "shape", spurious: float | None = None,
    splits: Sequence[float] | Sequence[int] = (0.7, 0.15, 0.15), size: int = 64,
    n_objects: int | Sequence[int] = 1, fixed: Mapping[str, str] | None = None,
    groups: Sequence[Sequence[str]] | None = None, overwrite: bool = False,
) -> dict[str, Any]:
    """Generate ``n`` labelled scenes and write them under ``out_dir`` (layout in the module docstring).

    Args:
        out_dir: target folder (created); refuses one that already holds these outputs unless
            ``overwrite`` (which deletes only the outputs listed in the module docstring).
        n: number of images over all splits.
        seed: master seed; the same arguments give byte-identical files.
        task: the factor whose value (of the main object) is the class: shape, colour, pattern,
            size, position or background. Classes are balanced (cycled) within every split.
        spurious: None for the plain variant. A probability p for the Waterbirds analogue: a
            binary class (values of ``task`` split into ``groups``, default :data:`SPURIOUS_GROUPS`)
            shown on water (class 1) or land (class 0) with probability p in train; val and test
            are balanced (each class half on land, half on water); classes are 50/50 everywhere.
        splits: train/val/test sizes as fractions of n or as ints summing to n.
        size: image side in px.
        n_objects: objects per image (or counts to choose from). Extra objects copy the main
            object's task value, so the label is unambiguous (not allowed for task="position").
        fixed: ``{factor: value}`` held fixed for every main object (not the task factor, nor
            the background in the spurious variant).
        groups: ``(values of class 0, values of class 1)`` for the spurious variant.

    Returns:
        The summary also written to ``summary.json``: arguments, ``classes`` (sorted), ``kind``
        ("waterbirds" for the spurious variant, else "folder"), ``layout`` and per split ``n``,
        ``classes`` / ``backgrounds`` counts and, for the spurious variant, ``groups`` counts keyed
        by the Waterbirds group ``2*y + place`` and ``aligned`` (fraction with place == y).
    """
    task = _factor(task)
    if n < 1:
        raise InputError(f"n must be at least 1, got {n}")
    counts = _split_counts(n, splits)
    fixed = {_factor(k): v for k, v in (fixed or {}).items()}
    for factor, value in fixed.items():
        _check_value(factor, value)
    if task in fixed:
        raise InputError(f"the task factor {task!r} cannot also be fixed")
    object_counts = [n_objects] if isinstance(n_objects, (int, np.integer)) else list(n_objects)
    if max(object_counts, default=1) > 1 and task == "position":
        raise InputError("task='position' needs one object per image (objects occupy distinct cells)")
    if spurious is not None:
        if not 0.0 <= float(spurious) <= 1.0:
            raise InputError(f"spurious must be a probability in [0, 1], got {spurious}")
        if task == "background" or "background" in fixed:
            raise InputError("the spurious variant sets the background itself (land/water)")
        value_groups = check_groups(task, groups)
        classes: list[str] = list(SPURIOUS_CLASSES)
        class_values = dict(zip(SPURIOUS_CLASSES, value_groups))
    else:
        value_groups = None
        classes = sorted(VOCABULARY[task])
        class_values = {c: (c,) for c in classes}
    out = Path(out_dir)
    _prepare(out, overwrite)
    width = max(6, len(str(n - 1)))
    shared = (task,) if task in OBJECT_FACTORS else ()
    rows: list[dict[str, Any]] = []
    per_split: dict[str, dict[str, Any]] = {}
    index = 0
    for code, split in enumerate(SPLITS):
        if 0 < counts[code] < len(classes):
            log.warning("split %s has %d images, fewer than the %d classes: its ImageFolder labels index "
                        "only the classes present", split, counts[code], len(classes))
        p = None if spurious is None else (float(spurious) if split == "train" else 0.5)
        plan = _plan_split(np.random.default_rng([seed, 1, code]), counts[code], classes, p)
        for cls, place in plan:
            rng = np.random.default_rng([seed, 0, index])
            item_fixed = dict(fixed)
            if value_groups is None:
                item_fixed[task] = cls
            else:
                y = classes.index(cls)
                item_fixed[task] = _pick(rng, value_groups[y])
                item_fixed["background"] = PLACES[place]
            scene = sample_scene(rng, n_objects=n_objects, fixed=item_fixed, shared=shared)
            rows.append(_write_item(out, f"{index:0{width}d}", split, code, cls, classes.index(cls), place,
                                    scene, size))
            index += 1
        per_split[split] = _split_summary([r for r in rows if r["split"] == split], spurious is not None)
    n_max = max(int(r["n_objects"]) for r in rows)
    columns = ["id", "file", "split", "class", "label", *(["y", "place"] if spurious is not None else []),
               "background", "n_objects", "seed",
               *[f"obj{k}_{f}" for k in range(n_max) for f in OBJECT_FACTORS], "masks", "caption"]
    _write_csv(out / "factors.csv", columns, rows)
    if spurious is not None:
        meta = [{"img_id": int(r["id"]), "img_filename": r["file"], "y": r["y"], "split": SPLITS.index(r["split"]),
                 "place": r["place"], "place_filename": r["background"]} for r in rows]
        _write_csv(out / "metadata.csv", ["img_id", "img_filename", "y", "split", "place", "place_filename"], meta)
    summary = {
        "format": FORMAT, "n": n, "seed": seed, "task": task, "spurious": spurious, "size": size,
        "n_objects": [int(c) for c in object_counts], "fixed": dict(sorted(fixed.items())),
        "classes": classes, "class_values": {c: list(v) for c, v in class_values.items()},
        "kind": "waterbirds" if spurious is not None else "folder",
        "layout": {"images": "{split}/{class}/{id}.png", "masks": "masks/{id}_{k}.png", "factors": "factors.csv",
                   "metadata": "metadata.csv" if spurious is not None else None, "task": TASK_FILE},
        "n_masks": sum(int(r["n_objects"]) for r in rows), "splits": per_split,
    }
    if spurious is not None:
        summary["group_names"] = {str(2 * y + pl): f"{classes[y]} on {PLACES[pl]}" for y in (0, 1) for pl in (0, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    task = task_description(summary)
    (out / TASK_FILE).write_text(json.dumps(task, indent=2) + "\n", encoding="utf-8")
    # line k names target k, in the world's own words: `--classes world/classes.txt --templates synth`
    (out / CLASSES_FILE).write_text("".join(texts[0] + "\n" for texts in task["class_texts"]), encoding="utf-8")
    log.info("wrote %d synthetic images (%s) to %s", n, ", ".join(f"{s} {c}" for s, c in zip(SPLITS, counts)), out)
    return summary


def _write_item(out: Path, item_id: str, split: str, code: int, cls: str, label: int, place: int | None,
                scene: Scene, size: int) -> dict[str, Any]:
    """Render ``scene``, write its image and masks, and return its factors.csv row."""
    image, masks = render_array(scene, size)
    file = f"{split}/{cls}/{item_id}.png"
    (out / split / cls).mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    _save_png(image, out / file)
    mask_files = []
    for k, mask in enumerate(masks):
        mask_files.append(f"masks/{item_id}_{k}.png")
        _save_png(mask.astype(np.uint8) * 255, out / mask_files[-1])
    row: dict[str, Any] = {"id": item_id, "file": file, "split": split, "class": cls, "label": label,
                           **scene.factors(), "masks": ";".join(mask_files), "caption": caption(scene)}
    if place is not None:
        row.update(y=label, place=place)
    return row


def _split_summary(rows: list[dict[str, Any]], spurious: bool) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "n": len(rows),
        "classes": dict(sorted(Counter(r["class"] for r in rows).items())),
        "backgrounds": dict(sorted(Counter(r["background"] for r in rows).items())),
    }
    if spurious:
        groups = Counter(str(2 * r["y"] + r["place"]) for r in rows)
        summary["groups"] = {g: groups.get(g, 0) for g in ("0", "1", "2", "3")}
        summary["aligned"] = (sum(r["y"] == r["place"] for r in rows) / len(rows)) if rows else None
    return summary


def task_description(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The task of a generated dataset in the world's own words: what ``task.json`` holds.

    Args:
        summary: the dataset's ``summary.json`` (as :func:`generate_dataset` returns it).

    Returns:
        ``format``; ``task`` (the class factor) and ``spurious`` (its train alignment, None for the
        plain variant); ``classes`` (in label order) with, per class, ``class_values`` (the class
        factor's values it covers) and ``class_texts`` (their :func:`~vitdecomp.synth.generator.describe`
        phrases, e.g. ``["a red object", "an orange object"]``); ``core_texts`` (describe() of every
        value of the class factor); for the Waterbirds variant ``spurious_factor`` = ``"background"``,
        ``places`` (place code 0, 1: land, water), ``place_texts`` and ``spurious_texts`` (describe() of
        every background), else None; ``templates`` (the :data:`TASK_TEMPLATES` set).
    """
    from .generator import describe

    task = _factor(str(summary["task"]))
    classes = [str(c) for c in summary["classes"]]
    values = summary.get("class_values") or {c: [c] for c in classes}
    class_values = [[str(v) for v in values[c]] for c in classes]
    waterbirds = summary.get("spurious") is not None
    return {
        "format": dict(TASK_FORMAT),
        "task": task,
        "spurious": summary.get("spurious"),
        "classes": classes,
        "class_values": class_values,
        "class_texts": [[describe(task, v) for v in vs] for vs in class_values],
        "core_factor": task,
        "core_texts": [describe(task, v) for v in VOCABULARY[task]],
        "spurious_factor": "background" if waterbirds else None,
        "places": list(PLACES) if waterbirds else None,
        "place_texts": [describe("background", p) for p in PLACES] if waterbirds else None,
        "spurious_texts": [describe("background", v) for v in VOCABULARY["background"]] if waterbirds else None,
        "templates": TASK_TEMPLATES,
    }


