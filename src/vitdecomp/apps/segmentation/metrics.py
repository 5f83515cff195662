"""Zero-shot segmentation metrics, Chefer-compatible (docs/method.md §6.5).

The protocol of Chefer et al.'s ImageNet-Segmentation evaluation
(``baselines/ViT/imagenet_seg_eval.py`` and ``utils/metrices.py`` in hila-chefer/Transformer-Explainability),
for one image at a time (batch size 1):

1. image and mask resized to the evaluation size without a crop, the image bilinear and the
   mask nearest (:func:`resize_pair`); the relevance map upsampled bilinearly to the same size
   (e.g. :meth:`vitdecomp.apps.heatmap.Heatmap.upsample`);
2. ``R <- (R - min R) / (max R - min R)``; threshold ``tau = mean(R)``: predicted foreground
   ``R > tau``, background ``R <= tau``;
3. **pixel accuracy** = sum correct / (eps + sum labelled pixels), summed over the dataset
   (every pixel of a binary mask is labelled; ``eps = np.spacing(1)`` as in their code);
4. **IoU_c** = sum inter_c / (eps + sum union_c) over the dataset, for c in {bg, fg} (a class
   that never occurs in masks or predictions scores 0, as their epsilon gives);
   **mIoU** = (IoU_bg + IoU_fg) / 2;
5. **mAP** = per image, the average precision of the two-channel scores ``[1 - R, R]``
   against the one-hot target ``[bg, fg]``, flattened into one binary problem of ``2 H W``
   scores (sklearn ``average_precision_score`` semantics, NaN -> 0), averaged over images.

A constant map is scored exactly as their code scores it: the min-max normalisation gives
0/0 = NaN everywhere, ``NaN > mean`` and ``NaN <= mean`` are both false, so both prediction
channels are 0 and the argmax picks background for every pixel; both AP channels (``R`` and
``1 - R``, NaN) are zeroed, so all ``2 H W`` scores tie and the AP is the positive rate of
the flattened one-hot target, 0.5.

Secondary metrics (vit-decompose's "mIoU" and "mAP"): the foreground IoU alone, and the
per-image single-channel AP of ``R`` against the foreground mask, averaged over images.

Result keys (:meth:`SegmentationMetrics.result`): ``pixel_accuracy``, ``miou_two_class``,
``map_two_channel``, ``fg_iou``, ``bg_iou``, ``ap_fg``, ``n_images``.

Deviations of the published pipelines that these metrics do *not* reproduce (docs/method.md §6.5):
clip_text_span centre-crops images but squashes masks; vit-decompose clips R at 0 and divides
by the max instead of min-max normalising.

Example::

    metrics = SegmentationMetrics()
    for relevance, mask in pairs:          # [H, W] float (upsampled), [H, W] bool
        metrics.update(relevance, mask)
    metrics.result()["miou_two_class"]
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ...errors import InputError

__all__ = ["SegmentationMetrics", "average_precision", "normalise_relevance", "resize_pair"]

log = logging.getLogger(__name__)


def average_precision(target: Any, score: Any) -> float:
    """Average precision of binary ``target`` ranked by ``score`` (sklearn semantics).

    With the distinct score values ``tau_1 > tau_2 > ...`` as thresholds,
    ``P_k`` and ``R_k`` the precision and recall of ``score >= tau_k``,

        AP = sum_k (R_k - R_{k-1}) P_k,      R_0 = 0,

    which is ``sklearn.metrics.average_precision_score`` for a binary target (tied scores form
    one threshold; no interpolation). With no positive in ``target`` the result is 0.0, as
    sklearn (>= 1.1, with a warning) and Chefer's ``nan_to_num`` give.

    Args:
        target: any shape, bool or {0, 1}.
        score: same number of elements, float.
    """
    t = np.asarray(target).reshape(-1).astype(bool)
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    if t.shape != s.shape:
        raise InputError(f"target has {t.size} elements, score has {s.size}")
    n_pos = int(t.sum())
    if n_pos == 0:
        return 0.0
    order = np.argsort(-s, kind="mergesort")
    s, t = s[order], t[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of every distinct score
    tps = np.cumsum(t, dtype=np.int64)[last]
    precision = tps / (last + 1.0)
    recall = tps / float(n_pos)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def normalise_relevance(relevance: Any) -> np.ndarray:
    """``(R - min) / (max - min)`` as float64; a constant map gives all zeros."""
    r = _as_array(relevance).astype(np.float64)
    if r.size == 0:
        raise InputError("relevance map is empty")
    if not np.all(np.isfinite(r)):
        raise InputError("relevance map contains NaN or infinite values")
    lo, hi = float(r.min()), float(r.max())
    if hi > lo:
        return (r - lo) / (hi - lo)
    return np.zeros_like(r)


class SegmentationMetrics:
    """Accumulates Chefer-compatible segmentation metrics over images (see the module doc).

    Attributes:
        correct, labelled: pixel counts summed over images.
        inter, union: ``[2]`` arrays (bg, fg) summed over images.
        ap_two_channel, ap_fg: per-image average precisions, in update order.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every image."""
        self.correct = 0
        self.labelled = 0
        self.inter = np.zeros(2, dtype=np.int64)
        self.union = np.zeros(2, dtype=np.int64)
        self.ap_two_channel: list[float] = []
        self.ap_fg: list[float] = []

    @property
    def n_images(self) -> int:
        return len(self.ap_two_channel)

    def update(self, relevance: Any, mask: Any) -> dict[str, float]:
        """Add one image.

        Args:
            relevance: ``[H, W]`` float map, already upsampled to the mask's size (tensor or array).
            mask: ``[H, W]`` foreground mask, bool or {0, 1}.

        Returns:
            This image's own values: ``pixel_accuracy``, ``bg_iou``, ``fg_iou`` (NaN when
            undefined), ``ap_two_channel``, ``ap_fg``, ``threshold`` (tau on the normalised map).
        """
        m = _as_array(mask)
        if m.dtype != bool:
            if not np.isin(m, (0, 1)).all():
                raise InputError("mask must be boolean or {0, 1}; got other values")
            m = m.astype(bool)
        r_raw = _as_array(relevance)
        if r_raw.ndim != 2 or m.ndim != 2:
            raise InputError(f"relevance and mask must be 2-D [H, W], got {r_raw.shape} and {m.shape}")
        if r_raw.shape != m.shape:
            raise InputError(
                f"relevance {r_raw.shape} and mask {m.shape} differ; upsample the map to the mask's size first"
            )
        constant = _is_constant(r_raw)
        r = normalise_relevance(r_raw)
        tau = float(r.mean())
        pred = r > tau  # foreground strictly above the mean, as Chefer's Res.gt(mean); constant: none

        correct = int((pred == m).sum())
        inter = np.array([(~pred & ~m).sum(), (pred & m).sum()], dtype=np.int64)
        union = np.array([(~pred | ~m).sum(), (pred | m).sum()], dtype=np.int64)
        # a constant map: both channels NaN in their code, zeroed by nan_to_num -> all scores tie
        scores = (np.zeros(2 * r.size) if constant else np.concatenate([(1.0 - r).reshape(-1), r.reshape(-1)]))
        onehot = np.concatenate([(~m).reshape(-1), m.reshape(-1)])
        ap_two = average_precision(onehot, scores)
        ap_fg = average_precision(m, r)

        self.correct += correct
        self.labelled += int(m.size)
        self.inter += inter
        self.union += union
        self.ap_two_channel.append(ap_two)
        self.ap_fg.append(ap_fg)
        iou = _ratio(inter, union, eps=False)
        return {
            "pixel_accuracy": correct / m.size,
            "bg_iou": float(iou[0]),
            "fg_iou": float(iou[1]),
            "ap_two_channel": ap_two,
            "ap_fg": ap_fg,
            "threshold": tau,
        }

    def result(self) -> dict[str, float]:
        """The dataset metrics so far.

        Returns:
            ``pixel_accuracy`` (sum correct / (eps + sum labelled)), ``bg_iou`` and ``fg_iou``
            (sum inter / (eps + sum union) per class: 0 if a class never occurs in masks or
            predictions, as Chefer's epsilon gives), ``miou_two_class`` (their mean),
            ``map_two_channel`` (mean per-image two-channel AP, the headline "mAP"),
            ``ap_fg`` (mean per-image foreground AP), ``n_images``. NaN values when no image
            was added.
        """
        if self.n_images == 0:
            keys = ("pixel_accuracy", "miou_two_class", "map_two_channel", "fg_iou", "bg_iou", "ap_fg")
            return {**{key: float("nan") for key in keys}, "n_images": 0}
        iou = _ratio(self.inter, self.union, eps=True)
        return {
            "pixel_accuracy": self.correct / (_EPS + self.labelled),
            "miou_two_class": float(iou.mean()),
            "map_two_channel": float(np.mean(self.ap_two_channel)),
            "fg_iou": float(iou[1]),
            "bg_iou": float(iou[0]),
            "ap_fg": float(np.mean(self.ap_fg)),
            "n_images": self.n_images,
        }


_EPS = float(np.spacing(1))  # Chefer et al.'s denominator epsilon (utils/metrices.py)


def _is_constant(relevance: Any) -> bool:
    r = _as_array(relevance)
    return bool(r.size) and bool(np.all(np.isfinite(r))) and float(r.max()) == float(r.min())


def _ratio(num: np.ndarray, den: np.ndarray, *, eps: bool) -> np.ndarray:
    """``num / (eps + den)`` as Chefer's code divides (eps=True: a class never seen scores 0);
    eps=False: NaN where ``den`` is 0 (one image's own, undefined IoU)."""
    if eps:
        return num / (_EPS + den)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def resize_pair(image: Any, mask: Any, size: int | tuple[int, int]) -> tuple[Any, np.ndarray]:
    """Resize an image (bilinear) and its mask (nearest) to the same size, without a crop.

    Both go through PIL's ``resize`` with the same pixel-centre geometry, so a mask equal to a
    painted region of the image stays on that region; this is Chefer et al.'s
    ``Resize((224, 224))`` / ``Resize((224, 224), NEAREST)``.

    Args:
        image: a PIL image or a uint8 array ``[H, W, 3]`` / ``[H, W]``.
        mask: ``[H, W]`` bool or {0, 1} array (or tensor, or a PIL mode "1"/"L" image), the
            image's size.
        size: ``S`` (square) or ``(height, width)``.

    Returns:
        ``(image, mask)``: the image of the same kind as given (PIL or uint8 array) and a bool
        array ``[height, width]``.
    """
    from PIL import Image

    hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(hw) <= 0:
        raise InputError(f"size must be positive, got {size}")
    as_array = not isinstance(image, Image.Image)
    if as_array:
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
            raise InputError(f"image arrays must be uint8 [H, W, 3] or [H, W], got {arr.dtype} {arr.shape}")
        pil = Image.fromarray(arr)
    else:
        pil = image
    if isinstance(mask, Image.Image):
        m = np.asarray(mask.convert("L")) > 0
    else:
        m = _as_array(mask)
        if m.dtype != bool:
            if not np.isin(m, (0, 1)).all():
                raise InputError("mask must be boolean or {0, 1}")
            m = m.astype(bool)
    if m.shape != (pil.height, pil.width):
        raise InputError(f"mask {m.shape} and image {(pil.height, pil.width)} differ in size")
    target = (hw[1], hw[0])  # PIL sizes are (width, height)
    out_image = pil.resize(target, Image.Resampling.BILINEAR)
    out_mask = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(target, Image.Resampling.NEAREST)) > 127
    return (np.asarray(out_image) if as_array else out_image), out_mask


def _as_array(value: Any) -> np.ndarray:
    detach = getattr(value, "detach", None)
    if callable(detach):  # a torch tensor (half precision has no numpy dtype)
        t = detach().cpu()
        if t.is_floating_point() and t.element_size() < 4:
            t = t.float()
        return np.asarray(t.numpy())
    return np.asarray(value)
