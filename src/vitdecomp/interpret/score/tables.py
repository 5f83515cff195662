"""Component × feature scores from :class:`~vitdecomp.interpret.score.moments.ScoreMoments` (docs/method.md §4).

Scores for a feature with orthonormal basis ``B ∈ R^{k×d}`` (rows ``b_j``, from
:func:`feature_basis`), ``S_i = A_i Bᵀ`` and ``S_Z = Z Bᵀ``:

- ``corr``:            s_i = (1/k) Σ_j b_jᵀ C_i b_j / sqrt(b_jᵀ Σ_i b_j · b_jᵀ Σ_Z b_j)
                       = (1/k) Σ_j Pearson_x(S_i[:, j], S_Z[:, j])   (paper Alg. 3)
- ``var_attributed``:  v_i = (1/k) Σ_j b_jᵀ C_i b_j = (1/k) Σ_j Cov_x(S_i[:, j], S_Z[:, j]);
                       Σ_i C_i = Σ_Z when Z is the exact sum, so the shares
                       v_i / ((1/k) tr(B Σ_Z Bᵀ)) sum to 1
- ``var_explained``:   e_i = tr(B Σ_i Bᵀ) / tr(Σ_i)

:class:`ScoreTable` holds the ``[comp, feature]`` scores with the derived ones (selectivity,
contrastive), its text table, JSON and SVG heatmap.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from xml.sax.saxutils import escape

import numpy as np

from ...errors import InputError
from .moments import FLAT_TOL, ScoreMoments, as_float64

if TYPE_CHECKING:
    import torch

__all__ = ["ScoreKind", "ScoreTable", "feature_basis", "feature_scores", "score_table"]

log = logging.getLogger(__name__)

ScoreKind = Literal["corr", "var_attributed", "var_explained"]
_KINDS = ("corr", "var_attributed", "var_explained")
_TABLE_FORMAT = "vitdecomp.ScoreTable/1"


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
    e = as_float64(text_embeddings, "text_embeddings")
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
    b = as_float64(basis, "basis")
    if b.ndim == 1:
        b = b[None]
    if b.ndim != 2 or b.shape[1] != moments.dim or b.shape[0] == 0:
        raise InputError(f"basis must be [k, {moments.dim}], got {tuple(b.shape)}")
    gram_err = float(np.max(np.abs(b @ b.T - np.eye(b.shape[0]))))
    if gram_err > 1e-6:
        raise InputError(f"basis rows are not orthonormal (|BBᵀ − I| = {gram_err:.2g}); use feature_basis()")
    w = moments.coefficients(b)  # [k, m]
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

    def column_index(self, feature: str) -> int:
        """Column of ``feature``.

        Raises:
            KeyError: no such feature.
        """
        try:
            return self.features.index(feature)
        except ValueError:
            raise KeyError(f"no feature {feature!r}; have {list(self.features)}") from None

    _col = column_index

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
        self, feature: str, k: int = 5, *, by: Literal["score", "selectivity"] = "score", kinds: Any = "input"
    ) -> list[tuple[str, float]]:
        """The ``k`` highest components on ``feature``: ``[(label, value), ...]``, best first.

        Args:
            kinds: which components may be ranked (:func:`vitdecomp.core.labels.resolve_kinds`):
                by default those that compute something from the input (heads, MLPs, neurons,
                ...); ``embed``/``rest``/bias rows only when asked for (``"all"``, ``"input+embed"``).
        """
        from ...core.labels import kind_mask

        if by not in ("score", "selectivity"):
            raise InputError(f"by must be 'score' or 'selectivity', got {by!r}")
        try:
            allowed = kind_mask(self.labels, kinds)
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        col = (self.selectivity() if by == "selectivity" else self)[feature]
        order = [i for i in np.argsort(-col, kind="stable") if allowed[i]][: max(0, int(k))]
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

    def format(self, top: int = 5, *, by: Literal["score", "selectivity"] = "score", kinds: Any = "input") -> str:
        """Readable table: per feature (column) its ``top`` components (of ``kinds``) with their values."""
        k = min(int(top), len(self.labels))
        cols = [self.top(f, k, by=by, kinds=kinds) for f in self.features]
        k = max((len(c) for c in cols), default=0)
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

    def row_index(self, label: str) -> int:
        """Row of the component ``label``.

        Raises:
            KeyError: no such component.
        """
        try:
            return self.labels.index(str(label))
        except ValueError:
            raise KeyError(f"no component {label!r}") from None

    _row = row_index


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
