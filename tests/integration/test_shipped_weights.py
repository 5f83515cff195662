"""The tiny models shipped with the package load through the public path and reach their recorded accuracy."""
from __future__ import annotations

import json

import pytest

from vitdecomp.core.tiny import read_sidecar
from vitdecomp.core.shipped import SHIPPED, load_shipped, shipped_path


@pytest.mark.parametrize("kind", sorted(SHIPPED))
def test_shipped_weights_are_small_float16_with_a_matching_digest(kind):
    import hashlib

    folder, info = read_sidecar(shipped_path(kind))
    weights = folder / info["weights"]
    assert info["kind"] == kind and info["storage_dtype"] == "float16"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == info["sha256"]
    assert weights.stat().st_size < 6 * 2**20
    assert info["eval"]["n"] >= 500 and 0.0 <= info["accuracy"] <= 1.0


def test_shipped_clip_loads_through_vd_load_and_reaches_its_recorded_zero_shot_accuracy():
    import vitdecomp as vd
    from vitdecomp.synth.train import evaluate_clip

    folder = shipped_path("clip")
    model = vd.load(f"open_clip:local-dir:{folder}")  # the public loader, offline
    info = json.loads((folder / "tiny_model.json").read_text(encoding="utf-8"))
    measured = evaluate_clip(model, n=info["eval"]["n"], seed=info["eval"]["seed"])
    assert measured == pytest.approx(info["zero_shot_accuracy"], abs=1e-9)


@pytest.mark.parametrize("kind", ["spurious", "vit", "swin"])
def test_shipped_classifiers_reach_their_recorded_accuracy(kind):
    from vitdecomp.synth.train import evaluate_classifier

    model = load_shipped(kind)
    info = model.extras["tiny"]
    result = evaluate_classifier(model, task=info["task"], classes=info["classes"], groups=info["groups"],
                                 n=info["eval"]["n"], seed=info["eval"]["seed"])
    assert result["accuracy"] == pytest.approx(info["accuracy"], abs=1e-9)
    if kind == "spurious":
        assert result["worst_group_accuracy"] == pytest.approx(info["eval"]["worst_group_accuracy"], abs=1e-9)


def test_shipped_clip_decomposes_exactly():
    import vitdecomp as vd

    model = load_shipped("clip")
    stack = vd.decompose(model, model.example_input(4), granularity="head")
    assert stack.error() <= 1e-5


def test_shipped_swin_is_a_stock_timm_swin_and_decomposes_exactly_into_its_stages():
    import timm.models.swin_transformer as swin

    import vitdecomp as vd

    model = load_shipped("swin")
    assert isinstance(model.module, swin.SwinTransformer) and model.family == "timm-swin"
    x = model.example_input(4)
    stack = vd.decompose(model, x, granularity="head")
    assert stack.error() <= 1e-5
    stages = {lab.stage for lab in stack.labels if lab.kind == "head"}
    assert stages == set(range(len(model.module.layers)))
    import torch

    with torch.no_grad():  # the decomposed representation is the pooled features its classifier reads
        pooled = model.module.forward_head(model.module.forward_features(x), pre_logits=True)
        logits = model.module(x)
    assert float((stack.reference - pooled).abs().max()) <= 1e-5 * float(pooled.abs().max())
    assert logits.shape[-1] == model.extras["tiny"]["num_classes"]
