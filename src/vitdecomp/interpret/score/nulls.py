"""Null distributions and significance for component × feature scores (docs/method.md §4).

A score says how strongly a component's contribution co-varies with the representation along a
feature's text directions. Whether that is more than chance depends on the space: in a CLIP
space almost any text direction carries some variance. So every score is compared with the
same score for **random text bases of the same rank in the same space**: for a feature with
``k`` texts, ``R`` draws of ``k`` texts from a null pool (by default generic descriptions; for
the synthetic world, its random captions), orthonormalised exactly as the feature's own texts
(:func:`~vitdecomp.interpret.score.tables.feature_basis`). Every score is a function of the
streamed second moments, so the nulls need no further pass over the data (their cost is one
quadratic form per random direction: ``O(R · k · comp · m²)``).

For component ``i`` and feature ``p`` with observed score ``s_{ip}`` and null draws
``s^{(r)}_{ip}``, ``r = 1..R``:

* effect size ``z_{ip} = (s_{ip} − mean_r s^{(r)}_{ip}) / sd_r s^{(r)}_{ip}`` and the percentile of
  ``s_{ip}`` among the draws;
* one-sided p-value from the null's Gaussian tail, ``p_{ip} = 1 − Φ(z_{ip})`` (the draws give the
  null's location and spread; a permutation p-value could not go below ``1 / (R + 1)``, too coarse
  to survive a correction over hundreds of components), with the empirical tail
  ``(1 + #{r: s^{(r)}_{ip} ≥ s_{ip}}) / (R + 1)`` reported beside it;
* Benjamini–Hochberg q-values over every candidate component × feature; significant when
  ``q ≤ alpha``;
* a feature-level test with the max statistic, which controls the family-wise error over
  components: ``P_p = (1 + #{r: max_i s^{(r)}_{ip} ≥ max_i s_{ip}}) / (R + 1)``, then
  Benjamini–Hochberg over features. A feature is *significant* when some component reads it
  better than the best component reads a random text basis of the same rank.

Only candidate components (by default those that compute something from the input,
:data:`vitdecomp.core.labels.INPUT_KINDS`) are tested; other rows get NaN.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...errors import InputError
from .moments import ScoreMoments
from .tables import ScoreKind, ScoreTable, feature_basis, feature_scores

__all__ = ["ScoreNulls", "score_nulls", "benjamini_hochberg"]

log = logging.getLogger(__name__)


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values) of ``p`` (any shape; NaN ignored, kept NaN).

    ``q_(j) = min_{l >= j} (m / l) p_(l)`` over the ``m`` finite values sorted ascending, capped at 1.
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    flat, out = p.reshape(-1), q.reshape(-1)
    ok = np.flatnonzero(np.isfinite(flat))
    m = ok.size
    if m == 0:
        return q
    order = ok[np.argsort(flat[ok], kind="stable")]
    ranked = flat[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    out[order] = np.minimum(ranked, 1.0)
    return q


@dataclass(frozen=True)
class ScoreNulls:
    """Scores with their nulls: every array is ``[comp, feature]`` unless noted.

    Attributes:
        table: the observed scores.
        null_mean, null_sd: mean and standard deviation of the null draws.
        z: effect size over the null; p: permutation p-value; q: Benjamini–Hochberg q-value
            (over candidate components × features); significant: ``q <= alpha``.
        feature_max: ``[feature]`` best observed score among candidates; feature_null_max:
            ``[feature, R]`` the null draws of that maximum; feature_p / feature_q: its (permutation) p- and
            q-value (over features); feature_significant: ``feature_q <= alpha``.
        candidates: ``[comp]`` the rows that were tested.
        n_null, alpha, meta: draws, level and provenance (null pool, seed, kind).
    """

    table: ScoreTable
    null_mean: np.ndarray
    null_sd: np.ndarray
    z: np.ndarray
    p: np.ndarray
    q: np.ndarray
    significant: np.ndarray
    feature_max: np.ndarray
    feature_null_max: np.ndarray
    feature_p: np.ndarray
    feature_q: np.ndarray
    feature_significant: np.ndarray
    candidates: np.ndarray
    n_null: int
    alpha: float
    meta: dict[str, Any] = field(default_factory=dict)
    p_empirical: np.ndarray | None = None
    percentile: np.ndarray | None = None
    draws: np.ndarray | None = None  # [R, comp, feature] the null scores themselves

    def selectivity(self) -> dict[str, np.ndarray]:
        """Selectivity ``g_{ip} = s_{ip} − max_{p'≠p} s_{ip'}`` with its null: ``{"g", "z", "p", "q"}`` ``[comp, feature]``.

        The null draw ``r`` replaces feature ``p``'s basis by a random one and keeps the other
        features' observed scores: ``g^{(r)}_{ip} = s^{(r)}_{ip} − max_{p'≠p} s_{ip'}``.
        """
        if self.draws is None:
            raise InputError("these nulls were made without their draws")
        s = self.table.scores
        if s.shape[1] < 2:
            raise InputError("selectivity needs at least two features")
        others = np.stack([np.delete(s, j, axis=1).max(1) for j in range(s.shape[1])], axis=1)  # [comp, feat]
        return self._tested(s - others, self.draws - others[None])

    def contrast(self, spurious: str, core: str, seed: int = 1) -> dict[str, np.ndarray]:
        """Contrastive score ``s_{i,spurious} − s_{i,core}`` with its null: ``{"g", "z", "p", "q"}`` ``[comp]``.

        The null pairs independent random bases for the two features (draws of the core feature
        taken in a seeded random order, so two features of the same size never share a draw).
        """
        if self.draws is None:
            raise InputError("these nulls were made without their draws")
        feats = list(self.table.features)
        a, b = feats.index(spurious), feats.index(core)
        order = np.random.default_rng(seed).permutation(self.draws.shape[0])
        observed = self.table.scores[:, a] - self.table.scores[:, b]
        null = self.draws[:, :, a] - self.draws[order][:, :, b]
        out = self._tested(observed[:, None], null[:, :, None])
        return {k: v[:, 0] for k, v in out.items()}

    def _tested(self, observed: np.ndarray, null: np.ndarray) -> dict[str, np.ndarray]:
        from scipy.special import ndtr

        mean, sd = null.mean(0), null.std(0, ddof=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(sd > 0, (observed - mean) / sd, np.nan)
        p = np.where(np.isfinite(z), ndtr(-np.nan_to_num(z)), np.nan)
        z[~self.candidates], p[~self.candidates] = np.nan, np.nan
        q = benjamini_hochberg(p)
        return {"g": observed, "z": z, "p": p, "q": q, "significant": np.nan_to_num(q, nan=1.0) <= self.alpha}

    def verdict(self, feature: str) -> str:
        """``"significant"`` or ``"not significant"`` for a feature (max statistic, BH over features)."""
        j = list(self.table.features).index(feature)
        return "significant" if self.feature_significant[j] else "not significant"

    def to_json(self) -> dict[str, Any]:
        """JSON-able: per feature its verdict and per candidate component its score, z, p, q, flag."""

        def num(x: float) -> float | None:
            return float(x) if np.isfinite(x) else None

        features = {}
        for j, name in enumerate(self.table.features):
            comps = {}
            for i in np.flatnonzero(self.candidates):
                comps[self.table.labels[i]] = {
                    "score": num(self.table.scores[i, j]), "null_mean": num(self.null_mean[i, j]),
                    "null_sd": num(self.null_sd[i, j]), "z": num(self.z[i, j]), "p": num(self.p[i, j]),
                    "q": num(self.q[i, j]), "significant": bool(self.significant[i, j]),
                    "p_empirical": num(self.p_empirical[i, j]) if self.p_empirical is not None else None,
                    "percentile": num(self.percentile[i, j]) if self.percentile is not None else None,
                }
            features[name] = {
                "verdict": self.verdict(name), "max_score": num(self.feature_max[j]),
                "null_max_mean": num(self.feature_null_max[j].mean()),
                "null_max_95": num(np.quantile(self.feature_null_max[j], 0.95)),
                "p": num(self.feature_p[j]), "q": num(self.feature_q[j]),
                "n_significant_components": int(self.significant[:, j].sum()), "components": comps,
            }
        return {"kind": self.table.kind, "n_null": self.n_null, "alpha": self.alpha,
                "test": "one-sided, against random text bases of the same rank: per component the null's Gaussian "
                        "tail of z (empirical tail beside it), BH over components x features; feature verdict by "
                        "the permutation max statistic over components, BH over features",
                "meta": self.meta, "features": features}

    def format(self, top: int = 5) -> str:
        """Per feature: the verdict, then its top components with score, null mean and q-value."""
        lines = [f"significance of {self.table.kind} against {self.n_null} random text bases of the same rank "
                 f"(alpha {self.alpha:g}, Benjamini-Hochberg)"]
        for j, name in enumerate(self.table.features):
            lines.append(f"{name}: {self.verdict(name)} (best {self.feature_max[j]:+.3f}, random best "
                         f"{self.feature_null_max[j].mean():+.3f} ± {self.feature_null_max[j].std():.3f}, "
                         f"p {self.feature_p[j]:.3g}, q {self.feature_q[j]:.3g})")
            col = np.where(self.candidates, self.table.scores[:, j], -np.inf)
            for i in np.argsort(-col, kind="stable")[:top]:
                if not self.candidates[i]:
                    break
                flag = "" if self.significant[i, j] else "  not significant"
                lines.append(f"    {self.table.labels[i]:<14} {self.table.scores[i, j]:+.3f}  null "
                             f"{self.null_mean[i, j]:+.3f} ± {self.null_sd[i, j]:.3f}  z {self.z[i, j]:+.1f}  "
                             f"q {self.q[i, j]:.3g}{flag}")
        return "\n".join(lines)


def score_nulls(
    moments: ScoreMoments,
    texts: Mapping[str, np.ndarray],
    null_pool: np.ndarray,
    *,
    kind: ScoreKind = "corr",
    n_null: int = 200,
    seed: int = 0,
    kinds: Any = "input",
    labels: Sequence[str] | None = None,
    alpha: float = 0.05,
    meta: Mapping[str, Any] | None = None,
) -> ScoreNulls:
    """Score every feature and test each score against random text bases of the same rank.

    Args:
        moments: the streamed statistics (:class:`ScoreMoments`).
        texts: feature name -> its text embeddings ``[k_p, d]`` (unit rows; the basis is built
            here with :func:`feature_basis`, as for the null draws).
        null_pool: ``[M, d]`` embeddings of the null texts (``M > max k_p``), in the same space.
        kind: the score (``corr``, ``var_attributed``, ``var_explained``).
        n_null: draws ``R`` per feature (the smallest attainable p-value is ``1 / (R + 1)``).
        seed: the draws' seed.
        kinds: candidate components (:func:`vitdecomp.core.labels.resolve_kinds`).
        labels: component names (default ``moments``' own labels when it has them).
        alpha: level of the Benjamini–Hochberg procedure.

    Returns:
        A :class:`ScoreNulls`.

    Raises:
        InputError: too small a null pool, a pool of the wrong width, or ``n_null < 1``.
    """
    from ...core.labels import kind_mask, resolve_kinds

    pool = np.asarray(null_pool, dtype=np.float64)
    if pool.ndim != 2 or pool.shape[1] != moments.dim:
        raise InputError(f"null pool must be [M, {moments.dim}], got {tuple(pool.shape)}")
    if n_null < 1:
        raise InputError("n_null must be at least 1")
    names = list(texts)
    sizes = {name: int(np.asarray(texts[name]).reshape(-1, moments.dim).shape[0]) for name in names}
    if max(sizes.values(), default=0) >= pool.shape[0]:
        raise InputError(f"the null pool holds {pool.shape[0]} texts; it needs more than the largest feature "
                         f"({max(sizes.values())} texts)")
    labels = list(labels) if labels is not None else [str(x) for x in getattr(moments, "labels", [])]
    if len(labels) != moments.n_components:
        raise InputError(f"{len(labels)} labels for {moments.n_components} components")
    try:
        cand = kind_mask(labels, kinds)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    if not cand.any():
        raise InputError(f"no component of kinds {kinds!r} to test")

    comp, n_feat = moments.n_components, len(names)
    observed = np.zeros((comp, n_feat))
    draws = np.zeros((n_null, comp, n_feat))
    rng = np.random.default_rng(seed)
    null_by_size: dict[int, np.ndarray] = {}
    for j, name in enumerate(names):
        observed[:, j] = feature_scores(moments, feature_basis(texts[name]), kind=kind)
        k = sizes[name]
        if k not in null_by_size:  # features of the same size share their draws (same null)
            scores = np.empty((n_null, comp))
            for r in range(n_null):
                idx = rng.choice(pool.shape[0], size=k, replace=False)
                scores[r] = feature_scores(moments, feature_basis(pool[idx]), kind=kind)
            null_by_size[k] = scores
        draws[:, :, j] = null_by_size[k]

    mean, sd = draws.mean(0), draws.std(0, ddof=1) if n_null > 1 else np.zeros((comp, n_feat))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(sd > 0, (observed - mean) / sd, np.nan)
    empirical = (1.0 + (draws >= observed[None]).sum(0)) / (n_null + 1.0)
    percentile = (draws < observed[None]).mean(0)
    from scipy.special import ndtr

    p = np.where(np.isfinite(z), ndtr(-np.nan_to_num(z)), empirical)
    for arr in (z, p, mean, sd, empirical, percentile):
        arr[~cand] = np.nan
    q = benjamini_hochberg(p)
    significant = np.nan_to_num(q, nan=1.0) <= alpha

    best = np.where(cand[:, None], observed, -np.inf).max(0)
    null_best = np.where(cand[None, :, None], draws, -np.inf).max(1).T  # [feature, R]
    feature_p = (1.0 + (null_best >= best[:, None]).sum(1)) / (n_null + 1.0)
    feature_q = benjamini_hochberg(feature_p)
    table = ScoreTable(observed, tuple(labels), tuple(names), kind, {"count": moments.count})
    info_arrays = {"p_empirical": empirical, "percentile": percentile, "draws": draws}
    info = {"seed": seed, "null_pool_size": int(pool.shape[0]), "kinds": sorted(resolve_kinds(kinds)),
            **dict(meta or {})}
    return ScoreNulls(table, mean, sd, z, p, q, significant, best, null_best, feature_p, feature_q,
                      feature_q <= alpha, cand, n_null, alpha, info, **info_arrays)
