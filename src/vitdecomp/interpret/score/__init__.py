"""Component × feature scores (docs/method.md §4) from one streaming pass over a dataset.

Every score of docs/method.md §4 is a function of second moments, so one pass accumulates the
sufficient statistics in float64 and any feature set can be scored afterwards without the data.
For components ``a_i(x) ∈ R^d`` (``i < comp``) and the total ``Z(x) = Σ_i a_i(x)`` (or an
explicit reference), over ``n`` images, :class:`ScoreMoments` keeps::

    n                          count
    mean      μ_i     [comp, d]  per-component mean               (always in the full space)
    mean_z    μ_Z     [d]
    m2        M_i     [comp, m, m]  Σ_x (P(a_i − μ_i))(P(a_i − μ_i))ᵀ   Σ_i = M_i / (n − 1)
    cross     K_i     [comp, m, m]  Σ_x (P(a_i − μ_i))(P(Z − μ_Z))ᵀ     C_i = Cov(a_i, Z) = K_i / (n − 1)
    m2_z      M_Z     [m, m]        Σ_x (P(Z − μ_Z))(P(Z − μ_Z))ᵀ     Σ_Z = M_Z / (n − 1)
    trace     t_i     [comp]        Σ_x ‖a_i − μ_i‖²  = tr M_i in the full space
    trace_z   t_Z     scalar

where ``P = I`` (``m = d``) unless the moments were built with ``directions`` (see
:meth:`ScoreMoments.project`). Batches are combined with the pairwise update of Chan et al.
(for two parts A, B with ``δ = μ_B − μ_A``, ``δ_Z = μ_{Z,B} − μ_{Z,A}``)::

    M = M_A + M_B + δ δᵀ · n_A n_B / n,    K = K_A + K_B + δ δ_Zᵀ · n_A n_B / n,

so batches, chunks and ranks can be merged in any order and equal one pass up to rounding.

Scores for a feature with orthonormal basis ``B ∈ R^{k×d}`` (rows ``b_j``, from
:func:`feature_basis`), ``S_i = A_i Bᵀ`` and ``S_Z = Z Bᵀ``:

- ``corr``:            s_i = (1/k) Σ_j b_jᵀ C_i b_j / sqrt(b_jᵀ Σ_i b_j · b_jᵀ Σ_Z b_j)
                       = (1/k) Σ_j Pearson_x(S_i[:, j], S_Z[:, j])   (paper Alg. 3)
- ``var_attributed``:  v_i = (1/k) Σ_j b_jᵀ C_i b_j = (1/k) Σ_j Cov_x(S_i[:, j], S_Z[:, j]);
                       Σ_i C_i = Σ_Z when Z is the exact sum, so the shares
                       v_i / ((1/k) tr(B Σ_Z Bᵀ)) sum to 1
- ``var_explained``:   e_i = tr(B Σ_i Bᵀ) / tr(Σ_i)

Derived scores live on :class:`ScoreTable` (selectivity, contrastive); :func:`clip_proxy` is
the CLIP "ground truth" of docs/method.md §4 and :func:`validate_ordering` its Spearman comparison.

Example::

    moments = ScoreMoments.from_store(store)                 # one pass, memory one chunk
    bases = {name: feature_basis(embed(texts)) for name, texts in FEATURES.items()}
    table = score_table(moments, bases, kind="corr")
    print(table.format(top=5))
    table.plot("scores.svg")

**Modules.** :mod:`~vitdecomp.interpret.score.moments` (the streamed statistics),
:mod:`~vitdecomp.interpret.score.tables` (feature bases, scores, :class:`ScoreTable`),
:mod:`~vitdecomp.interpret.score.proxy` (the CLIP proxy and the Spearman validation),
:mod:`~vitdecomp.interpret.score.nulls` (null distributions from random text bases, significance),
:mod:`~vitdecomp.interpret.score.run` (:func:`score_store`: what ``vitdecomp score`` computes on a store) and
:mod:`~vitdecomp.interpret.score.validate` (:func:`validate_scores`: ``vitdecomp score --validate``, the
orderings against the CLIP proxy with the real CLIP image embedding).
Every name is importable from here.
"""
from __future__ import annotations

from .moments import FLAT_TOL, ScoreMoments, as_float64
from .nulls import ScoreNulls, benjamini_hochberg, score_nulls
from .proxy import clip_proxy, clip_proxy_table, rankdata, spearman, validate_ordering
from .run import MAX_MOMENT_BYTES, VARIANTS, ScoreResult, resolve_feature, resolve_features, score_store
from .tables import ScoreKind, ScoreTable, feature_basis, feature_scores, score_table
from .validate import ScoreValidation, validate_scores, validate_store

__all__ = [
    "ScoreNulls",
    "benjamini_hochberg",
    "score_nulls",
    "FLAT_TOL",
    "MAX_MOMENT_BYTES",
    "VARIANTS",
    "ScoreKind",
    "ScoreMoments",
    "ScoreResult",
    "ScoreTable",
    "ScoreValidation",
    "as_float64",
    "clip_proxy",
    "clip_proxy_table",
    "feature_basis",
    "feature_scores",
    "rankdata",
    "resolve_feature",
    "resolve_features",
    "score_store",
    "score_table",
    "spearman",
    "validate_ordering",
    "validate_scores",
    "validate_store",
]
