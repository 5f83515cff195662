"""The main job: ``vitdecomp demo``, the whole pipeline on the shipped tiny models, as an HTML report.

:func:`run_demo` (offline, CPU; about 15 s on 2 cores at the default size, 8 s with
:meth:`DemoConfig.quick`, see docs/benchmarks.md) on the synthetic world:

1. decompose a tiny CLIP's image representation into every head, MLP and the embedding, and
   check that the parts add up;
2. read each known factor zero-shot with text, and label every head with TextSpan (docs/method.md §5)
   over a pool of the world's phrases;
3. rank components per factor (docs/method.md §4 correlation score) and measure, against the known
   factors, factor agreement and retrieval by feature (:mod:`vitdecomp.synth.bench`);
4. token heatmaps and zero-shot segmentation against the exact masks, with raw attention and
   rollout as baselines;
5. remove a background cue (docs/method.md §6.6, :mod:`vitdecomp.apps.debias`): a linear head on the tiny CLIP's
   representation trained where the class goes with the background, its background components
   found on val and mean-ablated; and, as a negative result, the tiny classifier trained on such a
   split, which learned the background only.

With ``model=SPEC, images=DIR`` the same report is made for a real model and real images, as far
as the model allows: without a text tower (a timm classifier) the text sections are replaced by
the classifier's own class directions, and sections that need known factors are left out with a
note saying why.

Writes ``report.html`` (self-contained: figures embedded, opens from disk) and ``results.json``
under ``out_dir``; returns the results. Each stage logs one INFO line with its time on the
``vitdecomp.synth.demo`` logger (``[4/10] TextSpan labels ... 0.1 s``; ``vitdecomp demo`` shows them
on stderr), and ``results["stage_seconds"]`` keeps the times. Text embeddings come from the
on-disk cache (:mod:`vitdecomp.interpret.text.cache`), so a real CLIP's pool is encoded on the first run only.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..core.model import Model
    from ..report import Report, Section

__all__ = ["DemoConfig", "run_demo", "SECTIONS"]

log = logging.getLogger(__name__)

#: Section ids of the synthetic-world report, in order.
SECTIONS: tuple[str, ...] = ("model", "zero-shot", "textspan", "components", "agreement", "retrieval", "heatmaps",
                             "spurious", "aligned")


@dataclass
class DemoConfig:
    """Sizes of the demo (the defaults take about 15 s on a 2-core CPU, :meth:`quick` about 8 s)."""

    n_images: int = 600
    n_segment: int = 100
    n_spurious: int = 200  # scenes per split (train, val, test) of the spurious cue
    n_heatmaps: int = 4
    textspan_texts: int = 3
    top_k: int = 3
    n_random: int = 10  # draws of k random components, the baseline of agreement, retrieval and the spurious cue
    n_null: int = 200  # random caption bases per factor: the null of every component score
    align_epochs: int = 30  # CompAlign (the Swin section): most epochs (early stopping on val)
    torch_threads: int | None = 1  # synthetic world: tiny models run faster on one thread (None: torch's own)
    quick_mode: bool = False  # made by DemoConfig.quick(): the report says so
    seed: int = 424_242
    weights: str | Path | None = None  # folder holding clip/ and spurious/ (default: the shipped models)
    pretrained: bool = True  # --model: the library's pretrained weights (False: random weights, offline)
    pool: str = "descriptions"  # --model with a text tower: the TextSpan pool
    textspan_layers: int = 2  # --model with a text tower: TextSpan over the heads of the last N layers
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def quick(cls) -> DemoConfig:
        """Small settings for tests and a first look: a fifth of the scenes (sections and baselines all kept)."""
        return cls(n_images=120, n_segment=20, n_spurious=64, n_heatmaps=2, n_null=100, quick_mode=True)

    @classmethod
    def for_run(cls, *, quick: bool = False, model: str | None = None, n_images: int | None = None,
                pretrained: bool = True, weights: str | Path | None = None) -> DemoConfig:
        """The settings ``vitdecomp demo`` runs with: :meth:`quick` or the defaults, 64 images for a real
        ``model``, ``n_images`` (at least 20) when given, random weights (``pretrained=False``, with a
        ``model`` only) and a folder of tiny models (``weights``) instead of the shipped ones.

        Raises:
            InputError: fewer than 20 images, or ``pretrained=False`` without a model.
        """
        from ..errors import InputError

        cfg = cls.quick() if quick else cls()
        if model is not None:
            cfg.n_images = 64
        if n_images is not None:
            if n_images < 20:
                raise InputError("--n-images must be at least 20")
            cfg.n_images = n_images
        cfg.weights = weights
        if not pretrained:
            if model is None:
                raise InputError("--no-pretrained goes with --model")
            cfg.pretrained = False
        return cfg

    def describe_quick(self) -> str:
        """A sentence on what quick mode leaves out ('' for the full settings)."""
        if not self.quick_mode:
            return ""
        full = DemoConfig()
        return (f"Quick mode (--quick): {self.n_images} scenes instead of {full.n_images}, {self.n_segment} for "
                f"segmentation instead of {full.n_segment}, {self.n_spurious} per spurious-cue split instead of "
                f"{full.n_spurious}: the numbers are noisier than the full demo's.")


class _Stages:
    """Numbered stages of a demo run: one INFO line on the ``vitdecomp.synth.demo`` logger as each ends.

    ``with stages("TextSpan labels"): ...`` logs ``[4/10] TextSpan labels ... 0.3 s`` (and a DEBUG
    line as it starts); the seconds of each stage are kept in :attr:`seconds`.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.done += 1
        index = self.done
        log.debug("[%d/%d] %s ...", index, max(self.total, index), name)
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.seconds[name] = round(seconds, 2)
        log.info("[%d/%d] %s ... %.1f s", index, max(self.total, index), name, seconds)  # total may be known now


def run_demo(out_dir: str | Path, *, model: str | None = None, images: str | Path | None = None,
             config: DemoConfig | None = None) -> dict[str, Any]:
    """Run the demo and write ``out_dir/report.html`` and ``out_dir/results.json``; returns the results.

    With neither ``model`` nor ``images``: the shipped tiny models on the synthetic world; with both: a
    model spec and a folder of images (as far as the model allows). ``config``: the sizes
    (:meth:`DemoConfig.for_run` makes the command's).

    Raises:
        InputError: ``model`` without ``images`` or the other way round.
    """
    if (model is None) != (images is None):
        from ..errors import InputError

        raise InputError("--model and --images go together")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config or DemoConfig()
    start = time.perf_counter()
    if model is None and images is None:
        stages = _Stages(11)
        with _torch_threads(cfg.torch_threads):
            report, results = _synthetic(cfg, stages)
    else:
        stages = _Stages(6)
        report, results = _real(model, images, cfg, stages)
    with stages("write the report"):
        results["seconds"] = round(time.perf_counter() - start, 1)
        results["stage_seconds"] = dict(stages.seconds)  # every stage but this one
        report.meta["seconds"] = results["seconds"]
        report.write(out / "report.html")
        (out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default) + "\n",
                                          encoding="utf-8")
    log.info("report written to %s (%.1f s in all)", out / "report.html", time.perf_counter() - start)
    return results


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside (None: unchanged), restored on exit."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


# ----------------------------------------------------------------------------- synthetic world
def _synthetic(cfg: DemoConfig, stages: _Stages | None = None) -> tuple[Report, dict[str, Any]]:
    stage = stages or _Stages(11)
    with stage("load the tiny CLIP"):
        from .. import __version__
        from ..report import Report
        from .bench import (
            SEGMENT_TEXTS,
            BenchConfig,
            component_scores,
            decompose_sample,
            factor_agreement,
            factor_texts,
            factor_values,
            make_sample,
            aligned_bench,
            retrieval_precision,
            segmentation_bench,
            spurious_bench,
        )
        from ..core.shipped import load_shipped
        from ..interpret.text import text_encoder

        clip = load_shipped("clip", cfg.weights)
        bench = BenchConfig(n_images=cfg.n_images, top_k=cfg.top_k, n_segment=cfg.n_segment,
                            n_spurious=cfg.n_spurious, seed=cfg.seed, n_queries=min(200, cfg.n_images),
                            n_random=cfg.n_random)
    with stage(f"decompose {bench.n_images} scenes"):
        sample = make_sample(bench.n_images, bench.seed)
        t0 = time.perf_counter()
        stack = decompose_sample(clip, sample.images, batch_size=bench.batch_size)
        seconds_decompose = time.perf_counter() - t0
    with stage("text embeddings and component scores"):
        encoder = text_encoder(clip)
        texts = factor_texts(encoder)
        truth = {f: factor_values(sample.scenes, f) for f in texts}
        table = component_scores(stack, texts)
        values = stack.values.double().numpy()
    with stage("score nulls (random caption bases)"):
        from ..interpret.score import ScoreMoments, score_nulls
        from .generator import caption_pool

        null_pool = caption_pool()
        nulls = score_nulls(ScoreMoments.from_stack(stack), texts,
                            encoder.encode(null_pool.texts).double().numpy(), n_null=cfg.n_null, seed=bench.seed,
                            labels=stack.names, meta={"null_pool": null_pool.manifest()})
    results: dict[str, Any] = {
        "version": __version__, "model": clip.name, "tiny": clip.extras.get("tiny", {}).get("zero_shot_accuracy"),
        "n_images": bench.n_images, "k": bench.top_k, "n_components": len(stack.labels), "components": [str(x) for x in stack.labels],
        "decomposition_relative_error": stack.error(), "decompose_seconds": round(seconds_decompose, 2),
        "quick": cfg.quick_mode, "n_random": bench.n_random,
    }
    with stage("TextSpan labels"):
        results["textspan"] = _textspan(stack, encoder, cfg.textspan_texts)
        results["scores"] = table.to_json()
        results["significance"] = nulls.to_json()
    with stage("factor agreement and retrieval"):
        results["factor_agreement"] = factor_agreement(values, table, texts, truth, k=bench.top_k,
                                                       n_random=bench.n_random, seed=bench.seed)
        results["retrieval"] = retrieval_precision(values, table, truth, k=bench.top_k, at=bench.precision_at,
                                                   n_queries=bench.n_queries, n_random=bench.n_random, seed=bench.seed)
    with stage(f"zero-shot segmentation ({bench.n_segment} scenes)"):
        seg_sample = make_sample(bench.n_segment, bench.seed, stream=8)
        results["segmentation"] = segmentation_bench(clip, seg_sample, {f: texts[f] for f in SEGMENT_TEXTS},
                                                     batch_size=50)
    with stage(f"spurious cue ({bench.n_spurious} scenes per split)"):
        classifier = load_shipped("spurious", cfg.weights)
        results["spurious"] = spurious_bench(clip, classifier, n_train=bench.n_spurious, n=bench.n_spurious,
                                             k=bench.top_k, n_random=bench.n_random, seed=bench.seed,
                                             batch_size=bench.batch_size)
    with stage("CompAlign: the tiny Swin read with text"):
        swin = load_shipped("swin", cfg.weights)
        results["aligned"] = aligned_bench(swin, clip, sample, texts, k=bench.top_k, n_random=bench.n_random,
                                           seed=bench.seed, batch_size=bench.batch_size, epochs=cfg.align_epochs)
    with stage("report figures"):
        subtitle = ("A tiny CLIP and a tiny classifier trained on procedurally generated scenes whose factors are "
                    "known, decomposed exactly and read with text.")
        if cfg.quick_mode:
            subtitle += " " + cfg.describe_quick()
        report = Report(title="vitdecomp demo: the synthetic world", subtitle=subtitle,
                        sections=[], meta={"vitdecomp": __version__, "model": clip.name, "images": bench.n_images,
                                           "seed": bench.seed, **({"mode": "quick"} if cfg.quick_mode else {})})
        report.sections.extend([
            _section_model(clip, results, sample),
            _section_zero_shot(results),
            _section_textspan(results),
            _section_components(table, results, nulls),
            _section_agreement(results),
            _section_retrieval(results, sample, values, table, cfg.top_k),
            _section_heatmaps(clip, seg_sample, texts, results, cfg.n_heatmaps),
            _section_spurious(results),
            _section_aligned(results),
        ])
    return report, results


def _textspan(stack: Any, encoder: Any, m: int) -> list[dict[str, Any]]:
    """TextSpan over every head with the pool of single-attribute phrases of the world."""
    from ..store.component_store import RunningMoments
    from .generator import SCENE_FACTORS, VOCABULARY, describe
    from ..interpret.textspan import textspan_heads

    pool = [describe(f, v) for f in SCENE_FACTORS for v in VOCABULARY[f]]
    factor_of = {describe(f, v): f for f in SCENE_FACTORS for v in VOCABULARY[f]}
    embeddings = encoder.encode(pool).double().numpy()
    moments = RunningMoments(len(stack.labels), stack.dim, covariance=True)
    moments.update(stack.values.movedim(0, 1).double().numpy())
    labels = [str(x) for x in stack.labels]
    heads = [i for i, lab in enumerate(stack.labels) if lab.kind == "head"]
    results = textspan_heads(moments, labels, pool, embeddings, components=heads, m=m, rank=min(32, stack.dim))
    return [{"component": r.label, "texts": r.texts, "factors": [factor_of[t] for t in r.texts],
             "variance_explained": r.variance_explained} for r in results]


def _section_model(model: Model, results: dict[str, Any], sample: Any) -> Section:
    from ..report import Figure, Section, Table
    from ..report.figures import image_grid

    facts = model.describe()
    rows = [[k, json.dumps(v) if isinstance(v, (list, tuple, dict)) else v] for k, v in facts.items()]
    rows += [["components", results["n_components"]], ["images decomposed", results["n_images"]],
             ["relative error of the sum", results["decomposition_relative_error"]],
             ["decomposition time (s)", results["decompose_seconds"]]]
    grid = image_grid(list(sample.images[:16]), columns=8, scale=2)
    return Section("model", "The model and its decomposition", [
        "The representation z of every image is split into the direct contributions of the embedding, "
        "every attention head, every MLP and the per-layer biases; the parts add up to the model's own "
        "output (the relative error below is checked at run time).",
    ], [Table(["fact", "value"], rows),
        Figure.from_pil(grid, caption="Some of the generated scenes (64 px).", alt="generated scenes")])


def _section_zero_shot(results: dict[str, Any]) -> Section:
    from ..report import Section, Table

    agreement = results["factor_agreement"]
    rows = [[f, a["full"], a["chance"]] for f, a in agreement.items()]
    return Section("zero-shot", "Reading each factor with text", [
        "Zero-shot accuracy of each known factor from the whole representation, with one phrase per "
        "value (e.g. 'a red object').",
    ], [Table(["factor", "zero-shot accuracy", "chance"], rows)])


def _section_textspan(results: dict[str, Any]) -> Section:
    from ..report import Section, Table

    rows = [[r["component"], ", ".join(r["texts"]), ", ".join(r["factors"]),
             float(sum(r["variance_explained"]))] for r in results["textspan"]]
    return Section("textspan", "Heads labelled with text (TextSpan)", [
        "For every head, the phrases from the world's vocabulary that greedily explain most of its "
        "variance (covariance form, docs/method.md §5), with the factor each phrase names, and the fraction "
        "of the head's variance they explain together.",
    ], [Table(["head", "texts (in order)", "factors", "variance explained (fraction)"], rows)])


def _section_components(table: Any, results: dict[str, Any], nulls: Any) -> Section:
    from ..report import Figure, Section, Table
    from ..report.figures import score_heatmap

    rows = []
    for j, f in enumerate(table.features):
        top = table.top(f, 3)
        cells = []
        for name, value in top:
            i = table.labels.index(name)
            cells.append(f"{name} ({value:.2f}{'' if nulls.significant[i, j] else ', not significant'})")
        null_best = nulls.feature_null_max[j]
        rows.append([f, nulls.verdict(f), float(nulls.feature_max[j]),
                     f"{null_best.mean():.3f} ± {null_best.std():.3f}", float(nulls.feature_p[j]), ", ".join(cells)])
    svg = score_heatmap(table, significant=nulls.significant, title=f"Correlation score of every component with every factor "
                                     f"({results['n_images']} scenes)")
    return Section("components", "Components per factor", [
        "Correlation score of each component with each factor (docs/method.md §4): the mean Pearson correlation, "
        "over an orthonormal basis of the factor's text embeddings, between the component's projection "
        "and the representation's.",
        f"Each factor is tested against {nulls.n_null} random bases of the same rank drawn from random captions "
        "of the world (the null): the factor is significant when its best component scores above what the best "
        "component scores for random caption texts (permutation p-value of the maximum over components, "
        "Benjamini-Hochberg over factors); each component's flag uses its own null (Gaussian tail of z, "
        "Benjamini-Hochberg over components x factors). Only components that compute something from the input "
        "are ranked (no embed or bias rows).",
    ], [Table(["factor", "verdict", "best score", "random best (mean ± sd)", "p", "top components (score)"], rows),
        Figure.from_svg(svg, caption="Scores, components x factors: red positive, blue negative, white 0 (a constant "
                                     "component, such as the final bias, scores 0).",
                        alt="heat map of correlation scores, components by factors")])


def _section_agreement(results: dict[str, Any]) -> Section:
    from ..report import Section, Table

    k = results["k"]
    rows = [[f, ", ".join(a["components"]), a["top_k"], a["full"], a["other_top_k"], a["random_k"]["mean"],
             a["chance"]] for f, a in results["factor_agreement"].items()]
    return Section("agreement", "Do the top components carry their factor?", [
        f"Zero-shot accuracy of each factor read from the sum of its top-{k} components alone, against the "
        f"whole representation, the other factors' top-{k} components and {k} random components.",
    ], [Table(["factor", f"top-{k}", f"top-{k} acc.", "full acc.", f"other factors' top-{k}", f"random {k} (mean)",
               "chance"], rows)])


def _section_retrieval(results: dict[str, Any], sample: Any, values: np.ndarray, table: Any, k: int) -> Section:
    from ..report import Figure, Section, Table
    from ..report.figures import image_grid
    from ..apps.retrieve import exact_search, top_components, unit_rows

    rows = [[f, ", ".join(r["components"]), r["top_k"], r["full"], r["random_k"]["mean"], r["base_rate"]]
            for f, r in results["retrieval"].items()]
    items: list[Any] = [Table(["factor", "components", f"p@10 top-{k}", "p@10 full", f"p@10 random {k}", "base rate"],
                              rows)]
    query = 0
    for f in ("colour", "shape", "background"):
        rows_f = top_components(table, f, k, by="selectivity")
        feats = unit_rows(values[rows_f].sum(0))
        nearest, _ = exact_search(feats, feats[query], 7, exclude=[query])  # the query itself is never returned
        order = nearest[0]
        grid = image_grid([sample.images[query], *sample.images[order]], columns=8, scale=2,
                          labels=["query", *[f"#{i + 1}" for i in range(7)]])
        items.append(Figure.from_pil(grid, caption=f"Nearest images by {f} components ({', '.join(str(table.labels[i]) for i in rows_f)}).",
                                     alt=f"retrieval by {f}"))
    return Section("retrieval", "Retrieval by feature", [
        f"Image-to-image retrieval with the sum of the {k} most selective components for a factor (docs/method.md §6.3). "
        "precision@10: share of the 10 nearest images that have the query's value of the factor.",
    ], items)


def _section_heatmaps(model: Model, sample: Any, texts: dict[str, np.ndarray], results: dict[str, Any],
                      n: int) -> Section:
    import torch
    import torch.nn.functional as F

    from ..apps.segmentation.attention import raw_attention, rollout
    from ..report import Figure, Section, Table
    from ..report.figures import OverlayColumn, overlay_grid
    from .bench import SEGMENT_TEXTS, model_pixels, decomposition_map

    seg = results["segmentation"]
    metric_rows = [[name, m["pixel_accuracy"], m["miou_two_class"], m["map_two_channel"], m["fg_iou"]]
                   for name, m in seg.items()]
    x = model_pixels(model, sample.images[:n])
    decomposition_units = r"contribution to $\langle y_{pred} - \bar{y},\ z\rangle$ (embedding units)"
    columns = [OverlayColumn(f"decomposition ({f} texts)",
                             decomposition_map(model, x, torch.from_numpy(texts[f]).float()), decomposition_units)
               for f in SEGMENT_TEXTS]
    columns += [OverlayColumn("raw attention", raw_attention(model, x), "CLS attention weight (fraction)",
                              signed=False),
                OverlayColumn("rollout", rollout(model, x), "rollout relevance (fraction)", signed=False)]
    size = tuple(sample.images.shape[1:3])
    columns = [OverlayColumn(c.title, [F.interpolate(m[None, None].double(), size=size, mode="bilinear",
                                                     align_corners=False)[0, 0].numpy() for m in c.maps[:n]],
                             c.units, c.signed) for c in columns]
    svg = overlay_grid(list(sample.images[:n]), columns, alpha=0.6, tile=170)
    return Section("heatmaps", "Token heatmaps and zero-shot segmentation", [
        "Decomposition maps: each patch's contribution through all heads to the predicted colour's (or shape's) "
        "text minus the mean over that factor's texts (docs/method.md §6.5). Baselines from the same model's attention. Metrics against "
        "the exact object masks, Chefer et al.'s protocol (threshold at the mean relevance).",
    ], [Table(["map", "pixel accuracy", "mIoU (2 classes)", "mAP (2 channels)", "foreground IoU"], metric_rows,
              caption="All metrics are fractions in [0, 1]."),
        Figure.from_svg(svg, caption="Each row an image; its decomposition maps (colour texts, shape texts: signed, "
                                     "blue-white-red centred at 0), raw attention and rollout (non-negative, "
                                     "white-red). Each column has one scale, its colour bar below it.",
                        alt="token heatmaps over the scenes")])


def _section_spurious(results: dict[str, Any]) -> Section:
    from ..report import Figure, Section, Table
    from ..report.figures import accuracy_bars

    s = results["spurious"]
    k, r = s["k"], s["random"]
    draws = len(r["draws"])

    def row(name: str, components: list[str] | None, m: dict[str, Any]) -> list[Any]:
        return [name, ", ".join(components) if components else "", m["worst_group"], m["average_group"],
                m["weighted"]]

    rows = [row("baseline (no ablation)", None, s["before"]),
            row(f"top-{k} contrastive ablated", s["selected"], s["after"]),
            row(f"top-{k} by val variance ablated", s["variance_control"]["components"], s["variance_control"]),
            [f"random {k} ({draws} draws), mean ± sd", "",
             f"{r['worst_group_mean']:.3f} ± {r['worst_group_sd']:.3f}",
             f"{r['average_group_mean']:.3f} ± {r['average_group_sd']:.3f}",
             f"{r['weighted_mean']:.3f} ± {r['weighted_sd']:.3f}"],
            [f"random {k}: max", "", r["worst_group_max"], r["average_group_max"], r["weighted_max"]]]
    columns = ["intervention", "components", "worst-group acc.", "average-group acc.", "weighted acc."]
    groups = " vs ".join("{" + ", ".join(g) + "}" for g in s["groups"])
    random_mean = f"random {k}\n(mean ± sd)"
    chart = accuracy_bars({
        "baseline": [s["before"]["worst_group"], s["before"]["average_group"]],
        f"top-{k}\ncontrastive\nablated": [s["after"]["worst_group"], s["after"]["average_group"]],
        f"top-{k}\nvariance\nablated": [s["variance_control"]["worst_group"], s["variance_control"]["average_group"]],
        random_mean: [r["worst_group_mean"], r["average_group_mean"]],
        f"random {k}\n(max)": [r["worst_group_max"], r["average_group_max"]],
    }, errors={random_mean: [r["worst_group_sd"], r["average_group_sd"]]},
        title="Test accuracy of the linear head on the CLIP")
    items: list[Any] = [Table(columns, rows, caption=f"Linear head on {s['model']} (accuracies are fractions)."),
                        Figure.from_svg(chart, caption=f"Worst-group and average-group test accuracy; the random "
                                                       f"bars are the mean of {draws} draws with ± one sd.",
                                        alt="bar chart of worst-group and average-group accuracy")]
    paragraphs = [
        f"Waterbirds in the synthetic world: the class is the object's {s['task']} ({groups}), the place is the "
        f"background (land / water). A logistic-regression head on the tiny CLIP's representation is trained on "
        f"{s['n_train']} scenes where the place goes with the class in a fraction {s['train_aligned_share']:.2f} "
        f"of them, so it leans on the background. Components are ranked on a separate, group-balanced val set "
        f"({s['n_val']} scenes) by the contrastive correlation score (background texts minus {s['task']} texts, "
        f"docs/method.md §4), the top {k} are mean-ablated (val means), and accuracy is measured on a third, group-balanced "
        f"test set ({s['n_test']} scenes). Controls: {k} random components ({draws} draws) and the {k} components "
        "of largest val variance.",
    ]
    c = s.get("classifier")
    if c is not None:
        cr = c["random"]
        items.append(Table(columns, [
            row("before", None, c["before"]), row(f"ablate {k} selected", c["selected"], c["after"]),
            [f"ablate {k} random, mean ± sd (max)", "", f"{cr['worst_group_mean']:.3f} ± {cr['worst_group_sd']:.3f} "
             f"({cr['worst_group_max']:.3f})", cr["average_group_mean"], None]],
            caption=f"{c['model']}: {c['note']}"))
        paragraphs.append(
            f"The second table is a negative result: the tiny classifier ({c['model']}) trained end to end on the "
            f"biased split learned the background only (its worst group is at {c['before']['worst_group']:.2f}), "
            "so removing components cannot restore class information it never had.")
    return Section("spurious", "Removing a spurious cue", paragraphs, items)


def _section_aligned(results: dict[str, Any]) -> Section:
    from ..report import Section, Table

    a = results["aligned"]
    k = results["k"]
    rows = [[f, ", ".join(r["components"]), r["top_k"], r["full"], r["random_k"]["mean"], r["chance"]]
            for f, r in a["factor_agreement"].items()]
    return Section("aligned", "Beyond CLIP: a supervised Swin read through CompAlign", [
        f"The tiny supervised Swin ({a['model']}, a hierarchical model trained to classify colour) has no text "
        "tower. Each of its components is mapped into the tiny "
        f"CLIP's image space by its own near-isometric linear map (CompAlign, docs/method.md §3), fitted on the CLIP image "
        f"embeddings of the same {a['n_images']} scenes; held-out cosine {a['val_cosine']:.3f} on {a['n_val']} val "
        f"scenes, largest orthogonality defect {a['defect_max']:.3f}. The aligned components are then scored and "
        "read with the CLIP's text like the CLIP's own.",
    ], [Table(["factor", f"top-{k} aligned components", f"top-{k} acc.", "aligned sum acc.", f"random {k}",
               "chance"], rows)])


# ----------------------------------------------------------------------------- real model
def _real(spec: str | None, images: str | Path | None, cfg: DemoConfig,
          stages: _Stages | None = None) -> tuple[Report, dict[str, Any]]:
    from .. import __version__
    from ..errors import InputError
    from ..core.loading import load
    from ..report import Report, Section, Table
    from .bench import decompose_sample

    if spec is None or images is None:
        raise InputError("a real-model demo needs both --model SPEC and --images DIR")
    stage = stages or _Stages(6)
    with stage(f"load {spec}"):
        model = load(spec, pretrained=cfg.pretrained)
        encoder = _text_tower_or_none(model)
        stage.total = 6 if encoder is not None else 5  # no TextSpan stage without a text tower
    size = model.preprocessing.input_size
    with stage("read the images"):
        arrays, names, skipped = _read_images(Path(images), cfg.n_images, size)
    with stage(f"decompose {len(arrays)} images"):
        stack = decompose_sample(model, arrays, batch_size=16, granularity="head")
    z = stack.reference.double()
    values = stack.values.double()
    share = (values * z).sum(-1) / (z * z).sum(-1)  # [comp, n]: each part's share of |z|^2
    order = share.mean(1).argsort(descending=True)[:15].tolist()
    results: dict[str, Any] = {"version": __version__, "model": model.name, "n_images": len(arrays),
                               "n_components": len(stack.labels), "decomposition_relative_error": stack.error(),
                               "images": names, "skipped": skipped,
                               "top_components": {str(stack.labels[i]): float(share[i].mean()) for i in order}}
    report = Report(title=f"vitdecomp demo: {model.name}", subtitle=f"{len(arrays)} images from {images}",
                    sections=[], meta={"vitdecomp": __version__, "model": model.name, "images": str(images)})
    facts = [[k, json.dumps(v) if isinstance(v, (list, tuple, dict)) else v] for k, v in model.describe().items()]
    facts.append(["relative error of the sum", results["decomposition_relative_error"]])
    report.sections.append(Section("model", "The model and its decomposition", [
        f"Input {size[0]}x{size[1]}; every head, MLP and the embedding."], [Table(["fact", "value"], facts)]))
    report.sections.append(Section("components", "Components by their share of the representation", [
        "Mean over images of <c_i, z> / |z|^2 (the shares of all components sum to 1)."],
        [Table(["component", "mean share"], [[k, v] for k, v in results["top_components"].items()])]))
    with stage("token heatmaps"):
        figures = _real_heatmaps(model, arrays[: cfg.n_heatmaps])
    report.sections.append(Section("heatmaps", "Token heatmaps", [
        "Each patch's contribution through all heads to the image's own predicted class direction (classifier "
        "weights) or, for a model without a classifier, to its own representation direction."],
        figures))
    if encoder is not None:
        with stage(f"TextSpan labels ('{cfg.pool}' pool; its text embeddings are cached)"):
            spans = _real_textspan(stack, encoder, cfg)
        results["textspan"] = spans
        rows = [[s["component"], "; ".join(s["texts"]), sum(s["variance_explained"])] for s in spans]
        report.sections.append(Section("textspan", "Heads labelled with text (TextSpan)", [
            f"Each head of the last {cfg.textspan_layers} layers, labelled with the {cfg.textspan_texts} texts of the "
            f"shipped '{cfg.pool}' pool that span most of its variance over these {len(arrays)} images (covariance "
            "form, docs/method.md §5). With this few images the labels are a first look; run `vitdecomp decompose ... --out "
            "STORE` and `vitdecomp label STORE` on a dataset for labels to cite."],
            [Table(["head", "texts", "variance explained"], rows)]))
    missing = ("feature scores, retrieval by feature and spurious-cue removal need a dataset with known factors or "
               "labels (the synthetic world, or a store of your own: `vitdecomp score`, `retrieve`, `debias`); "
               + ("text labels need a CLIP text tower or CompAlign (`vitdecomp align`) for this model"
                  if encoder is None else "they run on stores, not on a folder of images"))
    report.sections.append(Section("not-run", "Not run for this model", [missing]))
    results["not_run"] = missing
    if skipped:
        report.sections.append(_section_skipped(skipped, images))
    return report, results


def _section_skipped(skipped: dict[str, str], folder: str | Path) -> Section:
    """The files of ``--images`` that were left out, with the reason of each (only when there are any)."""
    from ..report import Section, Table

    return Section("skipped", f"Skipped files ({len(skipped)})", [
        f"These files under {folder} were left out: they could not be used as images (the same rules as "
        "`vitdecomp decompose`: unreadable, not an image, corrupt or truncated, too small or too large)."],
        [Table(["file", "reason"], [[path, reason] for path, reason in skipped.items()])])


def _text_tower_or_none(model: Model) -> Any:
    from ..errors import UnsupportedModelError
    from ..interpret.text import text_encoder

    try:
        return text_encoder(model)
    except UnsupportedModelError:
        return None


def _real_textspan(stack: Any, encoder: Any, cfg: DemoConfig) -> list[dict[str, Any]]:
    """TextSpan (covariance form) of the heads of the last ``cfg.textspan_layers`` layers with a shipped pool."""
    from ..store.component_store import RunningMoments
    from ..interpret.text.pools import load_pool
    from ..interpret.textspan import textspan_heads

    pool = load_pool(cfg.pool)
    embeddings = encoder.encode(pool.texts).double().numpy()  # read from the text cache after the first run
    layers = sorted({lab.layer for lab in stack.labels if lab.kind == "head"})[-cfg.textspan_layers:]
    heads = [i for i, lab in enumerate(stack.labels) if lab.kind == "head" and lab.layer in layers]
    moments = RunningMoments(len(heads), stack.dim, covariance=True)  # the labelled heads' moments only
    moments.update(stack.values[heads].movedim(0, 1).double().numpy())
    rank = min(32, stack.dim, max(1, stack.batch_size - 1))
    results = textspan_heads(moments, [str(stack.labels[i]) for i in heads], pool.texts, embeddings,
                             m=cfg.textspan_texts, rank=rank)
    return [{"component": r.label, "texts": r.texts, "variance_explained": r.variance_explained} for r in results]


def _read_images(folder: Path, limit: int, size: tuple[int, int] = (224, 224)) -> tuple[
        np.ndarray, list[str], dict[str, str]]:
    """The first ``limit`` readable images of ``folder`` (sorted paths) as ``[n, H, W, 3]`` uint8, each scaled
    and centre-cropped to the model's input ``size`` (H, W) without distorting its aspect ratio; plus their
    names and ``{path: reason}`` of the files skipped on the way (read with
    :func:`vitdecomp.data.images.load_image`: the same files are skipped, with the same reasons, as
    by ``vitdecomp decompose``)."""
    from PIL import Image, ImageOps

    from ..data.images import find_images, load_image, record_skip
    from ..errors import InputError

    if not folder.is_dir():
        raise InputError(f"--images {folder}: not a folder")
    files = find_images([folder])
    arrays, names, skipped = [], [], {}
    for path in files:
        if len(arrays) >= limit:
            break
        try:
            image = load_image(path)
        except InputError as exc:
            record_skip(skipped, path, exc)
            continue
        arrays.append(np.asarray(ImageOps.fit(image, (size[1], size[0]), method=Image.Resampling.BICUBIC)))
        names.append(path.name)
    if not arrays:
        raise InputError(f"--images {folder}: no readable images")
    return np.stack(arrays), names, skipped


def _real_heatmaps(model: Model, images: np.ndarray) -> list[Any]:
    """One figure: each image and the map of its heads onto its own predicted direction, with a colour bar."""
    import torch.nn.functional as F

    from ..core.decomposition import decompose
    from ..apps.heatmap import token_heatmap
    from ..report import Figure
    from ..report.figures import OverlayColumn, overlay_grid
    from .bench import model_pixels

    x = model_pixels(model, images)
    maps = []
    head = model.classifier()
    for b in range(len(images)):
        z = model.representation(x[b:b + 1])[0]
        direction = head[0][int((z @ head[0].T).argmax())] if head is not None else z / z.norm()
        stack = decompose(model, x[b:b + 1], granularity="head_token", directions=direction[None].to(x.dtype))
        heads = [str(lab) for lab in stack.labels if lab.kind == "head"]
        heat = token_heatmap(stack, None, components=heads)
        up = F.interpolate(heat.patch[None].double(), size=images.shape[1:3], mode="bilinear", align_corners=False)[0, 0]
        maps.append(up.numpy())
    units = ("contribution to the predicted logit (logit units)" if head is not None else
             r"contribution to $\langle z/|z|,\ z\rangle$ (embedding units)")
    svg = overlay_grid(list(images), [OverlayColumn("all heads -> predicted direction", maps, units)], tile=220)
    return [Figure.from_svg(svg, caption="Each row an image and its map (blue-white-red, centred at 0; one scale, "
                                         "its colour bar below).", alt="token heatmaps")]
