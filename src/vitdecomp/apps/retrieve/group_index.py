"""One group's index and the queries it answers (docs/method.md §6.2–6.3).

A :class:`GroupIndex` holds the float16 unit vectors ``z_G(x)`` of one group (a faiss
``IndexScalarQuantizer`` or a ``.npy`` array searched exactly); :func:`search` returns the ``k``
nearest items of query vectors as :class:`Hits`, :func:`by_text` ranks items by
``cos(z_G(x), y_s)`` for text embeddings ``y_s`` and :func:`by_image` by ``cos(z_G(x'), z_G(x_ref))``
for stored query items (the query itself excluded). Open a group's index through
:class:`~vitdecomp.apps.retrieve.index.RetrievalIndex` (``index[group]``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ...errors import InputError
from .exact import exact_search, unit_rows
from .groups import ComponentGroup

if TYPE_CHECKING:
    import torch

__all__ = ["Backend", "BACKENDS", "require_faiss", "Hits", "GroupIndex", "search", "by_text", "by_image"]

Backend = Literal["faiss", "numpy"]
#: The index backends: faiss float16 (``IndexScalarQuantizer``) or an exact numpy brute force.
BACKENDS: tuple[str, ...] = ("faiss", "numpy")
_INSTALL = "pip install 'vitdecomp[retrieval]'"


def require_faiss() -> Any:
    """The ``faiss`` module, or an :class:`~vitdecomp.errors.InputError` saying how to install it
    (or to use ``backend="numpy"``)."""
    try:
        import faiss
    except ImportError as exc:
        raise InputError(
            f"retrieval with backend 'faiss' needs the faiss package: {_INSTALL} "
            "(or use backend='numpy' / --backend numpy for an exact brute force without it)"
        ) from exc
    return faiss


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
                self._data = require_faiss().read_index(str(self.path))
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


