"""The synthetic world generator (vitdecomp.synth): determinism, exact masks, captions, datasets on disk."""
from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitdecomp.data.datasets import ImageFolder, Waterbirds, open_dataset
from vitdecomp.errors import InputError
from vitdecomp.synth import (
    BACKGROUNDS,
    COLOURS,
    OBJECT_FACTORS,
    PAINT_COLOURS,
    PATTERNS,
    POSITIONS,
    SCENE_FACTORS,
    SHADES,
    SHAPES,
    SIZES,
    SPURIOUS_GROUPS,
    VOCABULARY,
    Scene,
    SceneObject,
    caption,
    describe,
    generate_dataset,
    partial_captions,
    read_factors,
    read_masks,
    render,
    render_array,
    sample_scene,
)
from vitdecomp.synth.shapes import RADIUS, render_background, shape_mask


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _painted(image: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.all(image == np.asarray(rgb, dtype=np.uint8), axis=-1)


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- vocabulary
def test_palette_is_far_apart_and_reserved() -> None:
    for (a, x), (b, y) in itertools.combinations(COLOURS.items(), 2):
        assert np.linalg.norm(np.subtract(x, y)) >= 90, (a, b)
    assert len(set(COLOURS.values()) | set(SHADES.values())) == 2 * len(COLOURS) == len(PAINT_COLOURS)
    # the background fix-up (flip the red LSB) can never turn one painted colour into another
    for p, q in itertools.combinations(PAINT_COLOURS, 2):
        assert not (p[1:] == q[1:] and p[0] ^ 1 == q[0])


@pytest.mark.parametrize("kind", BACKGROUNDS)
def test_backgrounds_are_seeded_and_free_of_painted_colours(kind: str) -> None:
    a = render_background(kind, np.random.default_rng(3), 64)
    b = render_background(kind, np.random.default_rng(3), 64)
    c = render_background(kind, np.random.default_rng(4), 64)
    assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    for rgb in PAINT_COLOURS:
        assert not _painted(a, rgb).any()
    assert a.std() > 1.0  # textured, not flat


def test_water_is_blue_and_land_is_green_brown() -> None:
    water = np.mean([render_background("water", np.random.default_rng(s), 64).reshape(-1, 3).mean(0)
                     for s in range(4)], axis=0)
    land = np.mean([render_background("land", np.random.default_rng(s), 64).reshape(-1, 3).mean(0)
                    for s in range(4)], axis=0)
    assert water[2] > water[1] > water[0]
    assert land[1] > land[2] and land[0] > land[2]


# ----------------------------------------------------------------------------- render
def test_same_seed_same_bytes_different_seed_different_image() -> None:
    scene_a = sample_scene(np.random.default_rng(11), n_objects=2)
    assert scene_a == sample_scene(np.random.default_rng(11), n_objects=2)
    assert scene_a == sample_scene(11, n_objects=2)  # an int seed is the same generator
    img1, masks1 = render(scene_a)
    img2, masks2 = render(scene_a)
    assert img1.mode == "RGB" and img1.size == (64, 64)
    assert _png_bytes(img1) == _png_bytes(img2)
    assert all(np.array_equal(m1, m2) for m1, m2 in zip(masks1, masks2))
    scene_b = sample_scene(np.random.default_rng(12), n_objects=2)
    assert _png_bytes(render(scene_b)[0]) != _png_bytes(img1)
    # same factors, other seed: other background texture
    reseeded = Scene(scene_a.objects, scene_a.background, scene_a.seed + 1)
    assert _png_bytes(render(reseeded)[0]) != _png_bytes(img1)


def test_changing_one_factor_with_the_same_seed_changes_only_that_object() -> None:
    obj = SceneObject("star", "red", "striped", "large", "left")
    a = Scene((obj,), "water", 5)
    b = Scene((SceneObject("star", "blue", "striped", "large", "left"),), "water", 5)
    (ia, [ma]), (ib, [mb]) = render_array(a), render_array(b)
    assert np.array_equal(ma, mb)
    assert np.array_equal(ia[~ma], ib[~mb])
    assert (ia[ma] != ib[mb]).any(axis=-1).all()


@pytest.mark.parametrize("seed", range(6))
def test_masks_are_exactly_the_painted_pixels(seed: int) -> None:
    scene = sample_scene(np.random.default_rng(seed), n_objects=1)
    image, (mask,) = render_array(scene)
    obj = scene.main
    base, shade = _painted(image, COLOURS[obj.colour]), _painted(image, SHADES[obj.colour])
    assert mask.dtype == bool and mask.shape == (64, 64) and mask.any()
    assert np.array_equal(mask, base | shade)  # inside: only the object's colours; outside: never them
    if obj.pattern == "solid":
        assert np.array_equal(mask, base)
    elif obj.size == "large":
        assert base.any() and shade.any()
    any_painted = np.zeros_like(mask)
    for rgb in PAINT_COLOURS:
        any_painted |= _painted(image, rgb)
    assert np.array_equal(any_painted, mask)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_patterns_paint_base_and_shade(pattern: str) -> None:
    image, (mask,) = render_array(Scene((SceneObject("square", "green", pattern, "large", "centre"),), "plain", 1))
    shade_share = _painted(image, SHADES["green"])[mask].mean()
    assert (shade_share == 0) if pattern == "solid" else (0.1 < shade_share < 0.7)


@pytest.mark.parametrize("shape", SHAPES)
def test_large_objects_are_several_times_the_area_of_small_ones(shape: str) -> None:
    areas = {size: render_array(Scene((SceneObject(shape, "white", "solid", size, "centre"),), "sky", 2))[1][0].sum()
             for size in SIZES}
    assert 3.0 < areas["large"] / areas["small"] < 5.0
    assert areas["small"] > 40  # still clearly visible at 64 px


def test_occlusion_later_object_wins_and_masks_are_disjoint() -> None:
    back = SceneObject("square", "red", "solid", "large", "centre")
    front = SceneObject("circle", "blue", "dotted", "small", "centre")
    scene = Scene((back, front), "land", 9)
    image, (m_back, m_front) = render_array(scene)
    assert not (m_back & m_front).any()
    alone_back = render_array(Scene((back,), "land", 9))[1][0]
    # the front object is whole; the back object lost exactly the pixels the front one covers
    assert np.array_equal(m_back | m_front, alone_back | m_front)
    assert np.array_equal(m_back, alone_back & ~m_front)
    assert m_front.sum() > 0 and (alone_back & m_front).sum() == m_front.sum()
    assert np.array_equal(_painted(image, COLOURS["red"]), m_back)
    assert np.array_equal(_painted(image, COLOURS["blue"]) | _painted(image, SHADES["blue"]), m_front)


@pytest.mark.parametrize("size", [64, 96])
def test_mask_centroid_lies_in_the_named_cell(size: int) -> None:
    for position, shape, obj_size in itertools.product(POSITIONS, SHAPES, SIZES):
        for seed in (0, 1):
            scene = Scene((SceneObject(shape, "yellow", "solid", obj_size, position),), "plain", seed)
            (mask,) = render_array(scene, size)[1]
            ys, xs = np.nonzero(mask)
            row, col = divmod(POSITIONS.index(position), 3)
            cy, cx = (ys + 0.5).mean(), (xs + 0.5).mean()
            assert row * size / 3 < cy < (row + 1) * size / 3, (position, shape, obj_size)
            assert col * size / 3 < cx < (col + 1) * size / 3, (position, shape, obj_size)
            assert not (mask[0].any() and mask[-1].any())  # never wraps around / spans the whole image


def test_shape_masks_are_geometric() -> None:
    circle = shape_mask("circle", 32.0, 32.0, 10.0, 64)
    assert abs(circle.sum() - np.pi * 100) < 15
    square = shape_mask("square", 32.0, 32.0, 10.0, 64)
    side = int(square.any(0).sum())
    assert square.sum() == side * side
    for shape in SHAPES:
        m = shape_mask(shape, 32.0, 32.0, RADIUS["large"] * 64, 64)
        assert np.array_equal(m, m[:, ::-1])  # every shape is mirror-symmetric about the vertical axis


def test_render_rejects_tiny_sizes_and_bad_factors() -> None:
    with pytest.raises(InputError):
        render_array(Scene((SceneObject("circle", "red"),)), 8)
    with pytest.raises(InputError):
        SceneObject("hexagon", "red")
    with pytest.raises(InputError):
        SceneObject("circle", "magenta")
    with pytest.raises(InputError):
        Scene((SceneObject("circle", "red"),), "lava")
    with pytest.raises(InputError):
        Scene(())


# ----------------------------------------------------------------------------- captions
def test_full_caption_names_every_factor() -> None:
    scene = Scene((SceneObject("triangle", "red", "striped", "small", "top-left"),), "water", 0)
    assert caption(scene) == "a small red striped triangle at the top left on water"
    two = Scene((SceneObject("circle", "orange", "solid", "large", "centre"),
                 SceneObject("star", "blue", "dotted", "small", "bottom-right")), "sky", 0)
    assert caption(two) == ("a large orange solid circle in the centre and "
                            "a small blue dotted star at the bottom right in the sky")


def test_partial_captions_name_only_the_asked_attributes() -> None:
    scene = Scene((SceneObject("triangle", "orange", "checkered", "large", "bottom"),
                   SceneObject("cross", "white", "solid", "small", "top")), "land", 0)
    assert caption(scene, ("colour",)) == "an orange object"
    assert caption(scene, ("color",)) == "an orange object"
    assert caption(scene, ("shape", "background")) == "a triangle on land"
    assert caption(scene, ("size", "pattern", "position")) == "a large checkered object at the bottom"
    assert caption(scene, ()) == "an object"
    assert caption(scene, "texture") == "a checkered object"
    words = {f: set(" ".join(VOCABULARY[f]).replace("-", " ").split()) for f in SCENE_FACTORS}
    for attrs in itertools.combinations(SCENE_FACTORS, 2):
        text = set(caption(scene, attrs).split())
        for factor in SCENE_FACTORS:
            value = getattr(scene.main, factor) if factor in OBJECT_FACTORS else scene.background
            if factor in attrs:
                assert set(value.replace("-", " ").split()) <= text
            elif factor != "position":  # position words ("top"...) are generic; checked below
                assert not (words[factor] & text), (attrs, factor, text)
    assert "white" not in caption(scene, ("colour", "shape"))  # partial captions describe the main object only
    with pytest.raises(InputError):
        caption(scene, ("weight",))


def test_partial_captions_are_seeded_distinct_and_short() -> None:
    scene = sample_scene(3)
    a = partial_captions(scene, np.random.default_rng(0), n=5)
    assert a == partial_captions(scene, np.random.default_rng(0), n=5)
    assert len(a) == len(set(a)) == 5
    full = set(caption(scene).split())
    for text in a:
        assert set(text.split()) - {"an", "a", "object"} <= full
        assert text != caption(scene)
    assert len(partial_captions(scene, np.random.default_rng(0), n=100, max_attributes=1)) == len(SCENE_FACTORS)


def test_describe_gives_one_attribute_texts() -> None:
    assert describe("colour", "red") == "a red object"
    assert describe("shape", "star") == "a star"
    assert describe("background", "water") == "an object on water"
    assert describe("position", "top-right") == "an object at the top right"
    texts = [describe(f, v) for f in SCENE_FACTORS for v in VOCABULARY[f]]
    assert len(texts) == len(set(texts))


# ----------------------------------------------------------------------------- sampling
def test_sample_scene_fixed_shared_and_objects() -> None:
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, n_objects=(1, 2), fixed={"color": "blue", "background": "sand"}, shared=("shape",))
              for _ in range(30)]
    assert {len(s.objects) for s in scenes} == {1, 2}
    for s in scenes:
        assert s.main.colour == "blue" and s.background == "sand"
        assert len({o.position for o in s.objects}) == len(s.objects)
        assert all(o.shape == s.main.shape for o in s.objects)
    assert len({s.main.shape for s in scenes}) > 2 and len({s.seed for s in scenes}) == 30
    with pytest.raises(InputError):
        sample_scene(0, fixed={"colour": "teal"})
    with pytest.raises(InputError):
        sample_scene(0, n_objects=0)
    with pytest.raises(InputError):
        sample_scene(0, shared=("position",))


def test_scene_factors_round_trip() -> None:
    scene = sample_scene(4, n_objects=2)
    row = {k: str(v) for k, v in scene.factors().items()}
    assert Scene.from_factors(row) == scene


# ----------------------------------------------------------------------------- datasets
def test_plain_dataset_is_an_image_folder_per_split(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    summary = generate_dataset(root, 24, seed=0, task="shape", splits=(14, 5, 5), n_objects=(1, 2))
    assert summary == json.loads((root / "summary.json").read_text())
    assert summary["kind"] == "folder" and summary["classes"] == sorted(SHAPES)
    assert not (root / "metadata.csv").exists()
    assert open_dataset(root / "train").name == "folder"
    rows = {r["file"]: r for r in read_factors(root)}
    assert len(rows) == 24
    for split, n_split in zip(("train", "val", "test"), (14, 5, 5)):
        source = open_dataset(root / split)
        assert isinstance(source, ImageFolder) and len(source) == n_split == summary["splits"][split]["n"]
        assert source.classes == sorted(SHAPES)
        counts = {c: 0 for c in source.classes}
        for i in range(len(source)):
            row = rows[f"{split}/{source.id(i)}"]
            assert source.classes[source.label(i)] == row["obj0_shape"] == row["class"]
            assert int(row["label"]) == source.label(i)
            assert all(row[f"obj{k}_shape"] == row["obj0_shape"] for k in range(int(row["n_objects"])))
            counts[row["class"]] += 1
        assert counts == summary["splits"][split]["classes"]
        assert max(counts.values()) - min(counts.values()) <= 1  # classes balanced within a split
    # masks on disk are the exact masks of the scene each row describes
    n_masks = 0
    for file, row in rows.items():
        scene = Scene.from_factors(row)
        image, masks = render_array(scene, 64)
        assert np.array_equal(np.asarray(Image.open(root / file).convert("RGB")), image)
        assert all(np.array_equal(a, b) for a, b in zip(read_masks(root, row), masks))
        assert row["caption"] == caption(scene)
        n_masks += len(masks)
    assert n_masks == summary["n_masks"] == len(list((root / "masks").glob("*.png")))
    assert sum(1 for _ in root.glob("*/*/*.png")) == 24


def test_dataset_files_are_deterministic(tmp_path: Path) -> None:
    kwargs = dict(seed=3, task="colour", splits=(7, 3, 2), n_objects=(1, 2))
    generate_dataset(tmp_path / "a", 12, **kwargs)
    generate_dataset(tmp_path / "b", 12, **kwargs)
    a, b = _tree_digest(tmp_path / "a"), _tree_digest(tmp_path / "b")
    assert a == b and len(a) > 12
    generate_dataset(tmp_path / "c", 12, **{**kwargs, "seed": 4})
    c = _tree_digest(tmp_path / "c")
    assert {k: v for k, v in a.items() if k.endswith(".png")} != {k: v for k, v in c.items() if k.endswith(".png")}


def test_spurious_dataset_is_a_waterbirds_root(tmp_path: Path) -> None:
    root = tmp_path / "wb"
    summary = generate_dataset(root, 64, seed=1, task="shape", spurious=0.95, splits=(40, 12, 12))
    assert summary["kind"] == "waterbirds" and summary["classes"] == ["landobject", "waterobject"]
    source = open_dataset(root)
    assert isinstance(source, Waterbirds) and len(source) == 64
    groups: dict[str, dict[int, int]] = {s: {g: 0 for g in range(4)} for s in ("train", "val", "test")}
    factors = {r["file"]: r for r in read_factors(root)}
    for i in range(len(source)):
        meta = source.metadata(i)
        groups[meta["split"]][meta["group"]] += 1
        row = factors[source.id(i)]
        assert row["background"] == meta["place_filename"] == ("water" if meta["place"] else "land")
        assert row["obj0_shape"] in SPURIOUS_GROUPS["shape"][source.label(i)]
    train = groups["train"]
    assert sum(train.values()) == 40
    aligned = (train[0] + train[3]) / 40  # landobject on land + waterobject on water
    assert aligned == pytest.approx(0.95, abs=0.03)
    assert train[0] + train[1] == train[2] + train[3] == 20  # classes balanced
    for split in ("val", "test"):
        assert len(set(groups[split].values())) == 1  # 3 per group: balanced
    for split in ("train", "val", "test"):
        assert {str(g): c for g, c in groups[split].items()} == summary["splits"][split]["groups"]
        assert len(open_dataset(root, split=split)) == summary["splits"][split]["n"]
    # each split folder is also an ImageFolder whose labels are y
    train_folder = open_dataset(root / "train")
    assert train_folder.classes == ["landobject", "waterobject"]
    wb_train = open_dataset(root, split="train")
    assert sorted((train_folder.id(i), train_folder.label(i)) for i in range(len(train_folder))) == sorted(
        (wb_train.id(i).removeprefix("train/"), wb_train.label(i)) for i in range(len(wb_train)))
    with open(root / "metadata.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert header == ["img_id", "img_filename", "y", "split", "place", "place_filename"]
    # the image really shows the background its metadata names (water is bluer than land)
    blue = {0: [], 1: []}
    for i in range(len(source)):
        pixels = np.asarray(source.load(i), dtype=np.float64)
        blue[source.metadata(i)["place"]].append(pixels[..., 2].mean() - pixels[..., 1].mean())
    assert min(blue[1]) > max(blue[0])


def test_generate_dataset_refuses_bad_arguments_and_existing_output(tmp_path: Path) -> None:
    generate_dataset(tmp_path / "x", 6, seed=0, task="size", splits=(4, 1, 1))
    with pytest.raises(InputError, match="overwrite"):
        generate_dataset(tmp_path / "x", 6, seed=0, task="size", splits=(4, 1, 1))
    (tmp_path / "x" / "keep.txt").write_text("mine")
    summary = generate_dataset(tmp_path / "x", 5, seed=0, task="size", splits=(3, 1, 1), overwrite=True)
    assert summary["n"] == 5 and len(read_factors(tmp_path / "x")) == 5
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"
    for kwargs in ({"task": "weight"}, {"task": "shape", "fixed": {"shape": "star"}},
                   {"task": "background", "spurious": 0.9}, {"task": "position", "spurious": 0.9},
                   {"task": "position", "n_objects": 2}, {"task": "shape", "spurious": 1.5},
                   {"task": "shape", "splits": (5, 5, 5)}, {"task": "shape", "splits": (0.5, 0.2, 0.2)},
                   {"task": "shape", "spurious": 0.9, "groups": (("circle",), ("circle", "star"))}):
        with pytest.raises(InputError):
            generate_dataset(tmp_path / "bad", 10, seed=0, **kwargs)
