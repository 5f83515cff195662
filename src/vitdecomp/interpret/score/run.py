"""What ``vitdecomp score`` computes: every component of a store scored on text features (docs/method.md §4).

:func:`score_store` embeds each feature's texts ``t_1..t_k`` with a CLIP text tower (through the
templates), orthonormalises them into a basis ``B_p [k_p, d]`` (:func:`feature_basis`), streams the
store once accumulating :class:`ScoreMoments` projected on all the bases' rows ``D = [B_1; ...; B_P]``
(exact for every variant: ``B_p = W_p D``, and ``tr Σ_i`` is kept in full), and scores every component
on every feature (:func:`score_table`): ``corr``, ``var_attributed`` (shares of the total's feature
variance unless ``absolute``) and ``var_explained``. A model without a text tower is read through a
fitted CompAlign: each batch is mapped, ``a_i = F_i c_i``, before the moments.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import InputError
from ..inputs import ModelChoice, StoreLike, iter_store_batches, open_alignment, open_store, text_tower
from .moments import ScoreMoments
from .tables import ScoreKind, ScoreTable, feature_basis, score_table

if TYPE_CHECKING:
    from ...core.model import Model
    from ...store.component_store import ComponentStore
    from ..align.maps import CompAlign
    from ..text.pools import TextPool

__all__ = ["MAX_MOMENT_BYTES", "VARIANTS", "ScoreResult", "resolve_feature", "resolve_features", "score_store"]

log = logging.getLogger(__name__)

VARIANTS: tuple[ScoreKind, ...] = ("corr", "var_attributed", "var_explained")
MAX_MOMENT_BYTES = 8 * 2**30
"""Largest second-moment memory (2 · comp · m² float64, m = all feature texts) a run may allocate."""


def resolve_feature(token: str | os.PathLike) -> tuple[str, TextPool, Path | None]:
    """``(name, pool, file or None)`` of a FEATURE argument: a feature set (``colour``, ...), a shipped
    pool (``waterbirds/spurious``, ...) or a text file with one text per line (named after the file).

    Raises:
        InputError: none of these.
    """
    from ..text.pools import FEATURE_SETS, POOLS, load_pool

    token = str(token)
    if token in FEATURE_SETS:
        return token, load_pool(f"feature/{token}"), None
    if token in POOLS:
        return token, load_pool(token), None
    path = Path(token).expanduser()
    if path.is_file():
        pool = load_pool(path)
        return pool.name, pool, path
    raise InputError(f"unknown feature {token!r}: not a feature set ({', '.join(FEATURE_SETS)}, or 'all'), "
                     f"not a shipped pool ({', '.join(POOLS)}), and no such text file")


def resolve_features(features: Sequence[str | os.PathLike] = (), pools: Sequence[str | os.PathLike] = ()
                     ) -> tuple[dict[str, TextPool], dict[str, Path]]:
    """The features to score, by name, and the files they came from (by role, for a run record).

    Args:
        features: FEATURE tokens (:func:`resolve_feature`; ``"all"`` is the eight feature sets).
        pools: pools (shipped names or files) whose every text is its own one-text feature.

    Raises:
        InputError: an unknown feature, a name given twice, or nothing to score.
    """
    from ..text.pools import FEATURE_SETS, TextPool, load_pool

    tokens: list[str | os.PathLike] = []
    for token in features:
        tokens += list(FEATURE_SETS) if str(token) == "all" else [token]
    out: dict[str, TextPool] = {}
    files: dict[str, Path] = {}

    def add(name: str, pool: TextPool) -> None:
        if name in out:
            raise InputError(f"feature {name!r} is given twice (rename the file or drop the repeat)")
        out[name] = pool

    for token in tokens:
        name, pool, path = resolve_feature(token)
        add(name, pool)
        if path is not None:
            files[f"feature:{name}"] = path
    for spec in pools:
        pool = load_pool(spec)
        if Path(pool.source).is_file():
            files[f"pool:{pool.name}"] = Path(pool.source)
        for text in pool.texts:
            add(text, TextPool(text, pool.version, [text], f"text of pool {pool.name}", pool.source))
    if not out:
        raise InputError("no features: give FEATURE names (e.g. colour shape, or all) and/or --pool")
    return out, files


@dataclass
class ScoreResult:
    """What :func:`score_store` computed.

    Attributes:
        store: the store read.
        model, weights: the text tower's model and weights.
        space: the components' space (the store's, or ``"clip (CompAlign)"``).
        templates: the templates the texts were embedded with.
        n_items: rows scored.
        features: name -> pool of texts.
        ranks: name -> rank ``k'`` of its orthonormal basis.
        tables: variant -> :class:`ScoreTable` ``[comp, feature]``.
        selectivity: variant -> selectivity table, when asked for.
        contrast: ``{"spurious", "core", "by_variant": {variant: {"scores": {label: s}, "ranking": [...]}}}``
            with ``s_i = s_{i,spurious} − s_{i,core}``, when asked for.
        alignment: the CompAlign the components were mapped with, if any.
        files: input files by role (``feature:NAME``, ``pool:NAME``, ``align``).
    """

    store: ComponentStore
    model: str
    weights: str | None
    space: str
    templates: list[str]
    n_items: int
    features: dict[str, TextPool]
    ranks: dict[str, int]
    tables: dict[str, ScoreTable]
    selectivity: dict[str, ScoreTable] | None = None
    contrast: dict[str, Any] | None = None
    alignment: CompAlign | None = None
    files: dict[str, Path] = field(default_factory=dict)
    nulls: dict[str, Any] | None = None
    kinds: Any = "input"
    selectivity_nulls: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """``score.json`` without the run record (the CLI adds ``"run"`` first)."""
        payload: dict[str, Any] = {
            "store": str(self.store.path),
            "model": self.model,
            "weights": self.weights,
            "space": self.space,
            "templates": list(self.templates),
            "n_items": self.n_items,
            "features": {name: {"texts": pool.texts, "pool": pool.manifest(), "rank": self.ranks[name]}
                         for name, pool in self.features.items()},
            "tables": {v: t.to_json() for v, t in self.tables.items()},
        }
        if self.selectivity is not None:
            payload["selectivity"] = {v: t.to_json() for v, t in self.selectivity.items()}
        if self.contrast is not None:
            payload["contrast"] = self.contrast
        if self.nulls is not None:
            payload["significance"] = {v: n.to_json() for v, n in self.nulls.items()}
        if self.selectivity_nulls is not None:
            payload["selectivity_significance"] = self.selectivity_nulls
        return payload

    def format(self, top: int = 5) -> str:
        """The tables ``vitdecomp score`` prints: the ``top`` components per feature and variant (then by
        selectivity, then the contrast ranking, when computed)."""
        lines = ([n.format(top=top) for n in self.nulls.values()] if self.nulls is not None
                 else [t.format(top=top, kinds=self.kinds) for t in self.tables.values()])
        if self.selectivity is not None:
            lines += [t.format(top=top, by="selectivity", kinds=self.kinds) for t in self.tables.values()]
        if self.contrast is not None:
            spur, core = self.contrast["spurious"], self.contrast["core"]
            contrast_lines = []
            for v, t in self.tables.items():
                entry = self.contrast["by_variant"][v]
                null = entry.get("null", {})
                ranked = [lab for lab in entry["ranking"] if not null or lab in null][:top]
                shown = ", ".join(f"{lab} {entry['scores'][lab]:+.3f}"
                                  + ("" if not null or null[lab]["significant"] else " (not significant)")
                                  for lab in ranked)
                contrast_lines.append(f"contrast[{t.kind}] {spur} - {core}, top {min(top, len(t.labels))}: {shown}")
            lines.append("\n".join(contrast_lines))
        return "\n\n".join(lines)


def score_store(
    store: StoreLike,
    features: Sequence[str | os.PathLike] | Mapping[str, TextPool] = (),
    *,
    pools: Sequence[str | os.PathLike] = (),
    variants: Sequence[ScoreKind] = ("corr",),
    templates: str | Sequence[str] = "plain",
    absolute: bool = False,
    selectivity: bool = False,
    contrast: tuple[str, str] | None = None,
    model: Model | ModelChoice | None = None,
    align: CompAlign | str | os.PathLike | None = None,
    progress: bool = False,
    n_null: int = 200,
    null_pool: str | os.PathLike | TextPool = "descriptions",
    kinds: Any = "input",
    alpha: float = 0.05,
    seed: int = 0,
) -> ScoreResult:
    """Score every component of a finished store on text features, in one streaming pass.

    For each feature ``p`` with texts embedded as ``E_p [k, d]`` (templates averaged) and orthonormal
    basis ``B_p = feature_basis(E_p) [k_p, d]``, and components ``a_i(x) [d]`` (tokens summed; mapped by
    ``align`` when given), the scores of :func:`~vitdecomp.interpret.score.tables.feature_scores`:
    ``corr`` ``s_i = (1/k) Σ_j Pearson_x(⟨a_i, b_j⟩, ⟨Z, b_j⟩)``, ``var_attributed``
    ``(1/k) Σ_j Cov_x(⟨a_i, b_j⟩, ⟨Z, b_j⟩)`` (divided by ``(1/k) tr(B Σ_Z Bᵀ)`` unless ``absolute``, so
    the shares sum to 1), ``var_explained`` ``tr(B Σ_i Bᵀ) / tr Σ_i``; ``Z = Σ_i a_i``. Memory: one chunk
    plus ``2 · comp · m²`` float64, ``m = Σ_p k_p``.

    Args:
        store: a finished store or its path.
        features: FEATURE tokens (:func:`resolve_feature`, ``"all"``), or name -> :class:`TextPool`.
        pools: pools whose every text is scored as its own feature.
        variants: score kinds, one table each.
        templates: template set (or templates) for the feature texts.
        absolute: ``var_attributed`` as covariances instead of shares.
        selectivity: also ``g_{i,p} = s_{i,p} − max_{p'≠p} s_{i,p'}`` (needs two features).
        contrast: ``(spurious, core)``: rank components by ``s_spurious − s_core`` (two of the features).
        model: the text tower's model (default: the store's own, rebuilt from its record; with ``align``,
            the CLIP the maps lead into), or a :class:`~vitdecomp.interpret.inputs.ModelChoice`.
        align: a fitted CompAlign (or its file / folder) mapping the components into a CLIP space first.
        progress: a progress bar on stderr.
        n_null: random text bases per feature for the null distribution (0: no nulls); see
            :mod:`~vitdecomp.interpret.score.nulls`. Computed from the same pass's moments.
        null_pool: the texts random bases are drawn from: a shipped pool name, a text file or a
            :class:`TextPool` (default the shipped ``descriptions``; for the synthetic world, its
            own captions: :func:`vitdecomp.synth.generator.caption_pool`, which ``vitdecomp score``
            uses for ``synth:`` models).
        kinds: components tested and ranked (default: those that compute something from the input).
        alpha: Benjamini–Hochberg level of the significance flags.
        seed: seed of the null draws.

    Returns:
        A :class:`ScoreResult` (``to_json()`` is ``score.json`` without the run record).

    Raises:
        InputError: unknown or repeated features, a contrast of features not scored, selectivity of one
            feature, an unfinished store, maps of another model, a model without a text tower, widths
            that disagree, or more second-moment memory than :data:`MAX_MOMENT_BYTES`.
    """
    from ..text import embed_templates, resolve_templates

    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise InputError(f"unknown score variant(s) {bad}; use {', '.join(VARIANTS)}")
    kinds_list = list(dict.fromkeys(variants or ["corr"]))
    if isinstance(features, Mapping):
        if pools:
            raise InputError("pools= goes with feature names, not with a mapping of pools")
        chosen, files = dict(features), {}
        if not chosen:
            raise InputError("no features to score")
    else:
        chosen, files = resolve_features(features, pools)
    if contrast:
        missing = [f for f in contrast if f not in chosen]
        if missing:
            raise InputError(f"--contrast {' '.join(contrast)}: {missing} not among the features {list(chosen)}")
    if selectivity and len(chosen) < 2:
        raise InputError("--selectivity needs at least two features")
    template_list = resolve_templates(templates)
    store = open_store(store)
    labels = list(store.labels)

    maps = None
    if align is not None:
        maps = open_alignment(align, store)
        if "file" in maps.meta:
            files["align"] = Path(maps.meta["file"])
        if isinstance(model, ModelChoice) or model is None:
            model = (model or ModelChoice()).for_alignment(maps)
        dim = maps.d_clip
        encoder = text_tower(model, hint="--model must be the CLIP model the alignment maps into")
    else:
        if isinstance(model, ModelChoice) or model is None:
            model = (model or ModelChoice()).for_store(store)
        dim = int(store.comp_shape[-1])
        encoder = text_tower(model, hint="fit a CompAlign into a CLIP space and pass --align FILE --model CLIP")

    bases: dict[str, np.ndarray] = {}
    embeddings: dict[str, np.ndarray] = {}  # kept for the nulls, which build their bases the same way
    for name, pool in chosen.items():
        emb = embed_templates(encoder, pool.texts, template_list)
        if emb.shape[1] != dim:
            raise InputError(f"text width {emb.shape[1]} != component width {dim}: the text tower must belong to "
                             "the space the components are in")
        embeddings[name] = emb.double().numpy()
        bases[name] = feature_basis(emb)
    null_texts: TextPool | None = None
    null_emb = None
    if n_null > 0:
        null_texts = _null_pool(null_pool)
        null_emb = embed_templates(encoder, null_texts.texts, template_list).double().numpy()
    directions = np.concatenate(list(bases.values()))  # moments projected on every feature's span (exact)
    if null_emb is not None:  # ... and on the null pool's span, so every random basis is scored exactly
        rows = np.concatenate([directions, null_emb])
        directions = None if rows.shape[0] >= dim else np.linalg.qr(rows.T)[0].T
    width = dim if directions is None else directions.shape[0]
    need = 2 * len(labels) * width ** 2 * 8
    if need > MAX_MOMENT_BYTES:
        raise InputError(f"{width} feature (and null) directions need {need / 2**30:.1f} GiB of second moments for "
                         f"{len(labels)} components (limit {MAX_MOMENT_BYTES / 2**30:.0f} GiB): score fewer texts "
                         "per run (a smaller --pool, or fewer FEATUREs)")
    moments = ScoreMoments(len(labels), dim, directions=directions, labels=labels)
    for stack in iter_store_batches(store, desc=f"score {store.path.name}", progress=progress):
        stack = stack.sum_tokens()
        moments.add_stack(maps.apply(stack) if maps is not None else stack)

    tables = {v: score_table(moments, bases, v, share=(v == "var_attributed" and not absolute)) for v in kinds_list}
    result = ScoreResult(store=store, model=model.name, weights=model.weights,
                         space="clip (CompAlign)" if maps is not None else store.space,
                         templates=list(template_list), n_items=moments.count, features=chosen,
                         ranks={name: int(b.shape[0]) for name, b in bases.items()}, tables=tables,
                         alignment=maps, files=files)
    if null_emb is not None and null_texts is not None:
        from .nulls import score_nulls

        result.nulls = {v: score_nulls(moments, embeddings, null_emb, kind=v, n_null=n_null, seed=seed,
                                       kinds=kinds, labels=labels, alpha=alpha,
                                       meta={"null_pool": null_texts.manifest()}) for v in kinds_list}
    result.kinds = kinds
    if selectivity:
        result.selectivity = {v: t.selectivity() for v, t in tables.items()}
        if result.nulls is not None:
            result.selectivity_nulls = {}
            for v, n in result.nulls.items():
                tested = n.selectivity()
                result.selectivity_nulls[v] = {
                    f: {labels[i]: {"z": _num(tested["z"][i, j]), "q": _num(tested["q"][i, j]),
                                    "significant": bool(tested["significant"][i, j])}
                        for i in range(len(labels)) if np.isfinite(tested["z"][i, j])}
                    for j, f in enumerate(tables[v].features)}
    if contrast:
        spur, core = contrast
        by_variant: dict[str, Any] = {}
        for v, t in tables.items():
            values = t.contrastive(spur, core)
            order = np.argsort(-values, kind="stable")
            by_variant[v] = {"scores": {labels[i]: float(values[i]) for i in range(len(labels))},
                             "ranking": [labels[i] for i in order]}
            if result.nulls is not None:
                tested = result.nulls[v].contrast(spur, core)
                by_variant[v]["null"] = {labels[i]: {"z": _num(tested["z"][i]), "q": _num(tested["q"][i]),
                                                      "significant": bool(tested["significant"][i])}
                                         for i in range(len(labels)) if np.isfinite(tested["z"][i])}
        result.contrast = {"spurious": spur, "core": core, "by_variant": by_variant}
    return result



def _null_pool(null_pool: Any) -> TextPool:
    """The texts random bases are drawn from (see :func:`score_store`)."""
    from ..text.pools import TextPool, load_pool

    return null_pool if isinstance(null_pool, TextPool) else load_pool(null_pool)


def _num(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None
