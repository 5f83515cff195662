"""On-disk component store (zarr v3): resumable, multi-writer, readable while being written.

Layout of a store directory ``STORE/``::

    zarr.json                 zarr v3 group; attributes["vitdecomp"] holds format, config,
                              config hash, labels, comp_shape, ref_dim, space, tokens
    components/               [n_items, comp, (token,) d]   float16 | float32, NaN where skipped
    reference/                [n_items, d]                  float32, NaN where skipped
    valid/                    [n_items]                     bool
    ids/                      [n_items]                     variable-length UTF-8 strings
    targets/                  [n_items]                     int64 class label, -1 unknown/skipped
    done/NNNNNN.json          completion record of chunk NNNNNN (see below)
    stats/NAME/rankRRRRR.npz  saved :class:`RunningMoments`, with the chunks they cover
    manifest.json             written by :meth:`ComponentStore.finalize`

Items come first, so one zarr chunk of every array is exactly one batch of
``config.batch_size`` images (the last one may be partial); each chunk is its own file and
is written by exactly one writer. Arrays are uncompressed and written with
``write_empty_chunks=True`` (an all-NaN chunk of skipped images is still a file on disk).
zarr's ``LocalStore`` writes every chunk file atomically (temp file + rename).

**Completion protocol.** :meth:`ComponentStore.write_chunk` writes the rows of every array,
then atomically (temp file + fsync + ``os.replace``) writes ``done/NNNNNN.json`` with the
chunk's ids, skipped items and reasons, Σ-error statistics and timings. Only chunks with a
done record count: :meth:`~ComponentStore.pending_chunks` lists the others, and a resumed run
redoes exactly those. A chunk killed between its data and its record is simply rewritten
(writes are idempotent, whole chunks), so nothing is lost or duplicated and a resumed store is
bit-for-bit the store of an uninterrupted run. Readers (:meth:`~ComponentStore.components`,
:meth:`~ComponentStore.iter_batches`) only trust done chunks, so a store can be read while
other processes are still writing it.

**Multiple writers.** Any number of processes (e.g. ``torchrun`` ranks) may call
:meth:`ComponentStore.create_or_open` on the same path: the store is built in a private temp
directory and renamed into place, the losers of the race open the winner's store. Each rank
then writes its own chunks, e.g. ``store.pending_chunks(rank, world_size)`` (chunk ``i`` goes
to rank ``i % world_size``). Nothing is shared between writers except the (read-only) zarr
metadata, and the manifest merges every rank's done records.

**Configuration key.** :class:`StoreConfig` (model, weights, granularity, start layer, modes,
preprocessing, dtype, layout, package version) is hashed; opening a store with a different
configuration, labels or shape raises :class:`StoreMismatchError` listing each difference.

This module is the store itself (layout, chunks, done records, manifest, reading rows and
batches). The configuration key lives in :mod:`vitdecomp.store.config` and the streaming
statistics (:class:`RunningMoments`, moment files) in :mod:`vitdecomp.store.moments`; their
public names are re-exported here.

Example::

    cfg = StoreConfig(model="vit_b16", weights="pretrained:augreg", n_items=1000, batch_size=64)
    store = ComponentStore.create_or_open("out.zarr", cfg, labels=stack.names,
                                          comp_shape=(len(stack), stack.dim))
    for index in store.pending_chunks(rank, world_size):
        ids, stack, skipped = ...            # decompose the batch of chunk `index`
        store.write_chunk(index, stack, ids, skipped)
    store.finalize()
    for batch in store.iter_batches(256):   # ComponentStack, valid rows only
        ...
"""
from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from ..errors import InputError

# StoreConfig, StoreMismatchError, RunningMoments and atomic_savez live in .config and .moments and are
# re-exported here, where they were defined before the split.
from .config import StoreConfig, StoreMismatchError, package_version
from .moments import RunningMoments, atomic_savez, load_moments_files, save_moments_file  # noqa: F401

if TYPE_CHECKING:
    import torch
    import zarr

    from ..core.stack import ComponentStack, TokenInfo

__all__ = [
    "ComponentStore",
    "RunningMoments",
    "StoreConfig",
    "StoreMismatchError",
    "StoreRows",
]

log = logging.getLogger(__name__)

FORMAT = "vitdecomp.store/1"
_DONE_RE = re.compile(r"^(\d{6,})\.json$")


class StoreRows(NamedTuple):
    """Rows read from a store (items first).

    Attributes:
        values: ``[n, comp, (token,) d]`` in the storage dtype.
        reference: ``[n, d]`` float32.
        valid: ``[n]`` bool (False: skipped image, values and reference are NaN).
        ids: the ``n`` item ids.
    """

    values: torch.Tensor
    reference: torch.Tensor
    valid: torch.Tensor
    ids: list[str]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _finite(x: float) -> float | None:
    return x if np.isfinite(x) else None


def _rel_errors(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-item ``||sum values - ref|| / ||ref||`` in float64; values ``[n, comp, (token,) d]``."""
    total = values.astype(np.float64).reshape(values.shape[0], -1, values.shape[-1]).sum(1)
    ref = reference.astype(np.float64)
    scale = np.maximum(np.linalg.norm(ref, axis=-1), np.finfo(np.float64).tiny)
    return np.linalg.norm(total - ref, axis=-1) / scale


class ComponentStore:
    """A zarr v3 store of component stacks for a whole dataset (see the module docs).

    Use :meth:`create_or_open` (writers) or :meth:`open` (readers); not the constructor.
    """

    def __init__(self, path: Path, group: zarr.Group, attrs: dict[str, Any]) -> None:
        self.path = path
        self._group = group
        self._attrs = attrs
        self.config = StoreConfig.from_json(attrs["config"])
        self.labels: list[str] = list(attrs["labels"])
        self.comp_shape: tuple[int, ...] = tuple(attrs["comp_shape"])
        self.ref_dim = int(attrs["ref_dim"])
        self.space: str = attrs.get("space", "model")
        self._arrays: dict[str, Any] = {}

    # ------------------------------------------------------------ creation
    @classmethod
    def create_or_open(
        cls,
        path: str | Path,
        config: StoreConfig,
        labels: Sequence[Any],
        comp_shape: Sequence[int],
        ref_dim: int | None = None,
        *,
        space: str = "model",
        tokens: TokenInfo | None = None,
    ) -> ComponentStore:
        """Create the store at ``path``, or open it if it exists with the same configuration.

        Args:
            path: store directory.
            config: what the store holds; must equal the stored one when the store exists.
            labels: one label (or canonical label string) per component row.
            comp_shape: per-item shape of components, ``(comp, d)`` or ``(comp, token, d)``.
            ref_dim: reference dimension (must equal ``comp_shape[-1]``; default that).
            space: the stacks' ``space`` (``"model"``, ``"clip"``, ``"projected"``).
            tokens: token geometry for token stacks.

        Raises:
            StoreMismatchError: the existing store differs (message lists every difference).
            InputError: ``path`` exists and is not a vitdecomp store, or shapes are inconsistent.

        Safe to call from many processes at once: one creates, the others open its store.
        """
        path = Path(path)
        names = [str(lab) for lab in labels]
        comp_shape = tuple(int(s) for s in comp_shape)
        ref_dim = comp_shape[-1] if ref_dim is None else int(ref_dim)
        if len(comp_shape) not in (2, 3) or comp_shape[0] != len(names):
            raise InputError(
                f"comp_shape must be (comp, d) or (comp, token, d) with comp == {len(names)} labels, got {comp_shape}"
            )
        if ref_dim != comp_shape[-1]:
            raise InputError(f"ref_dim {ref_dim} != component dim {comp_shape[-1]}")
        if len(comp_shape) == 3 and tokens is not None and len(tokens.types) != comp_shape[1]:
            raise InputError("token info does not match the token axis of comp_shape")
        attrs = {
            "format": FORMAT,
            "config": config.to_json(),
            "config_hash": config.hash(),
            "labels": names,
            "comp_shape": list(comp_shape),
            "ref_dim": ref_dim,
            "space": space,
            "tokens": tokens.to_json() if tokens is not None else None,
        }
        if not (path / "zarr.json").exists():
            if path.exists() and (not path.is_dir() or any(path.iterdir())):
                raise InputError(f"{path} exists and is not a vitdecomp store; choose another --out")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                cls._build(tmp, attrs, config, comp_shape, ref_dim)
                os.rename(tmp, path)  # fails if another process got there first
                log.info("created store %s (config %s)", path, attrs["config_hash"])
            except OSError:
                if not (path / "zarr.json").exists():
                    raise
                log.debug("store %s was created concurrently; opening it", path)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        store = cls.open(path, mode="r+")
        problems = config.diff(store.config) if store.config.hash() != config.hash() else []
        problems = [f"{p} (yours != store's)" for p in problems]
        if store.labels != names:
            problems.append(f"labels: {len(names)} given != {len(store.labels)} in store"
                            if len(names) != len(store.labels) else "labels: same count, different names/order")
        if store.comp_shape != comp_shape:
            problems.append(f"comp_shape: {comp_shape} != {store.comp_shape}")
        if store.space != space:
            problems.append(f"space: {space!r} != {store.space!r}")
        if problems:
            raise StoreMismatchError(
                f"store {path} was made with a different configuration "
                f"(store {store.config.hash()}, yours {config.hash()}):\n  " + "\n  ".join(problems)
                + "\nUse another output path, or delete the store to start over."
            )
        return store

    @staticmethod
    def _build(
        tmp: Path, attrs: dict[str, Any], config: StoreConfig, comp_shape: tuple[int, ...], ref_dim: int
    ) -> None:
        import zarr
        from zarr.storage import LocalStore

        tmp.mkdir(parents=True)
        group = zarr.open_group(LocalStore(str(tmp)), mode="w", attributes={"vitdecomp": attrs})
        n, bs = config.n_items, config.batch_size
        common: dict[str, Any] = {"compressors": None, "config": {"write_empty_chunks": True}}
        group.create_array("components", shape=(n, *comp_shape), chunks=(bs, *comp_shape),
                           dtype=config.dtype, fill_value=np.nan, **common)
        group.create_array("reference", shape=(n, ref_dim), chunks=(bs, ref_dim),
                           dtype="float32", fill_value=np.nan, **common)
        group.create_array("valid", shape=(n,), chunks=(bs,), dtype="bool", fill_value=False, **common)
        group.create_array("ids", shape=(n,), chunks=(bs,), dtype=str, **common)
        group.create_array("targets", shape=(n,), chunks=(bs,), dtype="int64", fill_value=-1, **common)
        (tmp / "done").mkdir()
        (tmp / "stats").mkdir()

    @classmethod
    def open(cls, path: str | Path, *, mode: Literal["r", "r+"] = "r") -> ComponentStore:
        """Open an existing store (``mode="r"`` for readers, ``"r+"`` for writers)."""
        import zarr
        from zarr.storage import LocalStore

        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise InputError(f"no vitdecomp store at {path}")
        group = zarr.open_group(LocalStore(str(path), read_only=(mode == "r")), mode=mode)
        attrs = group.attrs.asdict().get("vitdecomp")
        if not isinstance(attrs, dict) or attrs.get("format") != FORMAT:
            raise InputError(f"{path} is a zarr group but not a {FORMAT} store")
        return cls(path, group, attrs)

    # ------------------------------------------------------------ geometry
    @property
    def n_items(self) -> int:
        return self.config.n_items

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    @property
    def n_chunks(self) -> int:
        return self.config.n_chunks

    @property
    def tokens(self) -> TokenInfo | None:
        from ..core.stack import TokenInfo

        return TokenInfo.from_json(self._attrs.get("tokens"))

    def chunk_rows(self, index: int) -> range:
        """Rows of chunk ``index`` (the last chunk may be shorter than ``batch_size``)."""
        if not 0 <= index < self.n_chunks:
            raise InputError(f"chunk {index} out of range: the store has {self.n_chunks} chunks")
        start = index * self.batch_size
        return range(start, min(start + self.batch_size, self.n_items))

    def _array(self, name: str) -> Any:
        arr = self._arrays.get(name)
        if arr is None:
            import zarr

            arr = self._group[name]
            if not isinstance(arr, zarr.Array):
                raise InputError(f"store {self.path} has a group where the array {name!r} should be")
            arr = arr.with_config({"write_empty_chunks": True})
            self._arrays[name] = arr
        return arr

    # ------------------------------------------------------------ progress
    def done_chunks(self) -> list[int]:
        """Indices of chunks with a completion record, sorted (re-read from disk on every call)."""
        done_dir = self.path / "done"
        if not done_dir.is_dir():
            return []
        out = []
        for name in os.listdir(done_dir):
            m = _DONE_RE.match(name)
            if m and int(m.group(1)) < self.n_chunks:
                out.append(int(m.group(1)))
        return sorted(out)

    def pending_chunks(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """Chunks without a completion record; with ``world_size > 1`` only those of ``rank``
        (chunk ``i`` belongs to rank ``i % world_size``)."""
        if not 0 <= rank < world_size:
            raise InputError(f"rank {rank} not in [0, {world_size})")
        done = set(self.done_chunks())
        return [i for i in range(rank, self.n_chunks, world_size) if i not in done]

    def is_complete(self) -> bool:
        return not self.pending_chunks()

    def done_record(self, index: int) -> dict[str, Any] | None:
        """The completion record of chunk ``index``, or None if it is not done."""
        try:
            return json.loads((self.path / "done" / f"{index:06d}.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

    # ------------------------------------------------------------ writing
    def write_chunk(
        self,
        index: int,
        stack: ComponentStack | None,
        ids: Sequence[str],
        skipped: Mapping[str, str] | None = None,
        *,
        seconds: float | None = None,
        rank: int = 0,
        targets: Sequence[int | None] | None = None,
    ) -> dict[str, Any]:
        """Write chunk ``index`` (rows ``chunk_rows(index)``) and record it as done.

        Args:
            index: chunk index.
            stack: decomposition of the chunk's non-skipped items, in row order:
                values ``[comp, n_valid, (token,) d]``, reference ``[n_valid, d]``, labels equal
                to the store's. None when every item was skipped.
            ids: one id per row of the chunk (skipped ones included), in row order.
            skipped: ``{id: reason}`` of the items that failed; their rows get NaN values,
                ``valid=False``, and the reason goes into the record and the manifest.
            seconds: compute time of this chunk (decoding + model), for the manifest.
            rank: the writer's rank, recorded for the manifest.
            targets: one class label per row (None or -1: unknown), stored for accuracy and
                per-class statistics; default all unknown.

        Returns:
            The completion record written to ``done/{index:06d}.json``.
        """
        import torch

        t0 = time.perf_counter()
        rows = self.chunk_rows(index)
        ids = [str(i) for i in ids]
        skipped = {str(k): str(v) for k, v in (skipped or {}).items()}
        if len(ids) != len(rows):
            raise InputError(f"chunk {index} has {len(rows)} rows but {len(ids)} ids were given")
        unknown = set(skipped) - set(ids)
        if unknown:
            raise InputError(f"skipped ids not in this chunk: {sorted(unknown)[:5]}")
        valid = np.array([i not in skipped for i in ids], dtype=bool)
        n_valid = int(valid.sum())
        dtype = torch.float16 if self.config.dtype == "float16" else torch.float32
        comp = np.full((len(rows), *self.comp_shape), np.nan, dtype=self.config.dtype)
        ref = np.full((len(rows), self.ref_dim), np.nan, dtype=np.float32)
        errors = np.zeros(0)
        stored_errors = np.zeros(0)
        if n_valid:
            if stack is None:
                raise InputError(f"chunk {index}: {n_valid} items are not skipped but no stack was given")
            if stack.names != self.labels:
                raise InputError(f"chunk {index}: stack labels differ from the store's")
            expect = (self.comp_shape[0], n_valid, *self.comp_shape[1:])
            if tuple(stack.values.shape) != expect:
                raise InputError(f"chunk {index}: stack values {tuple(stack.values.shape)}, expected {expect}")
            values = stack.values.detach().cpu()
            reference = stack.reference.detach().cpu()
            errors = _rel_errors(values.movedim(1, 0).to(torch.float64).numpy(), reference.to(torch.float64).numpy())
            comp[valid] = values.to(dtype).movedim(1, 0).numpy()
            ref[valid] = reference.to(torch.float32).numpy()
            stored_errors = _rel_errors(comp[valid], ref[valid])
        elif stack is not None and stack.batch_size:
            raise InputError(f"chunk {index}: every item is skipped but the stack has {stack.batch_size} items")
        sl = slice(rows.start, rows.stop)
        self._array("components")[sl] = comp
        self._array("reference")[sl] = ref
        self._array("valid")[sl] = valid
        self._array("ids")[sl] = np.array(ids, dtype=object) if ids else np.array([], dtype=str)
        if targets is not None:
            if len(targets) != len(rows):
                raise InputError(f"chunk {index} has {len(rows)} rows but {len(targets)} targets were given")
            tgt = np.array([-1 if t is None else int(t) for t in targets], dtype=np.int64)
            tgt[~valid] = -1
            if "targets" in self._group:
                self._array("targets")[sl] = tgt
        write_s = time.perf_counter() - t0
        record = {
            "index": index,
            "rows": [rows.start, rows.stop],
            "config_hash": self.config.hash(),
            "rank": rank,
            "ids": ids,
            "skipped": [
                {"row": rows.start + j, "id": i, "reason": skipped[i]} for j, i in enumerate(ids) if i in skipped
            ],
            "n_valid": n_valid,
            "error": {
                "n": int(errors.size),
                "max": _finite(float(errors.max())) if errors.size else None,
                "sum": _finite(float(errors.sum())) if errors.size else None,
                "stored_max": _finite(float(stored_errors.max())) if stored_errors.size else None,
                "n_nonfinite": int((~np.isfinite(errors)).sum()),
            },
            "timing": {"compute_s": seconds, "write_s": write_s, "written_at": time.time()},
        }
        _atomic_write_text(self.path / "done" / f"{index:06d}.json", json.dumps(record))
        log.debug("chunk %d done: %d/%d valid", index, n_valid, len(rows))
        return record

    # ------------------------------------------------------------ manifest
    def manifest(self) -> dict[str, Any]:
        """Summary merged from every done record (any rank): counts, skipped items, Σ error, timings."""
        import torch
        import zarr

        done = self.done_chunks()
        n_rows = n_valid = err_n = nonfinite = 0
        err_sum = 0.0
        err_max: float | None = None
        stored_max: float | None = None
        compute_s = write_s = 0.0
        first = last = None
        skipped: list[dict[str, Any]] = []
        ranks: set[int] = set()
        for index in done:
            rec = self.done_record(index)
            if rec is None:
                continue
            n_rows += rec["rows"][1] - rec["rows"][0]
            n_valid += rec["n_valid"]
            skipped += rec["skipped"]
            ranks.add(int(rec.get("rank", 0)))
            e = rec["error"]
            nonfinite += e["n_nonfinite"]
            if e["n"] and e["sum"] is not None:
                err_n += e["n"]
                err_sum += e["sum"]
            for key, cur in (("max", err_max), ("stored_max", stored_max)):
                if e[key] is not None:
                    val = e[key] if cur is None else max(cur, e[key])
                    if key == "max":
                        err_max = val
                    else:
                        stored_max = val
            t = rec["timing"]
            compute_s += t["compute_s"] or 0.0
            write_s += t["write_s"] or 0.0
            first = t["written_at"] if first is None else min(first, t["written_at"])
            last = t["written_at"] if last is None else max(last, t["written_at"])
        pending = self.pending_chunks()
        return {
            "format": FORMAT,
            "config": self.config.to_json(),
            "config_hash": self.config.hash(),
            "labels": self.labels,
            "comp_shape": list(self.comp_shape),
            "space": self.space,
            "complete": not pending,
            "counts": {
                "items": self.n_items,
                "chunks": self.n_chunks,
                "chunks_done": len(done),
                "rows_done": n_rows,
                "valid": n_valid,
                "skipped": len(skipped),
                "ranks": sorted(ranks),
            },
            "pending_chunks": pending,
            "skipped": skipped,
            "error": {
                "max": err_max,
                "mean": err_sum / err_n if err_n else None,
                "stored_max": stored_max,
                "n_nonfinite": nonfinite,
            },
            "timing": {"compute_s": compute_s, "write_s": write_s, "first_written": first, "last_written": last},
            "versions": {
                "vitdecomp": package_version(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "zarr": zarr.__version__,
                "numpy": np.__version__,
            },
        }

    def finalize(self) -> dict[str, Any]:
        """Write ``manifest.json`` atomically and return it (callable again after a resume)."""
        manifest = self.manifest()
        _atomic_write_text(self.path / "manifest.json", json.dumps(manifest, indent=1))
        if not manifest["complete"]:
            log.warning("store %s finalized with %d chunks pending", self.path, len(manifest["pending_chunks"]))
        return manifest

    # ------------------------------------------------------------ reading
    def _row_index(self, rows: slice | int | Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(rows, slice):
            return np.arange(self.n_items)[rows]
        idx = np.asarray(rows.cpu() if hasattr(rows, "cpu") else rows, dtype=np.int64).reshape(-1)
        idx = np.where(idx < 0, idx + self.n_items, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_items):
            raise InputError(f"rows out of range for a store of {self.n_items} items")
        return idx

    def components(
        self,
        rows: slice | int | Sequence[int] | np.ndarray | torch.Tensor,
        *,
        as_stack: bool = False,
        allow_pending: bool = False,
    ) -> StoreRows | ComponentStack:
        """Read rows.

        Args:
            rows: a slice, an index, or an index array (any order, repeats allowed).
            as_stack: return a :class:`~vitdecomp.ComponentStack` (values ``[comp, n, (token,) d]``
                cast to float32, labels restored; ``meta["rows"]``, ``meta["ids"]``, ``meta["valid"]``).
            allow_pending: read rows of chunks without a completion record (their content is
                undefined: fill values or partly written data).

        Returns:
            :class:`StoreRows` (items first, storage dtype) or a ComponentStack.

        Raises:
            InputError: a row belongs to a chunk that is not done (unless ``allow_pending``).
        """
        import torch

        idx = self._row_index(rows)
        if not allow_pending and idx.size:
            missing = sorted(set((idx // self.batch_size).tolist()) - set(self.done_chunks()))
            if missing:
                raise InputError(f"rows in chunks {missing[:5]} are not written yet (pending chunks)")
        contiguous = isinstance(rows, slice) and idx.size and bool(np.all(np.diff(idx) == 1))

        def get(name: str) -> np.ndarray:
            if contiguous:
                return self._array(name)[int(idx[0]) : int(idx[-1]) + 1]
            return self._array(name).oindex[idx]

        if idx.size == 0:
            values = np.zeros((0, *self.comp_shape), dtype=self.config.dtype)
            ref = np.zeros((0, self.ref_dim), dtype=np.float32)
            valid = np.zeros(0, dtype=bool)
            ids: list[str] = []
        else:
            values, ref, valid = get("components"), get("reference"), get("valid")
            ids = [str(i) for i in np.asarray(get("ids")).tolist()]
        out = StoreRows(torch.from_numpy(np.ascontiguousarray(values)), torch.from_numpy(np.ascontiguousarray(ref)),
                        torch.from_numpy(np.ascontiguousarray(valid)), ids)
        return self._to_stack(out, idx) if as_stack else out

    def targets(self, rows: slice | int | Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
        """Class labels of ``rows`` (int64, -1 where unknown or skipped; all -1 for stores
        written before targets were recorded)."""
        idx = self._row_index(rows)
        if "targets" not in self._group or idx.size == 0:
            return np.full(idx.size, -1, dtype=np.int64)
        return np.asarray(self._array("targets").oindex[idx], dtype=np.int64)

    def accuracy(self, class_directions: torch.Tensor, *, chunks: Sequence[int] | None = None) -> dict[str, Any]:
        """Zero-shot / linear accuracy of the stored representations: ``argmax_c <z, w_c>`` against
        the stored targets, over valid rows with a known target of done chunks (one chunk in memory).

        Args:
            class_directions: ``[n_classes, d]`` class directions in the store's space (text
                embeddings for zero-shot, or a classifier's weights).
        """
        import torch

        todo = self.done_chunks() if chunks is None else sorted(int(c) for c in chunks)
        w = class_directions.detach().to(torch.float64).cpu()
        correct = total = 0
        for index in todo:
            r = self.chunk_rows(index)
            tgt = self.targets(slice(r.start, r.stop))
            keep = tgt >= 0
            if not keep.any():
                continue
            ref = torch.from_numpy(np.asarray(self._array("reference")[r.start : r.stop])[keep]).to(torch.float64)
            pred = (ref @ w.T).argmax(-1).numpy()
            correct += int((pred == tgt[keep]).sum())
            total += int(keep.sum())
        return {"accuracy": correct / total if total else None, "n": total, "correct": correct}

    def _to_stack(self, data: StoreRows, rows: np.ndarray) -> ComponentStack:
        import torch

        from ..core.labels import parse_label
        from ..core.stack import ComponentStack

        meta = {
            "model": self.config.model,
            "weights": self.config.weights,
            "granularity": self.config.granularity,
            "start_layer": self.config.start_layer,
            "store": str(self.path),
            "store_dtype": self.config.dtype,
            "rows": rows.tolist(),
            "ids": data.ids,
            "valid": data.valid.tolist(),
            "rtol": 1e-2 if self.config.dtype == "float16" else 1e-5,
        }
        return ComponentStack(
            values=data.values.to(torch.float32).movedim(0, 1),
            labels=tuple(parse_label(name) for name in self.labels),
            reference=data.reference,
            space=self.space,
            tokens=self.tokens if len(self.comp_shape) == 3 else None,
            meta=meta,
        )

    def iter_batches(
        self, batch_size: int | None = None, *, chunks: Sequence[int] | None = None
    ) -> Iterator[ComponentStack]:
        """Valid rows of done chunks, in row order, as ComponentStacks of ``batch_size`` items.

        Memory holds at most one store chunk plus one output batch. The set of done chunks is
        read once at the start, so rows another process finishes later are not seen.

        Args:
            batch_size: items per yielded stack (default: the store's chunk size); the last may be smaller.
            chunks: restrict to these chunk indices (must be done); default every done chunk.
        """
        import torch

        bs = batch_size or self.batch_size
        done = set(self.done_chunks())
        if chunks is None:
            todo = sorted(done)
        else:
            todo = sorted(int(c) for c in chunks)
            if set(todo) - done:
                raise InputError(f"chunks {sorted(set(todo) - done)[:5]} are not done")
        buf: list[StoreRows] = []
        buf_rows: list[np.ndarray] = []
        n_buf = 0
        for index in todo:
            r = self.chunk_rows(index)
            data = self.components(slice(r.start, r.stop), allow_pending=True)
            assert isinstance(data, StoreRows)
            keep = data.valid.numpy()
            if not keep.any():
                continue
            kidx = torch.from_numpy(np.flatnonzero(keep))
            buf.append(StoreRows(data.values[kidx], data.reference[kidx], data.valid[kidx],
                                 [i for i, k in zip(data.ids, keep) if k]))
            buf_rows.append(np.arange(r.start, r.stop)[keep])
            n_buf += int(keep.sum())
            while n_buf >= bs:
                merged, rows = _concat(buf), np.concatenate(buf_rows)
                yield self._to_stack(_slice_rows(merged, 0, bs), rows[:bs])
                rest = _slice_rows(merged, bs, n_buf)
                buf, buf_rows, n_buf = ([rest], [rows[bs:]], n_buf - bs) if n_buf > bs else ([], [], 0)
        if n_buf:
            yield self._to_stack(_concat(buf), np.concatenate(buf_rows))

    # ------------------------------------------------------------ statistics
    def save_moments(self, name: str, moments: RunningMoments, chunks: Sequence[int], *, rank: int = 0) -> Path:
        """Save ``moments`` (accumulated over ``chunks``) as ``stats/NAME/rankRRRRR.npz``, atomically."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise InputError(f"bad statistics name {name!r}")
        folder = self.path / "stats" / name
        folder.mkdir(parents=True, exist_ok=True)
        return save_moments_file(folder / f"rank{rank:05d}.npz", moments, chunks, self.config.hash())

    def load_moments(self, name: str) -> tuple[RunningMoments, list[int]]:
        """Merge every rank's saved moments of ``name``; returns (moments, chunks covered).

        Raises:
            InputError: nothing saved, a file of another configuration, or two files cover the
                same chunk (would double count).
        """
        folder = self.path / "stats" / name
        files = sorted(folder.glob("rank*.npz")) if folder.is_dir() else []
        if not files:
            raise InputError(f"no statistics {name!r} saved in {self.path}")
        total, covered = load_moments_files(files, self.config.hash())
        assert total is not None
        return total, covered

    def compute_moments(
        self,
        *,
        chunks: Sequence[int] | None = None,
        directions: torch.Tensor | None = None,
        covariance: bool = False,
    ) -> RunningMoments:
        """Moments of the stored (valid, done) rows, tokens summed, optionally projected on
        ``directions [k, d]``: one pass over the store, memory one chunk."""
        moments: RunningMoments | None = None
        for stack in self.iter_batches(chunks=chunks):
            stack = stack.sum_tokens()
            if directions is not None:
                stack = stack.project(directions.to(stack.values.dtype))
            x = stack.values.movedim(0, 1)  # [batch, comp, k]
            if moments is None:
                moments = RunningMoments(x.shape[1], x.shape[2], covariance=covariance)
            moments.update(x)
        if moments is None:
            k = self.comp_shape[-1] if directions is None else int(directions.shape[0])
            moments = RunningMoments(self.comp_shape[0], k, covariance=covariance)
        return moments


def _concat(parts: list[StoreRows]) -> StoreRows:
    import torch

    if len(parts) == 1:
        return parts[0]
    return StoreRows(torch.cat([p.values for p in parts]), torch.cat([p.reference for p in parts]),
                     torch.cat([p.valid for p in parts]), [i for p in parts for i in p.ids])


def _slice_rows(data: StoreRows, start: int, stop: int) -> StoreRows:
    return StoreRows(data.values[start:stop], data.reference[start:stop], data.valid[start:stop], data.ids[start:stop])
