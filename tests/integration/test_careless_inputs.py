"""Inputs a careless user gives: tiny, broken and huge images, large overlays, Ctrl-C in a dataset run,
a non-CLIP "CLIP store", an image path instead of an item id, ``label --layers`` on Swin labels.

Everything runs on the random-weight ``timm:test_vit`` (offline, seconds) or on model-free stores.
"""
from __future__ import annotations

import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitdecomp.cli.main import main

VIT = ["timm:test_vit", "--no-pretrained"]
TINY_REASON = "image is 1x1, smaller than 8 px on a side"
BROKEN_REASON = "not an image file PIL can read"


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width x height`` but holds almost no data (a cheap "bomb")."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def _gradient(width: int, height: int) -> Image.Image:
    """Smooth RGB image with distinct channels (compresses well; no pixel is grey)."""
    x = np.linspace(40, 215, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(215, 40, height, dtype=np.float32)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 5.0)], -1).astype(np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """8 usable images, a 1x1 image and a broken file."""
    root = tmp_path_factory.mktemp("careless") / "photos"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (32 + 4 * i, 40, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(root / "a_pixel.png")
    (root / "broken.jpg").write_bytes(b"not an image at all")
    return root


# ----------------------------------------------------------------- one loader, one set of rules
def test_tiny_and_broken_images_are_skipped_alike_by_every_reader(folder, tmp_path, capsys):
    from vitdecomp.data.datasets import ImageFolder, load_batch
    from vitdecomp.data.images import find_images, iter_image_batches
    from vitdecomp.synth.demo import DemoConfig, run_demo

    tiny, broken = str(folder / "a_pixel.png"), str(folder / "broken.jpg")
    expected = {tiny: TINY_REASON, broken: BROKEN_REASON}

    def transform(image):
        return torch.zeros(3, 4, 4)

    # the library's batch reader (what `decompose IMAGES` uses)
    skipped: dict[str, str] = {}
    for batch in iter_image_batches(find_images([folder]), transform, 4):
        skipped.update(batch.skipped)
    assert skipped == expected
    # dataset runs (keys are item ids)
    source = ImageFolder(folder)
    batch = load_batch(source, range(len(source)), transform)
    assert batch.skipped == {"a_pixel.png": TINY_REASON, "broken.jpg": BROKEN_REASON}
    # the CLI
    assert main(["-q", "decompose", *VIT, str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == expected
    # the demo: it used to accept the 1x1 image; now it skips it, with the same reason, and lists both in the report
    out = tmp_path / "demo"
    results = run_demo(out, model="timm:test_vit", images=folder,
                       config=DemoConfig(n_images=2, n_heatmaps=1, pretrained=False))
    assert results["skipped"] == expected and results["n_images"] == 2
    html = (out / "report.html").read_text(encoding="utf-8")
    assert '<section id="skipped">' in html
    section = html[html.index('<section id="skipped">'):]
    assert "a_pixel.png" in section and TINY_REASON in section and BROKEN_REASON in section


def test_demo_report_has_no_skipped_section_when_nothing_was_skipped(folder, tmp_path):
    from vitdecomp.synth.demo import _read_images

    clean = tmp_path / "clean"
    clean.mkdir()
    for name in ("img0.png", "img1.png"):
        (clean / name).write_bytes((folder / name).read_bytes())
    arrays, names, skipped = _read_images(clean, 5, (16, 16))
    assert arrays.shape == (2, 16, 16, 3) and skipped == {}


# ----------------------------------------------------------------- pixel limit
def test_huge_images_are_refused_from_the_header_without_a_bomb_warning(tmp_path):
    from vitdecomp.data.images import MAX_PIXELS, UnusableImageError, load_image

    bomb = _png_header(tmp_path / "bomb.png", 20_000, 20_000)  # 400 MP: PIL itself raises DecompressionBombError
    warn_zone = _png_header(tmp_path / "warn.png", 9_500, 9_500)  # 90 MP: PIL warns; below MAX_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any DecompressionBombWarning fails the test
        with pytest.raises(UnusableImageError) as info:
            load_image(bomb)
        assert info.value.reason == f"image is 20000x20000 = 400.0 megapixels, above the limit of " \
                                    f"{MAX_PIXELS / 1e6:g} megapixels"
        with pytest.raises(UnusableImageError, match="9500x9500 = 90.2 megapixels, above the limit of 50 megapixels"):
            load_image(warn_zone, max_pixels=50_000_000)  # refused before decoding (else: "truncated")


def test_the_limit_is_ours_not_pils(tmp_path, monkeypatch):
    """With PIL's own limit set tiny, images that PIL would warn about or refuse load silently within
    MAX_PIXELS, or with max_pixels=None; PIL's global setting is left as it was."""
    from PIL import Image as PILImage

    from vitdecomp.data.images import UnusableImageError, load_image

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)
    _gradient(40, 40).save(tmp_path / "warns.png")  # 1600 px: PIL warns
    _gradient(100, 100).save(tmp_path / "errors.png")  # 10000 px > 2 * 1000: PIL raises
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(tmp_path / "warns.png").size == (40, 40)
        assert load_image(tmp_path / "errors.png", max_pixels=None).size == (100, 100)
        with pytest.raises(UnusableImageError, match="above the limit of 0.005 megapixels"):
            load_image(tmp_path / "errors.png", max_pixels=5000)
    assert PILImage.MAX_IMAGE_PIXELS == 1000


def test_decompose_skips_a_bomb_with_one_line_and_no_traceback(folder, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "ok.png").write_bytes((folder / "img0.png").read_bytes())
    _png_header(data / "huge.png", 20_000, 20_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["decompose", *VIT, str(data)]) == 0
    captured = capsys.readouterr()
    assert f"{data / 'huge.png'}: image is 20000x20000 = 400.0 megapixels, above the limit" in captured.out
    assert "DecompressionBomb" not in captured.out + captured.err and "Traceback" not in captured.err


# ----------------------------------------------------------------- bounded overlays
def test_heatmap_overlays_are_bounded_and_keep_the_geometry(folder, tmp_path):
    big = tmp_path / "wide.png"
    _gradient(1600, 800).save(big)
    tiny = folder / "a_pixel.png"
    out = tmp_path / "maps"
    assert main(["-q", "heatmap", str(big), str(tiny), "--model", *VIT, "--class-index", "0", "--out", str(out)]) == 0
    payload = json.loads((out / "heatmaps.json").read_text(encoding="utf-8"))
    assert payload["skipped"] == {str(tiny): TINY_REASON}
    rec = payload["images"][0]
    assert rec["original_size"] == [1600, 800] and rec["overlay_size"] == [1024, 512]
    overlay = np.asarray(Image.open(out / "wide.png"))
    with Image.open(out / "wide_panel.png") as panel:
        assert overlay.shape == (512, 1024, 3) and max(panel.size) <= 1024 + 160
    # geometry: the crop box (original pixels) scaled by 1024/1600 -> the pixels the model saw are coloured,
    # the others flat grey (r == g == b); computed here from the recorded box, not by the library
    box, s = rec["crop_box"], 1024 / 1600
    in_h, in_w = box["input_size"]
    u = ((np.arange(1024) + 0.5) / s - box["left"]) * in_w / (box["right"] - box["left"])
    v = ((np.arange(512) + 0.5) / s - box["top"]) * in_h / (box["bottom"] - box["top"])
    seen = ((v >= 0) & (v < in_h))[:, None] & ((u >= 0) & (u < in_w))[None, :]
    grey = (overlay[..., 0] == overlay[..., 1]) & (overlay[..., 1] == overlay[..., 2])
    assert 0.2 < seen.mean() < 0.8  # the centre crop of a 2:1 image
    assert np.mean(grey == ~seen) > 0.995
    # --max-side changes the bound
    assert main(["-q", "heatmap", str(big), "--model", *VIT, "--class-index", "0", "--out", str(tmp_path / "s"),
                 "--max-side", "300"]) == 0
    with Image.open(tmp_path / "s" / "wide.png") as small:
        assert small.size == (300, 150)


def test_crop_box_resized_maps_the_same_points():
    import vitdecomp as vd
    from vitdecomp.apps.heatmap import crop_box

    model = vd.load("timm:test_vit", pretrained=False)
    box = crop_box(model, (1600, 800))
    small = box.resized(1024, 512)
    x, y = np.array([0.0, 401.3, 1599.0]), np.array([0.0, 333.0, 799.5])
    np.testing.assert_allclose(small.to_input(x * 0.64, y * 0.64), box.to_input(x, y), atol=1e-9)
    assert (small.input_width, small.input_height) == (box.input_width, box.input_height)


# ----------------------------------------------------------------- Ctrl-C in a dataset run
def test_ctrl_c_in_a_dataset_run_keeps_chunks_and_says_how_to_resume(folder, tmp_path, monkeypatch, capsys):
    from vitdecomp.store.component_store import ComponentStore

    data = tmp_path / "data"
    data.mkdir()
    for i in range(8):
        (data / f"img{i}.png").write_bytes((folder / f"img{i}.png").read_bytes())
    store = tmp_path / "s.zarr"
    argv = ["decompose", *VIT, str(data), "--out", str(store), "--batch-size", "2"]
    original = ComponentStore.write_chunk
    calls = {"n": 0}

    def write_chunk(self, *a, **k):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, *a, **k)

    monkeypatch.setattr(ComponentStore, "write_chunk", write_chunk)
    assert main(argv) == 130
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and "Traceback" not in err
    assert f"interrupted: 2 of 4 chunks kept in {store}; run the same command again to resume" in lines[0]
    monkeypatch.setattr(ComponentStore, "write_chunk", original)
    assert main([*argv, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["complete"] and summary["this_run"]["chunks"] == 2 and summary["counts"]["valid"] == 8


# ----------------------------------------------------------------- align: a CLIP store without a text tower
def _store(path: Path, model: str, n: int = 24, d: int = 6) -> Path:
    from vitdecomp import ComponentStack
    from vitdecomp.core.labels import parse_label
    from vitdecomp.store.component_store import ComponentStore, StoreConfig

    names = ["L00.H00", "L00.H01", "L00.mlp"]
    gen = np.random.default_rng(1)
    values = gen.standard_normal((len(names), n, d)).astype(np.float32)
    cfg = StoreConfig(model=model, weights="none", dtype="float32", n_items=n, batch_size=n)
    store = ComponentStore.create_or_open(path, cfg, names, (len(names), d), d)
    stack = ComponentStack(torch.from_numpy(values), tuple(map(parse_label, names)),
                           torch.from_numpy(values.sum(0)))
    store.write_chunk(0, stack, [f"img{i:03d}.png" for i in range(n)], {})
    return path


def _error_line(capsys) -> str:
    """The one line the CLI printed for an error (stderr holds nothing else)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR ")
    return lines[0]


def test_align_refuses_a_clip_store_without_a_text_tower(tmp_path, capsys):
    model = _store(tmp_path / "m.zarr", "planted-6")
    out = tmp_path / "fit"
    code = main(["align", str(model), "--clip-store", str(_store(tmp_path / "c.zarr", "timm:vit_tiny_patch16_224")),
                 "--out", str(out)])
    assert code == 2 and not out.exists()  # refused before anything was fitted or written
    line = _error_line(capsys)
    assert "no text tower" in line and "timm:vit_tiny_patch16_224" in line
    # a transformers image-only model (judged from its config, no weights read)
    hf = tmp_path / "hf-vit"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 6}), encoding="utf-8")
    assert main(["align", str(model), "--clip-store", str(_store(tmp_path / "h.zarr", f"hf:{hf}")),
                 "--out", str(out)]) == 2
    assert "transformers vit image model" in _error_line(capsys)


# ----------------------------------------------------------------- retrieve --image PATH
@pytest.fixture(scope="module")
def vit_store(folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieve")
    data = root / "data"
    data.mkdir()
    for i in range(8):
        (data / f"img{i}.png").write_bytes((folder / f"img{i}.png").read_bytes())
    assert main(["-q", "decompose", *VIT, str(data), "--out", str(root / "vit.zarr"), "--batch-size", "4"]) == 0
    return root / "vit.zarr", data


def _query(capsys, *argv: str) -> str:
    assert main(["retrieve", *argv, "--components", "L00.H00", "--k", "2", "--backend", "numpy", "--json"]) == 0
    return json.loads(capsys.readouterr().out)["queries"][0]["query"]


def test_retrieve_takes_an_image_path(vit_store, tmp_path, monkeypatch, capsys):
    store, data = vit_store
    index = ["--index-dir", str(tmp_path / "index")]
    assert _query(capsys, str(store), "--image", "img3.png", *index) == "img3.png"  # an item id, as before
    assert _query(capsys, str(store), "--image", str(data / "img3.png"), *index) == "img3.png"  # absolute path
    monkeypatch.chdir(data.parent)
    assert _query(capsys, str(store), "--image", "data/img5.png", *index) == "img5.png"  # relative to here
    # relative to --images (a root the store does not record)
    other = tmp_path / "copy"
    other.mkdir()
    for i in range(8):
        (other / f"img{i}.png").write_bytes((data / f"img{i}.png").read_bytes())
    assert _query(capsys, str(store), "--image", str(other / "img1.png"), "--images", str(other), "--out",
                  str(tmp_path / "o"), *index) == "img1.png"
    assert main(["-q", "retrieve", str(store), "--image", str(data / "nope.png"), "--components", "L00.H00",
                 "--backend", "numpy", *index]) == 2
    message = _error_line(capsys).split(": ", 1)[1]
    assert message.startswith(f"--image {data / 'nope.png'}: no stored item; tried item id")
    assert "'nope.png'" in message and "the store's dataset root" in message


# ----------------------------------------------------------------- label --layers on Swin labels
SWIN_LABELS = ["embed"] + [f"S{s}.B{b:02d}.{p}" for s, blocks in ((0, 3), (1, 1)) for b in range(blocks)
                           for p in ("H00", "H01", "mlp")]


def test_label_layers_counts_blocks_across_stages(tmp_path, capsys):
    from vitdecomp.interpret.align import CompAlign
    from vitdecomp.cli.label_cmd import last_layer_heads
    from vitdecomp.core.shipped import shipped_path

    # the selection itself: the last 2 blocks are S0.B02 and S1.B00 (not "the largest block numbers")
    picked = [SWIN_LABELS[i] for i in last_layer_heads(SWIN_LABELS, 2)]
    assert picked == ["S0.B02.H00", "S0.B02.H01", "S1.B00.H00", "S1.B00.H01"]
    assert len(last_layer_heads(SWIN_LABELS)) == 8
    assert [SWIN_LABELS[i] for i in last_layer_heads(SWIN_LABELS, 1)] == ["S1.B00.H00", "S1.B00.H01"]

    # end to end: a Swin-labelled store read in the shipped tiny CLIP's space through identity maps
    import vitdecomp as vd
    from vitdecomp import ComponentStack
    from vitdecomp.core.labels import parse_label
    from vitdecomp.store.component_store import ComponentStore, StoreConfig

    clip_spec = f"open_clip:local-dir:{shipped_path('clip')}"
    clip = vd.load(clip_spec)
    d = int(vd.decompose(clip, clip.example_input(1)).dim)
    n = 32
    values = np.random.default_rng(2).standard_normal((len(SWIN_LABELS), n, d)).astype(np.float32)
    cfg = StoreConfig(model="tiny-swin", weights="none", dtype="float32", n_items=n, batch_size=n)
    store = ComponentStore.create_or_open(tmp_path / "swin.zarr", cfg, SWIN_LABELS, (len(SWIN_LABELS), d), d)
    store.write_chunk(0, ComponentStack(torch.from_numpy(values), tuple(map(parse_label, SWIN_LABELS)),
                                        torch.from_numpy(values.sum(0))), [f"i{k}" for k in range(n)], {})
    align = CompAlign.identity(len(SWIN_LABELS), d)
    align.meta.update(clip_model=clip_spec, clip_weights=clip.weights)
    align.save(tmp_path / "align" / "compalign.safetensors")
    assert main(["label", str(tmp_path / "swin.zarr"), "--align", str(tmp_path / "align"), "--model", clip_spec,
                 "--pool", "feature/colour", "--m", "1", "--rank", "4", "--layers", "2", "--json"]) == 0
    heads = [h["label"] for h in json.loads(capsys.readouterr().out)["heads"]]
    assert heads == ["S0.B02.H00", "S0.B02.H01", "S1.B00.H00", "S1.B00.H01"]
