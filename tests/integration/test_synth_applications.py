"""The synthetic world fits the applications: ``vitdecomp segment`` reads a generated dataset as it is,
and ``vitdecomp debias`` uses a generated Waterbirds-layout world's own class names and texts."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitdecomp.apps import debias as db
from vitdecomp.errors import InputError
from vitdecomp.apps.segmentation.harness import SegmentationPairs
from vitdecomp.synth.dataset import generate_dataset, read_factors, read_masks, read_task
from vitdecomp.synth.generator import VOCABULARY, Scene, describe, render_array

GROUPS = (("red", "orange", "yellow"), ("green", "blue", "purple", "white"))


def _spec() -> str:
    from vitdecomp.core.shipped import shipped_path

    return f"open_clip:local-dir:{shipped_path('clip')}"


# ----------------------------------------------------------------------------- segment
@pytest.fixture(scope="module")
def seg_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth-seg") / "world"
    summary = generate_dataset(root, 20, seed=5, task="colour", splits=(12, 4, 4), n_objects=(1, 2))
    return root, summary


def test_segment_reads_every_generated_image_with_its_own_object_masks(seg_world):
    root, summary = seg_world
    rows = read_factors(root)
    source = SegmentationPairs(root)
    assert len(source) == 20 and source.task is not None and source.classes == summary["classes"]
    assert source.task == read_task(root) and source.task["class_texts"] == [[describe("colour", c)] for c in
                                                                             summary["classes"]]
    assert any(int(r["n_objects"]) == 2 for r in rows)
    for i, row in enumerate(rows):
        assert source.id(i) == row["file"] and source.label(i) == int(row["label"])
        image, masks = render_array(Scene.from_factors(row), summary["size"])  # the generator, re-run
        union = np.logical_or.reduce(masks)
        mask = source.mask(i)
        assert mask.dtype == bool and mask.shape == image.shape[:2]
        assert np.array_equal(np.asarray(source.load(i)), image)  # the image is the scene ...
        assert np.array_equal(mask, union)  # ... and the mask is its objects, pixel for pixel
        assert int(mask.sum()) == int(np.logical_or.reduce(read_masks(root, row)).sum()) > 0
    test = SegmentationPairs(root, split="test")
    assert [test.id(i) for i in range(len(test))] == [r["file"] for r in rows if r["split"] == "test"]
    assert test.fingerprint()["split"] == "test" and test.fingerprint() != source.fingerprint()
    with pytest.raises(InputError, match="unknown split"):
        SegmentationPairs(root, split="dev")


def test_plain_pairs_folder_is_unchanged_and_refuses_a_split(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(tmp_path / "masks" / "a.png")
    source = SegmentationPairs(tmp_path)
    assert source.task is None and source.id(0) == "images/a.png" and source.mask(0).all()
    assert set(source.fingerprint()) == {"kind", "n", "sha256"}
    with pytest.raises(InputError, match="split applies"):
        SegmentationPairs(tmp_path, split="test")


def test_cli_segment_on_a_generated_dataset_with_its_own_classes(seg_world, tmp_path, capsys):
    from vitdecomp.cli.main import main

    root, summary = seg_world
    out = tmp_path / "seg"
    code = main(["segment", "--pairs", str(root), "--model", _spec(), "--methods", "decomposition", "raw_attention",
                 "--target", "label", "--batch-size", "10", "--examples", "2", "--out", str(out), "--no-progress"])
    assert code == 0
    assert "20 images scored, 0 skipped" in capsys.readouterr().out
    payload = json.loads((out / "results.json").read_text())
    assert payload["n_images"] == 20 and payload["n_skipped"] == 0 and len(payload["items"]) == 20
    assert set(payload["metrics"]) == {"decomposition", "raw_attention"}
    extra = payload["run"]["extra"]
    assert extra["templates"] == "synth" and extra["dataset"]["generated"] is True
    assert extra["classes"]["names"] == [describe("colour", c) for c in summary["classes"]]
    task = root / "task.json"
    assert payload["run"]["files"]["task"]["sha256"] == hashlib.sha256(task.read_bytes()).hexdigest()
    assert len(payload["figures"]) == 2 and all((out / f).is_file() for f in payload["figures"])
    # the CLIP reads colour: with its own class texts the label target is mostly the prediction too
    assert payload["metrics"]["decomposition"]["fg_iou"] > 0.2
    assert main(["segment", "--pairs", str(root), "--split", "val", "--model", _spec(), "--methods", "decomposition",
                 "--no-progress"]) == 0
    assert "4 images scored" in capsys.readouterr().out


# ----------------------------------------------------------------------------- debias texts
def test_debias_texts_of_a_generated_world_are_its_own(tmp_path):
    root = tmp_path / "wb"
    generate_dataset(root, 24, seed=1, task="colour", spurious=0.9, splits=(8, 8, 8))
    texts = db.dataset_texts(root)
    assert texts.source == str(root / "task.json") and texts.templates == "synth"
    assert texts.class_names == tuple(tuple(describe("colour", v) for v in g) for g in GROUPS)
    assert texts.spurious.texts == [describe("background", v) for v in VOCABULARY["background"]]
    assert texts.core.texts == [describe("colour", v) for v in VOCABULARY["colour"]]
    record = texts.describe()
    assert record["class_names"][0] == ["a red object", "an orange object", "a yellow object"]
    assert record["spurious"]["sha256"] and record["spurious"]["texts"][0] == "an object on water"
    task = json.loads((root / "task.json").read_text())
    assert task["task"] == "colour" and task["spurious_factor"] == "background" and task["places"] == ["land", "water"]
    assert task["place_texts"] == ["an object on land", "an object on water"]

    # without task.json the root is read as real Waterbirds (its shipped texts), never half-guessed
    saved = (root / "task.json").read_text()
    (root / "task.json").unlink()
    assert db.dataset_texts(root).source == "waterbirds"
    (root / "task.json").write_text(saved)
    assert db.dataset_texts(root).class_names == texts.class_names
    # a malformed sidecar is a clear error
    (root / "task.json").write_text('{"format": {"name": "something-else"}}')
    with pytest.raises(InputError, match="task description"):
        db.dataset_texts(root)


def test_real_waterbirds_layout_keeps_its_defaults(tmp_path):
    root = tmp_path / "waterbirds"
    (root / "birds").mkdir(parents=True)
    rows = []
    for i in range(8):
        Image.fromarray(np.full((32, 32, 3), 30 * i, np.uint8)).save(root / "birds" / f"{i}.jpg")
        rows.append({"img_id": i, "img_filename": f"birds/{i}.jpg", "y": i % 2, "split": i % 3, "place": (i // 2) % 2,
                     "place_filename": "x"})
    with open(root / "metadata.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert read_task(root) is None
    texts = db.dataset_texts(root)
    assert texts.source == "waterbirds" and texts.templates == "photo"
    assert texts.class_names == (("landbird",), ("waterbird",))
    assert texts.spurious.name == "waterbirds/spurious" and texts.core.name == "waterbirds/core"


def test_cli_debias_on_a_generated_world_uses_and_records_its_texts(tmp_path, capsys):
    from vitdecomp.cli.main import main

    root = tmp_path / "wb"
    assert main(["synth", "generate", str(root), "--n", "60", "--spurious", "0.95", "--class-factor", "colour",
                 "--seed", "2", "-q"]) == 0
    assert "landobject (red/orange/yellow)" in capsys.readouterr().out
    store_dir, out = tmp_path / "stores", tmp_path / "out"
    common = ["--model", _spec(), "--store-dir", str(store_dir), "--head", "linear", "--C", "0.001", "--k", "3",
              "--random-draws", "3", "--batch-size", "30", "-q"]
    assert main(["debias", str(root), *common, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"defaults from {root / 'task.json'}" in printed and "a red object|an orange object" in printed
    payload = json.loads((out / "debias.json").read_text())
    texts = payload["texts"]
    assert texts["source"] == str(root / "task.json") and texts["from_arguments"] == []
    assert texts["class_names"] == [[describe("colour", v) for v in g] for g in GROUPS]
    assert texts["spurious"]["texts"] == [describe("background", v) for v in VOCABULARY["background"]]
    assert texts["core"]["texts"] == [describe("colour", v) for v in VOCABULARY["colour"]]
    assert texts["templates"] == "synth" and payload["run"]["extra"]["templates"] == "synth"
    assert payload["run"]["pool"]["spurious"]["name"] == "synth/background"
    assert payload["run"]["files"]["task"]["sha256"] == hashlib.sha256((root / "task.json").read_bytes()).hexdigest()
    assert len(payload["selected"]) == 3 and len(payload["random"]["draws"]) == 3
    for key in ("baseline", "ablated"):
        assert 0.0 <= payload[key]["worst_group"] <= 1.0
    assert payload["n"]["test"] == 9  # splits 70/15/15 of 60

    # an argument overrides only its own default, and the record says so
    out2 = tmp_path / "out2"
    assert main(["debias", str(root), *common, "--templates", "plain", "--out", str(out2)]) == 0
    again = json.loads((out2 / "debias.json").read_text())["texts"]
    assert again["from_arguments"] == ["templates"] and again["templates"] == "plain"
    assert again["class_names"] == texts["class_names"] and again["spurious"] == texts["spurious"]
