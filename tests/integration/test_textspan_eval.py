"""TextSpan evaluation (docs/method.md §5): zero-shot accuracy with heads replaced by their m-text
reconstructions, on a store of the shipped tiny CLIP; and `vitdecomp label --evaluate`.
Also `vitdecomp align --match-rate` (docs/method.md §3 metric (b)) on a store of the shipped tiny ViT."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from vitdecomp.cli.main import main
from vitdecomp.core.shipped import shipped_path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import vitdecomp as vd
    from vitdecomp.store.component_store import ComponentStore
    from vitdecomp.synth import generate_dataset
    from vitdecomp.interpret.text import text_encoder, zero_shot_head

    root = tmp_path_factory.mktemp("tseval")
    generate_dataset(root / "data", 48, seed=1, task="colour", splits=(48, 0, 0))
    data = root / "data" / "train"
    spec = f"open_clip:local-dir:{shipped_path('clip')}"
    out = root / "clip.zarr"
    assert main(["-q", "decompose", spec, str(data), "--out", str(out), "--batch-size", "16",
                 "--store-dtype", "float32"]) == 0
    names = sorted(p.name for p in data.iterdir() if p.is_dir())
    classes = root / "classes.txt"
    classes.write_text("\n".join(names) + "\n", encoding="utf-8")
    store = ComponentStore.open(out)
    head = zero_shot_head(text_encoder(vd.load(spec)), names, "photo").double()
    moments = store.compute_moments(covariance=True)
    return {"root": root, "data": data, "spec": spec, "path": out, "store": store, "classes": classes,
            "names": names, "head": head, "moments": moments}


def _batches(store):
    for stack in store.iter_batches():
        rows = np.asarray(stack.meta["rows"], dtype=np.int64)
        yield stack, torch.as_tensor(store.targets(rows))


def _heads(labels, layers):
    return [i for i, n in enumerate(labels) if ".H" in n and int(n[1:3]) in layers]


def test_full_basis_is_the_identity_and_no_text_is_mean_ablation(setup):
    from vitdecomp.interpret.ablate import accuracy_over_batches
    from vitdecomp.interpret.textspan import reconstruction_accuracy, textspan_heads

    st, mom = setup["store"], setup["moments"]
    labels = list(st.labels)
    d = st.comp_shape[-1]
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((d + 16, d))
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)  # spans R^d
    heads = _heads(labels, {3})
    results = textspan_heads(mom, labels, [f"t{k}" for k in range(len(pool))], pool, components=heads, m=d,
                             rank=None)
    for r in results:  # a full orthonormal basis: the reconstruction is the identity
        assert r.reconstruction_basis.shape == (d, d)
        np.testing.assert_allclose(r.reconstruction_basis @ r.reconstruction_basis.T, np.eye(d), atol=1e-9)
    keep = reconstruction_accuracy(_batches(st), results, setup["head"], m_values=[0, 3, d], earlier="keep")
    assert keep["n"] == st.n_items and keep["earlier_ablated"] == [] and keep["analysed_kept"] is None
    by_m = {row["m"]: row for row in keep["by_m"]}
    assert by_m[d]["correct"] == keep["unablated"]["correct"]
    assert by_m[0]["correct"] == keep["mean_ablated"]["correct"]
    # m = 0 is mean-ablation of the analysed heads (the library's ablation kernel, same means)
    ref = accuracy_over_batches(_batches(st), {"none": [], "heads": heads},
                                lambda z: (z @ setup["head"].T).argmax(-1), mode="mean",
                                means=torch.from_numpy(mom.mean))
    assert ref["none"]["correct"] == keep["unablated"]["correct"]
    assert ref["heads"]["correct"] == by_m[0]["correct"]
    # with the earlier heads mean-ablated: m = d gives the "analysed kept" reference point
    early = reconstruction_accuracy(_batches(st), results, setup["head"], m_values=[0, d], earlier="mean",
                                    means=mom.mean)
    earlier_heads = _heads(labels, {0, 1, 2})
    assert early["earlier_ablated"] == [labels[i] for i in earlier_heads]
    by_m = {row["m"]: row for row in early["by_m"]}
    assert by_m[d]["correct"] == early["analysed_kept"]["correct"]
    ref = accuracy_over_batches(_batches(st), {"early": earlier_heads, "all": earlier_heads + heads},
                                lambda z: (z @ setup["head"].T).argmax(-1), mode="mean",
                                means=torch.from_numpy(mom.mean))
    assert ref["early"]["correct"] == early["analysed_kept"]["correct"]
    assert ref["all"]["correct"] == by_m[0]["correct"] == early["mean_ablated"]["correct"]


def test_accuracy_equals_in_memory_reconstruction(setup):
    from vitdecomp.interpret.text import zero_shot_logits
    from vitdecomp.interpret.textspan import reconstruct, reconstruction_accuracy, textspan_heads

    st, mom = setup["store"], setup["moments"]
    labels = list(st.labels)
    rng = np.random.default_rng(1)
    pool = rng.standard_normal((60, st.comp_shape[-1]))
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    texts = [f"t{k}" for k in range(len(pool))]
    heads = _heads(labels, {2, 3})
    results = textspan_heads(mom, labels, texts, pool, components=heads, m=6, rank=20)
    # the first m basis rows are the m-text TextSpan: a shorter run picks a prefix of the longer one
    short = textspan_heads(mom, labels, texts, pool, components=heads, m=3, rank=20)
    for a, b in zip(short, results):
        assert a.indices == b.indices[:3]
        np.testing.assert_allclose(a.reconstruction_basis, b.reconstruction_basis[:3], atol=1e-10)
    ms = [1, 3, 6]
    got = reconstruction_accuracy(_batches(st), results, setup["head"], m_values=ms, earlier="mean",
                                  means=mom.mean)
    # independently, all rows in memory, with reconstruct()
    stack = st.components(slice(None), as_stack=True).sum_tokens()
    values = stack.values.double()  # [comp, n, d]
    targets = torch.as_tensor(st.targets(slice(None)))
    earlier = _heads(labels, {0, 1})
    accs = {}
    for m in [0, *ms]:
        v = values.clone()
        v[earlier] = torch.from_numpy(mom.mean[earlier])[:, None, :].expand(-1, v.shape[1], -1)
        for i, r in zip(heads, results):
            v[i] = reconstruct(values[i], replace(r, reconstruction_basis=r.reconstruction_basis[:m]))
        pred = zero_shot_logits(v.sum(0), setup["head"]).argmax(-1)
        accs[m] = int((pred == targets).sum())
    assert {row["m"]: row["correct"] for row in got["by_m"]} == {m: accs[m] for m in ms}
    assert got["mean_ablated"]["correct"] == accs[0]
    assert all(row["n"] == st.n_items and row["heads_short"] == 0 for row in got["by_m"])


def test_label_evaluate_cli(setup, tmp_path, capsys):
    import vitdecomp as vd
    from vitdecomp.interpret.text import text_encoder
    from vitdecomp.interpret.text.pools import load_pool
    from vitdecomp.interpret.textspan import reconstruction_accuracy, textspan_heads

    target = tmp_path / "labels.json"
    argv = ["label", str(setup["path"]), "--pool", "feature/colour", "--m", "1", "--layers", "2", "--evaluate",
            "--classes", str(setup["classes"]), "--m-values", "0,1,3", "--out", str(target)]
    assert main(argv) == 0
    assert "zero-shot accuracy" in capsys.readouterr().out
    payload = json.loads(target.read_text(encoding="utf-8"))
    ev = payload["evaluation"]
    assert payload["m"] == 3 and all(len(h["texts"]) <= 3 for h in payload["heads"])
    assert [row["m"] for row in ev["by_m"]] == [0, 1, 3] and ev["classes"] == setup["names"]
    assert ev["earlier"] == "mean" and len(ev["earlier_ablated"]) == 8 and len(ev["analysed"]) == 8
    assert payload["run"]["command"] == "label" and "classes" in payload["run"]["files"]
    # the same numbers from the library
    st, mom = setup["store"], setup["moments"]
    labels = list(st.labels)
    pool = load_pool("feature/colour")
    emb = text_encoder(vd.load(setup["spec"])).encode(pool.texts).double().numpy()
    results = textspan_heads(mom, labels, pool.texts, emb, components=_heads(labels, {2, 3}), m=3)
    lib = reconstruction_accuracy(_batches(st), results, setup["head"], m_values=[0, 1, 3], means=mom.mean)
    assert ev["by_m"] == lib["by_m"] and ev["unablated"] == lib["unablated"]
    assert ev["by_m"][0]["correct"] == ev["mean_ablated"]["correct"]
    # --evaluate without classes, bad m-values: input errors (exit 2)
    assert main(["label", str(setup["path"]), "--pool", "feature/colour", "--evaluate"]) == 2
    assert main(["label", str(setup["path"]), "--pool", "feature/colour", "--evaluate", "--classes",
                 str(setup["classes"]), "--m-values", "1,x"]) == 2


def test_align_match_rate_cli(setup, tmp_path):
    import vitdecomp as vd
    from vitdecomp.interpret.align import CompAlign
    from vitdecomp.store.dataset_run import decompose_dataset
    from vitdecomp.store.component_store import ComponentStore, RunningMoments
    from vitdecomp.core.shipped import load_shipped
    from vitdecomp.interpret.text import text_encoder, zero_shot_head
    from vitdecomp.interpret.textspan import textspan_match_rate

    vit = load_shipped("vit")
    vit_path = tmp_path / "vit.zarr"
    decompose_dataset(vit, setup["data"], vit_path, batch_size=24, store_dtype="float32", progress=False)
    shapes = tmp_path / "shapes.txt"
    shapes.write_text("\n".join(vit.extras["tiny"]["classes"]) + "\n", encoding="utf-8")
    out = tmp_path / "fit"
    assert main(["-q", "align", str(vit_path), "--clip-store", str(setup["path"]), "--out", str(out), "--maps",
                 "shared", "--epochs", "1", "--lr", "0.01", "--val-fraction", "0.25", "--match-rate",
                 "--match-classes", str(shapes), "--match-split", "all", "--match-m", "3"]) == 0
    payload = json.loads((out / "align.json").read_text(encoding="utf-8"))
    mr = payload["metrics"]["textspan_match_rate"]
    assert mr["n_components"] == 16 and mr["m"] == 3 and mr["split"] == "all"
    assert all(0.0 <= c["ordered"] <= c["set"] <= 1.0 for c in mr["per_component"])
    assert "match_classes" in payload["run"]["files"]
    # the library on the same rows and maps
    st = ComponentStore.open(vit_path)
    heads = [i for i, n in enumerate(st.labels) if ".H" in n]
    mom = RunningMoments(len(heads), st.comp_shape[-1], covariance=True)
    for stack in st.iter_batches():
        mom.update(stack.sum_tokens().values[heads].movedim(0, 1))
    align = CompAlign.load(out / "compalign.safetensors")
    emb = zero_shot_head(text_encoder(vd.load(setup["spec"])), vit.extras["tiny"]["classes"], "photo")
    lib = textspan_match_rate(mom, align.maps[heads], vit.classifier()[0], emb, labels=[st.labels[i] for i in heads],
                              class_names=vit.extras["tiny"]["classes"], m=3)
    assert mr["match_rate"] == pytest.approx(lib["match_rate"]) and mr["per_component"] == lib["per_component"]
    # a model without a classifier (the CLIP store aligned to itself) is an input error
    assert main(["-q", "align", str(setup["path"]), "--clip-store", str(setup["path"]), "--out",
                 str(tmp_path / "self"), "--match-rate", "--match-classes", str(setup["classes"])]) == 2
