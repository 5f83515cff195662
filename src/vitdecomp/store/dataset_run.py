"""``decompose_dataset``: stream a whole dataset through ``decompose`` into an on-disk store.

One chunk of the store is one batch of ``batch_size`` consecutive items of the dataset.
For every pending chunk of this rank (chunk ``i`` belongs to rank ``i % world_size``):

1. the reader loads and preprocesses the chunk's images (skipping unreadable ones, with
   their reasons; optionally in DataLoader worker processes);
2. :func:`vitdecomp.decompose` splits the valid images (checked: Σ = model output);
3. the chunk's statistics (per-component mean and centred second moment, float64, tokens
   summed; optionally a covariance in a small target space) are saved to
   ``stats/NAME/chunks/NNNNNN.npz``;
4. :meth:`ComponentStore.write_chunk` writes the rows and, last, the chunk's done record.

A run killed at any moment is resumed by running the same command again: chunks without a
done record are recomputed from scratch (a statistics file of a chunk that was not done is
simply overwritten), so nothing is lost or counted twice. At the end the per-chunk
statistics are merged **in chunk order** (so the result is bit-for-bit the same however the
run was split over restarts and ranks) into ``stats/NAME/rank00000.npz`` (read with
:meth:`ComponentStore.load_moments`) and the manifest is written. Memory: the reader's
prefetched batches plus one batch's decomposition, whatever the dataset size.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import InputError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..data.datasets import ImageSource
    from ..core.model import Model
    from .component_store import ComponentStore, RunningMoments

__all__ = ["decompose_dataset", "DatasetRun", "STATS_NAME", "SOURCE_FILE", "dataset_root"]

log = logging.getLogger(__name__)

STATS_NAME = "moments"
#: ``STORE/source.json``: where the dataset was last read from (``{"root", "kind"}``), so that item ids
#: (paths relative to the root) can be turned back into files (``vitdecomp retrieve --image PATH``).
#: Not part of the store's configuration: the same dataset moved elsewhere resumes the same store.
SOURCE_FILE = "source.json"


@dataclass
class DatasetRun:
    """What :func:`decompose_dataset` did in this process.

    Attributes:
        store: the store (complete when ``manifest["complete"]``).
        manifest: the manifest written at the end (rank 0), or the current one (other ranks).
        chunks_done: chunks this process computed (a resumed run skips finished ones).
        images: images decomposed by this process; skipped: items it skipped, ``{id: reason}``.
        seconds: wall time of this process's chunk loop.
    """

    store: ComponentStore
    manifest: dict[str, Any]
    chunks_done: list[int] = field(default_factory=list)
    images: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def summary(self, *, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
        """What ``vitdecomp decompose DATA --out STORE --json`` prints: the store's state (complete,
        counts, the sum check's error) and this process's share (chunks, images, skipped, time)."""
        manifest = self.manifest
        return {
            "store": str(self.store.path),
            "rank": rank,
            "world_size": world_size,
            "complete": manifest["complete"],
            "counts": manifest["counts"],
            "error": manifest["error"],
            "this_run": {
                "chunks": len(self.chunks_done),
                "images": self.images,
                "skipped": len(self.skipped),
                "seconds": round(self.seconds, 3),
                "images_per_s": round(self.images_per_second, 2),
            },
        }


def decompose_dataset(
    model: Model | nn.Module,
    data: str | Path | ImageSource,
    out: str | Path,
    *,
    batch_size: int = 64,
    granularity: Literal["layer", "head", "head_token"] = "head",
    start_layer: int = 0,
    ln_mode: Literal["centered", "anchor"] = "centered",
    bias_mode: Literal["explicit", "anchor", "split"] = "explicit",
    mlp_neurons: bool = False,
    directions: torch.Tensor | None = None,
    normalize: bool = False,
    store_dtype: Literal["float16", "float32"] = "float16",
    stats_directions: torch.Tensor | None = None,
    kind: str | None = None,
    split: str | None = None,
    num_workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    max_chunks: int | None = None,
) -> DatasetRun:
    """Decompose every image of ``data`` into the store at ``out`` (created, or resumed).

    Args:
        model: a :class:`~vitdecomp.Model` or stock module (its own preprocessing is used).
        data: a dataset path (image folder, ImageNet val, Waterbirds root, ImageNet-Seg
            ``.mat``; see :func:`vitdecomp.data.open_dataset`) or an ``ImageSource``.
        out: store directory (zarr v3).
        batch_size: images per chunk (and per forward pass).
        granularity, start_layer, ln_mode, bias_mode, mlp_neurons, directions, normalize:
            as :func:`vitdecomp.decompose`; ``directions [k, d]`` stores projections ``[.., k]``.
        store_dtype: ``"float16"`` (half the disk) or ``"float32"``.
        stats_directions: ``[k, d]``: also accumulate each component's covariance ``[k, k]``
            of its projection on these directions (a small target space, e.g. a text basis).
            A full ``d x d`` covariance is one pass over the finished store instead:
            ``store.compute_moments(covariance=True)``.
        kind, split: dataset kind and Waterbirds split (see ``open_dataset``).
        num_workers: DataLoader worker processes for decoding (0: in this process).
        rank, world_size: this writer's share (default: from ``torchrun``'s environment).
        progress: show a progress bar with images/s and ETA.
        max_chunks: stop after this many chunks (for trying things out; the run can be resumed).

    Returns:
        A :class:`DatasetRun`; the store's manifest says whether it is complete.

    Raises:
        StoreMismatchError: ``out`` holds a store made with a different configuration or dataset.
        DecompositionError: a batch did not add up (a bug; nothing of that batch is written).
    """
    import torch

    from ..data.datasets import iter_batches, open_dataset
    from ..core.decomposition import decompose
    from .distributed import barrier, dist_info
    from ..core.model import weights_digest, wrap
    from .component_store import ComponentStore, StoreConfig

    m = wrap(model)
    source = data if not isinstance(data, (str, Path)) else open_dataset(data, kind=kind, split=split)
    if len(source) == 0:
        raise InputError(f"the dataset {getattr(source, 'root', data)} has no items")
    if batch_size < 1:
        raise InputError("batch size must be at least 1")
    info = dist_info()
    rank = info.rank if rank is None else rank
    world_size = info.world_size if world_size is None else world_size
    options: dict[str, Any] = dict(
        granularity=granularity, start_layer=start_layer, ln_mode=ln_mode, bias_mode=bias_mode,
        mlp_neurons=mlp_neurons, directions=directions, normalize=normalize,
    )
    # The store's layout (labels, shape, token geometry) from one probe image of the right size.
    probe = decompose(m, m.example_input(1), **options)
    extra = {
        "dataset": source.fingerprint(),
        # random or wrapped weights have no name: key the store by their content
        "weights_digest": weights_digest(m.module) if m.weights in ("random-init", "unknown") else None,
        "directions": _tensor_digest(directions),
        "stats_directions": _tensor_digest(stats_directions),
    }
    config = StoreConfig.from_model(
        m, n_items=len(source), batch_size=batch_size, granularity=granularity, start_layer=probe.meta["start_layer"],
        ln_mode=ln_mode, bias_mode=bias_mode, mlp_neurons=mlp_neurons, normalize=normalize, dtype=store_dtype,
        extra=extra,
    )
    comp_shape = (len(probe), *probe.values.shape[2:])
    store = ComponentStore.create_or_open(
        out, config, probe.labels, comp_shape, space=probe.space, tokens=probe.tokens
    )
    if rank == 0:
        _record_source(store, source)
    pending = store.pending_chunks(rank, world_size)
    if max_chunks is not None:
        pending = pending[: max(0, max_chunks)]
    log.info("store %s: %d chunks, %d pending for rank %d/%d", out, store.n_chunks, len(pending), rank, world_size)

    run = DatasetRun(store=store, manifest={})
    n_images = sum(len(store.chunk_rows(i)) for i in pending)
    bar = progress_bar(n_images, enabled=progress and rank == 0, desc=f"decompose {Path(out).name}")
    t_start = time.perf_counter()
    try:
        for index, batch in iter_batches(source, m.transform, batch_size, pending, num_workers=num_workers):
            t0 = time.perf_counter()
            stack = None
            if batch.pixels is not None:
                stack = decompose(m, batch.pixels, **options).to("cpu")
                _save_chunk_stats(store, index, stack, stats_directions)
            else:
                _save_chunk_stats(store, index, None, stats_directions, comp=comp_shape)
            store.write_chunk(index, stack, batch.ids, batch.skipped, seconds=time.perf_counter() - t0, rank=rank,
                              targets=batch.labels)
            run.chunks_done.append(index)
            run.images += int(batch.valid.sum())
            run.skipped.update(batch.skipped)
            bar.update(len(batch.rows))
            del stack, batch
    finally:
        bar.close()
        run.seconds = time.perf_counter() - t_start
    barrier()
    if rank == 0:
        if store.is_complete():
            merge_chunk_stats(store)
        run.manifest = store.finalize()
    else:
        run.manifest = store.manifest()
    return run


def _record_source(store: ComponentStore, source: Any) -> None:
    """Write :data:`SOURCE_FILE` (best effort: a store on a read-only medium still runs)."""
    import json
    import os

    root = getattr(source, "root", "")
    if not root:
        return
    record = {"root": os.path.abspath(root), "kind": getattr(source, "name", None)}
    path = store.path / SOURCE_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot record the dataset root in %s: %s", path, exc)


def dataset_root(store: ComponentStore | str | Path) -> Path | None:
    """The dataset root recorded in a store by :func:`decompose_dataset` (:data:`SOURCE_FILE`), or None."""
    import json

    base = Path(getattr(store, "path", store))
    try:
        root = json.loads((base / SOURCE_FILE).read_text(encoding="utf-8")).get("root")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(root) if isinstance(root, str) and root else None


def _tensor_digest(t: torch.Tensor | None) -> str | None:
    if t is None:
        return None
    import torch

    data = t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()
    return f"{tuple(t.shape)}:" + hashlib.sha256(data).hexdigest()[:16]


def _chunk_stats_path(store: ComponentStore, index: int) -> Path:
    return store.path / "stats" / STATS_NAME / "chunks" / f"{index:06d}.npz"


def _save_chunk_stats(
    store: ComponentStore,
    index: int,
    stack: Any,
    stats_directions: torch.Tensor | None,
    comp: Sequence[int] | None = None,
) -> None:
    """Moments of one chunk (valid rows, tokens summed, float64) saved atomically before its done record."""
    import numpy as np

    from .component_store import RunningMoments, atomic_savez

    parts: dict[str, RunningMoments] = {}
    if stack is not None:
        summed = stack.sum_tokens()
        x = summed.values.movedim(0, 1)  # [batch, comp, d]
        parts["mean"] = RunningMoments(x.shape[1], x.shape[2]).update(x)
        if stats_directions is not None:
            proj = summed.project(stats_directions.to(summed.values)).values.movedim(0, 1)
            parts["cov"] = RunningMoments(proj.shape[1], proj.shape[2], covariance=True).update(proj)
    else:  # an all-skipped chunk still gets a (empty) record, so merging sees every done chunk
        assert comp is not None
        parts["mean"] = RunningMoments(comp[0], comp[-1])
        if stats_directions is not None:
            parts["cov"] = RunningMoments(comp[0], int(stats_directions.shape[0]), covariance=True)
    state: dict[str, Any] = {"config_hash": np.asarray(store.config.hash())}
    for name, moments in parts.items():
        state.update({f"{name}.{k}": v for k, v in moments.state_dict().items()})
    path = _chunk_stats_path(store, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_savez(path, state)


def load_chunk_stats(store: ComponentStore, index: int) -> dict[str, RunningMoments]:
    """The saved moments of chunk ``index``: ``{"mean": ..., ["cov": ...]}``."""
    import numpy as np

    from .component_store import RunningMoments

    path = _chunk_stats_path(store, index)
    if not path.is_file():
        raise InputError(f"chunk {index} of {store.path} has no saved statistics")
    with np.load(path) as z:
        state = {k: z[k] for k in z.files}
    if str(state.pop("config_hash")) != store.config.hash():
        raise InputError(f"{path} belongs to another configuration")
    out: dict[str, RunningMoments] = {}
    for name in sorted({k.split(".", 1)[0] for k in state}):
        sub = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(name + ".")}
        out[name] = RunningMoments.from_state_dict(sub)
    return out


def merge_chunk_stats(store: ComponentStore) -> dict[str, RunningMoments]:
    """Merge every done chunk's moments in chunk order and save them with ``store.save_moments``.

    Saved as ``STATS_NAME`` (per-component mean of the stored quantity, tokens summed) and,
    when the run had ``stats_directions``, ``STATS_NAME + "-cov"``. A done chunk without a
    statistics file (a store written by another tool) is read back from the store instead.
    """
    merged: dict[str, RunningMoments] = {}
    done = store.done_chunks()
    for index in done:
        try:
            parts = load_chunk_stats(store, index)
        except InputError:
            log.warning("chunk %d has no saved statistics; reading it back from the store", index)
            parts = {"mean": store.compute_moments(chunks=[index])}
        for name, moments in parts.items():
            if name in merged:
                merged[name].merge(moments)
            else:
                merged[name] = moments
    names = {"mean": STATS_NAME, "cov": STATS_NAME + "-cov"}
    for name, moments in merged.items():
        store.save_moments(names[name], moments, done)
    return merged


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, *, enabled: bool, desc: str) -> Any:
    """A tqdm bar in images (rate and ETA shown by tqdm), or a no-op."""
    if not enabled or total == 0:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", smoothing=0.1, dynamic_ncols=True)
