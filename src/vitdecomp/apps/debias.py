"""Removing a spurious cue by mean-ablating the components that carry it (docs/method.md §6.6, Waterbirds).

Setting: a dataset with a class ``y`` and a spurious attribute ``place`` (Waterbirds: bird type and
background), Waterbirds groups ``g = 2 y + place``. A classifier head reads the representation
``z(x) = Σ_i c_i(x)`` (the exact decomposition, stored per split in a
:class:`~vitdecomp.store.component_store.ComponentStore`):

* **Head** (:class:`ClassifierHead`): ``logits = W z + b`` with ``W ∈ ℝ^{C×d}``. Either the
  zero-shot head of a CLIP model (unit text rows of the class names; cosine logits have the
  argmax of ``W z`` because ``‖z‖ > 0`` is one positive factor per image), or a linear head
  (logistic regression, seeded) fitted on the **train** split (:func:`fit_linear_head`).
* **Selection** on the **val** split only (:func:`contrastive_scores`): the correlation score of
  docs/method.md §4 for the spurious texts (places) and the core texts (birds), each an orthonormal basis
  of its template-ensembled text embeddings, and the contrastive score
  ``s_i = s_{i,spurious} − s_{i,core}``; the top-``k`` *candidates* are selected. Candidates are
  every component but the constant rows (``bias``, ``L07.bias``, ``L07.mlp_bias``: they do not
  vary over images, so mean-ablating them is a no-op). For a non-CLIP model the scores read
  CompAlign-mapped components ``a_i = F_i c_i`` (pass ``align``); head and ablation stay in the
  model space.
* **Intervention**: mean-ablation with the **val** means as the explicit reference,
  ``c_i(x) ← μ_i^{val}`` for ``i ∈ S`` (:func:`vitdecomp.interpret.ablate.ablate`). Since the head is
  linear, the ablated logits are (:func:`ablated_logits`)::

      logits'(x) = Σ_i W c_i(x) + b − Σ_{i∈S} W c_i(x) + Σ_{i∈S} W μ_i^{val}

  so one streamed pass per split stores the per-component logit contributions
  ``[comp, n, C]`` and any set ``S`` is evaluated without re-reading the store.
* **Evaluation** on the **test** split (:func:`group_metrics`): per-group accuracy, worst-group
  accuracy (WGA, ``min_g acc_g``), average-group accuracy unweighted (mean over the groups) and
  weighted by group frequency (= plain accuracy).
* **Controls**: ``random_draws`` seeded draws of ``k`` random candidates (mean ± sd and max of
  WGA), and the top-``k`` candidates by total variance on val (docs/method.md §6.6).

Splits come from the Waterbirds ``metadata.csv`` by item id (:class:`WaterbirdsLabels`): the
stores may be one per split or one store of all splits (rows are filtered by their metadata
split either way), and a row's stored target must equal its ``y``.

Example::

    labels = WaterbirdsLabels.read("/data/waterbirds")
    stores = {s: ComponentStore.open(f"stores/{s}") for s in ("train", "val", "test")}
    enc = text_encoder(model)
    head = zero_shot_classifier(enc, ["landbird", "waterbird"])
    result = debias(stores, labels, head, spurious=embed_texts(enc, spurious_texts),
                    core=embed_texts(enc, core_texts), k=10, random_draws=5)
    print(result.format_table())
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:
    import torch

    from ..core.model import Model
    from ..interpret.align import CompAlign
    from ..store.component_store import ComponentStore
    from ..interpret.text.encoders import TextEncoder
    from ..interpret.text.pools import TextPool

__all__ = [
    "group_accuracy",
    "SPLITS",
    "WATERBIRDS_CLASS_NAMES",
    "WATERBIRDS_TEXTS",
    "DebiasTexts",
    "dataset_texts",
    "WaterbirdsLabels",
    "ClassifierHead",
    "SplitLogits",
    "DebiasResult",
    "candidate_mask",
    "top_k",
    "random_sets",
    "check_stores",
    "zero_shot_classifier",
    "embed_texts",
    "fit_linear_head",
    "project_split",
    "contrastive_scores",
    "ablated_logits",
    "group_metrics",
    "debias",
    "StackSplit",
    "fit_linear_head_stack",
    "linear_head_from_features",
    "project_stack",
    "contrastive_scores_stack",
    "debias_stacks",
    "DebiasRun",
    "run_debias",
]

log = logging.getLogger(__name__)

SPLITS: tuple[str, str, str] = ("train", "val", "test")
#: Class names of Waterbirds' ``y`` (0, 1), for the zero-shot head.
WATERBIRDS_CLASS_NAMES: tuple[str, str] = ("landbird", "waterbird")
#: Default texts of a real Waterbirds root: class names, spurious and core pools, template set.
WATERBIRDS_TEXTS: dict[str, Any] = {"class_names": WATERBIRDS_CLASS_NAMES, "spurious": "waterbirds/spurious",
                                    "core": "waterbirds/core", "templates": "photo"}
#: Label kinds that are constant over images (never candidates).


# ============================================================================ metadata
@dataclass(frozen=True)
class WaterbirdsLabels:
    """Waterbirds metadata by item id: ``{id: (y, place, split)}``.

    Ids are the store ids of a Waterbirds dataset: ``img_filename`` as a POSIX path (see
    :class:`vitdecomp.data.datasets.Waterbirds`).
    """

    root: str
    items: Mapping[str, tuple[int, int, str]]

    @classmethod
    def read(cls, root: str | Path) -> WaterbirdsLabels:
        """Read ``root/metadata.csv`` (all splits).

        Raises:
            InputError: no ``metadata.csv``, missing columns, bad values, duplicate ids.
        """
        from ..data.datasets import Waterbirds

        source = Waterbirds(root)
        items: dict[str, tuple[int, int, str]] = {}
        for i in range(len(source)):
            meta = source.metadata(i)
            item_id = source.id(i)
            if item_id in items:
                raise InputError(f"Waterbirds: {root}/metadata.csv lists {item_id} twice")
            if meta["y"] not in (0, 1) or meta["place"] not in (0, 1):
                raise InputError(f"Waterbirds: {item_id}: y and place must be 0 or 1, got {meta['y']}, {meta['place']}")
            items[item_id] = (int(meta["y"]), int(meta["place"]), str(meta["split"]))
        return cls(str(root), items)

    def lookup(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """``(y [n], place [n], split names)`` of ``ids``.

        Raises:
            InputError: an id not in the metadata (a store of another dataset).
        """
        missing = [i for i in ids if i not in self.items]
        if missing:
            raise InputError(f"{len(missing)} store item(s) are not in {self.root}/metadata.csv (e.g. {missing[0]!r}): "
                             "the store was made from another dataset")
        rows = [self.items[i] for i in ids]
        return (np.array([r[0] for r in rows], dtype=np.int64), np.array([r[1] for r in rows], dtype=np.int64),
                [r[2] for r in rows])


@dataclass(frozen=True)
class DebiasTexts:
    """The texts of a run: the zero-shot class names, the spurious and core texts and the template set.

    Attributes:
        class_names: per class (y = 0, 1), its names (several are ensembled by :func:`zero_shot_classifier`).
        spurious: the spurious-attribute texts (places) as a text pool.
        core: the core-attribute texts (the class) as a text pool.
        templates: template set name (or one template).
        source: where the defaults came from: ``"waterbirds"`` (the shipped Waterbirds texts) or the path
            of a generated dataset's ``task.json`` (its own class factor and background texts).
    """

    class_names: tuple[tuple[str, ...], ...]
    spurious: TextPool
    core: TextPool
    templates: str
    source: str

    def describe(self) -> dict[str, Any]:
        """JSON-able record of the texts: every text, the pools' manifests and the source."""
        return {"source": self.source, "class_names": [list(c) for c in self.class_names],
                "templates": self.templates,
                "spurious": {**self.spurious.manifest(), "texts": list(self.spurious.texts)},
                "core": {**self.core.manifest(), "texts": list(self.core.texts)}}


def dataset_texts(root: str | Path) -> DebiasTexts:
    """The default texts of the dataset at ``root``.

    A dataset written by ``vitdecomp synth generate --spurious P`` (it has a ``task.json``, see
    :func:`vitdecomp.data.synthetic.read_task`) gets its own world's texts: class ``y`` named by the
    describe() phrases of its values of the class factor (e.g. ``"a red object"``, ...), the
    describe() phrases of every background as spurious texts and of every value of the class factor
    as core texts, template set ``"synth"``. Any other root (real Waterbirds) gets
    :data:`WATERBIRDS_TEXTS`: ``landbird`` / ``waterbird`` and the shipped ``waterbirds/spurious`` /
    ``waterbirds/core`` pools with the ``photo`` templates.

    Raises:
        InputError: a malformed ``task.json``.
    """
    from ..data.synthetic import TASK_FILE, read_task
    from ..interpret.text.pools import TextPool, load_pool

    base = Path(root)
    task = read_task(base)
    if task is None or not task.get("spurious_texts") or not task.get("core_texts"):
        if task is not None:
            log.warning("%s: a generated dataset without a spurious (background) task; using the Waterbirds texts",
                        base)
        d = WATERBIRDS_TEXTS
        return DebiasTexts(tuple((str(c),) for c in d["class_names"]), load_pool(d["spurious"]), load_pool(d["core"]),
                           str(d["templates"]), "waterbirds")
    where = base / TASK_FILE
    class_names = tuple(tuple(str(t) for t in texts) for texts in task["class_texts"])
    if len(class_names) != 2:
        raise InputError(f"{where}: a Waterbirds-layout task needs 2 classes, got {len(class_names)}")

    def pool(key: str, factor: str) -> TextPool:
        texts = list(dict.fromkeys(str(t) for t in task[key]))
        return TextPool(f"synth/{factor}", None, texts,
                        f"describe() phrases of every {factor} value of the synthetic world", str(where))

    log.info("%s: a generated dataset (class factor %s); default texts from %s", base, task.get("task"), where)
    return DebiasTexts(class_names, pool("spurious_texts", str(task.get("spurious_factor") or "background")),
                       pool("core_texts", str(task.get("core_factor") or task.get("task"))),
                       str(task.get("templates") or "synth"), str(where))


# ============================================================================ components
def candidate_mask(labels: Sequence[Any], kinds: Any = "input") -> np.ndarray:
    """bool ``[comp]``: components that may be selected: those of ``kinds`` (default the ones that
    compute something from the input, :data:`vitdecomp.core.labels.INPUT_KINDS`; embed / rest /
    bias rows only when asked for)."""
    from ..core.labels import kind_mask

    return kind_mask(labels, kinds)


def top_k(scores: np.ndarray, allowed: np.ndarray, k: int) -> list[int]:
    """Rows of the ``k`` highest ``scores`` among ``allowed`` (ties: lower row first), best first."""
    s = np.asarray(scores, dtype=np.float64).copy()
    s[~np.asarray(allowed, dtype=bool)] = -np.inf
    return [int(i) for i in np.argsort(-s, kind="stable")[:k]]


def random_sets(rng: np.random.Generator, allowed: np.ndarray, k: int, draws: int) -> list[list[int]]:
    """``draws`` random sets of ``k`` distinct rows among ``allowed`` (each sorted), drawn in order from ``rng``.

    Raises:
        InputError: fewer than ``k`` allowed rows.
    """
    pool = np.flatnonzero(np.asarray(allowed, dtype=bool))
    if k > len(pool):
        raise InputError(f"cannot draw {k} of {len(pool)} candidate components")
    return [sorted(int(i) for i in rng.choice(pool, size=k, replace=False)) for _ in range(draws)]


# ============================================================================ heads
@dataclass(frozen=True)
class ClassifierHead:
    """A linear classifier ``logits = W z + b`` on the (model or aligned) representation.

    Attributes:
        weight: ``[C, d]`` float64.
        bias: ``[C]`` float64 (zeros for a zero-shot head).
        kind: ``"zero-shot"``, ``"linear"`` or ``"model"`` (the model's own classifier).
        space: ``"model"`` (reads ``Σ_i c_i``) or ``"aligned"`` (reads ``Σ_i F_i c_i``, CompAlign).
        classes: class names, one per row.
        meta: provenance (texts and templates, training accuracy, regularisation, seed).
    """

    weight: np.ndarray
    bias: np.ndarray
    kind: str
    space: Literal["model", "aligned"] = "model"
    classes: tuple[str, ...] = WATERBIRDS_CLASS_NAMES
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        w = np.asarray(self.weight, dtype=np.float64)
        b = np.asarray(self.bias, dtype=np.float64).reshape(-1)
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise InputError(f"head weight must be [C, d] and bias [C], got {w.shape} and {b.shape}")
        if self.space not in ("model", "aligned"):
            raise InputError(f"head space must be 'model' or 'aligned', got {self.space!r}")
        object.__setattr__(self, "weight", w)
        object.__setattr__(self, "bias", b)
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if len(self.classes) != w.shape[0]:
            raise InputError(f"{len(self.classes)} class names for a head of {w.shape[0]} rows")

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "space": self.space, "classes": list(self.classes), "dim": int(self.weight.shape[1]),
                **self.meta}


def embed_texts(encoder: TextEncoder, texts: Sequence[str], templates: str | Sequence[str] = "photo") -> np.ndarray:
    """Template-ensembled unit text embeddings ``[n, d]`` float64 (:func:`vitdecomp.interpret.text.embed_templates`)."""
    from ..interpret.text import embed_templates

    return embed_templates(encoder, list(texts), templates).double().numpy()


def zero_shot_classifier(encoder: TextEncoder, class_names: Sequence[str | Sequence[str]],
                         templates: str | Sequence[str] = "photo", *, space: Literal["model", "aligned"] = "model"
                         ) -> ClassifierHead:
    """The zero-shot head of ``class_names`` (docs/method.md §6.6: CLIP over {landbird, waterbird}).

    A class given as several names gets the renormalised mean of their (template-ensembled,
    unit) embeddings. Rows are unit vectors, ``b = 0``.
    """
    from ..interpret.text import resolve_templates, zero_shot_head

    if isinstance(class_names, str) or len(class_names) < 2:
        raise InputError("a zero-shot head needs at least two classes")
    rows, names = [], []
    for cls in class_names:
        group = [cls] if isinstance(cls, str) else list(cls)
        emb = zero_shot_head(encoder, group, templates).double().numpy().mean(axis=0)
        rows.append(emb / max(float(np.linalg.norm(emb)), 1e-12))
        names.append("/".join(group))
    return ClassifierHead(np.stack(rows), np.zeros(len(rows)), "zero-shot", space, tuple(names),
                          {"class_texts": [[c] if isinstance(c, str) else list(c) for c in class_names],
                           "templates": list(resolve_templates(templates))})


def _rows_of_split(store: ComponentStore, labels: WaterbirdsLabels, split: str, chunk: Any) -> tuple[
        np.ndarray, np.ndarray, np.ndarray]:
    """Within one store batch: (keep mask, y, place) of the rows whose metadata split is ``split``."""
    ids = list(chunk.meta["ids"])
    y, place, splits = labels.lookup(ids)
    keep = np.array([s == split for s in splits], dtype=bool)
    targets = store.targets(np.asarray(chunk.meta["rows"], dtype=np.int64))
    bad = keep & (targets >= 0) & (targets != y)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise InputError(f"{store.path}: item {ids[first]} has stored target {int(targets[first])} but y = "
                         f"{int(y[first])} in {labels.root}/metadata.csv (a store of another dataset?)")
    return keep, y[keep], place[keep]


def _aligned(chunk: Any, align: CompAlign | None) -> Any:
    return align.apply(chunk) if align is not None else chunk


def fit_linear_head(store: ComponentStore, labels: WaterbirdsLabels, *, split: str = "train", c: float = 1.0,
                    seed: int = 0, max_iter: int = 2000, align: CompAlign | None = None,
                    class_names: Sequence[str] = WATERBIRDS_CLASS_NAMES) -> ClassifierHead:
    """Logistic regression of ``y`` on the representation ``z = Σ_i c_i`` of ``split``'s rows.

    Features are standardised with the training mean ``m`` and sd ``σ`` (per dimension), and the
    fitted ``(W', b')`` is folded back into the raw space: ``W = W'/σ``, ``b = b' − W m``. sklearn
    ``LogisticRegression(C=c, lbfgs, random_state=seed)``; binary problems give ``W = [−w, w]/2``
    (same argmax as sklearn's decision). Memory: ``[n, d]`` for the features.
    """
    feats, ys = [], []
    for chunk in store.iter_batches():
        keep, y, _ = _rows_of_split(store, labels, split, chunk)
        if keep.any():
            chunk = _aligned(chunk.sum_tokens(), align)
            feats.append(chunk.values.double().sum(0).numpy()[keep])
            ys.append(y)
    if not feats:
        raise InputError(f"{store.path} has no {split} rows: a linear head needs the train split")
    return linear_head_from_features(np.concatenate(feats), np.concatenate(ys), c=c, seed=seed, max_iter=max_iter,
                                     space="aligned" if align is not None else "model", class_names=class_names,
                                     split=split)


def linear_head_from_features(x: np.ndarray, y: np.ndarray, *, c: float = 1.0, seed: int = 0, max_iter: int = 2000,
                              space: Literal["model", "aligned"] = "model",
                              class_names: Sequence[str] = WATERBIRDS_CLASS_NAMES, split: str = "train"
                              ) -> ClassifierHead:
    """The fit of :func:`fit_linear_head` on in-memory features ``x [n, d]`` and labels ``y [n]``.

    Raises:
        InputError: one class only, or ``x`` and ``y`` of different lengths.
    """
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise InputError(f"need features [n, d] and labels [n], got {x.shape} and {y.shape}")
    if len(np.unique(y)) < 2:
        raise InputError(f"the {split} split holds one class only; cannot fit a linear head")
    mean, sd = x.mean(0), x.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    model.fit((x - mean) / sd, y)
    coef, intercept = model.coef_, model.intercept_
    if coef.shape[0] == 1:  # binary: p(1) = σ(w·x + b) -> logits [-(w·x+b)/2, (w·x+b)/2]
        coef = np.concatenate([-coef, coef]) / 2
        intercept = np.concatenate([-intercept, intercept]) / 2
    w = coef / sd
    b = intercept - w @ mean
    train_acc = float(np.mean((x @ w.T + b).argmax(1) == y))
    return ClassifierHead(w, b, "linear", space, tuple(class_names),
                          {"C": c, "seed": seed, "n_train": int(len(y)), "train_accuracy": train_acc,
                           "standardised": True})


# ============================================================================ per-split logits
@dataclass
class SplitLogits:
    """One split's per-component logit contributions, in store row order.

    Attributes:
        split: the split name.
        contributions: ``[comp, n, C]`` float64, ``W c_i(x)`` (the head's bias not included).
        y, place: ``[n]`` int64 Waterbirds metadata; ``group = 2 y + place``.
        ids: the items, in order.
    """

    split: str
    contributions: np.ndarray
    y: np.ndarray
    place: np.ndarray
    ids: list[str]

    @property
    def n(self) -> int:
        return int(self.y.shape[0])

    def means(self) -> np.ndarray:
        """Per-component mean contribution over this split: ``[comp, C]`` (= ``W μ_i``)."""
        return self.contributions.mean(axis=1)


def project_split(store: ComponentStore, labels: WaterbirdsLabels, split: str, head: ClassifierHead, *,
                  align: CompAlign | None = None) -> SplitLogits:
    """Stream ``split``'s rows of ``store`` and keep ``W c_i(x)`` for every component: ``[comp, n, C]``.

    ``align`` maps the components first when the head reads the aligned space.
    """
    if head.space == "aligned" and align is None:
        raise InputError("this head reads CompAlign-mapped components; pass the alignment")
    parts, ys, places, ids = [], [], [], []
    for chunk in store.iter_batches():
        keep, y, place = _rows_of_split(store, labels, split, chunk)
        if not keep.any():
            continue
        contrib = _contributions(chunk, head, align, where=str(store.path))
        parts.append(contrib[:, keep])
        ys.append(y)
        places.append(place)
        ids += [i for i, k in zip(chunk.meta["ids"], keep) if k]
    if not parts:
        raise InputError(f"{store.path} has no {split} rows (by {labels.root}/metadata.csv)")
    return SplitLogits(split, np.concatenate(parts, axis=1), np.concatenate(ys), np.concatenate(places), ids)


def _contributions(stack: Any, head: ClassifierHead, align: CompAlign | None, *, where: str) -> np.ndarray:
    """``W c_i(x)`` of one stack (tokens summed; CompAlign-mapped first for an aligned head): ``[comp, n, C]``."""
    import torch

    if head.space == "aligned" and align is None:
        raise InputError("this head reads CompAlign-mapped components; pass the alignment")
    stack = stack.sum_tokens()
    if head.space == "aligned":
        stack = _aligned(stack, align)
    w = torch.from_numpy(head.weight)
    if stack.dim != w.shape[1]:
        raise InputError(f"the head is {w.shape[1]} wide but {where} holds {stack.dim}-wide components")
    return torch.einsum("cnd,kd->cnk", stack.values.double(), w).numpy()


def contrastive_scores(store: ComponentStore, labels: WaterbirdsLabels, spurious: np.ndarray, core: np.ndarray, *,
                       split: str = "val", align: CompAlign | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """docs/method.md §4 contrastive score ``s_{i,spurious} − s_{i,core}`` (corr kind) on ``split``'s rows: ``[comp]``.

    Moments are accumulated projected on the stacked text embeddings (``directions = [spurious;
    core]``, so memory is ``comp × m²``); each feature's basis is :func:`~vitdecomp.interpret.score.feature_basis`
    of its embeddings. Also returns ``{"spurious": [comp], "core": [comp], "variance": [comp]}``
    (``variance``: total variance ``tr Σ_i`` of each component over the split, for the variance control).
    """
    from ..interpret.score import ScoreMoments

    spurious = np.asarray(spurious, dtype=np.float64)
    core = np.asarray(core, dtype=np.float64)
    directions = np.concatenate([spurious, core])
    moments: ScoreMoments | None = None
    for chunk in store.iter_batches():
        keep, _, _ = _rows_of_split(store, labels, split, chunk)
        if not keep.any():
            continue
        chunk = _aligned(chunk.sum_tokens(), align)
        if chunk.dim != directions.shape[1]:
            raise InputError(f"text embeddings are {directions.shape[1]} wide but the components are {chunk.dim} wide:"
                             " a non-CLIP model needs a CompAlign map into the text model's space")
        if moments is None:
            moments = ScoreMoments(chunk.n_components, chunk.dim, directions=directions, labels=chunk.names)
        moments.update(chunk.values.movedim(0, 1)[keep])
    if moments is None or moments.count < 2:
        raise InputError(f"{store.path} has fewer than 2 {split} rows; the scores need the val split")
    return _contrast(moments, spurious, core)


def _contrast(moments: Any, spurious: np.ndarray, core: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Contrastive corr score and its parts from accumulated :class:`~vitdecomp.interpret.score.ScoreMoments`."""
    from ..interpret.score import feature_basis, score_table

    table = score_table(moments, {"spurious": feature_basis(spurious), "core": feature_basis(core)}, kind="corr")
    extra = {"spurious": table["spurious"], "core": table["core"], "variance": moments.trace / (moments.count - 1),
             "n": moments.count}
    return table.contrastive("spurious", "core"), extra


# ============================================================================ evaluation
def ablated_logits(split: SplitLogits, rows: Sequence[int], reference_means: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Logits ``[n, C]`` after mean-ablating ``rows`` with ``reference_means [comp, C]`` (see module docs)."""
    rows = sorted({int(r) for r in rows})
    logits = split.contributions.sum(axis=0) + bias[None]
    if rows:
        logits = logits - split.contributions[rows].sum(axis=0) + reference_means[rows].sum(axis=0)[None]
    return logits


def group_accuracy(pred: np.ndarray, y: np.ndarray, place: np.ndarray) -> dict[str, Any]:
    """Accuracy per Waterbirds group ``g = 2 y + place`` (groups present only): ``groups`` {str(g): acc},
    ``worst_group`` (min), ``average_group`` (unweighted mean over groups), ``weighted`` (over samples)."""
    group = 2 * y + place
    per = {str(g): float(np.mean(pred[group == g] == y[group == g])) for g in range(4) if (group == g).any()}
    return {"groups": per, "worst_group": min(per.values()), "average_group": float(np.mean(list(per.values()))),
            "weighted": float(np.mean(pred == y))}


def group_metrics(pred: np.ndarray, y: np.ndarray, place: np.ndarray) -> dict[str, Any]:
    """Accuracy per group ``g = 2 y + place`` and its summaries (groups present only).

    ``worst_group`` = min, ``average_group`` = unweighted mean over groups, ``weighted`` =
    mean weighted by group frequency (= plain accuracy), ``counts`` per group.
    """
    pred, y, place = (np.asarray(a, dtype=np.int64) for a in (pred, y, place))
    if not len(y):
        raise InputError("no items to evaluate")
    out = group_accuracy(pred, y, place)
    group = 2 * y + place
    out["counts"] = {str(g): int((group == g).sum()) for g in range(4) if (group == g).any()}
    return out


@dataclass
class DebiasResult:
    """What :func:`debias` found (all JSON-able through :meth:`to_json`).

    Attributes:
        selected: labels of the top-``k`` contrastive candidates (best first).
        scores: ``{label: {"contrastive", "spurious", "core"}}`` for every candidate (val).
        baseline, ablated, variance_control: :func:`group_metrics` on test (no ablation; the
            selected set; the top-``k`` by val variance).
        random: per draw ``{"components", **group_metrics}``; summaries in :meth:`random_summary`.
        k, seed, head, n: settings, the head's description, and items per split.
    """

    selected: list[str]
    scores: dict[str, dict[str, float]]
    baseline: dict[str, Any]
    ablated: dict[str, Any]
    variance_control: dict[str, Any]
    random: list[dict[str, Any]]
    k: int
    seed: int
    head: dict[str, Any]
    n: dict[str, int]
    variance_components: list[str] = field(default_factory=list)

    def random_summary(self) -> dict[str, float]:
        """Mean, sd (population) and max over the random draws, of WGA and both average accuracies."""
        out: dict[str, float] = {}
        for key in ("worst_group", "average_group", "weighted"):
            vals = np.array([r[key] for r in self.random], dtype=np.float64)
            out[f"{key}_mean"] = float(vals.mean()) if len(vals) else math.nan
            out[f"{key}_sd"] = float(vals.std()) if len(vals) else math.nan
            out[f"{key}_max"] = float(vals.max()) if len(vals) else math.nan
        return out

    def rows(self) -> list[tuple[str, dict[str, Any] | None]]:
        return [("baseline (no ablation)", self.baseline), (f"top-{self.k} contrastive ablated", self.ablated),
                (f"top-{self.k} by variance ablated", self.variance_control)]

    def to_json(self) -> dict[str, Any]:
        return {"selected": self.selected, "k": self.k, "seed": self.seed, "head": self.head, "n": self.n,
                "selection_split": "val", "reference_split": "val", "evaluation_split": "test",
                "baseline": self.baseline, "ablated": self.ablated,
                "variance_control": {"components": self.variance_components, **self.variance_control},
                "random": {"draws": self.random, **self.random_summary()}, "scores": self.scores}

    def format_table(self) -> str:
        """Markdown table: WGA, average-group (unweighted and weighted) and per-group accuracy on test."""
        groups = sorted({g for r in (self.baseline, self.ablated) for g in r["groups"]})
        head = ["", "WGA", "avg-group", "weighted (acc)", *[f"g{g}" for g in groups]]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, m in self.rows():
            cells = [name, f"{m['worst_group']:.3f}", f"{m['average_group']:.3f}", f"{m['weighted']:.3f}",
                     *[f"{m['groups'].get(g, math.nan):.3f}" for g in groups]]
            lines.append("| " + " | ".join(cells) + " |")
        s = self.random_summary()
        per_group = {g: [r["groups"].get(g, math.nan) for r in self.random] for g in groups}
        cells = [f"random {self.k} ({len(self.random)} draws) mean ± sd",
                 f"{s['worst_group_mean']:.3f} ± {s['worst_group_sd']:.3f}",
                 f"{s['average_group_mean']:.3f} ± {s['average_group_sd']:.3f}",
                 f"{s['weighted_mean']:.3f} ± {s['weighted_sd']:.3f}",
                 *[f"{np.mean(per_group[g]):.3f}" for g in groups]]
        lines.append("| " + " | ".join(cells) + " |")
        lines.append("| " + " | ".join([f"random {self.k}: max", f"{s['worst_group_max']:.3f}",
                                          f"{s['average_group_max']:.3f}", f"{s['weighted_max']:.3f}",
                                          *["" for _ in groups]]) + " |")
        return "\n".join(lines)



def check_stores(stores: Mapping[str, ComponentStore], labels: WaterbirdsLabels | None = None) -> None:
    """The stores belong together: same model, weights, decomposition settings and labels; complete;
    made from Waterbirds data whose recorded split (if any) is the role they play.

    Raises:
        InputError: with what differs.
    """
    from ..data.datasets import Waterbirds

    ref_role, ref = next(iter(stores.items()))
    keys = ("model", "weights", "granularity", "start_layer", "ln_mode", "bias_mode", "mlp_neurons", "normalize")
    for role, store in stores.items():
        if not store.is_complete():
            raise InputError(f"{role} store {store.path} is not complete ({len(store.done_chunks())}/{store.n_chunks} "
                             "chunks); finish it with the same `vitdecomp decompose` command first")
        a, b = ref.config.to_json(), store.config.to_json()
        diff = [f"{k}: {a[k]!r} != {b[k]!r}" for k in keys if a[k] != b[k]]
        if diff or list(store.labels) != list(ref.labels):
            raise InputError(f"{role} store {store.path} and {ref_role} store {ref.path} hold different "
                             f"decompositions ({'; '.join(diff) or 'component labels differ'})")
        dataset = (store.config.extra or {}).get("dataset")
        if not isinstance(dataset, Mapping):
            continue
        if dataset.get("kind") != "waterbirds":
            raise InputError(f"{role} store {store.path} was made from a {dataset.get('kind')!r} dataset, not Waterbirds")
        split = dataset.get("split")
        if split is not None and split != role:
            raise InputError(f"{role} store {store.path} holds the {split!r} split")
        if labels is not None:
            now = Waterbirds(labels.root, split).fingerprint()
            if now.get("sha256") != dataset.get("sha256"):
                raise InputError(f"{role} store {store.path} was made from another dataset than {labels.root} "
                                 f"(split {split or 'all'}: dataset fingerprint differs)")


# ============================================================================ the protocol
def debias(stores: Mapping[str, ComponentStore], labels: WaterbirdsLabels, head: ClassifierHead, *,
           spurious: np.ndarray, core: np.ndarray, k: int = 10, random_draws: int = 5, seed: int = 0,
           align: CompAlign | None = None, check: bool = True, kinds: Any = "input") -> DebiasResult:
    """Select on val, mean-ablate with val means, evaluate on test (docs/method.md §6.6; see module docs).

    Args:
        stores: ``{"val": store, "test": store}`` (``"train"`` is only needed to fit a linear head,
            beforehand, with :func:`fit_linear_head`); one store may serve several roles.
        labels: the Waterbirds metadata (y, place and split of every item id).
        head: the classifier (zero-shot or linear).
        spurious, core: unit text embeddings ``[n_s, d_text]``, ``[n_c, d_text]`` (places, birds).
        k: components to ablate.
        random_draws: seeded draws of ``k`` random candidates (the control).
        seed: seed of the random draws.
        align: CompAlign maps for a non-CLIP model (scores read ``F_i c_i``).
        check: run :func:`check_stores` first.
    """
    _check_settings(k, random_draws)
    for role in ("val", "test"):
        if role not in stores:
            raise InputError(f"debias needs a {role} store")
    if check:
        check_stores(stores, labels)
    val_store, test_store = stores["val"], stores["test"]
    names = list(val_store.labels)
    allowed = candidate_mask(names, kinds)
    if k > int(allowed.sum()):
        raise InputError(f"k = {k} but the stores have only {int(allowed.sum())} candidate components")
    contrast, parts = contrastive_scores(val_store, labels, spurious, core, split="val", align=align)
    head_align = align if head.space == "aligned" else None
    val = project_split(val_store, labels, "val", head, align=head_align)
    test = project_split(test_store, labels, "test", head, align=head_align)
    return _protocol(names, contrast, parts, val, test, head, k=k, random_draws=random_draws, seed=seed,
                     kinds=kinds)


def _check_settings(k: int, random_draws: int) -> None:
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")
    if random_draws < 0:
        raise InputError(f"random draws must be >= 0, got {random_draws}")


def _protocol(names: Sequence[str], contrast: np.ndarray, parts: Mapping[str, Any], val: SplitLogits,
              test: SplitLogits, head: ClassifierHead, *, k: int, random_draws: int, seed: int,
              kinds: Any = "input") -> DebiasResult:
    """Select the top-``k`` contrastive candidates, mean-ablate with val means, evaluate on test (+ controls)."""
    allowed = candidate_mask(names, kinds)
    if k > int(allowed.sum()):
        raise InputError(f"k = {k} but there are only {int(allowed.sum())} candidate components")
    chosen = top_k(contrast, allowed, k)
    by_variance = top_k(parts["variance"], allowed, k)
    log.info("selected on val (%d items): %s", parts["n"], ", ".join(names[i] for i in chosen))
    means = val.means()  # the explicit reference: val means

    def evaluate(rows: Sequence[int]) -> dict[str, Any]:
        return group_metrics(ablated_logits(test, rows, means, head.bias).argmax(1), test.y, test.place)

    draws = random_sets(np.random.default_rng(seed), allowed, k, random_draws)
    random_runs = [{"components": [names[i] for i in rows], **evaluate(rows)} for rows in draws]
    scores = {names[i]: {"contrastive": float(contrast[i]), "spurious": float(parts["spurious"][i]),
                         "core": float(parts["core"][i])} for i in np.flatnonzero(allowed)}
    return DebiasResult(
        selected=[names[i] for i in chosen], scores=scores, baseline=evaluate([]), ablated=evaluate(chosen),
        variance_control=evaluate(by_variance), random=random_runs, k=k, seed=seed, head=head.describe(),
        n={"val": val.n, "test": test.n, **({"train": int(head.meta["n_train"])} if "n_train" in head.meta else {})},
        variance_components=[names[i] for i in by_variance],
    )


# ============================================================================ in memory
@dataclass(frozen=True)
class StackSplit:
    """One split held in memory: its decomposition and the Waterbirds metadata of its items.

    Attributes:
        stack: :class:`~vitdecomp.ComponentStack`, values ``[comp, n, (token,) d]`` (tokens are summed).
        y: ``[n]`` int class; place: ``[n]`` int spurious attribute (0 / 1); ``group = 2 y + place``.
        ids: item names (default ``"0" .. "n-1"``).
    """

    stack: Any
    y: np.ndarray
    place: np.ndarray
    ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        y = np.asarray(self.y, dtype=np.int64).reshape(-1)
        place = np.asarray(self.place, dtype=np.int64).reshape(-1)
        n = self.stack.batch_size
        if y.shape != (n,) or place.shape != (n,):
            raise InputError(f"a split of {n} items needs y and place of length {n}, got {y.shape[0]} and "
                             f"{place.shape[0]}")
        if not (np.isin(y, (0, 1)).all() and np.isin(place, (0, 1)).all()):
            raise InputError("y and place must be 0 or 1")
        ids = tuple(str(i) for i in self.ids) if self.ids else tuple(str(i) for i in range(n))
        if len(ids) != n:
            raise InputError(f"{len(ids)} ids for a split of {n} items")
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "place", place)
        object.__setattr__(self, "ids", ids)


def fit_linear_head_stack(split: StackSplit, *, c: float = 1.0, seed: int = 0, max_iter: int = 2000,
                          align: CompAlign | None = None, class_names: Sequence[str] = WATERBIRDS_CLASS_NAMES
                          ) -> ClassifierHead:
    """:func:`fit_linear_head` on an in-memory split: logistic regression of ``y`` on ``z = Σ_i c_i`` (or
    ``Σ_i F_i c_i`` with ``align``)."""
    stack = _aligned(split.stack.sum_tokens(), align)
    x = stack.values.double().sum(0).numpy()
    return linear_head_from_features(x, split.y, c=c, seed=seed, max_iter=max_iter,
                                     space="aligned" if align is not None else "model", class_names=class_names)


def project_stack(split: StackSplit, head: ClassifierHead, *, name: str = "test",
                  align: CompAlign | None = None) -> SplitLogits:
    """:func:`project_split` of an in-memory split: ``W c_i(x)`` for every component, ``[comp, n, C]``."""
    contrib = _contributions(split.stack, head, align, where=f"the {name} stack")
    return SplitLogits(name, contrib, split.y, split.place, list(split.ids))


def contrastive_scores_stack(stack: Any, spurious: np.ndarray, core: np.ndarray, *,
                             align: CompAlign | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`contrastive_scores` of an in-memory stack ``[comp, n, (token,) d]`` (the val split)."""
    from ..interpret.score import ScoreMoments

    spurious = np.asarray(spurious, dtype=np.float64)
    core = np.asarray(core, dtype=np.float64)
    stack = _aligned(stack.sum_tokens(), align)
    if stack.dim != spurious.shape[1] or stack.dim != core.shape[1]:
        raise InputError(f"text embeddings are {spurious.shape[1]} / {core.shape[1]} wide but the components are "
                         f"{stack.dim} wide: a non-CLIP model needs a CompAlign map into the text model's space")
    if stack.batch_size < 2:
        raise InputError("the val split has fewer than 2 items; the scores need at least 2")
    moments = ScoreMoments.from_stack(stack, directions=np.concatenate([spurious, core]))
    return _contrast(moments, spurious, core)


def debias_stacks(val: StackSplit, test: StackSplit, head: ClassifierHead, *, spurious: np.ndarray,
                  core: np.ndarray, k: int = 10, random_draws: int = 5, seed: int = 0,
                  align: CompAlign | None = None, kinds: Any = "input") -> DebiasResult:
    """:func:`debias` on in-memory splits (same protocol and result): select on ``val``, mean-ablate
    with ``val`` means, evaluate on ``test``; controls as in :func:`debias`.

    Raises:
        InputError: the two stacks hold different components, or bad settings.
    """
    _check_settings(k, random_draws)
    names = list(val.stack.names)
    if names != list(test.stack.names):
        raise InputError("the val and test stacks hold different components")
    contrast, parts = contrastive_scores_stack(val.stack, spurious, core, align=align)
    head_align = align if head.space == "aligned" else None
    return _protocol(names, contrast, parts, project_stack(val, head, name="val", align=head_align),
                     project_stack(test, head, name="test", align=head_align), head, k=k, random_draws=random_draws,
                     seed=seed, kinds=kinds)


# ============================================================================ the whole run
@dataclass
class DebiasRun:
    """What :func:`run_debias` did: the result and everything it was made from.

    Attributes:
        result: the :class:`DebiasResult` (selection, test metrics, controls).
        texts: the texts used (the dataset's defaults, each overridden by an argument given).
        from_arguments: which of ``class_names``, ``spurious``, ``core``, ``templates`` were given.
        head: the classifier head.
        model, weights: the model the stores hold.
        stores: the stores by split (``train`` only for a linear head when made here).
        root: the dataset root; ``align_file``: the CompAlign file read, or None.
    """

    result: DebiasResult
    texts: DebiasTexts
    from_arguments: list[str]
    head: ClassifierHead
    model: str
    weights: str
    stores: dict[str, ComponentStore]
    root: Path
    align_file: Path | None = None

    def texts_record(self) -> dict[str, Any]:
        """The ``"texts"`` entry of ``debias.json``: every text, the pools' manifests, their source and
        which of them came from arguments."""
        return {**self.texts.describe(), "from_arguments": list(self.from_arguments)}

    def to_json(self) -> dict[str, Any]:
        """``debias.json`` of ``vitdecomp debias`` without its run record."""
        return {"texts": self.texts_record(), **self.result.to_json()}


def _class_names(class_names: Sequence[str | Sequence[str]]) -> tuple[tuple[str, ...], ...]:
    """Per class its names: a string ``"a|b"`` ensembles several names."""
    names = tuple(tuple(n.strip() for n in (cls.split("|") if isinstance(cls, str) else cls) if n.strip())
                  for cls in class_names)
    if not all(names):
        raise InputError(f"empty class name in --class-names {list(class_names)}")
    return names


def run_debias(
    root: str | Path,
    model: Model | str | None = None,
    *,
    stores: Sequence[ComponentStore | str | Path] | Mapping[str, ComponentStore | str | Path] | None = None,
    store_dir: str | Path | None = None,
    head: Literal["zero-shot", "linear", "model"] = "zero-shot",
    k: int = 10,
    random_draws: int = 5,
    seed: int = 0,
    class_names: Sequence[str | Sequence[str]] | None = None,
    templates: str | None = None,
    spurious: str | Path | TextPool | None = None,
    core: str | Path | TextPool | None = None,
    c: float = 1.0,
    align: CompAlign | str | Path | None = None,
    text_model: Model | str | None = None,
    pretrained: bool | None = None,
    checkpoint: str | Path | None = None,
    device: str | None = "cpu",
    batch_size: int = 64,
    granularity: Literal["layer", "head"] = "head",
    start_layer: int = 0,
    store_dtype: Literal["float16", "float32"] = "float16",
    num_workers: int = 0,
    progress: bool = False,
    kinds: Any = "input",
) -> DebiasRun:
    """Remove a spurious cue by mean-ablating the components that carry it: ``vitdecomp debias`` in one call.

    docs/method.md §6.6, see the module docs: components are ranked on val by the contrastive score
    ``s_i = s_{i,spurious} − s_{i,core}``, the top ``k`` candidates are mean-ablated with val means
    (``logits'(x) = W (z(x) − Σ_{i∈S} c_i(x) + Σ_{i∈S} μ_i^{val}) + b``), and worst-group / average-group
    accuracy on test is compared with ``random_draws`` random sets of ``k`` and the top ``k`` by variance.

    Args:
        root: the dataset: a Waterbirds root (``metadata.csv``) or one written by
            ``vitdecomp synth generate --spurious P`` (its ``task.json`` supplies the default texts,
            :func:`dataset_texts`).
        model: the model (a Model, or a spec). With ``stores`` it defaults to the stores' own model,
            rebuilt from their record (a spec must name the same model); with ``store_dir`` it is required.
        stores: existing complete stores ``(train, val, test)`` or ``{split: store}`` (objects or paths;
            one store of all splits may serve every role); or
        store_dir: make (or resume, or reuse) one store per split under ``store_dir/{train,val,test}``
            (train only for a linear head) with :func:`~vitdecomp.store.dataset_run.decompose_dataset`
            (``batch_size``, ``granularity``, ``start_layer``, ``store_dtype``, ``num_workers``).
        head: ``"zero-shot"`` (text of the class names), ``"linear"`` (logistic regression on train,
            inverse regularisation ``c``, ``seed``) or ``"model"`` (the model's own 2-class classifier).
        k, random_draws, seed: components ablated, random control draws, their seed.
        class_names, templates, spurious, core: override the dataset's default texts (class names per
            class, ``"a|b"`` ensembling several; template set; pool names, text files or TextPools).
        align, text_model: for a non-CLIP model, CompAlign maps into a CLIP space and the CLIP (Model or
            spec) whose text tower embeds the texts; the scores read ``F_i c_i``.
        pretrained, checkpoint, device: how a model spec is loaded (``pretrained`` None: follow the
            stores' record, or pretrained weights for ``store_dir``).
        progress: progress bars while making stores.

    Returns:
        A :class:`DebiasRun`; ``to_json()`` is ``debias.json`` without its run record.

    Raises:
        InputError: bad settings, a malformed ``metadata.csv``, stores of another model or dataset,
            a model without a text tower (and no alignment), no 2-class classifier for ``head="model"``.
    """
    from ..core.loading import load
    from ..core.model import Model as _Model
    from ..errors import UnsupportedModelError
    from ..interpret.align import CompAlign, find_alignment
    from ..interpret.text import text_encoder
    from ..interpret.text.pools import TextPool, load_pool
    from ..store.dataset_run import decompose_dataset
    from ..store.reopen import load_store_model, open_complete_store

    if k < 1:
        raise InputError("--k must be at least 1")
    if random_draws < 1:
        raise InputError("--random-draws must be at least 1 (the random control)")
    if (align is None) != (text_model is None):
        raise InputError("--align and --text-model go together (a non-CLIP model read through CompAlign)")
    if (stores is None) == (store_dir is None):
        raise InputError("give the stores (--stores TRAIN VAL TEST) or a folder to make them in (--store-dir)")
    if head not in ("zero-shot", "linear", "model"):
        raise InputError(f"head must be 'zero-shot', 'linear' or 'model', got {head!r}")
    labels = WaterbirdsLabels.read(root)  # clear errors for a missing or malformed metadata.csv
    defaults = dataset_texts(root)  # a generated world's own texts (task.json), else the Waterbirds ones
    given = {"class_names": class_names, "spurious": spurious, "core": core, "templates": templates}
    spurious_pool = defaults.spurious if spurious is None else (
        spurious if isinstance(spurious, TextPool) else load_pool(spurious))
    core_pool = defaults.core if core is None else (core if isinstance(core, TextPool) else load_pool(core))
    used_templates = templates if templates is not None else defaults.templates
    names = _class_names(class_names) if class_names is not None else tuple(tuple(c_) for c_ in defaults.class_names)
    texts = DebiasTexts(names, spurious_pool, core_pool, used_templates, defaults.source)

    opened: dict[str, ComponentStore] | None = None
    if stores is not None:
        items = stores.items() if isinstance(stores, Mapping) else zip(SPLITS, stores)
        opened = {split: s if not isinstance(s, (str, Path)) else open_complete_store(s, role=f"{split} store")
                  for split, s in items}
        if "val" not in opened:
            raise InputError("debias needs a val store")
        spec = model if isinstance(model, str) else (model.name if model is not None else opened["val"].config.model)
        if not isinstance(model, _Model):
            model = load_store_model(opened["val"], model, checkpoint, pretrained=pretrained, device=device)
    elif model is None:
        raise InputError("--model is required with --store-dir")
    else:
        spec = model if isinstance(model, str) else model.name
        if not isinstance(model, _Model):
            model = load(model, pretrained=pretrained is not False, checkpoint=checkpoint, device=device)
    if opened is None:
        assert store_dir is not None
        opened = {}
        for split in SPLITS:
            if split == "train" and head != "linear":
                continue
            path = Path(store_dir) / split
            log.info("store %s (%s split)", path, split)
            made = decompose_dataset(model, root, path, batch_size=batch_size, granularity=granularity,
                                     start_layer=start_layer, store_dtype=store_dtype, kind="waterbirds", split=split,
                                     num_workers=num_workers, progress=progress)
            opened[split] = made.store
    for role, store in opened.items():
        if store.config.model != model.name or store.config.weights != model.weights:
            raise InputError(f"{role} store {store.path} holds {store.config.model} ({store.config.weights}), "
                             f"not --model {spec} ({model.name}, {model.weights})")
    check_stores(opened, labels)

    maps: CompAlign | None = None
    align_file: Path | None = None
    if align is not None:
        if isinstance(align, CompAlign):
            maps = align
        else:
            align_file = Path(align)
            maps = CompAlign.load(find_alignment(align_file))
        tower = text_model if isinstance(text_model, _Model) else load(str(text_model), device=device)
        hint = "--text-model must be a CLIP model"
    else:
        tower, hint = model, "pass --align MAPS --text-model CLIP_SPEC (CompAlign into a CLIP space)"
    try:
        encoder = text_encoder(tower)
    except UnsupportedModelError as exc:
        raise InputError(f"{tower.name} has no text tower: {hint}") from exc
    spurious_emb = embed_texts(encoder, spurious_pool.texts, used_templates)
    core_emb = embed_texts(encoder, core_pool.texts, used_templates)

    if head == "zero-shot":
        classifier = zero_shot_classifier(encoder, [list(n) for n in names], used_templates,
                                          space="aligned" if maps is not None else "model")
    elif head == "linear":
        if "train" not in opened:
            raise InputError("a linear head needs a train store")
        classifier = fit_linear_head(opened["train"], labels, c=c, seed=seed)
    else:
        weights = model.classifier()
        if weights is None or weights[0].shape[0] != 2:
            raise InputError(f"--head model needs a 2-class classifier; {spec} has "
                             f"{'none' if weights is None else f'{weights[0].shape[0]} classes'}")
        w, b = weights
        classifier = ClassifierHead(w.detach().double().numpy(),
                                    b.detach().double().numpy() if b is not None else [0.0, 0.0], "model")
    result = debias(opened, labels, classifier, spurious=spurious_emb, core=core_emb, k=k,
                    random_draws=random_draws, seed=seed, align=maps, check=False, kinds=kinds)
    return DebiasRun(result=result, texts=texts, from_arguments=[n for n, v in given.items() if v is not None],
                     head=classifier, model=model.name, weights=model.weights, stores=opened, root=Path(root),
                     align_file=align_file)
