"""`vitdecomp decompose` end to end on a tiny timm model with random weights (offline)."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import vitdecomp as vd
from vitdecomp.cli.main import EXIT_INPUT, EXIT_UNSUPPORTED, main

MODEL = "timm:test_vit"


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        target = folder / ("sub" if i == 2 else "") / f"img{i}.{'jpg' if i == 1 else 'png'}"
        Image.new("RGB", (64, 48), colour).save(target)
    (folder / "corrupt.jpg").write_bytes(b"\x00\x01 definitely not an image" * 10)
    good = folder / "img1.jpg"
    (folder / "truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    Image.new("RGB", (2, 2)).save(folder / "tiny.png")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    return folder


def test_decompose_skips_bad_files_and_saves_an_exact_stack(images, tmp_path, capsys):
    out = tmp_path / "stack.safetensors"
    code = main(["decompose", MODEL, str(images), "--no-pretrained", "--top", "3", "--out", str(out), "--batch-size", "2"])
    text = capsys.readouterr().out
    assert code == 0
    assert "skipped 3 file(s)" in text and "corrupt.jpg" in text and "tiny.png" in text and "truncated.jpg" in text
    assert "predicted class" in text and "max rel. error" in text
    stack = vd.ComponentStack.load(out)
    assert stack.batch_size == 3 and stack.error() < 1e-5
    assert len(stack.meta["images"]) == 3 and len(stack.meta["skipped"]) == 3


def test_json_output_matches_the_saved_stack(images, tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    torch.manual_seed(0)  # random init: the same seed gives the same weights below
    assert main(["decompose", MODEL, str(images / "img0.png"), "--no-pretrained", "--json", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    stack = vd.ComponentStack.load(out)
    top = report["rows"][0]["top"][0]
    assert top["norm"] == pytest.approx(float(stack[top["component"]].norm()), rel=1e-5)
    shares = torch.einsum("cbd,bd->c", stack.values.double(), stack.reference.double()) / stack.reference.double().pow(2).sum()
    assert float(shares.sum()) == pytest.approx(1.0, abs=1e-5)
    torch.manual_seed(0)
    model = vd.load(MODEL, pretrained=False)
    weight, bias = model.classifier()
    logits = stack.reference @ weight.detach().T + bias.detach()
    assert report["rows"][0]["predicted_class"] == int(logits.argmax())


def test_head_token_granularity_and_start_layer(images, tmp_path):
    out = tmp_path / "t.safetensors"
    args = ["decompose", MODEL, str(images / "img0.png"), "--no-pretrained", "--granularity", "head_token",
            "--start-layer", "-2", "--out", str(out), "-q"]
    assert main(args) == 0
    stack = vd.ComponentStack.load(out)
    assert stack.has_tokens and stack.names[0] == "rest" and stack.error() < 1e-5


@pytest.mark.parametrize(
    "argv, code",
    [
        (["decompose", "nonsense", "IMAGES", "--no-pretrained"], EXIT_INPUT),
        (["decompose", "timm:no_such_model_xyz", "IMAGES", "--no-pretrained"], EXIT_INPUT),
        (["decompose", "timm:test_vit3", "IMAGES", "--no-pretrained", "--granularity", "head"], 0),
        (["decompose", MODEL, "MISSING", "--no-pretrained"], EXIT_INPUT),
        (["decompose", MODEL, "BAD_ONLY", "--no-pretrained"], EXIT_INPUT),
        (["decompose", "timm:resnet18", "IMAGES", "--no-pretrained"], EXIT_UNSUPPORTED),
        (["decompose", MODEL, "IMAGES"], EXIT_INPUT),  # pretrained weights, offline: says how to fix
    ],
)
def test_exit_codes(images, tmp_path, argv, code, caplog):
    bad = tmp_path / "bad_only"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"garbage")
    paths = {"IMAGES": str(images / "img0.png"), "MISSING": str(tmp_path / "missing"), "BAD_ONLY": str(bad)}
    assert main([paths.get(a, a) for a in argv] + ["-q"]) == code
