"""Exact inner-product search (brute force), the reference every index is checked against.

:func:`exact_search` returns, per query ``q``, the rows ``v`` of largest ``⟨v, q⟩`` in the order of
a stable descending sort (ties to the smaller row), over blocks of rows so memory stays
``q × block``; :func:`unit_rows` normalises rows (zero rows stay zero), and :func:`precision_at_k`
is the share of retrieved items that carry their query's label.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ...errors import InputError

__all__ = ["unit_rows", "exact_search", "precision_at_k"]

_CHUNK_ROWS = 1 << 16  # rows per block of the numpy brute force


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (along the last axis; zero rows stay zero), same dtype."""
    x = np.asarray(x)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def _block_topk(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``s [q, c]`` the ``k`` largest (descending, ties by column): columns, values."""
    q, c = s.shape
    k = min(k, c)
    if k == c:
        cols = np.argsort(-s, axis=1, kind="stable")
        return cols, np.take_along_axis(s, cols, axis=1)
    kth = -np.partition(-s, k - 1, axis=1)[:, k - 1]  # k-th largest value per row
    cols = np.empty((q, k), dtype=np.int64)
    for r in range(q):
        cand = np.flatnonzero(s[r] >= kth[r])  # ascending columns, every tie at the boundary included
        cols[r] = cand[np.argsort(-s[r, cand], kind="stable")[:k]]
    return cols, np.take_along_axis(s, cols, axis=1)


def exact_search(
    vectors: np.ndarray,
    queries: np.ndarray,
    k: int,
    *,
    exclude: Sequence[int] | np.ndarray | None = None,
    block: int = _CHUNK_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-``k``: for each query the rows of ``vectors`` with the largest ``⟨v, q⟩``.

    Scores are computed in ``promote(vectors.dtype, float32)`` (float16 rows are decoded to
    float32; float64 stays float64) over blocks of ``block`` rows. The order is exactly that of a
    stable descending sort of the full score row: ties go to the smaller row.

    Args:
        vectors: ``[n, d]``.
        queries: ``[q, d]`` (or ``[d]``).
        k: neighbours per query (at most ``n``, or ``n − 1`` with ``exclude``).
        exclude: per query one row never returned (e.g. the query item itself), or None.
        block: rows per block (memory ``q × block`` scores).

    Returns:
        ``(rows [q, k'] int64, scores [q, k'])`` with ``k' = min(k, available rows)``.
    """
    v = np.asarray(vectors)
    qs = np.asarray(queries)
    qs = qs[None] if qs.ndim == 1 else qs
    if v.ndim != 2 or qs.ndim != 2 or qs.shape[1] != v.shape[1]:
        raise InputError(f"need vectors [n, d] and queries [q, d], got {v.shape} and {qs.shape}")
    dtype = np.promote_types(v.dtype, np.float32)
    qs = qs.astype(dtype, copy=False)
    n = v.shape[0]
    excl = None if exclude is None else np.asarray(exclude, dtype=np.int64).reshape(-1)
    if excl is not None and excl.shape[0] != qs.shape[0]:
        raise InputError(f"exclude needs one row per query ({qs.shape[0]}), got {excl.shape[0]}")
    k = max(0, min(int(k), n - (0 if excl is None else 1)))
    best_rows = np.zeros((qs.shape[0], 0), dtype=np.int64)
    best = np.zeros((qs.shape[0], 0), dtype=dtype)
    if k == 0:
        return best_rows, best
    for start in range(0, n, block):
        part = v[start:start + block].astype(dtype, copy=False)
        s = qs @ part.T  # [q, c]
        if excl is not None:
            hit = (excl >= start) & (excl < start + part.shape[0])
            s[np.flatnonzero(hit), excl[hit] - start] = -np.inf
        cols, vals = _block_topk(s, k)
        rows = np.concatenate([best_rows, cols + start], axis=1)  # earlier blocks first: smaller rows win ties
        vals = np.concatenate([best, vals], axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")[:, :k]
        best_rows, best = np.take_along_axis(rows, order, axis=1), np.take_along_axis(vals, order, axis=1)
    return best_rows, best


def precision_at_k(rows: np.ndarray, labels: np.ndarray, query_labels: np.ndarray) -> float:
    """Mean share of retrieved items whose label equals their query's: ``mean(labels[rows] == query_labels[:, None])``.

    Args:
        rows: ``[q, k]`` retrieved rows (indices into ``labels``).
        labels: ``[n]`` ground truth of every item.
        query_labels: ``[q]`` the label each query asks for.
    """
    rows = np.asarray(rows)
    labels = np.asarray(labels)
    query_labels = np.asarray(query_labels)
    if rows.ndim != 2 or rows.shape[0] != query_labels.shape[0]:
        raise InputError(f"rows must be [q, k] with q = {query_labels.shape[0]}, got {rows.shape}")
    return float(np.mean(labels[rows] == query_labels[:, None]))

