"""vitdecomp.interpret.score.validate (`vitdecomp score --validate`) on model-free stores with planted structure.

* The documented identity: one-text features and components (and their sum) of constant norm make the CLIP
  proxy equal the corr score, so both Spearman ρ are 1.
* A store read through known maps against a CLIP store whose image embeddings are *not* the mapped sum:
  the proxy uses the CLIP rows paired by id (a skipped row drops out), equals a direct numpy computation
  with them and differs from the one with the mapped sum; the alignment cosines are the direct means.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vitdecomp import ComponentStack, InputError
from vitdecomp.interpret.score import ScoreMoments, ScoreTable, feature_basis, score_table, spearman, validate_store


def _store(path: Path, values: np.ndarray, ref: np.ndarray, names: list[str], ids: list[str], chunk: int, *,
           model: str, skipped: tuple[int, ...] = ()) -> Path:
    """A finished float32 store of ``values [n, comp, d]`` with reference rows ``ref [n, d_ref]``."""
    from vitdecomp.core.labels import parse_label
    from vitdecomp.store.component_store import ComponentStore, StoreConfig

    n, comp, d = values.shape
    cfg = StoreConfig(model=model, weights="none", dtype="float32", n_items=n, batch_size=chunk)
    store = ComponentStore.create_or_open(path, cfg, names, (comp, d), ref.shape[1])
    for i in range(-(-n // chunk)):
        r = range(i * chunk, min((i + 1) * chunk, n))
        keep = [j for j in r if j not in skipped]
        stack = ComponentStack(torch.from_numpy(values[keep]).movedim(0, 1).contiguous(),
                               tuple(map(parse_label, names)), torch.from_numpy(ref[keep])) if keep else None
        store.write_chunk(i, stack, [ids[j] for j in r], {ids[j]: "unreadable" for j in r if j in skipped})
    return path


def _direct_proxy(a: np.ndarray, z: np.ndarray, texts: np.ndarray) -> np.ndarray:
    """``[comp]``: mean over texts of Pearson_x(cos(a_i, y_s), cos(z, y_s)), all in numpy."""
    y = texts / np.linalg.norm(texts, axis=1, keepdims=True)
    cz = (z / np.linalg.norm(z, axis=1, keepdims=True)) @ y.T
    out = []
    for i in range(a.shape[1]):
        ca = (a[:, i] / np.linalg.norm(a[:, i], axis=1, keepdims=True)) @ y.T
        out.append(np.mean([np.corrcoef(ca[:, s], cz[:, s])[0, 1] for s in range(y.shape[0])]))
    return np.array(out)


def _corr_table(values: np.ndarray, names: list[str], texts: dict[str, np.ndarray]) -> ScoreTable:
    moments = ScoreMoments(values.shape[1], values.shape[2], labels=names).update(values)
    return score_table(moments, {k: feature_basis(t) for k, t in texts.items()}, "corr")


# ------------------------------------------------------------------ the identity
IDENTITY_NAMES = ["L00.H00", "L00.H01", "L00.mlp", "L01.H00", "bias"]


def _constant_norm_components(n: int, seed: int = 0) -> np.ndarray:
    """``[n, 5, 15]``: component i moves on a sphere of radius ρ_i in its own 3-d subspace of a random basis
    (so every component and their sum have one norm on every image); the last (``bias``) is constant."""
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.normal(size=(15, 15)))[0]
    radii = [1.0, 2.0, 0.5, 3.0, 1.5]
    out = np.zeros((n, 5, 15))
    for i, r in enumerate(radii):
        u = rng.normal(size=(n, 3)) + (0.0 if i < 4 else 1e9)  # the bias row: one direction
        u = r * u / np.linalg.norm(u, axis=1, keepdims=True)
        out[:, i] = u @ q[:, 3 * i : 3 * i + 3].T
    return out


def test_one_text_features_on_constant_norm_components_give_rho_one(tmp_path):
    n = 300
    a = _constant_norm_components(n)
    norms = np.linalg.norm(a, axis=2)
    assert np.ptp(norms, axis=0).max() < 1e-9 and np.ptp(np.linalg.norm(a.sum(1), axis=1)) < 1e-9
    rng = np.random.default_rng(1)
    texts = {f"f{p}": rng.normal(size=(1, 15)) for p in range(6)}
    ids = [f"img{i:04d}.png" for i in range(n)]
    store = _store(tmp_path / "clip.zarr", a.astype(np.float32), a.sum(1).astype(np.float32), IDENTITY_NAMES, ids,
                   64, model="planted-clip")
    table = _corr_table(a, IDENTITY_NAMES, texts)

    res = validate_store(store, texts, {"corr": table})
    # r_ip = s_ip exactly (float32 storage), so both orderings agree perfectly
    np.testing.assert_allclose(res.proxy.scores[:4], table.scores[:4], atol=2e-6)
    o = res.orderings["corr"]
    assert o["component_order_rho"] == pytest.approx(1.0, abs=1e-12)
    assert o["feature_order_rho"] == pytest.approx(1.0, abs=1e-12)
    assert res.components == tuple(IDENTITY_NAMES[:4]) and o["n_components"] == 4  # bias is not ranked
    assert res.reference == "store" and res.alignment is None and res.n_items == n
    # the same store as its own CLIP store (rows paired by id): the same numbers
    paired = validate_store(store, texts, table, clip_store=store)
    assert paired.reference == "clip_store"
    np.testing.assert_allclose(paired.proxy.scores, res.proxy.scores, atol=1e-12)

    # the identity needs constant norms: scaled per image, the proxy moves away from the score
    b = a * rng.uniform(0.2, 3.0, size=(n, 5, 1))
    store_b = _store(tmp_path / "b.zarr", b.astype(np.float32), b.sum(1).astype(np.float32), IDENTITY_NAMES, ids, 64,
                     model="planted-clip")
    moved = validate_store(store_b, texts, _corr_table(b, IDENTITY_NAMES, texts))
    assert np.abs(moved.proxy.scores[:4] - _corr_table(b, IDENTITY_NAMES, texts).scores[:4]).max() > 0.05


# ------------------------------------------------------------------ through an alignment
NAMES = ["L00.H00", "L00.H01", "L00.mlp"]
N, DM, DC = 240, 6, 8


@pytest.fixture
def aligned(tmp_path):
    """A model store, known maps F_i (orthonormal columns), and a CLIP store whose embedding is the mapped sum
    plus a per-image nonlinear term (so Z_CLIP ≠ Σ F_i c_i); the CLIP store skips row 9, chunk sizes differ."""
    from vitdecomp.interpret.align import AlignConfig, CompAlign
    from vitdecomp.store.component_store import ComponentStore

    rng = np.random.default_rng(0)
    c = rng.normal(size=(N, 3, DM)) + rng.normal(size=(1, 3, DM))
    maps = np.linalg.qr(rng.normal(size=(3, DC, DM)))[0]
    mapped = np.einsum("ncm,ckm->nck", c, maps)
    y = mapped.sum(1) + 1.5 * np.tanh(mapped[:, 0] * mapped[:, 1]) + 0.3 * rng.normal(size=(N, DC))
    ids = [f"img{i:03d}.png" for i in range(N)]
    model = _store(tmp_path / "m.zarr", c.astype(np.float32), c.sum(1).astype(np.float32), NAMES, ids, 40,
                   model="planted-model")
    clip = _store(tmp_path / "c.zarr", y[:, None].astype(np.float32), y.astype(np.float32), ["embed"], ids, 32,
                  model="planted-clip", skipped=(9,))
    align = CompAlign(group_maps=torch.from_numpy(maps).float(), map_index=(0, 1, 2),
                      config=AlignConfig(seed=5, val_fraction=0.3), labels=tuple(NAMES),
                      meta={"model": "planted-model", "weights": "none", "clip_model": "planted-clip",
                            "clip_weights": "none", "val_cosine": 0.5,
                            "store_config_hash": ComponentStore.open(model).config.hash()})
    texts = {name: rng.normal(size=(k, DC)) for name, k in (("colour", 3), ("shape", 2), ("size", 1))}
    # float32 storage: the direct computation reads the same rounded values
    c32, y32 = c.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64)
    mapped32 = np.einsum("ncm,ckm->nck", c32, maps.astype(np.float32).astype(np.float64))
    return {"model": model, "clip": clip, "align": align, "texts": texts, "mapped": mapped32, "y": y32}


def test_the_proxy_uses_the_clip_rows_paired_by_id(aligned):
    from vitdecomp.interpret.align import validation_mask

    rows = np.setdiff1d(np.arange(N), [9])
    a, y, texts = aligned["mapped"][rows], aligned["y"][rows], aligned["texts"]
    table = ScoreTable(np.random.default_rng(3).normal(size=(3, 3)), NAMES, tuple(texts), "corr")
    res = validate_store(aligned["model"], texts, {"corr": table}, align=aligned["align"], clip_store=aligned["clip"])

    assert res.n_items == N - 1 and res.reference == "clip_store"
    direct = np.stack([_direct_proxy(a, y, t) for t in texts.values()], axis=1)
    np.testing.assert_allclose(res.proxy.scores, direct, atol=1e-6)
    with_sum = np.stack([_direct_proxy(a, a.sum(1), t) for t in texts.values()], axis=1)
    assert np.abs(direct - with_sum).max() > 0.05  # the mapped sum would have given other numbers
    o = res.orderings["corr"]
    per_feature = [spearman(table.scores[:, j], direct[:, j]) for j in range(3)]
    per_component = [spearman(table.scores[i], direct[i]) for i in range(3)]
    assert o["component_order_rho"] == pytest.approx(np.mean(per_feature), abs=1e-12)
    assert o["feature_order_rho"] == pytest.approx(np.mean(per_component), abs=1e-12)

    s = a.sum(1)
    cos = (s * y).sum(1) / (np.linalg.norm(s, axis=1) * np.linalg.norm(y, axis=1))
    held = validation_mask(rows, 5, 0.3)
    al = res.alignment
    assert al["cosine"] == pytest.approx(cos.mean(), abs=1e-6)
    assert al["cosine_held_out"] == pytest.approx(cos[held].mean(), abs=1e-6) and al["n_held_out"] == held.sum()
    assert 0 < held.sum() < len(rows) and al["fit_val_cosine"] == 0.5
    js = res.to_json()
    assert js["orderings"]["corr"]["component_order_rho"] == o["component_order_rho"] and js["n_items"] == N - 1
    assert "component-ordering rho" in res.format() and f"on {held.sum()} held-out rows" in res.format()


def test_refusals(aligned, tmp_path):
    from dataclasses import replace

    texts, maps = aligned["texts"], aligned["align"]
    table = ScoreTable(np.zeros((3, 3)), NAMES, tuple(texts), "corr")
    with pytest.raises(InputError, match="--clip-store"):  # maps but no CLIP embeddings to compare with
        validate_store(aligned["model"], texts, table, align=maps)
    other = replace(maps, meta={**maps.meta, "clip_model": "another-clip"})
    with pytest.raises(InputError, match="another-clip"):
        validate_store(aligned["model"], texts, table, align=other, clip_store=aligned["clip"])
    with pytest.raises(InputError, match=r"\[s, 8\]"):
        validate_store(aligned["model"], {**texts, "colour": np.ones((2, 5))}, table, align=maps,
                       clip_store=aligned["clip"])
    with pytest.raises(InputError, match="scores"):
        validate_store(aligned["model"], {"colour": texts["colour"]}, table, align=maps, clip_store=aligned["clip"])
    ids = [f"img{i:03d}.png" for i in range(N)]
    ids[4] = "elsewhere.png"
    y = aligned["y"].astype(np.float32)
    wrong = _store(tmp_path / "w.zarr", y[:, None], y, ["embed"], ids, 32, model="planted-clip")
    with pytest.raises(InputError, match="row 4"):
        validate_store(aligned["model"], texts, table, align=maps, clip_store=wrong)
