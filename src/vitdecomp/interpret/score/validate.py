"""The score validation of docs/method.md §4 on a store (paper Tables 2 and 4): ``vitdecomp score --validate``.

For components ``a_i(x) ∈ ℝ^{d_clip}`` in a CLIP space (a CLIP's own components, or ``a_i = F_i c_i``
through a fitted CompAlign) and the CLIP image embedding ``Z_CLIP(x)`` of the same image, the CLIP proxy
of feature ``p`` with texts ``y_s`` (``s ∈ S_p``) is

    r_{i,p} = (1/|S_p|) Σ_{s∈S_p} Pearson_x( cos(a_i(x), y_s), cos(Z_CLIP(x), y_s) )

(:func:`~vitdecomp.interpret.score.proxy.clip_proxy_table`). ``Z_CLIP`` is the *real* CLIP image
embedding: for a CLIP store its own ``reference`` rows, for a model read through CompAlign the
``reference`` rows of the CLIP's store over the same images, paired row by row with their ids checked
(:func:`~vitdecomp.interpret.align.data.paired_rows`, as ``vitdecomp align`` pairs them), never the
mapped sum ``Σ_i a_i`` that :meth:`CompAlign.apply` puts in an aligned stack's reference.

A score table ``s [comp, feature]`` is then validated against ``r`` with Spearman's ρ
(:func:`~vitdecomp.interpret.score.proxy.validate_ordering`), over the components of ``kinds``:

* component ordering: ``(1/P) Σ_p ρ(s_{·,p}, r_{·,p})``;
* feature ordering: ``(1/C) Σ_i ρ(s_{i,·}, r_{i,·})``.

**Identity.** For a CLIP store (the score's total ``Z = Σ_i a_i`` is ``Z_CLIP``) where every feature has
one text and every component, and ``Z``, has the same norm on every image, ``cos(a_i, y) = ⟨a_i, y⟩ /
(‖a_i‖‖y‖)`` is a fixed multiple of the projection on the feature's single basis row ``b = ±y/‖y‖``, and
Pearson is blind to positive scale and to flipping both sides, so ``r_{i,p} = s_{i,p}`` (corr) exactly and
both ρ are 1 (barring ties).
In general the two differ by the per-image normalisation and by the basis (orthonormalised texts for
``s``, each text for ``r``), which is what the validation measures.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import InputError
from ..inputs import ModelChoice, StoreLike, iter_store_batches, open_alignment, open_store, text_tower
from .proxy import clip_proxy_table, validate_ordering
from .tables import ScoreTable

if TYPE_CHECKING:
    import torch

    from ...core.model import Model
    from ...core.stack import ComponentStack
    from ...store.component_store import ComponentStore
    from ..align.maps import CompAlign
    from .run import ScoreResult

__all__ = ["ScoreValidation", "resolve_clip_store", "validate_scores", "validate_store"]

log = logging.getLogger(__name__)


@dataclass
class ScoreValidation:
    """What :func:`validate_store` measured.

    Attributes:
        proxy: the CLIP proxy ``r [comp, feature]`` of every component (kind ``"clip_proxy"``).
        orderings: score variant -> :func:`validate_ordering` of its table against ``proxy`` over
            :attr:`components` (``component_order_rho``, ``feature_order_rho``, per feature, per component).
        components: the components ranked (those of ``kinds``).
        kinds: the ``kinds`` argument they were chosen by.
        reference: where ``Z_CLIP`` came from: ``"clip_store"`` (a CLIP's store paired by row id) or
            ``"store"`` (the store is the CLIP: its own reference rows).
        clip_store: path of the CLIP store, when one was read.
        n_items: rows the proxy is computed on (valid in both stores).
        alignment: for components mapped by a CompAlign into ``clip_store``'s space: ``cosine`` (mean
            ``cos(Σ_i a_i, Z_CLIP)`` over the rows), ``cosine_held_out`` and ``n_held_out`` (rows the fit did not
            train on: its held-out split when the store is the one it was fitted on, else every row),
            ``held_out`` (which of the two) and ``fit_val_cosine`` (the fit's own record); else None.
    """

    proxy: ScoreTable
    orderings: dict[str, dict[str, Any]]
    components: tuple[str, ...]
    kinds: Any
    reference: str
    clip_store: str | None
    n_items: int
    alignment: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``"validation"`` entry of ``score.json`` (undefined ρ are None)."""
        return {
            "protocol": "docs/method.md §4 Validation (paper Tables 2 and 4): Spearman rho of each score "
                        "table against the CLIP proxy",
            "reference": self.reference,
            "clip_store": self.clip_store,
            "n_items": self.n_items,
            "kinds": self.kinds if isinstance(self.kinds, str) else list(self.kinds),
            "components": list(self.components),
            "alignment": self.alignment,
            "orderings": {v: _finite(o) for v, o in self.orderings.items()},
            "proxy": self.proxy.to_json(),
        }

    def format(self) -> str:
        """The lines ``vitdecomp score --validate`` prints."""
        where = (f"Z_CLIP = the rows of {self.clip_store} paired by id" if self.reference == "clip_store"
                 else "Z_CLIP = the store's own image embedding")
        head = (f"validation against the CLIP proxy (docs/method.md §4; {where}; {self.n_items} rows, "
                f"{len(self.components)} components, {len(self.proxy.features)} features)")
        lines = [head]
        for v, o in self.orderings.items():
            lines.append(f"  {v}: component-ordering rho {_num(o['component_order_rho'])} "
                         f"(mean over {o['n_features'] - o['undefined_features']} features), feature-ordering rho "
                         f"{_num(o['feature_order_rho'])} (mean over {o['n_components'] - o['undefined_components']} "
                         "components)")
            lines.append("    per feature: " + ", ".join(f"{f} {_num(r)}" for f, r in o["per_feature"].items()))
        if self.alignment is not None:
            a = self.alignment
            lines.append(f"  alignment: cos(sum of mapped components, Z_CLIP) {_num(a['cosine'])} on all rows, "
                         f"{_num(a['cosine_held_out'])} on {a['n_held_out']} held-out rows ({a['held_out']})")
        return "\n".join(lines)


def _num(x: float | None) -> str:
    return "undefined" if x is None or not math.isfinite(x) else f"{x:+.3f}"


def _finite(value: Any) -> Any:
    """``value`` with NaN floats as None (JSON)."""
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ============================================================================ the pass
class _AlignCosine:
    """Running mean ``cos(Σ_i a_i, Z_CLIP)`` over all rows and over held-out rows."""

    def __init__(self, maps: CompAlign, fitted_here: bool) -> None:
        self.maps = maps
        self.fitted_here = fitted_here
        self.sum_all = self.sum_held = 0.0
        self.n_all = self.n_held = 0

    def update(self, total: np.ndarray, target: np.ndarray, rows: np.ndarray) -> None:
        from ..align.data import validation_mask

        norm = np.linalg.norm(total, axis=1) * np.linalg.norm(target, axis=1)
        cos = np.divide((total * target).sum(1), norm, out=np.zeros(len(norm)), where=norm > 0)
        held = (validation_mask(rows, self.maps.config.seed, self.maps.config.val_fraction) if self.fitted_here
                else np.ones(len(rows), dtype=bool))
        self.sum_all += float(cos.sum())
        self.n_all += len(cos)
        self.sum_held += float(cos[held].sum())
        self.n_held += int(held.sum())

    def to_json(self) -> dict[str, Any]:
        return {
            "cosine": self.sum_all / self.n_all if self.n_all else None,
            "cosine_held_out": self.sum_held / self.n_held if self.n_held else None,
            "n_held_out": self.n_held,
            "held_out": "the fit's held-out split" if self.fitted_here else "every row (not the store it was fitted on)",
            "fit_val_cosine": self.maps.meta.get("val_cosine"),
        }


def _recorded_clip_store(maps: CompAlign) -> Path | None:
    """The CLIP store ``vitdecomp align --out DIR`` recorded in ``DIR/align.json`` next to the maps, if it exists."""
    from ..align.run import RESULT_FILE

    file = maps.meta.get("file")
    if not file:
        return None
    record = Path(file).parent / RESULT_FILE
    try:
        path = json.loads(record.read_text(encoding="utf-8")).get("clip_store")
    except (OSError, ValueError):
        return None
    return Path(path) if path and Path(path).is_dir() else None


def _paired_stacks(store: ComponentStore, clip: ComponentStore, maps: CompAlign | None,
                   cosine: _AlignCosine | None, progress: bool) -> Iterator[ComponentStack]:
    """Stacks of ``store``'s rows (tokens summed; mapped by ``maps``) whose reference is ``clip``'s reference row
    of the same image: ``values [comp, b, d_clip]``, ``reference [b, d_clip] = Z_CLIP``."""
    import torch

    from ...core.labels import parse_label
    from ...core.stack import ComponentStack
    from ...store.dataset_run import progress_bar
    from ..align.data import store_batches

    labels = tuple(parse_label(name) for name in store.labels)
    bar = progress_bar(store.n_items, enabled=progress, desc=f"validate {store.path.name}")
    try:
        for values, targets, rows in store_batches(store, clip)():
            c = values.movedim(0, 1)  # [comp, b, d_model]
            stack = ComponentStack(c, labels, c.to(torch.float64).sum(0).to(c.dtype), space=store.space,
                                   meta={"rows": rows.tolist()})
            if maps is not None:
                stack = maps.apply(stack)
            if cosine is not None:
                cosine.update(stack.values.to(torch.float64).sum(0).numpy(), targets.to(torch.float64).numpy(),
                              rows.numpy())
            yield replace(stack, reference=targets.to(stack.values.dtype), scale=None)
            bar.update(int(rows.shape[0]))
    finally:
        bar.close()


def resolve_clip_store(store: StoreLike, align: CompAlign | str | os.PathLike | None = None,
                       clip_store: StoreLike | None = None) -> ComponentStore | None:
    """The store whose reference rows are ``Z_CLIP`` for validating ``store`` (read through ``align``), checked;
    None when the store's own reference is ``Z_CLIP`` (a CLIP store, no alignment or an identity one, and no
    ``clip_store``). Reads no rows, so a command can call it before its pass.

    Args:
        store: the store (finished), or its path.
        align: the CompAlign the store is read through (or its file / folder), if any.
        clip_store: the CLIP's store over the same images; default with a non-identity ``align``: the CLIP store
            recorded in ``align.json`` next to the maps, when it still exists.

    Raises:
        InputError: a non-identity alignment and no CLIP store, a CLIP store of another CLIP than the one the
            maps go into, of another width, not finished, or of other images (ids differ on some row).
    """
    store = open_store(store)
    maps = open_alignment(align, store) if align is not None else None
    if maps is not None and maps.is_identity:
        maps = None
    clip = None
    if clip_store is not None:
        clip = open_store(clip_store, role="--clip-store")
    elif maps is not None:
        recorded = _recorded_clip_store(maps)
        if recorded is None:
            raise InputError("validating scores read through a CompAlign needs the CLIP image embeddings of the same "
                             "images: pass --clip-store CLIPSTORE (the store `vitdecomp align` fitted the maps to)")
        log.info("validation: Z_CLIP from %s (recorded in the alignment's align.json)", recorded)
        clip = open_store(recorded, role="--clip-store")
    if maps is not None and clip is not None:
        fitted = (maps.meta.get("clip_model"), maps.meta.get("clip_weights"))
        if fitted[0] is not None and fitted != (clip.config.model, clip.config.weights):
            raise InputError(f"--clip-store {clip.path} is of {clip.config.model} ({clip.config.weights}); the maps "
                             f"go into the space of {fitted[0]} ({fitted[1]})")
    d_clip = maps.d_clip if maps is not None else int(store.comp_shape[-1])
    if clip is not None and int(clip.ref_dim) != d_clip:
        raise InputError(f"--clip-store {clip.path} has image embeddings of width {clip.ref_dim}; the components are "
                         f"of width {d_clip}")
    if clip is not None:
        from ..align.data import paired_rows

        if not paired_rows(store, clip).any():  # raises on other images (from the done records: no rows read)
            raise InputError(f"no row is valid in both {store.path} and --clip-store {clip.path}")
    return clip


def validate_store(
    store: StoreLike,
    features: Mapping[str, np.ndarray | torch.Tensor],
    tables: Mapping[str, ScoreTable] | ScoreTable,
    *,
    align: CompAlign | str | os.PathLike | None = None,
    clip_store: StoreLike | None = None,
    kinds: Any = "input",
    progress: bool = False,
) -> ScoreValidation:
    """Validate score tables against the CLIP proxy (docs/method.md §4 "Validation", paper Tables 2 and 4).

    One streaming pass computes the CLIP proxy of every component ``i`` and feature ``p``,
    ``r_{i,p} = (1/|S_p|) Σ_s Pearson_x(cos(a_i(x), y_s), cos(Z_CLIP(x), y_s))`` with ``a_i`` the store's
    components (tokens summed) mapped by ``align`` (``a_i = F_i c_i``) and ``Z_CLIP(x)`` the CLIP image
    embedding of the same image; then, over the components of ``kinds``, Spearman's ρ between each table's
    and the proxy's component rankings (per feature, averaged: component ordering) and feature rankings
    (per component, averaged: feature ordering).

    Args:
        store: the store the tables were computed on (finished), or its path.
        features: feature name -> its text embeddings ``[s_p, d_clip]`` (normalised here), the same the
            tables were scored with.
        tables: score variant -> :class:`ScoreTable` ``[comp, feature]`` (labels = the store's), or one table.
        align: the CompAlign mapping the store into the CLIP space (its file / folder), or None for a CLIP store.
        clip_store: the store of the CLIP over the same images (same rows and ids): ``Z_CLIP`` = its reference
            rows. Default: none for a store read without ``align`` (or with an identity alignment): the store's
            own reference is ``Z_CLIP``; with ``align``, the CLIP store recorded in ``align.json`` next to the
            maps when it still exists.
        kinds: the components ranked (:func:`vitdecomp.core.labels.resolve_kinds`; default those that compute
            something from the input: constant rows have no ranking to validate).
        progress: a progress bar on stderr.

    Returns:
        A :class:`ScoreValidation`; ``orderings[v]["component_order_rho"]`` and ``["feature_order_rho"]`` are the
        paper's two numbers for variant ``v``.

    Raises:
        InputError: a non-CLIP alignment without a CLIP store, stores of different images, a CLIP store of
            another CLIP than the alignment's, widths that disagree, or tables of other components or features.
    """
    from ...core.labels import kind_mask

    store = open_store(store)
    maps = open_alignment(align, store) if align is not None else None
    clip = resolve_clip_store(store, maps, clip_store)
    if maps is not None and maps.is_identity:
        maps = None
    d_clip = maps.d_clip if maps is not None else int(store.comp_shape[-1])
    texts = {name: np.asarray(t.detach().cpu().double().numpy() if hasattr(t, "detach") else t, dtype=np.float64)
             for name, t in features.items()}
    for name, t in texts.items():
        if t.ndim != 2 or t.shape[1] != d_clip:
            raise InputError(f"texts of {name!r} are {tuple(t.shape)}, expected [s, {d_clip}]")
    by_variant = {tables.kind: tables} if isinstance(tables, ScoreTable) else dict(tables)
    labels = tuple(store.labels)
    for v, t in by_variant.items():
        if t.labels != labels:
            raise InputError(f"the {v} table has other components than {store.path}")
        if set(t.features) != set(texts):
            raise InputError(f"the {v} table scores {list(t.features)}, the texts are of {list(texts)}")

    cosine = None
    if clip is not None:
        if maps is not None:
            cosine = _AlignCosine(maps, maps.meta.get("store_config_hash") == store.config.hash())
        stacks: Any = _paired_stacks(store, clip, maps, cosine, progress)
    else:
        stacks = (s.sum_tokens() for s in iter_store_batches(store, desc=f"validate {store.path.name}",
                                                             progress=progress))
    proxy = clip_proxy_table(stacks, texts, use_reference=True)
    if proxy.labels != labels:
        raise InputError("the proxy's components differ from the store's")  # pragma: no cover - same store

    keep = kind_mask(labels, kinds)
    if int(keep.sum()) < 2:
        log.warning("validation: %d component(s) of kinds %r: no component ordering to compare", int(keep.sum()), kinds)
    chosen = tuple(lab for lab, k in zip(labels, keep) if k)
    proxy_kept = ScoreTable(proxy.scores[keep], chosen, proxy.features, proxy.kind, proxy.meta)
    orderings = {v: validate_ordering(ScoreTable(t.scores[keep], chosen, t.features, t.kind), proxy_kept)
                 for v, t in by_variant.items()}
    return ScoreValidation(proxy=proxy, orderings=orderings, components=chosen, kinds=kinds,
                           reference="clip_store" if clip is not None else "store",
                           clip_store=str(clip.path) if clip is not None else None, n_items=int(proxy.meta["count"]),
                           alignment=cosine.to_json() if cosine is not None else None)


def validate_scores(
    result: ScoreResult,
    *,
    clip_store: StoreLike | None = None,
    model: Model | ModelChoice | None = None,
    progress: bool = False,
) -> ScoreValidation:
    """:func:`validate_store` of a :func:`~vitdecomp.interpret.score.score_store` result: what
    ``vitdecomp score ... --validate`` computes.

    The features' texts are embedded again as the scores embedded them (same templates, the text tower of
    the CLIP the components are in: ``y_s`` ``[s_p, d_clip]``, unit rows), and every table of ``result`` is
    validated over ``result.kinds``.

    Args:
        result: the scores.
        clip_store: the CLIP's store over the same images (see :func:`validate_store`).
        model: the text tower's model: a loaded model, or a :class:`ModelChoice` (default: as ``score_store``
            chose it: the alignment's CLIP, or the store's own model).
        progress: a progress bar on stderr.
    """
    from ..text import embed_templates

    if model is None or isinstance(model, ModelChoice):
        choice = model or ModelChoice()
        model = choice.for_alignment(result.alignment) if result.alignment is not None else choice.for_store(
            result.store)
    encoder = text_tower(model, hint="the scores' text tower is needed to embed the feature texts")
    texts = {name: embed_templates(encoder, pool.texts, result.templates).double().numpy()
             for name, pool in result.features.items()}
    return validate_store(result.store, texts, result.tables, align=result.alignment, clip_store=clip_store,
                          kinds=result.kinds, progress=progress)
