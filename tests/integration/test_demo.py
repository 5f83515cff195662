"""`vitdecomp demo` and `vitdecomp synth bench` end to end on tiny models trained for 2 steps (offline, CPU).

The shipped weights are not used: a module fixture trains every tiny model (a few seconds) into a
folder that is passed as ``DemoConfig.weights`` / ``--weights``.
"""
from __future__ import annotations

import base64
import io
import json
import re

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("open_clip")
pytest.importorskip("safetensors")

from PIL import Image  # noqa: E402

import numpy as np  # noqa: E402

from vitdecomp.cli.main import EXIT_INPUT, main  # noqa: E402
from vitdecomp.apps.debias import candidate_mask  # noqa: E402
from vitdecomp.synth.demo import SECTIONS, DemoConfig, run_demo  # noqa: E402
from vitdecomp.report import check_html  # noqa: E402
from vitdecomp.synth.bench import CLASSIFIER_NOTE, BenchConfig  # noqa: E402
from vitdecomp.synth.generator import SCENE_FACTORS  # noqa: E402
from vitdecomp.core.tiny import SWIN_CONFIG  # noqa: E402

SECTION_ID = re.compile(r'<section id="([^"]+)"')
PNG_URI = re.compile(r'data:image/png;base64,([A-Za-z0-9+/=]+)')
SMALL = dict(n_images=60, n_segment=10, n_spurious=60, n_heatmaps=1)
STAGE_LINE = re.compile(r"\[(\d+)/(\d+)\] (.+?) \.\.\. \d+\.\d s")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A folder with clip/, spurious/, vit/ and swin/ tiny models, as `vitdecomp synth train` writes them."""
    from vitdecomp.synth.train import train_classifier, train_clip

    root = tmp_path_factory.mktemp("weights")
    train_clip(steps=2, batch_size=8, eval_n=0, out_path=root / "clip")
    train_classifier(steps=2, batch_size=8, eval_n=0, spurious=0.95, task="shape", out_path=root / "spurious")
    train_classifier(steps=2, batch_size=8, eval_n=0, task="shape", out_path=root / "vit")
    train_classifier(steps=2, batch_size=8, eval_n=0, task="colour", out_path=root / "swin", config=SWIN_CONFIG,
                     kind="swin")
    return root


@pytest.fixture(scope="module")
def demo(weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig.quick()
    for name, value in SMALL.items():
        setattr(cfg, name, value)
    cfg.weights = weights
    return out, run_demo(out, config=cfg)


def test_demo_report_is_self_contained_and_has_every_section(demo):
    out, _ = demo
    html = (out / "report.html").read_text(encoding="utf-8")
    assert check_html(html) == []
    ids = SECTION_ID.findall(html)
    assert [i for i in ids if i in SECTIONS] == list(SECTIONS)  # all of them, in order
    assert "Quick mode (--quick)" in html  # the report says its numbers come from the small settings
    pngs = PNG_URI.findall(html)
    assert pngs, "no embedded PNG figure"
    for data in pngs:
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as im:
            im.load()
            assert im.format == "PNG" and im.width > 0 and im.height > 0


def test_demo_results_json(demo):
    out, returned = demo
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["n_images"] == SMALL["n_images"] == returned["n_images"]
    assert results["decomposition_relative_error"] <= 1e-5
    assert len(results["components"]) == results["n_components"] and "bias" in results["components"]
    assert set(results["factor_agreement"]) == set(SCENE_FACTORS) == set(results["retrieval"])
    for a in results["factor_agreement"].values():
        assert len(a["components"]) == DemoConfig().top_k and "bias" not in a["components"]
        assert 0.0 <= a["top_k"] <= 1.0 and 0.0 <= a["full"] <= 1.0
    assert set(results["segmentation"]) == {"decomposition (colour texts)", "decomposition (shape texts)", "raw_attention", "rollout"}
    assert results["textspan"] and all(".H" in r["component"] for r in results["textspan"])
    spurious = results["spurious"]
    n = SMALL["n_spurious"]
    assert spurious["selection_split"] == "val" and spurious["reference_split"] == "val"
    assert spurious["n"] == {"train": n, "val": n, "test": n} and spurious["head"]["kind"] == "linear"
    candidates = set(np.array(results["components"])[candidate_mask(results["components"])])
    assert len(candidates) < len(results["components"])  # the constant rows are not candidates
    for chosen in (spurious["selected"], spurious["variance_control"]["components"],
                   *(d["components"] for d in spurious["random"]["draws"])):
        assert len(set(chosen)) == spurious["k"] == DemoConfig().top_k and set(chosen) <= candidates
    assert len(spurious["random"]["draws"]) == BenchConfig().n_random
    # biased train (round(0.95 * 30) = 29 of each class with its place), group-balanced test
    assert spurious["train_aligned_share"] == pytest.approx(58 / 60)
    assert spurious["before"]["counts"] == {str(g): n // 4 for g in range(4)}
    for key in ("before", "after"):
        m = spurious[key]
        assert m["worst_group"] == min(m["groups"].values()) <= m["average_group"] <= max(m["groups"].values())
    classifier = spurious["classifier"]
    assert classifier["note"] == CLASSIFIER_NOTE and classifier["n_val"] == n
    assert len(classifier["selected"]) == spurious["k"] and "bias" not in classifier["selected"]
    html = (out / "report.html").read_text(encoding="utf-8")
    section = html[html.index('<section id="spurious"'):html.index('<section id="aligned"')]
    assert "top-3 contrastive ablated" in section and "top-3 by val variance ablated" in section
    assert CLASSIFIER_NOTE in section and all(c in section for c in spurious["selected"])
    aligned = results["aligned"]
    assert set(aligned["factor_agreement"]) == set(SCENE_FACTORS)
    assert -1.0 <= aligned["val_cosine"] <= 1.0 and 0 < aligned["n_val"] < SMALL["n_images"]


def test_cli_demo_prints_a_summary_and_writes_the_report(weights, tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--quick", "--weights", str(weights), "--out", str(out), "--n-images", "60"])
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0
    # without -v, one line per stage with its time on stderr
    stages = STAGE_LINE.findall(captured.err)
    assert [(int(i), int(n)) for i, n, _ in stages] == [(i, 11) for i in range(1, 12)]
    factor_lines = [line.split() for line in printed.splitlines() if line.startswith("  ") and "zero-shot" in line]
    assert len(factor_lines) == 6 and all("significant" in words[1:4] for words in factor_lines)  # every verdict shown
    assert "TextSpan labels" in captured.err
    report_line = [line for line in printed.splitlines() if line.startswith("report:")]
    assert report_line and report_line[0].split("report:", 1)[1].strip() == str(out / "report.html")
    assert "60 images" in printed and "spurious cue" in printed
    assert (out / "report.html").is_file()
    assert json.loads((out / "results.json").read_text())["n_images"] == 60


def test_cli_demo_input_errors(tmp_path, capsys):
    assert main(["demo", "--model", "timm:test_vit", "--out", str(tmp_path / "a")]) == EXIT_INPUT
    assert main(["demo", "--images", str(tmp_path), "--out", str(tmp_path / "b")]) == EXIT_INPUT
    assert main(["demo", "--n-images", "5", "--out", str(tmp_path / "c")]) == EXIT_INPUT
    # weights folder without tiny models: the error names the command that makes them
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert main(["demo", "--quick", "--weights", str(empty), "--out", str(tmp_path / "d")]) == EXIT_INPUT
    assert "vitdecomp synth train clip" in capsys.readouterr().err


def test_cli_synth_bench_writes_json(weights, tmp_path, capsys, monkeypatch):
    import vitdecomp.synth.bench as bench

    returned = []  # the command is a shell over run_bench: it writes exactly what the library call returns
    real = bench.run_bench
    monkeypatch.setattr(bench, "run_bench", lambda *a, **kw: returned.append(real(*a, **kw)) or returned[-1])
    target = tmp_path / "bench" / "bench.json"
    code = main(["synth", "bench", "--weights", str(weights), "--n-images", "60", "--n-segment", "20",
                 "--n-spurious", "60", "--out", str(target)])
    printed = capsys.readouterr().out
    assert code == 0 and "synthetic-world benchmark" in printed
    result = json.loads(target.read_text(encoding="utf-8"))
    assert len(returned) == 1 and result == json.loads(json.dumps(returned[0], default=str))
    assert set(result["factor_agreement"]) == set(SCENE_FACTORS) == set(result["retrieval"])
    assert set(result["segmentation"]) == {"decomposition (colour texts)", "decomposition (shape texts)", "raw_attention", "rollout"}
    assert result["spurious"]["selection_split"] == "val" and len(result["spurious"]["selected"]) == 3
    assert result["spurious"]["n"] == {"train": 60, "val": 60, "test": 60}
    assert result["spurious"]["classifier"]["note"] == CLASSIFIER_NOTE
    assert "| top-3 contrastive ablated |" in printed and CLASSIFIER_NOTE in printed
    assert result["n_images"] == 60 and result["decomposition_error"] <= 1e-5
    assert result["models"]["clip"]["kind"] == "clip" and result["models"]["spurious"]["kind"] == "spurious"
    assert result["models"]["vit"]["kind"] == "vit" and set(result["aligned"]["factor_agreement"]) == set(SCENE_FACTORS)
    assert result["models"]["swin"]["kind"] == "swin" and result["aligned"]["model"].startswith("tiny:swin")
    assert result["aligned_vit"]["model"].startswith("tiny:vit")


def _photo_folder(root, n=20):
    """``n`` non-square RGB images of mixed sizes (a stand-in for a user's photo folder) plus one broken file."""
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = (90, 140) if i % 2 else (150, 100)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"img{i:02d}.png")
    (root / "broken.jpg").write_bytes(b"not an image")
    return root


def test_real_model_demo_runs_offline_with_random_weights(tmp_path, capsys):
    images = _photo_folder(tmp_path / "photos")
    out = tmp_path / "real"
    code = main(["demo", "--model", "timm:test_vit", "--no-pretrained", "--images", str(images), "--n-images", "20",
                 "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["n_images"] == 20 and results["decomposition_relative_error"] <= 1e-5
    assert len(results["images"]) == 20 and list(results["skipped"]) == [str(images / "broken.jpg")]
    html = (out / "report.html").read_text(encoding="utf-8")
    check_html(html)
    sections = re.findall(r'<section id="([^"]+)"', html)
    # no text tower: no TextSpan section; broken.jpg is listed with its reason
    assert sections == ["model", "components", "heatmaps", "not-run", "skipped"]
    assert "broken.jpg" in html and "not an image file PIL can read" in html
    assert "textspan" not in results and "CompAlign" in results["not_run"]
    assert "timm:test_vit" in capsys.readouterr().out


def test_real_model_demo_labels_heads_with_text_for_a_clip(tmp_path, caplog):
    import logging
    import os
    from pathlib import Path

    from vitdecomp.core.shipped import shipped_path
    from vitdecomp.interpret.text.pools import load_pool

    images = _photo_folder(tmp_path / "photos")
    cfg = DemoConfig(n_images=20, n_heatmaps=1)
    with caplog.at_level(logging.INFO, logger="vitdecomp.synth.demo"):
        results = run_demo(tmp_path / "real", model=f"open_clip:local-dir:{shipped_path('clip')}", images=images,
                           config=cfg)
    # one line per stage, numbered, with its time; the same stages in results.json
    lines = [STAGE_LINE.fullmatch(r.getMessage()) for r in caplog.records if r.name == "vitdecomp.synth.demo"]
    stages = [m.groups() for m in lines if m]
    assert [(int(i), int(n)) for i, n, _ in stages] == [(i, 6) for i in range(1, 7)]
    assert [name for *_, name in stages][:-1] == list(results["stage_seconds"])
    assert any(name.startswith("TextSpan labels") for *_, name in stages)
    # the pool was encoded into the on-disk text cache (a second run reads it)
    assert list((Path(os.environ["VITDECOMP_CACHE"]) / "text").glob("*.npz"))
    spans = results["textspan"]
    n_heads = 4  # heads per layer of the tiny CLIP; the last 2 layers are labelled
    assert [s["component"][:3] for s in spans] == ["L02"] * n_heads + ["L03"] * n_heads
    pool = set(load_pool(cfg.pool).texts)
    for s in spans:
        assert len(s["texts"]) == cfg.textspan_texts and set(s["texts"]) <= pool
        assert 0.0 <= sum(s["variance_explained"]) <= 1.0 + 1e-9
    html = (tmp_path / "real" / "report.html").read_text(encoding="utf-8")
    assert '<section id="textspan"' in html


def test_quick_settings_do_less_work_and_cli_uses_them(monkeypatch, tmp_path):
    quick, full = DemoConfig.quick(), DemoConfig()
    for name in ("n_images", "n_segment", "n_spurious", "n_heatmaps"):
        assert getattr(quick, name) < getattr(full, name), name
    assert quick.quick_mode and not full.quick_mode
    assert "Quick mode" in quick.describe_quick() and full.describe_quick() == ""
    seen = []

    def fake_run_demo(out, *, model=None, images=None, config=None):
        seen.append(config)
        return {"model": "m", "n_images": config.n_images, "n_components": 1, "decomposition_relative_error": 0.0,
                "seconds": 0.0}

    monkeypatch.setattr("vitdecomp.synth.demo.run_demo", fake_run_demo)
    assert main(["demo", "--quick", "--out", str(tmp_path / "q")]) == 0
    assert main(["demo", "--out", str(tmp_path / "f")]) == 0
    assert seen[0].quick_mode and seen[0].n_images == quick.n_images < seen[1].n_images == full.n_images
