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

The package, one job per module (every name below is importable from ``vitdecomp.apps.retrieve``):

* :mod:`~vitdecomp.apps.retrieve.groups`: which components form a group (:class:`ComponentGroup`,
  :func:`feature_groups`, :func:`top_components`, reading score tables and feature texts);
* :mod:`~vitdecomp.apps.retrieve.exact`: exact brute-force inner-product search (:func:`exact_search`),
  the reference every index is checked against;
* :mod:`~vitdecomp.apps.retrieve.group_index`: one group's index and its queries (:class:`GroupIndex`,
  :func:`search`, :func:`by_text`, :func:`by_image`, :class:`Hits`);
* :mod:`~vitdecomp.apps.retrieve.index`: the index folder of a store (:func:`build_index`,
  :class:`RetrievalIndex`, :func:`alignment_record`, :class:`IndexMismatchError`);
* :mod:`~vitdecomp.apps.retrieve.query`: everything ``vitdecomp retrieve`` does in one call
  (:func:`search_store` -> :class:`RetrievalResult`).

Example::

    import vitdecomp as vd
    from vitdecomp.apps import retrieve

    store = vd.store.ComponentStore.open("clip.zarr")
    groups = retrieve.feature_groups(table, "colour", size=3)      # table: a vd.score.ScoreTable
    index = retrieve.build_index(store, [*groups, retrieve.full_group()])
    hits = retrieve.by_text(index[groups[0]], text_embeddings, k=10)   # [q, d] unit rows
    hits.ids[0], hits.scores[0]                                     # best first
    hits = retrieve.by_image(index[groups[0]], "train/red/000012.png", k=10)

    # or all of it, as `vitdecomp retrieve` does it (groups, index, queries):
    result = retrieve.search_store(store, text=["a red object"], feature="colour", k=10)
    result.to_json()["queries"][0]["results"]["colour#0"]
"""
from __future__ import annotations

from .exact import exact_search, precision_at_k, unit_rows
from .group_index import BACKENDS, Backend, GroupIndex, Hits, by_image, by_text, require_faiss, search
from .groups import (
    FULL,
    UNSELECTABLE,
    ComponentGroup,
    feature_groups,
    feature_texts,
    full_group,
    read_score_table,
    top_components,
)
from .index import FORMAT, IndexMismatchError, RetrievalIndex, VectorSink, alignment_record, build_index
from .query import RetrievalResult, image_roots, resolve_item, search_store

__all__ = [
    "FULL",
    "FORMAT",
    "UNSELECTABLE",
    "BACKENDS",
    "Backend",
    "ComponentGroup",
    "GroupIndex",
    "Hits",
    "IndexMismatchError",
    "RetrievalIndex",
    "RetrievalResult",
    "VectorSink",
    "build_index",
    "by_image",
    "by_text",
    "alignment_record",
    "exact_search",
    "feature_groups",
    "feature_texts",
    "full_group",
    "image_roots",
    "precision_at_k",
    "read_score_table",
    "require_faiss",
    "resolve_item",
    "search",
    "search_store",
    "top_components",
    "unit_rows",
]
