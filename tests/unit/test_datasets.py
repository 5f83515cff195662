"""Dataset readers (vitdecomp.data.datasets): detection, order, labels, skipping, workers, .mat layout."""
from __future__ import annotations

import csv
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitdecomp.data.datasets import (
    DatasetBatch,
    ImageFolder,
    ImageNetSegmentation,
    ImageNetVal,
    ImageSource,
    Waterbirds,
    chunk_rows,
    iter_batches,
    load_batch,
    open_dataset,
)
from vitdecomp.errors import InputError
from vitdecomp.testing.gtsegs import write_gtsegs

h5py = pytest.importorskip("h5py")


# ----------------------------------------------------------------------------- helpers
def _color(seed: int) -> tuple[int, int, int]:
    return (37 * seed % 256, 91 * seed % 256, 53 * seed % 256)


def _png(path: Path, seed: int = 1, size: tuple[int, int] = (20, 12)) -> Path:
    """A solid-colour PNG whose colour identifies it (size is PIL's (W, H))."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, _color(seed)).save(path)
    return path


def _jpeg(path: Path, seed: int = 1, size: tuple[int, int] = (64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=95)
    return path


def to16(image: Image.Image) -> torch.Tensor:
    """Test transform: [3, 16, 16] float in [0, 1]."""
    arr = np.asarray(image.convert("RGB").resize((16, 16), Image.NEAREST), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def picky(image: Image.Image) -> torch.Tensor:
    """A transform that fails on 30x30 images (stands in for e.g. a wrong channel count)."""
    if image.size == (30, 30):
        raise ValueError("expected 4 channels")
    return to16(image)


def _mixed_folder(root: Path) -> list[Path]:
    """Sorted: a.png good, b.png corrupt, c.jpg truncated, d.png 4x4, e.png good."""
    good_a = _png(root / "a.png", 1)
    (root / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    full = _jpeg(root / "c.jpg", 3).read_bytes()
    (root / "c.jpg").write_bytes(full[: len(full) * 6 // 10])
    _png(root / "d.png", 4, size=(4, 4))
    good_e = _png(root / "e.png", 5)
    return [good_a, good_e]


def _seg_arrays() -> tuple[list[np.ndarray], list[np.ndarray]]:
    h, w = 10, 14  # non-square, so a missing or wrong transpose changes the shape
    yy, xx = np.mgrid[0:h, 0:w]
    img0 = np.stack([yy * 20, xx * 15, np.full_like(yy, 7)], axis=-1).astype(np.uint8)  # [H, W, 3]
    mask0 = ((yy < 4) & (xx < 9)).astype(np.uint8)  # [H, W], top-left block
    img1 = np.ascontiguousarray(img0[::-1, :, ::-1])
    mask1 = np.ascontiguousarray(mask0[::-1])
    tiny = np.zeros((4, 5, 3), dtype=np.uint8)
    return [img0, img1, tiny], [mask0, mask1, np.zeros((4, 5), dtype=np.uint8)]


@pytest.fixture
def seg_mat(tmp_path: Path) -> Path:
    images, masks = _seg_arrays()
    path = tmp_path / "gtsegs_ijcv.mat"
    write_gtsegs(path, images, masks, ["n01440764_10", "n02085620_7", "n09999999_1"])
    return path


def _imagenet_flat(root: Path, n: int = 4) -> list[str]:
    names = [f"ILSVRC2012_val_{k:08d}.JPEG" for k in range(1, n + 1)]
    for k, name in enumerate(reversed(names)):  # created out of order on purpose
        _png(root / name, k + 1)
    return names


def _waterbirds(root: Path, columns: tuple[str, ...] | None = None) -> None:
    rows = [  # img_id, img_filename, y, split, place, place_filename
        (3, "002.Laysan_Albatross/b.jpg", 1, 0, 0, "/b/bamboo/x.jpg"),
        (1, "001.Black_footed_Albatross/a.jpg", 1, 2, 1, "/o/ocean/y.jpg"),
        (2, "100.Brown_Pelican/c.jpg", 0, 1, 1, "/l/lake/z.jpg"),
        (4, "001.Black_footed_Albatross/d.jpg", 0, 2, 0, "/f/forest/w.jpg"),
    ]
    header = columns or ("img_id", "img_filename", "y", "split", "place", "place_filename")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for r in rows:
            writer.writerow(r[: len(header)])
            _png(root / r[1], r[0])


# ----------------------------------------------------------------------------- folders
def test_folder_order_labels_and_hidden_entries(tmp_path):
    _png(tmp_path / "b" / "x.png", 1)
    _png(tmp_path / "a" / "z.png", 2)
    _png(tmp_path / "a" / "y.png", 3)
    _png(tmp_path / "a" / "sub" / "w.png", 4)
    _png(tmp_path / ".cache" / "h.png", 5)
    _png(tmp_path / "a" / ".hidden.png", 6)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    src = ImageFolder(tmp_path)
    assert isinstance(src, ImageSource)
    assert [src.id(i) for i in range(len(src))] == ["a/sub/w.png", "a/y.png", "a/z.png", "b/x.png"]
    assert src.classes == ["a", "b"]
    assert [src.label(i) for i in range(len(src))] == [0, 0, 0, 1]
    assert src.root == str(tmp_path)
    assert src.load(1).getpixel((0, 0)) == _color(3)  # id and file agree
    with pytest.raises(IndexError):
        src.id(4)


def test_folder_without_class_folders_has_no_labels(tmp_path):
    _png(tmp_path / "top.png")
    _png(tmp_path / "a" / "x.png")
    src = ImageFolder(tmp_path)
    assert src.classes is None
    assert [src.label(i) for i in range(len(src))] == [None, None]
    assert [src.id(i) for i in range(len(src))] == ["a/x.png", "top.png"]


def test_folder_from_list_of_files_uses_common_parent(tmp_path):
    f1 = _png(tmp_path / "d" / "cats" / "1.png", 1)
    f2 = _png(tmp_path / "d" / "dogs" / "2.png", 2)
    src = open_dataset([f2, f1, f2])
    assert isinstance(src, ImageFolder) and len(src) == 2
    assert src.root == str(tmp_path / "d")
    assert [src.id(i) for i in range(2)] == ["cats/1.png", "dogs/2.png"]
    single = open_dataset(f1)
    assert single.id(0) == "1.png" and single.root == str(f1.parent)
    with pytest.raises(InputError, match="no such file"):
        open_dataset([f1, tmp_path / "missing.png"])


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="no image files"):
        open_dataset(tmp_path)


# ----------------------------------------------------------------------------- detection
def test_detection_of_each_kind(tmp_path, seg_mat):
    folder = tmp_path / "folder"
    _png(folder / "x.png")
    flat = tmp_path / "val"
    _imagenet_flat(flat, 2)
    (flat / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n")
    classes = tmp_path / "valc"
    _png(classes / "n01440764" / "ILSVRC2012_val_00000001.JPEG")
    train_like = tmp_path / "train"
    _png(train_like / "n01440764" / "n01440764_10026.JPEG")
    birds = tmp_path / "birds"
    _waterbirds(birds)
    assert open_dataset(folder).name == "folder"
    assert isinstance(open_dataset(flat), ImageNetVal)
    assert isinstance(open_dataset(classes), ImageNetVal)
    assert isinstance(open_dataset(train_like), ImageFolder)
    forced = open_dataset(train_like, kind="imagenet-val")
    assert isinstance(forced, ImageNetVal) and forced.label(0) == 0 and forced.classes == ["n01440764"]
    assert isinstance(open_dataset(birds), Waterbirds)
    assert isinstance(open_dataset(seg_mat), ImageNetSegmentation)
    # without a label file a flat folder of val names is just a folder
    (flat / "LOC_val_solution.csv").unlink()
    assert isinstance(open_dataset(flat), ImageFolder)
    assert isinstance(open_dataset(flat, kind="imagenet"), ImageNetVal)


def test_open_dataset_errors(tmp_path):
    _png(tmp_path / "x.png")
    with pytest.raises(InputError, match="no such file"):
        open_dataset(tmp_path / "nope")
    with pytest.raises(InputError, match="unknown dataset kind 'coco'"):
        open_dataset(tmp_path, kind="coco")
    with pytest.raises(InputError, match="Waterbirds only"):
        open_dataset(tmp_path, split="train")
    with pytest.raises(InputError, match="not a MATLAB"):
        bad = tmp_path / "bad.mat"
        bad.write_bytes(b"MATLAB 5.0 MAT-file" + b"\x00" * 200)
        open_dataset(bad)


# ----------------------------------------------------------------------------- ImageNet val
def test_imagenet_val_class_folders_ordered_by_file_name(tmp_path):
    _png(tmp_path / "n02000000" / "ILSVRC2012_val_00000001.JPEG", 1)
    _png(tmp_path / "n01000000" / "ILSVRC2012_val_00000002.JPEG", 2)
    _png(tmp_path / "n02000000" / "ILSVRC2012_val_00000003.JPEG", 3)
    src = open_dataset(tmp_path)
    assert [src.id(i) for i in range(3)] == [
        "n02000000/ILSVRC2012_val_00000001.JPEG",
        "n01000000/ILSVRC2012_val_00000002.JPEG",
        "n02000000/ILSVRC2012_val_00000003.JPEG",
    ]
    assert src.classes == ["n01000000", "n02000000"]
    assert [src.label(i) for i in range(3)] == [1, 0, 1]
    # a full synset list near the root fixes the class index of a subset
    (tmp_path / "LOC_synset_mapping.txt").write_text("n00500000 thing\nn01000000 a\nn02000000 b\n")
    assert [ImageNetVal(tmp_path).label(i) for i in range(3)] == [2, 1, 2]


def test_imagenet_val_flat_with_loc_solution(tmp_path):
    names = _imagenet_flat(tmp_path, 4)
    with open(tmp_path / "LOC_val_solution.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ImageId", "PredictionString"])
        w.writerow(["ILSVRC2012_val_00000003", "n03000000 1 2 3 4 n03000000 5 6 7 8"])
        w.writerow(["ILSVRC2012_val_00000001", "n02000000 1 2 3 4"])
        w.writerow(["ILSVRC2012_val_00000002", "n01000000 0 0 9 9"])
    src = open_dataset(tmp_path)
    assert [src.id(i) for i in range(4)] == names
    assert src.classes == ["n01000000", "n02000000", "n03000000"]
    assert [src.label(i) for i in range(4)] == [1, 0, 2, None]  # image 4 has no row
    pixel = src.load(0).getpixel((0, 0))  # val_00000001 was written last, with seed 4 (JPEG: lossy)
    assert max(abs(a - b) for a, b in zip(pixel, _color(4))) <= 3


def test_imagenet_val_ground_truth_txt_is_devkit_order(tmp_path):
    _imagenet_flat(tmp_path / "val", 3)
    (tmp_path / "ILSVRC2012_validation_ground_truth.txt").write_text("490\n361\n171\n")  # in a parent folder
    src = open_dataset(tmp_path / "val")
    assert isinstance(src, ImageNetVal)
    assert [src.label(i) for i in range(3)] == [489, 360, 170]
    assert src.label_order == "devkit" and src.classes is None
    assert src.fingerprint()["label_order"] == "devkit"


# ----------------------------------------------------------------------------- Waterbirds
def test_waterbirds_order_split_and_metadata(tmp_path):
    _waterbirds(tmp_path)
    src = open_dataset(tmp_path)
    assert [src.metadata(i)["img_id"] for i in range(4)] == [1, 2, 3, 4]
    assert [src.label(i) for i in range(4)] == [1, 0, 1, 0]
    assert src.id(0) == "001.Black_footed_Albatross/a.jpg"
    assert src.metadata(0) == {"img_id": 1, "y": 1, "split": "test", "place": 1,
                               "place_filename": "/o/ocean/y.jpg", "group": 3}
    assert src.metadata(1)["group"] == 1 and src.metadata(2)["group"] == 2
    json.dumps([src.metadata(i) for i in range(4)])
    test = open_dataset(tmp_path, split="test")
    assert [test.id(i) for i in range(len(test))] == ["001.Black_footed_Albatross/a.jpg",
                                                      "001.Black_footed_Albatross/d.jpg"]
    assert [Waterbirds(tmp_path, "train").metadata(0)["img_id"]] == [3]
    assert test.fingerprint() != src.fingerprint()
    with pytest.raises(InputError, match="unknown split 'dev'"):
        Waterbirds(tmp_path, "dev")


def test_waterbirds_missing_columns_named(tmp_path):
    _waterbirds(tmp_path, columns=("img_id", "img_filename", "y", "split"))
    with pytest.raises(InputError, match="place, place_filename"):
        Waterbirds(tmp_path)
    assert isinstance(open_dataset(tmp_path), ImageFolder)  # not detected as Waterbirds


# ----------------------------------------------------------------------------- batches
def test_bad_items_are_skipped_with_reasons(tmp_path):
    good = _mixed_folder(tmp_path)
    src = open_dataset(tmp_path)
    batch = load_batch(src, range(0, 5), to16)
    assert isinstance(batch, DatasetBatch)
    assert batch.ids == ["a.png", "b.png", "c.jpg", "d.png", "e.png"]
    assert batch.valid.tolist() == [True, False, False, False, True]
    assert batch.pixels.shape == (2, 3, 16, 16)
    assert torch.equal(batch.pixels[0], to16(Image.open(good[0])))
    assert torch.equal(batch.pixels[1], to16(Image.open(good[1])))
    assert set(batch.skipped) == {"b.png", "c.jpg", "d.png"}
    assert "not an image" in batch.skipped["b.png"]
    assert "truncated" in batch.skipped["c.jpg"]
    assert "smaller than" in batch.skipped["d.png"]
    assert batch.labels == [None] * 5


def test_all_invalid_batch_has_no_pixels(tmp_path):
    _mixed_folder(tmp_path)
    batch = load_batch(open_dataset(tmp_path), range(1, 4), to16)
    assert batch.pixels is None
    assert batch.valid.dtype == torch.bool and not batch.valid.any()
    assert batch.rows == range(1, 4) and len(batch.skipped) == 3


def test_transform_failure_skips_only_that_item(tmp_path):
    _png(tmp_path / "a.png", 1)
    _png(tmp_path / "b.png", 2, size=(30, 30))
    _png(tmp_path / "c.png", 3)
    batch = load_batch(open_dataset(tmp_path), range(3), picky)
    assert batch.valid.tolist() == [True, False, True]
    assert "transform failed" in batch.skipped["b.png"] and "4 channels" in batch.skipped["b.png"]
    assert batch.pixels.shape[0] == 2


def raw(image: Image.Image) -> torch.Tensor:
    """A transform without resizing: [3, H, W] uint8."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def test_item_of_another_shape_is_skipped(tmp_path):
    _png(tmp_path / "a.png", 1, size=(20, 12))
    _png(tmp_path / "b.png", 2, size=(12, 20))
    _png(tmp_path / "c.png", 3, size=(20, 12))
    batch = load_batch(open_dataset(tmp_path), range(3), raw)
    assert batch.valid.tolist() == [True, False, True]
    assert "differs" in batch.skipped["b.png"] and batch.pixels.shape == (2, 3, 12, 20)


def test_chunk_rows_and_last_partial_chunk(tmp_path):
    for k in range(10):
        _png(tmp_path / f"{k:02d}.png", k + 1)
    src = open_dataset(tmp_path)
    assert chunk_rows(2, 4, 10) == range(8, 10)
    got = list(iter_batches(src, to16, 4, [2, 0]))
    assert [c for c, _ in got] == [2, 0]
    assert got[0][1].rows == range(8, 10) and got[0][1].ids == ["08.png", "09.png"]
    assert got[1][1].pixels.shape == (4, 3, 16, 16)
    with pytest.raises(InputError, match="chunk 3 is out of range"):
        list(iter_batches(src, to16, 4, [3]))
    with pytest.raises(InputError, match="batch size"):
        list(iter_batches(src, to16, 0, [0]))


def _same(a: DatasetBatch, b: DatasetBatch) -> None:
    assert a.rows == b.rows and a.ids == b.ids and a.labels == b.labels and a.skipped == b.skipped
    assert torch.equal(a.valid, b.valid)
    assert (a.pixels is None) == (b.pixels is None)
    if a.pixels is not None:
        assert torch.equal(a.pixels, b.pixels)


def test_workers_give_identical_results(tmp_path):
    _mixed_folder(tmp_path / "a_bad")
    for k in range(9):
        _jpeg(tmp_path / "b_good" / f"{k}.jpg", k)
    src = open_dataset(tmp_path)
    chunks = [3, 0, 2, 1]
    plain = list(iter_batches(src, to16, 4, chunks))
    workers = list(iter_batches(src, to16, 4, chunks, num_workers=2, prefetch=1))
    assert [c for c, _ in plain] == [c for c, _ in workers] == chunks
    for (_, a), (_, b) in zip(plain, workers):
        _same(a, b)
    assert plain[1][1].labels == [0, 0, 0, 0] and plain[0][1].rows == range(12, 14)


# ----------------------------------------------------------------------------- fingerprint
def test_fingerprint_tracks_dataset_changes(tmp_path):
    _png(tmp_path / "a.png", 1)
    _png(tmp_path / "b.png", 2)
    first = open_dataset(tmp_path).fingerprint()
    json.dumps(first)
    assert first["kind"] == "folder" and first["n"] == 2
    assert open_dataset(tmp_path).fingerprint() == first
    _png(tmp_path / "c.png", 3)
    added = open_dataset(tmp_path).fingerprint()
    assert added != first and added["n"] == 3
    (tmp_path / "c.png").rename(tmp_path / "d.png")
    renamed = open_dataset(tmp_path).fingerprint()
    assert renamed["n"] == 3 and renamed["sha256"] != added["sha256"]
    _jpeg(tmp_path / "d.png", 9)  # same name, different content size
    assert open_dataset(tmp_path).fingerprint()["sha256"] != renamed["sha256"]


# ----------------------------------------------------------------------------- ImageNet-Segmentation
def test_segmentation_mat_orientation_and_ids(seg_mat):
    images, masks = _seg_arrays()
    src = open_dataset(seg_mat)
    assert len(src) == 3 and src.name == "imagenet-seg"
    assert [src.id(i) for i in range(3)] == ["imagenet-seg/00000", "imagenet-seg/00001", "imagenet-seg/00002"]
    for i in (0, 1):
        image = src.load(i)
        assert image.mode == "RGB" and image.size == (14, 10)  # PIL (W, H)
        np.testing.assert_array_equal(np.asarray(image), images[i])
        mask = src.mask(i)
        assert mask.shape == (10, 14)
        np.testing.assert_array_equal(mask, masks[i])
    assert src.mask(0)[0, 8] == 1 and src.mask(0)[0, 9] == 0 and src.mask(0)[4, 0] == 0
    assert src.metadata(1) == {"index": 1, "source_id": "n02085620_7"}
    assert src.label(0) is None
    with pytest.raises(InputError, match="smaller than"):
        src.load(2)
    fp = src.fingerprint()
    assert fp["kind"] == "imagenet-seg" and fp["n"] == 3 and fp["file_size"] == seg_mat.stat().st_size


def test_segmentation_reopens_in_workers(seg_mat):
    src = ImageNetSegmentation(seg_mat)
    src.load(0)  # opens the file in this process
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone.mask(1), src.mask(1))
    plain = list(iter_batches(src, to16, 2, [1, 0]))
    workers = list(iter_batches(src, to16, 2, [1, 0], num_workers=2))
    for (_, a), (_, b) in zip(plain, workers):
        _same(a, b)
    assert plain[0][1].valid.tolist() == [False] and "smaller than" in plain[0][1].skipped["imagenet-seg/00002"]
    assert plain[1][1].pixels.shape == (2, 3, 16, 16)


def test_segmentation_reopens_after_fork(seg_mat, monkeypatch):
    src = ImageNetSegmentation(seg_mat)
    first = src._file()
    assert src._file() is first
    monkeypatch.setattr("os.getpid", lambda: -1)  # as in a forked DataLoader worker
    assert src._file() is not first
    np.testing.assert_array_equal(src.mask(0), _seg_arrays()[1][0])


def test_segmentation_missing_datasets_named(tmp_path):
    path = tmp_path / "other.mat"
    with h5py.File(path, "w") as f:
        f.create_group("value").create_dataset("img", (1, 1), dtype=h5py.ref_dtype)
    with pytest.raises(InputError, match="/value/gt"):
        ImageNetSegmentation(path)


def test_import_stays_light():
    code = ("import sys, vitdecomp.data, vitdecomp.data.datasets; "
            "print(sorted(m for m in ('torch', 'h5py', 'PIL', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
