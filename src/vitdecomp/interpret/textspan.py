"""TextSpan: label a component (attention head) with the texts that span its output (docs/method.md §5).

Given one component's contributions ``C [n, d]`` over a dataset (CLIP space, so text
embeddings live in the same space) and a pool of unit text embeddings ``T [M, d]``, TextSpan
greedily picks ``m`` texts whose directions explain most of the component's variance:

1. Project the candidates on the top-``r`` right singular vectors ``V_r [d, r]`` of the
   *uncentred* ``C``: ``T <- T V_r V_rᵀ``.
2. Centre: ``C̄ = C - 1 μᵀ``; the reconstruction starts at ``μ``.
3. ``m`` times: ``k* = argmax_k Var_x(C̄ t_k)`` (divided by ``‖t_k‖²`` when
   ``normalize_candidates``), ``u = t_k* / ‖t_k*‖``, record ``Var_x(C̄ u)``, deflate
   ``C̄ <- C̄ (I - uuᵀ)`` and ``T <- T (I - uuᵀ)``.

**Covariance form** (the default here, :func:`textspan_from_moments`). With
``Σ = C̄ᵀC̄ / n`` (centred, divided by ``n``) and ``G = CᵀC / n = Σ + μμᵀ``:

* ``V_r`` = top-``r`` eigenvectors of ``G`` (the right singular vectors of ``C``);
* ``Var_x(C̄ t) = tᵀ Σ t``, so all scores are ``rowsum((TΣ) ⊙ T)`` (``/ rowsum(T ⊙ T)``);
* deflating by a unit ``u``: ``Σ <- (I - uuᵀ) Σ (I - uuᵀ)``, ``T <- T (I - uuᵀ)``; the
  variance removed is ``uᵀΣu`` and ``tr Σ`` drops by exactly that much.

Only ``μ [d]`` and ``Σ [d, d]`` are needed, and one streaming pass accumulates them for every
head at once (:class:`~vitdecomp.store.component_store.RunningMoments` with ``covariance=True``, see
:func:`textspan_heads`). Since the projected candidates lie in the span of ``V_r``, the greedy
loop runs in its ``r`` coordinates (``T V_r [M, r]``, ``V_rᵀ Σ V_r [r, r]``), which is the
same computation (``V_r`` has orthonormal columns) at ``O(M r²)`` per step instead of
``O(M d²)`` (and ``O(n M d)`` for the data-matrix form).

:func:`textspan_direct` is the data-matrix form (the reference implementation, after
``clip_text_span``'s ``replace_with_iterative_removal``); both forms agree in float64 to
rounding (same picks, same variance fractions).

**Guards.** A candidate whose projected/deflated norm is below ``min_norm`` times its
original norm (already chosen, in the span of chosen texts, or projected away) is never
picked; neither is an index in ``exclude``. When no candidate is left the loop stops early
(fewer than ``m`` picks, logged). Scores tied to within 1e-9 (relative) go to the candidate
with the largest remaining norm: with ``normalize_candidates``, once one dimension of the
span is left every candidate points the same way. ``rank`` above ``d`` is clipped to ``d``;
``rank=None`` skips the projection. Per-step variances are clipped at 0 (rounding).

**Evaluation** (docs/method.md §5): :func:`reconstruct` replaces a head's term by its mean plus the
projection of the centred term on the chosen directions; :func:`reconstruction_accuracy` streams
a store once and scores the zero-shot accuracy of the representation with every analysed head
so replaced, for several ``m`` at once (``reconstruction_basis`` rows are orthonormal and in
selection order, so its first ``m`` rows are exactly the ``m``-text reconstruction).
:func:`textspan_match_rate` is CompAlign's metric (b) (docs/method.md §3): TextSpan over the model's
classifier rows on the raw components against TextSpan over CLIP class-name embeddings on the
mapped components.

Example::

    moments = store.compute_moments(covariance=True)            # one pass, all heads
    results = textspan_heads(moments, store.labels, texts, text_emb,
                             components=range(96, 144), m=10, rank=80, dedupe=True)
    print(format_table(results))
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:
    import torch

    from .align import CompAlign
    from ..core.stack import ComponentStack
    from ..store.component_store import RunningMoments

__all__ = [
    "SpanResult",
    "format_table",
    "reconstruct",
    "reconstruction_accuracy",
    "textspan_direct",
    "textspan_from_moments",
    "textspan_heads",
    "textspan_match_rate",
]

log = logging.getLogger(__name__)

ArrayLike = TypeVar("ArrayLike", "np.ndarray", "torch.Tensor")


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
def _f64(x: Any, name: str, ndim: int) -> np.ndarray:
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


def _check_m(m: int) -> None:
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
    mu = _f64(mean, "mean", 1)
    sigma = _f64(cov, "cov", 2)
    t_orig = _f64(text_embeddings, "text_embeddings", 2)
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise InputError(f"cov must be [{d}, {d}] to match mean, got {tuple(sigma.shape)}")
    _check_pool(texts, t_orig, d)
    _check_m(m)
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
    c_mat = _f64(data, "data", 2)
    t = _f64(text_embeddings, "text_embeddings", 2)
    n, d = c_mat.shape
    if n < 1:
        raise InputError("data has no rows")
    _check_pool(texts, t, d)
    _check_m(m)
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
    t = _f64(text_embeddings, "text_embeddings", 2)
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


# --------------------------------------------------------------------------- evaluation, display
def reconstruct(values: ArrayLike, result: SpanResult) -> ArrayLike:
    """A component's term replaced by its TextSpan reconstruction (docs/method.md §5 "Evaluation").

    ``x -> μ + (x - μ) Bᵀ B`` with ``B = result.reconstruction_basis [m, d]`` (orthonormal
    rows) and ``μ = result.mean``: the mean plus the projection of the centred term on the
    span of the chosen texts.

    Args:
        values: ``[..., d]`` the component's values (e.g. ``[batch, d]``), numpy or torch.

    Returns:
        Same type, shape and (floating) dtype/device as ``values``; computed in float64.
    """
    basis = np.asarray(result.reconstruction_basis, dtype=np.float64)
    mean = np.asarray(result.mean, dtype=np.float64)
    d = mean.shape[0]
    if values.shape[-1] != d:
        raise InputError(f"values have dim {values.shape[-1]}, the TextSpan result has {d}")
    if hasattr(values, "detach"):
        import torch

        x = values.detach().to(torch.float64)
        b = torch.as_tensor(basis, dtype=torch.float64, device=x.device)
        mu = torch.as_tensor(mean, dtype=torch.float64, device=x.device)
        out = mu + ((x - mu) @ b.T) @ b
        return out.to(values.dtype if values.is_floating_point() else torch.float64)  # type: ignore[return-value]
    arr = np.asarray(values)
    out_np = mean + ((arr.astype(np.float64) - mean) @ basis.T) @ basis
    dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float64
    return out_np.astype(dtype, copy=False)  # type: ignore[return-value]


# --------------------------------------------------------------------------- evaluation at dataset scale
def _earlier_heads(names: Sequence[str], analysed: Sequence[int]) -> list[int]:
    """Rows of the heads that are not analysed and sit in a block before the first analysed block.

    This is what the published evaluation mean-ablates (``clip_text_span``: every head of the layers
    before the analysed last ones; MLPs and constant rows are kept). Blocks are ordered by
    :func:`vitdecomp.interpret.ablate.block_key` (``layer``, or ``(stage, block)`` for hierarchical labels).
    """
    from .ablate import block_key as _block_key
    from ..core.labels import parse_label

    keys: list[tuple[int, ...] | None] = []
    heads: list[bool] = []
    for name in names:
        try:
            lab = parse_label(str(name))
        except (ValueError, KeyError):
            keys.append(None)
            heads.append(False)
            continue
        keys.append(_block_key(lab))
        heads.append(lab.kind == "head")
    own = [keys[i] for i in analysed if keys[i] is not None]
    if not own:
        return []
    first = min(own)  # type: ignore[type-var]
    chosen = set(analysed)
    return [i for i, (key, is_head) in enumerate(zip(keys, heads))
            if is_head and i not in chosen and key is not None and key < first]


def _count(correct: int, n: int) -> dict[str, Any]:
    return {"correct": int(correct), "n": int(n), "accuracy": correct / n if n else None}


def reconstruction_accuracy(
    batches: Iterable[tuple[ComponentStack, Any]],
    results: Sequence[SpanResult],
    class_directions: np.ndarray | torch.Tensor,
    *,
    m_values: Sequence[int],
    earlier: Literal["mean", "keep"] = "mean",
    means: np.ndarray | torch.Tensor | None = None,
) -> dict[str, Any]:
    """Zero-shot accuracy with every analysed head replaced by its ``m``-text reconstruction (docs/method.md §5).

    For analysed heads ``A`` (one :class:`SpanResult` each, matched to the stack rows by label)
    with means ``μ_i`` and orthonormal bases ``B_i`` (rows in selection order), the set ``E`` of
    earlier heads (``earlier="mean"``: the heads not analysed in blocks before the first analysed
    block, as the published code; ``"keep"``: none) and reference means ``μ̄_i``::

        z'_m(x) = Σ_i c_i(x) + Σ_{i∈E} (μ̄_i − c_i(x)) + Σ_{i∈A} (r_i^m(x) − c_i(x)),
        r_i^m(x) = μ_i + (c_i(x) − μ_i) B_i[:m]ᵀ B_i[:m]       (:func:`reconstruct` with m texts)

    and the prediction is ``argmax_c ⟨z'_m, w_c⟩`` (rows of ``class_directions`` used as given;
    unit rows make it the cosine argmax). Every ``m`` of ``m_values`` is scored in the same pass
    (memory: one batch, ``[batch, Σ_i k_i]`` coefficients). A head with fewer than ``m`` chosen
    texts uses all of them (counted in ``heads_short``). MLPs and constant rows are never changed.

    Reference points (same rows): ``unablated`` (``z``), ``analysed_kept`` (only ``E``
    mean-ablated, the ceiling of the reconstruction; None when ``E`` is empty) and
    ``mean_ablated`` (every analysed head at its mean, ``E`` as above: ``m = 0``).

    Args:
        batches: ``(stack, targets [batch])`` pairs (component stacks, tokens summed here, in the
            space of ``class_directions``); rows with a negative target are left out.
        results: TextSpan results of the analysed heads, e.g. from :func:`textspan_heads` with
            ``m = max(m_values)``; ``label`` must name a stack row.
        class_directions: ``[C, d]`` class rows (a zero-shot head).
        m_values: numbers of texts per head to evaluate (``>= 0``).
        earlier: ``"mean"`` (published protocol) or ``"keep"``.
        means: ``[comp, d]`` reference means of all stack rows; needed when ``earlier="mean"``
            and there are earlier heads (e.g. ``moments.mean``).

    Returns:
        ``{"n", "n_classes", "analysed", "earlier", "earlier_ablated", "unablated",
        "analysed_kept", "mean_ablated", "by_m": [{"m", "correct", "n", "accuracy",
        "heads_short"}]}``; accuracies are None when no row was scored.

    Raises:
        InputError: bad ``m_values``/``earlier``, labels missing from the stacks, widths that
            disagree, targets ``>= C``, or missing ``means``.
    """
    import torch

    if earlier not in ("mean", "keep"):
        raise InputError(f"earlier must be 'mean' or 'keep', got {earlier!r}")
    ms = sorted({int(m) for m in m_values})
    if not ms or ms[0] < 0:
        raise InputError(f"m_values must be a non-empty list of integers >= 0, got {list(m_values)}")
    if not results:
        raise InputError("reconstruction_accuracy needs at least one TextSpan result")
    w = torch.from_numpy(_f64(class_directions, "class_directions", 2))  # [C, d]
    n_classes, d = w.shape
    labels = [r.label for r in results]
    if len(set(labels)) != len(labels):
        raise InputError("two TextSpan results have the same label")
    bases: list[np.ndarray] = []
    for r in results:
        b = np.asarray(r.reconstruction_basis, dtype=np.float64).reshape(-1, d) if np.size(
            r.reconstruction_basis) else np.zeros((0, d))
        if np.asarray(r.mean).shape != (d,) or b.shape[1] != d:
            raise InputError(f"TextSpan result {r.label!r} is {np.asarray(r.mean).shape[-1]} wide, the class "
                             f"directions {d}")
        bases.append(b)
    mu_a = torch.from_numpy(np.stack([np.asarray(r.mean, dtype=np.float64) for r in results]))  # [A, d]
    basis_t = [torch.from_numpy(b) for b in bases]
    steps = torch.from_numpy(np.concatenate([np.arange(b.shape[0]) for b in bases]))  # [K]
    bw = torch.cat(basis_t) @ w.T  # [K, C]: the class logits of every basis direction
    select = {m: steps < m for m in ms}
    short = {m: sum(b.shape[0] < m for b in bases) for m in ms}

    names = ["unablated", "analysed_kept", "mean_ablated", *(f"m={m}" for m in ms)]
    counts = {name: [0, 0] for name in names}
    rows_a: torch.Tensor | None = None
    rows_e: list[int] = []
    mean_e: torch.Tensor | None = None
    earlier_names: list[str] = []
    n_rows = 0
    for stack, targets in batches:
        stack = stack.sum_tokens()
        if rows_a is None:
            index = {str(n): i for i, n in enumerate(stack.names)}
            missing = [lab for lab in labels if lab not in index]
            if missing:
                raise InputError(f"analysed component(s) {missing[:5]} are not rows of the stacks")
            analysed = [index[lab] for lab in labels]
            rows_a = torch.as_tensor(analysed, dtype=torch.long)
            rows_e = _earlier_heads(stack.names, analysed) if earlier == "mean" else []
            if rows_e:
                if means is None:
                    raise InputError(f"earlier='mean' needs the reference means [comp, d] "
                                     f"({len(rows_e)} earlier heads to mean-ablate)")
                mt = torch.from_numpy(_f64(means, "means", 2))
                if tuple(mt.shape) != (stack.n_components, d):
                    raise InputError(f"means must be [{stack.n_components}, {d}], got {tuple(mt.shape)}")
                mean_e = mt[rows_e].sum(0)
            earlier_names = [str(stack.names[i]) for i in rows_e]
        if stack.dim != d:
            raise InputError(f"the stacks are {stack.dim} wide, the class directions {d}")
        t = torch.as_tensor(np.asarray(targets)).reshape(-1).long()
        if t.numel() != stack.batch_size:
            raise InputError(f"{t.numel()} targets for a batch of {stack.batch_size}")
        keep = t >= 0
        if not bool(keep.any()):
            continue
        t = t[keep]
        if int(t.max()) >= n_classes:
            raise InputError(f"target {int(t.max())} but only {n_classes} class directions")
        v = stack.values.to(torch.float64)[:, keep]  # [comp, b, d]
        b = v.shape[1]
        n_rows += b
        z = v.sum(0)
        z_e = z - v[rows_e].sum(0) + mean_e if rows_e else z
        c_a = v.index_select(0, rows_a)  # [A, b, d]
        z_base = z_e - c_a.sum(0) + mu_a.sum(0)
        # coefficients of each head's centred term on its own basis rows: [b, K]
        coef = torch.cat([(c_a[j] - mu_a[j]) @ basis_t[j].T for j in range(len(basis_t))], dim=1)
        base_logits = z_base @ w.T

        def score(name: str, logits: torch.Tensor) -> None:
            counts[name][0] += int((logits.argmax(-1) == t).sum())
            counts[name][1] += b

        score("unablated", z @ w.T)
        if rows_e:
            score("analysed_kept", z_e @ w.T)
        score("mean_ablated", base_logits)
        for m in ms:
            sel = select[m]
            score(f"m={m}", base_logits + coef[:, sel] @ bw[sel])
    log.info("TextSpan evaluation: %d heads, %d rows, m in %s", len(labels), n_rows, ms)
    return {
        "n": n_rows,
        "n_classes": int(n_classes),
        "analysed": labels,
        "earlier": earlier,
        "earlier_ablated": earlier_names,
        "unablated": _count(*counts["unablated"]),
        "analysed_kept": _count(*counts["analysed_kept"]) if rows_e else None,
        "mean_ablated": _count(*counts["mean_ablated"]),
        "by_m": [{"m": m, **_count(*counts[f"m={m}"]), "heads_short": short[m]} for m in ms],
    }


def _unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise InputError(f"{name} has a zero row")
    return x / norms


def textspan_match_rate(
    moments: RunningMoments,
    maps: CompAlign | np.ndarray | torch.Tensor,
    class_rows: np.ndarray | torch.Tensor,
    class_embeddings: np.ndarray | torch.Tensor,
    *,
    labels: Sequence[str],
    components: Sequence[int | str] | None = None,
    class_names: Sequence[str] | None = None,
    m: int = 10,
    rank: int | None = 80,
    normalize_candidates: bool = True,
    min_norm: float = 1e-6,
) -> dict[str, Any]:
    """TextSpan match rate of CompAlign maps (docs/method.md §3, metric (b)).

    Per component ``i`` (model-space moments ``μ_i``, ``Σ_i``; map ``F_i [d_clip, d_model]``):

    * ground truth: TextSpan (:func:`textspan_from_moments`, ``m`` picks) with the model's own
      class vectors (``class_rows [C, d_model]``, rows scaled to unit norm) as the pool, on the
      raw component: moments ``(μ_i, Σ_i)``;
    * prediction: TextSpan with the CLIP class-name embeddings (``class_embeddings [C, d_clip]``,
      row ``k`` = the same class as ``class_rows[k]``) on the mapped component ``a_i = F_i c_i``,
      whose moments are exactly ``(F_i μ_i, F_i Σ_i F_iᵀ)`` (the maps are linear), so the one
      streaming pass of the model-space moments serves both sides;
    * score: ``|T_i ∩ P_i| / max(|T_i|, |P_i|)`` (the class sets, ``match_rate``) and the
      position-wise agreement ``#{k: T_i[k] = P_i[k]} / max(|T_i|, |P_i|)``
      (``match_rate_ordered`` <= ``match_rate``), each averaged over components.

    The paper's "exact-match fraction" [paper Tab. 1] does not say whether order counts; the set
    version is our headline (TextSpan's later picks depend on the earlier ones, so the order is
    noisy while the chosen set is what a reader uses); both are reported.

    For ``F_i = s_i Q_i`` with orthonormal columns and ``class_embeddings = Q_i class_rows``
    (normalised), both TextSpans see the same problem up to the rotation and the scale ``s_i²``, so
    the match rate is 1.

    Args:
        moments: model-space moments with covariance over ``[batch, comp, d_model]``.
        maps: a :class:`~vitdecomp.interpret.align.CompAlign` (its per-component maps), ``[comp, d_clip,
            d_model]`` per-component maps, or one shared ``[d_clip, d_model]`` map.
        class_rows: ``[C, d_model]`` the model's classifier rows (logits ``z W_cᵀ``).
        class_embeddings: ``[C, d_clip]`` CLIP class-name embeddings, same class order.
        labels: one label per component of ``moments``.
        components: indices or labels to score (default all).
        class_names: ``C`` names for the output (default ``"0", "1", ...``).
        m, rank, normalize_candidates, min_norm: as in :func:`textspan_from_moments`, both sides.

    Returns:
        ``{"match_rate", "match_rate_ordered", "chance", "m", "rank", "n_components", "n_images",
        "per_component": [{"label", "set", "ordered", "truth", "predicted"}]}``; ``chance = m / C`` is
        the expected set match of two independent uniform draws of ``m`` of the ``C`` classes.

    Raises:
        InputError: no covariance, shapes that disagree, zero class rows.
    """
    if moments.m2 is None:
        raise InputError("the match rate needs second moments: accumulate RunningMoments with covariance=True")
    if moments.count < 1:
        raise InputError("the moments hold no data (count == 0)")
    _check_m(m)
    n_comp, d_model = moments.shape
    names = [str(lab) for lab in labels]
    if len(names) != n_comp:
        raise InputError(f"{len(names)} labels for {n_comp} components in the moments")
    if hasattr(maps, "group_maps"):  # CompAlign, without importing torch here
        f_all = _f64(maps.maps, "maps", 3)  # type: ignore[union-attr]
    else:
        raw = maps.detach().cpu().double().numpy() if hasattr(maps, "detach") else np.asarray(maps, np.float64)
        f_all = _f64(raw[None] if raw.ndim == 2 else raw, "maps", 3)
    if f_all.shape[0] not in (1, n_comp) or f_all.shape[2] != d_model:
        raise InputError(f"maps must be [{n_comp}, d_clip, {d_model}] (or one shared [d_clip, {d_model}]), got "
                         f"{tuple(f_all.shape)}")
    d_clip = f_all.shape[1]
    rows = _unit_rows(_f64(class_rows, "class_rows", 2), "class_rows")
    emb = _f64(class_embeddings, "class_embeddings", 2)
    if rows.shape[1] != d_model:
        raise InputError(f"class rows are {rows.shape[1]} wide, the components {d_model}")
    if emb.shape != (rows.shape[0], d_clip):
        raise InputError(f"class embeddings must be [{rows.shape[0]}, {d_clip}] (one per model class, CLIP width), "
                         f"got {tuple(emb.shape)}")
    texts = [str(c) for c in class_names] if class_names is not None else [str(k) for k in range(rows.shape[0])]
    if len(texts) != rows.shape[0]:
        raise InputError(f"{len(texts)} class names for {rows.shape[0]} classes")
    index = {name: i for i, name in enumerate(names)}
    order: list[int] = []
    for c in range(n_comp) if components is None else components:
        if isinstance(c, str):
            if c not in index:
                raise InputError(f"unknown component label {c!r}")
            order.append(index[c])
        elif not 0 <= int(c) < n_comp:
            raise InputError(f"component index {c} out of range for {n_comp} components")
        else:
            order.append(int(c))

    per: list[dict[str, Any]] = []
    for c in order:
        mu = moments.mean[c]
        sigma = moments.m2[c] / moments.count
        f = f_all[c if f_all.shape[0] > 1 else 0]
        kw = {"m": m, "rank": rank, "normalize_candidates": normalize_candidates, "min_norm": min_norm,
              "label": names[c]}
        truth = textspan_from_moments(mu, sigma, texts, rows, **kw).indices  # type: ignore[arg-type]
        pred = textspan_from_moments(f @ mu, f @ sigma @ f.T, texts, emb, **kw).indices  # type: ignore[arg-type]
        size = max(len(truth), len(pred))
        per.append({
            "label": names[c],
            "set": len(set(truth) & set(pred)) / size if size else None,
            "ordered": sum(a == b for a, b in zip(truth, pred)) / size if size else None,
            "truth": [texts[k] for k in truth],
            "predicted": [texts[k] for k in pred],
        })
    scored = [p for p in per if p["set"] is not None]
    return {
        "match_rate": float(np.mean([p["set"] for p in scored])) if scored else None,
        "match_rate_ordered": float(np.mean([p["ordered"] for p in scored])) if scored else None,
        "definition": "per component |T∩P|/max(|T|,|P|) of the TextSpan class picks (set) and the share of "
                      "equal picks position by position (ordered); T over the model's classifier rows on c_i, P "
                      "over the CLIP class-name embeddings on F_i c_i; averaged over components",
        "chance": min(m, rows.shape[0]) / rows.shape[0],
        "m": m,
        "rank": rank,
        "n_components": len(per),
        "n_images": int(moments.count),
        "per_component": per,
    }


def _clip(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(results: Sequence[SpanResult], top: int = 5, *, text_width: int = 48) -> str:
    """Fixed-width table: component, step, text, variance explained % and cumulative %.

    Args:
        results: TextSpan results (e.g. from :func:`textspan_heads`).
        top: texts shown per component.
        text_width: texts longer than this are cut (``…``).
    """
    comp_w = max([len("component")] + [len(r.label) for r in results])
    head = f"{'component':<{comp_w}}  {'#':>2}  {'text':<{text_width}}  {'var %':>6}  {'cum %':>6}"
    lines = [head, "-" * len(head)]
    for res in results:
        cum = 0.0
        shown = list(zip(res.texts, res.variance_explained))[:top]
        if not shown:
            lines.append(f"{res.label:<{comp_w}}  {'':>2}  {'(no text chosen)':<{text_width}}  {'':>6}  {'':>6}")
        for step, (text, frac) in enumerate(shown, start=1):
            cum += frac
            name = res.label if step == 1 else ""
            lines.append(f"{name:<{comp_w}}  {step:>2}  {_clip(text, text_width):<{text_width}}  "
                         f"{100 * frac:>6.2f}  {100 * cum:>6.2f}")
    return "\n".join(lines)
