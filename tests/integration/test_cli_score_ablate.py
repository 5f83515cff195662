"""`vitdecomp score` and `vitdecomp ablate` on stores of the shipped tiny CLIP over synthetic colour scenes.

Every number the commands print is recomputed here from the stored rows with the library
(score_table on full-space moments, ablate/layer_curve on in-memory stacks), so a wrong
projection, a wrong split or a wrong reference set shows up as a mismatch.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from vitdecomp.cli.main import main
from vitdecomp.core.shipped import shipped_path


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from vitdecomp.synth import generate_dataset
    from vitdecomp.synth.generator import describe

    root = tmp_path_factory.mktemp("score_ablate")
    summary = generate_dataset(root / "data", 48, seed=1, task="colour")
    spec = f"open_clip:local-dir:{shipped_path('clip')}"
    common = ["--batch-size", "16", "--store-dtype", "float32"]
    out = {"spec": spec, "root": root, "train": root / "train.zarr", "val": root / "val.zarr",
           "other": root / "other.zarr", "partial": root / "partial.zarr", "classes": root / "classes.txt"}
    assert main(["-q", "decompose", spec, str(root / "data" / "train"), "--out", str(out["train"]), *common]) == 0
    assert main(["-q", "decompose", spec, str(root / "data" / "val"), "--out", str(out["val"]), *common]) == 0
    # same images, other settings: a reference store that must be refused
    assert main(["-q", "decompose", spec, str(root / "data" / "val"), "--out", str(out["other"]), "--start-layer", "1",
                 *common]) == 0
    # a run killed before its last chunk: the store without that chunk's completion record
    shutil.copytree(out["train"], out["partial"])
    (out["partial"] / "done" / "000002.json").unlink()
    # zero-shot class texts in target order (ImageFolder: sorted class folders), as the tiny CLIP was trained
    out["classes"].write_text("\n".join(describe("colour", c) for c in summary["classes"]) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def encoder(stores):
    import vitdecomp as vd
    from vitdecomp.interpret.text import text_encoder

    return text_encoder(vd.load(stores["spec"]))


def _stack(path):
    """Every valid row of a store as one stack (the test's independent reading)."""
    from vitdecomp.store.component_store import ComponentStore

    st = ComponentStore.open(path)
    return st, st.components(slice(None), as_stack=True)


def _subset(stack, keep):
    """The items of a stack where the bool array ``keep`` is true."""
    from vitdecomp.interpret.ablate import take_items as subset

    return subset(stack, np.asarray(keep, dtype=bool))


# ---------------------------------------------------------------------------- score
def test_score_json_matches_score_table_on_full_moments(stores, encoder, tmp_path, capsys):
    from vitdecomp.interpret.score import ScoreMoments, ScoreTable, feature_basis, score_table
    from vitdecomp.interpret.text import embed_templates
    from vitdecomp.interpret.text.pools import load_pool

    mine = tmp_path / "sea_things.txt"
    mine.write_text("# my feature\nwater\nsand\nwater\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["score", str(stores["train"]), "colour", "shape", str(mine), "--variant", "corr", "var_attributed",
                 "var_explained", "--contrast", "colour", "shape", "--selectivity", "--top", "3",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "significance of corr against" in printed and "contrast[corr] colour - shape" in printed
    assert "colour: significant" in printed and "shape: not significant" in printed  # the shipped CLIP's truth
    payload = json.loads((out / "score.json").read_text(encoding="utf-8"))
    assert (out / "score.svg").read_text(encoding="utf-8").startswith("<svg")
    assert (out / "score-var_explained.svg").is_file()

    # independent: full-space moments (no projection), bases from the same text tower
    st, _ = _stack(stores["train"])
    moments = ScoreMoments.from_store(st)
    texts = {"colour": load_pool("feature/colour").texts, "shape": load_pool("feature/shape").texts,
             "sea_things": ["water", "sand"]}
    assert {k: v["texts"] for k, v in payload["features"].items()} == texts
    bases = {k: feature_basis(embed_templates(encoder, t, "plain")) for k, t in texts.items()}
    for kind in ("corr", "var_attributed", "var_explained"):
        expected = score_table(moments, bases, kind, share=kind == "var_attributed")
        got = ScoreTable.from_json(payload["tables"][kind])
        assert got.labels == expected.labels and got.features == expected.features
        np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-7, atol=1e-10)
    shares = ScoreTable.from_json(payload["tables"]["var_attributed"]).scores
    np.testing.assert_allclose(shares.sum(axis=0), 1.0, atol=1e-6)  # Σ_i Cov(a_i, Z) = Cov(Z)
    corr = ScoreTable.from_json(payload["tables"]["corr"])
    contrast = payload["contrast"]["by_variant"]["corr"]
    np.testing.assert_allclose([contrast["scores"][lab] for lab in corr.labels], corr["colour"] - corr["shape"],
                               rtol=1e-12)
    ranked = [contrast["scores"][lab] for lab in contrast["ranking"]]
    assert ranked == sorted(ranked, reverse=True)
    np.testing.assert_allclose(ScoreTable.from_json(payload["selectivity"]["corr"]).scores,
                               corr.selectivity().scores, rtol=1e-12)
    run = payload["run"]
    assert run["command"] == "score" and run["store"]["config_hash"] == st.config.hash()
    assert run["extra"]["pools"]["colour"]["sha256"] == load_pool("feature/colour").sha256
    assert run["files"]["feature:sea_things"]["path"] == str(mine)


def test_score_through_an_alignment_and_custom_pool(stores, tmp_path, capsys):
    import torch

    from vitdecomp.interpret.align import AlignConfig, CompAlign
    from vitdecomp.interpret.score import ScoreTable

    st, _ = _stack(stores["train"])
    n, d = len(st.labels), st.comp_shape[-1]
    # a non-identity map (2·I shared): corr and var_attributed shares are scale-free, so they must not change
    align = CompAlign(group_maps=2.0 * torch.eye(d)[None], map_index=(0,) * n, config=AlignConfig(mode="shared"),
                      labels=tuple(st.labels), meta={"model": st.config.model, "weights": st.config.weights,
                                                     "clip_model": stores["spec"]})
    align.save(tmp_path / "al" / "compalign.safetensors")
    pool = tmp_path / "words.txt"
    pool.write_text("red\nblue\nwater\n", encoding="utf-8")
    args = [str(stores["train"]), "colour", "--pool", str(pool), "--variant", "corr", "var_attributed", "--json"]
    assert main(["score", *args]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["score", *args, "--align", str(tmp_path / "al")]) == 0
    aligned = json.loads(capsys.readouterr().out)
    assert plain["tables"]["corr"]["features"] == ["colour", "red", "blue", "water"]
    assert aligned["space"] == "clip (CompAlign)" and plain["space"] != aligned["space"]
    for kind in ("corr", "var_attributed"):
        np.testing.assert_allclose(ScoreTable.from_json(aligned["tables"][kind]).scores,
                                   ScoreTable.from_json(plain["tables"][kind]).scores, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------- ablate
def _zero_shot(encoder, stores):
    import torch

    from vitdecomp.interpret.inputs import read_classes
    from vitdecomp.interpret.text import zero_shot_head

    head = zero_shot_head(encoder, read_classes(stores["classes"]), "plain").to(torch.float64)
    return head, lambda z: (z.to(torch.float64) @ head.T).argmax(-1)


def test_ablating_every_component_predicts_from_the_mean_representation(stores, encoder, tmp_path):
    import torch

    from vitdecomp.interpret.align import validation_mask
    from vitdecomp.interpret.ablate import ablate

    st, stack = _stack(stores["train"])
    out = tmp_path / "all"
    assert main(["-q", "ablate", str(stores["train"]), "--classes", str(stores["classes"]), "--templates", "plain",
                 "--components", *st.labels, "--reference-fraction", "0.5", "--seed", "3", "--curve", "none",
                 "--out", str(out)]) == 0
    payload = json.loads((out / "ablate.json").read_text(encoding="utf-8"))
    assert not (out / "ablate.svg").exists() and payload["curves"] == {}
    rows = np.arange(st.n_items)
    ref = validation_mask(rows, 3, 0.5)
    assert payload["reference"]["rows"] == rows[ref].tolist()
    assert payload["evaluated"]["rows"] == rows[~ref].tolist()  # disjoint, and together every row
    _, predict = _zero_shot(encoder, stores)
    targets = torch.as_tensor(st.targets(rows))
    mean_z = stack.values.double()[:, torch.as_tensor(ref)].mean(1).sum(0)  # Σ_i mean_ref c_i
    constant = int(predict(mean_z[None])[0])
    expected = float((targets[~ref] == constant).double().mean())
    assert payload["ablated"]["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert payload["ablated"]["n"] == int((~ref).sum())
    z_eval = stack.values.double()[:, ~torch.as_tensor(ref)].sum(0)
    unablated = float((predict(z_eval) == targets[~ref]).double().mean())
    assert payload["unablated"]["accuracy"] == pytest.approx(unablated, abs=1e-12) and unablated > 0.8
    # and the library's in-memory ablate() agrees row for row
    ev, rf = _subset(stack, ~ref), _subset(stack, ref)
    lib = float((predict(ablate(ev, list(range(len(st.labels))), reference=rf)) == targets[~ref]).double().mean())
    assert lib == pytest.approx(expected, abs=1e-12)
    run = payload["run"]
    assert run["command"] == "ablate" and run["store"]["config_hash"] == st.config.hash()
    assert run["files"]["classes"]["path"] == str(stores["classes"])


def test_curves_match_layer_curve_for_split_and_self_references(stores, encoder, tmp_path):
    import torch

    from vitdecomp.interpret.ablate import layer_curve
    from vitdecomp.interpret.align import validation_mask

    st, stack = _stack(stores["train"])
    _, predict = _zero_shot(encoder, stores)
    rows = np.arange(st.n_items)
    targets = torch.as_tensor(st.targets(rows))
    ref = validation_mask(rows, 3, 0.5)
    ev, rf = _subset(stack, ~ref), _subset(stack, ref)
    n_layers = len({lab.layer for lab in stack.labels if lab.layer is not None})

    def acc(t):
        return lambda z: float((predict(z) == t).double().mean())

    results = {}
    for name, ref_args in {"split": ["--reference-fraction", "0.5", "--seed", "3"],
                           "self": ["--reference-self"]}.items():
        out = tmp_path / name
        assert main(["-q", "ablate", str(stores["train"]), "--classes", str(stores["classes"]), "--templates",
                     "plain", *ref_args, "--out", str(out)]) == 0
        results[name] = json.loads((out / "ablate.json").read_text(encoding="utf-8"))
        assert "<svg" in (out / "ablate.svg").read_text(encoding="utf-8")
    for direction in ("from_last", "from_first"):
        lib_split = layer_curve(ev, acc(targets[~ref]), direction=direction, reference=rf)
        lib_self = layer_curve(stack, acc(targets), direction=direction, reference=stack)
        for name, lib in (("split", lib_split), ("self", lib_self)):
            points = results[name]["curves"][direction]
            assert len(points) == n_layers + 1 and points[0]["n_blocks"] == 0 and points[0]["components"] == []
            assert points[0]["accuracy"] == results[name]["unablated"]["accuracy"]
            np.testing.assert_allclose([p["accuracy"] for p in points], [a for _, a in lib], atol=1e-12)
        # the reference set matters: eval-set means give another curve than held-out means on these rows
        lib_split_self = layer_curve(ev, acc(targets[~ref]), direction=direction, reference=ev)
        if direction == "from_last":
            assert [a for _, a in lib_split] != [a for _, a in lib_split_self]
    assert results["self"]["reference"]["rows"] == results["self"]["evaluated"]["rows"] == rows.tolist()


def test_zero_resample_linear_and_reference_store(stores, encoder, tmp_path, capsys):
    import torch

    from vitdecomp.interpret.ablate import layer_curve

    st, stack = _stack(stores["train"])
    rows = np.arange(st.n_items)
    targets = torch.as_tensor(st.targets(rows))
    base = ["-q", "ablate", str(stores["train"]), "--json"]
    # zero mode needs no reference set
    assert main([*base, "--classes", str(stores["classes"]), "--templates", "plain", "--mode", "zero",
                 "--curve", "from_last"]) == 0
    zero = json.loads(capsys.readouterr().out)
    _, predict = _zero_shot(encoder, stores)
    lib = layer_curve(stack, lambda z: float((predict(z) == targets).double().mean()), mode="zero")
    np.testing.assert_allclose([p["accuracy"] for p in zero["curves"]["from_last"]], [a for _, a in lib], atol=1e-12)
    assert zero["reference"] is None
    # resample: seeded, so the same command gives the same numbers; ablating nothing is the unablated point
    resample = [*base, "--classes", str(stores["classes"]), "--templates", "plain", "--mode", "resample",
                "--reference-fraction", "0.5", "--seed", "5", "--components", "L03.H00", "L03.mlp"]
    assert main(resample) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(resample) == 0
    second = json.loads(capsys.readouterr().out)
    assert first["ablated"] == second["ablated"] and first["curves"] == second["curves"]
    assert first["curves"]["from_last"][0]["accuracy"] == first["unablated"]["accuracy"]
    # a separate reference store of the same model and settings; the linear head is fitted on it
    assert main([*base, "--head", "linear", "--reference-store", str(stores["val"]), "--components", "L03.H00"]) == 0
    lin = json.loads(capsys.readouterr().out)
    vst, vstack = _stack(stores["val"])
    x = torch.cat([vstack.values.double().sum(0), torch.ones(vst.n_items, 1, dtype=torch.float64)], 1).numpy()
    y = np.eye(lin["head"]["n_classes"])[vst.targets(slice(None))]
    lam = lin["head"]["lambda"]
    pen = np.sqrt(lam) * np.eye(x.shape[1])[:-1]  # ridge rows, intercept unpenalised
    w = np.linalg.lstsq(np.vstack([x, pen]), np.vstack([y, np.zeros((pen.shape[0], y.shape[1]))]), rcond=None)[0]
    z = np.concatenate([stack.values.double().sum(0).numpy(), np.ones((st.n_items, 1))], 1)
    assert lin["unablated"]["accuracy"] == pytest.approx(float(np.mean((z @ w).argmax(1) == targets.numpy())),
                                                         abs=1e-12)
    assert lin["reference"]["kind"] == "store" and lin["reference"]["n_rows"] == vst.n_items
    assert lin["run"]["stores"]["reference"]["config_hash"] == vst.config.hash()
    assert lin["evaluated"]["n_rows"] == st.n_items


def test_top_from_a_score_result(stores, tmp_path, capsys):
    from vitdecomp.interpret.score import ScoreTable

    out = tmp_path / "s"
    assert main(["-q", "score", str(stores["train"]), "colour", "shape", "--contrast", "colour", "shape",
                 "--out", str(out)]) == 0
    result = json.loads((out / "score.json").read_text(encoding="utf-8"))
    ranking = result["contrast"]["by_variant"]["corr"]["ranking"]
    shape = ScoreTable.from_json(result["tables"]["corr"])["shape"]
    labels = result["tables"]["corr"]["labels"]
    capsys.readouterr()
    base = ["-q", "ablate", str(stores["train"]), "--head", "linear", "--reference-fraction", "0.5",
            "--top-from", str(out / "score.json"), "--curve", "none", "--json"]
    assert main([*base, "--top-k", "4"]) == 0  # default ranking: the contrast
    assert set(json.loads(capsys.readouterr().out)["components"]) == set(ranking[:4])
    assert main([*base, "--top-by", "shape", "--top-k", "2"]) == 0
    expected = {labels[i] for i in np.argsort(-shape)[:2]}
    assert set(json.loads(capsys.readouterr().out)["components"]) == expected != set(ranking[:2])


@pytest.mark.parametrize("argv, message", [
    (["score", "{train}", "colour", "no_such_feature"], "unknown feature 'no_such_feature'"),
    (["score", "{partial}", "colour"], "is not complete"),
    (["ablate", "{train}", "--classes", "{root}/missing.txt", "--reference-self"], "class file"),
    (["ablate", "{train}", "--classes", "{classes}", "--reference-store", "{other}"], "does not match"),
    (["ablate", "{partial}", "--classes", "{classes}", "--reference-self"], "is not complete"),
    (["ablate", "{train}", "--classes", "{classes}", "--reference-store", "{partial}"], "is not complete"),
    (["ablate", "{train}", "--classes", "{classes}"], "needs an explicit reference set"),
    (["ablate", "{train}", "--classes", "{classes}", "--mode", "zero", "--components", "L09.H00"], "no component"),
    (["ablate", "{train}", "--head", "linear", "--reference-self"], "disjoint"),
    (["ablate", "{train}", "--head", "model", "--mode", "zero"], "no classifier head"),
])
def test_bad_input_exits_2_with_a_clear_message(stores, capsys, argv, message):
    args = [a.format(**{k: str(v) for k, v in stores.items()}) for a in argv]
    assert main(args) == 2
    assert message in capsys.readouterr().err
