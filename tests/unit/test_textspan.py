"""vitdecomp.interpret.textspan on synthetic data (no models): covariance form, direct form, heads, reconstruction."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vitdecomp import InputError
from vitdecomp.store.component_store import RunningMoments
from vitdecomp.interpret.textspan import (
    SpanResult,
    format_table,
    reconstruct,
    textspan_direct,
    textspan_from_moments,
    textspan_heads,
)

N, D, M = 400, 16, 60


def _unit_rows(rng: np.random.Generator, k: int, d: int) -> np.ndarray:
    t = rng.standard_normal((k, d))
    return t / np.linalg.norm(t, axis=1, keepdims=True)


def _pool(rng: np.random.Generator, k: int = M, d: int = D) -> tuple[list[str], np.ndarray]:
    return [f"text {i}" for i in range(k)], _unit_rows(rng, k, d)


def _data(rng: np.random.Generator, n: int = N, d: int = D) -> np.ndarray:
    """Anisotropic data with a non-zero mean (so G and Σ have different eigenvectors)."""
    scales = np.geomspace(3.0, 0.1, d)
    mix = np.linalg.qr(rng.standard_normal((d, d)))[0]
    return (rng.standard_normal((n, d)) * scales) @ mix.T + rng.standard_normal(d)


def _moments_of(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = data.mean(axis=0)
    xc = data - mu
    return mu, xc.T @ xc / data.shape[0]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("rank", [3, 8, 16, None])
def test_covariance_form_equals_direct_form(normalize: bool, rank: int | None) -> None:
    rng = np.random.default_rng(0)
    data = _data(rng)
    texts, t = _pool(rng)
    mu, cov = _moments_of(data)
    m = min(10, rank or D)
    fast = textspan_from_moments(mu, cov, texts, t, m=m, rank=rank, normalize_candidates=normalize)
    ref = textspan_direct(data, texts, t, m=m, rank=rank, normalize_candidates=normalize)
    assert len(ref.indices) == m
    assert fast.indices == ref.indices
    assert fast.texts == [texts[i] for i in ref.indices]
    np.testing.assert_allclose(fast.variance_explained, ref.variance_explained, rtol=0, atol=1e-6)
    assert fast.total_variance == pytest.approx(ref.total_variance, rel=1e-9)
    np.testing.assert_allclose(fast.mean, ref.mean, atol=1e-12)
    # the bases agree up to the sign of each row
    dots = np.abs(np.einsum("kd,kd->k", fast.reconstruction_basis, ref.reconstruction_basis))
    np.testing.assert_allclose(dots, 1.0, atol=1e-6)


def test_planted_text_basis_is_recovered_in_order() -> None:
    rng = np.random.default_rng(1)
    texts, t = _pool(rng, 200, 32)
    planted = [17, 123, 58]
    stds = np.array([5.0, 3.0, 1.5])  # distinct variances, in the order expected
    coef = rng.standard_normal((2000, 3)) * stds
    data = coef @ t[planted] + 1e-3 * rng.standard_normal((2000, 32)) + 0.5 * t[4]
    mu, cov = _moments_of(data)
    res = textspan_from_moments(mu, cov, texts, t, m=5, rank=10)
    assert res.indices[:3] == planted
    assert res.texts[:3] == [texts[i] for i in planted]
    assert res.cumulative_variance_explained[2] >= 0.99


@pytest.mark.parametrize("normalize", [True, False])
def test_variance_fractions_nonnegative_and_bounded(normalize: bool) -> None:
    rng = np.random.default_rng(2)
    data = _data(rng)
    texts, t = _pool(rng)
    mu, cov = _moments_of(data)
    for rank in (4, None):
        res = textspan_from_moments(mu, cov, texts, t, m=D, rank=rank, normalize_candidates=normalize)
        frac = np.asarray(res.variance_explained)
        assert frac.size == min(D, rank or D)
        assert np.all(frac >= 0)
        assert frac.sum() <= 1 + 1e-12
        # each basis row is unit and orthogonal to the others
        b = res.reconstruction_basis
        np.testing.assert_allclose(b @ b.T, np.eye(len(b)), atol=1e-10)
    # with the full space and every direction taken, all the variance is explained
    assert frac.sum() == pytest.approx(1.0, abs=1e-10)


def test_dedupe_across_heads() -> None:
    rng = np.random.default_rng(3)
    data = _data(rng)
    texts, t = _pool(rng)
    mom = RunningMoments(2, D, covariance=True).update(np.stack([data, data], axis=1))
    plain = textspan_heads(mom, ["L0.H0", "L0.H1"], texts, t, m=5, rank=8)
    assert plain[0].indices == plain[1].indices
    deduped = textspan_heads(mom, ["L0.H0", "L0.H1"], texts, t, m=5, rank=8, dedupe=True)
    assert deduped[0].indices == plain[0].indices
    assert not set(deduped[0].indices) & set(deduped[1].indices)
    assert len(deduped[1].indices) == 5
    # explicit exclusion works the same way for a single head
    alone = textspan_from_moments(mom.mean[1], mom.m2[1] / mom.count, texts, t, m=5, rank=8,
                                  exclude=set(plain[0].indices))
    assert alone.indices == deduped[1].indices


def test_reconstruct_full_basis_is_identity() -> None:
    rng = np.random.default_rng(4)
    data = _data(rng)
    texts, t = _pool(rng)
    mu, cov = _moments_of(data)
    res = textspan_from_moments(mu, cov, texts, t, m=D, rank=D)
    assert len(res.indices) == D
    np.testing.assert_allclose(reconstruct(data, res), data, atol=1e-8)
    as_torch = reconstruct(torch.from_numpy(data), res)
    assert isinstance(as_torch, torch.Tensor) and as_torch.dtype == torch.float64
    torch.testing.assert_close(as_torch, torch.from_numpy(data), atol=1e-8, rtol=0)
    # partial basis: the mean plus a projection (idempotent, keeps the mean)
    part = textspan_from_moments(mu, cov, texts, t, m=3, rank=8)
    once = reconstruct(data, part)
    np.testing.assert_allclose(reconstruct(once, part), once, atol=1e-10)
    np.testing.assert_allclose(once.mean(axis=0), mu, atol=1e-10)
    assert reconstruct(data.astype(np.float32), part).dtype == np.float32


def test_heads_from_streamed_moments_equal_full_data() -> None:
    rng = np.random.default_rng(5)
    heads = np.stack([_data(rng) for _ in range(3)], axis=1)  # [n, comp, d]
    texts, t = _pool(rng)
    labels = ["L1.H0", "L1.H1", "L1.H2"]
    parts = [RunningMoments(3, D, covariance=True) for _ in range(2)]
    for i, start in enumerate(range(0, N, 37)):  # uneven batches, merged from two "ranks"
        parts[i % 2].update(torch.from_numpy(heads[start : start + 37]))
    streamed = parts[0].merge(parts[1])
    got = textspan_heads(streamed, labels, texts, torch.from_numpy(t), components=["L1.H2", 0], m=6, rank=8)
    assert [r.label for r in got] == ["L1.H2", "L1.H0"]
    for res, c in zip(got, [2, 0]):
        mu, cov = _moments_of(heads[:, c])
        want = textspan_from_moments(mu, cov, texts, t, m=6, rank=8, label=labels[c])
        assert res.indices == want.indices
        np.testing.assert_allclose(res.variance_explained, want.variance_explained, atol=1e-9)
        assert res.total_variance == pytest.approx(want.total_variance, rel=1e-9)
        np.testing.assert_allclose(res.mean, want.mean, atol=1e-12)


def test_moments_without_covariance_raise() -> None:
    rng = np.random.default_rng(6)
    texts, t = _pool(rng)
    mom = RunningMoments(2, D).update(rng.standard_normal((10, 2, D)))
    with pytest.raises(InputError, match="covariance=True"):
        textspan_heads(mom, ["a", "b"], texts, t)


def test_input_checks_and_guards() -> None:
    rng = np.random.default_rng(7)
    data = _data(rng)
    texts, t = _pool(rng)
    mu, cov = _moments_of(data)
    with pytest.raises(InputError):
        textspan_from_moments(mu, cov, texts[:-1], t)
    with pytest.raises(InputError):
        textspan_from_moments(mu, cov[:-1], texts, t)
    with pytest.raises(InputError):
        textspan_from_moments(mu, cov, texts, t, rank=0)
    mom = RunningMoments(2, D, covariance=True).update(np.stack([data, data], axis=1))
    with pytest.raises(InputError):
        textspan_heads(mom, ["only one"], texts, t)
    with pytest.raises(InputError):
        textspan_heads(mom, ["a", "b"], texts, t, components=["c"])
    # rank > d is clipped; asking for more texts than directions stops at the span's size
    res = textspan_from_moments(mu, cov, texts, t, m=D + 5, rank=10 * D)
    assert res.rank == D and len(res.indices) == D
    res = textspan_from_moments(mu, cov, texts, t, m=10, rank=3)
    assert len(res.indices) == 3 and len(set(res.indices)) == 3
    # duplicate texts in the pool: the copy of a chosen text is never chosen
    dup = np.concatenate([t, t[:5]])
    res = textspan_from_moments(mu, cov, texts + texts[:5], dup, m=D, rank=None)
    assert len(res.indices) == D
    chosen = dup[res.indices]
    assert np.linalg.matrix_rank(chosen) == len(res.indices)


def test_to_json_and_table() -> None:
    rng = np.random.default_rng(8)
    data = _data(rng)
    texts, t = _pool(rng)
    texts[0] = "a very long description " * 5
    mu, cov = _moments_of(data)
    res = textspan_from_moments(mu, cov, texts, t, m=4, rank=8, label="L11.H03")
    js = res.to_json()
    assert js["label"] == "L11.H03" and js["indices"] == res.indices and "mean" not in js
    full = res.to_json(arrays=True)
    assert np.asarray(full["reconstruction_basis"]).shape == (4, D)
    empty = SpanResult("L0.H0", [], [], [], 0.0, np.zeros((0, D)), np.zeros(D))
    table = format_table([res, empty], top=3)
    lines = table.splitlines()
    assert len(lines) == 2 + 3 + 1
    assert lines[2].startswith("L11.H03") and "(no text chosen)" in lines[-1]
    assert len({len(line) for line in lines}) == 1  # fixed width
    frac = float(lines[2].split()[-2])  # fractions, as every report
    assert frac == pytest.approx(res.variance_explained[0], abs=0.001)
    with_control = format_table([res], top=3, control={"L11.H03": [0.01, 0.02, 0.03]}).splitlines()
    assert with_control[0].split()[-1] == "random" and float(with_control[3].split()[-1]) == 0.02
