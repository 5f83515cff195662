"""Streaming statistics: :class:`RunningMoments` and the moment files a store keeps.

:class:`RunningMoments` accumulates, per component ``i``, the mean ``mu_i [k]`` and (optionally)
the centred sum of outer products ``M2_i = sum_n (x_ni - mu_i)(x_ni - mu_i)^T [k, k]`` of
batches ``x [batch, comp, k]`` in float64. Two partial results ``(n_a, mu_a, M2_a)`` and
``(n_b, mu_b, M2_b)`` merge with Chan et al.'s pairwise update (docs/method.md §4, "Moments")::

    n = n_a + n_b,   delta = mu_b - mu_a,
    mu = mu_a + delta * n_b / n,
    M2 = M2_a + M2_b + delta delta^T * n_a n_b / n,

so batches, chunks and ranks combine in any order to the result of one pass, up to rounding.

A moment file is one ``np.savez`` archive: :meth:`RunningMoments.state_dict` (``count``,
``mean``, ``m2``), the sorted chunk indices it covers (``chunks``) and the store's config hash
(``config_hash``). :func:`save_moments_file` writes one atomically; :func:`load_moments_files`
merges several (one per rank) and refuses files of another configuration or overlapping chunks.
:meth:`ComponentStore.save_moments <vitdecomp.store.component_store.ComponentStore.save_moments>`
and ``load_moments`` keep them as ``STORE/stats/NAME/rankRRRRR.npz``.

Split from :mod:`vitdecomp.store.component_store` (which re-exports :class:`RunningMoments` and
:func:`atomic_savez`): the statistics are plain numpy, used without a store too (TextSpan,
CompAlign, the demo).
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:
    import torch

__all__ = ["RunningMoments", "atomic_savez", "load_moments_files", "save_moments_file"]


def atomic_savez(path: Path, arrays: Mapping[str, Any]) -> None:
    """``np.savez`` to a private temp file in the same folder, then ``os.replace`` onto ``path``."""
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


class RunningMoments:
    """Streaming per-component mean and (optionally) covariance, float64, mergeable.

    Uses the pairwise update of Chan et al. (batch mean and centred second moment, merged
    with the mean shift), so it is numerically stable and merging partial results from
    several ranks or chunks equals one pass over all the data up to rounding.

    Attributes:
        count: number of items seen.
        mean: ``[comp, k]`` float64.
        m2: ``[comp, k, k]`` float64 centred sum of outer products, or None without covariance.
    """

    def __init__(self, n_components: int, dim: int, *, covariance: bool = False) -> None:
        self.count = 0
        self.mean = np.zeros((n_components, dim), dtype=np.float64)
        self.m2: np.ndarray | None = np.zeros((n_components, dim, dim), dtype=np.float64) if covariance else None

    @property
    def shape(self) -> tuple[int, int]:
        """``(comp, k)``."""
        return (int(self.mean.shape[0]), int(self.mean.shape[1]))

    def update(self, values: torch.Tensor | np.ndarray) -> RunningMoments:
        """Add a batch ``[batch, comp, k]`` (NaN-free: pass valid rows only). Returns self."""
        if hasattr(values, "detach"):  # torch.Tensor
            x = values.detach().cpu().double().numpy()
        else:
            x = np.asarray(values, dtype=np.float64)
        if x.ndim != 3 or x.shape[1:] != self.shape:
            raise InputError(f"expected values [batch, {self.shape[0]}, {self.shape[1]}], got {tuple(x.shape)}")
        n = x.shape[0]
        if n == 0:
            return self
        mean = x.mean(axis=0)
        m2 = None
        if self.m2 is not None:
            xc = (x - mean).transpose(1, 0, 2)  # [comp, batch, k]
            m2 = np.matmul(xc.transpose(0, 2, 1), xc)  # [comp, k, k]: BLAS, ~10x faster than einsum
        self._merge(n, mean, m2)
        return self

    def _merge(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray | None) -> None:
        n_a = self.count
        n = n_a + n_b
        if n_b == 0:
            return
        delta = mean_b - self.mean
        if self.m2 is not None:
            assert m2_b is not None
            self.m2 = self.m2 + m2_b + np.einsum("ci,cj->cij", delta, delta) * (n_a * n_b / n)
        self.mean = self.mean + delta * (n_b / n)
        self.count = n

    def merge(self, other: RunningMoments) -> RunningMoments:
        """Fold ``other`` (same shape and covariance setting) into self; returns self."""
        if other.shape != self.shape or (other.m2 is None) != (self.m2 is None):
            raise InputError("cannot merge moments of different shape or covariance setting")
        self._merge(other.count, other.mean, other.m2)
        return self

    @property
    def covariance(self) -> np.ndarray:
        """Unbiased covariance ``[comp, k, k]`` (``ddof=1``, as ``np.cov``)."""
        if self.m2 is None:
            raise ValueError("these moments were accumulated without covariance=True")
        if self.count < 2:
            return np.full_like(self.m2, np.nan)
        return self.m2 / (self.count - 1)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Arrays to save (``np.savez``) and restore with :meth:`from_state_dict`."""
        state = {"count": np.asarray(self.count, dtype=np.int64), "mean": self.mean.copy()}
        if self.m2 is not None:
            state["m2"] = self.m2.copy()
        return state

    @classmethod
    def from_state_dict(cls, state: Mapping[str, np.ndarray]) -> RunningMoments:
        """Inverse of :meth:`state_dict` (covariance kept when ``state`` has ``m2``)."""
        mean = np.asarray(state["mean"], dtype=np.float64)
        out = cls(mean.shape[0], mean.shape[1], covariance="m2" in state)
        out.count = int(state["count"])
        out.mean = mean.copy()
        if "m2" in state:
            out.m2 = np.asarray(state["m2"], dtype=np.float64).copy()
        return out


def save_moments_file(path: Path, moments: RunningMoments, chunks: Sequence[int], config_hash: str) -> Path:
    """Write ``moments`` (accumulated over ``chunks``) with ``config_hash`` to ``path``, atomically.

    The archive holds :meth:`RunningMoments.state_dict`, ``chunks`` (sorted int64) and
    ``config_hash``; returns ``path``.
    """
    state = moments.state_dict()
    state["chunks"] = np.asarray(sorted(int(c) for c in chunks), dtype=np.int64)
    state["config_hash"] = np.asarray(config_hash)
    atomic_savez(path, state)
    return path


def load_moments_files(files: Iterable[Path], config_hash: str) -> tuple[RunningMoments | None, list[int]]:
    """Merge moment files written by :func:`save_moments_file`; returns (moments, chunks covered).

    The moments are None when ``files`` is empty.

    Raises:
        InputError: a file was saved for another ``config_hash``, or two files cover the same
            chunk (merging them would count its items twice).
    """
    total: RunningMoments | None = None
    covered: set[int] = set()
    for f in files:
        with np.load(f) as z:
            state = {k: z[k] for k in z.files}
        if str(state.pop("config_hash")) != config_hash:
            raise InputError(f"{f} was saved for another configuration")
        chunks = set(state.pop("chunks").tolist())
        if chunks & covered:
            raise InputError(f"{f} covers chunks already counted: {sorted(chunks & covered)[:5]}")
        covered |= chunks
        part = RunningMoments.from_state_dict(state)
        total = part if total is None else total.merge(part)
    return total, sorted(covered)
