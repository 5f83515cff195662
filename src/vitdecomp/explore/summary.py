"""The component atlas's precomputed summary of a store: what each component does, in two passes.

For every candidate component ``i`` (those that compute something from the input by default) the
summary holds, from the store's rows ``c_i(x) ∈ R^d`` (tokens summed):

* its share of the representation, ``share_i = mean_x <c_i(x), z(x)> / ||z(x)||²`` (the shares of all
  components sum to 1 for every image) and its mean norm;
* its principal directions ``u_{i,1..r}``: the top eigenvectors of its covariance
  ``Σ_i = Cov_x(c_i(x))`` (from one streaming pass of second moments), with the fraction of the
  component's variance each explains, ``λ_{i,j} / tr Σ_i``;
* per principal direction, the ``k`` items with the largest and the smallest projection
  ``<c_i(x) − μ_i, u_{i,j}>`` (ids and values), from a second pass that keeps only running top-k
  lists (memory ``comp × r × k``, never ``comp × items``).

It is written beside the store (``STORE/atlas/summary.npz`` + ``summary.json``) and keyed to the
store's identity (configuration hash and ``manifest.json`` sha256): :func:`load_summary` refuses a
stale one, and :func:`build_summary` rebuilds it.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

__all__ = ["AtlasSummary", "SummaryStaleError", "build_summary", "load_summary", "store_identity", "SUMMARY_DIR"]

log = logging.getLogger(__name__)

SUMMARY_DIR = "atlas"
FORMAT = {"name": "vitdecomp-atlas-summary", "version": 1}


class SummaryStaleError(InputError):
    """The summary was built from another state of the store (rebuild it with :func:`build_summary`)."""


def store_identity(store: Any) -> dict[str, Any]:
    """What a summary is keyed to: the store's configuration hash, item count and ``manifest.json`` sha256."""
    manifest = Path(store.path) / "manifest.json"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
    return {"config_hash": store.config.hash(), "n_items": int(store.n_items), "manifest_sha256": digest}


@dataclass
class AtlasSummary:
    """Per-component summary of a store (see the module docstring); arrays indexed by candidate position.

    Attributes:
        labels: the summarised components.
        share: ``[comp]`` mean share of the representation; norm: ``[comp]`` mean ``||c_i||``.
        directions: ``[comp, r, d]`` principal directions; explained: ``[comp, r]`` variance fractions.
        top_ids, bottom_ids: ``[comp][r]`` lists of the ``k`` item ids with the largest / smallest
            projections; top_values, bottom_values: ``[comp, r, k]`` those projections.
        n_items: rows summarised; identity: the store identity it was built from.
    """

    labels: list[str]
    share: np.ndarray
    norm: np.ndarray
    directions: np.ndarray
    explained: np.ndarray
    top_ids: list[list[list[str]]]
    bottom_ids: list[list[list[str]]]
    top_values: np.ndarray
    bottom_values: np.ndarray
    n_items: int
    identity: dict[str, Any] = field(default_factory=dict)

    def component(self, label: str) -> dict[str, Any]:
        """One component's entry, JSON-able (what a component page shows)."""
        if label not in self.labels:
            raise InputError(f"no component {label!r} in the summary")
        i = self.labels.index(label)
        return {
            "label": label, "share": float(self.share[i]), "mean_norm": float(self.norm[i]),
            "directions": [{"explained": float(self.explained[i, j]),
                            "top": list(zip(self.top_ids[i][j], map(float, self.top_values[i, j]))),
                            "bottom": list(zip(self.bottom_ids[i][j], map(float, self.bottom_values[i, j])))}
                           for j in range(self.directions.shape[1])],
        }

    def save(self, folder: str | Path) -> Path:
        """Write ``summary.npz`` (arrays) and ``summary.json`` (labels, ids, identity) into ``folder``."""
        from ..store.moments import atomic_savez

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        atomic_savez(out / "summary.npz", {"share": self.share, "norm": self.norm, "directions": self.directions,
                                           "explained": self.explained, "top_values": self.top_values,
                                           "bottom_values": self.bottom_values})
        meta = {"format": FORMAT, "labels": self.labels, "top_ids": self.top_ids, "bottom_ids": self.bottom_ids,
                "n_items": self.n_items, "identity": self.identity}
        tmp = out / "summary.json.tmp"
        tmp.write_text(json.dumps(meta) + "\n", encoding="utf-8")
        tmp.replace(out / "summary.json")  # written last: a summary.json always has its arrays
        return out


def build_summary(store: Any, *, k: int = 8, n_directions: int = 2, kinds: Any = "input",
                  out: str | Path | None = None) -> AtlasSummary:
    """Two streaming passes over a finished store (see the module docstring); saved beside it by default.

    Args:
        store: a finished :class:`~vitdecomp.store.component_store.ComponentStore` (or its path).
        k: items kept per direction and side.
        n_directions: principal directions per component.
        kinds: components summarised (:func:`vitdecomp.core.labels.resolve_kinds`).
        out: folder to write to (default ``STORE/atlas``).

    Raises:
        InputError: an unfinished store, ``k`` or ``n_directions`` below 1, no candidate component.
    """
    import torch

    from ..core.labels import kind_mask
    from ..store.component_store import ComponentStore

    if k < 1 or n_directions < 1:
        raise InputError("k and n_directions must be at least 1")
    if not isinstance(store, ComponentStore):
        store = ComponentStore.open(store)
    if not store.is_complete():
        raise InputError(f"store {store.path} is not complete; finish it with the same `vitdecomp decompose` first")
    labels = list(store.labels)
    rows = np.flatnonzero(kind_mask(labels, kinds))
    if rows.size == 0:
        raise InputError(f"no component of kinds {kinds!r} in {store.path}")
    idx = torch.as_tensor(rows, dtype=torch.long)

    # pass 1: shares, norms and second moments of the candidates
    moments = None
    share = np.zeros(rows.size)
    norm = np.zeros(rows.size)
    n = 0
    from ..store.moments import RunningMoments

    for stack in store.iter_batches():
        stack = stack.sum_tokens()
        values = stack.values.index_select(0, idx).to(torch.float64)  # [comp, batch, d]
        z = stack.reference.to(torch.float64)
        zz = (z * z).sum(-1).clamp_min(torch.finfo(torch.float64).tiny)
        share += ((values * z[None]).sum(-1) / zz[None]).sum(1).numpy()
        norm += values.norm(dim=-1).sum(1).numpy()
        n += values.shape[1]
        if moments is None:
            moments = RunningMoments(values.shape[0], values.shape[2], covariance=True)
        moments.update(values.movedim(0, 1))
    if moments is None or n == 0:
        raise InputError(f"store {store.path} has no valid rows")
    share, norm = share / n, norm / n
    cov = moments.m2 / max(1, moments.count - 1)
    evals, evecs = np.linalg.eigh(cov)  # ascending
    r = min(n_directions, cov.shape[-1])
    directions = np.flip(evecs[..., -r:], axis=-1).swapaxes(-1, -2).copy()  # [comp, r, d]
    total = np.trace(cov, axis1=-2, axis2=-1)
    explained = np.divide(np.flip(evals[..., -r:], axis=-1), total[:, None], out=np.zeros((rows.size, r)),
                          where=total[:, None] > 0)

    # pass 2: running top-k / bottom-k of the projections on each direction
    kk = min(k, n)
    top_v = np.full((rows.size, r, kk), -np.inf)
    bot_v = np.full((rows.size, r, kk), np.inf)
    top_i = np.full((rows.size, r, kk), -1, dtype=np.int64)
    bot_i = np.full((rows.size, r, kk), -1, dtype=np.int64)
    ids: list[str] = []
    dirs_t = torch.from_numpy(directions)
    mean_t = torch.from_numpy(moments.mean)
    for stack in store.iter_batches():
        stack = stack.sum_tokens()
        values = stack.values.index_select(0, idx).to(torch.float64) - mean_t[:, None]
        proj = torch.einsum("cbd,crd->crb", values, dirs_t).numpy()  # [comp, r, batch]
        base = len(ids)
        ids.extend(str(x) for x in stack.meta["ids"])
        pos = np.broadcast_to(np.arange(base, base + proj.shape[-1]), proj.shape)
        for vals, order_sign, best_v, best_i in ((proj, -1.0, top_v, top_i), (proj, 1.0, bot_v, bot_i)):
            cand_v = np.concatenate([best_v, vals], axis=-1)
            cand_i = np.concatenate([best_i, pos], axis=-1)
            order = np.argsort(order_sign * cand_v, axis=-1, kind="stable")[..., :kk]
            best_v[...] = np.take_along_axis(cand_v, order, axis=-1)
            best_i[...] = np.take_along_axis(cand_i, order, axis=-1)
    as_ids = lambda a: [[[ids[int(t)] for t in row] for row in comp] for comp in a]  # noqa: E731
    summary = AtlasSummary([labels[i] for i in rows], share, norm, directions, explained, as_ids(top_i),
                           as_ids(bot_i), top_v, bot_v, n, store_identity(store))
    summary.save(Path(out) if out is not None else Path(store.path) / SUMMARY_DIR)
    log.info("atlas summary of %d components (%d items) written", rows.size, n)
    return summary


def load_summary(store: Any, folder: str | Path | None = None) -> AtlasSummary:
    """Read the summary beside ``store`` and check it belongs to the store as it is now.

    Raises:
        InputError: no summary there; SummaryStaleError: built from another state of the store.
    """
    from ..store.component_store import ComponentStore

    if not isinstance(store, ComponentStore):
        store = ComponentStore.open(store)
    where = Path(folder) if folder is not None else Path(store.path) / SUMMARY_DIR
    meta_path, arrays_path = where / "summary.json", where / "summary.npz"
    if not meta_path.is_file() or not arrays_path.is_file():
        raise InputError(f"no atlas summary in {where}; build it with build_summary(store)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format", {}).get("name") != FORMAT["name"]:
        raise InputError(f"{meta_path} is not an atlas summary")
    now = store_identity(store)
    if meta.get("identity") != now:
        raise SummaryStaleError(f"the atlas summary in {where} was built from another state of {store.path} "
                                "(configuration or manifest changed); rebuild it")
    with np.load(arrays_path) as a:
        arrays = {name: a[name] for name in a.files}
    return AtlasSummary(meta["labels"], arrays["share"], arrays["norm"], arrays["directions"], arrays["explained"],
                        meta["top_ids"], meta["bottom_ids"], arrays["top_values"], arrays["bottom_values"],
                        int(meta["n_items"]), meta["identity"])
