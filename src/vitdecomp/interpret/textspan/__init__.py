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

**Modules.** :mod:`~vitdecomp.interpret.textspan.span` (the algorithm, both forms, and the table),
:mod:`~vitdecomp.interpret.textspan.evaluate` (reconstructions, their accuracy, the match rate) and
:mod:`~vitdecomp.interpret.textspan.run` (:func:`label_store`: what ``vitdecomp label`` computes on a store).
Every name is importable from here.
"""
from __future__ import annotations

from .evaluate import ArrayLike, earlier_heads, reconstruct, reconstruction_accuracy, textspan_match_rate
from .run import LabelEvaluation, LabelResult, aligned_moments, format_evaluation, label_store, last_layer_heads
from .span import SpanResult, format_table, textspan_direct, textspan_from_moments, textspan_heads

__all__ = [
    "ArrayLike",
    "LabelEvaluation",
    "LabelResult",
    "SpanResult",
    "aligned_moments",
    "earlier_heads",
    "format_evaluation",
    "format_table",
    "label_store",
    "last_layer_heads",
    "reconstruct",
    "reconstruction_accuracy",
    "textspan_direct",
    "textspan_from_moments",
    "textspan_heads",
    "textspan_match_rate",
]
