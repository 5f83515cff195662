"""Tiny models of the synthetic world: architectures, a few training steps, save / load, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("open_clip")
pytest.importorskip("safetensors")

import vitdecomp as vd  # noqa: E402
from vitdecomp.synth import generate_dataset, render_array, sample_scene  # noqa: E402
from vitdecomp.synth import train as tr  # noqa: E402
from vitdecomp.core.tiny import SIDECAR, build_tiny_clip, build_tiny_vit, load_tiny, read_sidecar  # noqa: E402

FAST = dict(batch_size=8, lr=1e-3)


def _images(n: int = 3, seed: int = 0) -> list[np.ndarray]:
    return [render_array(sample_scene(np.random.default_rng([seed, k])))[0] for k in range(n)]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_models_build_from_library_classes_and_decompose_exactly():
    from open_clip.model import CLIP
    from timm.models.vision_transformer import VisionTransformer

    clip = build_tiny_clip(0)
    vit = build_tiny_vit(0, num_classes=5)
    assert isinstance(clip, CLIP) and isinstance(vit, VisionTransformer)
    assert vit.global_pool == "token" and vit.head.out_features == 5
    assert _same_weights(clip, build_tiny_clip(0)) and not _same_weights(clip, build_tiny_clip(1))
    for module in (clip, vit):
        x = tr.pixels(_images(), module)
        assert x.shape == (3, 3, 64, 64)
        stack = vd.decompose(vd.wrap(module.eval()), x)
        assert stack.error() < 1e-5


def test_clip_batch_targets_mark_every_true_text():
    source = tr._Source(0, None, None)
    images, texts, targets = tr.clip_batch(source, 0, 16, p_full=0.3)
    assert len(images) == 16 and targets.shape == (16, len(texts)) and len(set(texts)) == len(texts)
    assert targets.any(axis=1).all() and targets.any(axis=0).all()
    for b in range(16):  # every image's own text is a positive
        own, _ = tr._text_for(source.item(b)[1], np.random.default_rng([0, 2, b]), 0.3)
        assert targets[b, texts.index(own)]
    # a one-attribute text is true of exactly the images sharing that value
    colour = f"a {source.item(0)[1].main.colour} object"
    if colour in texts:
        j = texts.index(colour)
        assert targets[:, j].tolist() == [source.item(b)[1].main.colour in colour.split() for b in range(16)]


def test_clip_training_is_deterministic_changes_weights_and_stays_finite():
    a, info = tr.train_clip(seed=3, steps=3, eval_n=0, **FAST)
    b, _ = tr.train_clip(seed=3, steps=3, eval_n=0, **FAST)
    assert _same_weights(a, b)
    assert not _same_weights(a, build_tiny_clip(3))
    assert all(torch.isfinite(p).all() for p in a.parameters())
    assert info["kind"] == "clip" and info["steps"] == 3 and np.isfinite(info["final_loss"])
    acc = tr.evaluate_clip(a, n=12, factors=("colour", "background"))
    assert set(acc) == {"colour", "background"} and all(0.0 <= v <= 1.0 for v in acc.values())


def test_classifier_steps_reduce_the_loss_on_a_fixed_batch_deterministically():
    kwargs = dict(seed=5, steps=5, n_images=8, eval_n=0, **FAST)
    model, info = tr.train_classifier(**kwargs)
    again, _ = tr.train_classifier(**kwargs)
    assert _same_weights(model, again)
    source = tr._Source(5, None, 8, tr._task_labeller("shape", info["classes"]))
    images, labels = tr.classifier_batch(source, 0, 8)
    init = build_tiny_vit(5, len(info["classes"])).eval()

    def loss(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(m(tr.pixels(images, m)), torch.tensor(labels)))

    assert loss(model) < loss(init)


def test_saved_classifier_reloads_strictly_and_decomposes(tmp_path):
    model, info = tr.train_classifier(seed=0, steps=2, eval_n=16, out_path=tmp_path, **FAST)
    folder, sidecar = read_sidecar(tmp_path)
    assert sidecar["kind"] == "vit" and sidecar["seed"] == 0 and sidecar["steps"] == 2
    assert sidecar["accuracy"] == info["accuracy"] and 0.0 <= sidecar["accuracy"] <= 1.0
    assert (tmp_path / sidecar["weights"]).is_file() and sidecar["architecture"]["depth"] == 4
    loaded = load_tiny(tmp_path / sidecar["weights"])
    assert isinstance(loaded, vd.Model) and loaded.extras["tiny"]["kind"] == "vit"
    x = tr.pixels(_images(), model)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), model(x))
    assert vd.decompose(loaded, x).error() < 1e-5
    from PIL import Image

    assert loaded.transform(Image.fromarray(_images(1)[0])).shape == (3, 64, 64)


def test_saved_clip_loads_through_open_clip_local_dir(tmp_path):
    model, info = tr.train_clip(seed=0, steps=1, eval_n=10, out_path=tmp_path, **FAST)
    assert set(info["zero_shot_accuracy"]) == {"shape", "colour", "pattern", "size", "position", "background"}
    assert info["accuracy"] == info["zero_shot_accuracy"]["shape"]
    x = tr.pixels(_images(), model)
    for loaded in (load_tiny(tmp_path), vd.load(f"open_clip:local-dir:{tmp_path}")):
        assert loaded.extras["tokenizer"] is not None
        with torch.no_grad():
            assert torch.allclose(loaded.extras["clip"].encode_image(x), model.encode_image(x), atol=1e-6)
        assert vd.decompose(loaded, x).error() < 1e-5
    sidecar = json.loads((tmp_path / SIDECAR).read_text())
    assert sidecar["library"] == "open_clip" and sidecar["architecture"]["vision_cfg"]["patch_size"] == 8


def test_spurious_classifier_from_a_waterbirds_layout_dataset(tmp_path):
    root = tmp_path / "wb"
    generate_dataset(root, 24, seed=0, task="shape", spurious=0.9)
    _, info = tr.train_classifier(root, seed=0, steps=2, eval_n=16, **FAST)
    assert info["kind"] == "spurious" and info["classes"] == ["landobject", "waterobject"]
    assert info["spurious"] == 0.9 and info["n_images"] == 16
    assert set(info["eval"]["group_accuracy"]) <= {"0", "1", "2", "3"}
    assert info["eval"]["worst_group_accuracy"] <= info["accuracy"]


def test_cli_synth_train_vit(tmp_path, capsys):
    from vitdecomp.cli.main import main

    out = tmp_path / "vit"
    code = main(["synth", "train", "vit", "--out", str(out), "--steps", "2", "--batch-size", "8", "--eval-n", "16",
                 "--task", "colour"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy (colour)" in printed
    sidecar = json.loads((out / SIDECAR).read_text())
    assert sidecar["steps"] == 2 and sidecar["task"] == "colour" and sidecar["num_classes"] == 7
    assert main(["synth", "train", "vit", "--out", str(out), "--steps", "0"]) == 2
