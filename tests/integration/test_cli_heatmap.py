"""`vitdecomp heatmap` end to end on the shipped tiny CLIP and tiny timm ViTs (offline, seconds).

Independent references: the maps are recomputed from full (unprojected) token decompositions
with ``token_heatmap`` after the text embedding, the logits from the stock module's forward,
the crop geometry from what the models' own transforms do to coordinate-ramp images, the
bilinear map from ``torch.nn.functional.interpolate``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import vitdecomp as vd
import vitdecomp.core.loading
from vitdecomp.core.adapters.base import Preprocessing
from vitdecomp.cli.main import EXIT_INPUT, main
from vitdecomp.apps.heatmap import Heatmap, crop_box, map_to_original, token_heatmap
from vitdecomp.synth.generator import Scene, SceneObject, render
from vitdecomp.core.shipped import shipped_path
from vitdecomp.interpret.text import embed_templates, text_encoder

CLIP = f"open_clip:local-dir:{shipped_path('clip')}"
SIZES = [(96, 64), (48, 80)]  # (width, height): non-square, both orientations, != the 64 x 64 input


@pytest.fixture(scope="module", autouse=True)
def cached_load():
    """Every run loads through vitdecomp.core.loading.load, memoised here (the tiny CLIP's BPE tokenizer
    takes seconds to build, and each CLI call would build it again)."""
    original = vitdecomp.core.loading.load
    cache: dict[tuple, object] = {}

    def load(spec, *, pretrained=True, checkpoint=None, device=None, **kwargs):
        key = (spec, pretrained, str(checkpoint), str(device or "cpu"), tuple(sorted(kwargs.items())))
        kwargs.update(pretrained=pretrained, checkpoint=checkpoint, device=device)
        if key not in cache:
            cache[key] = original(spec, **kwargs)
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vitdecomp.core.loading, "load", load)
        yield load


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("scenes")
    paths = []
    for i, ((w, h), colour, bg) in enumerate(zip(SIZES, ("red", "blue"), ("water", "land"))):
        image, _ = render(Scene(objects=(SceneObject("circle", colour, "solid", "large", "centre"),), background=bg))
        path = folder / f"scene{i}.png"
        image.resize((w, h), Image.Resampling.BICUBIC).save(path)
        paths.append(path)
    return paths


def cli(*argv: object) -> int:
    return main(["-q", "heatmap", *map(str, argv)])


def read(out: Path) -> dict:
    return json.loads((out / "heatmaps.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def clip_runs(scenes, tmp_path_factory):
    runs = {}
    for name, extra in {"a": ["--text", "a red object"], "b": ["--text", "a blue object"],
                        "ab": ["--text", "a red object", "--contrast", "a blue object"]}.items():
        out = tmp_path_factory.mktemp(f"heat_{name}")
        assert cli(*scenes, "--model", CLIP, *extra, "--out", out) == 0
        runs[name] = (out, read(out))
    return runs


def unit_text(model, text: str) -> torch.Tensor:
    return embed_templates(text_encoder(model), [text], "plain")[0]


# ----------------------------------------------------------------------------- outputs
def test_overlays_keep_the_original_size_and_grey_out_what_the_model_did_not_see(scenes, clip_runs):
    out, result = clip_runs["a"]
    assert [r["path"] for r in result["images"]] == [str(p) for p in scenes]
    for rec, (w, h) in zip(result["images"], SIZES):
        overlay = np.asarray(Image.open(out / rec["overlay"]).convert("RGB")).astype(int)
        assert overlay.shape == (h, w, 3) and rec["original_size"] == [w, h]
        panel = Image.open(out / rec["panel"])
        assert panel.width > w and panel.height > h
        # torchvision's Resize(64) + CenterCrop(64), by hand: the shorter side becomes 64, the longer
        # int(64 * long / short); the crop starts round((long' - 64) / 2) resized pixels in
        scale = 64 / min(w, h)
        start = round((int(64 * max(w, h) / min(w, h)) - 64) / 2) / scale
        centres = np.arange(max(w, h)) + 0.5
        band = (centres >= start) & (centres < start + 64 / scale)
        seen = np.broadcast_to(band[None, :] if w > h else band[:, None], (h, w))
        grey = (overlay[..., 0] == overlay[..., 1]) & (overlay[..., 1] == overlay[..., 2])
        assert grey[~seen].all()
        assert not grey[seen].all()  # the map is coloured where the model looked
        assert rec["grid"] == [8, 8] and list(rec["prefix"]) == ["cls"]
    assert result["run"]["command"] == "heatmap"
    assert set(result["run"]["files"]) == {"image0", "image1"}


def test_sum_check_and_maps_match_an_unprojected_token_decomposition(scenes, clip_runs, cached_load):
    _, result = clip_runs["a"]
    model = cached_load(CLIP, pretrained=True, checkpoint=None, device="cpu")
    y = unit_text(model, "a red object")
    pixels = torch.stack([model.transform(Image.open(p).convert("RGB")) for p in scenes])
    stack = vd.decompose(model, pixels, granularity="head_token")
    heat = token_heatmap(stack, y)
    own = stack.reference.double() @ y.double()  # the model's own <y, z>
    assert result["all_components"] and result["components"] == stack.names
    for b, rec in enumerate(result["images"]):
        values = np.asarray(rec["values"])
        check = rec["sum_check"]
        total = values.sum() + sum(rec["prefix"].values())
        assert check["sum_tokens"] == pytest.approx(total, rel=1e-9, abs=1e-9)
        mass = np.abs(values).sum() + abs(check["expected"])
        assert abs(check["difference"]) <= 1e-5 * mass
        assert check["expected"] == pytest.approx(float(own[b]), rel=1e-5, abs=1e-5)
        np.testing.assert_allclose(values, heat.patch[b].numpy(), rtol=1e-4, atol=1e-5 * np.abs(values).max())
        assert rec["prefix"]["cls"] == pytest.approx(float(heat.prefix["cls"][b]), rel=1e-4, abs=1e-5)


def test_contrast_map_is_the_difference_of_the_two_maps(clip_runs):
    (_, a), (_, b), (_, ab) = clip_runs["a"], clip_runs["b"], clip_runs["ab"]
    for ra, rb, rab in zip(a["images"], b["images"], ab["images"]):
        va, vb, vab = (np.asarray(r["values"]) for r in (ra, rb, rab))
        scale = max(np.abs(va).max(), np.abs(vb).max())
        np.testing.assert_allclose(vab, va - vb, rtol=0, atol=1e-5 * scale)
        assert rab["prefix"]["cls"] == pytest.approx(ra["prefix"]["cls"] - rb["prefix"]["cls"], abs=1e-5 * scale)
        assert rab["sum_check"]["expected"] == pytest.approx(
            ra["sum_check"]["expected"] - rb["sum_check"]["expected"], abs=1e-5 * scale)
    assert ab["direction"]["contrast"] == "a blue object"


def test_feature_selection_takes_the_top_components_of_a_score_table(scenes, clip_runs, tmp_path):
    from vitdecomp.interpret.score import ScoreTable

    names = clip_runs["a"][1]["components"]
    scores = np.random.default_rng(0).normal(size=(len(names), 2))
    table = ScoreTable(scores, names, ("colour", "shape"))
    (tmp_path / "score.json").write_text(json.dumps({"tables": {"corr": table.to_json()}}), encoding="utf-8")
    out = tmp_path / "out"
    assert cli(scenes[0], "--model", CLIP, "--text", "a red object", "--feature", "colour", "--top", "3",
               "--score", tmp_path / "score.json", "--out", out) == 0
    result = read(out)
    # ranked among the components that compute something from the input (heads, MLPs): the constant
    # embed / bias rows are never picked (the kinds= convention of ScoreTable.top)
    ranked = [names[i] for i in np.argsort(-scores[:, 0], kind="stable")]
    assert result["components"] == [n for n in ranked if re.fullmatch(r"L\d\d\.(H\d\d|mlp)", n)][:3]
    check = result["images"][0]["sum_check"]
    assert abs(check["difference"]) <= 1e-5 * (np.abs(result["images"][0]["values"]).sum() + abs(check["expected"]))


# ----------------------------------------------------------------------------- geometry
def ramp(w: int, h: int) -> tuple[Image.Image, int, int]:
    """An image whose red channel is ``kx * j`` in column j and green ``ky * i`` in row i."""
    kx, ky = 250 // w, 250 // h
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = (kx * np.arange(w))[None, :]
    arr[..., 1] = (ky * np.arange(h))[:, None]
    return Image.fromarray(arr), kx, ky


def transforms_to_invert():
    from torchvision import transforms as T

    from vitdecomp.core.shipped import load_shipped

    tail = [T.ToTensor()]
    return {
        "clip": vitdecomp.core.loading.load(CLIP).transform,  # open_clip: Resize(64) + CenterCrop(64)
        "timm": load_shipped("vit").transform,  # timm-style Lambda + Resize + CenterCrop
        "squash": T.Compose([T.Resize((40, 56)), *tail]),
        "crop_pct": T.Compose([T.Resize(37), T.CenterCrop(32), *tail]),
        "max_size_pad": T.Compose([T.Resize(30, max_size=45), T.CenterCrop((44, 50)), *tail]),
    }


@pytest.fixture(scope="module")
def pipelines():
    return transforms_to_invert()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(w=st.integers(20, 120), h=st.integers(20, 120), name=st.sampled_from(["clip", "timm", "squash", "crop_pct",
                                                                                 "max_size_pad"]))
def test_crop_box_maps_input_pixel_centres_back_to_the_right_original_pixels(pipelines, w, h, name):
    transform = pipelines[name]
    box = crop_box(transform, (w, h))
    image, kx, ky = ramp(w, h)
    pixels = transform(image)
    assert (box.input_height, box.input_width) == tuple(pixels.shape[-2:])
    for step in getattr(transform, "transforms", []):
        if type(step).__name__ == "Normalize":
            pixels = pixels * torch.as_tensor(step.std).view(3, 1, 1) + torch.as_tensor(step.mean).view(3, 1, 1)
    raw = pixels.numpy().astype(np.float64) * 255.0
    x, y = box.to_original(np.arange(box.input_width) + 0.5, np.arange(box.input_height) + 0.5)
    # a linear ramp survives resizing away from the borders: there its value is k * (coordinate - 0.5) up to
    # the resampler's rounding and discretised filters (within 1.25 grey levels, <= 0.5 on average: zero-mean
    # but for rounding ties); a crop one resized pixel off shifts every pixel by >= 0.3 pixel here
    cols, rows = (x > 3) & (x < w - 3), (y > 3) & (y < h - 3)
    if cols.sum() > 2 and rows.sum() > 2:
        got_x = raw[0][np.ix_(rows, cols)].mean(0) / kx + 0.5
        got_y = raw[1][np.ix_(rows, cols)].mean(1) / ky + 0.5
        for err, k in ((got_x - x[cols], kx), (got_y - y[rows], ky)):
            assert np.abs(err).max() <= 1.5 / k + 0.01
            assert abs(err.mean()) <= 0.5 / k + 0.01
    u, v = box.to_input(*box.to_original(3.25, 7.5))
    assert (float(u), float(v)) == pytest.approx((3.25, 7.5))


def test_map_to_original_is_bilinear_upsampling_on_the_model_input():
    grid = torch.randn(1, 5, 7, generator=torch.Generator().manual_seed(0))
    upsampled = Heatmap(patch=grid).upsample((40, 56))[0].numpy()
    box = crop_box(Preprocessing(input_size=(40, 56), resize_mode="squash"), (56, 40))
    values, inside = map_to_original(grid[0], box)
    assert inside.all()
    np.testing.assert_allclose(values, upsampled, rtol=1e-5, atol=1e-6)
    # a wider original (shorter side already 40): no resize, a centre crop 10 px in from the left
    wide = crop_box(Preprocessing(input_size=(40, 56)), (76, 40))
    values, inside = map_to_original(grid[0], wide)
    assert (inside[:, 10:66]).all() and not inside[:, :10].any() and not inside[:, 66:].any()
    np.testing.assert_allclose(values[:, 10:66], upsampled, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- other models
def test_registers_are_reported_beside_the_map_of_a_classifier(scenes, tmp_path, cached_load):
    out = tmp_path / "out"
    assert cli(*scenes, "--model", "timm:test_vit2", "--no-pretrained", "--class-index", 3, "--contrast-index", 1,
               "--out", out) == 0
    result = read(out)
    model = cached_load("timm:test_vit2", pretrained=False, checkpoint=None, device="cpu")
    weight, bias = model.classifier()
    y = (weight[3] - weight[1]).detach()
    pixels = torch.stack([model.transform(Image.open(p).convert("RGB")) for p in scenes])
    heat = token_heatmap(vd.decompose(model, pixels, granularity="head_token"), y)
    with torch.no_grad():
        logits = model.module(pixels)
    for b, rec in enumerate(result["images"]):
        assert list(rec["prefix"]) == ["reg0"] and rec["grid"] == [10, 10]
        assert rec["prefix"]["reg0"] == pytest.approx(float(heat.prefix["reg0"][b]), rel=1e-4, abs=1e-6)
        np.testing.assert_allclose(rec["values"], heat.patch[b].numpy(), rtol=1e-4, atol=1e-6)
        assert rec["logit"] == pytest.approx(float(logits[b, 3] - logits[b, 1]), rel=1e-4, abs=1e-5)
        assert abs(rec["sum_check"]["difference"]) <= 1e-5 * (np.abs(rec["values"]).sum() + abs(rec["logit"]))
        assert Image.open(out / rec["overlay"]).size == tuple(rec["original_size"])
    assert result["token_types"][0] == "reg"

    layered = tmp_path / "layers"
    assert cli(scenes[0], "--model", "timm:test_vit2", "--no-pretrained", "--class-index", 0, "--layers", "6-7",
               "--out", layered) == 0
    chosen = read(layered)["components"]
    assert chosen and all(name.startswith(("L06.", "L07.")) for name in chosen)
    assert {"L06.H00", "L07.H01", "L07.mlp"} <= set(chosen)


def test_a_non_clip_model_reads_text_through_compalign(scenes, tmp_path, cached_load):
    from vitdecomp.interpret.align import AlignConfig, CompAlign

    model = cached_load("timm:test_vit", pretrained=False, checkpoint=None, device="cpu")
    clip = cached_load(CLIP)
    pixels = torch.stack([model.transform(Image.open(p).convert("RGB")) for p in scenes])
    stack = vd.decompose(model, pixels, granularity="head_token")
    gen = torch.Generator().manual_seed(0)
    maps = torch.randn(stack.n_components, 128, stack.dim, generator=gen) / stack.dim**0.5
    align = CompAlign(group_maps=maps, map_index=tuple(range(stack.n_components)), config=AlignConfig(),
                      labels=tuple(stack.names), meta={"model": "timm:test_vit", "clip_model": CLIP})
    align.save(tmp_path / "align" / "compalign.safetensors")
    comps = ["L05.H01", "L04.H00", "L05.mlp"]
    out = tmp_path / "out"
    assert cli(*scenes, "--model", "timm:test_vit", "--no-pretrained", "--text", "a red object", "--align",
               tmp_path / "align", "--component", *comps, "--out", out) == 0
    result = read(out)
    heat = token_heatmap(align.apply(stack), unit_text(clip, "a red object"), components=comps)
    assert result["components"] == comps and result["direction"]["space"] == "clip"
    for b, rec in enumerate(result["images"]):
        np.testing.assert_allclose(rec["values"], heat.patch[b].numpy(), rtol=1e-4,
                                   atol=1e-5 * float(heat.patch[b].abs().max()))
        assert rec["sum_check"]["sum_tokens"] == pytest.approx(float(heat.total()[b]), rel=1e-4, abs=1e-5)


def test_swin_maps_its_last_stage_grid_from_the_first_block_of_that_stage(scenes, tmp_path, monkeypatch):
    import timm

    swin = vd.wrap(timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4, window_size=4, embed_dim=16,
        depths=(1, 2), num_heads=(1, 2), num_classes=4).eval())
    monkeypatch.setattr(vitdecomp.core.loading, "load", lambda spec, **kwargs: swin)
    out = tmp_path / "out"
    assert cli(*scenes, "--model", "timm:tiny-swin", "--class-index", 2, "--out", out) == 0
    result = read(out)
    assert result["start_layer"] == 1  # blocks 1..2 form the last stage; block 0 is in 'rest'
    assert result["components"][0] == "rest" and result["token_types"] == ["patch"] * 16
    pixels = torch.stack([swin.transform(Image.open(p).convert("RGB")) for p in scenes])
    with torch.no_grad():
        logits = swin.module(pixels)
    weight, bias = swin.classifier()
    for b, (rec, size) in enumerate(zip(result["images"], SIZES)):
        assert rec["grid"] == [4, 4] and rec["prefix"] == {}
        assert rec["logit"] == pytest.approx(float(logits[b, 2]), rel=1e-4, abs=1e-5)
        assert abs(rec["sum_check"]["difference"]) <= 1e-5 * (np.abs(rec["values"]).sum() + abs(rec["logit"]))
        assert Image.open(out / rec["overlay"]).size == size


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["MISSING", "--model", CLIP, "--text", "a red object"], "no such file"),
        (["IMAGE", "--model", CLIP, "--text", "a red object", "--component", "L09.H00"], "no such component"),
        (["IMAGE", "--model", CLIP, "--text", "a red object", "--component", "nonsense"], "not a component label"),
        (["IMAGE", "--model", "timm:test_vit", "--no-pretrained", "--text", "a red object"], "no text tower"),
        (["IMAGE", "--model", CLIP, "--class-index", "0"], "no classifier head"),
        (["IMAGE", "--model", CLIP], "exactly one direction"),
        (["IMAGE", "--model", CLIP, "--text", "x", "--feature", "colour"], "--score"),
        (["IMAGE", "--model", CLIP, "--text", "x", "--layers", "2-9"], "no block"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(scenes, tmp_path, capsys, argv, message):
    argv = [str(tmp_path / "missing.png") if a == "MISSING" else str(scenes[0]) if a == "IMAGE" else a for a in argv]
    assert main(["heatmap", *argv, "--out", str(tmp_path / "out")]) == EXIT_INPUT
    assert message in capsys.readouterr().err
