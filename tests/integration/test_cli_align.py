"""`vitdecomp align` (CompAlign from two stores) and `vitdecomp label --align`.

Two stores over the same synthetic images: the shipped tiny ViT classifier (not a CLIP) and the
shipped tiny CLIP, with different chunk sizes; plus small model-free stores with planted maps.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vitdecomp.cli.main import main

FIT = ["--epochs", "2", "--lr", "0.01", "--batch-size", "16", "--val-fraction", "0.25", "--seed", "3"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from vitdecomp.store.dataset_run import decompose_dataset
    from vitdecomp.synth import generate_dataset
    from vitdecomp.core.shipped import load_shipped, shipped_path

    root = tmp_path_factory.mktemp("align")
    generate_dataset(root / "data", 64, seed=1, task="colour", splits=(64, 0, 0))
    data = root / "data" / "train"
    decompose_dataset(load_shipped("vit"), data, root / "vit.zarr", batch_size=16, store_dtype="float32",
                      progress=False)
    spec = f"open_clip:local-dir:{shipped_path('clip')}"
    assert main(["-q", "decompose", spec, str(data), "--out", str(root / "clip.zarr"), "--batch-size", "24",
                 "--store-dtype", "float32"]) == 0
    classes = root / "classes.txt"
    classes.write_text("\n".join(sorted(p.name for p in data.iterdir() if p.is_dir())) + "\n", encoding="utf-8")
    return {"root": root, "vit": root / "vit.zarr", "clip": root / "clip.zarr", "spec": spec, "classes": classes}


@pytest.fixture(scope="module")
def fitted(stores):
    out = stores["root"] / "fit"
    code = main(["-q", "align", str(stores["vit"]), "--clip-store", str(stores["clip"]), "--out", str(out), *FIT,
                 "--classes", str(stores["classes"])])
    assert code == 0
    return out


def _rows(store_path: Path, clip_path: Path) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """Everything in memory: components [n, comp, d], CLIP embeddings [n, d_clip], rows valid in both, targets."""
    from vitdecomp.store.component_store import ComponentStore

    st, cl = ComponentStore.open(store_path), ComponentStore.open(clip_path)
    a, b = st.components(slice(None)), cl.components(slice(None))
    assert a.ids == b.ids
    valid = (a.valid & b.valid).numpy()
    return a.values.float(), b.reference.float(), np.flatnonzero(valid), st.targets(slice(None))


def test_align_metrics_equal_the_library_on_the_held_out_rows(stores, fitted):
    import vitdecomp as vd
    from vitdecomp.interpret.align import CompAlign, orthogonality_defect, validation_mask
    from vitdecomp.store.component_store import ComponentStore
    from vitdecomp.interpret.text import text_encoder, zero_shot_head

    payload = json.loads((fitted / "align.json").read_text(encoding="utf-8"))
    align = CompAlign.load(fitted / "compalign.safetensors")
    values, clip, rows, targets = _rows(stores["vit"], stores["clip"])
    val = rows[validation_mask(rows, 3, 0.25)]
    assert 0 < val.size < rows.size and payload["rows"] == {"usable": rows.size, "val": val.size,
                                                            "train": rows.size - val.size, "store": 64}
    # CompAlign.metrics of the saved maps on exactly the held-out rows (no row indices: split="all")
    m = align.metrics(lambda: iter([(values[val], clip[val])]))
    assert m["n"] == val.size == payload["metrics"]["val_rows"]
    assert payload["metrics"]["val_cosine"] == pytest.approx(m["cosine"], rel=1e-6)
    # ... and by hand: mean cos(sum_i F_i c_i, y)
    maps = align.maps.double()
    pred = torch.einsum("bcm,ckm->bk", values[val].double(), maps)
    cos = torch.nn.functional.cosine_similarity(pred, clip[val].double(), dim=-1).mean()
    assert payload["metrics"]["val_cosine"] == pytest.approx(float(cos), abs=1e-5)
    # the fit starts from the least-squares maps (epoch 0 of the record) and keeps its best held-out state
    history = [h["val_cosine"] for h in payload["fit"]["history"]]
    assert payload["fit"]["init"]["method"] == "lstsq" and payload["fit"]["history"][0]["epochs_trained"] == 0
    assert payload["metrics"]["val_cosine"] == pytest.approx(max(history), abs=1e-6)
    assert payload["fit"]["converged"] in (True, False) and isinstance(payload["warnings"], list)
    defect = orthogonality_defect(align.group_maps)[0].tolist()
    labels = ComponentStore.open(stores["vit"]).labels
    assert list(payload["metrics"]["defect"]["per_map"]) == labels
    np.testing.assert_allclose(list(payload["metrics"]["defect"]["per_map"].values()), defect, rtol=1e-9)
    assert payload["metrics"]["defect"]["summary"]["max"] == pytest.approx(max(defect))
    # zero-shot accuracy of the mapped sum and of CLIP itself, on the held-out rows
    names = stores["classes"].read_text(encoding="utf-8").split()
    head = zero_shot_head(text_encoder(vd.load(stores["spec"])), names, "photo").double()
    hit_a = (torch.nn.functional.normalize(pred, dim=-1) @ head.T).argmax(-1).numpy() == targets[val]
    hit_c = (clip[val].double() @ head.T).argmax(-1).numpy() == targets[val]
    zs = payload["metrics"]["zero_shot"]["val"]
    assert zs["n"] == val.size and zs["aligned"] == pytest.approx(hit_a.mean()) and zs["clip"] == pytest.approx(
        hit_c.mean())
    assert zs["clip"] > 0.8  # the tiny CLIP reads colours; a wrong target order would break this
    # provenance: both stores and the class file
    run = payload["run"]
    assert run["command"] == "align"
    assert run["stores"]["model"]["config_hash"] == ComponentStore.open(stores["vit"]).config.hash()
    assert run["stores"]["clip"]["config_hash"] == ComponentStore.open(stores["clip"]).config.hash()
    assert run["files"]["classes"]["path"] == str(stores["classes"])
    assert align.meta["clip_model"] == stores["spec"]


def test_resumed_fit_gives_the_maps_of_an_uninterrupted_one(stores, capsys):
    from vitdecomp.interpret.align import CompAlign

    root = stores["root"]
    args = ["align", str(stores["vit"]), "--clip-store", str(stores["clip"]), *FIT, "--epochs", "3",
            "--patience", "0", "--objective", "orthogonal", "--maps", "grouped"]
    straight, split = root / "straight", root / "split"
    assert main(["-q", *args, "--out", str(straight)]) == 0
    assert main(["-q", *args, "--out", str(split), "--stop-after", "2"]) == 0
    assert "--resume" in capsys.readouterr().out
    assert (split / "checkpoint").is_file() and not (split / "compalign.safetensors").exists()
    assert main(["-q", *args, "--out", str(split)]) == 2  # an existing checkpoint needs --resume
    assert main(["-q", *args, "--out", str(split), "--resume", "--seed", "4"]) == 2  # another run's checkpoint
    assert main(["-q", *args, "--out", str(split), "--resume"]) == 0
    a, b = CompAlign.load(straight / "compalign.safetensors"), CompAlign.load(split / "compalign.safetensors")
    assert a.n_maps == 6 and a.map_index == b.map_index  # embed, 4 blocks, bias
    assert torch.allclose(a.group_maps, b.group_maps, atol=1e-6, rtol=0)
    ja, jb = (json.loads((d / "align.json").read_text(encoding="utf-8")) for d in (straight, split))
    assert ja["fit"]["history"] == jb["fit"]["history"] and len(ja["fit"]["history"]) == 4
    assert ja["metrics"]["val_cosine"] == pytest.approx(jb["metrics"]["val_cosine"], abs=1e-6)
    assert ja["metrics"]["defect"]["summary"]["max"] < 1e-5  # orthogonal objective: exact isometries
    assert jb["run"]["extra"]["resumed_at_epoch"] == 2


def test_label_with_align_is_textspan_of_the_mapped_components(stores, fitted, tmp_path, capsys):
    import vitdecomp as vd
    from vitdecomp.interpret.align import CompAlign
    from vitdecomp.store.component_store import ComponentStore, RunningMoments
    from vitdecomp.interpret.text import text_encoder
    from vitdecomp.interpret.text.pools import load_pool
    from vitdecomp.interpret.textspan import textspan_heads

    target = tmp_path / "labels.json"
    assert main(["label", str(stores["vit"]), "--align", str(fitted), "--pool", "feature/colour", "--m", "2",
                 "--out", str(target)]) == 0
    assert "L03.H" in capsys.readouterr().out
    payload = json.loads(target.read_text(encoding="utf-8"))
    # the library on the aligned components, streamed chunk by chunk
    st = ComponentStore.open(stores["vit"])
    align = CompAlign.load(fitted / "compalign.safetensors")
    moments = RunningMoments(len(st.labels), align.d_clip, covariance=True)
    for stack in st.iter_batches():
        moments.update(align.apply(stack.sum_tokens()).values.movedim(0, 1))
    pool = load_pool("feature/colour")
    emb = text_encoder(vd.load(stores["spec"])).encode(pool.texts).double().numpy()
    direct = textspan_heads(moments, list(st.labels), pool.texts, emb,
                            components=[i for i, n in enumerate(st.labels) if ".H" in n], m=2)
    assert len(payload["heads"]) == 16
    assert [h["texts"] for h in payload["heads"]] == [r.texts for r in direct]
    np.testing.assert_allclose([h["variance_explained"] for h in payload["heads"]],
                               [r.variance_explained for r in direct], rtol=1e-9, atol=1e-12)
    assert payload["align"]["d_clip"] == align.d_clip and payload["model"] == stores["spec"]
    assert payload["run"]["store"]["config_hash"] == st.config.hash()
    assert payload["run"]["files"]["align"]["path"].endswith("compalign.safetensors")
    # maps of the wrong width, and a non-CLIP store without maps, are refused
    wrong = tmp_path / "wrong"
    CompAlign.identity(len(st.labels), 64).save(wrong / "compalign.safetensors")
    assert main(["label", str(stores["vit"]), "--align", str(wrong), "--model", stores["spec"],
                 "--pool", "feature/colour"]) == 2
    assert main(["label", str(stores["vit"]), "--model", stores["spec"], "--pool", "feature/colour"]) == 2


# ------------------------------------------------------------------ model-free stores
C, DM = 3, 6
NAMES = ["L00.H00", "L00.H01", "L00.mlp"]


def _store(path: Path, values: np.ndarray, ref: np.ndarray, ids: list[str], chunk: int,
           skipped_rows: tuple[int, ...] = ()) -> None:
    """A store of ``values [n, comp, d]`` (reference ``ref [n, d_ref]``), rows in ``skipped_rows`` skipped."""
    from vitdecomp import ComponentStack
    from vitdecomp.core.labels import parse_label
    from vitdecomp.store.component_store import ComponentStore, StoreConfig

    n, comp, d = values.shape
    names = NAMES if comp == C else ["embed"]
    cfg = StoreConfig(model=f"planted-{d}", weights="none", dtype="float32", n_items=n, batch_size=chunk)
    store = ComponentStore.create_or_open(path, cfg, names, (comp, d), ref.shape[1])
    for i in range(-(-n // chunk)):
        r = range(i * chunk, min((i + 1) * chunk, n))
        keep = [j for j in r if j not in skipped_rows]
        stack = ComponentStack(torch.from_numpy(values[keep]).movedim(0, 1).contiguous(),
                               tuple(map(parse_label, names)), torch.from_numpy(ref[keep])) if keep else None
        store.write_chunk(i, stack, [ids[j] for j in r], {ids[j]: "unreadable" for j in r if j in skipped_rows})


def _planted(tmp_path: Path, n: int, d_clip: int, ids_clip: list[str] | None = None,
             skip_model: tuple[int, ...] = (), skip_clip: tuple[int, ...] = ()) -> tuple[Path, Path]:
    gen = np.random.default_rng(0)
    c = gen.standard_normal((n, C, DM)).astype(np.float32)
    if d_clip >= DM:
        maps = np.linalg.qr(gen.standard_normal((C, d_clip, DM)))[0]
    else:
        maps = gen.standard_normal((C, d_clip, DM)) / np.sqrt(DM)
    y = np.einsum("bcm,ckm->bk", c, maps).astype(np.float32)
    ids = [f"img{i:03d}.png" for i in range(n)]
    _store(tmp_path / "m.zarr", c, c.sum(1), ids, 40, skip_model)
    _store(tmp_path / "c.zarr", y[:, None], y, ids_clip or ids, 32, skip_clip)
    return tmp_path / "m.zarr", tmp_path / "c.zarr"


def test_only_rows_valid_in_both_stores_are_used(tmp_path):
    from vitdecomp.interpret.align import validation_mask

    model, clip = _planted(tmp_path, 200, 8, skip_model=(5, 17), skip_clip=(9, 17, 150))
    out = tmp_path / "out"
    assert main(["-q", "align", str(model), "--clip-store", str(clip), "--out", str(out), "--objective",
                 "orthogonal", "--lr", "0.05", "--epochs", "8", "--patience", "0", "--batch-size", "16"]) == 0
    payload = json.loads((out / "align.json").read_text(encoding="utf-8"))
    rows = np.setdiff1d(np.arange(200), [5, 9, 17, 150])
    assert payload["rows"]["usable"] == 196
    assert payload["metrics"]["val_rows"] == int(validation_mask(rows, 0, 0.1).sum())
    assert payload["metrics"]["val_cosine"] > 0.99  # the planted isometries are found (NaN rows would break it)


def test_stores_of_different_images_are_refused(tmp_path, capsys):
    ids = [f"img{i:03d}.png" for i in range(40)]
    ids[3], ids[27] = "other3.png", "other27.png"
    model, clip = _planted(tmp_path, 40, 8, ids_clip=ids)
    assert main(["align", str(model), "--clip-store", str(clip), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "2 rows with different ids" in err and "row 3: 'img003.png' != 'other3.png'" in err
    assert "row 27" in err and not (tmp_path / "o" / "compalign.safetensors").exists()


def test_infeasible_isometry_exits_2_with_the_alternatives(tmp_path, capsys):
    model, clip = _planted(tmp_path, 40, 4)  # d_model 6 > d_clip 4: no isometry
    assert main(["align", str(model), "--clip-store", str(clip), "--out", str(tmp_path / "o"),
                 "--objective", "orthogonal"]) == 2
    err = capsys.readouterr().err
    assert "d_model=6 > d_clip=4" in err
    assert "--objective penalty" in err and "--constraint coisometry" in err and "PCA" in err
    # the penalty objective falls back to the co-isometry by itself
    assert main(["-q", "align", str(model), "--clip-store", str(clip), "--out", str(tmp_path / "p"),
                 "--epochs", "1"]) == 0
    assert json.loads((tmp_path / "p" / "align.json").read_text(encoding="utf-8"))["constraint"] == "coisometry"


def test_default_fit_solves_planted_stores_and_the_published_preset_says_it_did_not(tmp_path, capsys):
    model, clip = _planted(tmp_path, 400, 8)  # y = sum_i Q_i c_i exactly, Q_i isometries 6 -> 8
    out = tmp_path / "default"
    assert main(["align", str(model), "--clip-store", str(clip), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    payload = json.loads((out / "align.json").read_text(encoding="utf-8"))
    assert payload["config"]["init"] == "lstsq" and payload["fit"]["init"]["system"] == "joint"
    assert payload["metrics"]["val_cosine"] > 0.99 and payload["fit"]["converged"] and payload["warnings"] == []
    assert payload["fit"]["history"][0]["epochs_trained"] == 0  # the least-squares start, held out
    assert "least-squares start" in printed and "warning" not in printed

    pub = tmp_path / "published"
    assert main(["align", str(model), "--clip-store", str(clip), "--out", str(pub), "--preset", "published",
                 "--seed", "2"]) == 0
    printed = capsys.readouterr().out
    payload = json.loads((pub / "align.json").read_text(encoding="utf-8"))
    config = payload["config"]
    assert (config["init"], config["lr"], config["epochs"], config["batch_size"], config["seed"]) == (
        "random", 3e-4, 2, 32, 2)  # the preset, then the options given
    assert payload["metrics"]["val_cosine"] < 0.9 and not payload["fit"]["converged"]
    assert payload["warnings"] and payload["warnings"][0].startswith("not converged")
    assert all(f"warning: {w}" in printed for w in payload["warnings"])
    assert len(payload["fit"]["history"]) == 3  # the state after 0, 1 and 2 epochs
