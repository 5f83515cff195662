"""`vitdecomp score ... --validate`: the paper's score validation (docs/method.md §4) on the shipped tiny models.

Stores of the tiny CLIP and of the tiny ViT classifier over the same synthetic scenes, the ViT aligned to the
CLIP with `vitdecomp align`. Every ρ the command reports is recomputed here from the stored rows: the CLIP proxy
in numpy (the mapped components against the CLIP store's image embeddings, row by row), the Spearman ρ with
the library's `spearman` against the corr table the command wrote.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from vitdecomp.cli.main import main

FIT = ["--epochs", "2", "--lr", "0.01", "--batch-size", "16", "--val-fraction", "0.25", "--seed", "3"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vitdecomp.synth import generate_dataset
    from vitdecomp.synth.generator import factor_phrases

    root = tmp_path_factory.mktemp("validate")
    generate_dataset(root / "data", 64, seed=2, task="colour", splits=(64, 0, 0))
    data = root / "data" / "train"
    common = ["--batch-size", "16", "--store-dtype", "float32"]
    assert main(["-q", "decompose", "synth:clip", str(data), "--out", str(root / "clip.zarr"), *common]) == 0
    assert main(["-q", "decompose", "synth:vit", str(data), "--out", str(root / "vit.zarr"), "--batch-size", "24",
                 "--store-dtype", "float32"]) == 0
    assert main(["-q", "align", str(root / "vit.zarr"), "--clip-store", str(root / "clip.zarr"), "--out",
                 str(root / "fit"), *FIT]) == 0
    features = []
    for name in ("colour", "size", "background"):
        (root / f"{name}.txt").write_text("\n".join(factor_phrases()[name]) + "\n", encoding="utf-8")
        features.append(str(root / f"{name}.txt"))
    return {"root": root, "features": features}


def _direct(score_json: dict, a: np.ndarray, z: np.ndarray) -> dict[str, float]:
    """Both ρ of the written corr table against the proxy computed here: ``a [n, comp, d]`` in CLIP space,
    ``z [n, d]`` the CLIP image embeddings; texts embedded again with the tiny CLIP's text tower."""
    import vitdecomp as vd
    from vitdecomp.core.labels import kind_mask
    from vitdecomp.interpret.score import ScoreTable, spearman
    from vitdecomp.interpret.text import embed_templates, text_encoder

    encoder = text_encoder(vd.load("synth:clip"))
    table = ScoreTable.from_json(score_json["tables"]["corr"])
    keep = kind_mask(table.labels, "input")
    cz = z / np.linalg.norm(z, axis=1, keepdims=True)
    ca = a / np.linalg.norm(a, axis=2, keepdims=True)
    proxy = np.zeros(table.scores.shape)
    for j, name in enumerate(table.features):
        y = embed_templates(encoder, score_json["features"][name]["texts"], "plain").double().numpy()
        y /= np.linalg.norm(y, axis=1, keepdims=True)
        for i in range(a.shape[1]):
            with np.errstate(invalid="ignore"):  # the constant rows (bias): NaN, not ranked
                proxy[i, j] = np.mean([np.corrcoef(ca[:, i] @ y[s], cz @ y[s])[0, 1] for s in range(len(y))])
    s, r = table.scores[keep], proxy[keep]
    return {"component": float(np.mean([spearman(s[:, j], r[:, j]) for j in range(s.shape[1])])),
            "feature": float(np.mean([spearman(s[i], r[i]) for i in range(s.shape[0])])),
            "n_components": int(keep.sum())}


def _validation(out) -> tuple[dict, dict]:
    payload = json.loads((out / "score.json").read_text(encoding="utf-8"))
    return payload, payload["validation"]


def test_clip_store_validation_equals_the_direct_computation(world, capsys):
    from vitdecomp.store.component_store import ComponentStore

    root = world["root"]
    out = root / "clip-score"
    assert main(["score", str(root / "clip.zarr"), *world["features"], "--n-null", "0", "--validate",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    payload, v = _validation(out)
    rows = ComponentStore.open(root / "clip.zarr").components(slice(None))
    direct = _direct(payload, rows.values.double().numpy(), rows.reference.double().numpy())
    o = v["orderings"]["corr"]
    assert o["component_order_rho"] == pytest.approx(direct["component"], abs=1e-6)
    assert o["feature_order_rho"] == pytest.approx(direct["feature"], abs=1e-6)
    assert v["reference"] == "store" and v["n_items"] == 64 and len(v["components"]) == direct["n_components"]
    assert f"component-ordering rho {o['component_order_rho']:+.3f}" in printed
    # the command prints and writes what the library returns
    from vitdecomp.interpret.score import score_store, validate_scores
    from vitdecomp.store.provenance import jsonable

    lib = validate_scores(score_store(root / "clip.zarr", world["features"], n_null=0))
    assert jsonable(lib.to_json()) == v and lib.format() in printed
    # the CLIP's own store as --clip-store: its embedding is the same Z_CLIP, so the same numbers
    again = root / "clip-score-paired"
    assert main(["-q", "score", str(root / "clip.zarr"), *world["features"], "--n-null", "0", "--validate",
                 "--clip-store", str(root / "clip.zarr"), "--out", str(again)]) == 0
    _, w = _validation(again)
    assert w["reference"] == "clip_store"
    assert w["orderings"]["corr"]["component_order_rho"] == pytest.approx(o["component_order_rho"], abs=1e-12)
    assert w["orderings"]["corr"]["feature_order_rho"] == pytest.approx(o["feature_order_rho"], abs=1e-12)


def test_aligned_store_validation_uses_the_clip_embeddings(world, capsys):
    import torch

    from vitdecomp.interpret.align import CompAlign
    from vitdecomp.store.component_store import ComponentStore

    root = world["root"]
    out = root / "vit-score"
    assert main(["-q", "score", str(root / "vit.zarr"), *world["features"], "--align", str(root / "fit"),
                 "--clip-store", str(root / "clip.zarr"), "--n-null", "0", "--validate", "--out", str(out)]) == 0
    payload, v = _validation(out)
    maps = CompAlign.load(root / "fit" / "compalign.safetensors")
    c = ComponentStore.open(root / "vit.zarr").components(slice(None)).values.double()
    a = torch.einsum("ncm,ckm->nck", c, maps.maps.double()).numpy()
    z = ComponentStore.open(root / "clip.zarr").components(slice(None)).reference.double().numpy()
    direct = _direct(payload, a, z)
    o = v["orderings"]["corr"]
    assert o["component_order_rho"] == pytest.approx(direct["component"], abs=1e-6)
    assert o["feature_order_rho"] == pytest.approx(direct["feature"], abs=1e-6)
    mapped_sum = _direct(payload, a, a.sum(1))  # what an aligned stack's own reference would have given
    assert abs(mapped_sum["component"] - direct["component"]) + abs(mapped_sum["feature"] - direct["feature"]) > 1e-3
    # the held-out cosine is the one `vitdecomp align` measured on the same rows
    fit = json.loads((root / "fit" / "align.json").read_text(encoding="utf-8"))
    assert v["alignment"]["cosine_held_out"] == pytest.approx(fit["metrics"]["val_cosine"], abs=5e-4)  # float32 sums
    assert v["alignment"]["n_held_out"] == fit["metrics"]["val_rows"]
    # without --clip-store: the CLIP store recorded in the alignment folder, the same numbers
    capsys.readouterr()
    assert main(["-q", "score", str(root / "vit.zarr"), *world["features"], "--align", str(root / "fit"),
                 "--n-null", "0", "--validate", "--json"]) == 0
    w = json.loads(capsys.readouterr().out)["validation"]
    assert w["clip_store"] == str(root / "clip.zarr") and w["orderings"] == v["orderings"]


def test_validate_refusals(world, tmp_path, capsys):
    root = world["root"]
    assert main(["score", str(root / "clip.zarr"), *world["features"], "--n-null", "0", "--clip-store",
                 str(root / "clip.zarr")]) == 2
    assert "--clip-store goes with --validate" in capsys.readouterr().err
    shutil.copy(root / "fit" / "compalign.safetensors", tmp_path / "maps.safetensors")  # no align.json beside it
    assert main(["score", str(root / "vit.zarr"), *world["features"], "--n-null", "0", "--align",
                 str(tmp_path / "maps.safetensors"), "--validate"]) == 2
    err = capsys.readouterr().err
    assert "pass --clip-store CLIPSTORE" in err and len(err.strip().splitlines()) == 1
