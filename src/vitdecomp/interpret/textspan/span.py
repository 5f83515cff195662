"""TextSpan: label a component (attention head) with the texts that span its output (docs/method.md §5).

Given one component's contributions ``C [n, d]`` over a dataset (CLIP space, so text
embeddings live in the same space) and a pool of unit text embeddings ``T [M, d]``, TextSpan
greedily picks ``m`` texts whose directions explain most of the component's variance (the steps and the
covariance form are in :mod:`vitdecomp.interpret.textspan`). :func:`textspan_from_moments` runs it on a
mean ``μ [d]`` and covariance ``Σ [d, d]``, :func:`textspan_heads` on many components of streamed
moments, :func:`textspan_direct` on the data matrix (the reference implementation);
:func:`format_table` prints the picks.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import InputError

if TYPE_CHECKING:
    import torch

    from ...store.component_store import RunningMoments

__all__ = ["SpanResult", "check_m", "float64_array", "format_table", "textspan_direct", "textspan_from_moments",
           "textspan_heads"]

log = logging.getLogger(__name__)


@dataclass
class SpanResult:
    """TextSpan output for one component.

    Attributes:
        label: the component's label (e.g. ``"L11.H03"``).
        texts: the chosen texts, in order of selection.
        indices: their indices in the text pool.
        variance_explained: per step, the fraction of the component's total centred variance
            ``tr Σ`` removed by that step (``uᵀ Σ_step u / tr Σ``); non-negative, sums to <= 1.
        total_variance: ``tr Σ``, the total centred variance of the component.
        reconstruction_basis: ``[m, d]`` float64, the orthonormalised chosen directions
            (the deflated candidates at selection time, normalised), in order.
        mean: ``[d]`` float64, the component's mean ``μ``.
        rank: the rank ``r`` actually used for the candidate projection (``d`` when none).
    """

    label: str
    texts: list[str]
    indices: list[int]
    variance_explained: list[float]
    total_variance: float
    reconstruction_basis: np.ndarray
    mean: np.ndarray
    rank: int = 0

    @property
    def cumulative_variance_explained(self) -> list[float]:
        """Running sum of :attr:`variance_explained`."""
        return np.cumsum(np.asarray(self.variance_explained, dtype=np.float64)).tolist()

    def to_json(self, *, arrays: bool = False) -> dict[str, Any]:
        """JSON-able dict; ``arrays=True`` adds ``mean`` and ``reconstruction_basis`` as lists."""
        out: dict[str, Any] = {
            "label": self.label,
            "texts": list(self.texts),
            "indices": [int(i) for i in self.indices],
            "variance_explained": [float(v) for v in self.variance_explained],
            "total_variance": float(self.total_variance),
            "rank": int(self.rank),
        }
        if arrays:
            out["mean"] = np.asarray(self.mean, dtype=np.float64).tolist()
            out["reconstruction_basis"] = np.asarray(self.reconstruction_basis, dtype=np.float64).tolist()
        return out


# --------------------------------------------------------------------------- helpers
def float64_array(x: Any, name: str, ndim: int) -> np.ndarray:
    """``x`` (numpy array or torch tensor) as a float64 numpy array of ``ndim`` dimensions."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != ndim:
        raise InputError(f"{name} must have {ndim} dimensions, got shape {tuple(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name} contains NaN or inf")
    return arr


def _check_pool(texts: Sequence[str], text_embeddings: np.ndarray, d: int) -> None:
    if text_embeddings.shape[1] != d:
        raise InputError(f"text embeddings have dim {text_embeddings.shape[1]}, the component has {d}")
    if len(texts) != text_embeddings.shape[0]:
        raise InputError(f"{len(texts)} texts but {text_embeddings.shape[0]} text embeddings")


def check_m(m: int) -> None:
    """Raise :class:`~vitdecomp.errors.InputError` unless ``m`` (texts per component) is ``>= 0``."""
    if m < 0:
        raise InputError(f"m must be >= 0, got {m}")


def _effective_rank(rank: int | None, limit: int) -> int:
    """``rank`` clipped to ``limit`` (``None``: ``limit``, i.e. no projection)."""
    if rank is None:
        return limit
    if rank < 1:
        raise InputError(f"rank must be >= 1 (or None for no projection), got {rank}")
    if rank > limit:
        log.debug("rank %d > %d available directions; using %d", rank, limit, limit)
        return limit
    return int(rank)


def _exclusion_mask(exclude: set[int] | None, n_texts: int) -> np.ndarray:
    mask = np.zeros(n_texts, dtype=bool)
    if exclude:
        idx = np.fromiter((int(i) for i in exclude), dtype=np.int64)
        idx = idx[(idx >= 0) & (idx < n_texts)]
        mask[idx] = True
    return mask


def _scores(quad: np.ndarray, norm2: np.ndarray, floor2: np.ndarray, blocked: np.ndarray,
            normalize: bool) -> np.ndarray:
    """Greedy scores ``tᵀΣt`` (``/ ‖t‖²`` when normalising); ``-inf`` where not selectable.

    Args:
        quad: ``[M]`` ``t_kᵀ Σ t_k`` of the current (projected, deflated) candidates.
        norm2: ``[M]`` their squared norms.
        floor2: ``[M]`` squared-norm floor (``(min_norm ‖t_k^orig‖)²``) below which a
            candidate counts as used up / projected away.
        blocked: ``[M]`` bool, excluded or already picked.
    """
    ok = (norm2 > floor2) & ~blocked
    out = np.full(quad.shape, -np.inf)
    out[ok] = quad[ok] / norm2[ok] if normalize else quad[ok]
    return out


def _pick(score: np.ndarray, norm2: np.ndarray, tie_rtol: float = 1e-9) -> int | None:
    """Index of the best score, or None when nothing is selectable.

    Scores within ``tie_rtol`` (relative) of the best count as tied, and the tied candidate
    with the largest remaining norm wins (then the lowest index). Ties are real, not only
    rounding: with ``normalize_candidates``, once one dimension of the span is left every
    candidate points the same way, and the text that lies most in it is the sensible pick;
    the rule also makes the covariance and direct forms choose alike.
    """
    best = float(np.max(score))
    if not np.isfinite(best):
        return None
    tied = np.flatnonzero(score >= best - tie_rtol * max(abs(best), np.finfo(np.float64).tiny))
    return int(tied[np.argmax(norm2[tied])])


def _result(label: str, texts: Sequence[str], picks: list[int], removed: list[float], total: float,
            basis: list[np.ndarray], mean: np.ndarray, rank: int, m: int) -> SpanResult:
    d = mean.shape[0]
    if len(picks) < m:
        log.info("TextSpan %s: only %d of %d texts could be chosen (pool exhausted)", label or "?", len(picks), m)
    fractions = [max(v, 0.0) / total if total > 0 else 0.0 for v in removed]
    return SpanResult(
        label=label,
        texts=[texts[k] for k in picks],
        indices=picks,
        variance_explained=fractions,
        total_variance=float(total),
        reconstruction_basis=np.stack(basis) if basis else np.zeros((0, d)),
        mean=mean,
        rank=rank,
    )


# --------------------------------------------------------------------------- covariance form
def textspan_from_moments(
    mean: np.ndarray | torch.Tensor,
    cov: np.ndarray | torch.Tensor,
    texts: Sequence[str],
    text_embeddings: np.ndarray | torch.Tensor,
    *,
    m: int = 10,
    rank: int | None = 80,
    normalize_candidates: bool = True,
    exclude: set[int] | None = None,
    label: str = "",
    min_norm: float = 1e-6,
) -> SpanResult:
    """TextSpan of one component from its first two moments (covariance form, docs/method.md §5).

    ``G = Σ + μμᵀ``; ``V_r`` = its top-``r`` eigenvectors; ``T <- T V_r V_rᵀ``; then ``m``
    greedy steps: ``score_k = t_kᵀ Σ t_k`` (``/ ‖t_k‖²`` if ``normalize_candidates``),
    ``u = t_k* / ‖t_k*‖``, removed variance ``uᵀΣu``,
    ``Σ <- (I-uuᵀ) Σ (I-uuᵀ)``, ``T <- T (I-uuᵀ)``. Runs in the ``r`` coordinates of
    ``V_r`` (identical result, cheaper: see the module docs).

    Args:
        mean: ``[d]`` component mean ``μ``.
        cov: ``[d, d]`` centred covariance ``Σ = C̄ᵀC̄ / n`` (divided by ``n``, not ``n-1``;
            the fractions do not depend on the scale, but the eigenvectors of ``G`` do).
        texts: ``M`` texts of the pool.
        text_embeddings: ``[M, d]`` unit text embeddings (used as given, not renormalised).
        m: texts to choose.
        rank: ``r``, the number of top eigenvectors of ``G`` the candidates are projected on;
            clipped to ``d``; ``None`` for no projection.
        normalize_candidates: divide scores by ``‖t_k‖²`` (our default; the reference code
            scores un-normalised candidates).
        exclude: pool indices that may not be chosen (e.g. chosen for another head).
        label: the component's label, copied into the result.
        min_norm: a candidate whose norm fell below ``min_norm`` times its original norm
            is never chosen.

    Returns:
        :class:`SpanResult` with up to ``m`` texts.

    Raises:
        InputError: shapes disagree, or values are not finite.
    """
    mu = float64_array(mean, "mean", 1)
    sigma = float64_array(cov, "cov", 2)
    t_orig = float64_array(text_embeddings, "text_embeddings", 2)
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise InputError(f"cov must be [{d}, {d}] to match mean, got {tuple(sigma.shape)}")
    _check_pool(texts, t_orig, d)
    check_m(m)
    sigma = 0.5 * (sigma + sigma.T)
    total = float(np.trace(sigma))
    r = _effective_rank(rank, d)

    # V_r: top-r eigenvectors of the uncentred second moment G (eigh: ascending order).
    _, vecs = np.linalg.eigh(sigma + np.outer(mu, mu))
    v_r = vecs[:, ::-1][:, :r]  # [d, r]
    t_r = t_orig @ v_r  # [M, r]: coordinates of T V_r V_rᵀ in the basis V_r
    s_r = v_r.T @ sigma @ v_r  # [r, r]: V_rᵀ Σ V_r

    floor2 = (min_norm**2) * np.einsum("kd,kd->k", t_orig, t_orig)
    blocked = _exclusion_mask(exclude, len(texts))
    picks: list[int] = []
    removed: list[float] = []
    basis: list[np.ndarray] = []
    for _ in range(m):
        quad = np.einsum("kr,kr->k", t_r @ s_r, t_r)  # t_kᵀ Σ t_k
        norm2 = np.einsum("kr,kr->k", t_r, t_r)
        score = _scores(quad, norm2, floor2, blocked, normalize_candidates)
        k = _pick(score, norm2)
        if k is None:
            break
        u = t_r[k] / np.sqrt(norm2[k])  # [r]
        su = s_r @ u
        c = float(u @ su)  # uᵀΣu, the variance this step removes
        # Σ <- (I-uuᵀ) Σ (I-uuᵀ) = Σ - u(Σu)ᵀ - (Σu)uᵀ + (uᵀΣu) uuᵀ
        s_r = s_r - np.outer(u, su) - np.outer(su, u) + c * np.outer(u, u)
        t_r = t_r - np.outer(t_r @ u, u)  # T <- T (I-uuᵀ)
        picks.append(k)
        removed.append(c)
        basis.append(v_r @ u)
        blocked[k] = True
    result = _result(label, texts, picks, removed, total, basis, mu, r, m)
    log.debug("TextSpan %s: %s", label, list(zip(result.texts, np.round(result.variance_explained, 4))))
    return result


# --------------------------------------------------------------------------- data-matrix form
def textspan_direct(
    data: np.ndarray | torch.Tensor,
    texts: Sequence[str],
    text_embeddings: np.ndarray | torch.Tensor,
    *,
    m: int = 10,
    rank: int | None = 80,
    normalize_candidates: bool = True,
    exclude: set[int] | None = None,
    label: str = "",
    min_norm: float = 1e-6,
) -> SpanResult:
    """TextSpan of one component from its data matrix (the reference form, docs/method.md §5).

    ``V_r`` = top-``r`` right singular vectors of the uncentred ``C``; ``T <- T V_r V_rᵀ``;
    ``C̄ = C - 1μᵀ``; ``m`` times: ``score_k = Var_x(C̄ t_k)`` (``/ ‖t_k‖²`` if
    normalising), ``u = t_k* / ‖t_k*‖``, removed variance ``Var_x(C̄ u)``,
    ``C̄ <- C̄ (I-uuᵀ)``, ``T <- T (I-uuᵀ)``. Costs ``O(n M d)`` per step and holds ``C``.

    Args:
        data: ``[n, d]`` the component's contributions ``C``.
        texts, text_embeddings, m, normalize_candidates, exclude, label, min_norm: as in
            :func:`textspan_from_moments`.
        rank: ``r``; clipped to ``min(n, d)`` (the number of singular vectors); ``None``
            for no projection. (With ``n < r <= d`` the covariance form also keeps
            null directions of ``G``, so the two forms differ only in that corner case.)

    Returns:
        :class:`SpanResult`; equals :func:`textspan_from_moments` on ``μ = mean(C)``,
        ``Σ = C̄ᵀC̄ / n`` up to rounding.
    """
    c_mat = float64_array(data, "data", 2)
    t = float64_array(text_embeddings, "text_embeddings", 2)
    n, d = c_mat.shape
    if n < 1:
        raise InputError("data has no rows")
    _check_pool(texts, t, d)
    check_m(m)
    floor2 = (min_norm**2) * np.einsum("kd,kd->k", t, t)

    if rank is None:
        r = d
    else:
        r = _effective_rank(rank, min(n, d))
        _, _, vh = np.linalg.svd(c_mat, full_matrices=False)  # uncentred C
        v_r = vh[:r].T  # [d, r]
        t = t @ v_r @ v_r.T

    mu = c_mat.mean(axis=0)
    c_bar = c_mat - mu
    total = float(np.einsum("nd,nd->", c_bar, c_bar) / n)
    blocked = _exclusion_mask(exclude, len(texts))
    picks: list[int] = []
    removed: list[float] = []
    basis: list[np.ndarray] = []
    for _ in range(m):
        proj = c_bar @ t.T  # [n, M]
        quad = proj.var(axis=0)  # Var_x(C̄ t_k)
        norm2 = np.einsum("kd,kd->k", t, t)
        score = _scores(quad, norm2, floor2, blocked, normalize_candidates)
        k = _pick(score, norm2)
        if k is None:
            break
        u = t[k] / np.sqrt(norm2[k])
        cu = c_bar @ u  # [n]
        removed.append(float(cu.var()))
        c_bar = c_bar - np.outer(cu, u)
        t = t - np.outer(t @ u, u)
        picks.append(k)
        basis.append(u)
        blocked[k] = True
    return _result(label, texts, picks, removed, total, basis, mu, r, m)


# --------------------------------------------------------------------------- many heads
def textspan_heads(
    moments: RunningMoments,
    labels: Sequence[str],
    texts: Sequence[str],
    text_embeddings: np.ndarray | torch.Tensor,
    *,
    components: Sequence[int | str] | None = None,
    m: int = 10,
    rank: int | None = 80,
    normalize_candidates: bool = True,
    dedupe: bool = False,
    exclude: set[int] | None = None,
    min_norm: float = 1e-6,
) -> list[SpanResult]:
    """TextSpan of several components from streamed moments (one result per component).

    For component ``c``: ``μ = moments.mean[c]``, ``Σ = moments.m2[c] / moments.count``
    (divided by ``n``), then :func:`textspan_from_moments`.

    Args:
        moments: accumulated with ``covariance=True`` over ``[batch, comp, d]`` values
            (e.g. :meth:`ComponentStore.compute_moments(covariance=True)
            <vitdecomp.store.component_store.ComponentStore.compute_moments>`).
        labels: one label per component of ``moments`` (e.g. ``store.labels``).
        texts, text_embeddings: the pool, ``M`` texts and ``[M, d]`` unit embeddings.
        components: component indices or labels, in the order to process (default all).
        m, rank, normalize_candidates, min_norm: as in :func:`textspan_from_moments`.
        dedupe: a text chosen for an earlier component (in the order given) cannot be
            chosen again (cross-head de-duplication, docs/method.md §5 extensions).
        exclude: pool indices no component may choose.

    Raises:
        InputError: no covariance in ``moments``, no data, labels or components that do not
            match the moments.
    """
    if moments.m2 is None:
        raise InputError("TextSpan needs second moments: accumulate RunningMoments with covariance=True "
                         "(e.g. store.compute_moments(covariance=True))")
    if moments.count < 1:
        raise InputError("the moments hold no data (count == 0)")
    n_comp, d = moments.shape
    names = [str(lab) for lab in labels]
    if len(names) != n_comp:
        raise InputError(f"{len(names)} labels for {n_comp} components in the moments")
    index = {name: i for i, name in enumerate(names)}
    order: list[int] = []
    for c in range(n_comp) if components is None else components:
        if isinstance(c, str):
            if c not in index:
                raise InputError(f"unknown component label {c!r}")
            order.append(index[c])
        else:
            if not -n_comp <= int(c) < n_comp:
                raise InputError(f"component index {c} out of range for {n_comp} components")
            order.append(int(c) % n_comp)
    t = float64_array(text_embeddings, "text_embeddings", 2)
    _check_pool(texts, t, d)

    used: set[int] = set(exclude or ())
    results: list[SpanResult] = []
    for c in order:
        res = textspan_from_moments(
            moments.mean[c], moments.m2[c] / moments.count, texts, t,
            m=m, rank=rank, normalize_candidates=normalize_candidates,
            exclude=used, label=names[c], min_norm=min_norm,
        )
        if dedupe:
            used |= set(res.indices)
        results.append(res)
    log.info("TextSpan: %d components, m=%d, rank=%s, %d images%s", len(results), m, rank, moments.count,
             ", de-duplicated" if dedupe else "")
    return results


def _clip(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(results: Sequence[SpanResult], top: int = 5, *, text_width: int = 48,
                 control: Mapping[str, Sequence[float]] | None = None) -> str:
    """Fixed-width table: component, step, text, variance explained and cumulative (fractions).

    Args:
        results: TextSpan results (e.g. from :func:`textspan_heads`).
        top: texts shown per component.
        text_width: texts longer than this are cut (``…``).
        control: label -> cumulative variance explained per step by a random-vector pool of the
            same size (the chance level); shown as a last column when given.
    """
    comp_w = max([len("component")] + [len(r.label) for r in results])
    head = f"{'component':<{comp_w}}  {'#':>2}  {'text':<{text_width}}  {'var':>6}  {'cum':>6}"
    if control is not None:
        head += f"  {'random':>6}"
    lines = [head, "-" * len(head)]
    for res in results:
        cum = 0.0
        shown = list(zip(res.texts, res.variance_explained))[:top]
        if not shown:
            lines.append(f"{res.label:<{comp_w}}  {'':>2}  {'(no text chosen)':<{text_width}}  {'':>6}  {'':>6}")
        for step, (text, frac) in enumerate(shown, start=1):
            cum += frac
            name = res.label if step == 1 else ""
            row = f"{name:<{comp_w}}  {step:>2}  {_clip(text, text_width):<{text_width}}  {frac:>6.3f}  {cum:>6.3f}"
            if control is not None:
                ctrl = control.get(res.label, [])
                row += f"  {ctrl[step - 1]:>6.3f}" if step - 1 < len(ctrl) else f"  {'':>6}"
            lines.append(row)
    return "\n".join(lines)
