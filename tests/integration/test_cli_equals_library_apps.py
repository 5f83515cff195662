"""Each applications command is a thin shell over one library function: what it writes equals that function's result.

For ``heatmap``, ``retrieve``, ``segment``, ``debias``, ``decompose``, ``demo`` and ``synth`` the command is run
through ``main([...])`` and the same work is done by calling the library function a Python user would call
(:func:`~vitdecomp.apps.heatmap_run.heatmaps_for_images`, :func:`~vitdecomp.apps.retrieve.search_store`,
:func:`~vitdecomp.apps.segmentation.harness.segmentation_benchmark`, :func:`~vitdecomp.apps.debias.run_debias`,
:func:`~vitdecomp.store.image_run.decompose_images`, :func:`~vitdecomp.synth.demo.run_demo`,
:func:`~vitdecomp.synth.dataset.generate_dataset` / :func:`~vitdecomp.synth.train.train_tiny`); the command's JSON
minus its run record (and wall-clock times) must equal the function's ``to_json()``. A command that kept some
analysis of its own (or dropped an option on the way) fails here. Everything runs offline on the shipped tiny
models and a few dozen generated scenes.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")
pytest.importorskip("timm")

from vitdecomp.cli.main import main
from vitdecomp.core.shipped import shipped_path
from vitdecomp.store.provenance import jsonable

CLIP = f"open_clip:local-dir:{shipped_path('clip')}"
VIT = "synth:vit"  # the shipped tiny timm ViT classifier: fixed weights, so two loads give the same numbers
N_IMAGES = 24


def plain(value):
    """As the command writes it: JSON-able (paths as strings, NaN as null), through a JSON round trip."""
    return json.loads(json.dumps(jsonable(value)))


def without(payload: dict, *keys: str) -> dict:
    return {k: v for k, v in payload.items() if k not in keys}


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A generated dataset (one train split, with masks and task.json) and a store of the tiny CLIP over it."""
    from vitdecomp.synth import generate_dataset

    root = tmp_path_factory.mktemp("apps")
    generate_dataset(root / "data", N_IMAGES, seed=5, task="colour", splits=(N_IMAGES, 0, 0))
    store = root / "clip.zarr"
    assert main(["-q", "decompose", CLIP, str(root / "data" / "train"), "--out", str(store), "--batch-size", "12"]) == 0
    images = sorted((root / "data" / "train").rglob("*.png"))
    return {"root": root, "data": root / "data", "train": root / "data" / "train", "store": store, "images": images}


# ----------------------------------------------------------------------------- heatmap
def test_heatmap_cli_equals_heatmaps_for_images(world, tmp_path):
    from vitdecomp.apps.heatmap_run import heatmaps_for_images

    images = world["images"][:3]
    options = ["--text", "a red object", "--contrast", "a blue object", "--layers", "2-3", "--max-side", "48"]
    assert main(["-q", "heatmap", *map(str, images), "--model", CLIP, *options, "--out", str(tmp_path / "cli")]) == 0
    written = read(tmp_path / "cli" / "heatmaps.json")
    run = heatmaps_for_images(CLIP, images, text="a red object", contrast="a blue object", layers="2-3",
                              max_side=48, out=tmp_path / "lib", progress=False)
    assert without(written, "run") == plain(run.to_json())
    assert written["run"]["command"] == "heatmap" and written["start_layer"] == run.start_layer == 0
    assert run.components and all(c.startswith(("L02.", "L03.")) for c in run.components)  # blocks 2-3 only
    assert not run.all_components
    for rec in written["images"]:  # the same figures, byte for byte
        for key in ("overlay", "panel"):
            assert (tmp_path / "cli" / rec[key]).read_bytes() == (tmp_path / "lib" / rec[key]).read_bytes()
    # without a folder nothing is drawn, and the numbers are the same
    bare = heatmaps_for_images(CLIP, images, text="a red object", contrast="a blue object", layers="2-3",
                               max_side=48, progress=False)
    assert [r["overlay"] for r in bare.images] == [None] * 3
    assert [r["values"] for r in bare.images] == [r["values"] for r in run.images]


# ----------------------------------------------------------------------------- retrieve
def test_retrieve_cli_equals_search_store(world, tmp_path, capsys):
    from vitdecomp.apps.retrieve import search_store
    from vitdecomp.synth.generator import factor_phrases

    index = tmp_path / "idx"
    common = ["--k", "4", "--backend", "numpy", "--index-dir", str(index)]
    assert main(["retrieve", str(world["store"]), "--text", "a red object", "--text", "a green object", "--feature",
                 "colour", "--features", "synth", "--out", str(tmp_path / "text"), *common]) == 0
    written = read(tmp_path / "text" / "results.json")
    result = search_store(world["store"], text=["a red object", "a green object"], feature="colour",
                          features=factor_phrases(), k=4, backend="numpy", index_dir=index)
    assert without(written, "run") == plain(result.to_json())
    assert result.format_table() in capsys.readouterr().out  # the printed table is the result's own
    assert [g["name"] for g in written["groups"]] == ["colour#0", "full"]

    # image queries (an id and an image path under the recorded dataset root), explicit components, --json
    query = written["queries"][0]["results"]["full"][0]["id"]
    assert main(["retrieve", str(world["store"]), "--image", query, "--image", str(world["train"] / query),
                 "--components", "L03.H00,L02.H01", "--json", *common]) == 0
    shown = json.loads(capsys.readouterr().out)
    result = search_store(world["store"], image=[query, str(world["train"] / query)],
                          components=["L03.H00", "L02.H01"], k=4, backend="numpy", index_dir=index)
    assert without(shown, "run") == plain(result.to_json())
    assert [q["query"] for q in shown["queries"]] == [query, query]


# ----------------------------------------------------------------------------- segment
def test_segment_cli_equals_segmentation_benchmark(world, tmp_path):
    from vitdecomp.apps.segmentation.harness import segmentation_benchmark

    assert main(["-q", "segment", "--pairs", str(world["data"]), "--model", CLIP, "--methods", "decomposition",
                 "raw_attention", "--limit", "8", "--batch-size", "4", "--no-progress", "--examples", "1",
                 "--out", str(tmp_path / "cli")]) == 0
    written = read(tmp_path / "cli" / "results.json")
    run = segmentation_benchmark(CLIP, world["data"], methods=["decomposition", "raw_attention"], limit=8,
                                 batch_size=4, n_examples=1)
    timing = ("seconds",)
    assert without(written, "run", "figures", *timing) == without(plain(run.to_json()), *timing)
    files, facts = run.inputs()
    assert written["run"]["extra"] == plain(facts)  # the dataset's own class texts, recorded the same way
    assert set(written["run"]["files"]) == set(files) == {"task"}
    assert written["figures"] and (tmp_path / "cli" / written["figures"][0]).is_file()


# ----------------------------------------------------------------------------- debias
def test_debias_cli_equals_run_debias(tmp_path):
    from vitdecomp.apps.debias import run_debias
    from vitdecomp.synth import generate_dataset

    root = tmp_path / "wb"
    generate_dataset(root, 60, seed=2, task="colour", spurious=0.95)
    options = ["--k", "2", "--random-draws", "3", "--templates", "plain", "--batch-size", "30"]
    assert main(["-q", "debias", str(root), "--model", CLIP, "--store-dir", str(tmp_path / "stores"), *options,
                 "--out", str(tmp_path / "cli")]) == 0
    written = read(tmp_path / "cli" / "debias.json")
    run = run_debias(root, CLIP, store_dir=tmp_path / "stores", k=2, random_draws=3, templates="plain",
                     batch_size=30)  # the stores the command made are reused
    assert without(written, "run") == plain(run.to_json())
    assert written["texts"]["from_arguments"] == ["templates"] and written["selected"] == run.result.selected
    # the existing stores, given as stores (the model comes from their record)
    stores = {s: tmp_path / "stores" / s for s in ("val", "test")}  # no train store: a zero-shot head
    again = run_debias(root, stores=stores, k=2, random_draws=3, templates="plain")
    assert plain(again.to_json()) == plain(run.to_json())


# ----------------------------------------------------------------------------- decompose
def test_decompose_cli_equals_decompose_images(world, tmp_path, capsys):
    from vitdecomp.store.image_run import decompose_images

    images = world["images"][:3]
    assert main(["-q", "decompose", VIT, *map(str, images), "--top", "3", "--json", "--out",
                 str(tmp_path / "stack.safetensors")]) == 0
    shown = json.loads(capsys.readouterr().out)
    result = decompose_images(VIT, images, top=3)
    assert without(shown, "saved") == plain(result.to_json())
    assert [r["image"] for r in shown["rows"]] == [0, 1, 2] and "logit_top" in shown["rows"][0]  # a classifier
    assert shown["saved"] == str(tmp_path / "stack.safetensors")


def test_decompose_dataset_cli_equals_decompose_dataset(world, tmp_path, capsys):
    from vitdecomp.core.loading import load
    from vitdecomp.store.dataset_run import decompose_dataset

    assert main(["-q", "decompose", VIT, str(world["train"]), "--out", str(tmp_path / "a.zarr"), "--batch-size", "12",
                 "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    run = decompose_dataset(load(VIT), world["train"], tmp_path / "b.zarr", batch_size=12)
    summary = plain(run.summary())
    for payload in (shown, summary):  # where it went and how long it took differ; nothing else
        payload.pop("store")
        payload["this_run"].pop("seconds"), payload["this_run"].pop("images_per_s")
    assert shown == summary and shown["complete"] and shown["counts"]["valid"] == N_IMAGES


# ----------------------------------------------------------------------------- demo
def test_demo_cli_equals_run_demo(world, tmp_path):
    from vitdecomp.synth.demo import DemoConfig, run_demo

    folder = world["train"]
    assert main(["-q", "demo", "--model", VIT, "--images", str(folder), "--n-images", "20",
                 "--out", str(tmp_path / "cli")]) == 0
    written = read(tmp_path / "cli" / "results.json")
    results = run_demo(tmp_path / "lib", model=VIT, images=folder, config=DemoConfig.for_run(model=VIT, n_images=20))
    timing = ("seconds", "stage_seconds")
    assert without(written, *timing) == without(plain(results), *timing)
    assert written["n_images"] == 20


# ----------------------------------------------------------------------------- synth
def test_synth_generate_and_train_cli_equal_the_library(tmp_path, capsys):
    from vitdecomp.synth import generate_dataset
    from vitdecomp.synth.train import train_tiny

    assert main(["synth", "generate", str(tmp_path / "g"), "--n", "12", "--seed", "4", "--class-factor", "colour",
                 "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    summary = generate_dataset(tmp_path / "h", 12, seed=4, task="colour")
    assert shown == json.loads(json.dumps(summary).replace(str(tmp_path / "h"), str(tmp_path / "g")))
    for name in ("factors.csv", "task.json"):
        assert (tmp_path / "g" / name).read_bytes() == (tmp_path / "h" / name).read_bytes()

    assert main(["synth", "train", "vit", "--out", str(tmp_path / "t1"), "--steps", "2", "--batch-size", "8",
                 "--eval-n", "0", "--task", "colour", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    _, info = train_tiny("vit", steps=2, batch_size=8, eval_n=0, task="colour", out_path=tmp_path / "t2")
    timing = ("train_seconds",)
    assert without(shown, *timing) == without(plain(info), *timing)
    for path in (tmp_path / "t1").glob("*.safetensors"):  # the same weights, from the same seed
        assert path.read_bytes() == (tmp_path / "t2" / path.name).read_bytes()
