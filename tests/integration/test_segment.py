"""Segmentation harness (vitdecomp.apps.segmentation.harness, `vitdecomp segment`) on synthetic scenes with exact masks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vitdecomp as vd
from vitdecomp.data.datasets import ImageNetSegmentation
from vitdecomp.errors import InputError
from vitdecomp.apps.segmentation.relevance import attention_gradcam, chefer_relevance, text_head
from vitdecomp.apps.segmentation.harness import METHODS, SegmentationPairs, load_item, run_segmentation
from vitdecomp.apps.segmentation.metrics import SegmentationMetrics, resize_pair
from vitdecomp.synth.bench import make_sample
from vitdecomp.synth.generator import VOCABULARY, describe
from vitdecomp.core.shipped import shipped_path
from vitdecomp.testing.gtsegs import write_gtsegs

pytest.importorskip("h5py")

N = 10
HW = (80, 96)  # stored size (rows, cols): non-square, resized to the model's 64 x 64
COLOURS = [describe("colour", v) for v in VOCABULARY["colour"]]


@pytest.fixture(scope="module")
def model():
    return vd.load("open_clip:local-dir:" + str(shipped_path("clip")))


@pytest.fixture(scope="module")
def head(model):
    from vitdecomp.interpret.text import text_encoder, zero_shot_head

    return text_head(model, zero_shot_head(text_encoder(model), COLOURS, "plain"), names=COLOURS)


@pytest.fixture(scope="module")
def scenes():
    sample = make_sample(N, seed=31337, stream=11)
    images, masks = [], []
    for img, mask in zip(sample.images, sample.masks):  # nearest upscaling keeps them aligned
        images.append(np.asarray(Image.fromarray(img).resize(HW[::-1], Image.Resampling.NEAREST)))
        masks.append((np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(HW[::-1], Image.Resampling.NEAREST)) > 0))
    return images, masks


def _write_pairs(root: Path, images, masks) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, (img, mask) in enumerate(zip(images, masks)):
        Image.fromarray(img).save(root / "images" / f"s{i:03d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"s{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory, scenes):
    images, masks = scenes
    root = tmp_path_factory.mktemp("seg")
    mat = write_gtsegs(root / "gtsegs_ijcv.mat", images, [m.astype(np.uint8) for m in masks])
    pairs = _write_pairs(root / "pairs", images, masks)
    return mat, pairs


@pytest.fixture(scope="module")
def mat_result(model, head, data):
    return run_segmentation(model, ImageNetSegmentation(data[0]), head, batch_size=4, n_examples=2)


def _independent_metrics(model, head, images, masks) -> dict[str, dict[str, float]]:
    """Maps from the one-call functions (and the decomposition written out here), scored image by image."""
    from vitdecomp.apps.segmentation.attention import raw_attention, rollout
    from vitdecomp.apps.heatmap import token_heatmap

    prep = model.preprocessing
    pix, small = [], []
    for img, mask in zip(images, masks):
        im, m = resize_pair(img, mask, 64)
        t = torch.from_numpy(np.array(im)).float().div(255).permute(2, 0, 1)
        pix.append((t - torch.tensor(prep.mean)[:, None, None]) / torch.tensor(prep.std)[:, None, None])
        small.append(m)
    x = torch.stack(pix)
    texts = head.directions()
    stack = vd.decompose(model, x, granularity="head_token", directions=texts)
    heads = [str(lab) for lab in stack.labels if lab.kind == "head"]
    per_text = torch.stack([token_heatmap(stack, j, components=heads).patch for j in range(len(texts))], dim=1)
    pred = head.logits(model.representation(x)).argmax(1)
    weights = torch.full((len(x), len(texts)), -1.0 / len(texts))
    weights[torch.arange(len(x)), pred] += 1.0
    maps = {
        "decomposition": torch.einsum("bv,bvhw->bhw", weights.to(per_text.dtype), per_text),
        "raw_attention": raw_attention(model, x),
        "rollout": rollout(model, x),
        "gradcam": attention_gradcam(model, x, head),
        "chefer": chefer_relevance(model, x, head),
    }
    out = {}
    for name, grid in maps.items():
        up = F.interpolate(grid[:, None].double(), size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
        metrics = SegmentationMetrics()
        for b in range(len(x)):
            metrics.update(up[b].numpy(), small[b])
        out[name] = metrics.result()
    constant = SegmentationMetrics()
    for m in small:
        constant.update(np.zeros((64, 64)), m)
    out["constant"] = constant.result()
    return out


def test_harness_metrics_equal_independently_computed_maps(model, head, scenes, mat_result):
    images, masks = scenes
    want = _independent_metrics(model, head, images, masks)
    assert list(mat_result.metrics) == list(METHODS)
    assert not mat_result.skipped and mat_result.n_images == N
    for name in METHODS:
        got = mat_result.metrics[name]
        for key in ("pixel_accuracy", "miou_two_class", "map_two_channel", "fg_iou", "bg_iou", "ap_fg"):
            assert got[key] == pytest.approx(want[name][key], rel=1e-6, abs=1e-9), (name, key)
    # the decomposition map beats a constant map on every headline metric of the synthetic world
    dec, const = mat_result.metrics["decomposition"], want["constant"]
    assert dec["pixel_accuracy"] > const["pixel_accuracy"]  # the constant map is all background: 93 % already
    for key in ("miou_two_class", "map_two_channel", "fg_iou", "ap_fg"):
        assert dec[key] > const[key] + 0.05, key
    # per-image records: the target is the model's own top class, named
    assert [it["target_name"] for it in mat_result.items] == [COLOURS[it["target"]] for it in mat_result.items]
    per_image_fg = [it["decomposition"]["fg_iou"] for it in mat_result.items]
    assert len(per_image_fg) == N and all(0.0 <= v <= 1.0 for v in per_image_fg if v == v)


def test_batch_size_and_method_subset_do_not_change_numbers(model, head, data, mat_result):
    source = ImageNetSegmentation(data[0])
    one = run_segmentation(model, source, head, methods=["rollout", "decomposition"], batch_size=3)
    for name in ("rollout", "decomposition"):
        assert one.metrics[name] == pytest.approx(mat_result.metrics[name], rel=1e-6)


def test_pairs_folder_gives_the_numbers_of_the_same_data_in_a_mat(model, head, data, mat_result):
    result = run_segmentation(model, SegmentationPairs(data[1]), head, batch_size=4)
    assert result.metrics == mat_result.metrics
    assert [it["target"] for it in result.items] == [it["target"] for it in mat_result.items]


def _painted(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A non-square image with a pure-red blob on a grey background, and the mask read off the image."""
    rng = np.random.default_rng(seed)
    img = np.full((70, 110, 3), 128, dtype=np.uint8)
    y0, x0 = rng.integers(5, 30), rng.integers(5, 60)
    img[y0:y0 + 30, x0:x0 + 40] = (255, 0, 0)
    img[y0 + 10:y0 + 20, x0 + 35:x0 + 48] = (255, 0, 0)  # an asymmetric notch: a flip or transpose shows
    mask = (img[..., 0] == 255) & (img[..., 1] == 0)
    return img, mask


@pytest.mark.parametrize("kind", ["mat", "pairs"])
def test_masks_stay_on_their_image_through_the_transform(tmp_path, kind):
    images, masks = zip(*(_painted(s) for s in range(3)))
    if kind == "mat":
        source = ImageNetSegmentation(write_gtsegs(tmp_path / "g.mat", images, [m.astype(np.uint8) for m in masks]))
    else:
        source = SegmentationPairs(_write_pairs(tmp_path / "p", images, masks))
    for i in range(3):
        item = load_item(source, i, (64, 64), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        redness = item.image[..., 0].astype(int) - item.image[..., 1].astype(int)  # 255 inside, 0 outside
        inside, outside = redness[item.mask], redness[~item.mask]
        assert inside.mean() > 240 and outside.mean() < 15
        # pixels is the normalised image, in the same layout
        back = (item.pixels.permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255
        assert np.abs(back - item.image).max() < 1.0


def test_bad_items_are_skipped_and_recorded(tmp_path, model, head, scenes):
    images, masks = scenes
    root = _write_pairs(tmp_path / "p", images[:4], masks[:4])
    Image.fromarray(np.zeros((10, 12), dtype=np.uint8)).save(root / "masks" / "s001.png")  # wrong size
    (root / "masks" / "s002.png").unlink()  # missing mask
    full = (root / "images" / "s003.png").read_bytes()
    (root / "images" / "s003.png").write_bytes(full[: len(full) // 3])  # truncated image
    result = run_segmentation(model, SegmentationPairs(root), head, batch_size=2)
    assert result.n_images == 1 and [it["id"] for it in result.items] == ["images/s000.png"]
    assert set(result.skipped) == {"images/s001.png", "images/s002.png", "images/s003.png"}
    assert "12x10 but the image is 96x80" in result.skipped["images/s001.png"]
    assert "no mask" in result.skipped["images/s002.png"]
    # non-binary ground truth in a .mat is skipped with its reason
    bad = [m.astype(np.uint8) for m in masks[:2]]
    bad[1] = bad[1] * 2
    result = run_segmentation(model, ImageNetSegmentation(write_gtsegs(tmp_path / "g.mat", images[:2], bad)), head)
    assert result.n_images == 1 and "{0, 1}" in result.skipped["imagenet-seg/00001"]


def test_wrong_layouts_are_clear_errors(tmp_path, model, head):
    import h5py

    with pytest.raises(InputError, match="no such file"):
        ImageNetSegmentation(tmp_path / "missing.mat")
    with h5py.File(tmp_path / "other.mat", "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(InputError, match="lacks dataset"):
        ImageNetSegmentation(tmp_path / "other.mat")
    (tmp_path / "p" / "images").mkdir(parents=True)
    with pytest.raises(InputError, match="no masks/ folder"):
        SegmentationPairs(tmp_path / "p")
    (tmp_path / "p" / "masks").mkdir()
    with pytest.raises(InputError, match="no image files"):
        SegmentationPairs(tmp_path / "p")
    with pytest.raises(InputError, match="unknown method"):
        run_segmentation(model, SegmentationPairs.__new__(SegmentationPairs), head, methods=["lrp"])


def test_cli_writes_results_record_and_figures(tmp_path, data, mat_result, capsys):
    from vitdecomp.cli.main import main

    classes = tmp_path / "colours.txt"
    classes.write_text("\n".join(COLOURS) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    spec = "open_clip:local-dir:" + str(shipped_path("clip"))
    code = main(["segment", "--mat", str(data[0]), "--model", spec, "--classes", str(classes), "--templates",
                 "plain", "--batch-size", "4", "--examples", "2", "--out", str(out), "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "mIoU (bg+fg)/2" in text and "mAP 2-ch (Chefer)" in text and "fg IoU" in text and "chefer" in text
    payload = json.loads((out / "results.json").read_text())
    assert payload["run"]["command"] == "segment"
    assert payload["run"]["files"]["mat"]["sha256"] == __import__("hashlib").sha256(data[0].read_bytes()).hexdigest()
    assert payload["run"]["files"]["classes"]["path"] == str(classes)
    assert payload["n_images"] == N and payload["metric_labels"]["fg_iou"] == "fg IoU"
    for name in METHODS:
        assert payload["metrics"][name]["miou_two_class"] == pytest.approx(mat_result.metrics[name]["miou_two_class"])
    assert len(payload["figures"]) == 2 and all((out / f).is_file() for f in payload["figures"])
    grid = Image.open(out / payload["figures"][0])
    assert grid.width > grid.height  # one row: image, mask, five overlays
    # bad input: exit code 2 with a clear message
    assert main(["segment", "--mat", str(tmp_path / "nope.mat"), "--model", spec, "--classes", str(classes)]) == 2
    assert main(["segment", "--pairs", str(data[1]), "--model", spec]) == 2  # a CLIP needs --classes
