"""``vitdecomp debias`` (docs/method.md §6.6) on a Waterbirds-layout folder generated from the synthetic world.

The class is the object's colour (which the shipped tiny CLIP reads perfectly) and the place is the
background (land / water, read perfectly too), correlated 95 % in train and balanced in val and
test. Stores are made with ``decompose_dataset`` per split, as the command does.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from vitdecomp.apps import debias as db
from vitdecomp.errors import InputError

N_SPLIT = 24
K = 3
CLASS_GROUPS = (("red", "orange", "yellow"), ("green", "blue", "purple", "white"))


def _spec() -> str:
    from vitdecomp.core.shipped import shipped_path

    return f"open_clip:local-dir:{shipped_path('clip')}"


def _texts() -> dict[str, list[str]]:
    from vitdecomp.synth.generator import VOCABULARY, describe

    return {"spurious": [describe("background", v) for v in VOCABULARY["background"]],
            "core": [describe("colour", v) for v in VOCABULARY["colour"]],
            "places": [describe("background", "land"), describe("background", "water")]}


def _decompose(model, root: Path, out: Path, splits=db.SPLITS):
    from vitdecomp.store.dataset_run import decompose_dataset

    return {s: decompose_dataset(model, root, out / s, split=s, batch_size=N_SPLIT, progress=False).store
            for s in splits}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import vitdecomp as vd
    from vitdecomp.synth.dataset import generate_dataset
    from vitdecomp.interpret.text import text_encoder

    base = tmp_path_factory.mktemp("debias")
    root = base / "waterbirds"
    generate_dataset(root, 3 * N_SPLIT, seed=3, task="colour", spurious=0.95, splits=(N_SPLIT,) * 3,
                     groups=CLASS_GROUPS)
    model = vd.load(_spec())
    enc = text_encoder(model)
    texts = _texts()
    emb = {name: db.embed_texts(enc, t, "plain") for name, t in texts.items()}
    head = db.zero_shot_classifier(
        enc, [[f"a {c} object".replace("a orange", "an orange") for c in g] for g in CLASS_GROUPS], "plain")
    return {"root": root, "base": base, "model": model, "encoder": enc, "emb": emb, "head": head,
            "labels": db.WaterbirdsLabels.read(root), "stores": _decompose(model, root, base / "stores")}


@pytest.fixture(scope="module")
def result(world):
    return db.debias(world["stores"], world["labels"], world["head"], spurious=world["emb"]["spurious"],
                     core=world["emb"]["core"], k=K, random_draws=10, seed=0)


def _metadata(root: Path) -> dict[str, tuple[int, int, int]]:
    with open(root / "metadata.csv", newline="") as fh:
        return {r["img_filename"]: (int(r["y"]), int(r["place"]), int(r["split"])) for r in csv.DictReader(fh)}


def _hand_groups(pred, ids, meta):
    """Per-group accuracy by explicit counting, WGA, unweighted mean and plain accuracy."""
    hits: dict[int, list[int]] = {}
    for p, item in zip(pred, ids):
        y, place, _ = meta[item]
        hits.setdefault(2 * y + place, []).append(int(p == y))
    per = {str(g): sum(h) / len(h) for g, h in hits.items()}
    flat = [h for v in hits.values() for h in v]
    return per, min(per.values()), sum(per.values()) / len(per), sum(flat) / len(flat)


# ----------------------------------------------------------------------------- selection hygiene
def test_selection_uses_val_only(world, result, tmp_path):
    """Replacing every test image leaves the selection and its scores unchanged; a selection made
    on the replaced test split would differ, so the check can fail."""
    from PIL import Image

    copy = tmp_path / "waterbirds"
    shutil.copytree(world["root"], copy)
    meta = _metadata(copy)
    val_first = next(f for f, (_, _, s) in meta.items() if s == 1)
    odd = Image.open(copy / val_first).convert("RGB").transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    for f, (_, _, s) in meta.items():
        if s == 2:
            odd.save(copy / f)
    labels = db.WaterbirdsLabels.read(copy)
    new_test = _decompose(world["model"], copy, tmp_path / "stores", splits=("test",))["test"]
    stores = {"val": world["stores"]["val"], "test": new_test}
    other = db.debias(stores, labels, world["head"], spurious=world["emb"]["spurious"], core=world["emb"]["core"],
                      k=K, random_draws=3)
    assert other.selected == result.selected
    assert other.scores == result.scores
    assert other.baseline["counts"] == result.baseline["counts"]
    assert other.baseline["groups"] != result.baseline["groups"]  # the test data did change what is measured
    on_test, _ = db.contrastive_scores(new_test, labels, world["emb"]["spurious"], world["emb"]["core"], split="test")
    names = list(new_test.labels)
    assert [names[i] for i in db.top_k(on_test, db.candidate_mask(names), K)] != result.selected
    # the original test store does not belong to the copied dataset
    with pytest.raises(InputError, match="another dataset"):
        db.check_stores({"test": world["stores"]["test"]}, labels)


def test_selection_is_the_top_contrastive_candidates_from_an_in_memory_recomputation(world, result):
    from vitdecomp.interpret.score import ScoreMoments, feature_basis, score_table

    val = world["stores"]["val"].components(slice(None), as_stack=True)
    table = score_table(ScoreMoments.from_stack(val), {"s": feature_basis(world["emb"]["spurious"]),
                                                      "c": feature_basis(world["emb"]["core"])})
    contrast = table.contrastive("s", "c")
    names = list(val.names)
    allowed = db.candidate_mask(names)
    assert not any(".bias" in n or n == "bias" for n, a in zip(names, allowed) if a)
    expected = [names[i] for i in np.argsort(-np.where(allowed, contrast, -np.inf), kind="stable")[:K]]
    assert result.selected == expected
    for name in result.selected:
        assert result.scores[name]["contrastive"] == pytest.approx(contrast[names.index(name)], abs=1e-6)


# ----------------------------------------------------------------------------- metrics
def test_group_accuracies_equal_a_hand_computation_with_ablate(world, result):
    """Ablated predictions through vitdecomp.interpret.ablate (val means), grouped by metadata.csv read by hand."""
    import torch

    from vitdecomp.interpret.ablate import ablate

    meta = _metadata(world["root"])
    val = world["stores"]["val"].components(slice(None), as_stack=True)
    test = world["stores"]["test"].components(slice(None), as_stack=True)
    w = torch.from_numpy(world["head"].weight)
    cases = [([], result.baseline), (result.selected, result.ablated)]
    cases += [(r["components"], r) for r in result.random[:4]]
    for components, got in cases:
        z = ablate(test, components, mode="mean", reference=val)  # [n, d], float64
        pred = (z @ w.T).argmax(1).numpy()
        per, wga, avg, acc = _hand_groups(pred, test.meta["ids"], meta)
        assert got["groups"] == pytest.approx(per)
        assert got["worst_group"] == pytest.approx(wga)
        assert got["average_group"] == pytest.approx(avg)
        assert got["weighted"] == pytest.approx(acc)  # weighted by group frequency = plain accuracy
    assert result.n == {"val": N_SPLIT, "test": N_SPLIT}


def test_group_metrics_weighted_is_plain_accuracy_and_average_is_unweighted():
    y = np.array([0] * 10 + [0] * 2 + [1] * 3 + [1] * 5)
    place = np.array([0] * 10 + [1] * 2 + [0] * 3 + [1] * 5)
    pred = y.copy()
    pred[[0, 10, 12, 13]] = 1 - pred[[0, 10, 12, 13]]  # groups 0: 9/10, 1: 1/2, 2: 1/3, 3: 5/5
    m = db.group_metrics(pred, y, place)
    assert m["groups"] == pytest.approx({"0": 0.9, "1": 0.5, "2": 1 / 3, "3": 1.0})
    assert m["worst_group"] == pytest.approx(1 / 3)
    assert m["average_group"] == pytest.approx((0.9 + 0.5 + 1 / 3 + 1.0) / 4)
    assert m["weighted"] == pytest.approx(np.mean(pred == y)) and m["weighted"] != pytest.approx(m["average_group"])
    assert m["counts"] == {"0": 10, "1": 2, "2": 3, "3": 5}


# ----------------------------------------------------------------------------- the intervention
def test_ablating_top_contrastive_components_removes_the_background_more_than_random(world, result):
    """The background evidence of the test images (zero-shot "on water" minus "on land" logit, its
    mean gap between water and land images) shrinks more when the selected components are
    mean-ablated than with any of the 10 random draws of as many candidates, while the class read-out
    keeps at least the random draws' mean accuracy. (Over data seeds 0-5 the selected set keeps
    0.56-0.60 of the gap, the random draws at least 0.81; the read-out *accuracy* of the place stays
    1.0 either way: the background is carried redundantly, so k = 3 components only weaken it.)"""
    place_head = db.zero_shot_classifier(world["encoder"], _texts()["places"], "plain")
    stores, labels = world["stores"], world["labels"]
    val = db.project_split(stores["val"], labels, "val", place_head)
    test = db.project_split(stores["test"], labels, "test", place_head)
    names = list(stores["val"].labels)

    def gap(components):
        logits = db.ablated_logits(test, [names.index(c) for c in components], val.means(), place_head.bias)
        evidence = logits[:, 1] - logits[:, 0]
        return float(evidence[test.place == 1].mean() - evidence[test.place == 0].mean())

    full = gap([])
    assert full > 0
    kept = gap(result.selected) / full
    random_kept = [gap(r["components"]) / full for r in result.random]
    assert kept < min(random_kept)
    assert kept < 0.75
    assert result.ablated["weighted"] >= np.mean([r["weighted"] for r in result.random])


def test_random_control_has_the_requested_draws(world, result):
    stores, labels = world["stores"], world["labels"]
    names = list(stores["val"].labels)
    allowed = set(np.array(names)[db.candidate_mask(names)])
    assert len(result.random) == 10
    for draw in result.random:
        assert len(draw["components"]) == K == len(set(draw["components"]))
        assert set(draw["components"]) <= allowed
    summary = result.random_summary()
    wga = [r["worst_group"] for r in result.random]
    assert summary["worst_group_mean"] == pytest.approx(np.mean(wga))
    assert summary["worst_group_sd"] == pytest.approx(np.std(wga))
    assert summary["worst_group_max"] == max(wga)
    kwargs = dict(spurious=world["emb"]["spurious"], core=world["emb"]["core"], k=K, check=False)
    seven = db.debias(stores, labels, world["head"], random_draws=7, seed=0, **kwargs)
    assert len(seven.random) == 7
    assert [r["components"] for r in seven.random] == [r["components"] for r in result.random[:7]]
    other = db.debias(stores, labels, world["head"], random_draws=7, seed=1, **kwargs)
    assert [r["components"] for r in other.random] != [r["components"] for r in seven.random]
    payload = json.loads(json.dumps(result.to_json()))
    assert len(payload["random"]["draws"]) == 10 and payload["selection_split"] == "val"


def test_linear_head_matches_sklearn_on_the_train_split(world):
    """The folded (W, b) predicts what sklearn's standardised logistic regression predicts."""
    from sklearn.linear_model import LogisticRegression

    store = world["stores"]["train"]
    head = db.fit_linear_head(store, world["labels"], seed=0)
    stack = store.components(slice(None), as_stack=True)
    x = stack.values.double().sum(0).numpy()
    y = np.array([_metadata(world["root"])[i][0] for i in stack.meta["ids"]])
    sd = np.where(x.std(0) > 1e-12, x.std(0), 1.0)
    ref = LogisticRegression(C=1.0, max_iter=2000, random_state=0).fit((x - x.mean(0)) / sd, y)
    assert np.array_equal((x @ head.weight.T + head.bias).argmax(1), ref.predict((x - x.mean(0)) / sd))
    assert head.meta["n_train"] == N_SPLIT and head.space == "model"


def test_identity_alignment_gives_the_same_result(world, result):
    from vitdecomp.interpret.align import CompAlign

    store = world["stores"]["val"]
    align = CompAlign.identity(len(store.labels), store.comp_shape[-1], labels=list(store.labels))
    aligned = db.debias(world["stores"], world["labels"], world["head"], spurious=world["emb"]["spurious"],
                        core=world["emb"]["core"], k=K, random_draws=10, align=align, check=False)
    assert aligned.selected == result.selected and aligned.ablated == result.ablated


# ----------------------------------------------------------------------------- errors
def test_errors_on_a_bad_layout(world, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="metadata.csv"):
        db.WaterbirdsLabels.read(empty)
    (empty / "metadata.csv").write_text("img_id,img_filename,y,split\n1,a.png,0,0\n")
    with pytest.raises(InputError, match="place"):
        db.WaterbirdsLabels.read(empty)
    stores = world["stores"]
    with pytest.raises(InputError, match="holds the 'val' split"):
        db.check_stores({"val": stores["val"], "test": stores["val"]})
    with pytest.raises(InputError, match="debias needs a test store"):
        db.debias({"val": stores["val"]}, world["labels"], world["head"], spurious=world["emb"]["spurious"],
                  core=world["emb"]["core"])
    with pytest.raises(InputError, match="candidate"):
        db.debias(stores, world["labels"], world["head"], spurious=world["emb"]["spurious"],
                  core=world["emb"]["core"], k=100, check=False)
    # a store of another decomposition (layer granularity) does not go with the others
    from vitdecomp.store.dataset_run import decompose_dataset

    layer = decompose_dataset(world["model"], world["root"], tmp_path / "layer", split="test", batch_size=N_SPLIT,
                              granularity="layer", progress=False).store
    with pytest.raises(InputError, match="different decompositions"):
        db.check_stores({"val": stores["val"], "test": layer})


# ----------------------------------------------------------------------------- CLI
def _write_texts(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, texts in _texts().items():
        out[name] = folder / f"{name}.txt"
        out[name].write_text("\n".join(texts) + "\n")
    return out


def test_cli_debias_with_stores_and_store_dir(world, result, tmp_path, capsys):
    from vitdecomp.cli.main import main
    from vitdecomp.report import check_html

    files = _write_texts(tmp_path / "texts")
    stores = world["stores"]
    common = ["--k", str(K), "--random-draws", "5", "--spurious", str(files["spurious"]), "--core",
              str(files["core"]), "--templates", "plain", "--class-names",
              "|".join(f"a {c} object".replace("a orange", "an orange") for c in CLASS_GROUPS[0]),
              "|".join(f"a {c} object" for c in CLASS_GROUPS[1]), "-q"]
    out = tmp_path / "out"
    code = main(["debias", str(world["root"]), "--stores", *(str(stores[s].path) for s in db.SPLITS),
                 "--out", str(out), *common])
    assert code == 0
    payload = json.loads((out / "debias.json").read_text())
    assert payload["selected"] == result.selected
    assert payload["ablated"]["worst_group"] == pytest.approx(result.ablated["worst_group"])
    assert len(payload["random"]["draws"]) == 5
    run = payload["run"]
    assert run["command"] == "debias" and set(run["stores"]) == {"train", "val", "test"}
    assert run["pool"]["spurious"]["sha256"] and run["files"]["metadata"]["sha256"]
    assert "| top-3 contrastive ablated |" in (out / "debias.md").read_text()
    assert (out / "debias.svg").read_text().startswith("<svg")
    assert check_html((out / "report.html").read_text()) == []
    assert result.selected[0] in capsys.readouterr().out

    # --store-dir makes the val/test stores (no train store for a zero-shot head), then reuses them
    store_dir = tmp_path / "made"
    args = ["debias", str(world["root"]), "--model", _spec(), "--store-dir", str(store_dir), "--batch-size", "16",
            "--out", str(tmp_path / "out2"), *common]
    assert main(args) == 0
    assert sorted(p.name for p in store_dir.iterdir()) == ["test", "val"]
    done = sorted((store_dir / "val" / "done").iterdir())
    stamps = [p.stat().st_mtime_ns for p in done]
    assert main(args) == 0
    assert [p.stat().st_mtime_ns for p in done] == stamps  # reused, not recomputed
    again = json.loads((tmp_path / "out2" / "debias.json").read_text())
    assert again["selected"] == result.selected

    # clear errors, exit code 2
    assert main(["debias", str(tmp_path / "texts"), "--model", _spec(), "--store-dir", str(store_dir), "-q"]) == 2
    assert main(["debias", str(world["root"]), "--stores", str(stores["val"].path), str(stores["val"].path),
                 str(stores["test"].path), "--out", str(out), *common]) == 2
