"""Component × feature scores (docs/method.md §4) from one streaming pass over a dataset.

Every score of docs/method.md §4 is a function of second moments, so one pass accumulates the
sufficient statistics in float64 and any feature set can be scored afterwards without the data.
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

Scores for a feature with orthonormal basis ``B ∈ R^{k×d}`` (rows ``b_j``, from
:func:`feature_basis`), ``S_i = A_i Bᵀ`` and ``S_Z = Z Bᵀ``:

- ``corr``:            s_i = (1/k) Σ_j b_jᵀ C_i b_j / sqrt(b_jᵀ Σ_i b_j · b_jᵀ Σ_Z b_j)
                       = (1/k) Σ_j Pearson_x(S_i[:, j], S_Z[:, j])   (paper Alg. 3)
- ``var_attributed``:  v_i = (1/k) Σ_j b_jᵀ C_i b_j = (1/k) Σ_j Cov_x(S_i[:, j], S_Z[:, j]);
                       Σ_i C_i = Σ_Z when Z is the exact sum, so the shares
                       v_i / ((1/k) tr(B Σ_Z Bᵀ)) sum to 1
- ``var_explained``:   e_i = tr(B Σ_i Bᵀ) / tr(Σ_i)

Derived scores live on :class:`ScoreTable` (selectivity, contrastive); :func:`clip_proxy` is
the CLIP "ground truth" of docs/method.md §4 and :func:`validate_ordering` its Spearman comparison.

Example::

    moments = ScoreMoments.from_store(store)                 # one pass, memory one chunk
    bases = {name: feature_basis(embed(texts)) for name, texts in FEATURES.items()}
    table = score_table(moments, bases, kind="corr")
    print(table.format(top=5))
    table.plot("scores.svg")
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple
from xml.sax.saxutils import escape

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:
    import torch

    from ..core.stack import ComponentStack
    from ..store.component_store import ComponentStore

__all__ = [
    "ScoreKind",
    "ScoreMoments",
    "ScoreTable",
    "clip_proxy",
    "clip_proxy_table",
    "feature_basis",
    "feature_scores",
    "score_table",
    "spearman",
    "validate_ordering",
]

log = logging.getLogger(__name__)

ScoreKind = Literal["corr", "var_attributed", "var_explained"]
_KINDS = ("corr", "var_attributed", "var_explained")
_MOMENTS_FORMAT = "vitdecomp.ScoreMoments/1"
_TABLE_FORMAT = "vitdecomp.ScoreTable/1"
FLAT_TOL = 1e-12
"""Default relative tolerance below which a variance counts as zero (see :func:`feature_scores`)."""


def _as_f64(x: Any, name: str = "array") -> np.ndarray:
    """A float64 numpy copy/view of a numpy array or torch tensor."""
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
            p = _as_f64(directions, "directions")
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
        x = _as_f64(values, "values")
        if x.ndim != 3 or x.shape[1:] != self.mean.shape:
            raise InputError(f"expected values [batch, {self.n_components}, {self.dim}], got {tuple(x.shape)}")
        n = int(x.shape[0])
        if n == 0:
            return self
        if reference is None:
            z = x.sum(axis=1)
        else:
            z = _as_f64(reference, "reference")
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
        d_new = _as_f64(directions, "directions")
        if d_new.ndim == 1:
            d_new = d_new[None]
        if d_new.ndim != 2 or d_new.shape[1] != self.dim:
            raise InputError(f"directions must be [k, {self.dim}], got {tuple(d_new.shape)}")
        w = self._coefficients(d_new, atol=atol)  # [k, m]
        out = ScoreMoments(self.n_components, self.dim, directions=d_new, labels=self.labels)
        out.count, out.mean, out.mean_z = self.count, self.mean.copy(), self.mean_z.copy()
        out.trace, out.trace_z = self.trace.copy(), self.trace_z
        out.m2 = w @ self.m2 @ w.T
        out.cross = w @ self.cross @ w.T
        out.m2_z = w @ self.m2_z @ w.T
        return out

    def _coefficients(self, rows: np.ndarray, *, atol: float = 1e-8) -> np.ndarray:
        """``W [k, m]`` with ``W P = rows`` (``P`` the directions, or I in the full space)."""
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


# ============================================================================ features
def feature_basis(text_embeddings: np.ndarray | torch.Tensor, *, rtol: float = 1e-6) -> np.ndarray:
    """Orthonormal basis ``B_p`` ``[k', d]`` of a feature's text embeddings (docs/method.md §4 "Inputs").

    The Q factor of the QR decomposition of ``Eᵀ`` (rows in the given order, signs such that
    ``⟨b_j, e_j⟩ > 0``), computed by modified Gram–Schmidt with re-orthogonalisation in
    float64. A row whose residual after removing the earlier rows is ``<= rtol·‖e_j‖`` is
    linearly dependent and dropped (logged), so ``k' <= k``.

    Args:
        text_embeddings: ``[k, d]`` (a single ``[d]`` vector is one row).
        rtol: relative residual below which a row counts as dependent.
    """
    e = _as_f64(text_embeddings, "text_embeddings")
    if e.ndim == 1:
        e = e[None]
    if e.ndim != 2 or e.shape[0] == 0:
        raise InputError(f"text_embeddings must be [k, d] with k >= 1, got {tuple(e.shape)}")
    rows: list[np.ndarray] = []
    dropped = []
    for j, v in enumerate(e):
        norm = float(np.linalg.norm(v))
        r = v.copy()
        for _ in range(2):  # "twice is enough"
            for q in rows:
                r -= (q @ r) * q
        rn = float(np.linalg.norm(r))
        if norm == 0.0 or rn <= rtol * norm:
            dropped.append(j)
            continue
        rows.append(r / rn)
    if dropped:
        log.info("feature_basis: dropped %d linearly dependent row(s) %s", len(dropped), dropped[:10])
    if not rows:
        raise InputError("text_embeddings span nothing (all rows zero)")
    return np.stack(rows)


def feature_scores(
    moments: ScoreMoments,
    basis: np.ndarray | torch.Tensor,
    *,
    kind: ScoreKind = "corr",
    share: bool = False,
    flat_tol: float = FLAT_TOL,
) -> np.ndarray:
    """One score per component for one feature: ``[comp]`` (formulas in the module docstring).

    Args:
        moments: accumulated statistics (``count >= 2``).
        basis: orthonormal rows ``B`` ``[k, d]`` (from :func:`feature_basis`).
        kind: ``"corr"``, ``"var_attributed"`` or ``"var_explained"``.
        share: ``var_attributed`` only: divide by the feature variance of the total,
            ``(1/k) tr(B Σ_Z Bᵀ)``; the shares sum to 1 when ``Z`` is the exact sum of the
            components (less when components are missing from the moments).
        flat_tol: a variance counts as zero when ``b_jᵀ M_i b_j <= flat_tol · Σ_x ‖a_i(x)‖²``
            (likewise for ``Z``, and ``tr M_i`` for ``var_explained``), i.e. rounding noise of a
            constant (bias) or absent component; its ``corr`` term (and ``var_explained``) is 0.

    Raises:
        InputError: unknown kind, non-orthonormal basis, too few items, or a basis outside
            the span of projected moments.
    """
    if kind not in _KINDS:
        raise InputError(f"unknown score kind {kind!r}; use one of {_KINDS}")
    if share and kind != "var_attributed":
        raise InputError("share=True applies to kind='var_attributed' only")
    if moments.count < 2:
        raise InputError(f"scores need at least 2 items, the moments hold {moments.count}")
    b = _as_f64(basis, "basis")
    if b.ndim == 1:
        b = b[None]
    if b.ndim != 2 or b.shape[1] != moments.dim or b.shape[0] == 0:
        raise InputError(f"basis must be [k, {moments.dim}], got {tuple(b.shape)}")
    gram_err = float(np.max(np.abs(b @ b.T - np.eye(b.shape[0]))))
    if gram_err > 1e-6:
        raise InputError(f"basis rows are not orthonormal (|BBᵀ − I| = {gram_err:.2g}); use feature_basis()")
    w = moments._coefficients(b)  # [k, m]
    q = _quad(w, moments.m2)  # [comp, k]: Σ_x (b_jᵀ(a_i − μ_i))²
    if kind == "var_explained":
        tr = moments.trace
        ok = tr > flat_tol * moments.sum_squares
        return np.divide(q.sum(axis=1), tr, out=np.zeros_like(tr), where=ok)
    c = _quad(w, moments.cross)  # [comp, k]
    z = _quad(w, moments.m2_z)  # [k]
    if kind == "var_attributed":
        v = c.mean(axis=1) / (moments.count - 1)
        if not share:
            return v
        if not float(z.mean()) > flat_tol * moments.sum_squares_z:
            log.warning("the total has no variance along this feature; var_attributed shares set to 0")
            return np.zeros_like(v)
        return v / (float(z.mean()) / (moments.count - 1))
    flat_i = q <= flat_tol * moments.sum_squares[:, None]
    flat_z = z <= flat_tol * moments.sum_squares_z
    ok = ~(flat_i | flat_z[None, :])
    denom = np.sqrt(np.where(ok, q * z[None, :], 1.0))
    r = np.divide(c, denom, out=np.zeros_like(c), where=ok)
    return r.mean(axis=1)


def _quad(w: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Diagonal quadratic forms ``w_jᵀ M w_j``: ``w [k, m]``, ``M [..., m, m]`` -> ``[..., k]``."""
    return np.einsum("km,...mk->...k", w, m @ w.T)


# ============================================================================ table
@dataclass(frozen=True)
class ScoreTable:
    """Scores of every component on every feature.

    Attributes:
        scores: ``[comp, feature]`` float64.
        labels: one name per component row.
        features: one name per feature column.
        kind: what the numbers are (``"corr"``, ``"var_attributed"``, ``"selectivity[corr]"``...).
        meta: provenance (count, share, ...), JSON-able.
    """

    scores: np.ndarray
    labels: tuple[str, ...]
    features: tuple[str, ...]
    kind: str = "corr"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        scores = np.asarray(self.scores, dtype=np.float64)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "labels", tuple(str(s) for s in self.labels))
        object.__setattr__(self, "features", tuple(str(s) for s in self.features))
        if scores.shape != (len(self.labels), len(self.features)):
            raise InputError(
                f"scores {tuple(scores.shape)} do not match {len(self.labels)} labels × {len(self.features)} features"
            )
        if len(set(self.features)) != len(self.features):
            raise InputError("feature names must be unique")

    def _col(self, feature: str) -> int:
        try:
            return self.features.index(feature)
        except ValueError:
            raise KeyError(f"no feature {feature!r}; have {list(self.features)}") from None

    def __getitem__(self, feature: str) -> np.ndarray:
        """Scores of one feature: ``[comp]``."""
        return self.scores[:, self._col(feature)]

    def selectivity(self) -> ScoreTable:
        """``g_{i,p} = s_{i,p} − max_{p'≠p} s_{i,p'}`` (docs/method.md §4), as a table of the same shape.

        Raises:
            InputError: fewer than two features.
        """
        s = self.scores
        n_feat = s.shape[1]
        if n_feat < 2:
            raise InputError("selectivity needs at least two features")
        # max over the others: the row max, or the second largest where p is the argmax
        order = np.argsort(-s, axis=1, kind="stable")
        first = np.take_along_axis(s, order[:, :1], axis=1)
        second = np.take_along_axis(s, order[:, 1:2], axis=1)
        is_top = np.zeros_like(s, dtype=bool)
        np.put_along_axis(is_top, order[:, :1], True, axis=1)
        other_max = np.where(is_top, second, first)
        meta = {**self.meta, "of": self.kind}
        return ScoreTable(s - other_max, self.labels, self.features, f"selectivity[{self.kind}]", meta)

    def contrastive(self, spurious: str, core: str) -> np.ndarray:
        """``s_{i,spurious} − s_{i,core}`` ``[comp]`` (docs/method.md §4, Waterbirds)."""
        return self[spurious] - self[core]

    def top(
        self, feature: str, k: int = 5, *, by: Literal["score", "selectivity"] = "score"
    ) -> list[tuple[str, float]]:
        """The ``k`` highest components on ``feature``: ``[(label, value), ...]``, best first."""
        if by not in ("score", "selectivity"):
            raise InputError(f"by must be 'score' or 'selectivity', got {by!r}")
        col = (self.selectivity() if by == "selectivity" else self)[feature]
        order = np.argsort(-col, kind="stable")[: max(0, int(k))]
        return [(self.labels[i], float(col[i])) for i in order]

    # ---------------------------------------------------------------- io
    def to_json(self) -> dict[str, Any]:
        """JSON-able dict (floats round-trip exactly through ``json``; non-finite -> null)."""
        return {
            "format": _TABLE_FORMAT,
            "kind": self.kind,
            "labels": list(self.labels),
            "features": list(self.features),
            "scores": [[float(v) if math.isfinite(v) else None for v in row] for row in self.scores.tolist()],
            "meta": json.loads(json.dumps(self.meta, default=str)),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ScoreTable:
        """Inverse of :meth:`to_json`."""
        if data.get("format") != _TABLE_FORMAT:
            raise InputError(f"not a ScoreTable (format {data.get('format')!r})")
        labels, features = tuple(data["labels"]), tuple(data["features"])
        rows = [[math.nan if v is None else float(v) for v in row] for row in data["scores"]]
        scores = np.asarray(rows, dtype=np.float64).reshape(len(labels), len(features))
        return cls(scores, labels, features, str(data.get("kind", "corr")), dict(data.get("meta", {})))

    def format(self, top: int = 5, *, by: Literal["score", "selectivity"] = "score") -> str:
        """Readable table: per feature (column) its ``top`` components with their values."""
        k = min(int(top), len(self.labels))
        cols = [self.top(f, k, by=by) for f in self.features]
        cells = [[f"{name} {value:+.3f}" for name, value in col] for col in cols]
        widths = [max([len(f)] + [len(c) for c in col]) for f, col in zip(self.features, cells)]
        rank_w = max(4, len(str(k)))
        what = self.kind if by == "score" else f"selectivity[{self.kind}]"
        n = self.meta.get("count")
        head = f"{what}: {len(self.labels)} components × {len(self.features)} features" + (
            f" (n={n})" if n is not None else ""
        )
        lines = [head, "  ".join(["rank".ljust(rank_w)] + [f.ljust(w) for f, w in zip(self.features, widths)]).rstrip()]
        for r in range(k):
            lines.append(
                "  ".join([str(r + 1).ljust(rank_w)] + [col[r].ljust(w) for col, w in zip(cells, widths)]).rstrip()
            )
        return "\n".join(lines)

    def plot(
        self,
        path: str | Path,
        *,
        components: Sequence[str] | None = None,
        cell: int = 14,
        title: str | None = None,
    ) -> Path:
        """Write an SVG heatmap (components × features; red positive, blue negative).

        Plain SVG, no plotting dependency; colours are scaled by the largest ``|score|``.

        Args:
            path: output file; must end in ``.svg``.
            components: rows to show, in order (default every component).
            cell: cell height in pixels (width is 4 cells).
            title: heading (default the score kind).
        """
        path = Path(path)
        if path.suffix.lower() != ".svg":
            raise InputError(f"plot() writes SVG; give a .svg path, got {path.name}")
        rows = list(range(len(self.labels))) if components is None else [self._row(c) for c in components]
        data = self.scores[rows]
        finite = data[np.isfinite(data)]
        vmax = float(np.max(np.abs(finite))) if finite.size else 1.0
        vmax = vmax if vmax > 0 else 1.0
        cw, ch = 4 * cell, cell
        font = max(8, int(cell * 0.75))
        left = 10 + int(0.62 * font * max([len(self.labels[i]) for i in rows] + [4]))
        top = 30 + int(0.62 * font * max([len(f) for f in self.features] + [4]))
        width = left + cw * len(self.features) + 20
        height = top + ch * len(rows) + 20
        parts = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'font-family="monospace" font-size="{font}">',
            f'<text x="10" y="{font + 4}" font-weight="bold">'
            f"{escape(title or self.kind)} (|max| = {vmax:.3g})</text>",
        ]
        for j, feat in enumerate(self.features):
            x = left + j * cw + cw // 2
            parts.append(f'<text x="{x}" y="{top - 4}" transform="rotate(-60 {x} {top - 4})">{escape(feat)}</text>')
        for r, i in enumerate(rows):
            y = top + r * ch
            parts.append(
                f'<text x="{left - 4}" y="{y + ch - 3}" text-anchor="end">{escape(self.labels[i])}</text>'
            )
            for j, feat in enumerate(self.features):
                v = float(data[r, j])
                parts.append(
                    f'<rect x="{left + j * cw}" y="{y}" width="{cw}" height="{ch}" fill="{_diverging(v / vmax)}">'
                    f"<title>{escape(self.labels[i])} / {escape(feat)}: {v:.4g}</title></rect>"
                )
        parts.append("</svg>")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(parts) + "\n", encoding="utf-8")
        log.info("wrote score heatmap %s (%d × %d)", path, len(rows), len(self.features))
        return path

    def _row(self, label: str) -> int:
        try:
            return self.labels.index(str(label))
        except ValueError:
            raise KeyError(f"no component {label!r}") from None


def _diverging(t: float) -> str:
    """Blue (−1) – white (0) – red (+1) as ``#rrggbb``; NaN is grey."""
    if not math.isfinite(t):
        return "#bbbbbb"
    t = max(-1.0, min(1.0, t))
    lo, hi = (0xFF, 0xFF, 0xFF), ((0xB2, 0x18, 0x2B) if t > 0 else (0x21, 0x66, 0xAC))
    a = abs(t)
    r, g, b = (round(lo[c] + (hi[c] - lo[c]) * a) for c in range(3))
    return f"#{r:02x}{g:02x}{b:02x}"


def score_table(
    moments: ScoreMoments,
    features: Mapping[str, np.ndarray | torch.Tensor],
    kind: ScoreKind = "corr",
    *,
    share: bool = False,
    flat_tol: float = FLAT_TOL,
) -> ScoreTable:
    """Score every component on every feature (:func:`feature_scores` per column).

    Args:
        moments: accumulated statistics.
        features: feature name -> orthonormal basis ``[k_p, d]`` (from :func:`feature_basis`).
        kind, share, flat_tol: as in :func:`feature_scores`.
    """
    if not features:
        raise InputError("no features to score")
    cols = [feature_scores(moments, b, kind=kind, share=share, flat_tol=flat_tol) for b in features.values()]
    meta = {"count": moments.count, "share": share, "projected": moments.projected}
    return ScoreTable(np.stack(cols, axis=1), moments.labels, tuple(features), kind, meta)


# ============================================================================ CLIP proxy
class _PairMoments:
    """Streaming Pearson statistics of ``u [batch, comp, s]`` against ``v [batch, s]`` (Chan update)."""

    def __init__(self, n_components: int, n_texts: int) -> None:
        self.count = 0
        self.mu_u = np.zeros((n_components, n_texts))
        self.mu_v = np.zeros(n_texts)
        self.m_uu = np.zeros((n_components, n_texts))
        self.m_vv = np.zeros(n_texts)
        self.m_uv = np.zeros((n_components, n_texts))

    def update(self, u: np.ndarray, v: np.ndarray) -> None:
        n_b = int(u.shape[0])
        if n_b == 0:
            return
        mu_u, mu_v = u.mean(axis=0), v.mean(axis=0)
        uc, vc = u - mu_u, v - mu_v
        n_a = self.count
        n = n_a + n_b
        f = n_a * n_b / n
        du, dv = mu_u - self.mu_u, mu_v - self.mu_v
        self.m_uu += np.einsum("bcs,bcs->cs", uc, uc) + f * du * du
        self.m_vv += np.einsum("bs,bs->s", vc, vc) + f * dv * dv
        self.m_uv += np.einsum("bcs,bs->cs", uc, vc) + f * du * dv[None, :]
        self.mu_u += du * (n_b / n)
        self.mu_v += dv * (n_b / n)
        self.count = n

    def pearson(self, flat_tol: float) -> np.ndarray:
        """``[comp, s]``; 0 where either side has (numerically) no variance."""
        ok_u = self.m_uu > flat_tol * (self.m_uu + self.count * self.mu_u**2)
        ok_v = self.m_vv > flat_tol * (self.m_vv + self.count * self.mu_v**2)
        ok = ok_u & ok_v[None, :]
        denom = np.sqrt(np.where(ok, self.m_uu * self.m_vv[None, :], 1.0))
        return np.divide(self.m_uv, denom, out=np.zeros_like(self.m_uv), where=ok)


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm along the last axis (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def _proxy_pearson(
    stack_batches: Iterable[ComponentStack] | ComponentStack,
    texts: np.ndarray,
    *,
    use_reference: bool,
    flat_tol: float,
) -> tuple[tuple[str, ...], np.ndarray, int]:
    """``Pearson_x(cos(a_i, y_s), cos(Z, y_s))`` ``[comp, s]`` streamed over stacks."""
    from ..core.stack import ComponentStack

    batches: Iterable[ComponentStack] = [stack_batches] if isinstance(stack_batches, ComponentStack) else stack_batches
    y = _unit(texts)  # [s, d]
    acc: _PairMoments | None = None
    labels: tuple[str, ...] = ()
    for stack in batches:
        stack = stack.sum_tokens()
        if acc is None:
            labels = tuple(stack.names)
            if stack.dim != y.shape[1]:
                raise InputError(f"text embeddings have dim {y.shape[1]}, the stacks {stack.dim}")
            acc = _PairMoments(len(labels), y.shape[0])
        elif tuple(stack.names) != labels:
            raise InputError("stack batches have different components")
        a = _as_f64(stack.values, "stack values").transpose(1, 0, 2)  # [batch, comp, d]
        z = _as_f64(stack.reference, "reference") if use_reference else a.sum(axis=1)
        acc.update(_unit(a) @ y.T, _unit(z) @ y.T)
    if acc is None or acc.count < 2:
        raise InputError("clip_proxy needs at least 2 items")
    return labels, acc.pearson(flat_tol), acc.count


def clip_proxy(
    stack_batches: Iterable[ComponentStack] | ComponentStack,
    text_embeddings: np.ndarray | torch.Tensor,
    *,
    use_reference: bool = False,
    flat_tol: float = FLAT_TOL,
) -> np.ndarray:
    """CLIP proxy score of one feature (docs/method.md §4): ``[comp]``.

    ``r_i = (1/|S|) Σ_s Pearson_x(cos(a_i(x), y_s), cos(Z(x), y_s))``, streamed: per component
    and text, float64 means and centred sums of products merged with Chan's update. A cosine with
    a zero vector is 0; a Pearson with a constant side is 0 (same ``flat_tol`` rule as
    :func:`feature_scores`, relative to the uncentred sum of squares).

    Args:
        stack_batches: ComponentStacks in a CLIP space (one stack, or an iterable such as
            ``store.iter_batches()``); tokens are summed.
        text_embeddings: ``[s, d]`` the feature's text embeddings ``y_s`` (normalised here).
        use_reference: ``Z`` = each stack's reference (e.g. the CLIP image embedding
            ``Z_CLIP`` for aligned stacks) instead of the sum of its rows.
    """
    texts = _as_f64(text_embeddings, "text_embeddings")
    texts = texts[None] if texts.ndim == 1 else texts
    _, r, _ = _proxy_pearson(stack_batches, texts, use_reference=use_reference, flat_tol=flat_tol)
    return r.mean(axis=1)


def clip_proxy_table(
    stack_batches: Iterable[ComponentStack] | ComponentStack,
    features: Mapping[str, np.ndarray | torch.Tensor],
    *,
    use_reference: bool = False,
    flat_tol: float = FLAT_TOL,
) -> ScoreTable:
    """:func:`clip_proxy` of every feature in one pass: a ScoreTable of kind ``"clip_proxy"``.

    Args:
        features: feature name -> its text embeddings ``[s_p, d]``.
    """
    if not features:
        raise InputError("no features")
    blocks = [_as_f64(t, f"texts of {name}") for name, t in features.items()]
    blocks = [b[None] if b.ndim == 1 else b for b in blocks]
    labels, r, n = _proxy_pearson(stack_batches, np.concatenate(blocks), use_reference=use_reference,
                                  flat_tol=flat_tol)
    bounds = np.cumsum([0] + [b.shape[0] for b in blocks])
    cols = [r[:, bounds[p] : bounds[p + 1]].mean(axis=1) for p in range(len(blocks))]
    return ScoreTable(np.stack(cols, axis=1), labels, tuple(features), "clip_proxy",
                      {"count": n, "use_reference": use_reference})


# ============================================================================ validation
def _rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get the average of their ranks (as ``scipy.stats.rankdata``)."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(new)  # 1-based group id per sorted position
    bounds = np.r_[np.flatnonzero(new), x.size]  # start of each group, then the end
    avg = 0.5 * (bounds[group - 1] + bounds[group] - 1) + 1.0
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = avg
    return ranks


def spearman(a: np.ndarray | Sequence[float], b: np.ndarray | Sequence[float]) -> float:
    """Spearman ρ: Pearson correlation of the average-tie ranks of ``a`` and ``b``.

    Returns NaN when either input is constant (ρ undefined) or has fewer than 2 entries.
    """
    x = _as_f64(a, "a").reshape(-1)
    y = _as_f64(b, "b").reshape(-1)
    if x.shape != y.shape:
        raise InputError(f"spearman needs equal lengths, got {x.size} and {y.size}")
    if x.size < 2:
        return math.nan
    rx, ry = _rankdata(x), _rankdata(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / denom if denom > 0 else math.nan


def validate_ordering(table: ScoreTable, proxy_table: ScoreTable) -> dict[str, Any]:
    """docs/method.md §4 "Validation": Spearman ρ of a score table against the CLIP proxy table.

    - component ordering: per feature, ρ between the component rankings; averaged over features;
    - feature ordering: per component, ρ between the feature rankings; averaged over components.

    Rows and columns are matched by name (both tables must have the same components and
    features). Undefined ρ (constant rankings, fewer than 2 features) are left out of the means
    and counted.

    Returns:
        ``{"component_order_rho", "feature_order_rho", "per_feature": {feature: ρ},
        "per_component": {label: ρ}, "n_features", "n_components", "undefined_features",
        "undefined_components"}`` (means are None when nothing is defined).
    """
    if set(table.labels) != set(proxy_table.labels) or len(table.labels) != len(proxy_table.labels):
        raise InputError("the tables have different components")
    if set(table.features) != set(proxy_table.features):
        raise InputError("the tables have different features")
    rows = [proxy_table._row(lab) for lab in table.labels]
    cols = [proxy_table._col(f) for f in table.features]
    proxy = proxy_table.scores[np.ix_(rows, cols)]
    per_feature = {f: spearman(table.scores[:, j], proxy[:, j]) for j, f in enumerate(table.features)}
    per_component = {lab: spearman(table.scores[i], proxy[i]) for i, lab in enumerate(table.labels)}

    def mean(vals: Iterable[float]) -> float | None:
        ok = [v for v in vals if math.isfinite(v)]
        return float(np.mean(ok)) if ok else None

    return {
        "component_order_rho": mean(per_feature.values()),
        "feature_order_rho": mean(per_component.values()),
        "per_feature": per_feature,
        "per_component": per_component,
        "n_features": len(table.features),
        "n_components": len(table.labels),
        "undefined_features": sum(not math.isfinite(v) for v in per_feature.values()),
        "undefined_components": sum(not math.isfinite(v) for v in per_component.values()),
    }
