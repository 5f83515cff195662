"""CompAlign: linear maps from a model's components into a CLIP space (docs/method.md §3).

A decomposition writes a representation as ``z = Σ_i c_i`` with ``c_i ∈ ℝ^{d_model}``. To read
the components with CLIP text, CompAlign fits one linear map ``f_i: ℝ^{d_model} → ℝ^{d_clip}``
per component (or per group of components, or one shared map), stored as a matrix
``F_i ∈ ℝ^{d_clip × d_model}`` (``a_i = F_i c_i``), so that the mapped sum matches the CLIP image
embedding ``y(x)`` of the same image::

    Σ_i F_i c_i(x)  ≈  y(x)                 (in direction: the loss is a cosine)

and keeps every ``F_i`` close to a *scaled isometry*, ``F_iᵀF_i = s_i² I``, so inner products
between mapped vectors (and therefore text readings ``⟨a_i, y_text⟩``) are those of the model
space up to the scale. Training is label-free.

**Objectives** (``AlignConfig.parametrisation``):

* ``"penalty"`` (the paper, [paper §4]): minimise
  ``L = mean_x [1 − cos(Σ_i F_i c_i, y)] + λ Σ_maps ‖F_iᵀF_i − I‖_F``
  (Frobenius norm, *not* squared, scale fixed to ``k = 1``; the cosine is scale-free and the
  penalty picks the scale). ``lam=0`` is the unconstrained ("λ = 0") ablation.
* ``"orthogonal"`` [ext]: the constraint holds exactly, ``F_i = s_i Q_i`` with ``Q_iᵀQ_i = I``.
  ``Q_i`` is the Q factor of the reduced QR decomposition of a free matrix ``W_i`` (signs fixed
  so ``diag R > 0``: a smooth map onto *every* matrix with orthonormal columns, both
  orientations), ``s_i = exp(ℓ_i)``; with ``common_scale=True`` one ``s`` is shared by all maps,
  the ``f_iᵀf_i = kI`` with a common ``k`` of Theorem 1. The cosine loss leaves one global
  scale free, so after training all scales are multiplied by the least-squares factor
  ``α = Σ⟨ŷ, y⟩ / Σ‖ŷ‖²`` over the validation rows (this changes no cosine; it makes
  ``Σ_i a_i ≈ y`` in norm as well).

**Map sharing** (``AlignConfig.mode``): ``"per_component"`` (CompAlign, one map per component),
``"grouped"`` (one map per group of components; ``groups`` must partition the components) and
``"shared"`` (one map for everything: the Text-to-Concept baseline). Since the maps are linear,
a group's prediction only needs the group sum: ``ŷ = Σ_g F_g (Σ_{i∈g} c_i)``.

**Feasibility.** A matrix ``F ∈ ℝ^{d_clip × d_model}`` with ``FᵀF = s²I`` needs
``d_model ≤ d_clip`` (Swin-B, 1024, into ViT-L-14, 768, is infeasible). ``AlignConfig.constraint``:

* ``"isometry"``: ``FᵀF = s² I_{d_model}`` (the paper); raises :class:`AlignmentInfeasibleError`
  when ``d_model > d_clip``.
* ``"coisometry"``: ``FFᵀ = s² I_{d_clip}`` (the smaller Gram side when ``d_model ≥ d_clip``):
  ``F = s Pᵀ`` with orthonormal ``P ∈ ℝ^{d_model × d_clip}``, an isometry on a learned
  ``d_clip``-dimensional subspace of the model space that discards its complement (a learned
  version of "project on a d_clip-dim PCA subspace first"). It is what the published code
  penalises. Needs ``d_model ≥ d_clip``.
* ``"auto"`` (default): the isometry when ``d_model ≤ d_clip``; otherwise the co-isometry in
  penalty mode (with a warning) and :class:`AlignmentInfeasibleError` in orthogonal mode (a hard
  co-isometry throws away ``d_model − d_clip`` dimensions of every component, so it must be
  asked for by name).

**The closed-form start** (``AlignConfig.init="lstsq"``, the default; :func:`closed_form_maps`): one
pass over the training rows accumulates the normal equations ``A = XᵀX``, ``B = XᵀY`` (float64) of the
linear regression ``Σ_g F_g x_g ≈ y`` on the concatenated (group-summed) components ``X = [x_1 … x_G]``
and solves it with a small relative ridge (``ridge · tr(A_gg)/d_model`` per map block); above
``lstsq_max_columns`` columns it solves the shared map's problem instead. For a constrained objective
(orthogonal, or penalty with ``lam > 0``) the maps are then made scaled (co-)isometries: polar factor,
least-squares scales, and up to ``sweeps`` block-coordinate Procrustes sweeps on the same normal
equations. The optimiser starts there; the published settings (random start, lr 3e-4, 2 epochs, batch
32) stay available as ``AlignConfig.published()``.

**Training** (:func:`fit_compalign`): mini-batches stream from a callable (a fresh iterator per
epoch), so nothing but one batch is in memory. Each row goes to the validation split when
``hash(seed, row) < val_fraction`` (splitmix64 of the row index: the split depends on neither
batch size, order of arrival nor resumption). Train rows are re-chunked into optimiser steps
of ``batch_size`` rows (AdamW; weight decay never applies to the log-scales). The state after
``k`` epochs is evaluated on the validation rows during pass ``k + 1`` (with a frozen copy of
the parameters, so this is exact and saves a pass per epoch), the last state in one extra
pass; early stopping after ``patience`` evaluated epochs without an improvement of the mean
validation cosine by more than ``min_delta``, and the best state is restored. With ``checkpoint=PATH`` the full
training state is saved atomically after every epoch, and a run started with an existing
checkpoint continues at the next epoch; the result equals an uninterrupted run.

**Convergence record**: ``meta["history"]`` holds the held-out cosine of every evaluated state
(``epochs_trained = 0`` is the start), ``meta["converged"]`` is False when the fit ran to its epoch
limit with its last state the best and better than every earlier one by more than
:data:`CONVERGENCE_GAIN` (1e-3), and ``meta["warnings"]`` (also logged with ``logging.warning``) says so,
and when the best held-out cosine is below :data:`LOW_COSINE` (0.5: the mapped sum explains little of
the CLIP embedding, so text read through the maps says little about the model).

**Departures from docs/method.md §3 / the published code** (documented, deliberate):

* Published code: ``x·W`` with ``W ∈ ℝ^{d_z × d_c}`` penalised by ``‖WᵀW − I‖²_F/(N·d_c)``
  at ``λ = 1``, i.e. the co-isometry ``FFᵀ − I``, squared and averaged; plus one shared bias
  added as ``b/n`` per component. Here penalty mode follows the paper (``FᵀF − I``, unsquared,
  summed over maps, default ``λ = 1/768``), uses the co-isometry only when the isometry is
  infeasible or requested, and has no bias: the maps stay linear, so ``Σ_i a_i`` is exactly the
  image of ``Σ_i c_i`` and the decomposition's constant rows (``bias``) are mapped like any other.
* Early stopping is per epoch on the held-out mean cosine (code: after 50 batches without
  improvement; paper: up to an epoch). Optimiser AdamW with ``weight_decay=0`` by default
  (paper: Adam with defaults; code: weight decay 1e-6).
* The optimiser starts from the closed-form least-squares maps, not a random matrix, with learning
  rate 3e-5 for at most 10 epochs (published: random start, 3e-4, 2 epochs, which on an exactly
  solvable problem of 3,000 rows reaches a held-out cosine of about 0.04; docs/benchmarks.md).
* Rows are used in stream order (no shuffling). For a class-sorted store, write a batch source
  that reads chunks in a fixed shuffled order (``store.components(rows)``) and yields the row
  indices as the third element of each batch, so the train/validation split stays tied to the
  rows; the order must be the same on every call for a resumed run to equal an uninterrupted one.

Example::

    from vitdecomp.interpret.align import AlignConfig, fit_compalign, store_batches
    batches = store_batches(store, clip_embeddings)          # [n_items, d_clip] CLIP targets
    # or: store_batches(store, clip_store), a store of a CLIP over the same images (its reference rows)
    align = fit_compalign(batches, len(store.labels), d_model, d_clip,
                          AlignConfig(parametrisation="orthogonal", lr=1e-3),
                          checkpoint=Path("align.ckpt"), labels=store.labels)
    aligned = align.apply(stack)                              # space="clip"
    print(align.metrics(batches, split="val"))
    align.save("align.safetensors")

**Modules.** :mod:`~vitdecomp.interpret.align.config` (settings, constraint side, map sharing),
:mod:`~vitdecomp.interpret.align.data` (held-out split, store pairing, batch sources),
:mod:`~vitdecomp.interpret.align.maps` (the fitted :class:`CompAlign`, its metrics and files),
:mod:`~vitdecomp.interpret.align.fit` (the streaming fit and its checkpoints) and
:mod:`~vitdecomp.interpret.align.run` (:func:`fit_alignment`: what ``vitdecomp align`` computes, from two
stores to the maps and their held-out metrics). Every name is importable from here.
"""
from __future__ import annotations

from .config import (
    PRESETS,
    AlignConfig,
    AlignmentInfeasibleError,
    Constraint,
    Init,
    Mode,
    Parametrisation,
    Side,
    map_assignment,
    resolve_constraint,
)
from .data import (
    Batch,
    BatchSource,
    checked_batches,
    done_rows,
    paired_rows,
    splitmix64,
    store_batches,
    validation_mask,
)
from .fit import CHECKPOINT_FORMAT, CONVERGENCE_GAIN, LOW_COSINE, ClosedForm, closed_form_maps, fit_compalign
from .maps import ALIGN_FILE, FORMAT, CompAlign, CosineStats, find_alignment, group_sum, orthogonality_defect
from .run import (
    CHECKPOINT,
    CHECKPOINT_INPUTS,
    RESULT_FILE,
    AlignmentResult,
    MapSharing,
    MatchRateOptions,
    alignment_config,
    fit_alignment,
    text_tower_missing,
)

__all__ = [
    "ALIGN_FILE",
    "CHECKPOINT",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_INPUTS",
    "CONVERGENCE_GAIN",
    "FORMAT",
    "LOW_COSINE",
    "PRESETS",
    "RESULT_FILE",
    "AlignConfig",
    "AlignmentInfeasibleError",
    "AlignmentResult",
    "Batch",
    "BatchSource",
    "ClosedForm",
    "CompAlign",
    "Constraint",
    "CosineStats",
    "Init",
    "MapSharing",
    "MatchRateOptions",
    "Mode",
    "Parametrisation",
    "Side",
    "alignment_config",
    "checked_batches",
    "closed_form_maps",
    "done_rows",
    "find_alignment",
    "fit_alignment",
    "fit_compalign",
    "group_sum",
    "map_assignment",
    "orthogonality_defect",
    "paired_rows",
    "resolve_constraint",
    "splitmix64",
    "store_batches",
    "text_tower_missing",
    "validation_mask",
]
