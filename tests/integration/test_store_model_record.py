"""Stores remember their model: every command that reads one rebuilds it from the record, offline.

Also the shipped tiny models by name (``synth:clip`` ...), ``--no-pretrained`` on every command that
builds a model, and one-line failures (no hub access) when recorded weights are not available.
"""
from __future__ import annotations

import argparse
import json

import pytest

import vitdecomp as vd
from vitdecomp.cli.main import main
from vitdecomp.errors import InputError
from vitdecomp.core.loading import load_recorded
from vitdecomp.core.model import WeightsUnavailableError
from vitdecomp.core.shipped import SHIPPED


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from vitdecomp.synth import generate_dataset

    root = tmp_path_factory.mktemp("record")
    generate_dataset(root / "data", 24, seed=2)
    return root


@pytest.fixture(scope="module")
def clip_store(data):
    out = data / "clip.zarr"
    assert main(["decompose", "synth:clip", str(data / "data" / "train"), "--out", str(out), "--batch-size", "8",
                 "--store-dtype", "float32"]) == 0
    return out


@pytest.fixture(scope="module")
def random_store(data):
    out = data / "vit.zarr"
    assert main(["decompose", "timm:test_vit", "--no-pretrained", str(data / "data" / "train"), "--out", str(out),
                 "--batch-size", "8", "--store-dtype", "float32"]) == 0
    return out


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test on any attempt to reach (or even look up) the Hugging Face hub."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("the hub was contacted")

    for name in ("hf_hub_download", "snapshot_download"):
        monkeypatch.setattr(huggingface_hub, name, refuse)
        import huggingface_hub.file_download as fd

        if hasattr(fd, name):
            monkeypatch.setattr(fd, name, refuse)
    import timm.models._hub as timm_hub

    monkeypatch.setattr(timm_hub, "hf_hub_download", refuse, raising=False)


def test_synth_names_load_the_shipped_models():
    for kind in SHIPPED:
        model = vd.load(f"synth:{kind}")
        assert model.name == f"synth:{kind}"
        sha = model.extras["tiny"]["sha256"]
        assert model.weights == f"shipped:{kind}@sha256:{sha[:16]}"
    with pytest.raises(InputError, match="no shipped tiny model"):
        vd.load("synth:nonexistent")


def test_synth_folder_spec_loads_a_trained_copy(tmp_path):
    import shutil

    from vitdecomp.core.shipped import shipped_path

    copy = tmp_path / "my-swin"
    shutil.copytree(shipped_path("swin"), copy)
    model = vd.load(f"synth:{copy}")
    assert model.weights.startswith("tiny:my-swin@sha256:")
    x = model.example_input(batch=1)
    assert vd.decompose(model, x).error() < 1e-5


def test_models_lists_the_shipped_models_with_accuracy(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for kind in SHIPPED:
        line = next(line for line in out.splitlines() if line.strip().startswith(f"synth:{kind} "))
        assert any(ch.isdigit() for ch in line.split(";")[-1])  # the recorded held-out accuracy
    clip_line = next(line for line in out.splitlines() if line.strip().startswith("synth:clip "))
    assert "zero-shot" in clip_line and "colour 1.00" in clip_line  # recorded zero-shot accuracy per factor


def test_store_records_the_shipped_model(clip_store):
    from vitdecomp.store.component_store import ComponentStore

    st = ComponentStore.open(clip_store)
    assert st.config.model == "synth:clip" and st.config.weights.startswith("shipped:clip@sha256:")


def test_label_score_retrieve_need_no_model_flag(clip_store, tmp_path, capsys, no_hub):
    assert main(["label", str(clip_store), "--pool", "feature/colour", "--m", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["heads"]
    assert main(["score", str(clip_store), "colour", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "score.json").is_file()
    assert main(["retrieve", str(clip_store), "--text", "a red object", "--feature", "colour", "--k", "3",
                 "--index-dir", str(tmp_path / "idx")]) == 0


def test_random_init_store_is_rebuilt_without_the_hub(random_store, tmp_path, monkeypatch, no_hub):
    import timm

    calls = []
    create = timm.create_model

    def spy(name, pretrained=False, **kwargs):
        calls.append(pretrained)
        return create(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    assert main(["ablate", str(random_store), "--head", "model", "--reference-self", "--out",
                 str(tmp_path / "a")]) == 0
    assert calls and not any(calls)  # built with random weights, never pretrained
    # --no-pretrained is accepted (and agrees with the record)
    assert main(["ablate", str(random_store), "--head", "model", "--reference-self", "--no-pretrained"]) == 0


def test_no_pretrained_against_a_pretrained_record_is_refused(clip_store, capsys):
    assert main(["label", str(clip_store), "--pool", "feature/colour", "--no-pretrained"]) == 2
    err = capsys.readouterr().err
    assert "drop --no-pretrained" in err and len(err.strip().splitlines()) == 1


def test_random_weights_that_changed_are_detected(random_store):
    from vitdecomp.store.component_store import ComponentStore

    st = ComponentStore.open(random_store)
    load_recorded(st.config.model, st.config.weights, weights_digest=st.config.extra["weights_digest"])  # ok
    with pytest.raises(InputError, match="differ"):
        load_recorded(st.config.model, st.config.weights, weights_digest="0" * 16)


@pytest.mark.parametrize("spec,weights", [
    ("timm:vit_small_patch16_224", "pretrained:vit_small_patch16_224"),
    ("open_clip:ViT-B-16:laion2b_s34b_b88k", "pretrained:open_clip/ViT-B-16/laion2b_s34b_b88k"),
])
def test_missing_pretrained_weights_fail_in_one_line_without_the_hub(spec, weights, no_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as info:
        load_recorded(spec, weights)
    message = str(info.value)
    assert "\n" not in message and spec in message and "--checkpoint" in message


def test_checkpoint_record_needs_the_file():
    with pytest.raises(InputError, match="--checkpoint"):
        load_recorded("timm:test_vit", "checkpoint:abc123")


@pytest.mark.parametrize("command", ["label", "score", "retrieve", "align", "ablate", "debias", "heatmap", "segment",
                                     "decompose"])
def test_every_model_building_command_accepts_no_pretrained(command):
    from vitdecomp.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    assert any("--no-pretrained" in a.option_strings for a in sub._actions)
