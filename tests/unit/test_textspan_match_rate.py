"""TextSpan match rate of CompAlign maps (docs/method.md §3 metric (b)) on planted data."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vitdecomp.errors import InputError
from vitdecomp.store.component_store import RunningMoments
from vitdecomp.interpret.textspan import textspan_from_moments, textspan_match_rate

N, COMP, D_MODEL, D_CLIP, C, M = 400, 5, 12, 20, 30, 5


def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q  # [rows, cols], orthonormal columns


@pytest.fixture(scope="module")
def planted():
    """Components with distinct anisotropic spectra, the model's class rows, and a planted rotation Q."""
    rng = np.random.default_rng(0)
    values = np.empty((N, COMP, D_MODEL))
    for i in range(COMP):
        scales = np.geomspace(3.0, 0.1, D_MODEL) * rng.uniform(0.5, 2.0)
        basis = _orthonormal(rng, D_MODEL, D_MODEL)
        values[:, i] = (rng.standard_normal((N, D_MODEL)) * scales) @ basis.T + rng.standard_normal(D_MODEL)
    moments = RunningMoments(COMP, D_MODEL, covariance=True).update(values)
    class_rows = rng.standard_normal((C, D_MODEL)) * rng.uniform(0.5, 3.0, size=(C, 1))  # not unit: rows rescaled
    q = _orthonormal(rng, D_CLIP, D_MODEL)  # [d_clip, d_model], QᵀQ = I
    emb = class_rows @ q.T
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)  # CLIP class embeddings = f(model class rows)
    labels = [f"L00.H{i:02d}" for i in range(COMP)]
    return {"values": values, "moments": moments, "rows": class_rows, "q": q, "emb": emb, "labels": labels,
            "rng": rng}


def test_exact_scaled_orthogonal_maps_match_perfectly(planted):
    p = planted
    scales = np.array([0.3, 1.0, 2.5, 7.0, 0.05])
    maps = scales[:, None, None] * p["q"][None]  # per-component F_i = s_i Q (one Q: the class embeddings agree)
    out = textspan_match_rate(p["moments"], maps, p["rows"], p["emb"], labels=p["labels"], m=M, rank=None)
    assert out["match_rate"] == 1.0 and out["match_rate_ordered"] == 1.0
    assert out["n_components"] == COMP and out["n_images"] == N
    assert all(len(c["truth"]) == M and c["truth"] == c["predicted"] for c in out["per_component"])
    # one shared map and a rank-limited projection (rank <= d_model): still exact
    shared = textspan_match_rate(p["moments"], 2.0 * p["q"], p["rows"], p["emb"], labels=p["labels"], m=M, rank=8)
    assert shared["match_rate"] == 1.0


def test_truth_is_textspan_over_the_unit_class_rows_on_the_raw_moments(planted):
    p = planted
    out = textspan_match_rate(p["moments"], p["q"], p["rows"], p["emb"], labels=p["labels"], components=["L00.H02"],
                              m=M, rank=None, class_names=[f"class{k}" for k in range(C)])
    unit = p["rows"] / np.linalg.norm(p["rows"], axis=1, keepdims=True)
    mom = p["moments"]
    direct = textspan_from_moments(mom.mean[2], mom.m2[2] / mom.count, [f"class{k}" for k in range(C)], unit,
                                   m=M, rank=None)
    assert out["per_component"][0]["truth"] == direct.texts and out["per_component"][0]["label"] == "L00.H02"


def test_wrong_or_random_maps_score_low(planted):
    p = planted
    rng = np.random.default_rng(1)
    random_maps = rng.standard_normal((COMP, D_CLIP, D_MODEL))
    rand = textspan_match_rate(p["moments"], random_maps, p["rows"], p["emb"], labels=p["labels"], m=M, rank=None)
    assert rand["match_rate"] < 0.5 and rand["chance"] == M / C
    for c in rand["per_component"]:
        assert 0.0 <= c["ordered"] <= c["set"] <= 1.0
    # the right map, but class k's CLIP embedding swapped with another class's: the picks no longer agree
    perm = rng.permutation(C)
    shuffled = textspan_match_rate(p["moments"], p["q"], p["rows"], p["emb"][perm], labels=p["labels"], m=M,
                                   rank=None)
    assert shuffled["match_rate"] < 0.5


def test_moments_of_mapped_components_are_the_mapped_moments(planted):
    """The function maps the moments (F μ, F Σ Fᵀ); they equal the streamed moments of F c."""
    from vitdecomp.interpret.align import AlignConfig, CompAlign

    p = planted
    rng = np.random.default_rng(2)
    maps = rng.standard_normal((COMP, D_CLIP, D_MODEL))
    mapped = np.einsum("nim,ikm->nik", p["values"], maps)
    streamed = RunningMoments(COMP, D_CLIP, covariance=True)
    for start in range(0, N, 64):
        streamed.update(mapped[start:start + 64])
    mom = p["moments"]
    for i in range(COMP):
        np.testing.assert_allclose(maps[i] @ mom.mean[i], streamed.mean[i], rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(maps[i] @ (mom.m2[i] / N) @ maps[i].T, streamed.m2[i] / N, rtol=1e-9, atol=1e-9)
    # a CompAlign gives what its per-component maps give
    align = CompAlign(group_maps=torch.as_tensor(maps, dtype=torch.float64), map_index=tuple(range(COMP)),
                      config=AlignConfig(), labels=tuple(p["labels"]))
    a = textspan_match_rate(p["moments"], align, p["rows"], p["emb"], labels=p["labels"], m=M, rank=None)
    b = textspan_match_rate(p["moments"], maps, p["rows"], p["emb"], labels=p["labels"], m=M, rank=None)
    assert a["per_component"] == b["per_component"]


def test_bad_input(planted):
    p = planted
    with pytest.raises(InputError):  # CLIP embeddings for another number of classes
        textspan_match_rate(p["moments"], p["q"], p["rows"], p["emb"][:-1], labels=p["labels"])
    with pytest.raises(InputError):  # maps of the wrong width
        textspan_match_rate(p["moments"], p["q"][:, :-1], p["rows"], p["emb"], labels=p["labels"])
    with pytest.raises(InputError):  # no covariance
        textspan_match_rate(RunningMoments(COMP, D_MODEL).update(p["values"]), p["q"], p["rows"], p["emb"],
                            labels=p["labels"])
