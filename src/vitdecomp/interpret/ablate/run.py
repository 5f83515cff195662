"""What ``vitdecomp ablate`` computes: a stored decomposition's accuracy with components ablated (docs/method.md §6.1).

:func:`run_ablation` makes two streaming passes over the stores: the reference set first (per-component
means ``μ_i = mean_{x∈R} c_i(x)`` and, for the linear head, its normal equations), then the evaluated
rows, where the unablated point, the chosen set and every point of the cumulative block curves are
scored together (:func:`~vitdecomp.interpret.ablate.kernels.accuracy_over_batches`)::

    z'_S(x) = Σ_i c_i(x) + Σ_{i∈S} (r_i(x) − c_i(x)),   r_i = μ_i (mean), 0 (zero), c_i(x_π(x)) (resample)

and ``argmax`` of a head on ``z'_S`` against the store's targets. The reference set ``R`` is explicit: another
store of the same model and settings, a seeded split of the store disjoint from the evaluated rows, or the
evaluated rows themselves.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import numpy as np

from ...errors import InputError
from ..inputs import ModelChoice, StoreLike, iter_store_batches, open_store, read_classes, resolve_model, text_tower
from .kernels import AblationMode, CurveDirection, accuracy_over_batches, curve_sets

if TYPE_CHECKING:
    import torch

    from ...core.model import Model
    from ...core.stack import ComponentStack
    from ...store.component_store import ComponentStore

__all__ = ["ROWS_RECORDED", "AblationResult", "HeadKind", "Reference", "TopComponents", "check_compatible",
           "components_from_scores", "resample_uniform", "run_ablation", "take_items"]

log = logging.getLogger(__name__)

ROWS_RECORDED = 100_000
"""Reference / evaluated row lists up to this length are recorded in full (always their sha256)."""
_RESAMPLE_KEY = 0x5DEECE66D  # decorrelates the resample draw from the reference split of the same seed
_COMPATIBLE_IGNORED = ("n_items", "batch_size", "dtype", "package_version", "extra.dataset")

HeadKind = Literal["zero-shot", "model", "linear"]
#: The reference set: another store (or its path), a fraction ``F`` of the store's rows (``u(seed, r) < F``),
#: ``"self"`` (the evaluated rows), or None (none; only ``mode="zero"`` with a zero-shot or model head).
Reference = Union["ComponentStore", str, os.PathLike, float, Literal["self"], None]


@dataclass(frozen=True)
class TopComponents:
    """The ``k`` best components of a ``vitdecomp score --out`` result (``score.json``).

    Attributes:
        path: the score.json file.
        by: ``"contrast"`` (its contrast ranking) or a feature name (that feature's scores); default:
            the contrast when the file has one, else its only feature.
        k: how many.
        variant: the score variant (default: the file's first table).
    """

    path: Path
    by: str | None = None
    k: int = 10
    variant: str | None = None

    def __post_init__(self) -> None:
        if self.k < 1:
            raise InputError("--top-k must be at least 1")

    def resolve(self) -> list[str]:
        """The component labels, best first (:func:`components_from_scores`)."""
        return components_from_scores(self.path, by=self.by, k=self.k, variant=self.variant)


def components_from_scores(path: str | os.PathLike, *, by: str | None = None, k: int = 10,
                           variant: str | None = None) -> list[str]:
    """The ``k`` best components of a ``score.json``: by its contrast ranking or by one feature's scores
    (descending, stable).

    Raises:
        InputError: not a score result, or an unknown variant / feature / ranking.
    """
    from ..score.tables import ScoreTable

    path = Path(path)
    if not path.is_file():
        raise InputError(f"--top-from {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        tables = data["tables"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"--top-from {path} is not a `vitdecomp score` result: {exc}") from exc
    if not tables:
        raise InputError(f"--top-from {path} holds no score tables")
    variant = variant or next(iter(tables))
    if variant not in tables:
        raise InputError(f"--top-variant {variant} not in {path} (has {list(tables)})")
    table = ScoreTable.from_json(tables[variant])
    if by is None:
        if "contrast" in data:
            by = "contrast"
        elif len(table.features) == 1:
            by = table.features[0]
        else:
            raise InputError(f"{path} scores {len(table.features)} features; say which with --top-by "
                             f"({', '.join(table.features)})")
    if by == "contrast":
        if "contrast" not in data:
            raise InputError(f"{path} has no contrast ranking (run `vitdecomp score ... --contrast SPURIOUS CORE`)")
        return list(data["contrast"]["by_variant"][variant]["ranking"][:k])
    if by not in table.features:
        raise InputError(f"--top-by {by}: not a feature of {path} ({', '.join(table.features)}) nor 'contrast'")
    col = table[by]
    return [table.labels[i] for i in np.argsort(-col, kind="stable")[:k]]


def check_compatible(store: ComponentStore, ref: ComponentStore) -> None:
    """A reference store must hold the same components of the same model run the same way (its items,
    chunk size and storage dtype may differ); the same dataset in both is only warned about.

    Raises:
        InputError: the configurations, labels, width or space differ.
    """
    problems = [d for d in store.config.diff(ref.config)
                if not any(d.startswith(f"{key}:") or d.startswith(f"{key}.") for key in _COMPATIBLE_IGNORED)]
    if list(store.labels) != list(ref.labels):
        problems.append("components (labels) differ")
    if store.comp_shape[-1] != ref.comp_shape[-1]:
        problems.append(f"width {store.comp_shape[-1]} != {ref.comp_shape[-1]}")
    if store.space != ref.space:
        problems.append(f"space {store.space} != {ref.space}")
    if problems:
        raise InputError(f"reference store {ref.path} does not match {store.path}: " + "; ".join(problems[:8]))
    ds, dr = store.config.extra.get("dataset"), ref.config.extra.get("dataset")
    if ds is not None and ds == dr:
        log.warning("the reference store %s holds the same dataset as %s: the means come from the evaluated "
                    "images (use a separate split)", ref.path, store.path)


def resample_uniform(rows: np.ndarray, seed: int) -> np.ndarray:
    """``u(seed, r) ∈ [0, 1)`` per row ``r`` ``[n]`` from splitmix64, keyed apart from the reference split of
    the same seed (:func:`~vitdecomp.interpret.align.validation_mask` uses the unkeyed seed): the resampled
    reference item of row ``r`` is ``R[⌊u · |R|⌋]``."""
    from ..align.data import splitmix64

    key = splitmix64(np.asarray([seed ^ _RESAMPLE_KEY], dtype=np.int64).astype(np.uint64))[0]
    with np.errstate(over="ignore"):
        h = splitmix64(np.asarray(rows, dtype=np.int64).astype(np.uint64) ^ key)
    return (h >> np.uint64(11)).astype(np.float64) / float(2**53)


def take_items(stack: ComponentStack, keep: np.ndarray) -> ComponentStack:
    """The items of a (token-summed) stack where the bool mask ``keep [batch]`` is true (or at the indices
    ``keep``), with the per-item ``meta`` lists (``rows``, ``ids``, ``valid``) taken alike."""
    import torch

    idx = torch.as_tensor(np.flatnonzero(keep) if keep.dtype == bool else keep, dtype=torch.long)
    return stack.take_items(idx)  # per-item meta lists follow (ComponentStack.take_items)


class _ReferencePass:
    """Pass 1: per-component sums (means) and, for the linear head, normal equations over the reference rows."""

    def __init__(self, n_components: int, dim: int, *, linear: bool) -> None:
        import torch

        self.sum = torch.zeros(n_components, dim, dtype=torch.float64)
        self.count = 0
        self.rows: list[np.ndarray] = []
        self.linear = linear
        self.gram = torch.zeros(dim + 1, dim + 1, dtype=torch.float64) if linear else None
        self.class_sums: dict[int, torch.Tensor] = {}

    def update(self, stack: ComponentStack, targets: np.ndarray) -> None:
        import torch

        values = stack.values.to(torch.float64)  # [comp, b, d]
        self.sum += values.sum(1)
        self.count += values.shape[1]
        self.rows.append(np.asarray(stack.meta["rows"], dtype=np.int64))
        if self.linear:
            assert self.gram is not None
            known = torch.as_tensor(targets >= 0)
            x = torch.cat([values.sum(0), torch.ones(values.shape[1], 1, dtype=torch.float64)], 1)[known]
            self.gram += x.T @ x
            for c in np.unique(targets[targets >= 0]).tolist():
                part = x[torch.as_tensor(targets[targets >= 0] == c)].sum(0)
                self.class_sums[int(c)] = self.class_sums.get(int(c), 0) + part

    @property
    def means(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    def all_rows(self) -> np.ndarray:
        return np.concatenate(self.rows) if self.rows else np.zeros(0, dtype=np.int64)

    def fit_linear(self, n_classes: int, ridge: float) -> tuple[torch.Tensor, dict[str, Any]]:
        """Ridge least squares ``W = (X̃ᵀX̃ + λ I')⁻¹ X̃ᵀY`` on ``x̃ = [z, 1]`` and one-hot ``Y``
        (``I'`` leaves the intercept unpenalised, ``λ = ridge · tr(ZᵀZ)/d``): ``[d + 1, C]``."""
        import torch

        assert self.gram is not None
        n = int(round(float(self.gram[-1, -1])))
        if n < 2 or len(self.class_sums) < 2:
            raise InputError(f"--head linear needs reference rows of at least 2 classes with known targets "
                             f"(got {n} rows, {len(self.class_sums)} classes)")
        d = self.gram.shape[0] - 1
        n_classes = max(n_classes, max(self.class_sums) + 1)
        xty = torch.zeros(d + 1, n_classes, dtype=torch.float64)
        for c, v in self.class_sums.items():
            xty[:, c] = v
        lam = ridge * float(torch.trace(self.gram[:d, :d])) / d
        penalty = torch.eye(d + 1, dtype=torch.float64) * lam
        penalty[-1, -1] = 0.0
        w = torch.linalg.solve(self.gram + penalty, xty)
        return w, {"fit": "ridge least squares on one-hot targets, intercept unpenalised", "n_classes": n_classes,
                   "ridge": ridge,
                   "lambda": lam, "n_train": n, "classes_seen": sorted(self.class_sums)}


def _rows_record(rows: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {"n_rows": int(rows.size),
                           "rows_sha256": hashlib.sha256(np.ascontiguousarray(rows, dtype="<i8").tobytes()).hexdigest()}
    if rows.size <= ROWS_RECORDED:
        out["rows"] = rows.tolist()
    return out


@dataclass
class AblationResult:
    """What :func:`run_ablation` computed.

    Attributes:
        store: the evaluated store; ``reference_store`` the reference store, if one.
        mode, seed: the ablation mode and seed.
        head: the head's record (``kind`` ``zero-shot`` / ``model`` / ``linear`` and its details).
        n_classes: classes of the head.
        reference: the reference set's record (``kind`` store / split / self, its rows and their sha256),
            None without one.
        evaluated: the evaluated rows' record.
        components: the ablated components (labels, store order).
        unablated, ablated: ``{"correct", "n", "accuracy"}`` without and with the components ablated
            (``ablated`` None without components).
        curves: direction -> one point per number of blocks ablated: ``{"n_blocks", "components", "correct",
            "n", "accuracy"}``.
        files: input files by role (``classes``, ``top_from``).
    """

    store: ComponentStore
    mode: AblationMode
    seed: int
    head: dict[str, Any]
    n_classes: int
    reference: dict[str, Any] | None
    evaluated: dict[str, Any]
    components: list[str]
    unablated: dict[str, Any]
    ablated: dict[str, Any] | None
    curves: dict[str, list[dict[str, Any]]]
    reference_store: ComponentStore | None = None
    files: dict[str, Path] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """``ablate.json`` without the run record (the CLI adds ``"run"`` first)."""
        return {"store": str(self.store.path), "mode": self.mode, "seed": self.seed, "head": self.head,
                "reference": self.reference, "evaluated": self.evaluated, "components": list(self.components),
                "unablated": self.unablated, "ablated": self.ablated, "curves": self.curves}

    def curve_points(self) -> dict[str, list[tuple[int, float | None]]]:
        """direction -> ``[(n_blocks, accuracy), ...]`` (for :func:`vitdecomp.report.figures.ablation_curves`)."""
        return {d: [(p["n_blocks"], p["accuracy"]) for p in pts] for d, pts in self.curves.items()}

    def format(self) -> str:
        """The table ``vitdecomp ablate`` prints."""
        ref, head = self.reference, self.head
        where = "none" if ref is None else {
            "store": lambda: f"store {ref.get('store')}",
            "split": lambda: f"split of the store (fraction {ref['fraction']}, seed {ref['seed']})",
            "self": lambda: "the evaluated rows themselves",
        }[ref["kind"]]()
        lines = [
            f"ablate {self.store.path}: mode {self.mode}, head {head['kind']} ({self.n_classes} classes), "
            f"reference {where}" + (f" ({ref['n_rows']} rows)" if ref else ""),
            f"evaluated rows: {self.evaluated['n_rows']}",
            f"unablated accuracy  {_acc(self.unablated)}",
        ]
        if self.ablated is not None:
            base, abl = self.unablated["accuracy"], self.ablated["accuracy"]
            delta = f"  (change {abl - base:+.4f})" if base is not None and abl is not None else ""
            comps = self.components
            shown = " ".join(comps[:8]) + (" ..." if len(comps) > 8 else "")
            lines.append(f"ablated accuracy    {_acc(self.ablated)}{delta}  [{len(comps)} components: {shown}]")
        for d, points in self.curves.items():
            lines.append(f"curve {d} (blocks ablated -> accuracy):")
            lines += [f"  {p['n_blocks']:>3}  {_acc(p)}" for p in points]
        return "\n".join(lines)


def _acc(entry: dict[str, Any] | None) -> str:
    return "n/a" if entry is None or entry["accuracy"] is None else f"{entry['accuracy']:.4f}"


def run_ablation(
    store: StoreLike,
    head: HeadKind,
    *,
    classes: Sequence[str] | str | os.PathLike | None = None,
    templates: str | Sequence[str] = "photo",
    components: Sequence[str] | TopComponents = (),
    mode: AblationMode = "mean",
    reference: Reference = None,
    seed: int = 0,
    curves: Sequence[CurveDirection] = ("from_last", "from_first"),
    ridge: float = 1e-3,
    model: Model | ModelChoice | None = None,
    progress: bool = False,
) -> AblationResult:
    """Top-1 accuracy of a finished store's representations with components ablated, streamed.

    For every evaluated row ``x`` with a known target, and each set ``S`` (none: the unablated point;
    ``components``; every prefix of blocks of each curve, :func:`~vitdecomp.interpret.ablate.kernels.curve_sets`),
    ``z'_S(x) = Σ_i c_i(x) + Σ_{i∈S} (r_i(x) − c_i(x))`` (tokens summed, ``[d]``) with ``r_i`` the reference
    mean ``μ_i`` (``mode="mean"``), 0 (``"zero"``) or ``c_i`` of the reference item drawn for ``x``
    (``"resample"``, :func:`resample_uniform`), is classified by the head:

    * ``"zero-shot"``: ``argmax_k ⟨z', w_k⟩``, ``w_k`` the store model's text embeddings of ``classes``;
    * ``"model"``: the model's own classifier ``argmax_k (z' Wᵀ + b)_k``;
    * ``"linear"``: ridge least squares on one-hot targets over the reference rows,
      ``W = (X̃ᵀX̃ + λI')⁻¹X̃ᵀY`` with ``x̃ = [z, 1]``, ``λ = ridge · tr(ZᵀZ)/d`` (intercept unpenalised).

    Args:
        store: a finished store with targets, or its path.
        head: ``"zero-shot"`` (needs ``classes``), ``"model"`` or ``"linear"`` (needs a reference set
            disjoint from the evaluated rows).
        classes: class names (line ``k`` = target ``k``) or their file, for the zero-shot head.
        templates: template set of the class names.
        components: labels to ablate, or :class:`TopComponents` of a score result.
        mode: ``"mean"``, ``"zero"`` or ``"resample"``.
        reference: the reference set (:data:`Reference`): needed by ``"mean"``, ``"resample"`` and the linear
            head. A fraction ``F`` takes the rows with ``u(seed, r) < F`` (never evaluated).
        seed: seed of the split and of the resample draw.
        curves: cumulative block curves to score (``"from_last"``, ``"from_first"``).
        ridge: the linear head's relative ridge.
        model: the store's model (zero-shot and model heads; default rebuilt from the record), or a
            :class:`~vitdecomp.interpret.inputs.ModelChoice`.
        progress: progress bars on stderr.

    Returns:
        An :class:`AblationResult` (``to_json()`` is ``ablate.json`` without the run record).

    Raises:
        InputError: bad arguments, an unfinished store or one without targets, unknown components, no or the
            wrong reference set, an incompatible reference store, a head that does not fit the store.
    """
    import torch

    from ..align.data import validation_mask
    from ..text import resolve_templates, zero_shot_head

    if head not in ("zero-shot", "model", "linear"):
        raise InputError(f"head must be zero-shot, model or linear, got {head!r}")
    if mode not in ("mean", "zero", "resample"):
        raise InputError(f"unknown ablation mode {mode!r}; use mean, zero or resample")
    directions = list(dict.fromkeys(curves))
    bad = [d for d in directions if d not in ("from_last", "from_first")]
    if bad:
        raise InputError(f"curves {bad}: use from_last and/or from_first")
    fraction: float | None = None
    if isinstance(reference, (float, int)) and not isinstance(reference, bool):
        fraction = float(reference)
        if not 0.0 < fraction < 1.0:
            raise InputError(f"--reference-fraction must be in (0, 1), got {reference}")
    files: dict[str, Path] = {}
    names: list[str] | None = None
    if head == "zero-shot":
        if classes is None:
            raise InputError("the zero-shot head needs the class names (--classes FILE)")
        if isinstance(classes, (str, os.PathLike)):
            names = read_classes(classes)
            files["classes"] = Path(classes)
        else:
            names = [str(c) for c in classes]
    elif classes is not None:
        raise InputError(f"classes are read by the zero-shot head only, not by head={head!r}")
    store = open_store(store)
    labels = list(store.labels)

    # ---- components
    if isinstance(components, TopComponents):
        chosen_names = components.resolve()
        files["top_from"] = Path(components.path)
    else:
        chosen_names = list(dict.fromkeys(components))
    unknown = [c for c in chosen_names if c not in labels]
    if unknown:
        raise InputError(f"no component(s) {unknown[:5]} in {store.path} (it has {', '.join(labels[:6])}, ...)")
    chosen = sorted(labels.index(c) for c in chosen_names)
    if not chosen and not directions:
        raise InputError("nothing to do: give --components / --top-from, or a --curve")
    sets: dict[str, list[int]] = {"unablated": []}
    if chosen:
        sets["ablated"] = chosen
    curve_rows = {d: curve_sets(labels, d) for d in directions}
    for d, rows in curve_rows.items():
        for n, s in enumerate(rows):
            sets[f"{d}:{n}"] = s

    # ---- reference set
    needs_ref = mode != "zero" or head == "linear"
    kind = (None if reference is None else "self" if reference == "self" else "split" if fraction is not None
            else "store")
    if needs_ref and kind is None:
        what = "--head linear" if mode == "zero" else f"--mode {mode}"
        raise InputError(f"{what} needs an explicit reference set: --reference-store REF, "
                         "--reference-fraction F [--seed S], or --reference-self")
    if head == "linear" and kind == "self":
        raise InputError("--head linear is fitted on the reference set, which must be disjoint from the evaluated "
                         "rows: use --reference-store or --reference-fraction")
    ref_store = None
    if kind == "store":
        ref_store = open_store(reference, role="reference store")  # type: ignore[arg-type]
        check_compatible(store, ref_store)

    # ---- targets
    all_targets = store.targets(slice(None))
    if not (all_targets >= 0).any():
        raise InputError(f"{store.path} has no class targets (decompose a labelled dataset, e.g. a class folder)")

    # ---- head (zero-shot / model) before the passes, so bad input fails fast
    head_info: dict[str, Any]
    predict: Callable[[torch.Tensor], torch.Tensor] | None = None
    n_classes: int
    if head == "zero-shot":
        assert names is not None
        loaded = resolve_model(model, store)
        encoder = text_tower(loaded, hint="zero-shot needs a CLIP store; use --head linear (or --head model)")
        template_list = resolve_templates(templates)
        w_zs = zero_shot_head(encoder, names, template_list).to(torch.float64)
        if w_zs.shape[1] != store.comp_shape[-1]:
            raise InputError(f"text width {w_zs.shape[1]} != store width {store.comp_shape[-1]}")
        n_classes = len(names)
        predict = lambda z: (z @ w_zs.T).argmax(-1)  # noqa: E731 - cosine argmax (unit rows; |z| irrelevant)
        head_info = {"kind": "zero-shot", "classes": names, "templates": list(template_list),
                     "model": loaded.name, "weights": loaded.weights}
    elif head == "model":
        loaded = resolve_model(model, store)
        found = loaded.classifier()
        if found is None:
            raise InputError(f"{loaded.name} has no classifier head of its own; use --classes FILE or --head linear")
        w_m = found[0].detach().to(torch.float64).cpu()
        b_m = (found[1].detach().to(torch.float64).cpu() if found[1] is not None
               else torch.zeros(w_m.shape[0], dtype=torch.float64))
        if w_m.shape[1] != store.comp_shape[-1]:
            raise InputError(f"classifier width {w_m.shape[1]} != store width {store.comp_shape[-1]}: the store "
                             "does not hold the classifier's input features")
        n_classes = int(w_m.shape[0])
        predict = lambda z: (z @ w_m.T + b_m).argmax(-1)  # noqa: E731
        head_info = {"kind": "model", "n_classes": n_classes, "model": loaded.name, "weights": loaded.weights}
    else:
        n_classes = int(all_targets.max()) + 1
        head_info = {"kind": "linear", "n_classes": n_classes}
    if int(all_targets.max()) >= n_classes:
        where = f" ({files['classes']} lists {n_classes} names)" if "classes" in files else (
            f" ({n_classes} class names given)" if names is not None else "")
        raise InputError(f"{store.path} has targets up to {int(all_targets.max())} but the head has {n_classes} "
                         f"classes{where}")

    # ---- pass 1: the reference set
    def is_reference(rows: np.ndarray) -> np.ndarray:
        if kind == "split":
            assert fraction is not None
            return validation_mask(rows, seed, fraction)
        return np.zeros(rows.shape, dtype=bool)

    ref_pass = None
    dim = int(store.comp_shape[-1])
    if needs_ref or kind is not None:
        ref_pass = _ReferencePass(len(labels), dim, linear=head == "linear")
        source = ref_store if ref_store is not None else store
        for stack in iter_store_batches(source, desc=f"reference {source.path.name}", progress=progress):
            stack = stack.sum_tokens()
            rows = np.asarray(stack.meta["rows"], dtype=np.int64)
            keep = is_reference(rows) if kind == "split" else np.ones(rows.shape, dtype=bool)
            if keep.any():
                part = take_items(stack, keep) if not keep.all() else stack
                ref_pass.update(part, source.targets(rows[keep]))
        if ref_pass.count == 0:
            raise InputError("the reference set is empty (no valid rows); use a larger --reference-fraction or "
                             "another --reference-store")
    if head == "linear":
        assert ref_pass is not None
        w_lin, fit = ref_pass.fit_linear(n_classes, ridge)
        predict = lambda z: (z @ w_lin[:-1] + w_lin[-1]).argmax(-1)  # noqa: E731
        head_info.update(fit)
        n_classes = int(fit["n_classes"])
    assert predict is not None

    # ---- pass 2: the evaluated rows
    ref_rows = ref_pass.all_rows() if ref_pass is not None else np.zeros(0, dtype=np.int64)
    resample_source = ref_store if ref_store is not None else store

    def resample(stack: ComponentStack) -> torch.Tensor:
        rows = np.asarray(stack.meta["rows"], dtype=np.int64)
        pick = ref_rows[np.minimum((resample_uniform(rows, seed) * ref_rows.size).astype(np.int64),
                                   ref_rows.size - 1)]
        drawn = resample_source.components(pick, as_stack=True)
        return drawn.sum_tokens().values.to(torch.float64)  # type: ignore[union-attr]

    evaluated: list[np.ndarray] = []

    def batches() -> Iterator[tuple[ComponentStack, torch.Tensor]]:
        for stack in iter_store_batches(store, desc=f"ablate {store.path.name}", progress=progress):
            rows = np.asarray(stack.meta["rows"], dtype=np.int64)
            targets = store.targets(rows)
            keep = ~is_reference(rows) & (targets >= 0)
            if not keep.any():
                continue
            evaluated.append(rows[keep])
            yield take_items(stack.sum_tokens(), keep), torch.as_tensor(targets[keep])

    results = accuracy_over_batches(batches(), sets, predict, mode=mode,
                                    means=ref_pass.means if ref_pass is not None else None,
                                    resample=resample if mode == "resample" else None)
    eval_rows = np.concatenate(evaluated) if evaluated else np.zeros(0, dtype=np.int64)
    if eval_rows.size == 0:
        raise InputError("no evaluated rows with a known target (is --reference-fraction too large?)")
    if kind == "split":
        assert not np.intersect1d(eval_rows, ref_rows).size  # disjoint by construction

    # ---- result
    ref_record: dict[str, Any] | None = None
    if kind is not None:
        ref_record = {"kind": kind, **_rows_record(ref_rows)}
        if kind == "store":
            assert ref_store is not None
            ref_record["store"] = str(ref_store.path)
        if kind == "split":
            ref_record.update(fraction=fraction, seed=seed,
                              rule="row r is a reference row when u(seed, r) < fraction, u from a splitmix64 hash "
                              "of (seed, r) (vitdecomp.interpret.align.validation_mask); the other rows are evaluated")
    curve_points = {d: [{"n_blocks": n, "components": [labels[i] for i in s], **results[f"{d}:{n}"]}
                        for n, s in enumerate(rows)] for d, rows in curve_rows.items()}
    return AblationResult(store=store, mode=mode, seed=seed, head=head_info, n_classes=n_classes,
                          reference=ref_record, evaluated=_rows_record(eval_rows),
                          components=[labels[i] for i in chosen], unablated=results["unablated"],
                          ablated=results.get("ablated"), curves=curve_points, reference_store=ref_store, files=files)
