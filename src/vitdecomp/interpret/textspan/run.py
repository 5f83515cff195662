"""What ``vitdecomp label`` computes: every head of a store labelled with texts (TextSpan, docs/method.md §5).

:func:`label_store` streams the store once, accumulating each head's mean ``μ [d]`` and covariance
``Σ [d, d]`` (in the store's space, or of the mapped components ``a_i = F_i c_i`` through a CompAlign),
and runs TextSpan (:func:`~vitdecomp.interpret.textspan.span.textspan_heads`, covariance form) on a pool
of text embeddings from a CLIP text tower. Optionally a second pass scores the zero-shot accuracy with
every labelled head replaced by its reconstruction from its first ``m`` texts
(:func:`~vitdecomp.interpret.textspan.evaluate.reconstruction_accuracy`).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ...errors import InputError
from ..inputs import ModelChoice, StoreLike, iter_store_batches, open_alignment, open_store, read_classes
from .evaluate import reconstruction_accuracy
from .span import SpanResult, format_table, textspan_heads

if TYPE_CHECKING:
    import torch

    from ...core.model import Model
    from ...core.stack import ComponentStack
    from ...store.component_store import ComponentStore, RunningMoments
    from ..align.maps import CompAlign
    from ..text.pools import TextPool

__all__ = ["LabelEvaluation", "LabelResult", "aligned_moments", "format_evaluation", "label_store",
           "last_layer_heads"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelEvaluation:
    """The evaluation pass of :func:`label_store` (docs/method.md §5).

    Attributes:
        classes: class names (line ``k`` names the store's target ``k``), or their file: the zero-shot head.
        m_values: numbers of texts per head to evaluate (``>= 0``; sorted, repeats dropped).
        templates: template set of the class names.
        earlier: heads of the blocks before the labelled ones: ``"mean"``-ablated (the published
            protocol) or ``"keep"``.
    """

    classes: Sequence[str] | str | os.PathLike
    m_values: Sequence[int] = (1, 2, 5, 10)
    templates: str | Sequence[str] = "photo"
    earlier: Literal["mean", "keep"] = "mean"

    def __post_init__(self) -> None:
        values = sorted({int(m) for m in self.m_values})
        if not values or values[0] < 0:
            raise InputError(f"--m-values {','.join(map(str, self.m_values))!r}: give integers >= 0")
        object.__setattr__(self, "m_values", tuple(values))
        if self.earlier not in ("mean", "keep"):
            raise InputError(f"earlier must be 'mean' or 'keep', got {self.earlier!r}")


@dataclass
class LabelResult:
    """What :func:`label_store` computed.

    Attributes:
        store: the store read.
        model, weights: the text tower's model and weights.
        pool: the text pool.
        alignment: the CompAlign the components were mapped with, if any.
        m, rank, dedupe: the TextSpan settings (``m`` = texts per head actually run).
        heads: one :class:`SpanResult` per labelled head.
        evaluation: the evaluation pass's result, when asked for.
        files: input files by role (``align``, ``classes``).
        control: head -> cumulative variance explained per step by the same TextSpan over a pool of
            as many random unit vectors (the published control), when computed.
    """

    store: ComponentStore
    model: str
    weights: str | None
    pool: TextPool
    m: int
    rank: int | None
    dedupe: bool
    heads: list[SpanResult]
    alignment: CompAlign | None = None
    evaluation: dict[str, Any] | None = None
    files: dict[str, Any] = field(default_factory=dict)
    control: dict[str, list[float]] | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON ``vitdecomp label`` writes, without the run record (the CLI puts ``"run"`` after ``"heads"``)."""
        payload: dict[str, Any] = {
            "store": str(self.store.path), "model": self.model, "weights": self.weights, "pool": self.pool.manifest(),
            "align": self.alignment.describe() if self.alignment is not None else None,
            "m": self.m, "rank": self.rank, "dedupe": self.dedupe, "n_items": self.store.n_items,
            "heads": [r.to_json() for r in self.heads],
        }
        if self.control is not None:
            payload["random_pool_control"] = {
                "what": f"cumulative variance explained per step by TextSpan over {len(self.pool.texts)} random unit "
                        "vectors (same size as the pool, same space): the chance level of each head's curve",
                "heads": self.control}
        if self.evaluation is not None:
            payload["evaluation"] = self.evaluation
        return payload

    def format(self) -> str:
        """The table ``vitdecomp label`` prints (and the evaluation summary)."""
        text = format_table(self.heads, top=self.m, control=self.control)
        if self.evaluation is not None:
            text += "\n\n" + format_evaluation(self.evaluation)
        return text


def last_layer_heads(labels: Sequence[str], layers: int | None = None) -> list[int]:
    """Rows of ``labels`` that are attention heads, only those of the last ``layers`` blocks when given.

    Blocks are ordered by their place in the network: ``L07`` by its layer, hierarchical labels
    (Swin, MaxViT: ``S2.B05.H03``) by (stage, block within the stage), which is the order of their
    global layer index (stored labels keep only the string form, so the global index itself is
    not available here).

    Raises:
        InputError: ``layers`` below 1.
    """
    from ...core.labels import parse_label

    if layers is not None and layers < 1:
        raise InputError(f"--layers must be at least 1, got {layers}")
    parsed = [parse_label(name) for name in labels]
    heads = [i for i, lab in enumerate(parsed) if lab.kind == "head"]
    if layers is None:
        return heads

    def block(i: int) -> tuple[int, int]:
        lab = parsed[i]
        if lab.stage is not None and lab.block is not None:
            return (lab.stage, lab.block)
        return (-1, int(lab.layer if lab.layer is not None else -1))

    last = set(sorted({block(i) for i in heads})[-layers:])
    return [i for i in heads if block(i) in last]


def aligned_moments(store: ComponentStore, align: CompAlign, components: Sequence[int]) -> RunningMoments:
    """Mean and covariance of the mapped components ``a_c = F_c c_c`` (tokens summed), for
    ``components`` only and in that order: one streaming pass over ``store`` mapping each batch with
    :meth:`CompAlign.apply <vitdecomp.interpret.align.CompAlign.apply>` (memory: one batch and ``k`` covariances
    ``[d_clip, d_clip]``)."""
    return _aligned_pass(store, align, components)[0]


def _aligned_pass(store: ComponentStore, align: CompAlign, components: Sequence[int]
                  ) -> tuple[RunningMoments, np.ndarray]:
    """:func:`aligned_moments` plus the means ``[comp, d_clip]`` of *every* mapped component (the
    reference means of the evaluation's mean-ablation), in the same pass."""
    import torch

    from ...store.component_store import RunningMoments

    idx = torch.as_tensor(list(components), dtype=torch.long)
    moments = RunningMoments(len(idx), align.d_clip, covariance=True)
    means = RunningMoments(align.n_components, align.d_clip)
    for stack in store.iter_batches():
        mapped = align.apply(stack.sum_tokens()).values  # [comp, batch, d_clip]
        moments.update(mapped.index_select(0, idx).movedim(0, 1))
        means.update(mapped.movedim(0, 1))
    return moments, means.mean


def label_store(
    store: StoreLike,
    pool: str | os.PathLike | TextPool = "descriptions",
    *,
    m: int = 5,
    rank: int | None = 80,
    dedupe: bool = False,
    layers: int | None = None,
    align: CompAlign | str | os.PathLike | None = None,
    model: Model | ModelChoice | None = None,
    evaluate: LabelEvaluation | None = None,
    progress: bool = False,
    control: bool = True,
    seed: int = 0,
) -> LabelResult:
    """Label every attention head of a finished store with the texts of a pool (TextSpan).

    One pass accumulates, per head ``i``, ``μ_i [d]`` and ``Σ_i = (1/n) Σ_x (c_i − μ_i)(c_i − μ_i)ᵀ``
    (tokens summed; of ``a_i = F_i c_i`` with ``align``); TextSpan then greedily picks ``m`` texts
    ``t`` maximising the remaining variance ``tᵀΣt/‖t‖²`` after projecting the pool on the top-``rank``
    eigenvectors of ``Σ_i + μ_iμ_iᵀ``, deflating both after each pick.

    Args:
        store: a finished store or its path.
        pool: a shipped pool name, a text file, or a :class:`~vitdecomp.interpret.text.pools.TextPool`.
        m: texts per head (the evaluation runs TextSpan once with ``max(m, *m_values)``).
        rank: rank of the span projection (None: none).
        dedupe: a text labels at most one head.
        layers: only heads of the last ``layers`` blocks (:func:`last_layer_heads`).
        align: a fitted CompAlign (or its file / folder): map the components into its CLIP space first.
        model: the text tower's model (default: the store's own, rebuilt from its record; with ``align``
            the CLIP the maps were fitted to), or a :class:`~vitdecomp.interpret.inputs.ModelChoice`.
        evaluate: also score the zero-shot accuracy with each labelled head replaced by
            ``μ_i + (c_i − μ_i) B_i[:m]ᵀ B_i[:m]`` for each ``m`` of ``evaluate.m_values``, over every stored
            row with a known target, next to the unablated and mean-ablated accuracies.
        progress: a progress bar on stderr for the evaluation pass.

    Returns:
        A :class:`LabelResult` (``to_json()`` is the JSON ``vitdecomp label`` writes, without the run record).

    Raises:
        InputError: ``m < 1``, an unfinished store, maps that do not fit the store, a text width other than
            the components', or (evaluation) a store without targets or targets beyond the classes.
        UnsupportedModelError: the model has no text tower.
    """
    from ..text import text_encoder
    from ..text.pools import TextPool, load_pool

    if m < 1:
        raise InputError("--m must be at least 1")
    m_span = max([m, *(evaluate.m_values if evaluate is not None else ())])
    store = open_store(store)
    maps = open_alignment(align, store) if align is not None else None
    if isinstance(model, ModelChoice) or model is None:
        choice = model or ModelChoice()
        model = choice.for_store(store) if maps is None else choice.for_alignment(maps)
    texts = pool if isinstance(pool, TextPool) else load_pool(pool)
    embeddings = text_encoder(model).encode(texts.texts).double().numpy()
    width = store.comp_shape[-1] if maps is None else maps.d_clip
    if embeddings.shape[1] != width:
        where = "store width" if maps is None else f"CLIP width of the maps in {maps.meta.get('file', 'the alignment')}"
        raise InputError(f"text width {embeddings.shape[1]} of {model.name} != {where} {width}")
    labels = list(store.labels)
    heads = last_layer_heads(labels, layers)
    if maps is not None:
        moments, all_means = _aligned_pass(store, maps, heads)
        span_labels, order = [labels[i] for i in heads], None
    else:
        moments, span_labels, order = store.compute_moments(covariance=True), labels, heads
        all_means = moments.mean
    results = textspan_heads(moments, span_labels, texts.texts, embeddings, components=order, m=m_span, rank=rank,
                             dedupe=dedupe)
    result = LabelResult(store=store, model=model.name, weights=model.weights, pool=texts, m=m_span, rank=rank,
                         dedupe=dedupe, heads=results, alignment=maps)
    if control:
        # the published control: the same greedy selection over a pool of as many random unit vectors
        rng = np.random.default_rng(seed)
        random_pool = rng.standard_normal(embeddings.shape)
        random_pool /= np.linalg.norm(random_pool, axis=1, keepdims=True)
        names = [f"random {j}" for j in range(random_pool.shape[0])]
        ctrl = textspan_heads(moments, span_labels, names, random_pool, components=order, m=m_span, rank=rank)
        result.control = {r.label: list(r.cumulative_variance_explained) for r in ctrl}
    if maps is not None and "file" in maps.meta:
        result.files["align"] = maps.meta["file"]
    if evaluate is not None:
        if isinstance(evaluate.classes, (str, os.PathLike)):
            result.files["classes"] = evaluate.classes
        result.evaluation = _evaluate(store, maps, model, results, all_means, evaluate, progress)
    return result


def _evaluate(store: ComponentStore, align: CompAlign | None, model: Model, results: list[SpanResult],
              all_means: Any, options: LabelEvaluation, progress: bool) -> dict[str, Any]:
    """Zero-shot accuracy of the TextSpan reconstructions (:func:`reconstruction_accuracy`) over the store's
    rows with a known target, in the space the heads were labelled in (the store's, or the CLIP space of
    the maps)."""
    import torch

    from ..text import resolve_templates, text_encoder, zero_shot_head

    if isinstance(options.classes, (str, os.PathLike)):
        classes, where = read_classes(options.classes), str(options.classes)
    else:
        classes, where = [str(c) for c in options.classes], "the class list"
    templates = resolve_templates(options.templates)
    head = zero_shot_head(text_encoder(model), classes, templates).to(torch.float64)
    all_targets = store.targets(slice(None))
    if not (all_targets >= 0).any():
        raise InputError(f"{store.path} has no class targets (decompose a labelled dataset, e.g. a class folder)")
    if int(all_targets.max()) >= len(classes):
        raise InputError(f"{store.path} has targets up to {int(all_targets.max())} but {where} lists "
                         f"{len(classes)} classes")

    def batches() -> Iterator[tuple[ComponentStack, torch.Tensor]]:
        for stack in iter_store_batches(store, desc=f"evaluate {store.path.name}", progress=progress):
            rows = np.asarray(stack.meta["rows"], dtype=np.int64)
            stack = stack.sum_tokens()
            yield (stack if align is None else align.apply(stack)), torch.as_tensor(store.targets(rows))

    out = reconstruction_accuracy(batches(), results, head, m_values=list(options.m_values), earlier=options.earlier,
                                  means=all_means)
    return {"classes": classes, "templates": list(templates), "rows": "every stored row with a known target (the "
            "rows TextSpan was computed on, as the published protocol)", **out}


def format_evaluation(ev: dict[str, Any]) -> str:
    """Plain-text summary of a :func:`label_store` evaluation (``LabelResult.evaluation``)."""
    def pct(entry: dict[str, Any] | None) -> str:
        return "n/a" if entry is None or entry["accuracy"] is None else f"{100 * entry['accuracy']:.1f}%"

    lines = [f"zero-shot accuracy, {len(ev['analysed'])} heads replaced by their TextSpan reconstruction "
             f"({ev['n']} images, {ev['n_classes']} classes; earlier heads: {ev['earlier']}"
             f"{', ' + str(len(ev['earlier_ablated'])) + ' mean-ablated' if ev['earlier_ablated'] else ''})",
             f"  {'unablated':<24}{pct(ev['unablated'])}"]
    if ev["analysed_kept"] is not None:
        lines.append(f"  {'earlier heads ablated':<24}{pct(ev['analysed_kept'])}")
    lines.append(f"  {'heads at their mean':<24}{pct(ev['mean_ablated'])}")
    for row in ev["by_m"]:
        note = f"  ({row['heads_short']} heads have fewer texts)" if row["heads_short"] else ""
        lines.append(f"  {'m = ' + str(row['m']):<24}{pct(row)}{note}")
    return "\n".join(lines)
