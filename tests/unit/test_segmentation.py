"""Chefer-compatible segmentation metrics (docs/method.md §6.5), checked against hand-computed values.

The 4x4 example below is worked out by hand in the comments (exact fractions), so a wrong
threshold (>= instead of >), per-image instead of dataset IoU, per-channel instead of
flattened two-channel AP, or an interpolated AP would all be caught.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from vitdecomp.errors import InputError
from vitdecomp.apps.segmentation.metrics import SegmentationMetrics, average_precision, normalise_relevance, resize_pair

# Relevance in units of 1/8 after min-max normalisation (min 0, max 8): every score and every
# 1 - score is a dyadic number, so ties between the two channels are exact in floating point.
V = np.array(
    [
        [0, 0, 1, 2],
        [0, 6, 8, 2],
        [1, 8, 7, 4],
        [0, 2, 4, 0],
    ]
)
MASK = np.array(
    [
        [0, 0, 0, 0],
        [0, 1, 1, 0],
        [0, 1, 1, 0],
        [0, 1, 0, 0],
    ],
    dtype=bool,
)
# tau = mean(V)/8 = 45/16/8, i.e. 2.8125 in V units -> predicted fg: V in {4, 6, 7, 8}
#   pred = [[0,0,0,0],[0,1,1,0],[0,1,1,1],[0,0,1,0]]
# fg: inter 4, union 7 ; bg: inter 16 - 7 = 9, union 16 - 4 = 12 ; correct 16 - 3 = 13
PIXEL_ACC = Fraction(13, 16)
FG_IOU = Fraction(4, 7)
BG_IOU = Fraction(9, 12)
# single-channel AP: positives at V = 8, 8, 7, 6, 2; negatives at V = 0 x5, 1 x2, 2 x2, 4 x2
#   V=8: tp 2/n 2 (dR 2/5, P 1) ; V=7: 3/3 (1/5, 1) ; V=6: 4/4 (1/5, 1) ; V=4: 4/6 (0)
#   V=2: 5/9 (1/5, 5/9) ; V=1, V=0: dR 0
AP_FG = Fraction(2, 5) + Fraction(1, 5) + Fraction(1, 5) + Fraction(1, 5) * Fraction(5, 9)
# two-channel AP over 32 scores u (units of 1/8): fg channel u = V (positive where mask),
# bg channel u = 8 - V (positive where not mask). Per u: (positives, negatives)
#   u=8: (2 fg + 5 bg, 0)   -> tp 7,  n 7,  dR 7/16, P 1
#   u=7: (1 + 2, 0)         -> tp 10, n 10, dR 3/16, P 1
#   u=6: (1 + 2, 1 bg)      -> tp 13, n 14, dR 3/16, P 13/14
#   u=4: (2 bg, 2 fg)       -> tp 15, n 18, dR 2/16, P 15/18
#   u=2: (1 fg, 2 fg + 1 bg)-> tp 16, n 22, dR 1/16, P 16/22
#   u=1, u=0: negatives only
AP_TWO = (
    Fraction(7, 16)
    + Fraction(3, 16)
    + Fraction(3, 16) * Fraction(13, 14)
    + Fraction(2, 16) * Fraction(15, 18)
    + Fraction(1, 16) * Fraction(16, 22)
)


def close(value: float, exact: Fraction) -> bool:
    return value == pytest.approx(float(exact), abs=1e-12)


def test_hand_computed_4x4_every_metric():
    metrics = SegmentationMetrics()
    # an affine transform of V: min-max normalisation must undo it
    per_image = metrics.update(3.0 * V - 5.0, MASK)
    assert close(per_image["threshold"], Fraction(45, 16 * 8))
    result = metrics.result()
    assert close(result["pixel_accuracy"], PIXEL_ACC)
    assert close(result["fg_iou"], FG_IOU)
    assert close(result["bg_iou"], BG_IOU)
    assert close(result["miou_two_class"], (FG_IOU + BG_IOU) / 2)
    assert close(result["ap_fg"], AP_FG)
    assert close(result["map_two_channel"], AP_TWO)
    assert result["n_images"] == 1
    assert close(per_image["ap_two_channel"], AP_TWO) and close(per_image["fg_iou"], FG_IOU)


def test_dataset_sums_not_per_image_means():
    metrics = SegmentationMetrics()
    metrics.update(V.astype(float), MASK)
    metrics.update(MASK.astype(float), MASK)  # perfect second image: 5 fg, 11 bg pixels
    result = metrics.result()
    assert close(result["pixel_accuracy"], Fraction(13 + 16, 32))
    assert close(result["fg_iou"], Fraction(4 + 5, 7 + 5))  # not (4/7 + 1) / 2
    assert close(result["bg_iou"], Fraction(9 + 11, 12 + 11))
    assert close(result["map_two_channel"], (AP_TWO + 1) / 2)  # mAP: mean of per-image APs
    assert close(result["ap_fg"], (AP_FG + 1) / 2)
    assert result["n_images"] == 2


def test_perfect_and_inverted_relevance():
    rng = np.random.default_rng(0)
    mask = rng.random((16, 16)) < 0.3
    perfect = SegmentationMetrics()
    perfect.update(mask.astype(np.float32), mask)
    r = perfect.result()
    assert r["pixel_accuracy"] == 1.0
    assert r["fg_iou"] == 1.0 and r["bg_iou"] == 1.0 and r["miou_two_class"] == 1.0
    assert r["map_two_channel"] == 1.0 and r["ap_fg"] == 1.0

    inverted = SegmentationMetrics()
    inverted.update(1.0 - mask.astype(np.float32), mask)
    r = inverted.result()
    assert r["fg_iou"] == 0.0 and r["bg_iou"] == 0.0 and r["pixel_accuracy"] == 0.0
    assert r["ap_fg"] < 0.5


def test_constant_relevance_is_all_background():
    metrics = SegmentationMetrics()
    out = metrics.update(np.full((4, 4), 7.0), MASK)
    assert np.array_equal(normalise_relevance(np.full((3, 3), 2.5)), np.zeros((3, 3)))
    assert out["threshold"] == 0.0
    assert close(out["pixel_accuracy"], Fraction(11, 16))  # everything predicted bg
    assert out["fg_iou"] == 0.0 and close(out["bg_iou"], Fraction(11, 16))


def test_torch_inputs_and_bad_inputs():
    torch = pytest.importorskip("torch")
    metrics = SegmentationMetrics()
    metrics.update(torch.tensor(V, dtype=torch.float32), torch.tensor(MASK))
    assert close(metrics.result()["ap_fg"], AP_FG)
    with pytest.raises(InputError):
        metrics.update(np.zeros((4, 5)), MASK)  # not upsampled to the mask
    with pytest.raises(InputError):
        metrics.update(np.zeros((4, 4)), MASK.astype(int) * 2)  # not a binary mask
    with pytest.raises(InputError):
        metrics.update(np.full((4, 4), np.nan), MASK)
    assert metrics.n_images == 1  # failed updates add nothing
    assert np.isnan(SegmentationMetrics().result()["pixel_accuracy"])


def _ap_by_ranks(target: np.ndarray, score: np.ndarray) -> float:
    """AP without ties: mean over positives of the precision at the positive's rank."""
    order = np.argsort(-score)
    hits = target[order].astype(float)
    ranks = np.arange(1, len(hits) + 1)
    return float(np.sum(np.cumsum(hits) / ranks * hits) / hits.sum())


def test_average_precision_on_random_data():
    rng = np.random.default_rng(1)
    for n in (5, 50, 400):
        target = rng.random(n) < 0.4
        target[0] = True
        score = rng.random(n) + 0.3 * target  # continuous: no ties
        assert average_precision(target, score) == pytest.approx(_ap_by_ranks(target, score), abs=1e-12)
    assert average_precision(np.zeros(5, bool), rng.random(5)) == 0.0  # no positives
    # ties: one threshold for a group of equal scores (no credit for order inside the group)
    assert average_precision([1, 0], [0.5, 0.5]) == 0.5
    assert average_precision([1, 0, 1], [0.9, 0.5, 0.5]) == pytest.approx(0.5 * 1 + 0.5 * (2 / 3))


def test_average_precision_matches_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    for n in (10, 300):
        target = rng.random(n) < 0.3
        target[0] = True
        score = np.round(rng.random(n), 1)  # many ties
        expected = sklearn_metrics.average_precision_score(target, score)
        assert average_precision(target, score) == pytest.approx(expected, abs=1e-12)


def test_resize_pair_keeps_the_mask_binary_and_aligned():
    height, width = 37, 53
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[..., 2] = 255  # blue background
    mask = np.zeros((height, width), dtype=bool)
    mask[9:24, 30:47] = True  # painted red region, not aligned to any scale
    image[mask] = (255, 0, 0)

    for kind in ("pil", "array"):
        src = Image.fromarray(image) if kind == "pil" else image
        out_image, out_mask = resize_pair(src, mask, (48, 80))  # (height, width), upscaled non-uniformly
        arr = np.asarray(out_image)
        assert isinstance(out_image, Image.Image) == (kind == "pil")
        assert arr.shape == (48, 80, 3) and out_mask.shape == (48, 80)
        assert out_mask.dtype == bool
        red = arr[..., 0].astype(int) > 127
        disagree = red != out_mask
        assert disagree.mean() < 0.05
        # every disagreement lies on the region's boundary (within one pixel of a mask edge)
        edge = np.zeros_like(out_mask)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                edge |= np.roll(out_mask, (dy, dx), axis=(0, 1)) != out_mask
        assert not (disagree & ~edge).any()

    # square size, downscaling, a {0, 1} integer mask
    small_image, small_mask = resize_pair(Image.fromarray(image), mask.astype(np.uint8), 16)
    assert small_image.size == (16, 16) and small_mask.shape == (16, 16)
    assert set(np.unique(small_mask)) <= {False, True} and small_mask.any()
    with pytest.raises(InputError):
        resize_pair(image, mask[:-1], 16)


# ------------------------------------------------------------------ Chefer et al.'s evaluation, independently
def _chefer_reference(maps, masks):
    """The ImageNet-Segmentation evaluation of Chefer et al. (imagenet_seg_eval.py + utils/metrices.py),
    transcribed step by step with torch and sklearn as an independent oracle: NaNs of the min-max
    normalisation kept and zeroed where their code zeroes them, argmax over the two channels,
    histogram intersections, epsilon denominators, one flattened AP per image."""
    torch = pytest.importorskip("torch")
    from sklearn.metrics import average_precision_score

    eps = np.spacing(1)
    total_correct = total_label = 0
    total_inter, total_union = np.zeros(2), np.zeros(2)
    aps = []
    for r, m in zip(maps, masks):
        res = torch.as_tensor(np.asarray(r, dtype=np.float64))[None, None]
        labels = torch.as_tensor(np.asarray(m, dtype=np.int64))[None]
        with np.errstate(invalid="ignore"):
            res = (res - res.min()) / (res.max() - res.min())
        ret = res.mean()
        res_1 = res.gt(ret).type(res.type())
        res_0 = res.le(ret).type(res.type())
        res_1_ap, res_0_ap = res.clone(), 1 - res
        for t in (res_1, res_0, res_1_ap, res_0_ap):
            t[t != t] = 0
        output = torch.cat((res_0, res_1), 1)
        output_ap = torch.cat((res_0_ap, res_1_ap), 1)
        # batch_pix_accuracy
        _, predict = torch.max(output[0], 0)
        predict, target = predict.numpy() + 1, labels[0].numpy() + 1
        total_label += int((target > 0).sum())
        total_correct += int(((predict == target) * (target > 0)).sum())
        # batch_intersection_union (nclass = 2)
        predict = predict * (target > 0).astype(predict.dtype)
        inter = predict * (predict == target)
        area_inter, _ = np.histogram(inter, bins=2, range=(1, 2))
        area_pred, _ = np.histogram(predict, bins=2, range=(1, 2))
        area_lab, _ = np.histogram(target, bins=2, range=(1, 2))
        total_inter += area_inter
        total_union += area_pred + area_lab - area_inter
        # get_ap_scores: one AP over the flattened two channels against the one-hot target
        tgt = labels[0]
        onehot = torch.zeros_like(tgt.unsqueeze(0).expand(2, *tgt.shape)).scatter_(0, tgt.unsqueeze(0), 1)
        p = np.nan_to_num(output_ap[0].numpy().reshape(-1))
        aps.append(float(np.nan_to_num(average_precision_score(onehot.numpy().reshape(-1), p))))
    iou = total_inter / (eps + total_union)
    return {"pixel_accuracy": total_correct / (eps + total_label), "miou_two_class": float(iou.mean()),
            "bg_iou": float(iou[0]), "fg_iou": float(iou[1]), "map_two_channel": float(np.mean(aps))}


def _edge_cases():
    rng = np.random.default_rng(3)
    mask = rng.random((12, 12)) < 0.35
    smooth = rng.random((12, 12))
    tied = np.where(rng.random((12, 12)) < 0.5, 0.25, 0.75)  # many pixels exactly at / around the mean
    at_mean = np.array([[0.0, 1.0], [0.5, 0.5]])  # two pixels exactly at the threshold tau = 0.5
    return {
        "random": ([smooth], [mask]),
        "constant_map": ([np.full((12, 12), 3.0)], [mask]),
        "empty_mask": ([smooth], [np.zeros((12, 12), bool)]),
        "full_mask": ([smooth], [np.ones((12, 12), bool)]),
        "ties_at_threshold": ([at_mean, tied], [np.array([[0, 1], [1, 0]], bool), mask]),
        "constant_and_empty": ([np.zeros((6, 6)), np.full((6, 6), -2.0)], [np.zeros((6, 6), bool), np.ones((6, 6), bool)]),
        "dataset": ([smooth, np.full((12, 12), 1.0), tied, 1 - smooth],
                    [mask, mask, np.zeros((12, 12), bool), np.ones((12, 12), bool)]),
    }


@pytest.mark.parametrize("case", sorted(_edge_cases()))
def test_metrics_match_chefer_evaluation_on_edge_cases(case):
    maps, masks = _edge_cases()[case]
    ours = SegmentationMetrics()
    for r, m in zip(maps, masks):
        ours.update(r, m)
    got, want = ours.result(), _chefer_reference(maps, masks)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), (case, key, got[key], value)


def test_a_constant_map_scores_the_chance_ap_of_their_code():
    metrics = SegmentationMetrics()
    out = metrics.update(np.full((4, 4), 7.0), MASK)
    assert out["ap_two_channel"] == pytest.approx(0.5)  # all 2HW scores tie: the one-hot positive rate
