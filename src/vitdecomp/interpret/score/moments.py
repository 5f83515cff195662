"""Streaming second moments of components for the scores of docs/method.md §4 (:class:`ScoreMoments`).

For components ``a_i(x) ∈ R^d`` (``i < comp``) and the total ``Z(x) = Σ_i a_i(x)`` (or an
explicit reference), over ``n`` images, :class:`ScoreMoments` keeps::

    n                          count
    mean      μ_i     [comp, d]  per-component mean               (always in the full space)
    mean_z    μ_Z     [d]
    m2        M_i     [comp, m, m]  Σ_x (P(a_i − μ_i))(P(a_i − μ_i))ᵀ   Σ_i = M_i / (n − 1)
    cross     K_i     [comp, m, m]  Σ_x (P(a_i − μ_i))(P(Z − μ_Z))ᵀ     C_i = Cov(a_i, Z) = K_i / (n − 1)
    m2_z      M_Z     [m, m]        Σ_x (P(Z − μ_Z))(P(Z − μ_Z))ᵀ     Σ_Z = M_Z / (n − 1)
    trace     t_i     [comp]        Σ_x ‖a_i − μ_i‖²  = tr M_i in the full space
    trace_z   t_Z     scalar

where ``P = I`` (``m = d``) unless the moments were built with ``directions`` (see
:meth:`ScoreMoments.project`). Batches are combined with the pairwise update of Chan et al.
(for two parts A, B with ``δ = μ_B − μ_A``, ``δ_Z = μ_{Z,B} − μ_{Z,A}``)::

    M = M_A + M_B + δ δᵀ · n_A n_B / n,    K = K_A + K_B + δ δ_Zᵀ · n_A n_B / n,

so batches, chunks and ranks can be merged in any order and equal one pass up to rounding.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ...errors import InputError

if TYPE_CHECKING:
    import torch

    from ...core.stack import ComponentStack
    from ...store.component_store import ComponentStore

__all__ = ["FLAT_TOL", "ScoreMoments", "as_float64"]

log = logging.getLogger(__name__)

_MOMENTS_FORMAT = "vitdecomp.ScoreMoments/1"
FLAT_TOL = 1e-12
"""Default relative tolerance below which a variance counts as zero (see :func:`feature_scores`)."""


def as_float64(x: Any, name: str = "array") -> np.ndarray:
    """A float64 numpy copy/view of a numpy array or torch tensor (same shape).

    Raises:
        InputError: NaN or infinite entries.
    """
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().double().numpy()
    out = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(out)):
        raise InputError(f"{name} contains NaN or infinite values (pass valid rows only)")
    return out


# ============================================================================ moments
class _Part(NamedTuple):
    """Statistics of one part (a batch, or another accumulator) for :meth:`ScoreMoments._fold`."""

    count: int
    mean: np.ndarray
    mean_z: np.ndarray
    m2: np.ndarray
    cross: np.ndarray
    m2_z: np.ndarray
    trace: np.ndarray
    trace_z: float


class ScoreMoments:
    """Streaming float64 sufficient statistics for every score of docs/method.md §4 (see module docs).

    Args:
        n_components: number of components ``comp``.
        dim: dimension ``d`` of the components.
        directions: optional ``[m, d]`` rows ``P``; the second moments are then kept for the
            projected values ``P a`` only (memory ``comp·m²`` instead of ``comp·d²``). Means and
            traces stay in the full space. See :meth:`project` for when this suffices.
        labels: one name per component (default ``"0", "1", ...``).

    Attributes:
        count, mean, mean_z, m2, cross, m2_z, trace, trace_z, directions, labels: as in the
        module docstring (``directions`` is None in the full space).
    """

    def __init__(
        self,
        n_components: int,
        dim: int,
        *,
        directions: np.ndarray | torch.Tensor | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        if n_components < 1 or dim < 1:
            raise InputError(f"need n_components >= 1 and dim >= 1, got {n_components}, {dim}")
        self.directions: np.ndarray | None = None
        if directions is not None:
            p = as_float64(directions, "directions")
            if p.ndim == 1:
                p = p[None]
            if p.ndim != 2 or p.shape[1] != dim:
                raise InputError(f"directions must be [m, {dim}], got {tuple(p.shape)}")
            self.directions = p.copy()
        m = dim if self.directions is None else int(self.directions.shape[0])
        self.labels: tuple[str, ...] = (
            tuple(str(i) for i in range(n_components)) if labels is None else tuple(str(s) for s in labels)
        )
        if len(self.labels) != n_components:
            raise InputError(f"{len(self.labels)} labels for {n_components} components")
        self.count = 0
        self.mean = np.zeros((n_components, dim))
        self.mean_z = np.zeros(dim)
        self.m2 = np.zeros((n_components, m, m))
        self.cross = np.zeros((n_components, m, m))
        self.m2_z = np.zeros((m, m))
        self.trace = np.zeros(n_components)
        self.trace_z = 0.0

    # ---------------------------------------------------------------- shape
    @property
    def n_components(self) -> int:
        return int(self.mean.shape[0])

    @property
    def dim(self) -> int:
        """Dimension ``d`` of the components (full space)."""
        return int(self.mean.shape[1])

    @property
    def stat_dim(self) -> int:
        """Dimension ``m`` of the second moments (``d``, or the number of directions)."""
        return int(self.m2.shape[-1])

    @property
    def projected(self) -> bool:
        return self.directions is not None

    # ---------------------------------------------------------------- streaming
    def update(
        self, values: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor | None = None
    ) -> ScoreMoments:
        """Add a batch; returns self.

        Args:
            values: ``[batch, comp, d]`` component values (any float dtype; NaN-free).
            reference: ``[batch, d]`` explicit total ``Z``; default ``Σ_comp values``.
        """
        x = as_float64(values, "values")
        if x.ndim != 3 or x.shape[1:] != self.mean.shape:
            raise InputError(f"expected values [batch, {self.n_components}, {self.dim}], got {tuple(x.shape)}")
        n = int(x.shape[0])
        if n == 0:
            return self
        if reference is None:
            z = x.sum(axis=1)
        else:
            z = as_float64(reference, "reference")
            if z.shape != (n, self.dim):
                raise InputError(f"expected reference [{n}, {self.dim}], got {tuple(z.shape)}")
        mean, mean_z = x.mean(axis=0), z.mean(axis=0)
        xc = x - mean
        zc = z - mean_z
        trace = np.einsum("bcd,bcd->c", xc, xc)
        trace_z = float(np.einsum("bd,bd->", zc, zc))
        if self.directions is not None:
            xc = xc @ self.directions.T  # [batch, comp, m]
            zc = zc @ self.directions.T  # [batch, m]
        xt = np.ascontiguousarray(xc.transpose(1, 2, 0))  # [comp, m, batch]
        m2 = xt @ xt.transpose(0, 2, 1)  # batched BLAS: [comp, m, m]
        cross = xt @ zc  # [comp, m, batch] @ [batch, m]
        return self._fold(_Part(n, mean, mean_z, m2, cross, zc.T @ zc, trace, trace_z))

    def merge(self, other: ScoreMoments) -> ScoreMoments:
        """Fold ``other`` (same components, dim, labels and directions) into self; returns self."""
        if other.mean.shape != self.mean.shape or other.stat_dim != self.stat_dim:
            raise InputError("cannot merge moments of different shapes")
        if other.labels != self.labels:
            raise InputError("cannot merge moments of different components (labels differ)")
        if (self.directions is None) != (other.directions is None) or (
            self.directions is not None and not np.array_equal(self.directions, other.directions)
        ):
            raise InputError("cannot merge moments projected on different directions")
        return self._fold(_Part(other.count, other.mean, other.mean_z, other.m2, other.cross, other.m2_z,
                                other.trace, other.trace_z))

    def _fold(self, other: _Part) -> ScoreMoments:
        """Chan et al. pairwise update (see the module docstring)."""
        n_a, n_b = self.count, other.count
        if n_b == 0:
            return self
        n = n_a + n_b
        f = n_a * n_b / n
        delta = other.mean - self.mean  # [comp, d]
        delta_z = other.mean_z - self.mean_z  # [d]
        self.trace = self.trace + other.trace + f * np.einsum("cd,cd->c", delta, delta)
        self.trace_z = self.trace_z + other.trace_z + f * float(delta_z @ delta_z)
        dp, dzp = delta, delta_z
        if self.directions is not None:
            dp, dzp = delta @ self.directions.T, self.directions @ delta_z
        # in place (the arrays are always this object's own): one [comp, m, m] temporary at a time
        self.m2 += other.m2
        self.m2 += f * (dp[:, :, None] * dp[:, None, :])
        self.cross += other.cross
        self.cross += f * (dp[:, :, None] * dzp[None, None, :])
        self.m2_z += other.m2_z
        self.m2_z += f * np.outer(dzp, dzp)
        self.mean = self.mean + delta * (n_b / n)
        self.mean_z = self.mean_z + delta_z * (n_b / n)
        self.count = n
        return self

    def copy(self) -> ScoreMoments:
        """An independent copy."""
        return ScoreMoments.from_state_dict(self.state_dict())

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_stack(
        cls,
        stack: ComponentStack,
        *,
        use_reference: bool = False,
        directions: np.ndarray | torch.Tensor | None = None,
    ) -> ScoreMoments:
        """Moments of one :class:`~vitdecomp.ComponentStack` (tokens summed).

        Args:
            stack: values ``[comp, batch, (token,) d]``.
            use_reference: take ``Z = stack.reference`` instead of the sum of the rows
                (docs/method.md §4 uses the sum; they agree to the stack's exactness tolerance).
            directions: see the class docstring.
        """
        out = cls(stack.n_components, stack.dim, directions=directions, labels=stack.names)
        return out.add_stack(stack, use_reference=use_reference)

    def add_stack(self, stack: ComponentStack, *, use_reference: bool = False) -> ScoreMoments:
        """:meth:`update` with a ComponentStack (tokens summed; labels must match); returns self."""
        if tuple(stack.names) != self.labels:
            raise InputError("the stack's labels differ from these moments' components")
        stack = stack.sum_tokens()
        values = stack.values.movedim(0, 1)  # [batch, comp, d]
        return self.update(values, stack.reference if use_reference else None)

    @classmethod
    def from_store(
        cls,
        store: ComponentStore,
        chunks: Sequence[int] | None = None,
        *,
        batch_size: int | None = None,
        use_reference: bool = False,
        directions: np.ndarray | torch.Tensor | None = None,
    ) -> ScoreMoments:
        """One pass over a :class:`~vitdecomp.store.component_store.ComponentStore` (valid rows of done chunks).

        Memory: one store chunk plus the statistics. Several ranks can each call this with
        their own ``chunks`` and :meth:`merge` the results (or save :meth:`state_dict`).

        Args:
            store: the store to read.
            chunks: restrict to these chunk indices (default: every done chunk).
            batch_size: items per update (default: the store's chunk size).
            use_reference: see :meth:`from_stack`.
            directions: see the class docstring.
        """
        dim = int(store.comp_shape[-1])
        out = cls(int(store.comp_shape[0]), dim, directions=directions, labels=store.labels)
        n_batches = 0
        for stack in store.iter_batches(batch_size, chunks=chunks):
            out.add_stack(stack, use_reference=use_reference)
            n_batches += 1
        log.debug("score moments of %s: %d items in %d batches", store.path, out.count, n_batches)
        return out

    # ---------------------------------------------------------------- projection
    def project(self, directions: np.ndarray | torch.Tensor, *, atol: float = 1e-8) -> ScoreMoments:
        """The same moments for the projected values ``D a`` (``directions D`` ``[k, d]``).

        Projected moments suffice for ``corr`` and ``var_attributed`` of every feature basis
        ``B`` whose rows lie in the row span of the directions (e.g. ``D`` = all feature bases
        stacked: then ``B = W D`` with ``W = B D⁺`` and ``B Σ Bᵀ = W (D Σ Dᵀ) Wᵀ``), and for
        ``var_explained`` too, since ``tr Σ_i`` is always kept in the full space. A basis outside
        the span raises in :func:`feature_scores`. Pass ``directions`` to the constructor (or
        ``from_stack``/``from_store``) to accumulate projected moments directly.

        Args:
            directions: ``[k, d]``; on already projected moments its rows must lie in the span
                of the current directions.
            atol: largest allowed ``|W P − D|`` when re-projecting projected moments.
        """
        d_new = as_float64(directions, "directions")
        if d_new.ndim == 1:
            d_new = d_new[None]
        if d_new.ndim != 2 or d_new.shape[1] != self.dim:
            raise InputError(f"directions must be [k, {self.dim}], got {tuple(d_new.shape)}")
        w = self.coefficients(d_new, atol=atol)  # [k, m]
        out = ScoreMoments(self.n_components, self.dim, directions=d_new, labels=self.labels)
        out.count, out.mean, out.mean_z = self.count, self.mean.copy(), self.mean_z.copy()
        out.trace, out.trace_z = self.trace.copy(), self.trace_z
        out.m2 = w @ self.m2 @ w.T
        out.cross = w @ self.cross @ w.T
        out.m2_z = w @ self.m2_z @ w.T
        return out

    def coefficients(self, rows: np.ndarray, *, atol: float = 1e-8) -> np.ndarray:
        """``W [k, m]`` with ``W P = rows`` (``P [m, d]`` the directions, or I in the full space; ``rows [k, d]``),
        so that ``rows Σ rowsᵀ = W (P Σ Pᵀ) Wᵀ`` for the kept second moments.

        Raises:
            InputError: ``rows`` outside the span of the directions (residual above ``atol``, relative).
        """
        if self.directions is None:
            return rows
        w = rows @ np.linalg.pinv(self.directions)
        err = float(np.max(np.abs(w @ self.directions - rows))) if rows.size else 0.0
        scale = max(1.0, float(np.max(np.abs(rows)))) if rows.size else 1.0
        if err > atol * scale:
            raise InputError(
                f"these moments were projected on {self.stat_dim} directions and the requested rows are "
                f"not in their span (residual {err:.2g}); accumulate with directions that span every "
                "feature basis, or without directions"
            )
        return w

    # ---------------------------------------------------------------- covariances
    def _ddof1(self, m: np.ndarray) -> np.ndarray:
        if self.count < 2:
            return np.full_like(m, np.nan)
        return m / (self.count - 1)

    @property
    def covariance(self) -> np.ndarray:
        """``Σ_i`` ``[comp, m, m]``, unbiased (``ddof=1``, as ``np.cov``)."""
        return self._ddof1(self.m2)

    @property
    def cross_covariance(self) -> np.ndarray:
        """``C_i = Cov(a_i, Z)`` ``[comp, m, m]`` (rows: component, columns: total), ``ddof=1``."""
        return self._ddof1(self.cross)

    @property
    def covariance_z(self) -> np.ndarray:
        """``Σ_Z`` ``[m, m]``, ``ddof=1``."""
        return self._ddof1(self.m2_z)

    @property
    def sum_squares(self) -> np.ndarray:
        """Uncentred ``Σ_x ‖a_i(x)‖²`` ``[comp]`` (the scale of the zero-variance test)."""
        return self.trace + self.count * np.einsum("cd,cd->c", self.mean, self.mean)

    @property
    def sum_squares_z(self) -> float:
        return float(self.trace_z + self.count * float(self.mean_z @ self.mean_z))

    # ---------------------------------------------------------------- files
    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays (no pickles), for ``np.savez`` and :meth:`from_state_dict`."""
        state = {
            "format": np.asarray(_MOMENTS_FORMAT),
            "count": np.asarray(self.count, dtype=np.int64),
            "labels": np.asarray(self.labels, dtype=str),
            "mean": self.mean.copy(),
            "mean_z": self.mean_z.copy(),
            "m2": self.m2.copy(),
            "cross": self.cross.copy(),
            "m2_z": self.m2_z.copy(),
            "trace": self.trace.copy(),
            "trace_z": np.asarray(self.trace_z, dtype=np.float64),
        }
        if self.directions is not None:
            state["directions"] = self.directions.copy()
        return state

    @classmethod
    def from_state_dict(cls, state: Mapping[str, np.ndarray]) -> ScoreMoments:
        """Inverse of :meth:`state_dict` (also accepts the ``np.load`` of a saved file)."""
        fmt = str(np.asarray(state.get("format", _MOMENTS_FORMAT)))
        if fmt != _MOMENTS_FORMAT:
            raise InputError(f"not a ScoreMoments state (format {fmt!r})")
        mean = np.asarray(state["mean"], dtype=np.float64)
        out = cls(
            mean.shape[0], mean.shape[1],
            directions=state["directions"] if "directions" in state else None,
            labels=[str(s) for s in np.asarray(state["labels"]).tolist()],
        )
        out.count = int(state["count"])
        out.mean = mean.copy()
        out.mean_z = np.asarray(state["mean_z"], dtype=np.float64).copy()
        out.m2 = np.asarray(state["m2"], dtype=np.float64).copy()
        out.cross = np.asarray(state["cross"], dtype=np.float64).copy()
        out.m2_z = np.asarray(state["m2_z"], dtype=np.float64).copy()
        out.trace = np.asarray(state["trace"], dtype=np.float64).copy()
        out.trace_z = float(state["trace_z"])
        if out.m2.shape != (out.n_components, out.stat_dim, out.stat_dim) or out.cross.shape != out.m2.shape:
            raise InputError("inconsistent ScoreMoments state (second-moment shapes)")
        return out

    def save(self, path: str | Path) -> Path:
        """``np.savez`` of :meth:`state_dict`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **self.state_dict())
        return path

    @classmethod
    def load(cls, path: str | Path) -> ScoreMoments:
        with np.load(Path(path), allow_pickle=False) as z:
            return cls.from_state_dict({k: z[k] for k in z.files})

    def __repr__(self) -> str:
        space = "full" if self.directions is None else f"projected on {self.stat_dim} directions"
        return f"ScoreMoments({self.n_components} components, d={self.dim}, n={self.count}, {space})"
