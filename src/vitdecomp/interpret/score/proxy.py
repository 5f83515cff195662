"""The CLIP proxy "ground truth" of docs/method.md §4 and the Spearman validation of a score table against it.

:func:`clip_proxy` is ``r_i = (1/|S|) Σ_s Pearson_x(cos(a_i(x), y_s), cos(Z(x), y_s))`` for a
feature's texts ``y_s``, streamed; :func:`validate_ordering` compares the component and feature
orderings of a :class:`~vitdecomp.interpret.score.tables.ScoreTable` with the proxy's (Spearman ρ).
On a store, with ``Z`` the real CLIP image embedding (a CLIP store's own, or the rows of the CLIP's store
paired by id for a model read through CompAlign), both run as
:func:`~vitdecomp.interpret.score.validate.validate_store` (``vitdecomp score --validate``).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import InputError
from .moments import FLAT_TOL, as_float64
from .tables import ScoreTable

if TYPE_CHECKING:
    import torch

    from ...core.stack import ComponentStack

__all__ = ["clip_proxy", "clip_proxy_table", "rankdata", "spearman", "validate_ordering"]


# ============================================================================ CLIP proxy
class _PairMoments:
    """Streaming Pearson statistics of ``u [batch, comp, s]`` against ``v [batch, s]`` (Chan update)."""

    def __init__(self, n_components: int, n_texts: int) -> None:
        self.count = 0
        self.mu_u = np.zeros((n_components, n_texts))
        self.mu_v = np.zeros(n_texts)
        self.m_uu = np.zeros((n_components, n_texts))
        self.m_vv = np.zeros(n_texts)
        self.m_uv = np.zeros((n_components, n_texts))

    def update(self, u: np.ndarray, v: np.ndarray) -> None:
        n_b = int(u.shape[0])
        if n_b == 0:
            return
        mu_u, mu_v = u.mean(axis=0), v.mean(axis=0)
        uc, vc = u - mu_u, v - mu_v
        n_a = self.count
        n = n_a + n_b
        f = n_a * n_b / n
        du, dv = mu_u - self.mu_u, mu_v - self.mu_v
        self.m_uu += np.einsum("bcs,bcs->cs", uc, uc) + f * du * du
        self.m_vv += np.einsum("bs,bs->s", vc, vc) + f * dv * dv
        self.m_uv += np.einsum("bcs,bs->cs", uc, vc) + f * du * dv[None, :]
        self.mu_u += du * (n_b / n)
        self.mu_v += dv * (n_b / n)
        self.count = n

    def pearson(self, flat_tol: float) -> np.ndarray:
        """``[comp, s]``; 0 where either side has (numerically) no variance."""
        ok_u = self.m_uu > flat_tol * (self.m_uu + self.count * self.mu_u**2)
        ok_v = self.m_vv > flat_tol * (self.m_vv + self.count * self.mu_v**2)
        ok = ok_u & ok_v[None, :]
        denom = np.sqrt(np.where(ok, self.m_uu * self.m_vv[None, :], 1.0))
        return np.divide(self.m_uv, denom, out=np.zeros_like(self.m_uv), where=ok)


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm along the last axis (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def _proxy_pearson(
    stack_batches: Iterable[ComponentStack] | ComponentStack,
    texts: np.ndarray,
    *,
    use_reference: bool,
    flat_tol: float,
) -> tuple[tuple[str, ...], np.ndarray, int]:
    """``Pearson_x(cos(a_i, y_s), cos(Z, y_s))`` ``[comp, s]`` streamed over stacks."""
    from ...core.stack import ComponentStack

    batches: Iterable[ComponentStack] = [stack_batches] if isinstance(stack_batches, ComponentStack) else stack_batches
    y = _unit(texts)  # [s, d]
    acc: _PairMoments | None = None
    labels: tuple[str, ...] = ()
    for stack in batches:
        stack = stack.sum_tokens()
        if acc is None:
            labels = tuple(stack.names)
            if stack.dim != y.shape[1]:
                raise InputError(f"text embeddings have dim {y.shape[1]}, the stacks {stack.dim}")
            acc = _PairMoments(len(labels), y.shape[0])
        elif tuple(stack.names) != labels:
            raise InputError("stack batches have different components")
        a = as_float64(stack.values, "stack values").transpose(1, 0, 2)  # [batch, comp, d]
        z = as_float64(stack.reference, "reference") if use_reference else a.sum(axis=1)
        acc.update(_unit(a) @ y.T, _unit(z) @ y.T)
    if acc is None or acc.count < 2:
        raise InputError("clip_proxy needs at least 2 items")
    return labels, acc.pearson(flat_tol), acc.count


def clip_proxy(
    stack_batches: Iterable[ComponentStack] | ComponentStack,
    text_embeddings: np.ndarray | torch.Tensor,
    *,
    use_reference: bool = False,
    flat_tol: float = FLAT_TOL,
) -> np.ndarray:
    """CLIP proxy score of one feature (docs/method.md §4): ``[comp]``.

    ``r_i = (1/|S|) Σ_s Pearson_x(cos(a_i(x), y_s), cos(Z(x), y_s))``, streamed: per component
    and text, float64 means and centred sums of products merged with Chan's update. A cosine with
    a zero vector is 0; a Pearson with a constant side is 0 (same ``flat_tol`` rule as
    :func:`feature_scores`, relative to the uncentred sum of squares).

    Args:
        stack_batches: ComponentStacks in a CLIP space (one stack, or an iterable such as
            ``store.iter_batches()``); tokens are summed.
        text_embeddings: ``[s, d]`` the feature's text embeddings ``y_s`` (normalised here).
        use_reference: ``Z`` = each stack's reference (e.g. the CLIP image embedding
            ``Z_CLIP`` for aligned stacks) instead of the sum of its rows.
    """
    texts = as_float64(text_embeddings, "text_embeddings")
    texts = texts[None] if texts.ndim == 1 else texts
    _, r, _ = _proxy_pearson(stack_batches, texts, use_reference=use_reference, flat_tol=flat_tol)
    return r.mean(axis=1)


def clip_proxy_table(
    stack_batches: Iterable[ComponentStack] | ComponentStack,
    features: Mapping[str, np.ndarray | torch.Tensor],
    *,
    use_reference: bool = False,
    flat_tol: float = FLAT_TOL,
) -> ScoreTable:
    """:func:`clip_proxy` of every feature in one pass: a ScoreTable of kind ``"clip_proxy"``.

    Args:
        features: feature name -> its text embeddings ``[s_p, d]``.
    """
    if not features:
        raise InputError("no features")
    blocks = [as_float64(t, f"texts of {name}") for name, t in features.items()]
    blocks = [b[None] if b.ndim == 1 else b for b in blocks]
    labels, r, n = _proxy_pearson(stack_batches, np.concatenate(blocks), use_reference=use_reference,
                                  flat_tol=flat_tol)
    bounds = np.cumsum([0] + [b.shape[0] for b in blocks])
    cols = [r[:, bounds[p] : bounds[p + 1]].mean(axis=1) for p in range(len(blocks))]
    return ScoreTable(np.stack(cols, axis=1), labels, tuple(features), "clip_proxy",
                      {"count": n, "use_reference": use_reference})


# ============================================================================ validation
def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get the average of their ranks (as ``scipy.stats.rankdata``)."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(new)  # 1-based group id per sorted position
    bounds = np.r_[np.flatnonzero(new), x.size]  # start of each group, then the end
    avg = 0.5 * (bounds[group - 1] + bounds[group] - 1) + 1.0
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = avg
    return ranks


def spearman(a: np.ndarray | Sequence[float], b: np.ndarray | Sequence[float]) -> float:
    """Spearman ρ: Pearson correlation of the average-tie ranks of ``a`` and ``b``.

    Returns NaN when either input is constant (ρ undefined) or has fewer than 2 entries.
    """
    x = as_float64(a, "a").reshape(-1)
    y = as_float64(b, "b").reshape(-1)
    if x.shape != y.shape:
        raise InputError(f"spearman needs equal lengths, got {x.size} and {y.size}")
    if x.size < 2:
        return math.nan
    rx, ry = rankdata(x), rankdata(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / denom if denom > 0 else math.nan


def validate_ordering(table: ScoreTable, proxy_table: ScoreTable) -> dict[str, Any]:
    """docs/method.md §4 "Validation": Spearman ρ of a score table against the CLIP proxy table.

    - component ordering: per feature, ρ between the component rankings; averaged over features;
    - feature ordering: per component, ρ between the feature rankings; averaged over components.

    Rows and columns are matched by name (both tables must have the same components and
    features). Undefined ρ (constant rankings, fewer than 2 features) are left out of the means
    and counted.

    Returns:
        ``{"component_order_rho", "feature_order_rho", "per_feature": {feature: ρ},
        "per_component": {label: ρ}, "n_features", "n_components", "undefined_features",
        "undefined_components"}`` (means are None when nothing is defined).
    """
    if set(table.labels) != set(proxy_table.labels) or len(table.labels) != len(proxy_table.labels):
        raise InputError("the tables have different components")
    if set(table.features) != set(proxy_table.features):
        raise InputError("the tables have different features")
    rows = [proxy_table.row_index(lab) for lab in table.labels]
    cols = [proxy_table.column_index(f) for f in table.features]
    proxy = proxy_table.scores[np.ix_(rows, cols)]
    per_feature = {f: spearman(table.scores[:, j], proxy[:, j]) for j, f in enumerate(table.features)}
    per_component = {lab: spearman(table.scores[i], proxy[i]) for i, lab in enumerate(table.labels)}

    def mean(vals: Iterable[float]) -> float | None:
        ok = [v for v in vals if math.isfinite(v)]
        return float(np.mean(ok)) if ok else None

    return {
        "component_order_rho": mean(per_feature.values()),
        "feature_order_rho": mean(per_component.values()),
        "per_feature": per_feature,
        "per_component": per_component,
        "n_features": len(table.features),
        "n_components": len(table.labels),
        "undefined_features": sum(not math.isfinite(v) for v in per_feature.values()),
        "undefined_components": sum(not math.isfinite(v) for v in per_component.values()),
    }
