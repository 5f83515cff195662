"""Ground-truth benchmark of the synthetic world (``vitdecomp synth bench``).

Every image of the synthetic world has known factors (shape, colour, pattern, size, position,
background) and exact object masks, so the claims of the method can be measured instead of shown:

* **Components per factor.** A tiny CLIP's head-level decomposition ``z = sum_i c_i`` is scored
  per factor with the streamed correlation score of :mod:`vitdecomp.interpret.score` (docs/method.md §4; the
  factor's texts are :func:`~vitdecomp.synth.generator.describe` phrases). *Factor agreement*:
  zero-shot accuracy of the factor read from the sum of the top-k components alone, against the
  full representation, the top-k components of the *other* factors and k random components.
* **Retrieval by feature** (docs/method.md §6.3): precision@10 of image -> image retrieval (cosine of
  ``z_p(x) = sum_{i in top-k selective} c_i(x)``) where a hit shares the query's value of the
  factor, against the full representation and k random components.
* **Zero-shot segmentation** (docs/method.md §6.5 metrics): the decomposition's token map
  ``m_t = <sum_i c_{i,t}, y_pred - mean_c y_c>`` over the shape texts against the exact
  object masks, against raw last-layer attention and attention rollout in the same harness.
* **Spurious cue** (docs/method.md §6.6, :mod:`vitdecomp.apps.debias`): Waterbirds in the synthetic world
  (class = a group of patterns, place = background), a linear head on the CLIP representation
  trained on a split where the place goes with the class 95 % of the time; components selected on
  a group-balanced *val* set by the contrastive correlation score (background texts minus pattern
  texts), mean-ablated with val means; worst-group and average-group accuracy on a separate
  balanced *test* set, against random components of the same count (mean ± sd and max over draws)
  and the top components by val variance. A second row ablates components of the tiny classifier
  trained end to end on the biased split: it learned the background only, so ablation cannot add
  class information (a negative result, kept as such).

Scenes come from their own seed stream (:data:`BENCH_SEED`), disjoint from training and from
the held-out evaluation of :mod:`vitdecomp.synth.train`.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .generator import SCENE_FACTORS, VOCABULARY, Scene, describe, render_array, sample_scene

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from ..core.model import Model
    from ..core.stack import ComponentStack

__all__ = ["BENCH_SEED", "BenchConfig", "Sample", "make_sample", "factor_values", "decompose_sample",
           "factor_texts", "component_scores", "factor_agreement", "retrieval_precision", "segmentation_bench", "decomposition_map", "SEGMENT_TEXTS",
           "spurious_bench", "classifier_spurious_bench", "run_clip_bench", "balanced_labeller", "aligned_labeller",
           "aligned_bench", "run_bench", "SPURIOUS_TASK", "SPURIOUS_ALIGNED", "SPURIOUS_STREAMS", "CLASSIFIER_NOTE"]

log = logging.getLogger(__name__)

#: Text sets whose decomposition maps are scored in the segmentation benchmark (object factors).
SEGMENT_TEXTS: tuple[str, ...] = ("colour", "shape")
#: Seed of the benchmark's scenes (its own stream).
BENCH_SEED = 424_242


@dataclass
class BenchConfig:
    """Sizes of the benchmark; the defaults run in a few minutes on a 2-core CPU."""

    n_images: int = 600
    top_k: int = 3
    n_queries: int = 200
    precision_at: int = 10
    n_random: int = 10
    n_segment: int = 100
    n_spurious: int = 400  # scenes per split (train, val, test) of the spurious cue
    batch_size: int = 100
    seed: int = BENCH_SEED


@dataclass
class Sample:
    """Rendered scenes: ``images`` uint8 ``[n, 64, 64, 3]``, ``masks`` bool ``[n, 64, 64]`` (all objects)."""

    scenes: list[Scene]
    images: np.ndarray
    masks: np.ndarray
    labels: list[int] = field(default_factory=list)


def make_sample(n: int, seed: int, stream: int = 7, labeller: Any = None) -> Sample:
    """``n`` one-object scenes, scene ``k`` from ``default_rng([seed, stream, k])``.

    ``labeller(rng, k) -> (scene, label)`` draws labelled scenes instead (see :func:`balanced_labeller`).
    """
    scenes, labels, images, masks = [], [], [], []
    for k in range(n):
        rng = np.random.default_rng([seed, stream, k])
        scene, label = labeller(rng, k) if labeller is not None else (sample_scene(rng), -1)
        image, object_masks = render_array(scene)
        scenes.append(scene)
        labels.append(label)
        images.append(image)
        masks.append(np.logical_or.reduce(object_masks))
    return Sample(scenes, np.stack(images), np.stack(masks), labels)


def balanced_labeller(task: str, groups: Sequence[Sequence[str]]) -> Any:
    """Labeller of the spurious task with exactly balanced groups: item ``k`` has ``y = k % 2`` and
    place ``(k // 2) % 2`` (0 land, 1 water), the task value drawn from class ``y``'s group."""
    from .dataset import PLACES
    from .generator import pick

    def label(rng: np.random.Generator, k: int) -> tuple[Scene, int]:
        y, place = k % 2, (k // 2) % 2
        return sample_scene(rng, fixed={task: pick(rng, groups[y]), "background": PLACES[place]}), y

    return label


def factor_values(scenes: Sequence[Scene], factor: str) -> np.ndarray:
    """Index of each scene's value of ``factor`` in ``VOCABULARY[factor]``: int ``[n]``."""
    values = VOCABULARY[factor]
    return np.array([values.index(s.background if factor == "background" else getattr(s.main, factor))
                     for s in scenes])


def model_pixels(model: Model, images: np.ndarray) -> torch.Tensor:
    import torch
    from PIL import Image

    return torch.stack([model.transform(Image.fromarray(im)) for im in images])


def decompose_sample(model: Model, images: np.ndarray, *, batch_size: int = 100, **kwargs: Any) -> ComponentStack:
    """Head-level decomposition of all ``images`` (batched), one stack ``[comp, n, d]`` (checked)."""
    from ..core.decomposition import decompose
    from ..core.stack import ComponentStack

    parts = [decompose(model, model_pixels(model, images[i:i + batch_size]), **kwargs)
             for i in range(0, len(images), batch_size)]
    return ComponentStack.concat(parts)


def factor_texts(encoder: Any, factors: Sequence[str] = SCENE_FACTORS) -> dict[str, np.ndarray]:
    """Unit text embeddings ``[n_values, d]`` of every factor's :func:`describe` phrases."""
    return {f: encoder.encode([describe(f, v) for v in VOCABULARY[f]]).double().numpy() for f in factors}


def component_scores(stack: ComponentStack, texts: dict[str, np.ndarray]) -> Any:
    """Correlation-score table (components x factors) from streamed moments of ``stack``."""
    from ..interpret.score import ScoreMoments, feature_basis, score_table

    moments = ScoreMoments.from_stack(stack)
    return score_table(moments, {f: feature_basis(t) for f, t in texts.items()}, kind="corr")


def _rows(table: Any, names: Sequence[str]) -> list[int]:
    index = {str(lab): i for i, lab in enumerate(table.labels)}
    return [index[n] for n in names]


def _zero_shot(z: np.ndarray, text: np.ndarray) -> np.ndarray:
    return (z @ text.T).argmax(1)


def _selectable(labels: Sequence[Any]) -> np.ndarray:
    """Rows that can be selected: the components that compute something from the input
    (:data:`vitdecomp.core.labels.INPUT_KINDS`), never embed / bias rows."""
    from ..core.labels import kind_mask

    return kind_mask(labels, "input")


def _scorable(table: Any) -> np.ndarray:
    return _selectable(table.labels)


def _top(table: Any, factor: str, k: int, *, by: str = "score") -> list[int]:
    from ..apps.retrieve import top_components

    return top_components(table, factor, k, by=by)  # type: ignore[arg-type]


def _random_sets(n_rows: int, allowed: np.ndarray, k: int, draws: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    pool = np.flatnonzero(allowed)
    return [sorted(rng.choice(pool, size=k, replace=False).tolist()) for _ in range(draws)]


def factor_agreement(values: np.ndarray, table: Any, texts: dict[str, np.ndarray], truth: dict[str, np.ndarray], *,
                     k: int = 3, n_random: int = 10, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per factor: zero-shot accuracy read from the top-k components (by score) vs baselines.

    ``values`` is the stack ``[comp, n, d]`` as float64 numpy. Returns, per factor, ``top_k``
    (accuracy of ``sum_{top-k} c_i``), ``full`` (of ``z``), ``other_top_k`` (mean over the other
    factors' top-k sets), ``random_k`` (mean and sd over random sets), ``chance``, and the
    ``components`` chosen.
    """
    z = values.sum(0)
    allowed = _scorable(table)
    tops = {f: _top(table, f, k) for f in texts}
    randoms = _random_sets(len(values), allowed, k, n_random, seed)
    out: dict[str, dict[str, Any]] = {}
    for f, text in texts.items():
        acc = lambda rows: float(np.mean(_zero_shot(values[rows].sum(0), text) == truth[f]))  # noqa: E731
        rand = [acc(r) for r in randoms]
        out[f] = {
            "components": [str(table.labels[i]) for i in tops[f]],
            "top_k": acc(tops[f]),
            "full": float(np.mean(_zero_shot(z, text) == truth[f])),
            "other_top_k": float(np.mean([acc(tops[g]) for g in texts if g != f])),
            "random_k": {"mean": float(np.mean(rand)), "sd": float(np.std(rand))},
            "chance": 1.0 / len(text),
        }
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _precision(features: np.ndarray, labels: np.ndarray, queries: np.ndarray, at: int) -> float:
    from ..apps.retrieve import exact_search, precision_at_k

    f = _unit(features)
    nearest, _ = exact_search(f, f[queries], at, exclude=queries)  # never retrieves the query itself
    return precision_at_k(nearest, labels, labels[queries])


def retrieval_precision(values: np.ndarray, table: Any, truth: dict[str, np.ndarray], *, k: int = 3, at: int = 10,
                        n_queries: int = 200, n_random: int = 10, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per factor: precision@``at`` of image retrieval with the top-k selective components vs baselines.

    A retrieved image is a hit when it shares the query's value of the factor. Baselines: the
    full representation ``z`` and random k-component sums (mean ± sd over draws); ``base_rate``
    is the precision of a random ranking.
    """
    n = values.shape[1]
    queries = np.random.default_rng([seed, 1]).choice(n, size=min(n_queries, n), replace=False)
    randoms = _random_sets(len(values), _scorable(table), k, n_random, seed)
    z = values.sum(0)
    out: dict[str, dict[str, Any]] = {}
    for f, labels in truth.items():
        rows = _top(table, f, k, by="selectivity")
        rand = [_precision(values[r].sum(0), labels, queries, at) for r in randoms]
        out[f] = {
            "components": [str(table.labels[i]) for i in rows],
            "top_k": _precision(values[rows].sum(0), labels, queries, at),
            "full": _precision(z, labels, queries, at),
            "random_k": {"mean": float(np.mean(rand)), "sd": float(np.std(rand))},
            "base_rate": float(np.mean([np.mean(labels == labels[q]) for q in queries])),
        }
    return out


def segmentation_bench(model: Model, sample: Sample, text_sets: dict[str, np.ndarray], *, batch_size: int = 50) -> dict[
        str, dict[str, float]]:
    """Zero-shot segmentation of the objects: decomposition token maps vs raw attention vs rollout.

    For each named text set (e.g. the colour or the shape phrases, ``[V, d]`` unit rows), the
    decomposition map is the CLIP paper's (docs/method.md §6.5): ``m_t = <sum_{l,h} c_{l,h,t}, y_pred -
    mean_c y_c>`` with ``pred`` the model's own zero-shot choice in that set; its row is
    ``"decomposition (NAME texts)"``. Every map is upsampled bilinearly to the image size and
    scored with :class:`~vitdecomp.apps.segmentation.metrics.SegmentationMetrics` against the exact union of
    the object masks.
    """
    import torch
    import torch.nn.functional as F

    from ..apps.segmentation.attention import raw_attention, rollout
    from ..apps.segmentation.metrics import SegmentationMetrics

    names = [f"decomposition ({name} texts)" for name in text_sets]
    metrics = {name: SegmentationMetrics() for name in (*names, "raw_attention", "rollout")}
    size = sample.images.shape[1:3]
    for i in range(0, len(sample.images), batch_size):
        x = model_pixels(model, sample.images[i:i + batch_size])
        maps = {"raw_attention": raw_attention(model, x), "rollout": rollout(model, x)}
        for name, texts in zip(names, text_sets.values()):
            maps[name] = decomposition_map(model, x, torch.from_numpy(texts).float())
        for name, grid in maps.items():
            up = F.interpolate(grid[:, None].double(), size=size, mode="bilinear", align_corners=False)[:, 0]
            for b in range(up.shape[0]):
                metrics[name].update(up[b].numpy(), sample.masks[i + b])
    return {name: m.result() for name, m in metrics.items()}


def decomposition_map(model: Model, x: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """``[B, gh, gw]``: each patch's contribution through all heads to ``y_pred - mean_c y_c``.

    ``texts`` ``[V, d]``; ``pred`` is the model's own argmax over them. The map of the
    segmentation harness, :func:`vitdecomp.apps.segmentation.harness.decomposition_map`.
    """
    from ..apps.segmentation.harness import decomposition_map as contrastive_map

    return contrastive_map(model, x, texts)


#: Spurious-cue setting of the benchmark (:func:`spurious_bench`): the class is a group of patterns.
SPURIOUS_TASK = "pattern"
#: Share of the generated train split whose place goes with the class (val and test are balanced).
SPURIOUS_ALIGNED = 0.95
#: Streams of the spurious-cue splits (train, val, test) under the bench seed.
SPURIOUS_STREAMS: dict[str, int] = {"train": 10, "val": 11, "test": 12}
CLASSIFIER_NOTE = ("classifier trained on the biased split: learned background only — ablation cannot add class "
                   "information")


def aligned_labeller(task: str, groups: Sequence[Sequence[str]], aligned: float, n: int) -> Any:
    """Labeller of a biased split of ``n`` items: item ``k`` has ``y = k % 2``; of the ``n_y`` items of class
    ``y``, the first ``round(aligned * n_y)`` (half up, as :func:`~vitdecomp.synth.dataset.generate_dataset`)
    get place ``y``, the rest ``1 - y``; the task value is drawn from class ``y``'s group."""
    from .dataset import PLACES
    from .generator import pick

    if not 0.0 <= aligned <= 1.0:
        from ..errors import InputError

        raise InputError(f"the aligned share must be in [0, 1], got {aligned}")
    counts = [len(range(y, n, 2)) for y in (0, 1)]
    cut = [int(np.floor(aligned * c + 0.5)) for c in counts]

    def label(rng: np.random.Generator, k: int) -> tuple[Scene, int]:
        y, j = k % 2, k // 2
        place = y if j < cut[y] else 1 - y
        return sample_scene(rng, fixed={task: pick(rng, groups[y]), "background": PLACES[place]}), y

    return label


def _labelled_split(model: Model, n: int, seed: int, stream: int, labeller: Any, batch_size: int) -> Any:
    """Generate, decompose and label one split: a :class:`~vitdecomp.apps.debias.StackSplit`."""
    from ..apps.debias import StackSplit
    from .dataset import PLACES

    sample = make_sample(n, seed, stream, labeller)
    stack = decompose_sample(model, sample.images, batch_size=batch_size)
    place = np.array([PLACES.index(s.background) for s in sample.scenes])
    return StackSplit(stack, np.array(sample.labels), place, tuple(f"{stream}:{k}" for k in range(n)))


def spurious_bench(clip: Model, classifier: Model | None = None, *, task: str = SPURIOUS_TASK,
                   groups: Sequence[Sequence[str]] | None = None, n_train: int = 200, n: int = 200,
                   aligned: float = SPURIOUS_ALIGNED, k: int = 3, n_random: int = 10, seed: int = BENCH_SEED,
                   batch_size: int = 100, templates: str = "synth", n_classifier: int | None = None) -> dict[str, Any]:
    """Remove the background cue from a linear head on the CLIP representation (docs/method.md §6.6, :mod:`vitdecomp.apps.debias`).

    Waterbirds layout in memory: class ``y`` = the ``task`` value's group (default pattern: {solid,
    dotted} vs {striped, checkered}), place = background (land / water). A *train* split of
    ``n_train`` scenes has the place aligned with ``y`` in ``aligned`` of each class
    (:func:`aligned_labeller`); *val* and *test* (``n`` scenes each) are exactly balanced over the
    four groups (:func:`balanced_labeller`). All three are decomposed at head level with ``clip``.
    Then :func:`vitdecomp.apps.debias.debias_stacks`: a logistic-regression head on ``z = Σ_i c_i`` of
    train; the top-``k`` candidates by the contrastive score ``s_{i,background} − s_{i,task}``
    (correlation score, texts :func:`describe` of every background and every task value,
    ``templates``) on val; mean-ablation with val means; worst-group / average-group (unweighted)
    / weighted accuracy on test, against ``n_random`` draws of ``k`` random candidates (mean, sd,
    max) and the top-``k`` by val variance.

    With ``classifier`` (the shipped tiny classifier trained on the biased split) its result is
    added under ``"classifier"`` (:func:`classifier_spurious_bench` on ``n_classifier`` scenes per
    split, default ``n``): that model learned the background only, so ablation cannot add class
    information (an honest negative result, see :data:`CLASSIFIER_NOTE`).

    Returns the :meth:`~vitdecomp.apps.debias.DebiasResult.to_json` payload with ``before`` (no ablation)
    and ``after`` (the selected set ablated), plus the setting.
    """
    from ..apps.debias import debias_stacks, embed_texts, fit_linear_head_stack
    from ..errors import InputError
    from ..interpret.text import text_encoder
    from .dataset import check_groups
    from .generator import canonical_factor

    task = canonical_factor(task)
    pair = check_groups(task, groups)
    if min(n_train, n) < 8:
        raise InputError(f"the spurious-cue splits need at least 8 scenes each, got train {n_train}, val/test {n}")
    splits = {}
    for name, size, labeller in (("train", n_train, aligned_labeller(task, pair, aligned, n_train)),
                                 ("val", n, balanced_labeller(task, pair)), ("test", n, balanced_labeller(task, pair))):
        splits[name] = _labelled_split(clip, size, seed, SPURIOUS_STREAMS[name], labeller, batch_size)
    class_names = tuple("/".join(g) for g in pair)
    head = fit_linear_head_stack(splits["train"], seed=0, class_names=class_names)
    encoder = text_encoder(clip)
    spurious_texts = [describe("background", v) for v in VOCABULARY["background"]]
    core_texts = [describe(task, v) for v in VOCABULARY[task]]
    result = debias_stacks(splits["val"], splits["test"], head, k=k, random_draws=n_random, seed=seed,
                           spurious=embed_texts(encoder, spurious_texts, templates),
                           core=embed_texts(encoder, core_texts, templates))
    out = result.to_json()
    out["before"], out["after"] = out.pop("baseline"), out.pop("ablated")
    train = splits["train"]
    out.update({
        "model": clip.name, "task": task, "groups": [list(g) for g in pair], "aligned": aligned,
        "train_aligned_share": float(np.mean(train.y == train.place)),
        "texts": {"spurious": spurious_texts, "core": core_texts, "templates": templates},
        "n_train": n_train, "n_val": n, "n_test": n, "table": result.format_table(),
    })
    if classifier is not None:
        info = classifier.extras.get("tiny", {})
        out["classifier"] = {
            "model": classifier.name, "note": CLASSIFIER_NOTE,
            **classifier_spurious_bench(classifier, task=info.get("task", "shape"), groups=info["groups"],
                                        n=n_classifier or n, k=k, n_random=n_random, seed=seed,
                                        batch_size=batch_size)}
    return out


def classifier_spurious_bench(model: Model, *, task: str, groups: Sequence[Sequence[str]], n: int = 600, k: int = 3,
                              n_random: int = 10, seed: int = BENCH_SEED, batch_size: int = 100) -> dict[str, Any]:
    """Mean-ablate components of a model's own classifier (the tiny one trained on the biased split).

    Val and test sets are exactly balanced over the four (y, place) groups (:func:`balanced_labeller`). Selection on val only:
    ``s_i = |r(l_i, place)| - |r(l_i, y)|`` with ``l_i = (w_1 - w_0) . c_i(x)`` the component's
    share of the logit difference. Ablation replaces ``c_i(x)`` by its val mean. Reports, on
    test, worst-group / average-group (unweighted) / sample-weighted accuracy before and after,
    and the same after ablating ``k`` random components (``n_random`` draws: mean, sd, max).
    """
    from ..interpret.ablate import ablate
    from ..apps.debias import random_sets, top_k
    from .dataset import PLACES
    from .train import group_accuracy

    head = model.classifier()
    if head is None:
        from ..errors import InputError

        raise InputError(f"{model.name} has no linear classifier head to debias")
    w = head[0].detach().double().numpy()
    b = head[1].detach().double().numpy() if head[1] is not None else np.zeros(w.shape[0])
    labeller = balanced_labeller(task, groups)
    data = {}
    for split, stream in (("val", 11), ("test", 12)):
        sample = make_sample(n, seed, stream, labeller)
        stack = decompose_sample(model, sample.images, batch_size=batch_size)
        y = np.array(sample.labels)
        place = np.array([PLACES.index(s.background) for s in sample.scenes])
        data[split] = (stack, y, place)
    val, y_val, place_val = data["val"]
    test, y_test, place_test = data["test"]
    labels = val.labels
    diff = w[1] - w[0]
    logit_share = val.values.double().numpy() @ diff  # [comp, n]
    scores = np.array([_abs_corr(l, place_val) - _abs_corr(l, y_val) for l in logit_share])
    allowed = _selectable(labels)
    scores[~allowed] = -np.inf
    chosen = top_k(scores, allowed, k)
    def evaluate(rows: Sequence[int]) -> dict[str, Any]:
        z = ablate(test, [int(i) for i in rows], mode="mean", reference=val).numpy()  # val means
        return group_accuracy((z @ w.T + b).argmax(1), y_test, place_test)

    random_runs = [evaluate(rows) for rows in random_sets(np.random.default_rng([seed, 13]), allowed, k, n_random)]
    wga = [r["worst_group"] for r in random_runs]
    return {
        "selected": [str(labels[i]) for i in chosen],
        "selection_scores": {str(labels[i]): float(scores[i]) for i in chosen},
        "before": evaluate([]),
        "after": evaluate(chosen),
        "random": {"worst_group_mean": float(np.mean(wga)), "worst_group_sd": float(np.std(wga)),
                   "worst_group_max": float(np.max(wga)),
                   "average_group_mean": float(np.mean([r["average_group"] for r in random_runs]))},
        "k": k, "n_val": n, "n_test": n, "selection_split": "val", "evaluation_split": "test",
    }


def _abs_corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a @ a) * (b @ b))
    return float(abs(a @ b) / den) if den > 0 else 0.0


def run_clip_bench(model: Model, config: BenchConfig | None = None) -> dict[str, Any]:
    """The CLIP part of the benchmark: component scores, factor agreement, retrieval, segmentation."""
    from ..interpret.text import text_encoder

    cfg = config or BenchConfig()
    start = time.perf_counter()
    sample = make_sample(cfg.n_images, cfg.seed)
    stack = decompose_sample(model, sample.images, batch_size=cfg.batch_size)
    encoder = text_encoder(model)
    texts = factor_texts(encoder)
    table = component_scores(stack, texts)
    truth = {f: factor_values(sample.scenes, f) for f in texts}
    values = stack.values.double().numpy()
    result: dict[str, Any] = {
        "model": model.name, "n_images": cfg.n_images, "k": cfg.top_k, "n_components": len(stack.labels),
        "decomposition_error": stack.error(),
        "factor_agreement": factor_agreement(values, table, texts, truth, k=cfg.top_k, n_random=cfg.n_random,
                                             seed=cfg.seed),
        "retrieval": retrieval_precision(values, table, truth, k=cfg.top_k, at=cfg.precision_at,
                                         n_queries=cfg.n_queries, n_random=cfg.n_random, seed=cfg.seed),
        "scores": table.to_json(),
    }
    seg_sample = make_sample(cfg.n_segment, cfg.seed, stream=8)
    result["segmentation"] = segmentation_bench(model, seg_sample, {f: texts[f] for f in SEGMENT_TEXTS},
                                                batch_size=cfg.batch_size // 2)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def aligned_bench(model: Model, clip: Model, sample: Sample, texts: dict[str, np.ndarray], *, k: int = 3,
                  n_random: int = 10, seed: int = BENCH_SEED, batch_size: int = 100, epochs: int = 30) -> dict[
        str, Any]:
    """Read a non-CLIP model with text through CompAlign (docs/method.md §3), then check it against the factors.

    The model's head-level decomposition of ``sample`` is mapped into the tiny CLIP's image space by
    per-component linear maps fitted (paper objective: cosine + lambda ||F^T F - I||) to the CLIP
    image embeddings of the same scenes, on a hashed train split with early stopping on the val
    split. Reports the val cosine, the orthogonality defect of the maps, and the factor agreement
    of the aligned components (as :func:`factor_agreement`, with the aligned sum as "full").
    """
    import torch

    from ..interpret.align import AlignConfig, fit_compalign, validation_mask

    stack = decompose_sample(model, sample.images, batch_size=batch_size)
    with torch.no_grad():
        targets = torch.cat([clip.representation(model_pixels(clip, sample.images[i:i + batch_size]))
                             for i in range(0, len(sample.images), batch_size)]).float()
    values = stack.values.float().movedim(0, 1)  # [n, comp, d]
    rows = torch.arange(values.shape[0])

    def batches() -> Any:
        for i in range(0, values.shape[0], 64):
            yield values[i:i + 64], targets[i:i + 64], rows[i:i + 64]

    config = AlignConfig(epochs=epochs, batch_size=32, lr=3e-3, patience=3, seed=seed)
    align = fit_compalign(batches, len(stack.labels), stack.dim, int(targets.shape[1]), config,
                          labels=[str(x) for x in stack.labels])
    metrics = align.metrics(batches, split="val")
    aligned = align.apply(stack)
    table = component_scores(aligned, texts)
    val = validation_mask(np.arange(values.shape[0]), seed, config.val_fraction)
    truth = {f: factor_values(sample.scenes, f) for f in texts}
    aligned_values = aligned.values.double().numpy()
    return {
        "model": model.name, "clip": clip.name, "n_images": len(sample.images), "n_val": int(val.sum()),
        "val_cosine": metrics["cosine"], "defect_max": metrics["defect_max"],
        "factor_agreement": factor_agreement(aligned_values, table, texts, truth, k=k, n_random=n_random, seed=seed),
        "scores": table.to_json(),
    }


def run_bench(config: BenchConfig | None = None, weights: str | Path | None = None) -> dict[str, Any]:
    """``vitdecomp synth bench``: the whole ground-truth benchmark on the tiny models.

    The CLIP part (:func:`run_clip_bench`: factor agreement, retrieval precision@10, segmentation IoU),
    the spurious cue (:func:`spurious_bench`: worst-group accuracy before / after mean-ablating the
    components selected on val, against random and top-variance controls, plus the tiny classifier
    trained on the biased split) and CompAlign reads of the tiny Swin (``"aligned"``) and ViT
    (``"aligned_vit"``) in the CLIP's space (:func:`aligned_bench`); ``"models"`` records each model's
    sidecar.

    Args:
        config: the sizes (default :class:`BenchConfig`).
        weights: a folder with ``clip/``, ``spurious/``, ``swin/`` and ``vit/`` tiny models (as
            ``vitdecomp synth train`` writes them) instead of the shipped ones.
    """
    from ..core.shipped import load_shipped
    from ..errors import InputError
    from ..interpret.text import text_encoder

    cfg = config or BenchConfig()
    for name in ("n_images", "n_segment", "n_spurious"):
        if getattr(cfg, name) < 20:
            raise InputError(f"--{name.replace('_', '-')} ({name}) must be at least 20")
    clip = load_shipped("clip", weights)
    result = run_clip_bench(clip, cfg)
    classifier = load_shipped("spurious", weights)
    info = classifier.extras["tiny"]
    result["spurious"] = spurious_bench(clip, classifier, n_train=cfg.n_spurious, n=cfg.n_spurious, k=cfg.top_k,
                                        n_random=cfg.n_random, seed=cfg.seed, batch_size=cfg.batch_size)
    sample, texts = make_sample(cfg.n_images, cfg.seed), factor_texts(text_encoder(clip))
    swin, vit = load_shipped("swin", weights), load_shipped("vit", weights)
    result["aligned"] = aligned_bench(swin, clip, sample, texts, k=cfg.top_k, seed=cfg.seed)
    result["aligned_vit"] = aligned_bench(vit, clip, sample, texts, k=cfg.top_k, seed=cfg.seed)
    result["models"] = {"clip": clip.extras["tiny"], "spurious": info, "swin": swin.extras["tiny"],
                        "vit": vit.extras["tiny"]}
    return result
