"""Retrieval from a store in one call: texts or images in, ranked items per component group out.

:func:`search_store` is what ``vitdecomp retrieve`` runs (docs/method.md §6.2–6.3):

1. **Groups.** An explicit component list, or the top ``top`` components of a feature, ranked in a
   feature score table (read from a file, or computed in one pass over the store from feature texts
   embedded by the store's text tower): by score ``s_{i,p}`` for text queries, by selectivity
   ``g_{i,p} = s_{i,p} − max_{p'≠p} s_{i,p'}`` for image queries, in ``groups`` consecutive groups
   (:func:`~vitdecomp.apps.retrieve.groups.feature_groups`); plus the full representation.
2. **Index.** Every group's unit sums ``z_G(x) = Σ_{i∈G} c_i(x) / ‖·‖`` (through a CompAlign:
   ``Σ_{i∈G} F_i c_i(x) / ‖·‖``) are indexed once (:func:`~vitdecomp.apps.retrieve.index.build_index`).
3. **Queries.** Texts are embedded (template-ensembled unit embeddings ``y_s``) and items ranked by
   ``cos(z_G(x), y_s)``; stored items (an id, a row number, or an image path under a dataset root)
   rank the others by ``cos(z_G(x'), z_G(x_ref))``, the query excluded.

The result (:class:`RetrievalResult`) holds the hits per group and query; ``to_json()`` is
``results.json`` without its run record.

Example (the store of the README walkthrough)::

    from vitdecomp.apps.retrieve import search_store
    from vitdecomp.synth.generator import factor_phrases

    result = search_store("clip.zarr", text=["a red object"], feature="colour", features=factor_phrases(),
                          k=8, backend="numpy")
    print(result.format_table())
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ...errors import InputError
from .group_index import Backend, GroupIndex, Hits, by_image, by_text
from .groups import ComponentGroup, feature_groups, feature_texts, full_group, read_score_table
from .index import alignment_record, build_index

if TYPE_CHECKING:
    from ...core.model import Model
    from ...interpret.align import CompAlign
    from ...interpret.score import ScoreTable
    from ...interpret.text.encoders import TextEncoder
    from ...store.component_store import ComponentStore

__all__ = ["RetrievalResult", "search_store", "resolve_item", "image_roots"]

log = logging.getLogger(__name__)


@dataclass
class RetrievalResult:
    """What :func:`search_store` found.

    Attributes:
        store: the store searched; ``store_path``: its path as given.
        mode: ``"text"`` or ``"image"``; ``k``: neighbours per query; ``templates``: text template set.
        groups: the groups searched (the full representation last, unless left out).
        queries: one entry per query: ``{"query", "kind", "results": {group name: [{"rank", "row",
            "id", "score"}, ...]}}`` (best first; scores are cosines).
        hits: per group key, its :class:`~vitdecomp.apps.retrieve.group_index.Hits` (all queries).
        index: the index folder's facts (path, items, backend, group keys, alignment record).
        feature: how the groups were chosen from a feature (source, feature, ranking, scores), or None.
        alignment: the CompAlign record (:func:`~vitdecomp.apps.retrieve.index.alignment_record`), or None.
        scores_file: the score table file read, or None.
    """

    store: ComponentStore
    store_path: str
    mode: str
    k: int
    templates: str
    groups: list[ComponentGroup]
    queries: list[dict[str, Any]]
    hits: dict[str, Hits] = field(default_factory=dict)
    index: dict[str, Any] = field(default_factory=dict)
    feature: dict[str, Any] | None = None
    alignment: dict[str, Any] | None = None
    scores_file: Path | None = None

    def to_json(self) -> dict[str, Any]:
        """``results.json`` of ``vitdecomp retrieve`` without its run record (``grid``: None, no figure)."""
        return {"store": self.store_path, "mode": self.mode, "k": self.k, "templates": self.templates,
                "index": self.index, "groups": [g.to_json() for g in self.groups], "feature": self.feature or None,
                "queries": self.queries, "grid": None}

    def format_table(self) -> str:
        """The index, the groups and the first five hits of every query and group, as text."""
        info = self.index
        lines = [f"index {info['path']} ({info['n']} items, {info['backend']})"]
        if info.get("alignment"):
            rec = info["alignment"]
            where = rec["file"] or rec["maps_sha256"][:12]
            lines.append(f"  through CompAlign {where} into a {rec['d_clip']}-d CLIP space")
        for g in self.groups:
            comps = "the model's representation" if g.components is None else ", ".join(g.components)
            lines.append(f"  group {g.name}: {comps}")
        for r in self.queries:
            lines.append(f"\n{r['kind']} query: {r['query']}")
            for name, hits in r["results"].items():
                shown = "  ".join(f"{h['id']} ({h['score']:.3f})" for h in hits[:5])
                more = f"  ... {len(hits) - 5} more" if len(hits) > 5 else ""
                lines.append(f"  {name:<12} {shown}{more}")
        return "\n".join(lines)


def _as_list(value: Any) -> list[Any]:
    return [value] if isinstance(value, (str, int, Path)) else list(value)


def search_store(
    store: ComponentStore | str | Path,
    *,
    text: str | Sequence[str] | None = None,
    image: str | int | Sequence[str | int] | None = None,
    feature: str | None = None,
    components: str | Sequence[str] | None = None,
    features: str | Path | Mapping[str, Sequence[str]] = "default",
    scores: str | Path | ScoreTable | None = None,
    top: int = 3,
    groups: int = 1,
    by: Literal["score", "selectivity"] | None = None,
    full: bool = True,
    k: int = 10,
    templates: str = "plain",
    align: CompAlign | str | Path | None = None,
    model: Model | str | None = None,
    checkpoint: str | Path | None = None,
    pretrained: bool | None = None,
    images_root: str | Path | None = None,
    index_dir: str | Path | None = None,
    backend: Backend = "faiss",
    rebuild: bool = False,
    progress: bool = False,
    kinds: Any = "input",
) -> RetrievalResult:
    """Rank the items of a store for text or image queries through component groups (docs/method.md §6.2–6.3).

    Text queries ``y_s`` rank items ``x`` by ``cos(z_G(x), y_s)``; image queries ``x_ref`` rank them by
    ``cos(z_G(x), z_G(x_ref))`` (the query excluded), where ``z_G(x) = Σ_{i∈G} c_i(x) / ‖·‖`` is the
    unit sum of a group's contributions (``[n, d]``, or ``[n, d_clip]`` through ``align``). Each query
    gets the top ``k`` of every group, next to the full representation ``z(x)``.

    Args:
        store: a store (or its path) written by ``vitdecomp decompose ... --out STORE``.
        text: text queries (one or several); or
        image: stored items (an id, a row number, or an image file of the dataset: absolute, relative to
            the current folder, to ``images_root`` or to the dataset root the store records).
        feature: the feature whose top ``top`` components form the group; or
        components: explicit components (a list, or one comma-separated string).
        features: feature texts to score components with when ``scores`` is not given (``"default"``,
            a JSON file, or ``{feature: [texts]}``; see :func:`~vitdecomp.apps.retrieve.groups.feature_texts`).
        scores: a score table (or its file: ``vitdecomp score``'s ``score.json``, its corr table) to
            rank components with; default: one pass over the store scores every feature of ``features``.
        top: components per group; groups: consecutive groups of ``top`` components.
        by: rank by ``"score"`` or ``"selectivity"`` (default: score for texts, selectivity for images).
        full: also search the full representation (always, when no other group is asked for).
        k: neighbours per query; templates: template set of the texts.
        align: a CompAlign (or its file / ``vitdecomp align`` folder): search in its CLIP space.
        model: the model whose text tower embeds the texts: a Model, a spec replacing the recorded one,
            or None: the store's own model (with ``align``: the CLIP the maps record), rebuilt from
            its record with ``checkpoint`` / ``pretrained``; loaded only when texts are embedded.
        images_root: dataset root image queries may be relative to.
        index_dir: index folder (default ``STORE/retrieval``); backend: ``"faiss"`` or ``"numpy"``;
            rebuild: start the folder over; progress: progress bars.

    Returns:
        A :class:`RetrievalResult`; its ``to_json()`` is ``results.json`` without the run record.

    Raises:
        InputError: bad settings, no finished chunks, unknown components or features, an item that is
            not in the store, a model without a text tower for text queries.
    """
    from ...store.component_store import ComponentStore

    if (text is None) == (image is None):
        raise InputError("give text queries (--text) or image queries (--image), not both or neither")
    if feature is not None and components is not None:
        raise InputError("choose the group one way: --feature or --components")
    if k < 1 or top < 1 or groups < 1:
        raise InputError("--k, --top and --groups must be at least 1")
    if by not in (None, "score", "selectivity"):
        raise InputError(f"by must be 'score' or 'selectivity', got {by!r}")
    store_path = str(store.path if isinstance(store, ComponentStore) else store)
    opened = store if isinstance(store, ComponentStore) else ComponentStore.open(store)
    if not opened.done_chunks():
        raise InputError(f"{store_path} has no finished chunks yet")
    mode = "text" if text is not None else "image"
    ranking = by or ("score" if mode == "text" else "selectivity")
    align_maps = align_rec = None
    if align is not None:
        align_maps, align_rec = alignment_record(align)
        if feature is not None and scores is None:
            raise InputError("--feature with --align ranks components by their scores in the CLIP space: pass "
                             "--scores (score.json of `vitdecomp score --align`), or --components")
    needs_text = mode == "text" or (feature is not None and scores is None)
    encoder = _text_encoder(opened, align_maps, model, checkpoint, pretrained) if needs_text else None

    chosen, feature_info = _groups(opened, encoder, feature=feature, components=components, features=features,
                                   scores=scores, top=top, n_groups=groups, by=ranking, templates=templates,
                                   full=full, kinds=kinds)
    # the alignment's path (not the maps): the index records the file and its sha256
    index = build_index(opened, chosen, index_dir, backend=backend, rebuild=rebuild, progress=progress, align=align)
    hits: dict[str, Hits] = {}
    if mode == "text":
        from ...interpret.text import embed_templates

        assert encoder is not None
        texts = _as_list(text)
        emb = embed_templates(encoder, texts, templates).numpy()
        for g in chosen:
            hits[g.key] = by_text(index[g], emb, k, texts=texts)
        queries: list[Any] = texts
    else:
        first = index[chosen[0]]
        roots = image_roots(opened, images_root)
        queries = [first.ids[resolve_item(first, str(a), roots)] for a in _as_list(image)]
        for g in chosen:
            hits[g.key] = by_image(index[g], queries, k)
    results = []
    for qi, query in enumerate(queries):
        per_group = {}
        for g in chosen:
            h = hits[g.key]
            per_group[g.name] = [{"rank": r + 1, "row": int(h.rows[qi, r]), "id": h.ids[qi][r],
                                  "score": float(h.scores[qi, r])} for r in range(h.rows.shape[1])]
        results.append({"query": query, "kind": mode, "results": per_group})
    index_info = {"path": str(index.path), "n": len(index), "backend": backend,
                  "groups": {g.name: g.key for g in chosen}, "alignment": index.alignment}
    return RetrievalResult(
        store=opened, store_path=store_path, mode=mode, k=k, templates=templates, groups=chosen, queries=results,
        hits=hits, index=index_info, feature=feature_info or None, alignment=align_rec,
        scores_file=Path(scores) if isinstance(scores, (str, Path)) else None)


def _text_encoder(store: ComponentStore, align: CompAlign | None, model: Model | str | None,
                  checkpoint: str | Path | None, pretrained: bool | None) -> TextEncoder:
    """The text tower that embeds the texts: ``model`` itself, or rebuilt from the store's (or the
    alignment's) record; a model without one is bad input here."""
    from ...core.model import Model
    from ...errors import UnsupportedModelError
    from ...interpret.text import text_encoder
    from ...store.reopen import load_alignment_clip, load_store_model

    if isinstance(model, Model):
        built = model
        hint = "pass the model with the text tower"
    elif align is not None:
        built = load_alignment_clip(align, model, checkpoint=checkpoint, pretrained=pretrained)
        hint = "with --align, --model must be the CLIP the maps lead into"
    else:
        built = load_store_model(store, model, checkpoint, pretrained=pretrained)
        hint = ("text queries need a CLIP store (or --align DIR with the maps of `vitdecomp align`); for image "
                "queries pass --components, or --scores from `vitdecomp score --align`")
    try:
        return text_encoder(built)
    except UnsupportedModelError as exc:
        raise InputError(f"{built.name} has no text tower: {hint}") from exc


def _score_table(store: ComponentStore, encoder: TextEncoder | None, *, scores: str | Path | ScoreTable | None,
                 features: str | Path | Mapping[str, Sequence[str]], templates: str) -> tuple[ScoreTable, dict[str, Any]]:
    """The feature score table (given, read from a file, or computed in one pass) and what it was made from."""
    from ...interpret.score import ScoreMoments, ScoreTable, feature_basis, score_table
    from ...interpret.text import embed_templates

    if scores is not None:
        table = scores if isinstance(scores, ScoreTable) else read_score_table(scores, what="--scores")
        source = "given" if isinstance(scores, ScoreTable) else str(scores)
        if list(table.labels) != list(store.labels):
            raise InputError(f"--scores {source} was computed for other components than the store's")
        return table, {"source": source}
    sets = feature_texts(features)
    if encoder is None:
        raise InputError("scoring features needs the model's text tower")
    bases = {}
    for name, texts in sets.items():
        emb = embed_templates(encoder, texts, templates).double().numpy()
        if emb.shape[1] != store.comp_shape[-1]:
            raise InputError(f"text width {emb.shape[1]} != store width {store.comp_shape[-1]}: feature scores "
                             "need a store in the text space (a CLIP model or an aligned store), or pass --scores")
        bases[name] = feature_basis(emb)
    log.info("scoring %d features over %s (one pass)", len(bases), store.path)
    moments = ScoreMoments.from_store(store, directions=np.concatenate(list(bases.values())))
    table = score_table(moments, bases, kind="corr")
    return table, {"source": "computed", "features": sets, "templates": templates, "n_items": moments.count}


def _groups(store: ComponentStore, encoder: TextEncoder | None, *, feature: str | None,
            components: str | Sequence[str] | None, features: str | Path | Mapping[str, Sequence[str]],
            scores: str | Path | ScoreTable | None, top: int, n_groups: int, by: Literal["score", "selectivity"],
            templates: str, full: bool, kinds: Any = "input") -> tuple[list[ComponentGroup], dict[str, Any]]:
    """The groups to search (explicit, or a feature's top components; the full representation last)."""
    groups: list[ComponentGroup] = []
    info: dict[str, Any] = {}
    if components:
        comps = [c.strip() for c in components.split(",")] if isinstance(components, str) else list(components)
        comps = [str(c) for c in comps if str(c).strip()]
        unknown = [c for c in comps if c not in store.labels]
        if unknown:
            raise InputError(f"--components: no {unknown} in the store (e.g. {', '.join(store.labels[:5])})")
        groups.append(ComponentGroup.of(comps))
    elif feature:
        table, info = _score_table(store, encoder, scores=scores, features=features, templates=templates)
        if feature not in table.features:
            raise InputError(f"--feature {feature!r} is not one of {list(table.features)}")
        if by == "selectivity" and len(table.features) < 2:
            raise InputError("selectivity needs at least two features; pass --by score")
        groups += feature_groups(table, feature, size=top, n_groups=n_groups, by=by, kinds=kinds)
        info = {**info, "feature": feature, "by": by, "kind": table.kind, "scores": table.to_json()}
    if full or not groups:
        groups.append(full_group())
    return groups, info


def resolve_item(index: GroupIndex, arg: str, roots: Sequence[tuple[str, Path]] | None = None) -> int:
    """Index position of an image query: an item id, a store row number, or an image path.

    A path is turned into item ids (its path relative to each dataset root, POSIX style): an
    absolute path (or one relative to the current folder) under a root, or a path relative to a
    root. ``roots`` are ``(what, folder)`` pairs (see :func:`image_roots`).

    Raises:
        InputError: one line listing everything tried.
    """
    tried: list[str] = [f"item id {arg!r}"]
    try:
        return int(index.position(arg))
    except InputError:
        pass
    if arg.isdigit():
        tried.append(f"row {arg}")
        try:
            return int(index.position(int(arg)))
        except InputError:
            pass
    path = Path(arg).expanduser()
    here = Path(os.path.abspath(path))
    for what, root in roots or []:
        candidates = []
        for base in dict.fromkeys((os.path.abspath(root), os.path.realpath(root))):
            for full in dict.fromkeys((str(here), os.path.realpath(here))):
                rel = os.path.relpath(full, base)
                if not rel.startswith(".."):
                    candidates.append(Path(rel).as_posix())
        if not path.is_absolute():
            candidates.append(path.as_posix())
        for item_id in dict.fromkeys(candidates):
            if item_id in (arg, "."):
                continue
            tried.append(f"item id {item_id!r} ({root / item_id} under {what})")
            try:
                return int(index.position(item_id))
            except InputError:
                pass
    hint = "" if roots else "; pass --images DATASET_ROOT to look image paths up"
    extra = "" if roots or not here.is_file() else f" ({here} exists but the store records no dataset root)"
    raise InputError(f"--image {arg}: no stored item{extra}; tried {', '.join(tried)}{hint}")


def image_roots(store: ComponentStore, images_root: str | Path | None = None) -> list[tuple[str, Path]]:
    """Dataset roots an image query's path may be relative to: ``images_root`` (``--images``), then the
    root the store records."""
    from ...store.dataset_run import dataset_root

    roots: list[tuple[str, Path]] = []
    if images_root is not None:
        roots.append(("--images", Path(images_root)))
    recorded = dataset_root(store)
    if recorded is not None and all(recorded != r for _, r in roots):
        roots.append(("the store's dataset root", recorded))
    return roots
