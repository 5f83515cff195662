"""`vitdecomp score / ablate / label / align / models` print and write exactly what their library function returns.

Each command only parses its options and calls one documented function (``score_store``, ``run_ablation``,
``label_store``, ``fit_alignment``, ``shipped_models``); here the command's JSON (without its run record) and
its printed text are compared with that function's result on the same store and arguments. A command that
computed anything of its own, dropped or mis-mapped an option (a template set, a seed, a reference set), or
a result whose ``to_json`` lost a field, would differ.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from vitdecomp.cli.main import main
from vitdecomp.core.shipped import shipped_path


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from vitdecomp.core.shipped import load_shipped
    from vitdecomp.store.dataset_run import decompose_dataset
    from vitdecomp.synth import generate_dataset

    root = tmp_path_factory.mktemp("cli_equals_library")
    generate_dataset(root / "data", 40, seed=2, task="colour", splits=(40, 0, 0))
    data = root / "data" / "train"
    spec = f"open_clip:local-dir:{shipped_path('clip')}"
    clip = root / "clip.zarr"
    assert main(["-q", "decompose", spec, str(data), "--out", str(clip), "--batch-size", "16",
                 "--store-dtype", "float32"]) == 0
    vit = root / "vit.zarr"
    decompose_dataset(load_shipped("vit"), data, vit, batch_size=24, store_dtype="float32", progress=False)
    classes = root / "classes.txt"
    classes.write_text("\n".join(sorted(p.name for p in data.iterdir() if p.is_dir())) + "\n", encoding="utf-8")
    return {"root": root, "clip": clip, "vit": vit, "classes": classes, "spec": spec}


def _as_written(result) -> dict:
    """A result's to_json() as the JSON file holds it."""
    from vitdecomp.store.provenance import jsonable

    return json.loads(json.dumps(jsonable(result.to_json())))


def _without_run(payload: dict) -> dict:
    assert payload["run"]["format"]  # the command added its run record ...
    return {k: v for k, v in payload.items() if k != "run"}  # ... and nothing else


def test_score_cli_equals_score_store(stores, tmp_path, capsys):
    from vitdecomp.interpret.score import ScoreTable, score_store

    out = tmp_path / "score"
    argv = ["score", str(stores["clip"]), "colour", "shape", "--variant", "corr", "var_attributed", "--selectivity",
            "--contrast", "colour", "shape", "--templates", "photo", "--top", "3"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    payload = json.loads((out / "score.json").read_text(encoding="utf-8"))

    result = score_store(stores["clip"], ["colour", "shape"], variants=["corr", "var_attributed"], selectivity=True,
                         contrast=("colour", "shape"), templates="photo")
    assert _without_run(payload) == _as_written(result)
    assert printed == result.format(3) + "\n"
    assert payload["templates"] == result.templates and len(result.templates) > 1  # the photo set, not plain
    # the shares of var_attributed sum to 1 over the components (Σ_i Cov(a_i, Z) = Var Z): a real score
    shares = ScoreTable.from_json(payload["tables"]["var_attributed"]).scores
    np.testing.assert_allclose(shares.sum(axis=0), 1.0, atol=1e-6)
    assert (out / "score.svg").is_file() and (out / "score-var_attributed.svg").is_file()


@pytest.mark.parametrize("cli, lib", [
    (["--classes", "{classes}", "--templates", "plain", "--mode", "resample", "--reference-fraction", "0.5",
      "--seed", "4", "--components", "L03.H00", "L03.mlp", "--curve", "from_last"],
     {"head": "zero-shot", "classes": "{classes}", "templates": "plain", "mode": "resample", "reference": 0.5,
      "seed": 4, "components": ["L03.H00", "L03.mlp"], "curves": ["from_last"]}),
    (["--head", "linear", "--reference-fraction", "0.4", "--seed", "1", "--ridge", "0.01", "--components", "L02.H01"],
     {"head": "linear", "reference": 0.4, "seed": 1, "ridge": 0.01, "components": ["L02.H01"]}),
])
def test_ablate_cli_equals_run_ablation(stores, tmp_path, capsys, cli, lib):
    from vitdecomp.interpret.ablate import run_ablation

    fill = {k: str(v) for k, v in stores.items()}
    out = tmp_path / "ablate"
    assert main(["ablate", str(stores["clip"]), *[a.format(**fill) for a in cli], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    payload = json.loads((out / "ablate.json").read_text(encoding="utf-8"))

    kwargs = {k: (v.format(**fill) if isinstance(v, str) else v) for k, v in lib.items()}
    result = run_ablation(stores["clip"], kwargs.pop("head"), **kwargs)
    assert _without_run(payload) == _as_written(result)
    assert printed == result.format() + "\n"
    # the split: reference and evaluated rows are disjoint and together every row
    rows = payload["reference"]["rows"] + payload["evaluated"]["rows"]
    assert sorted(rows) == list(range(result.store.n_items)) and len(set(rows)) == len(rows)
    assert payload["ablated"]["n"] == payload["evaluated"]["n_rows"]
    assert payload["run"]["extra"]["reference"] == {k: v for k, v in payload["reference"].items() if k != "rows"}


def test_label_cli_equals_label_store(stores, tmp_path, capsys):
    from vitdecomp.interpret.textspan import LabelEvaluation, label_store

    target = tmp_path / "labels.json"
    assert main(["label", str(stores["clip"]), "--pool", "feature/colour", "--m", "2", "--layers", "2", "--evaluate",
                 "--classes", str(stores["classes"]), "--m-values", "0,1,3", "--out", str(target)]) == 0
    printed = capsys.readouterr().out
    payload = json.loads(target.read_text(encoding="utf-8"))

    result = label_store(stores["clip"], "feature/colour", m=2, layers=2,
                         evaluate=LabelEvaluation(stores["classes"], m_values=[0, 1, 3]))
    assert _without_run(payload) == _as_written(result)
    assert list(payload) == [*list(result.to_json())[:-1], "run", "evaluation"]  # the file's key order is kept
    assert printed == result.format() + "\n"
    assert len(payload["heads"]) == 8 and result.m == 3  # 2 blocks of 4 heads; TextSpan ran with max(m, m-values)
    assert payload["evaluation"]["by_m"][0]["correct"] == payload["evaluation"]["mean_ablated"]["correct"]  # m = 0


def test_align_cli_equals_fit_alignment(stores, tmp_path, capsys):
    import torch

    from vitdecomp.interpret.align import CompAlign, fit_alignment

    out = tmp_path / "cli"
    assert main(["align", str(stores["vit"]), "--clip-store", str(stores["clip"]), "--out", str(out), "--maps",
                 "grouped", "--epochs", "2", "--lr", "0.01", "--batch-size", "8", "--val-fraction", "0.3", "--seed",
                 "5", "--patience", "0", "--classes", str(stores["classes"])]) == 0
    printed = capsys.readouterr().out
    payload = json.loads((out / "align.json").read_text(encoding="utf-8"))

    lib_out = tmp_path / "lib"
    result = fit_alignment(stores["vit"], stores["clip"], lib_out, maps="grouped",
                           settings={"epochs": 2, "lr": 0.01, "batch_size": 8, "val_fraction": 0.3, "seed": 5,
                                     "patience": None}, classes=stores["classes"])
    expected = _as_written(result)
    got = _without_run(payload)
    for entry in (expected, got):  # where the maps went and how long it took differ; nothing else may
        entry.pop("fit_seconds")
        assert entry.pop("alignment").endswith("compalign.safetensors")
    assert got == expected
    a, b = CompAlign.load(out / "compalign.safetensors"), CompAlign.load(lib_out / "compalign.safetensors")
    assert torch.equal(a.group_maps, b.group_maps) and a.map_index == b.map_index
    assert printed == f"{result.format()}\nwrote {out / 'compalign.safetensors'} and {out / 'align.json'}\n"
    assert payload["metrics"]["zero_shot"]["val"]["n"] == payload["rows"]["val"]  # every held-out row scored
    assert payload["run"]["extra"]["zero_shot_model"] == result.zero_shot_model == result.clip_store.config.model


def test_models_cli_lists_the_library(capsys):
    from vitdecomp.core.adapters.base import registered_adapters
    from vitdecomp.core.shipped import SHIPPED, shipped_models

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    models = shipped_models()
    assert [m.kind for m in models] == list(SHIPPED)
    start = next(i for i, line in enumerate(lines) if line.startswith("Shipped tiny models")) + 1
    assert [line.strip() for line in lines[start:]] == [m.line() for m in models]
    families = [a.family for a in registered_adapters()]
    assert [line.split()[0] for line in lines[1:1 + len(families)]] == families
    for m in models:  # the printed accuracy is the recorded one
        zero_shot = m.record.get("zero_shot_accuracy")
        expected = (f"{next(iter(sorted(zero_shot.items())))[1]:.2f}" if zero_shot
                    else f"{m.record['accuracy']:.2f}")
        assert expected in m.line().split(";")[-1]
