"""Application commands on every architecture: `segment` on Swin / MaxViT / transformers ViT, text retrieval
on a non-CLIP store through a CompAlign."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitdecomp as vd
from vitdecomp.data.datasets import ImageNetSegmentation
from vitdecomp.apps.segmentation.harness import METHODS, format_table, method_availability, run_segmentation
from vitdecomp.apps.segmentation.metrics import SegmentationMetrics, resize_pair
from vitdecomp.testing.gtsegs import write_gtsegs

pytest.importorskip("h5py")
timm = pytest.importorskip("timm")

N = 5
ATTENTION = ("raw_attention", "rollout", "gradcam", "chefer")


def _swin():
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4,
                             window_size=4, embed_dim=16, depths=(1, 2), num_heads=(1, 2), num_classes=4).eval()


def _maxvit():
    return timm.create_model("test_maxvit", pretrained=False, img_size=64, embed_dim=(32, 64, 128, 256),
                             depths=(1, 1, 1, 1), stem_width=(16, 32), num_classes=4).eval()


def _hf_vit():
    from vitdecomp.testing.tiny_models import tiny_hf_vit

    return tiny_hf_vit(seed=2, classifier=True).eval()


BUILD = {"swin": _swin, "maxvit": _maxvit, "hf_vit": _hf_vit}


def _scenes(n: int = N) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Non-square images with a bright blob (the mask) on noise."""
    rng = np.random.default_rng(5)
    images, masks = [], []
    for _ in range(n):
        img = rng.integers(0, 120, size=(50, 70, 3), dtype=np.uint8)
        y0, x0 = rng.integers(2, 25), rng.integers(2, 40)
        mask = np.zeros((50, 70), dtype=np.uint8)
        mask[y0:y0 + 20, x0:x0 + 25] = 1
        img[mask > 0] = rng.integers(150, 255, size=3, dtype=np.uint8)
        images.append(img)
        masks.append(mask)
    return images, masks


@pytest.fixture(scope="module")
def mat(tmp_path_factory):
    images, masks = _scenes()
    return write_gtsegs(tmp_path_factory.mktemp("gt") / "gtsegs_ijcv.mat", images, masks), images, masks


def _independent(model, head, images, masks, methods, start):
    """Each method's metrics from maps computed here (decompose + token_heatmap, the one-call baselines)."""
    from vitdecomp.apps.segmentation.attention import raw_attention, rollout
    from vitdecomp.apps.heatmap import token_heatmap
    from vitdecomp.apps.segmentation.relevance import attention_gradcam, chefer_relevance

    prep = model.preprocessing
    size = tuple(prep.input_size)
    pix, small = [], []
    for img, mask in zip(images, masks):
        im, m = resize_pair(img, mask, size)
        t = torch.from_numpy(np.array(im)).float().div(255).permute(2, 0, 1)
        pix.append((t - torch.tensor(prep.mean)[:, None, None]) / torch.tensor(prep.std)[:, None, None])
        small.append(m)
    x = torch.stack(pix)
    y = head.directions()
    contrast = (y.double() - y.double().mean(dim=0, keepdim=True)).float()
    stack = vd.decompose(model, x, granularity="head_token", directions=contrast, start_layer=start)
    heads = [str(lab) for lab in stack.labels if lab.kind == "head"]
    pred = head.logits(model.representation(x)).argmax(1)
    per_class = torch.stack([token_heatmap(stack, c, components=heads).patch for c in range(len(y))], dim=1)
    maps = {"decomposition": per_class[torch.arange(len(x)), pred]}
    if "raw_attention" in methods:
        maps["raw_attention"] = raw_attention(model, x)
        maps["rollout"] = rollout(model, x)
        maps["gradcam"] = attention_gradcam(model, x, head)
        maps["chefer"] = chefer_relevance(model, x, head)
    out = {}
    for name, grid in maps.items():
        up = F.interpolate(grid[:, None].double(), size=size, mode="bilinear", align_corners=False)[:, 0]
        metrics = SegmentationMetrics()
        for b in range(len(x)):
            metrics.update(up[b].numpy(), small[b])
        out[name] = metrics.result()
    return out, pred


@pytest.mark.parametrize("family", list(BUILD))
def test_segment_runs_per_method_and_reports_unavailable_ones(family, mat):
    from vitdecomp.apps.segmentation.relevance import classifier_head

    path, images, masks = mat
    model = vd.wrap(BUILD[family]())
    head = classifier_head(model)
    result = run_segmentation(model, ImageNetSegmentation(path), head, batch_size=3, n_examples=1)
    assert result.n_images == N and not result.skipped
    windowed = family in ("swin", "maxvit")
    if windowed:  # the attention baselines are unavailable, with the reason; the decomposition still runs
        assert list(result.unavailable) == list(ATTENTION) and list(result.metrics) == ["decomposition"]
        assert all("isotropic" in why for why in result.unavailable.values())
        table = format_table(result)
        assert all(f"n/a {name}:" in table for name in ATTENTION)
        payload = result.to_json()
        assert set(payload["unavailable"]) == set(ATTENTION)
        assert payload["protocol"]["methods_scored"] == ["decomposition"]
        assert list(result.examples[0]["maps"]) == ["decomposition"]
    else:  # transformers ViT: every method, gradients included
        assert result.unavailable == {} and list(result.metrics) == list(METHODS)
    assert method_availability(model) == {name: result.unavailable.get(name) for name in METHODS}
    start = result.protocol["decomposition_start"]
    if family == "swin":  # blocks 1..2 are the last stage
        assert start == 1
    want, pred = _independent(model, head, images, masks, list(result.metrics), start)
    assert [it["target"] for it in result.items] == pred.tolist()
    for name, got in result.metrics.items():
        for key in ("pixel_accuracy", "miou_two_class", "map_two_channel", "fg_iou", "bg_iou", "ap_fg"):
            # float32 maps from other batch sizes: a near-tie may swap in the AP ranking (~1e-6)
            assert got[key] == pytest.approx(want[name][key], rel=2e-5, abs=1e-9), (family, name, key)


def test_segment_cli_on_swin_writes_unavailable_methods(tmp_path, mat, monkeypatch, capsys):
    import vitdecomp.core.loading
    from vitdecomp.cli.main import main

    swin = vd.wrap(_swin())
    # vd.load first: its lazy lookup would otherwise cache the patched loading.load for good
    monkeypatch.setattr(vd, "load", lambda spec, **kwargs: swin)
    monkeypatch.setattr(vitdecomp.core.loading, "load", lambda spec, **kwargs: swin)
    out = tmp_path / "out"
    code = main(["segment", "--mat", str(mat[0]), "--model", "timm:tiny-swin", "--batch-size", "5",
                 "--examples", "1", "--out", str(out), "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "n/a chefer:" in text and "decomposition" in text
    payload = json.loads((out / "results.json").read_text())
    assert set(payload["unavailable"]) == set(ATTENTION) and list(payload["metrics"]) == ["decomposition"]
    assert payload["protocol"]["decomposition_start"] == 1 and payload["n_images"] == N


# ----------------------------------------------------------------------------- retrieve through a CompAlign
FP16_TOL = 3e-3  # float16 storage of unit vectors: inner products agree to about 1e-3


@pytest.fixture(scope="module")
def timm_store(tmp_path_factory):
    """A store of a tiny random timm ViT (head granularity) over 24 synthetic scenes."""
    from vitdecomp.cli.main import main
    from vitdecomp.store.component_store import ComponentStore
    from vitdecomp.synth import generate_dataset

    root = tmp_path_factory.mktemp("vitstore")
    generate_dataset(root / "data", 24, seed=4, splits=(24, 0, 0))
    out = root / "vit.zarr"
    assert main(["-q", "decompose", "timm:test_vit", str(root / "data" / "train"), "--no-pretrained",
                 "--out", str(out), "--batch-size", "8"]) == 0
    return ComponentStore.open(out)


def _planted(store, d_clip: int, seed: int, n_maps: int = 3):
    """A random CompAlign for the store: ``n_maps`` maps shared round-robin by the components."""
    from vitdecomp.interpret.align import AlignConfig, CompAlign

    gen = torch.Generator().manual_seed(seed)
    n, d = int(store.comp_shape[0]), int(store.comp_shape[-1])
    maps = torch.randn(n_maps, d_clip, d, generator=gen) / d ** 0.5
    return CompAlign(group_maps=maps, map_index=tuple(i % n_maps for i in range(n)), config=AlignConfig(),
                     labels=tuple(str(x) for x in store.labels),
                     meta={"model": store.config.model, "clip_model": _clip_spec(), "clip_weights": "pretrained"})


def _clip_spec() -> str:
    from vitdecomp.core.shipped import shipped_path

    return f"open_clip:local-dir:{shipped_path('clip')}"


def _brute_force(store, align, group):
    """Unit ``Σ_{i∈G} F_i c_i`` (all components for the full group) in float64, straight from CompAlign.apply."""
    stack = store.components(slice(None), as_stack=True)
    valid = np.asarray(stack.meta["valid"])
    mapped = align.apply(stack.sum_tokens()).values.double().numpy()  # [comp, n, d_clip]
    rows = range(len(store.labels)) if group.components is None else [store.labels.index(c) for c in group.components]
    s = mapped[list(rows)].sum(0)[valid]
    return s / np.linalg.norm(s, axis=1, keepdims=True), np.flatnonzero(valid)


def _same_topk(hits, exact, rows_of_position, queries, k):
    sims = queries @ exact.T
    for r in range(len(queries)):
        order = np.argsort(-sims[r], kind="stable")
        kth = sims[r, order[k - 1]]
        sure = set(rows_of_position[order[sims[r, order] > kth + FP16_TOL]].tolist())
        allowed = set(rows_of_position[np.flatnonzero(sims[r] >= kth - FP16_TOL)].tolist())
        assert sure <= set(hits.rows[r].tolist()) <= allowed
        pos = {int(row): p for p, row in enumerate(rows_of_position)}
        np.testing.assert_allclose(hits.scores[r], [sims[r, pos[int(x)]] for x in hits.rows[r]], atol=FP16_TOL)


def test_aligned_index_equals_brute_force_on_mapped_sums(timm_store, tmp_path):
    from vitdecomp.apps import retrieve

    store = timm_store
    align = _planted(store, d_clip=24, seed=0)
    group = retrieve.ComponentGroup.of([str(x) for x in store.labels[2:5]])
    full = retrieve.full_group()
    gen = np.random.default_rng(1)
    queries = retrieve.unit_rows(gen.standard_normal((6, 24)))
    for backend in ("numpy", "faiss"):
        if backend == "faiss":
            pytest.importorskip("faiss")
        index = retrieve.build_index(store, [group, full], tmp_path / backend, backend=backend, align=align)
        assert index.alignment["d_clip"] == 24 and index[group].dim == 24
        for g in (group, full):
            exact, rows = _brute_force(store, align, g)
            assert np.array_equal(index.rows, rows)
            hits = retrieve.by_text(index[g], queries, k=5)
            _same_topk(hits, exact, rows, queries, 5)
    # the aligned full group is not the store's own representation: the plain index differs in width
    plain = retrieve.build_index(store, [full], tmp_path / "plain", backend="numpy")
    assert plain[full].dim == int(store.comp_shape[-1]) != 24 and plain.alignment is None


def test_another_alignment_is_an_index_mismatch(timm_store, tmp_path):
    from vitdecomp.apps import retrieve

    store = timm_store
    group = retrieve.ComponentGroup.of([str(store.labels[3])])
    first, other = _planted(store, 24, seed=0), _planted(store, 24, seed=1)
    file = first.save(tmp_path / "a" / "compalign.safetensors")
    index = retrieve.build_index(store, [group], tmp_path / "idx", backend="numpy", align=tmp_path / "a")
    rec = index.alignment
    assert rec["sha256"] == __import__("hashlib").sha256(file.read_bytes()).hexdigest() and rec["file"] == str(file)
    # the same maps as an object are the same alignment (reused, no rebuild); other maps or none are not
    assert retrieve.build_index(store, [group], tmp_path / "idx", backend="numpy", align=first).path == index.path
    with pytest.raises(retrieve.IndexMismatchError, match="alignment"):
        retrieve.build_index(store, [group], tmp_path / "idx", backend="numpy", align=other)
    with pytest.raises(retrieve.IndexMismatchError, match="no alignment"):
        retrieve.build_index(store, [group], tmp_path / "idx", backend="numpy")
    rebuilt = retrieve.build_index(store, [group], tmp_path / "idx", backend="numpy", align=other, rebuild=True)
    assert rebuilt.alignment["maps_sha256"] != rec["maps_sha256"]
    # default folders never collide: one per alignment, next to the plain one
    a = retrieve.build_index(store, [group], backend="numpy", align=first)
    assert a.path.parent == store.path and a.path.name == f"retrieval-align-{rec['maps_sha256'][:12]}"
    # maps fitted for other components are refused before anything is built
    from vitdecomp.interpret.align import CompAlign

    wrong = CompAlign(first.group_maps, first.map_index[:-1], first.config, labels=first.labels[:-1])
    from vitdecomp.errors import InputError

    with pytest.raises(InputError, match="components"):
        retrieve.build_index(store, [group], tmp_path / "w", backend="numpy", align=wrong)


def test_cli_text_query_on_a_non_clip_store_through_align(timm_store, tmp_path, capsys):
    import hashlib

    from vitdecomp.apps import retrieve
    from vitdecomp.cli.main import main
    from vitdecomp.interpret.text import embed_templates, text_encoder

    store = timm_store
    encoder = text_encoder(vd.load(_clip_spec()))
    d_clip = int(embed_templates(encoder, ["x"], "plain").shape[1])
    align = _planted(store, d_clip, seed=2)
    folder = tmp_path / "align"
    file = align.save(folder / "compalign.safetensors")
    comps = ",".join(str(x) for x in store.labels[1:4])
    texts = ["a red object", "a blue object"]
    out = tmp_path / "out"
    code = main(["retrieve", str(store.path), "--align", str(folder), "--text", texts[0], "--text", texts[1],
                 "--components", comps, "--k", "4", "--backend", "numpy", "--out", str(out),
                 "--index-dir", str(tmp_path / "idx")])
    assert code == 0, capsys.readouterr().err
    assert "through CompAlign" in capsys.readouterr().out
    payload = json.loads((out / "results.json").read_text())
    assert payload["index"]["alignment"]["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert payload["run"]["files"]["align"]["sha256"] == payload["index"]["alignment"]["sha256"]
    emb = embed_templates(encoder, texts, "plain").double().numpy()
    queries = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    group = retrieve.ComponentGroup.of(comps.split(","))
    exact, rows = _brute_force(store, align, group)
    got = [[h["row"] for h in q["results"][group.name]] for q in payload["queries"]]
    scores = [[h["score"] for h in q["results"][group.name]] for q in payload["queries"]]
    sims = queries @ exact.T
    pos = {int(r): p for p, r in enumerate(rows)}
    for qi in range(2):
        np.testing.assert_allclose(scores[qi], [sims[qi, pos[r]] for r in got[qi]], atol=FP16_TOL)
        best = np.sort(sims[qi])[::-1][:4]
        np.testing.assert_allclose(scores[qi], best, atol=FP16_TOL)
    # --feature without --scores cannot rank in the CLIP space: a clear error
    assert main(["retrieve", str(store.path), "--align", str(folder), "--text", "x", "--feature", "colour",
                 "--backend", "numpy"]) == 2
    assert "--scores" in capsys.readouterr().err
