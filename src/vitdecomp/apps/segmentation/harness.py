"""Zero-shot segmentation benchmark harness (docs/method.md §6.5): decomposition maps against attention baselines.

Over a source of (image, foreground mask) pairs, every requested method's map is computed on
the same batches and scored with :class:`~vitdecomp.apps.segmentation.metrics.SegmentationMetrics`
(Chefer et al.'s protocol: pixel accuracy, two-class mIoU and two-channel mAP, plus the
foreground IoU and single-channel foreground AP).

Per item (docs/method.md §6.5 step 1): the image and its mask are resized together to the model's input
size with :func:`~vitdecomp.apps.segmentation.metrics.resize_pair` (image bilinear, mask nearest, no crop);
the image is then normalised with the model's own mean and std. Each map ``[gh, gw]`` is
upsampled bilinearly (``align_corners=False``) to that size before scoring.

Methods (:data:`METHODS`), all targeting the same class ``t`` per image (by default the top
logit of the model's head; see :class:`~vitdecomp.apps.segmentation.relevance.LogitHead`):

* ``decomposition``: the CLIP paper's contrastive token map, summed over every head from block
  ``decomposition_start``: ``m_p = < sum_{l,h} c_{l,h,p}, y_t - (1/C) sum_c y_c >`` with ``y_c``
  the head's class directions (unit text embeddings for CLIP, classifier rows otherwise);
* ``raw_attention``: last block, mean over heads, CLS row (:mod:`vitdecomp.apps.segmentation.attention`);
* ``rollout``: attention rollout from block ``rollout_start`` (default 1, as Chefer et al.);
* ``gradcam``: attention GradCAM of the last block (:mod:`vitdecomp.apps.segmentation.relevance`);
* ``chefer``: Chefer et al.'s gradient-weighted rollout from block ``chefer_start``.

The attention baselines come from one forward (and one backward for the gradient ones) of the
stock model, :func:`~vitdecomp.apps.segmentation.relevance.attention_pass`; the decomposition from one
:func:`~vitdecomp.decompose` pass per batch.

Architectures (:func:`method_availability`): every method runs on isotropic ViTs (timm,
open_clip, transformers CLIP / SigLIP / ViT / DINOv2 with registers). Swin and MaxViT have no
token-by-token attention per block, so ``raw_attention``, ``rollout``, ``gradcam`` and
``chefer`` are *unavailable* for them: the run goes on with the other methods and the result
records each unavailable method with its reason (:attr:`SegmentationResult.unavailable`, a row
of the table, ``"unavailable"`` in the JSON). Their decomposition map is on the last-stage grid
(the token axis of their ``head_token`` decomposition); for Swin the heads summed start by
default at the first block of the last stage (the only stage whose heads split over that grid,
as ``vitdecomp heatmap`` does). Items that cannot be read (corrupt image, missing
mask, mask of another size, non-binary mask) are skipped and recorded with their reason.

Sources: :class:`~vitdecomp.data.datasets.ImageNetSegmentation` (``gtsegs_ijcv.mat``) or
:class:`SegmentationPairs` (``images/NAME.ext`` + ``masks/NAME.png``, or a dataset written by
``vitdecomp synth generate`` as it is, with its object masks).

Example (offline, the shipped tiny CLIP)::

    import vitdecomp as vd
    from vitdecomp.apps.segmentation.relevance import text_head
    from vitdecomp.apps.segmentation.harness import SegmentationPairs, format_table, run_segmentation
    from vitdecomp.core.shipped import shipped_path
    from vitdecomp.interpret.text import text_encoder, zero_shot_head

    model = vd.load("open_clip:local-dir:" + str(shipped_path("clip")))
    names = ["a red object", "a blue object"]
    head = text_head(model, zero_shot_head(text_encoder(model), names, "plain"), names=names)
    result = run_segmentation(model, SegmentationPairs("pairs/"), head, batch_size=8)
    print(format_table(result))
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from ...data.datasets import ImageSourceBase
from ...data.images import IMAGE_SUFFIXES, record_skip
from ...errors import InputError
from .metrics import SegmentationMetrics, resize_pair

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from torch import nn

    from ...core.model import Model
    from .relevance import LogitHead

__all__ = [
    "METHODS",
    "METRIC_LABELS",
    "SegmentationSource",
    "SegmentationPairs",
    "SegmentationItem",
    "SegmentationResult",
    "load_item",
    "decomposition_map",
    "default_decomposition_start",
    "method_availability",
    "run_segmentation",
    "format_table",
    "SegmentationRun",
    "open_segmentation_source",
    "default_class_pool",
    "segmentation_head",
    "segmentation_benchmark",
]

log = logging.getLogger(__name__)

#: Map methods, in table order.
METHODS: tuple[str, ...] = ("decomposition", "raw_attention", "rollout", "gradcam", "chefer")
#: Result key -> column label (what each number is).
METRIC_LABELS: dict[str, str] = {
    "pixel_accuracy": "pixAcc",
    "miou_two_class": "mIoU (bg+fg)/2",
    "map_two_channel": "mAP 2-ch (Chefer)",
    "fg_iou": "fg IoU",
    "ap_fg": "AP fg",
}
_GRADIENT_METHODS = ("gradcam", "chefer")
_ATTENTION_METHODS = ("raw_attention", "rollout", *_GRADIENT_METHODS)
Target = Literal["pred", "label"]


class SegmentationSource(Protocol):
    """Images with foreground masks: an :class:`~vitdecomp.data.datasets.ImageSource` plus ``mask``."""

    name: str
    root: str

    def __len__(self) -> int: ...
    def id(self, index: int) -> str: ...
    def label(self, index: int) -> int | None: ...
    def load(self, index: int) -> Image.Image: ...
    def mask(self, index: int) -> np.ndarray: ...
    def fingerprint(self) -> dict[str, Any]: ...


class SegmentationPairs(ImageSourceBase):
    """A folder of image/mask pairs: ``ROOT/images/NAME.<ext>`` with ``ROOT/masks/NAME.png``,
    or a dataset written by ``vitdecomp synth generate`` (read as it is).

    Items are the image files in sorted order (ids ``images/NAME.ext``). A mask is any image
    file with the same stem under ``masks/`` (PNG preferred); its foreground is every pixel
    whose grey value (``convert("L")``) is above 0. An image without a mask is still an item:
    reading its mask raises :class:`~vitdecomp.errors.InputError`, so a run skips and records
    it. Labels are None.

    A generated dataset (``factors.csv`` and a ``task.json``, no
    ``images/`` folder) is read from ``factors.csv``: items in its row order (ids = the image
    files, ``{split}/{class}/{id}.png``), ``split`` keeps one split, the label is the row's
    class index, and the foreground is the union of the image's object masks
    ``masks/{id}_{k}.png`` (every object shares the class factor's value). Then
    :attr:`task` is its task description (:func:`vitdecomp.synth.dataset.read_task`: class
    texts and templates, the default classes of ``vitdecomp segment``) and :attr:`classes`
    its class names; otherwise both are None.
    """

    name = "pairs"
    task: dict[str, Any] | None = None

    def __init__(self, root: str | Path, split: str | None = None) -> None:
        super().__init__()
        base = Path(root)
        images, masks = base / "images", base / "masks"
        if not base.is_dir():
            raise InputError(f"image/mask pairs: no such directory: {base}")
        if not images.is_dir() and (base / "factors.csv").is_file():
            from ...data.synthetic import read_task

            task = read_task(base)
            if task is not None:
                self._read_generated(base, task, split)
                return
        if split is not None:
            raise InputError(f"image/mask pairs: split applies to a dataset written by `vitdecomp synth generate`, "
                             f"and {base} is not one")
        for folder in (images, masks):
            if not folder.is_dir():
                raise InputError(
                    f"image/mask pairs: {base} has no {folder.name}/ folder (expected images/NAME.jpg + masks/NAME.png)"
                )
        self.root = str(base)
        files = sorted(p for p in images.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(f"image/mask pairs: no image files in {images}")
        by_stem: dict[str, Path] = {}
        for p in sorted(masks.iterdir(), key=lambda q: (q.suffix.lower() != ".png", q.name)):
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES:
                by_stem.setdefault(p.stem, p)
        self._files = files
        self._ids = [f"images/{p.name}" for p in files]
        self._labels = [None] * len(files)
        self._masks: list[Path | None] = [by_stem.get(p.stem) for p in files]
        orphans = sorted(set(by_stem) - {p.stem for p in files})
        if orphans:
            log.warning("%s: %d mask(s) without an image, ignored: %s", masks, len(orphans), ", ".join(orphans[:5]))
        lacking = sum(m is None for m in self._masks)
        if lacking:
            log.warning("%s: %d image(s) have no mask; they will be skipped", base, lacking)

    def _read_generated(self, base: Path, task: dict[str, Any], split: str | None) -> None:
        """Items, labels and object masks of a ``vitdecomp synth generate`` dataset (see the class docstring)."""
        from ...data.synthetic import SPLITS, read_factors

        if split is not None and split not in SPLITS:
            raise InputError(f"{base}: unknown split {split!r}; use one of {', '.join(SPLITS)}")
        rows = [r for r in read_factors(base) if split is None or r["split"] == split]
        if not rows:
            raise InputError(f"{base}: no generated images{f' in split {split!r}' if split else ''}")
        self.root, self.task, self.split = str(base), task, split
        self.classes = [str(c) for c in task["classes"]]
        self._files = [base / r["file"] for r in rows]
        self._ids = [r["file"] for r in rows]
        self._labels = [int(r["label"]) for r in rows]
        self._meta = [{"split": r["split"], "class": r["class"]} for r in rows]
        self._object_masks = [[base / m for m in r["masks"].split(";") if m] for r in rows]
        self._masks = [paths[0] if paths else None for paths in self._object_masks]
        log.info("%s: %d generated images%s with their object masks (task %s)", base, len(rows),
                 f" of split {split}" if split else "", task.get("task"))

    def mask(self, index: int) -> np.ndarray:
        """Foreground of item ``index``: bool ``[H, W]`` (grey value > 0). Raises InputError."""
        from PIL import Image, UnidentifiedImageError

        paths = self._object_masks[self._check(index)] if self.task is not None else [self._masks[self._check(index)]]
        if not paths or paths[0] is None:
            raise InputError(f"{self.id(index)}: no mask masks/{self._files[index].stem}.png")
        fg: np.ndarray | None = None
        for path in paths:
            try:
                with Image.open(path) as im:
                    one = np.asarray(im.convert("L")) > 0
            except (OSError, UnidentifiedImageError, ValueError) as exc:
                raise InputError(f"{self.id(index)}: cannot read mask {path.name}: {exc}") from exc
            if fg is not None and one.shape != fg.shape:
                raise InputError(f"{self.id(index)}: object masks of different sizes ({path.name})")
            fg = one if fg is None else fg | one
        assert fg is not None
        return fg

    def fingerprint(self) -> dict[str, Any]:
        """``{"kind", "n", "sha256"}``: sha256 over the ordered (id, image size, mask name, mask size) list
        (for a generated dataset every object mask, and ``"generated": True`` and the split)."""
        import hashlib

        digest = hashlib.sha256()
        generated = self.task is not None
        for i, (path, item_id) in enumerate(zip(self._files, self._ids)):
            masks = self._object_masks[i] if generated else [self._masks[i]]
            names = ";".join(f"{m.name}:{_size(m)}" if m else ":-1" for m in masks)
            line = f"{item_id}\t{_size(path)}\t{names}" if generated else (
                f"{item_id}\t{_size(path)}\t{masks[0].name if masks[0] else ''}\t{_size(masks[0])}")
            digest.update(f"{line}\n".encode())
        out: dict[str, Any] = {"kind": self.name, "n": len(self), "sha256": digest.hexdigest()}
        if generated:
            out.update(generated=True, split=self.split)
        return out


def _size(path: Path | None) -> int:
    try:
        return path.stat().st_size if path is not None else -1
    except OSError:
        return -1


@dataclass
class SegmentationItem:
    """One prepared item: ``pixels [3, H, W]`` (normalised), ``image`` uint8 ``[H, W, 3]`` and
    ``mask`` bool ``[H, W]`` at the evaluation size, the source row, id and label."""

    index: int
    id: str
    pixels: torch.Tensor
    image: np.ndarray
    mask: np.ndarray
    label: int | None = None


@dataclass
class SegmentationResult:
    """What :func:`run_segmentation` measured.

    Attributes:
        metrics: method -> :meth:`SegmentationMetrics.result` (``pixel_accuracy``,
            ``miou_two_class``, ``map_two_channel``, ``fg_iou``, ``bg_iou``, ``ap_fg``, ``n_images``).
        items: per scored image: ``id``, ``target`` (class index), ``target_name`` and, per
            method, that image's own values (``pixel_accuracy``, ``fg_iou``, ``ap_two_channel``, ...).
        skipped: id -> reason, for every item not scored.
        examples: the first items as ``{"id", "image", "mask", "maps": {method: [H, W] float32}}``.
        seconds: wall time per stage (``load``, ``attention_pass``, ``decomposition``, ``metrics``).
        protocol: the settings (size, methods, start layers, target, head).
        unavailable: method -> why it could not run on this model (those methods have no metrics).
    """

    metrics: dict[str, dict[str, float]]
    items: list[dict[str, Any]]
    skipped: dict[str, str]
    examples: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return len(self.items)

    def to_json(self) -> dict[str, Any]:
        """JSON-able summary (examples left out)."""
        return {"protocol": self.protocol, "metrics": self.metrics, "metric_labels": METRIC_LABELS,
                "unavailable": self.unavailable,
                "n_images": self.n_images, "n_skipped": len(self.skipped), "skipped": self.skipped,
                "seconds": self.seconds, "items": self.items}


def load_item(
    source: SegmentationSource, index: int, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> SegmentationItem:
    """Read, resize (image bilinear, mask nearest, no crop) and normalise item ``index``.

    Raises:
        InputError: unreadable image or mask, a mask of another size, or a non-binary mask.
    """
    import torch
    from torchvision.transforms import functional as TF

    item_id = source.id(index)
    image = source.load(index)
    raw_mask = np.asarray(source.mask(index))
    if raw_mask.ndim != 2:
        raise InputError(f"{item_id}: mask is {raw_mask.ndim}-D, expected [H, W]")
    if raw_mask.shape != (image.height, image.width):
        raise InputError(
            f"{item_id}: mask is {raw_mask.shape[1]}x{raw_mask.shape[0]} but the image is {image.width}x{image.height}"
        )
    try:
        resized, mask = resize_pair(image.convert("RGB"), raw_mask, size)
    except InputError as exc:
        raise InputError(f"{item_id}: {exc}") from None
    pixels = TF.normalize(TF.to_tensor(resized), list(mean), list(std))
    return SegmentationItem(index, item_id, pixels.to(torch.float32), np.asarray(resized), mask, source.label(index))


def decomposition_map(
    model: Model | nn.Module,
    pixels: torch.Tensor,
    directions: torch.Tensor,
    *,
    target: torch.Tensor | Sequence[int] | None = None,
    start_layer: int = 0,
) -> torch.Tensor:
    """The contrastive token map of every head: ``[batch, gh, gw]``.

    ``m_p = < sum_{l >= s, h} c_{l,h,p}, y_t - (1/C) sum_c y_c >`` for each image, with
    ``y = directions [C, d_z]`` and ``t`` its target (default: the image's own top class,
    ``argmax_c <z, y_c>``). The decomposition is projected onto the ``k`` distinct contrast
    directions of the batch only (values ``[comp, batch, token, k]``, ``k <= batch``), so
    1,000 classes cost no more than a few.

    Args:
        model: a :class:`~vitdecomp.Model` or stock module.
        pixels: ``[batch, 3, H, W]`` preprocessed images.
        directions: ``[C, d_z]`` class directions in the representation space.
        target: ``[batch]`` class indices, or None for the top class.
        start_layer: first block whose heads are summed (vit-decompose uses 5).
    """
    import torch

    from ...core.decomposition import decompose
    from ..heatmap import token_heatmap
    from ...core.model import wrap

    m = wrap(model)
    y = directions.detach().to(device="cpu", dtype=torch.float32)
    if y.dim() != 2 or y.shape[0] == 0:
        raise InputError(f"directions must be [C, d] with C >= 1, got {tuple(y.shape)}")
    batch = int(pixels.shape[0])
    if target is None:
        z = m.representation(pixels).detach().to(device="cpu", dtype=torch.float32)
        chosen = (z @ y.T).argmax(dim=1)
    else:
        chosen = torch.as_tensor(target, dtype=torch.long).reshape(-1).cpu()
        if chosen.shape[0] != batch:
            raise InputError(f"{chosen.shape[0]} targets for a batch of {batch}")
        if int(chosen.min()) < 0 or int(chosen.max()) >= y.shape[0]:
            raise InputError(f"targets must be class indices in [0, {y.shape[0]})")
    classes = sorted(set(chosen.tolist()))
    mean = y.double().mean(dim=0)
    contrast = torch.stack([(y[c].double() - mean) for c in classes]).to(torch.float32)  # [k, d]
    stack = decompose(m, pixels, granularity="head_token", directions=contrast, start_layer=start_layer)
    heads = [str(lab) for lab in stack.labels if lab.kind == "head"]
    if not heads:
        raise InputError(f"no attention heads at or after block {start_layer}")
    out: torch.Tensor | None = None
    for j, c in enumerate(classes):
        patch = token_heatmap(stack, j, components=heads).patch  # [B, gh, gw]
        if out is None:
            out = torch.empty_like(patch)
        rows = chosen.to(patch.device) == c
        out[rows] = patch[rows]
    assert out is not None
    return out


def default_decomposition_start(model: Model | nn.Module) -> int:
    """First block of the decomposition map by default: 0, for Swin the first block of its last stage.

    (Swin's ``head_token`` decomposition covers the last stage only; see
    :func:`vitdecomp.apps.heatmap.default_start_layer`, which this reuses.)
    """
    from ..heatmap import default_start_layer
    from ...core.model import wrap

    return default_start_layer(wrap(model))


def method_availability(model: Model | nn.Module, methods: Sequence[str] = METHODS) -> dict[str, str | None]:
    """Per method: None when it can run on ``model``, else the reason (runs nothing).

    The attention baselines need an isotropic ViT (one token-by-token pattern per block);
    the gradient ones also a hookable attention write (:func:`~vitdecomp.apps.segmentation.relevance.gradient_support`).
    The decomposition map is available on every adapter family (its token grid is the patch
    grid, or the last-stage grid of Swin / MaxViT); a model whose decomposition turns out to
    have no grid is marked unavailable by :func:`run_segmentation` when it is first tried.
    """
    from .attention import vit_map
    from ...errors import UnsupportedModelError
    from ...core.model import wrap
    from .relevance import gradient_support

    m = wrap(model)
    try:
        vit_map(m)
        attention: str | None = None
    except UnsupportedModelError as exc:
        attention = str(exc)
    gradients = attention if attention is not None else (
        gradient_support(m) if any(x in _GRADIENT_METHODS for x in methods) else None)
    out: dict[str, str | None] = {}
    for name in methods:
        if name in _GRADIENT_METHODS:
            out[name] = gradients
        elif name in _ATTENTION_METHODS:
            out[name] = attention
        else:
            out[name] = None
    return out


def _upsample(grid: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    import torch.nn.functional as F

    up = F.interpolate(grid[:, None].detach().cpu().double(), size=size, mode="bilinear", align_corners=False)
    return up[:, 0].numpy()


def run_segmentation(
    model: Model | nn.Module,
    source: SegmentationSource,
    head: LogitHead,
    *,
    methods: Sequence[str] = METHODS,
    batch_size: int = 8,
    limit: int | None = None,
    target: Target = "pred",
    rollout_start: int = 1,
    chefer_start: int = 0,
    decomposition_start: int | None = None,
    n_examples: int = 0,
    progress: bool = False,
) -> SegmentationResult:
    """Score every method's map on the first ``limit`` items of ``source`` (all when None).

    Args:
        model: a :class:`~vitdecomp.Model` of any supported family; methods it cannot run
            (:func:`method_availability`) are recorded in ``unavailable`` and skipped.
        source: image/mask pairs (``ImageNetSegmentation``, :class:`SegmentationPairs`).
        head: the class logits; its :meth:`~vitdecomp.apps.segmentation.relevance.LogitHead.directions` are the
            decomposition map's ``y_c``.
        methods: a subset of :data:`METHODS`.
        batch_size: images per forward pass (every metric is per image, so results do not
            depend on it).
        limit: score at most this many source items (skipped ones count).
        target: ``"pred"`` (the top logit) or ``"label"`` (the source's class label; items
            without one are skipped).
        rollout_start, chefer_start, decomposition_start: first block of each product / sum
            (``decomposition_start`` None: :func:`default_decomposition_start`).
        n_examples: keep the first N scored items' images, masks and maps for figures.
        progress: show a progress bar.

    Returns:
        A :class:`SegmentationResult`.
    """
    import torch

    from ...store.dataset_run import progress_bar
    from ...errors import UnsupportedModelError
    from ...core.model import wrap
    from .relevance import resolve_targets, attention_pass

    m = wrap(model)
    methods = list(dict.fromkeys(methods))
    unknown = [x for x in methods if x not in METHODS]
    if unknown or not methods:
        raise InputError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if batch_size < 1:
        raise InputError("batch size must be at least 1")
    if target not in ("pred", "label"):
        raise InputError(f"target must be 'pred' or 'label', got {target!r}")
    n = len(source) if limit is None else min(int(limit), len(source))
    if n <= 0:
        raise InputError("nothing to score: the source is empty or --limit is 0")
    prep = m.preprocessing
    size = (int(prep.input_size[0]), int(prep.input_size[1]))
    if decomposition_start is None:
        decomposition_start = default_decomposition_start(m)
    unavailable = {name: why for name, why in method_availability(m, methods).items() if why is not None}
    for name, why in unavailable.items():
        log.warning("%s is unavailable for %s: %s", name, m.name, why)
    active = [x for x in methods if x not in unavailable]
    directions = head.directions() if "decomposition" in active else None
    metrics = {name: SegmentationMetrics() for name in active}
    items: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    examples: list[dict[str, Any]] = []
    seconds = {"load": 0.0, "attention_pass": 0.0, "decomposition": 0.0, "metrics": 0.0}
    names = head.names

    def score(batch: list[SegmentationItem]) -> None:
        x = torch.stack([it.pixels for it in batch]).to(device=m.device, dtype=m.dtype)
        forced = None
        if target == "label":
            forced = torch.tensor([it.label for it in batch], dtype=torch.long)
        t0 = time.perf_counter()
        maps: dict[str, torch.Tensor] = {}
        if any(x in _ATTENTION_METHODS for x in active):
            ap = attention_pass(m, x, head, target=forced, gradients=any(x in _GRADIENT_METHODS for x in active))
            if "raw_attention" in active:
                maps["raw_attention"] = ap.raw_attention()
            if "rollout" in active:
                maps["rollout"] = ap.rollout(rollout_start)
            if "gradcam" in active:
                maps["gradcam"] = ap.gradcam()
            if "chefer" in active:
                maps["chefer"] = ap.chefer(chefer_start)
            assert ap.target is not None
            chosen = ap.target.cpu()
        else:  # no attention pass: the target from the representation alone
            with torch.no_grad():
                chosen = resolve_targets(forced, head.logits(m.representation(x))).cpu()
        t1 = time.perf_counter()
        seconds["attention_pass"] += t1 - t0
        if "decomposition" in active:
            assert directions is not None
            try:
                maps["decomposition"] = decomposition_map(m, x, directions, target=chosen,
                                                          start_layer=decomposition_start)
            except UnsupportedModelError as exc:
                _drop("decomposition", str(exc))
        t2 = time.perf_counter()
        seconds["decomposition"] += t2 - t1
        up = {name: _upsample(maps[name], size) for name in active}
        for b, it in enumerate(batch):
            t = int(chosen[b])
            record: dict[str, Any] = {"id": it.id, "target": t, "target_name": names[t] if names else None}
            for name in active:
                record[name] = metrics[name].update(up[name][b], it.mask)
            items.append(record)
            if len(examples) < n_examples:
                examples.append({"id": it.id, "image": it.image, "mask": it.mask, "target": t,
                                 "target_name": record["target_name"],
                                 "maps": {name: up[name][b].astype(np.float32) for name in active}})
        seconds["metrics"] += time.perf_counter() - t2

    def _drop(name: str, why: str) -> None:
        """Mark ``name`` unavailable mid-run (its decomposition has no grid): no metrics, no maps."""
        log.warning("%s is unavailable for %s: %s", name, m.name, why)
        unavailable[name] = why
        active.remove(name)
        metrics.pop(name, None)
        for rec in items:
            rec.pop(name, None)
        for ex in examples:
            ex["maps"].pop(name, None)

    bar = progress_bar(n, enabled=progress, desc="segment")
    pending: list[SegmentationItem] = []
    try:
        for index in range(n):
            t0 = time.perf_counter()
            item_id = source.id(index)
            try:
                item = load_item(source, index, size, prep.mean, prep.std)
                if target == "label" and item.label is None:
                    raise InputError(f"{item_id}: no class label (target='label')")
            except Exception as exc:  # noqa: BLE001 - an unreadable item is skipped, never fatal
                record_skip(skipped, item_id, exc)  # the shared wording (vitdecomp.data.images)
                bar.update(1)
                continue
            finally:
                seconds["load"] += time.perf_counter() - t0
            pending.append(item)
            if len(pending) == batch_size:
                score(pending)
                bar.update(len(pending))
                pending = []
        if pending:
            score(pending)
            bar.update(len(pending))
    finally:
        bar.close()
    if not items:
        log.warning("no item could be scored (%d skipped)", len(skipped))
    protocol = {
        "size": list(size), "methods": methods, "methods_scored": active, "target": target, "batch_size": batch_size,
        "n_requested": n, "rollout_start": rollout_start, "chefer_start": chefer_start,
        "decomposition_start": decomposition_start, "gradcam": "chefer (last block, head weights = mean gradient)",
        "head": {"classes": head.n_classes, "normalize": head.normalize, "scale": head.scale},
        "resize": "image bilinear, mask nearest, no crop (resize_pair); map bilinear, align_corners=False",
        "normalisation": {"mean": list(prep.mean), "std": list(prep.std)},
    }
    return SegmentationResult({name: metrics[name].result() for name in active}, items, skipped, examples,
                              {k: round(v, 4) for k, v in seconds.items()}, protocol,
                              {name: unavailable[name] for name in methods if name in unavailable})


def format_table(result: SegmentationResult) -> str:
    """The metrics as an aligned text table, one row per method (values in %)."""
    keys = list(METRIC_LABELS)
    header = ["method", *[METRIC_LABELS[k] for k in keys], "n"]
    rows = [header]
    for name, values in result.metrics.items():
        cells = [name]
        for k in keys:
            v = values.get(k)
            cells.append("-" if v is None or v != v else f"{100.0 * v:.2f}")
        cells.append(str(values.get("n_images", 0)))
        rows.append(cells)
    for name in result.unavailable:
        rows.append([name, *["n/a"] * len(keys), "0"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    footer = [f"{result.n_images} images scored, {len(result.skipped)} skipped"]
    footer += [f"n/a {name}: {why}" for name, why in result.unavailable.items()]
    return "\n".join([*lines, *footer])


# ============================================================================ the whole benchmark
@dataclass
class SegmentationRun:
    """What :func:`segmentation_benchmark` did: the result and what it was made from.

    Attributes:
        result: the :class:`SegmentationResult`.
        source: the image/mask source read; model: the model.
        head_kind: ``"text"`` (CLIP class texts) or ``"classifier"`` (the model's own head).
        names: the class names (None: a classifier without names).
        templates: the template set of the class texts (None for a classifier head).
        pool: the class-name pool read (``classes``), or None.
        classes_file: ``classes`` when it was a text file, else None.
        task_file: a generated dataset's own class texts (``task.json``, or its ``summary.json``) when
            they were the classes, else None; class_texts: those texts per class.
    """

    result: SegmentationResult
    source: Any
    model: Model
    head_kind: str
    names: list[str] | None
    templates: str | None
    pool: Any = None
    classes_file: Path | None = None
    task_file: Path | None = None
    class_texts: list[list[str]] | None = None

    def to_json(self) -> dict[str, Any]:
        """``results.json`` of ``vitdecomp segment`` without its run record (and the figure list)."""
        return self.result.to_json()

    def inputs(self) -> tuple[dict[str, Path], dict[str, Any]]:
        """``(files, facts)`` for a run record: the input files by role (``mat``, ``classes``, ``task``)
        and the dataset fingerprint, model description, head, templates and class texts."""
        files: dict[str, Path] = {}
        if self.source.name == "imagenet-seg":  # the .mat file
            files["mat"] = Path(self.source.root)
        if self.classes_file is not None:
            files["classes"] = self.classes_file
        facts: dict[str, Any] = {"dataset": self.source.fingerprint(), "model": self.model.describe(),
                                 "head": self.head_kind, "templates": self.templates}
        if self.task_file is not None:
            files["task"] = self.task_file
            facts["classes"] = {"source": str(self.task_file), "names": self.names, "texts": self.class_texts}
        return files, facts


def open_segmentation_source(path: str | Path, *, split: str | None = None,
                             kind: Literal["mat", "pairs"] | None = None) -> SegmentationSource:
    """ImageNet-Segmentation's ``gtsegs_ijcv.mat`` (``kind="mat"``; by default a ``.mat`` file) or a
    :class:`SegmentationPairs` folder (``"pairs"``: ``images/`` + ``masks/``, or a dataset written by
    ``vitdecomp synth generate``, one ``split`` of it)."""
    if kind not in (None, "mat", "pairs"):
        raise InputError(f"kind must be 'mat' or 'pairs', got {kind!r}")
    if kind == "mat" or (kind is None and Path(path).suffix.lower() == ".mat"):
        if split is not None:
            raise InputError("--split applies to --pairs on a dataset written by `vitdecomp synth generate`")
        from ...data.datasets import ImageNetSegmentation

        return ImageNetSegmentation(path)
    return SegmentationPairs(path, split=split)


def default_class_pool() -> str | None:
    """The first shipped pool with ImageNet in its name (the class names of a CLIP on ImageNet data), or None."""
    from ...interpret.text.pools import POOLS

    for name in POOLS:
        if "imagenet" in name.lower():
            return name
    return None


def segmentation_head(
    model: Model,
    source: SegmentationSource | None = None,
    *,
    classes: str | Path | None = None,
    templates: str | None = None,
    head: Literal["auto", "classifier", "text"] = "auto",
) -> tuple[LogitHead, dict[str, Any]]:
    """The target logits of the segmentation maps, and what they were made from.

    * ``head="text"`` (or ``"auto"`` for a model without a classifier): a CLIP zero-shot head. Its
      classes are ``classes`` (a shipped pool name or a text file, one name per line), else a
      generated dataset's own classes (per class the renormalised mean of its template-ensembled
      ``class_texts``, so the head's class index is the dataset's label), else a shipped ImageNet pool;
      ``templates`` default ``photo`` (a generated dataset's own: its template set).
    * ``head="classifier"`` (or ``"auto"`` with one): the model's linear classifier, its classes named
      by ``classes`` when given (as many as it has).

    Returns:
        ``(head, info)`` with ``info``: ``kind`` (``"text"``/``"classifier"``), ``names``, ``templates``,
        ``pool`` (the TextPool read, or None), ``classes`` (the argument), ``world`` (the generated
        dataset's task, when its classes were used).

    Raises:
        InputError: no classes for a CLIP, no classifier for ``head="classifier"``, a name count that
            differs from the classifier's.
    """
    import torch

    from ...interpret.text import text_encoder, zero_shot_head
    from ...interpret.text.pools import load_pool
    from .relevance import classifier_head, text_head

    if head not in ("auto", "classifier", "text"):
        raise InputError(f"head must be 'auto', 'classifier' or 'text', got {head!r}")
    has_classifier = model.classifier() is not None
    use_text = head == "text" or (head == "auto" and not has_classifier)
    world = getattr(source, "task", None) if classes is None else None  # a generated dataset's own classes
    used_templates = templates or (world["templates"] if use_text and world is not None else "photo")
    if use_text and classes is None and world is None:
        classes = default_class_pool()
        if classes is None:
            raise InputError(
                f"{model.name} has no classifier head, so its targets are class texts: pass --classes "
                "(a shipped pool name or a text file with one class name per line)"
            )
    pool = load_pool(classes) if classes is not None else None
    names = list(pool.texts) if pool is not None else None
    if use_text and world is not None:
        encoder = text_encoder(model)
        rows = []
        for texts in world["class_texts"]:
            mean = zero_shot_head(encoder, list(texts), used_templates).mean(dim=0)
            rows.append(mean / mean.norm().clamp_min(1e-12))
        names = ["/".join(texts) for texts in world["class_texts"]]
        logits = text_head(model, torch.stack(rows), names=names)
    elif use_text:
        assert names is not None
        logits = text_head(model, zero_shot_head(text_encoder(model), names, used_templates), names=names)
    else:
        if not has_classifier:
            raise InputError(f"--head classifier: {model.name} has no linear classifier head")
        logits = classifier_head(model)
        if names is not None and len(names) != logits.n_classes:
            raise InputError(f"--classes has {len(names)} names but the classifier has {logits.n_classes} classes")
        if names is not None:
            logits = classifier_head(model, names)
    info = {"kind": "text" if use_text else "classifier", "names": names,
            "templates": used_templates if use_text else None, "pool": pool, "classes": classes,
            "world": world if use_text else None}
    return logits, info


def segmentation_benchmark(
    model: Model | str,
    source: SegmentationSource | str | Path,
    *,
    source_kind: Literal["mat", "pairs"] | None = None,
    split: str | None = None,
    classes: str | Path | None = None,
    templates: str | None = None,
    head: Literal["auto", "classifier", "text"] = "auto",
    methods: Sequence[str] = METHODS,
    target: Target = "pred",
    limit: int | None = None,
    batch_size: int = 8,
    rollout_start: int = 1,
    chefer_start: int = 0,
    decomposition_start: int | None = None,
    n_examples: int = 0,
    progress: bool = False,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    device: str | None = None,
) -> SegmentationRun:
    """``vitdecomp segment`` in one call: zero-shot segmentation of image/mask pairs (docs/method.md §6.5).

    Builds the target head (:func:`segmentation_head`) and scores every method's map with
    :func:`run_segmentation` (Chefer et al.'s protocol: pixel accuracy, two-class mIoU, two-channel mAP,
    foreground IoU and AP); the decomposition map is ``m_p = <Σ_{l,h} c_{l,h,p}, y_t − (1/C) Σ_c y_c>``.

    Args:
        model: a Model, or a spec loaded with ``pretrained`` / ``checkpoint`` / ``device`` once the
            settings are checked.
        source: image/mask pairs: a source object, or a path (``.mat``: ImageNet-Segmentation, else a
            :class:`SegmentationPairs` folder; ``source_kind`` says which; ``split``: one split of a
            generated dataset), see :func:`open_segmentation_source`.
        classes, templates, head: the target head (see :func:`segmentation_head`).
        methods, target, limit, batch_size, rollout_start, chefer_start, decomposition_start,
            n_examples, progress: as :func:`run_segmentation`.

    Returns:
        A :class:`SegmentationRun`; ``to_json()`` is ``results.json`` without its run record.
    """
    from ...core.model import Model as _Model

    if batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    if limit is not None and limit < 1:
        raise InputError("--limit must be at least 1")
    if n_examples < 0:
        raise InputError("--examples must be >= 0")
    if isinstance(source, (str, Path)):
        source = open_segmentation_source(source, split=split, kind=source_kind)
    elif split is not None:
        raise InputError("split applies to a path of a dataset written by `vitdecomp synth generate`")
    if not isinstance(model, _Model):
        from ...core.loading import load

        model = load(model, pretrained=pretrained, checkpoint=checkpoint, device=device)
    logits, info = segmentation_head(model, source, classes=classes, templates=templates, head=head)
    result = run_segmentation(
        model, source, logits, methods=methods, batch_size=batch_size, limit=limit, target=target,
        rollout_start=rollout_start, chefer_start=chefer_start, decomposition_start=decomposition_start,
        n_examples=n_examples, progress=progress,
    )
    classes_file = Path(info["classes"]) if info["classes"] is not None and Path(info["classes"]).is_file() else None
    task_file = None
    if info["world"] is not None:  # the generated dataset's own class texts (task.json, or its summary)
        task_file = next(f for f in (Path(source.root) / "task.json", Path(source.root) / "summary.json")
                         if f.is_file())
    return SegmentationRun(result=result, source=source, model=model, head_kind=info["kind"], names=info["names"],
                           templates=info["templates"], pool=info["pool"], classes_file=classes_file,
                           task_file=task_file,
                           class_texts=None if info["world"] is None else info["world"]["class_texts"])
