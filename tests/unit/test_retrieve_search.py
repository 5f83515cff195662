"""vd.retrieve pieces without a model: exact search order and ties, component groups, the faiss-missing error."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from vitdecomp.apps import retrieve
from vitdecomp.errors import InputError
from vitdecomp.interpret.score import ScoreTable


def _reference(vectors, queries, k, exclude=None):
    """Full score matrix, query excluded, stable descending sort: the definition exact_search must match."""
    s = queries.astype(np.promote_types(vectors.dtype, np.float32)) @ vectors.astype(
        np.promote_types(vectors.dtype, np.float32)).T
    if exclude is not None:
        s[np.arange(len(queries)), exclude] = -np.inf
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(s, order, axis=1)


@pytest.mark.parametrize("block", [3, 7, 64, 1 << 16])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_exact_search_is_a_stable_full_sort_in_blocks(block, dtype):
    rng = np.random.default_rng(1)
    # rounded values: many exact ties, also across block boundaries
    vectors = np.round(rng.normal(size=(50, 4)), 0).astype(dtype)
    queries = np.round(rng.normal(size=(6, 4)), 0).astype(dtype)
    for k in (1, 5, 17, 50, 80):
        rows, scores = retrieve.exact_search(vectors, queries, k, block=block)
        want_rows, want_scores = _reference(vectors, queries, min(k, 50))
        assert np.array_equal(rows, want_rows) and np.array_equal(scores, want_scores)
        excl = rng.integers(0, 50, size=6)
        rows, scores = retrieve.exact_search(vectors, queries, k, exclude=excl, block=block)
        want_rows, want_scores = _reference(vectors, queries, min(k, 49), excl)
        assert np.array_equal(rows, want_rows) and np.array_equal(scores, want_scores)
        assert not (rows == excl[:, None]).any()


def test_exact_search_excludes_the_query_even_if_it_would_win_every_tie():
    vectors = np.ones((5, 3))
    rows, scores = retrieve.exact_search(vectors, vectors, 10, exclude=np.arange(5))
    assert rows.shape == (5, 4)
    for r in range(5):
        assert r not in rows[r] and rows[r].tolist() == [i for i in range(5) if i != r]
    with pytest.raises(InputError):
        retrieve.exact_search(vectors, np.ones((2, 4)), 3)
    with pytest.raises(InputError):
        retrieve.exact_search(vectors, vectors, 3, exclude=[0])


def test_precision_at_k_and_unit_rows():
    labels = np.array([0, 0, 1, 1, 2])
    assert retrieve.precision_at_k(np.array([[0, 1], [2, 4]]), labels, np.array([0, 1])) == 0.75
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    assert np.allclose(retrieve.unit_rows(x), [[0.6, 0.8], [0.0, 0.0]])


def _table():
    labels = ("embed", "L00.H00", "L00.H01", "L01.H00", "L01.H01", "L01.mlp", "bias")
    scores = np.array([
        [0.1, 0.0],
        [0.9, 0.8],   # high on colour but not selective (high on shape too)
        [0.7, 0.1],   # selective for colour
        [0.6, 0.0],
        [0.2, 0.9],
        [0.6, 0.2],   # ties L01.H00 on colour: row order decides
        [5.0, -5.0],  # the constant bias: never picked, however high
    ])
    return ScoreTable(scores, labels, ("colour", "shape"))


def test_top_components_and_feature_groups():
    table = _table()
    assert retrieve.top_components(table, "colour", 3) == [1, 2, 3]
    assert retrieve.top_components(table, "colour", 3, start=3) == [5, 4]  # embed is not a computing component
    assert retrieve.top_components(table, "colour", 3, start=3, kinds="input+embed") == [5, 4, 0]
    assert retrieve.top_components(table, "colour", 2, by="selectivity") == [2, 3]
    assert 6 not in retrieve.top_components(table, "colour", 7)
    assert 6 not in retrieve.top_components(table, "colour", 7, kinds="all")  # the readout constant, even then
    groups = retrieve.feature_groups(table, "colour", size=2, n_groups=5)
    assert [g.name for g in groups] == ["colour#0", "colour#1", "colour#2"]
    assert [g.components for g in groups] == [("L00.H00", "L00.H01"), ("L01.H00", "L01.mlp"), ("L01.H01",)]
    assert groups[0].meta["scores"] == {"L00.H00": 0.9, "L00.H01": 0.7} and groups[1].meta["rank"] == [3, 4]
    sel = retrieve.feature_groups(table, "colour", size=2, by="selectivity")[0]
    assert sel.components == ("L00.H01", "L01.H00") and sel.meta["by"] == "selectivity"
    with pytest.raises(InputError, match="no feature"):
        retrieve.top_components(table, "texture", 2)


def test_group_identity_is_the_member_set():
    a = retrieve.ComponentGroup("a", ("L01.H00", "L00.H01"))
    b = retrieve.ComponentGroup.of(["L00.H01", "L01.H00"])
    assert a.key == b.key and b.name == "L00.H01+L01.H00"
    assert a.key != retrieve.ComponentGroup.of(["L00.H01"]).key != retrieve.full_group().key
    assert retrieve.full_group().is_full and retrieve.full_group().name == retrieve.FULL
    with pytest.raises(InputError):
        retrieve.ComponentGroup.of(["L00.H01", "L00.H01"])
    with pytest.raises(InputError):
        retrieve.ComponentGroup("empty", ())


def test_missing_faiss_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(InputError, match=r"pip install 'vitdecomp\[retrieval\]'"):
        retrieve.build_index(object(), [retrieve.full_group()], tmp_path)  # type: ignore[arg-type]
