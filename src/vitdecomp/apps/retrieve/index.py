"""Retrieval by feature (docs/method.md §6.2–6.3): nearest neighbours through groups of components.

A *component group* ``G`` is a set of components of a store; its representation of item ``x`` is
the normalised sum of its members' direct contributions::

    z_G(x) = s_G(x) / ‖s_G(x)‖,    s_G(x) = Σ_{i∈G} c_i(x)      (a zero sum stays zero)

so inner products are cosines. The *full* group (:data:`FULL`) is the model's own representation
``z(x)`` (the store's float32 ``reference``, i.e. the exact sum of every component), for comparison.

* **Text → images** (§6.2): components sorted by their feature score ``s_{·,p}`` (``corr``) are
  taken in groups of three, ``{c_{3j}, c_{3j+1}, c_{3j+2}}`` (:func:`feature_groups`); items are
  ranked by ``cos(z_G(x), y_s)`` with ``y_s`` the unit text embedding (:func:`by_text`). This needs
  the store in the text's space (a CLIP store, or one already aligned with CompAlign).
* **Image → images** (§6.3): the group is the top-``k`` components by *selectivity* ``g``
  (``feature_groups(..., by="selectivity")``); items are ranked by ``cos(z_G(x'), z_G(x_ref))``
  in the store's own space, the query item excluded (:func:`by_image`).

:func:`build_index` streams a :class:`~vitdecomp.store.component_store.ComponentStore` once
(:meth:`~vitdecomp.store.component_store.ComponentStore.iter_batches`, memory one chunk) and writes, per group,
one float16 inner-product index to a folder (default ``STORE/retrieval``)::

    index.json             format, the store's identity (provenance.store_record), the rows,
                           normalisation, and per group: name, components, backend, file, dim
    rows.npy, ids.json     store row and id of every indexed item (valid rows of done chunks)
    group-<key>.faiss      faiss IndexScalarQuantizer(d, QT_fp16, METRIC_INNER_PRODUCT)
    group-<key>.npy        float16 [n, d] (backend "numpy": exact brute force, no faiss needed)

``<key>`` hashes the group's member set, so a group is built once and reused by every later
call (whatever its name); new groups are added to the same folder in one more pass. An index
folder belongs to one store content: opening it with another store (or the same store after
more chunks were written or it was finalised again) raises :class:`IndexMismatchError` listing
what differs (pass ``rebuild=True`` to start over).

**Through a CompAlign** (text queries on a non-CLIP store, docs/method.md §3 + §6.2): ``build_index(...,
align=A)`` maps every component into the CLIP space first and sums the mapped contributions,

    z_G(x) = s_G(x) / ‖s_G(x)‖,    s_G(x) = Σ_{i∈G} F_i c_i(x)      (F_i: component i's map, [d_clip, d])

and the full group is the aligned representation ``Σ_i F_i c_i(x)`` (all components). The index
then lives in the CLIP space (``dim = d_clip``), so :func:`by_text` takes the CLIP's text
embeddings. ``index.json`` records the alignment (``"alignment"``: the file and its sha256 when
it came from a file, a digest of the maps themselves, ``d_clip``): building into a folder made
with another alignment (or none) raises :class:`IndexMismatchError`. The default folder of an
aligned index is ``STORE/retrieval-align-<digest>``, so it never collides with the plain one.

faiss is optional (``pip install 'vitdecomp[retrieval]'``); ``backend="numpy"`` stores the same
float16 vectors as ``.npy`` and answers with an exact blocked brute force over them (decoded to
float32 in memory when first searched; slower per query than faiss, see ``benchmarks/retrieval.py``).

Example::

    import vitdecomp as vd
    from vitdecomp import retrieve

    store = vd.store.ComponentStore.open("clip.zarr")
    groups = retrieve.feature_groups(table, "colour", size=3)      # table: a vd.score.ScoreTable
    index = retrieve.build_index(store, [*groups, retrieve.full_group()])
    hits = retrieve.by_text(index[groups[0]], text_embeddings, k=10)   # [q, d] unit rows
    hits.ids[0], hits.scores[0]                                     # best first
    hits = retrieve.by_image(index[groups[0]], "train/red/000012.png", k=10)
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:
    import torch

    from ..interpret.align import CompAlign
    from ..interpret.score import ScoreTable
    from ..store.component_store import ComponentStore

__all__ = [
    "FULL",
    "Backend",
    "ComponentGroup",
    "GroupIndex",
    "Hits",
    "IndexMismatchError",
    "RetrievalIndex",
    "build_index",
    "by_image",
    "by_text",
    "alignment_record",
    "exact_search",
    "feature_groups",
    "full_group",
    "precision_at_k",
    "search",
    "top_components",
    "unit_rows",
]

log = logging.getLogger(__name__)

FORMAT = "vitdecomp.retrieval/1"
#: Name of the group that is the model's own (full) representation.
FULL = "full"
#: Components never picked by score: the readout's constant bias (same vector for every item).
UNSELECTABLE: tuple[str, ...] = ("bias",)
Backend = Literal["faiss", "numpy"]
_BACKENDS = ("faiss", "numpy")
_STORE_KEYS = ("config_hash", "n_items", "labels_sha256", "chunks_done", "manifest_sha256")
_CHUNK_ROWS = 1 << 16  # rows per block of the numpy brute force
_INSTALL = "pip install 'vitdecomp[retrieval]'"


class IndexMismatchError(InputError):
    """An index folder was built for another store (or another state of it); the message lists what differs."""


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise InputError(
            f"retrieval with backend 'faiss' needs the faiss package: {_INSTALL} "
            "(or use backend='numpy' / --backend numpy for an exact brute force without it)"
        ) from exc
    return faiss


# ============================================================================ groups
@dataclass(frozen=True)
class ComponentGroup:
    """A named set of store components whose summed contribution is one representation.

    Attributes:
        name: label for reports (``"colour#0"``, ``"full"``, ``"L03.H00+L02.H01"``).
        components: component labels, or None for the full representation (the stored reference).
        meta: how the group was chosen (feature, score kind, scores), JSON-able; not part of its identity.
    """

    name: str
    components: tuple[str, ...] | None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.components is not None:
            comps = tuple(str(c) for c in self.components)
            if not comps:
                raise InputError(f"group {self.name!r} has no components")
            if len(set(comps)) != len(comps):
                raise InputError(f"group {self.name!r} lists a component twice: {list(comps)}")
            object.__setattr__(self, "components", comps)

    @property
    def is_full(self) -> bool:
        return self.components is None

    @property
    def key(self) -> str:
        """Identity of the member *set* (order and name do not matter): 16 hex digits."""
        members = None if self.components is None else sorted(self.components)
        return hashlib.sha256(json.dumps({"components": members}).encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        from ..store.provenance import jsonable

        return {"name": self.name, "components": None if self.components is None else list(self.components),
                "key": self.key, "meta": jsonable(self.meta)}

    @classmethod
    def of(cls, components: Sequence[str], name: str | None = None, **meta: Any) -> ComponentGroup:
        """A group of explicit components (named ``"A+B+C"`` by default)."""
        comps = tuple(str(c) for c in components)
        return cls(name or "+".join(comps), comps, dict(meta))


def full_group() -> ComponentGroup:
    """The full representation ``z(x)`` (the store's reference), the baseline of every comparison."""
    return ComponentGroup(FULL, None, {"what": "the model's representation (stored reference)"})


def _selectable(labels: Sequence[str], exclude: Iterable[str]) -> np.ndarray:
    banned = set(exclude)
    return np.array([str(lab) not in banned for lab in labels], dtype=bool)


def top_components(
    table: ScoreTable,
    feature: str,
    k: int,
    *,
    by: Literal["score", "selectivity"] = "score",
    start: int = 0,
    exclude: Iterable[str] = UNSELECTABLE,
) -> list[int]:
    """Rows of the components ranked ``start .. start+k-1`` on ``feature`` (best first).

    Ranking: descending ``table[feature]`` (``by="score"``) or its selectivity
    ``g_{i,p} = s_{i,p} − max_{p'≠p} s_{i,p'}`` (``by="selectivity"``, needs two features), ties
    by row order, NaN last; components named in ``exclude`` (default the constant readout
    ``bias``) are never returned.
    """
    if k < 1 or start < 0:
        raise InputError(f"need k >= 1 and start >= 0, got k={k}, start={start}")
    if by not in ("score", "selectivity"):
        raise InputError(f"by must be 'score' or 'selectivity', got {by!r}")
    source = table.selectivity() if by == "selectivity" else table
    try:
        scores = np.array(source[feature], dtype=np.float64)
    except KeyError as exc:
        raise InputError(f"no feature {feature!r} in the score table; have {list(table.features)}") from exc
    allowed = _selectable(table.labels, exclude)
    scores[~allowed] = -np.inf
    order = [int(i) for i in np.argsort(-scores, kind="stable") if allowed[i]]
    return order[start:start + k]


def feature_groups(
    table: ScoreTable,
    feature: str,
    *,
    size: int = 3,
    n_groups: int = 1,
    by: Literal["score", "selectivity"] = "score",
    exclude: Iterable[str] = UNSELECTABLE,
) -> list[ComponentGroup]:
    """Consecutive groups of ``size`` components in ``feature`` order (docs/method.md §6.2: threes).

    Group ``j`` (named ``"{feature}#{j}"``) holds the components ranked ``j·size .. (j+1)·size−1``
    by :func:`top_components`; use ``by="score"`` (``corr``) for text queries and
    ``by="selectivity"`` for image queries (§6.3). Fewer groups come back when components run out.
    """
    if size < 1 or n_groups < 1:
        raise InputError(f"need size >= 1 and n_groups >= 1, got {size}, {n_groups}")
    values = (table.selectivity() if by == "selectivity" else table)[feature]
    out = []
    for j in range(n_groups):
        rows = top_components(table, feature, size, by=by, start=j * size, exclude=exclude)
        if not rows:
            break
        out.append(ComponentGroup(
            f"{feature}#{j}", tuple(table.labels[i] for i in rows),
            {"feature": feature, "by": by, "kind": table.kind, "rank": [j * size + 1, j * size + len(rows)],
             "scores": {table.labels[i]: float(values[i]) for i in rows}}))
    return out


# ============================================================================ exact search
def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (along the last axis; zero rows stay zero), same dtype."""
    x = np.asarray(x)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def _block_topk(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``s [q, c]`` the ``k`` largest (descending, ties by column): columns, values."""
    q, c = s.shape
    k = min(k, c)
    if k == c:
        cols = np.argsort(-s, axis=1, kind="stable")
        return cols, np.take_along_axis(s, cols, axis=1)
    kth = -np.partition(-s, k - 1, axis=1)[:, k - 1]  # k-th largest value per row
    cols = np.empty((q, k), dtype=np.int64)
    for r in range(q):
        cand = np.flatnonzero(s[r] >= kth[r])  # ascending columns, every tie at the boundary included
        cols[r] = cand[np.argsort(-s[r, cand], kind="stable")[:k]]
    return cols, np.take_along_axis(s, cols, axis=1)


def exact_search(
    vectors: np.ndarray,
    queries: np.ndarray,
    k: int,
    *,
    exclude: Sequence[int] | np.ndarray | None = None,
    block: int = _CHUNK_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-``k``: for each query the rows of ``vectors`` with the largest ``⟨v, q⟩``.

    Scores are computed in ``promote(vectors.dtype, float32)`` (float16 rows are decoded to
    float32; float64 stays float64) over blocks of ``block`` rows. The order is exactly that of a
    stable descending sort of the full score row: ties go to the smaller row.

    Args:
        vectors: ``[n, d]``.
        queries: ``[q, d]`` (or ``[d]``).
        k: neighbours per query (at most ``n``, or ``n − 1`` with ``exclude``).
        exclude: per query one row never returned (e.g. the query item itself), or None.
        block: rows per block (memory ``q × block`` scores).

    Returns:
        ``(rows [q, k'] int64, scores [q, k'])`` with ``k' = min(k, available rows)``.
    """
    v = np.asarray(vectors)
    qs = np.asarray(queries)
    qs = qs[None] if qs.ndim == 1 else qs
    if v.ndim != 2 or qs.ndim != 2 or qs.shape[1] != v.shape[1]:
        raise InputError(f"need vectors [n, d] and queries [q, d], got {v.shape} and {qs.shape}")
    dtype = np.promote_types(v.dtype, np.float32)
    qs = qs.astype(dtype, copy=False)
    n = v.shape[0]
    excl = None if exclude is None else np.asarray(exclude, dtype=np.int64).reshape(-1)
    if excl is not None and excl.shape[0] != qs.shape[0]:
        raise InputError(f"exclude needs one row per query ({qs.shape[0]}), got {excl.shape[0]}")
    k = max(0, min(int(k), n - (0 if excl is None else 1)))
    best_rows = np.zeros((qs.shape[0], 0), dtype=np.int64)
    best = np.zeros((qs.shape[0], 0), dtype=dtype)
    if k == 0:
        return best_rows, best
    for start in range(0, n, block):
        part = v[start:start + block].astype(dtype, copy=False)
        s = qs @ part.T  # [q, c]
        if excl is not None:
            hit = (excl >= start) & (excl < start + part.shape[0])
            s[np.flatnonzero(hit), excl[hit] - start] = -np.inf
        cols, vals = _block_topk(s, k)
        rows = np.concatenate([best_rows, cols + start], axis=1)  # earlier blocks first: smaller rows win ties
        vals = np.concatenate([best, vals], axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")[:, :k]
        best_rows, best = np.take_along_axis(rows, order, axis=1), np.take_along_axis(vals, order, axis=1)
    return best_rows, best


def precision_at_k(rows: np.ndarray, labels: np.ndarray, query_labels: np.ndarray) -> float:
    """Mean share of retrieved items whose label equals their query's: ``mean(labels[rows] == query_labels[:, None])``.

    Args:
        rows: ``[q, k]`` retrieved rows (indices into ``labels``).
        labels: ``[n]`` ground truth of every item.
        query_labels: ``[q]`` the label each query asks for.
    """
    rows = np.asarray(rows)
    labels = np.asarray(labels)
    query_labels = np.asarray(query_labels)
    if rows.ndim != 2 or rows.shape[0] != query_labels.shape[0]:
        raise InputError(f"rows must be [q, k] with q = {query_labels.shape[0]}, got {rows.shape}")
    return float(np.mean(labels[rows] == query_labels[:, None]))


# ============================================================================ results
@dataclass(frozen=True)
class Hits:
    """Neighbours of one or more queries in one group, best first.

    Attributes:
        group: the group searched.
        queries: one description per query (the text, or the query item's id).
        rows: ``[q, k]`` int64 store rows.
        ids: ``q`` lists of ``k`` item ids (paths relative to the dataset root for image folders).
        scores: ``[q, k]`` float32 cosines (float16 storage: about 1e-3 absolute).
        positions: ``[q, k]`` positions in the index.
    """

    group: ComponentGroup
    queries: list[str]
    rows: np.ndarray
    ids: list[list[str]]
    scores: np.ndarray
    positions: np.ndarray

    def to_json(self) -> dict[str, Any]:
        return {
            "group": self.group.to_json(),
            "queries": [
                {"query": q, "hits": [{"rank": r + 1, "row": int(self.rows[i, r]), "id": self.ids[i][r],
                                       "score": float(self.scores[i, r])} for r in range(self.rows.shape[1])]}
                for i, q in enumerate(self.queries)
            ],
        }


# ============================================================================ one group's index
class GroupIndex:
    """The float16 inner-product index of one group (open it through :class:`RetrievalIndex`).

    Attributes:
        group: the group; ``dim``: vector width; ``backend``: ``"faiss"`` or ``"numpy"``;
        rows: ``[n]`` store row of every position; ``ids``: their ids.
    """

    def __init__(self, group: ComponentGroup, path: Path, backend: str, dim: int, rows: np.ndarray,
                 ids: list[str]) -> None:
        self.group = group
        self.path = path
        self.backend = backend
        self.dim = dim
        self.rows = rows
        self.ids = ids
        self._data: Any = None
        self._by_id: dict[str, int] | None = None
        self._by_row: dict[int, int] | None = None

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __repr__(self) -> str:
        return f"GroupIndex({self.group.name!r}, n={len(self)}, d={self.dim}, backend={self.backend!r})"

    def _load(self) -> Any:
        if self._data is None:
            if self.backend == "faiss":
                self._data = _faiss().read_index(str(self.path))
            else:  # decoded once: float32 in memory (n x d x 4 bytes) makes each query one matmul
                self._data = np.load(self.path).astype(np.float32)
            n = self._data.ntotal if self.backend == "faiss" else self._data.shape[0]
            if n != len(self):
                raise InputError(f"{self.path} holds {n} vectors, index.json {len(self)}; rebuild the index")
        return self._data

    def position(self, item: int | str) -> int:
        """Index position of a store row (int) or an item id (str)."""
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if self._by_row is None:
                self._by_row = {int(r): p for p, r in enumerate(self.rows.tolist())}
            pos = self._by_row.get(int(item))
            if pos is None:
                raise InputError(f"store row {int(item)} is not in the index (skipped image, or not written yet)")
            return pos
        if self._by_id is None:
            self._by_id = {i: p for p, i in enumerate(self.ids)}
        pos = self._by_id.get(str(item))
        if pos is None:
            near = [i for i in self.ids if str(item) in i][:3]
            hint = f"; did you mean {near}?" if near else ""
            raise InputError(f"no item with id {str(item)!r} in the index{hint}")
        return pos

    def vector(self, positions: int | Sequence[int] | np.ndarray) -> np.ndarray:
        """Stored unit vectors (float16 decoded to float32): ``[len(positions), d]``."""
        pos = np.atleast_1d(np.asarray(positions, dtype=np.int64))
        data = self._load()
        if self.backend == "faiss":
            return np.stack([data.reconstruct(int(p)) for p in pos]).astype(np.float32)
        return np.asarray(data[pos], dtype=np.float32)

    def search_vectors(self, queries: np.ndarray, k: int, *, exclude: np.ndarray | None = None) -> tuple[
            np.ndarray, np.ndarray]:
        """Positions ``[q, k']`` and inner products ``[q, k']`` of the nearest stored vectors (float32 queries)."""
        q = np.ascontiguousarray(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        if q.shape[1] != self.dim:
            raise InputError(f"queries have dim {q.shape[1]}, the index of {self.group.name!r} {self.dim}")
        data = self._load()
        if self.backend == "numpy":
            return exact_search(data, q, k, exclude=exclude)
        n = len(self)
        k = max(0, min(int(k), n - (0 if exclude is None else 1)))
        if k == 0:
            return np.zeros((q.shape[0], 0), np.int64), np.zeros((q.shape[0], 0), np.float32)
        extra = 0 if exclude is None else 1
        scores, pos = data.search(q, k + extra)
        if exclude is None:
            return pos.astype(np.int64), scores
        out_p = np.empty((q.shape[0], k), np.int64)
        out_s = np.empty((q.shape[0], k), np.float32)
        for r in range(q.shape[0]):
            keep = pos[r] != exclude[r]
            out_p[r], out_s[r] = pos[r][keep][:k], scores[r][keep][:k]
        return out_p, out_s


def search(index: GroupIndex, vectors: np.ndarray | torch.Tensor, k: int = 10, *,
           queries: Sequence[str] | None = None, exclude: Sequence[int] | None = None) -> Hits:
    """The ``k`` nearest items of each query vector (normalised here) in one group's index.

    Args:
        index: a group's index (``RetrievalIndex[group]``).
        vectors: ``[q, d]`` (or ``[d]``) query vectors in the store's space.
        k: neighbours per query.
        queries: descriptions recorded in the result (default ``"vector 0"``, ...).
        exclude: per query one index *position* never returned.
    """
    v = _as_f32(vectors)
    names = list(queries) if queries is not None else [f"vector {i}" for i in range(v.shape[0])]
    if len(names) != v.shape[0]:
        raise InputError(f"{len(names)} query names for {v.shape[0]} vectors")
    excl = None if exclude is None else np.asarray(exclude, dtype=np.int64)
    pos, scores = index.search_vectors(unit_rows(v), k, exclude=excl)
    if (pos < 0).any():  # faiss pads with -1 when it finds fewer than k
        raise InputError(f"the index of {index.group.name!r} returned fewer than {k} neighbours")
    return Hits(index.group, names, index.rows[pos], [[index.ids[p] for p in row] for row in pos.tolist()],
                scores.astype(np.float32), pos)


def _as_f32(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    a = np.asarray(x, dtype=np.float32)
    a = a[None] if a.ndim == 1 else a
    if a.ndim != 2:
        raise InputError(f"query vectors must be [q, d] or [d], got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise InputError("query vectors contain NaN or infinite values")
    return a


def by_text(index: GroupIndex, text_embeddings: np.ndarray | torch.Tensor, k: int = 10, *,
            texts: Sequence[str] | None = None) -> Hits:
    """Text → images (docs/method.md §6.2): rank items by ``cos(z_G(x), y_s)`` for each text embedding.

    Args:
        index: the group's index; the store must be in the text encoder's space (a CLIP store, or
            an aligned one).
        text_embeddings: ``[s, d]`` (or ``[d]``) text embeddings ``y_s`` (normalised here), e.g.
            :func:`vitdecomp.interpret.text.embed_templates`.
        k: images per text.
        texts: the texts, recorded in the result.
    """
    v = _as_f32(text_embeddings)
    if v.shape[1] != index.dim:
        raise InputError(f"text embeddings have dim {v.shape[1]} but the store's representation {index.dim}: "
                         "text retrieval needs a store in the text encoder's space (a CLIP model, or a store "
                         "aligned with CompAlign)")
    return search(index, v, k, queries=list(texts) if texts is not None else [f"text {i}" for i in range(len(v))])


def by_image(index: GroupIndex, items: int | str | Sequence[int | str], k: int = 10) -> Hits:
    """Image → images with respect to the group's feature (docs/method.md §6.3), the query item excluded.

    Ranks items by ``cos(z_G(x'), z_G(x_ref))`` where ``z_G(x_ref)`` is the query's own stored
    (float16) group vector.

    Args:
        index: the group's index.
        items: a store row (int), an item id (str), or a list of them (one query each).
        k: neighbours per query (the query itself never counts).
    """
    many = isinstance(items, (list, tuple, np.ndarray))
    seq = list(items) if many else [items]  # type: ignore[list-item]
    pos = np.array([index.position(it) for it in seq], dtype=np.int64)
    return search(index, index.vector(pos), k, queries=[index.ids[p] for p in pos], exclude=pos)


# ============================================================================ the folder
def _store_identity(store: ComponentStore) -> dict[str, Any]:
    from ..store.provenance import store_record

    return store_record(store)


def _identity_problems(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    return [f"{key}: index built for {recorded.get(key)!r}, store has {now.get(key)!r}"
            for key in _STORE_KEYS if recorded.get(key) != now.get(key)]


def _maps_digest(align: CompAlign) -> str:
    """sha256 of what the maps do: ``group_maps`` (float32 bytes, shape), ``map_index`` and labels."""
    import torch

    digest = hashlib.sha256()
    maps = align.group_maps.detach().to(device="cpu", dtype=torch.float32).contiguous()
    digest.update(json.dumps({"shape": list(maps.shape), "map_index": list(align.map_index),
                              "labels": None if align.labels is None else list(align.labels),
                              "identity": align.is_identity}).encode())
    digest.update(maps.numpy().tobytes())
    return digest.hexdigest()


def alignment_record(align: CompAlign | str | Path) -> tuple[CompAlign, dict[str, Any]]:
    """``(maps, record)`` for ``build_index(..., align=...)``.

    ``align`` is a :class:`~vitdecomp.interpret.align.CompAlign`, its ``.safetensors`` file, or a folder
    written by ``vitdecomp align --out DIR`` (see :func:`vitdecomp.interpret.align.find_alignment`).
    The record holds ``maps_sha256`` (a digest of the maps: the identity an index is checked
    against), ``file`` and ``sha256`` (the file's, None for an object), ``d_clip``, ``d_model``,
    ``n_components`` and the model / CLIP the maps were fitted for (when recorded).
    """
    from ..interpret.align import CompAlign
    from ..core.model import file_sha256

    file: Path | None = None
    if isinstance(align, CompAlign):
        maps = align
    elif isinstance(align, (str, Path)):
        from ..interpret.align import find_alignment

        file = find_alignment(Path(align))
        maps = CompAlign.load(file)
    else:
        raise InputError(f"align must be a CompAlign or the path of one, got {type(align).__name__}")
    record = {
        "maps_sha256": _maps_digest(maps),
        "file": None if file is None else str(file),
        "sha256": None if file is None else file_sha256(file),
        "d_clip": maps.d_clip, "d_model": maps.d_model, "n_components": maps.n_components,
        "n_maps": maps.n_maps, "identity": maps.is_identity,
        "model": maps.meta.get("model"), "clip_model": maps.meta.get("clip_model"),
    }
    return maps, record


def _alignment_problems(recorded: Mapping[str, Any] | None, now: Mapping[str, Any] | None) -> list[str]:
    def say(rec: Mapping[str, Any] | None) -> str:
        if rec is None:
            return "no alignment (the store's own space)"
        where = f" from {rec['file']} (sha256 {str(rec['sha256'])[:12]})" if rec.get("file") else ""
        return f"alignment with maps {rec['maps_sha256'][:12]}{where}"

    old = None if recorded is None else recorded.get("maps_sha256")
    new = None if now is None else now.get("maps_sha256")
    return [] if old == new else [f"alignment: index built with {say(recorded)}, asked for {say(now)}"]


def _check_alignment_fits(align: CompAlign, store: ComponentStore) -> None:
    n, d = int(store.comp_shape[0]), int(store.comp_shape[-1])
    if align.n_components != n or align.d_model != d:
        raise InputError(f"the alignment maps {align.n_components} components of width {align.d_model}, but the "
                         f"store {store.path} has {n} of width {d}: use the maps fitted on this store's model and "
                         "granularity")
    if align.labels is not None and tuple(align.labels) != tuple(str(x) for x in store.labels):
        raise InputError(f"the alignment was fitted for other components than those of {store.path} "
                         f"(e.g. {list(align.labels[:3])} vs {list(store.labels[:3])})")
    fitted_on = align.meta.get("model")
    if fitted_on is not None and fitted_on != store.config.model:
        raise InputError(f"the alignment maps the components of {fitted_on}, not of the store's {store.config.model}")


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a file object: np.save would append ".npy" to a temp name
        np.save(fh, array)


def _write_json(path: Path, payload: Any) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8"))


class RetrievalIndex:
    """A folder of per-group indexes over one store (see the module docs); ``index[group]`` opens one.

    Attributes:
        path: the folder; ``info``: the parsed ``index.json``; ``rows``/``ids``: the indexed items.
    """

    def __init__(self, path: Path, info: dict[str, Any]) -> None:
        self.path = path
        self.info = info
        self.rows: np.ndarray = np.load(path / "rows.npy")
        self.ids: list[str] = json.loads((path / "ids.json").read_text(encoding="utf-8"))
        if len(self.ids) != len(self.rows) or len(self.rows) != info["n"]:
            raise InputError(f"{path}: rows.npy / ids.json / index.json disagree on the item count; rebuild")
        self._open: dict[str, GroupIndex] = {}

    @classmethod
    def open(cls, path: str | Path, store: ComponentStore | None = None) -> RetrievalIndex:
        """Open an index folder; with ``store``, check that it was built for that store's content.

        Raises:
            InputError: no index there. IndexMismatchError: built for another store (or state).
        """
        p = Path(path)
        meta = p / "index.json"
        if not meta.is_file():
            raise InputError(f"no retrieval index at {p} (build one with vitdecomp.apps.retrieve.build_index)")
        info = json.loads(meta.read_text(encoding="utf-8"))
        if info.get("format") != FORMAT:
            raise InputError(f"{meta} is not a {FORMAT} index")
        if store is not None:
            problems = _identity_problems(info["store"], _store_identity(store))
            if problems:
                raise IndexMismatchError(
                    f"the retrieval index {p} belongs to another store (or an earlier state of {store.path}):\n  "
                    + "\n  ".join(problems)
                    + "\nRebuild it (rebuild=True, or --rebuild) or choose another index folder.")
        return cls(p, info)

    @property
    def alignment(self) -> dict[str, Any] | None:
        """The CompAlign record the index was built through (see :func:`alignment_record`), or None."""
        return self.info.get("alignment")

    @property
    def groups(self) -> list[ComponentGroup]:
        """Every group in the folder."""
        return [ComponentGroup(e["name"], None if e["components"] is None else tuple(e["components"]),
                               dict(e.get("meta") or {})) for e in self.info["groups"].values()]

    def __len__(self) -> int:
        return int(self.info["n"])

    def __contains__(self, group: ComponentGroup | str) -> bool:
        try:
            self._entry(group)
        except KeyError:
            return False
        return True

    def _entry(self, group: ComponentGroup | str) -> tuple[str, dict[str, Any]]:
        entries = self.info["groups"]
        if isinstance(group, ComponentGroup):
            if group.key in entries:
                return group.key, entries[group.key]
            raise KeyError(f"group {group.name!r} ({group.key}) is not built in {self.path}")
        found = [(k, e) for k, e in entries.items() if e["name"] == group or k == group]
        if len(found) == 1:
            return found[0]
        if not found:
            raise KeyError(f"no group {group!r} in {self.path}; have {sorted(e['name'] for e in entries.values())}")
        raise KeyError(f"several groups are named {group!r} in {self.path}; pass the ComponentGroup")

    def __getitem__(self, group: ComponentGroup | str) -> GroupIndex:
        key, entry = self._entry(group)
        if key not in self._open:
            g = group if isinstance(group, ComponentGroup) else ComponentGroup(
                entry["name"], None if entry["components"] is None else tuple(entry["components"]),
                dict(entry.get("meta") or {}))
            self._open[key] = GroupIndex(g, self.path / entry["file"], entry["backend"], int(entry["dim"]),
                                         self.rows, self.ids)
        return self._open[key]

    def __repr__(self) -> str:
        return f"RetrievalIndex({str(self.path)!r}, n={len(self)}, groups={[g.name for g in self.groups]})"


def _group_rows(store: ComponentStore, groups: Sequence[ComponentGroup]) -> list[np.ndarray | None]:
    index = {name: i for i, name in enumerate(store.labels)}
    out: list[np.ndarray | None] = []
    for g in groups:
        if g.components is None:
            out.append(None)
            continue
        missing = [c for c in g.components if c not in index]
        if missing:
            raise InputError(f"group {g.name!r}: no component {missing[:5]} in the store "
                             f"(its components are e.g. {store.labels[:6]})")
        out.append(np.array([index[c] for c in g.components], dtype=np.int64))
    return out


def _progress(total: int, enabled: bool) -> Any:
    from ..store.dataset_run import progress_bar as bar

    return bar(total, enabled=enabled, desc="retrieval index")


def build_index(
    store: ComponentStore,
    groups: Sequence[ComponentGroup],
    path: str | Path | None = None,
    *,
    backend: Backend = "faiss",
    batch_size: int | None = None,
    rebuild: bool = False,
    progress: bool = False,
    align: CompAlign | str | Path | None = None,
) -> RetrievalIndex:
    """Index every valid row of ``store`` for each group; groups already built are reused.

    One pass over the store (memory one chunk) computes, per batch and group,
    ``z_G(x) = Σ_{i∈G} c_i(x) / ‖·‖`` (sums in float64 from the stored values, tokens summed; the
    full group normalises the stored float32 reference) and appends it, as float16, to the
    group's index.

    Args:
        store: the store (valid rows of its done chunks are indexed).
        groups: the groups to have; duplicates (same member set) are built once.
        path: index folder (default ``STORE/retrieval``, or ``STORE/retrieval-align-<digest>``
            with ``align``).
        backend: ``"faiss"`` (``IndexScalarQuantizer`` float16, inner product; needs faiss) or
            ``"numpy"`` (float16 ``.npy``, exact brute force). A group built with the other
            backend is rebuilt.
        batch_size: items per pass step (default the store's chunk size).
        rebuild: delete the folder's contents first (also the way out of a store mismatch).
        progress: show a progress bar.
        align: index in a CLIP space through these maps (a CompAlign, its file or its
            ``vitdecomp align`` folder): ``z_G = Σ_{i∈G} F_i c_i / ‖·‖`` (sums in float64 of the
            float32 mapped contributions), full group ``Σ_i F_i c_i``; see the module docs.

    Raises:
        IndexMismatchError: the folder was built for another store (or state) or another
            alignment, and ``rebuild`` is False.
        InputError: unknown components, an empty store, faiss missing for ``backend="faiss"``,
            or an alignment fitted for other components.
    """
    if backend not in _BACKENDS:
        raise InputError(f"unknown backend {backend!r}; use one of {_BACKENDS}")
    if backend == "faiss":
        _faiss()
    if not groups:
        raise InputError("no groups to index")
    maps: CompAlign | None = None
    align_rec: dict[str, Any] | None = None
    if align is not None:
        maps, align_rec = alignment_record(align)
        _check_alignment_fits(maps, store)
    default = "retrieval" if align_rec is None else f"retrieval-align-{align_rec['maps_sha256'][:12]}"
    root = Path(path) if path is not None else Path(store.path) / default
    identity = _store_identity(store)
    if rebuild and root.exists():
        if not (root / "index.json").is_file() and any(root.iterdir()):
            raise InputError(f"{root} is not a retrieval index folder; refusing to delete it")
        shutil.rmtree(root)
    info: dict[str, Any] | None = None
    if (root / "index.json").is_file():
        existing = RetrievalIndex.open(root, store)  # raises on a mismatch
        info = existing.info
        problems = _alignment_problems(info.get("alignment"), align_rec)
        if problems:
            raise IndexMismatchError(f"the retrieval index {root} was built in another space:\n  "
                                     + "\n  ".join(problems)
                                     + "\nRebuild it (rebuild=True, or --rebuild) or choose another index folder.")
    elif root.exists() and any(root.iterdir()):
        raise InputError(f"{root} exists and is not a retrieval index folder; choose another path")
    unique: dict[str, ComponentGroup] = {}
    for g in groups:
        unique.setdefault(g.key, g)
    todo = [g for key, g in unique.items()
            if info is None or key not in info["groups"] or info["groups"][key]["backend"] != backend]
    members = _group_rows(store, todo)
    if info is not None and not todo:
        log.info("retrieval index %s: all %d groups already built", root, len(unique))
        return RetrievalIndex(root, info)
    if not store.is_complete():
        log.warning("store %s is not complete (%d/%d chunks): indexing the done chunks only", store.path,
                    len(store.done_chunks()), store.n_chunks)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    built = _stream_groups(store, todo, members, backend, batch_size, progress, maps)
    seconds = time.perf_counter() - t0
    rows, ids, sinks = built
    if info is not None and not np.array_equal(rows, np.load(root / "rows.npy")):
        raise IndexMismatchError(f"{root}: the store's indexed rows changed since the index was built; rebuild it")
    if info is None:
        if rows.size == 0:
            raise InputError(f"store {store.path} has no valid rows in done chunks; nothing to index")
        _atomic_write(root / "rows.npy", lambda tmp: _save_npy(tmp, rows))
        _write_json(root / "ids.json", ids)
        info = {
            "format": FORMAT,
            "store": identity,
            "n": int(rows.size),
            "rows_file": "rows.npy",
            "ids_file": "ids.json",
            "normalisation": ("l2: z_G(x) = sum_{i in G} c_i(x) / ||.||, zero sums stay zero; "
                              "full = the stored reference / ||.||; inner product = cosine") if maps is None else
                             ("l2 in the CLIP space: z_G(x) = sum_{i in G} F_i c_i(x) / ||.||, zero sums stay zero; "
                              "full = sum_i F_i c_i(x) / ||.||; inner product = cosine"),
            "alignment": align_rec,
            "metric": "inner_product",
            "storage": "float16",
            "groups": {},
            "versions": _versions(),
        }
    for g, sink in zip(todo, sinks):
        file = f"group-{g.key}.{'faiss' if backend == 'faiss' else 'npy'}"
        sink.save(root / file)
        for other in ("faiss", "npy"):  # a group rebuilt with the other backend: drop its old file
            old = root / f"group-{g.key}.{other}"
            if old.name != file and old.exists():
                old.unlink()
        info["groups"][g.key] = {
            "name": g.name, "components": None if g.components is None else list(g.components),
            "meta": g.to_json()["meta"], "backend": backend, "file": file, "dim": sink.dim,
            "index_type": sink.kind, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(seconds, 3),
        }
    info["versions"] = _versions()
    _write_json(root / "index.json", info)
    log.info("retrieval index %s: built %d group(s) over %d items in %.1f s", root, len(todo), info["n"], seconds)
    return RetrievalIndex(root, info)


def _versions() -> dict[str, str]:
    from .. import __version__

    out = {"vitdecomp": __version__, "numpy": np.__version__}
    try:
        import faiss

        out["faiss"] = str(faiss.__version__)
    except ImportError:
        pass
    return out


class _Sink:
    """Accumulates one group's float16 unit vectors (faiss index, or blocks of a numpy array)."""

    def __init__(self, backend: str, dim: int) -> None:
        self.backend = backend
        self.dim = dim
        if backend == "faiss":
            faiss = _faiss()
            self.index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
            self.kind = "IndexScalarQuantizer(QT_fp16, METRIC_INNER_PRODUCT)"
        else:
            self.blocks: list[np.ndarray] = []
            self.kind = "numpy float16 [n, d], exact brute force"

    def add(self, x: np.ndarray) -> None:
        if self.backend == "faiss":
            self.index.add(np.ascontiguousarray(x, dtype=np.float32))
        else:
            self.blocks.append(x.astype(np.float16))

    def save(self, path: Path) -> None:
        if self.backend == "faiss":
            faiss = _faiss()
            _atomic_write(path, lambda tmp: faiss.write_index(self.index, str(tmp)))
        else:
            data = np.concatenate(self.blocks) if self.blocks else np.zeros((0, self.dim), np.float16)
            _atomic_write(path, lambda tmp: _save_npy(tmp, data))


def _stream_groups(store: ComponentStore, groups: Sequence[ComponentGroup], members: Sequence[np.ndarray | None],
                   backend: str, batch_size: int | None, progress: bool,
                   align: CompAlign | None = None) -> tuple[np.ndarray, list[str], list[_Sink]]:
    """One pass: per batch, each group's unit vectors into its sink; returns (rows, ids, sinks).

    With ``align``, every component is first mapped (``F_i c_i``, :meth:`CompAlign.apply`) and
    the full group is the sum of all mapped components.
    """
    import torch

    dim = int(store.comp_shape[-1]) if align is None else align.d_clip
    sinks = [_Sink(backend, dim) for _ in groups]
    rows: list[np.ndarray] = []
    ids: list[str] = []
    n_valid = sum(len(store.chunk_rows(c)) for c in store.done_chunks())
    bar = _progress(n_valid, progress)
    try:
        for stack in store.iter_batches(batch_size):
            stack = stack.sum_tokens()
            if align is not None:
                stack = align.apply(stack)  # [comp, b, d_clip]; reference = sum of the mapped components
            values = stack.values  # [comp, b, d] float32
            for sink, idx in zip(sinks, members):
                if idx is None and align is not None:
                    s = values.to(torch.float64).sum(0)
                elif idx is None:
                    s = stack.reference.to(torch.float64)
                else:
                    s = values.index_select(0, torch.from_numpy(idx)).to(torch.float64).sum(0)
                sink.add(unit_rows(s.numpy()).astype(np.float32))
            rows.append(np.asarray(stack.meta["rows"], dtype=np.int64))
            ids += [str(i) for i in stack.meta["ids"]]
            bar.update(stack.batch_size)
    finally:
        bar.close()
    return (np.concatenate(rows) if rows else np.zeros(0, np.int64)), ids, sinks
