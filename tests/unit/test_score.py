"""vitdecomp.interpret.score on random fp64 data: every score against a direct numpy computation."""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

from vitdecomp import ComponentStack, InputError
from vitdecomp.interpret.score import (
    ScoreMoments,
    ScoreTable,
    clip_proxy,
    clip_proxy_table,
    feature_basis,
    feature_scores,
    score_table,
    spearman,
    validate_ordering,
)

COMP, D, N = 7, 12, 500
LABELS = tuple(["embed"] + [f"L00.H{h:02d}" for h in range(3)] + ["L00.mlp", "L01.H00", "L01.mlp"])
KINDS = ("corr", "var_attributed", "var_explained")


def _data(seed: int = 0) -> np.ndarray:
    """``[n, comp, d]``: correlated, non-centred components of different scales."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(COMP, D, D)) * rng.uniform(0.3, 2.0, size=(COMP, 1, 1))
    shared = rng.normal(size=(N, 1, D))  # makes components correlate with each other
    x = np.einsum("ncd,cde->nce", rng.normal(size=(N, COMP, D)) + 0.5 * shared, mix)
    return x + rng.normal(size=(1, COMP, D)) * 3.0


def _texts(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"color": rng.normal(size=(3, D)), "texture": rng.normal(size=(4, D)), "animal": rng.normal(size=(2, D))}


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return _data()


@pytest.fixture(scope="module")
def bases() -> dict[str, np.ndarray]:
    return {name: feature_basis(t) for name, t in _texts().items()}


@pytest.fixture(scope="module")
def moments(data: np.ndarray) -> ScoreMoments:
    return ScoreMoments(COMP, D, labels=LABELS).update(data)


def _direct(x: np.ndarray, basis: np.ndarray, kind: str, z: np.ndarray | None = None) -> np.ndarray:
    """docs/method.md §4 scores straight from the data with np.corrcoef / np.cov."""
    z = x.sum(1) if z is None else z
    sz = z @ basis.T
    out = []
    for i in range(x.shape[1]):
        si = x[:, i] @ basis.T
        if kind == "corr":
            out.append(np.mean([np.corrcoef(si[:, j], sz[:, j])[0, 1] for j in range(basis.shape[0])]))
        elif kind == "var_attributed":
            out.append(np.mean([np.cov(si[:, j], sz[:, j])[0, 1] for j in range(basis.shape[0])]))
        else:
            cov = np.cov(x[:, i].T)
            out.append(np.trace(basis @ cov @ basis.T) / np.trace(cov))
    return np.asarray(out)


def _close(a: np.ndarray, b: np.ndarray, tol: float) -> None:
    """|a - b| <= tol * max(1, max|b|)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(b)))) if b.size else 1.0
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * scale)


def _stack(x: np.ndarray, labels: tuple[str, ...] = LABELS, reference: np.ndarray | None = None) -> ComponentStack:
    from vitdecomp.core.labels import parse_label

    values = torch.from_numpy(np.ascontiguousarray(x.transpose(1, 0, 2)))
    ref = torch.from_numpy(x.sum(1) if reference is None else reference)
    return ComponentStack(values, tuple(parse_label(s) for s in labels), ref)


# ------------------------------------------------------------------ moments
def test_moments_equal_numpy(data: np.ndarray, moments: ScoreMoments) -> None:
    z = data.sum(1)
    assert moments.count == N
    _close(moments.mean, data.mean(0), 1e-12)
    _close(moments.mean_z, z.mean(0), 1e-12)
    _close(moments.covariance_z, np.cov(z.T), 1e-12)
    for i in range(COMP):
        both = np.cov(data[:, i].T, z.T)  # [2d, 2d]
        _close(moments.covariance[i], both[:D, :D], 1e-12)
        _close(moments.cross_covariance[i], both[:D, D:], 1e-12)
        _close(moments.trace[i] / (N - 1), np.trace(both[:D, :D]), 1e-12)
    # Σ_i C_i = Σ_Z when Z is the sum
    _close(moments.cross_covariance.sum(0), moments.covariance_z, 1e-12)


def _state_close(a: ScoreMoments, b: ScoreMoments, tol: float) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert int(sa["count"]) == int(sb["count"])
    for key in ("mean", "mean_z", "m2", "cross", "m2_z", "trace", "trace_z"):
        _close(sa[key], sb[key], tol)


def test_streaming_uneven_batches_and_merge_order_equal_one_shot(data: np.ndarray, moments: ScoreMoments) -> None:
    sizes = [1, 37, 200, 2, 0, 260]
    assert sum(sizes) == N
    streamed = ScoreMoments(COMP, D, labels=LABELS)
    start = 0
    for size in sizes:
        streamed.update(torch.from_numpy(data[start : start + size]))  # torch input works too
        start += size
    _state_close(streamed, moments, 1e-12)

    first = ScoreMoments(COMP, D, labels=LABELS).update(data[:173])
    second = ScoreMoments(COMP, D, labels=LABELS).update(data[173:])
    ab = first.copy().merge(second)
    ba = second.copy().merge(first)
    _state_close(ab, moments, 1e-12)
    _state_close(ba, moments, 1e-12)
    # merging into an empty accumulator is the identity
    _state_close(ScoreMoments(COMP, D, labels=LABELS).merge(moments), moments, 0.0)


def test_merge_rejects_mismatches(moments: ScoreMoments) -> None:
    with pytest.raises(InputError):
        moments.copy().merge(ScoreMoments(COMP, D))  # other labels
    with pytest.raises(InputError):
        moments.copy().merge(ScoreMoments(COMP, D, labels=LABELS, directions=np.eye(D)[:3]))
    with pytest.raises(InputError):
        ScoreMoments(COMP, D).update(np.zeros((4, COMP, D + 1)))
    with pytest.raises(InputError):
        ScoreMoments(COMP, D).update(np.full((4, COMP, D), np.nan))


def test_state_dict_round_trip_through_npz(moments: ScoreMoments, bases: dict[str, np.ndarray],
                                           tmp_path: Path) -> None:
    path = moments.save(tmp_path / "moments.npz")
    back = ScoreMoments.load(path)  # np.load(allow_pickle=False)
    assert back.labels == LABELS and back.count == N and back.directions is None
    _state_close(back, moments, 0.0)
    for kind in KINDS:
        np.testing.assert_array_equal(score_table(back, bases, kind).scores, score_table(moments, bases, kind).scores)
    with np.load(path) as z:
        assert set(z.files) >= {"count", "mean", "m2", "cross", "m2_z", "labels"}
    proj = ScoreMoments.from_state_dict(moments.project(bases["color"]).state_dict())
    np.testing.assert_array_equal(proj.directions, bases["color"])


# ------------------------------------------------------------------ scores
@pytest.mark.parametrize("kind", KINDS)
def test_scores_equal_direct_numpy(kind: str, data: np.ndarray, moments: ScoreMoments,
                                   bases: dict[str, np.ndarray]) -> None:
    for name, basis in bases.items():
        got = feature_scores(moments, basis, kind=kind)  # type: ignore[arg-type]
        assert got.shape == (COMP,)
        _close(got, _direct(data, basis, kind), 1e-10)
    table = score_table(moments, bases, kind)  # type: ignore[arg-type]
    assert table.labels == LABELS and table.features == tuple(bases) and table.kind == kind
    for j, basis in enumerate(bases.values()):
        _close(table.scores[:, j], _direct(data, basis, kind), 1e-10)


def test_scores_with_explicit_reference(data: np.ndarray, bases: dict[str, np.ndarray]) -> None:
    rng = np.random.default_rng(5)
    ref = data.sum(1) + rng.normal(size=(N, D)) * 2.0  # a total that is not the sum
    m = ScoreMoments(COMP, D).update(data[:300], ref[:300]).merge(ScoreMoments(COMP, D).update(data[300:], ref[300:]))
    for kind in ("corr", "var_attributed"):
        _close(feature_scores(m, bases["texture"], kind=kind), _direct(data, bases["texture"], kind, z=ref), 1e-10)
    # from_stack(use_reference=True) takes the stack's reference
    ms = ScoreMoments.from_stack(_stack(data, reference=ref), use_reference=True)
    _close(feature_scores(ms, bases["color"]), _direct(data, bases["color"], "corr", z=ref), 1e-10)


def test_var_attributed_shares_sum_to_one_for_the_exact_sum(moments: ScoreMoments, data: np.ndarray,
                                                            bases: dict[str, np.ndarray]) -> None:
    for basis in bases.values():
        shares = feature_scores(moments, basis, kind="var_attributed", share=True)
        assert abs(shares.sum() - 1.0) < 1e-10
        raw = feature_scores(moments, basis, kind="var_attributed")
        z = data.sum(1) @ basis.T
        _close(raw.sum(), np.mean(np.var(z, axis=0, ddof=1)), 1e-10)
    # with components missing from the total the shares no longer add up to 1
    rng = np.random.default_rng(3)
    ref = data.sum(1) + rng.normal(size=(N, D)) * 3.0
    partial = ScoreMoments(COMP, D).update(data, ref)
    assert feature_scores(partial, bases["color"], kind="var_attributed", share=True).sum() < 0.95
    with pytest.raises(InputError):
        feature_scores(moments, bases["color"], kind="corr", share=True)


def test_planted_feature_ranks_first_with_highest_selectivity() -> None:
    rng = np.random.default_rng(7)
    eye = np.eye(D)
    feats = {"color": eye[0:2], "texture": eye[2:5], "animal": eye[5:7]}
    texts = {name: rng.normal(size=(3, 2 if name != "texture" else 3)) @ b for name, b in feats.items()}
    bases = {name: feature_basis(t) for name, t in texts.items()}
    x = rng.normal(size=(N, COMP, D)) * 0.1
    planted = 4
    x[:, planted, 0:2] += rng.normal(size=(N, 2)) * 3.0  # alone carries the variance along "color"
    m = ScoreMoments(COMP, D, labels=LABELS).update(x)
    for kind in KINDS:
        table = score_table(m, bases, kind)  # type: ignore[arg-type]
        assert table.top("color", 1)[0][0] == LABELS[planted], kind
        sel = table.selectivity()
        assert int(np.argmax(sel["color"])) == planted, kind
        assert table.top("color", 1, by="selectivity")[0][0] == LABELS[planted]
    corr = score_table(m, bases, "corr")
    assert corr["color"][planted] > 0.99
    assert np.max(np.delete(corr["color"], planted)) < 0.2


def test_selectivity_and_contrastive(moments: ScoreMoments, bases: dict[str, np.ndarray]) -> None:
    table = score_table(moments, bases, "corr")
    s = table.scores
    sel = table.selectivity()
    assert sel.kind == "selectivity[corr]" and sel.labels == table.labels
    for i in range(COMP):
        for p in range(s.shape[1]):
            assert sel.scores[i, p] == s[i, p] - max(s[i, q] for q in range(s.shape[1]) if q != p)
    np.testing.assert_array_equal(table.contrastive("color", "animal"), s[:, 0] - s[:, 2])
    # ties: both tied features get selectivity 0
    tied = ScoreTable(np.array([[0.5, 0.5, 0.1]]), ("a",), ("x", "y", "z"))
    np.testing.assert_array_equal(tied.selectivity().scores, [[0.0, 0.0, -0.4]])
    with pytest.raises(InputError):
        ScoreTable(np.ones((1, 1)), ("a",), ("x",)).selectivity()
    with pytest.raises(KeyError):
        table["shape"]


def test_flat_components_score_zero(data: np.ndarray, bases: dict[str, np.ndarray]) -> None:
    x = data.copy()
    x[:, 0] = 0.1 * np.arange(1, D + 1)  # a constant (bias) row: rounding makes its centred m2 ~1e-33
    x[:, 1] = 0.0  # an absent component
    m = ScoreMoments(COMP, D)
    for start in range(0, N, 7):  # many merges: many rounding opportunities
        m.update(x[start : start + 7])
    for kind in KINDS:
        got = feature_scores(m, bases["texture"], kind=kind)  # type: ignore[arg-type]
        if kind == "var_attributed":  # an additive covariance: rounding noise only, kept so shares add up
            assert abs(got[0]) < 1e-14 and got[1] == 0.0
        else:  # a ratio of rounding noise would be anything in [-1, 1]: defined as 0
            assert got[0] == 0.0 and got[1] == 0.0, kind
        _close(got[2:], _direct(x[:, 2:], bases["texture"], kind, z=x.sum(1)), 1e-10)


def test_projected_moments_give_the_same_scores(data: np.ndarray, moments: ScoreMoments,
                                                 bases: dict[str, np.ndarray]) -> None:
    rng = np.random.default_rng(11)
    stacked = np.concatenate(list(bases.values()))  # [9, d]: spans every feature
    directions = rng.normal(size=(stacked.shape[0], stacked.shape[0])) @ stacked  # not orthonormal
    streamed = ScoreMoments(COMP, D, labels=LABELS, directions=directions)
    for start in range(0, N, 128):
        streamed.update(data[start : start + 128])
    assert streamed.m2.shape == (COMP, 9, 9)
    reprojected = moments.project(directions)
    _state_close(reprojected, streamed, 1e-11)
    for kind in KINDS:
        full = score_table(moments, bases, kind).scores  # type: ignore[arg-type]
        _close(score_table(streamed, bases, kind).scores, full, 1e-10)  # type: ignore[arg-type]
        _close(score_table(reprojected, bases, kind).scores, full, 1e-10)  # type: ignore[arg-type]
    outside = feature_basis(rng.normal(size=(2, D)))
    with pytest.raises(InputError, match="span"):
        feature_scores(streamed, outside)


def test_feature_basis_is_qr_and_drops_dependent_rows() -> None:
    rng = np.random.default_rng(2)
    e = rng.normal(size=(4, D))
    b = feature_basis(torch.from_numpy(e))
    q, r = np.linalg.qr(e.T)
    q = q * np.sign(np.diag(r))  # R with a positive diagonal
    _close(b, q.T, 1e-12)
    _close(b @ b.T, np.eye(4), 1e-14)
    dep = np.concatenate([e[:2], e[:1] + 2 * e[1:2], e[2:]])  # row 2 depends on rows 0, 1
    b2 = feature_basis(dep)
    assert b2.shape == (4, D)
    _close(np.abs(b2 @ b.T), np.eye(4), 1e-10)
    with pytest.raises(InputError, match="orthonormal"):
        feature_scores(ScoreMoments(COMP, D).update(_data()), e)
    with pytest.raises(InputError, match="kind"):
        feature_scores(ScoreMoments(COMP, D).update(_data()), b, kind="pearson")  # type: ignore[arg-type]


# ------------------------------------------------------------------ table
def test_table_json_round_trip(moments: ScoreMoments, bases: dict[str, np.ndarray]) -> None:
    table = score_table(moments, bases, "var_attributed", share=True)
    back = ScoreTable.from_json(json.loads(json.dumps(table.to_json())))
    np.testing.assert_array_equal(back.scores, table.scores)  # exact, not approximate
    assert back.labels == table.labels and back.features == table.features and back.kind == table.kind
    assert back.meta["count"] == N and back.meta["share"] is True
    with pytest.raises(InputError):
        ScoreTable.from_json({"format": "something else"})


def test_format_lists_top_components(moments: ScoreMoments, bases: dict[str, np.ndarray]) -> None:
    table = score_table(moments, bases, "corr")
    text = table.format(top=3)
    lines = text.splitlines()
    assert len(lines) == 2 + 3
    for feat in bases:
        assert feat in lines[1]
        for name, value in table.top(feat, 3):
            assert f"{name} {value:+.3f}" in text
    best = table.top("color", 1)[0][0]
    assert lines[2].split()[1] == best
    assert "n=500" in lines[0]


def test_plot_writes_an_svg_heatmap(moments: ScoreMoments, bases: dict[str, np.ndarray], tmp_path: Path) -> None:
    table = score_table(moments, bases, "corr")
    path = table.plot(tmp_path / "scores.svg")
    root = ET.parse(path).getroot()  # well-formed XML
    ns = "{http://www.w3.org/2000/svg}"
    assert len(root.findall(f"{ns}rect")) == COMP * len(bases)
    texts = [t.text for t in root.iter(f"{ns}text")]
    assert set(LABELS) <= set(texts) and set(bases) <= set(texts)
    sub = table.plot(tmp_path / "sub.svg", components=["L01.mlp", "embed"])
    assert len(ET.parse(sub).getroot().findall(f"{ns}rect")) == 2 * len(bases)
    with pytest.raises(InputError):
        table.plot(tmp_path / "scores.png")


# ------------------------------------------------------------------ proxy and validation
def _direct_proxy(x: np.ndarray, texts: np.ndarray) -> np.ndarray:
    y = texts / np.linalg.norm(texts, axis=1, keepdims=True)
    z = x.sum(1)
    cz = (z / np.linalg.norm(z, axis=1, keepdims=True)) @ y.T  # [n, s]
    out = np.zeros(x.shape[1])
    for i in range(x.shape[1]):
        a = x[:, i]
        ca = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ y.T
        out[i] = np.mean([np.corrcoef(ca[:, s], cz[:, s])[0, 1] for s in range(y.shape[0])])
    return out


def test_clip_proxy_equals_direct_computation(data: np.ndarray) -> None:
    texts = _texts()
    batches = [_stack(data[a:b]) for a, b in [(0, 3), (3, 250), (250, 251), (251, N)]]
    for name, t in texts.items():
        _close(clip_proxy(batches, t), _direct_proxy(data, t), 1e-10)
    _close(clip_proxy(_stack(data), torch.from_numpy(texts["color"])), _direct_proxy(data, texts["color"]), 1e-10)
    table = clip_proxy_table(iter(batches), texts)
    assert table.kind == "clip_proxy" and table.labels == LABELS and table.meta["count"] == N
    for name, t in texts.items():
        _close(table[name], _direct_proxy(data, t), 1e-10)


def test_spearman_hand_computed_with_ties() -> None:
    # ranks a = [1, 2.5, 2.5, 4], b = [1, 3, 2, 4]: ρ = 4.5 / sqrt(4.5 · 5) = sqrt(0.9)
    assert spearman([1.0, 2.0, 2.0, 3.0], [10.0, 30.0, 20.0, 40.0]) == pytest.approx(math.sqrt(0.9), abs=1e-15)
    assert spearman([3, 1, 2], [30, 10, 20]) == pytest.approx(1.0)
    assert spearman([3, 1, 2], [-30, -10, -20]) == pytest.approx(-1.0)
    assert spearman(np.exp([0.1, 0.5, 0.2, 0.9]), [0.1, 0.5, 0.2, 0.9]) == pytest.approx(1.0)  # rank-invariant
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    from vitdecomp.interpret.score import rankdata

    np.testing.assert_array_equal(rankdata(np.array([10.0, 20, 20, 20, 5, 10])), [2.5, 5, 5, 5, 1, 2.5])


def test_validate_ordering(moments: ScoreMoments, bases: dict[str, np.ndarray]) -> None:
    table = score_table(moments, bases, "corr")
    same = validate_ordering(table, table)
    assert same["component_order_rho"] == pytest.approx(1.0) and same["feature_order_rho"] == pytest.approx(1.0)
    # rows and columns are matched by name, not position
    shuffled = ScoreTable(-table.scores[::-1, ::-1], table.labels[::-1], table.features[::-1])
    flipped = validate_ordering(table, shuffled)
    assert flipped["component_order_rho"] == pytest.approx(-1.0)
    assert flipped["feature_order_rho"] == pytest.approx(-1.0)
    assert flipped["n_components"] == COMP and flipped["undefined_components"] == 0
    # hand-made: one feature ordering agrees, one is reversed; a constant row is undefined
    t = ScoreTable(np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]]), ("a", "b", "c"), ("x", "y"))
    p = ScoreTable(np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]), ("a", "b", "c"), ("x", "y"))
    res = validate_ordering(t, p)
    assert res["per_feature"] == {"x": pytest.approx(1.0), "y": pytest.approx(-1.0)}
    assert res["component_order_rho"] == pytest.approx(0.0)
    assert res["undefined_components"] == 3  # p's rows are constant
    assert res["feature_order_rho"] is None
    with pytest.raises(InputError):
        validate_ordering(t, ScoreTable(np.zeros((3, 1)), ("a", "b", "c"), ("x",)))


# ------------------------------------------------------------------ sources
def test_from_stack_and_tokens(data: np.ndarray, moments: ScoreMoments) -> None:
    _state_close(ScoreMoments.from_stack(_stack(data)), moments, 1e-12)
    # a token stack is summed over tokens first
    split = np.stack([0.25 * data, 0.75 * data], axis=2)  # [n, comp, token, d]
    values = torch.from_numpy(np.ascontiguousarray(split.transpose(1, 0, 2, 3)))
    from vitdecomp.core.labels import parse_label

    tok = ComponentStack(values, tuple(parse_label(s) for s in LABELS), torch.from_numpy(data.sum(1)))
    _state_close(ScoreMoments.from_stack(tok), moments, 1e-12)
    with pytest.raises(InputError):
        moments.copy().add_stack(_stack(data, labels=LABELS[::-1]))


def test_from_store_equals_from_stack(tmp_path: Path, data: np.ndarray) -> None:
    pytest.importorskip("zarr")
    from vitdecomp.store.component_store import ComponentStore, StoreConfig

    n, batch = 40, 16
    x = data[:n].astype(np.float32).astype(np.float64)  # what a float32 store returns
    cfg = StoreConfig(model="tiny", weights="random-init", dtype="float32", n_items=n, batch_size=batch,
                      package_version="0.1.0")
    store = ComponentStore.create_or_open(tmp_path / "s.zarr", cfg, list(LABELS), (COMP, D), D)
    for index in range(store.n_chunks):
        r = store.chunk_rows(index)
        store.write_chunk(index, _stack(x[r.start : r.stop]), [f"img{i}" for i in r])
    got = ScoreMoments.from_store(store, batch_size=7)
    assert got.labels == LABELS
    _state_close(got, ScoreMoments(COMP, D, labels=LABELS).update(x), 1e-12)
    part = ScoreMoments.from_store(store, chunks=[0, 2]).merge(ScoreMoments.from_store(store, chunks=[1]))
    _state_close(part, got, 1e-12)
