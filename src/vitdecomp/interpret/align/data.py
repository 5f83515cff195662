"""The rows a CompAlign fit reads (docs/method.md §3): the held-out split, pairing two stores, batch sources.

A row ``r`` is held out when ``u(seed, r) < val_fraction``, ``u`` uniform in [0, 1) from a splitmix64
hash of the row index (:func:`validation_mask`), so the split depends on neither batch size, order of
arrival nor resumption. :func:`paired_rows` checks that two stores hold the same images in the same
order; :func:`store_batches` streams ``(values [b, comp, d_model], clip_targets [b, d_clip], rows [b])``
from them and :func:`checked_batches` validates any such stream.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Union

import numpy as np

from ...errors import InputError

if TYPE_CHECKING:
    import torch

    from ...store.component_store import ComponentStore

__all__ = ["Batch", "BatchSource", "checked_batches", "done_rows", "paired_rows", "splitmix64", "store_batches",
           "validation_mask"]

#: One mini-batch: ``values [batch, comp, d_model]``, ``clip_targets [batch, d_clip]`` and,
#: optionally, ``rows [batch]`` (int64 global row indices; default: position in the stream).
Batch = Union["tuple[torch.Tensor, torch.Tensor]", "tuple[torch.Tensor, torch.Tensor, torch.Tensor]"]
BatchSource = Callable[[], Iterable[Batch]]


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser of uint64 ``x`` (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def validation_mask(rows: np.ndarray, seed: int, val_fraction: float) -> np.ndarray:
    """True for rows in the validation split: ``u(seed, row) < val_fraction``, with
    ``u`` uniform in [0, 1) from a splitmix64 hash. ``rows``: int array ``[n]``."""
    key = splitmix64(np.asarray([seed], dtype=np.int64).astype(np.uint64))[0]
    with np.errstate(over="ignore"):
        h = splitmix64(np.asarray(rows, dtype=np.int64).astype(np.uint64) ^ key)
    u = (h >> np.uint64(11)).astype(np.float64) / float(2**53)
    return u < val_fraction


def checked_batches(source: BatchSource, n_components: int, d_model: int, d_clip: int,
             device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
    """The batches of ``source`` checked and moved to ``device``: ``(values [b, comp, d_model] float32,
    targets [b, d_clip] float32, rows [b] int64)``; rows default to the position in the stream."""
    import torch

    offset = 0
    for item in source():
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise InputError("each batch must be (values, clip_targets) or (values, clip_targets, rows)")
        values, targets = item[0], item[1]
        if values.dim() != 3 or tuple(values.shape[1:]) != (n_components, d_model):
            raise InputError(
                f"values must be [batch, {n_components}, {d_model}], got {tuple(values.shape)}"
                + (" (sum token stacks first: stack.sum_tokens())" if values.dim() == 4 else ""))
        b = int(values.shape[0])
        if tuple(targets.shape) != (b, d_clip):
            raise InputError(f"clip_targets must be [{b}, {d_clip}], got {tuple(targets.shape)}")
        if len(item) == 3:
            rows = np.asarray(item[2].cpu() if hasattr(item[2], "cpu") else item[2], dtype=np.int64).reshape(-1)
            if rows.shape[0] != b:
                raise InputError(f"rows has {rows.shape[0]} entries for a batch of {b}")
        else:
            rows = np.arange(offset, offset + b, dtype=np.int64)
        offset += b
        yield (values.to(device=device, dtype=torch.float32), targets.to(device=device, dtype=torch.float32), rows)



def done_rows(store: ComponentStore) -> tuple[list[str | None], np.ndarray]:
    """From the done records only (no array reads): ``(ids [n_items], None where the chunk is
    not done; valid [n_items] bool, True for done rows that were not skipped)``."""
    ids: list[str | None] = [None] * store.n_items
    valid = np.zeros(store.n_items, dtype=bool)
    for index in store.done_chunks():
        record = store.done_record(index)
        if record is None:  # removed since done_chunks() listed it
            continue
        r = store.chunk_rows(index)
        chunk_ids = [str(i) for i in record.get("ids", [])]
        if len(chunk_ids) != len(r):
            raise InputError(f"{store.path}: done record of chunk {index} lists {len(chunk_ids)} ids for "
                             f"{len(r)} rows")
        ids[r.start : r.stop] = chunk_ids
        valid[r.start : r.stop] = True
        for entry in record.get("skipped", []):
            valid[int(entry["row"])] = False
    return ids, valid


def paired_rows(store: ComponentStore, clip_store: ComponentStore, *, show: int = 5) -> np.ndarray:
    """Rows usable to align ``store`` (any model) to ``clip_store`` (a CLIP over the same images).

    Both stores must hold the same images in the same order: the same number of rows, and
    equal item ids on every row that is done in both (ids come from the chunks' done records,
    so nothing but small JSON files is read). A row is usable when it is done and valid (not
    skipped) in both stores; the chunk sizes of the two stores may differ.

    Returns:
        ``[n_items]`` bool mask of the usable rows.

    Raises:
        InputError: different row counts, or differing ids (the message lists the first ``show``
            mismatches as ``row: id in store != id in clip_store`` and how many there are).
    """
    ids_a, valid_a = done_rows(store)
    ids_b, valid_b = done_rows(clip_store)
    n = min(store.n_items, clip_store.n_items)
    mismatches = [(r, ids_a[r], ids_b[r]) for r in range(n)
                  if ids_a[r] is not None and ids_b[r] is not None and ids_a[r] != ids_b[r]]
    if mismatches or store.n_items != clip_store.n_items:
        lines = [f"row {r}: {a!r} != {b!r}" for r, a, b in mismatches[:show]]
        head = (f"{store.path} and {clip_store.path} do not hold the same images in the same order "
                "(a CompAlign fit pairs row i of one with row i of the other)")
        if store.n_items != clip_store.n_items:
            head += f"; they have {store.n_items} and {clip_store.n_items} rows"
        if mismatches:
            head += f"; {len(mismatches)} rows with different ids, the first: " + "; ".join(lines)
        raise InputError(head + ". Decompose the same dataset (same folder, kind and split) with both models.")
    return valid_a & valid_b


def store_batches(
    store: ComponentStore,
    clip_targets: torch.Tensor | ComponentStore,
    *,
    batch_size: int | None = None,
    chunks: Sequence[int] | None = None,
    rows: np.ndarray | None = None,
) -> BatchSource:
    """Batch source for :func:`fit_compalign` from a component store and CLIP embeddings.

    Args:
        store: the model's components (valid rows of done chunks are used; tokens summed).
        clip_targets: ``[store.n_items, d_clip]`` CLIP image embeddings, row-aligned with the
            store; or a store of a CLIP model over the same images, whose ``reference`` rows (the
            CLIP image embeddings) are read batch by batch (only rows done and valid in both
            stores are used, and the ids are checked first: :func:`paired_rows`).
        batch_size: rows per batch read from ``store`` (default: its chunk size); a batch shrinks
            by the rows the CLIP store lacks or that ``rows`` excludes.
        chunks: restrict to these chunks of ``store`` (read in row order).
        rows: optional ``[n_items]`` bool mask: only these rows are used.

    Returns:
        A callable returning a fresh iterator of ``(values [b, comp, d_model], clip_targets [b, d_clip],
        rows [b])``, rows being the store's global row indices (so the split follows the rows).
    """
    import torch

    from ...store.component_store import ComponentStore

    mask = None if rows is None else np.asarray(rows, dtype=bool).reshape(-1)
    if mask is not None and mask.shape[0] != store.n_items:
        raise InputError(f"rows must be a [{store.n_items}] bool mask, got {mask.shape[0]} entries")
    if isinstance(clip_targets, ComponentStore):
        clip_store = clip_targets
        usable = paired_rows(store, clip_store)
        mask = usable if mask is None else mask & usable
        # only the reference rows of the CLIP store are needed, not its components
        reference = clip_store._array("reference")  # noqa: SLF001 (no public reference-only reader yet)

        def targets_of(idx: np.ndarray) -> torch.Tensor:
            lo, hi = int(idx.min()), int(idx.max()) + 1  # batches are row-ordered: one slice read
            block = np.asarray(reference[lo:hi], dtype=np.float32)
            return torch.from_numpy(np.ascontiguousarray(block[idx - lo]))
    else:
        if clip_targets.dim() != 2 or clip_targets.shape[0] != store.n_items:
            raise InputError(f"clip_targets must be [{store.n_items}, d_clip], got {tuple(clip_targets.shape)}")
        tensor = clip_targets

        def targets_of(idx: np.ndarray) -> torch.Tensor:
            return tensor[torch.as_tensor(idx, dtype=torch.long, device=tensor.device)]

    def source() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for stack in store.iter_batches(batch_size, chunks=chunks):
            stack = stack.sum_tokens()
            idx = np.asarray(stack.meta["rows"], dtype=np.int64)
            values = stack.values.movedim(0, 1)
            if mask is not None:
                keep = mask[idx]
                if not keep.all():
                    if not keep.any():
                        continue
                    values, idx = values[torch.from_numpy(keep)], idx[keep]
            yield values, targets_of(idx), torch.from_numpy(idx)

    return source
