"""The index folder of a store: build once, reuse, refuse another store's (docs/method.md §6.2–6.3).

:func:`build_index` streams a :class:`~vitdecomp.store.component_store.ComponentStore` once and
writes, per :class:`~vitdecomp.apps.retrieve.groups.ComponentGroup`, one float16 inner-product
index of the unit group sums ``z_G(x) = Σ_{i∈G} c_i(x) / ‖·‖`` (or, through a CompAlign,
``Σ_{i∈G} F_i c_i(x) / ‖·‖``) into a folder; :class:`RetrievalIndex` opens the folder and checks it
belongs to the store's current content (:class:`IndexMismatchError` otherwise). The folder's
format is described in :mod:`vitdecomp.apps.retrieve`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import InputError
from .exact import unit_rows
from .group_index import BACKENDS, Backend, GroupIndex, require_faiss
from .groups import ComponentGroup

if TYPE_CHECKING:
    from ...interpret.align import CompAlign
    from ...store.component_store import ComponentStore

__all__ = ["FORMAT", "IndexMismatchError", "RetrievalIndex", "VectorSink", "alignment_record", "build_index"]

log = logging.getLogger(__name__)

FORMAT = "vitdecomp.retrieval/1"
_STORE_KEYS = ("config_hash", "n_items", "labels_sha256", "chunks_done", "manifest_sha256")


class IndexMismatchError(InputError):
    """An index folder was built for another store (or another state of it); the message lists what differs."""


def _store_identity(store: ComponentStore) -> dict[str, Any]:
    from ...store.provenance import store_record

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
    from ...core.model import file_sha256
    from ...interpret.align import CompAlign

    file: Path | None = None
    if isinstance(align, CompAlign):
        maps = align
    elif isinstance(align, (str, Path)):
        from ...interpret.align import find_alignment

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
    from ...store.dataset_run import progress_bar as bar

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
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; use one of {BACKENDS}")
    if backend == "faiss":
        require_faiss()
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
    from ... import __version__

    out = {"vitdecomp": __version__, "numpy": np.__version__}
    try:
        import faiss

        out["faiss"] = str(faiss.__version__)
    except ImportError:
        pass
    return out


class VectorSink:
    """Accumulates one group's unit vectors ``[n, d]`` as float16: a faiss
    ``IndexScalarQuantizer(QT_fp16, METRIC_INNER_PRODUCT)`` (``backend="faiss"``) or blocks of a numpy
    array (``"numpy"``); :meth:`add` appends rows ``[b, d]``, :meth:`save` writes the file atomically."""

    def __init__(self, backend: str, dim: int) -> None:
        self.backend = backend
        self.dim = dim
        if backend == "faiss":
            faiss = require_faiss()
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
            faiss = require_faiss()
            _atomic_write(path, lambda tmp: faiss.write_index(self.index, str(tmp)))
        else:
            data = np.concatenate(self.blocks) if self.blocks else np.zeros((0, self.dim), np.float16)
            _atomic_write(path, lambda tmp: _save_npy(tmp, data))


def _stream_groups(store: ComponentStore, groups: Sequence[ComponentGroup], members: Sequence[np.ndarray | None],
                   backend: str, batch_size: int | None, progress: bool,
                   align: CompAlign | None = None) -> tuple[np.ndarray, list[str], list[VectorSink]]:
    """One pass: per batch, each group's unit vectors into its sink; returns (rows, ids, sinks).

    With ``align``, every component is first mapped (``F_i c_i``, :meth:`CompAlign.apply`) and
    the full group is the sum of all mapped components.
    """
    import torch

    dim = int(store.comp_shape[-1]) if align is None else align.d_clip
    sinks = [VectorSink(backend, dim) for _ in groups]
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
