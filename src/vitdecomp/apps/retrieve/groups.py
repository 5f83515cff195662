"""Component groups (docs/method.md §6.2–6.3): which components form one representation, and how they are chosen.

A *component group* ``G`` is a set of components of a store; its representation of item ``x`` is
the normalised sum of its members' direct contributions, ``z_G(x) = s_G(x) / ‖s_G(x)‖`` with
``s_G(x) = Σ_{i∈G} c_i(x)``. The *full* group (:data:`FULL`, :func:`full_group`) is the model's own
representation. Groups are chosen explicitly (:meth:`ComponentGroup.of`) or from a feature score
table (:func:`feature_groups`: components ranked by their score ``s_{i,p}`` for text queries or
their selectivity ``g_{i,p}`` for image queries, taken in consecutive groups of three). This module
only names and ranks components; :mod:`~vitdecomp.apps.retrieve.index` turns groups into indexes.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ...errors import InputError

if TYPE_CHECKING:
    from ...interpret.score import ScoreTable

__all__ = ["FULL", "UNSELECTABLE", "ComponentGroup", "full_group", "top_components", "feature_groups",
           "read_score_table", "feature_texts"]

#: Name of the group that is the model's own (full) representation.
FULL = "full"
#: Components never picked by score: the readout's constant bias (same vector for every item).
UNSELECTABLE: tuple[str, ...] = ("bias",)


@dataclass(frozen=True)
class ComponentGroup:
    """A named set of store components whose summed contribution is one representation.

    Attributes:
        name: label for reports (``"colour#0"``, ``"full"``, ``"L03.H00+L02.H01"``).
        components: component labels, or None for the full representation (the stored reference).
        meta: how the group was chosen (feature, score kind, scores), JSON-able; not part of its identity.
    """

    name: str
    components: tuple[str, ...] | None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.components is not None:
            comps = tuple(str(c) for c in self.components)
            if not comps:
                raise InputError(f"group {self.name!r} has no components")
            if len(set(comps)) != len(comps):
                raise InputError(f"group {self.name!r} lists a component twice: {list(comps)}")
            object.__setattr__(self, "components", comps)

    @property
    def is_full(self) -> bool:
        return self.components is None

    @property
    def key(self) -> str:
        """Identity of the member *set* (order and name do not matter): 16 hex digits."""
        members = None if self.components is None else sorted(self.components)
        return hashlib.sha256(json.dumps({"components": members}).encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        from ...store.provenance import jsonable

        return {"name": self.name, "components": None if self.components is None else list(self.components),
                "key": self.key, "meta": jsonable(self.meta)}

    @classmethod
    def of(cls, components: Sequence[str], name: str | None = None, **meta: Any) -> ComponentGroup:
        """A group of explicit components (named ``"A+B+C"`` by default)."""
        comps = tuple(str(c) for c in components)
        return cls(name or "+".join(comps), comps, dict(meta))


def full_group() -> ComponentGroup:
    """The full representation ``z(x)`` (the store's reference), the baseline of every comparison."""
    return ComponentGroup(FULL, None, {"what": "the model's representation (stored reference)"})


def _selectable(labels: Sequence[str], exclude: Iterable[str]) -> np.ndarray:
    banned = set(exclude)
    return np.array([str(lab) not in banned for lab in labels], dtype=bool)


def top_components(
    table: ScoreTable,
    feature: str,
    k: int,
    *,
    by: Literal["score", "selectivity"] = "score",
    start: int = 0,
    exclude: Iterable[str] = UNSELECTABLE,
    kinds: Any = "input",
) -> list[int]:
    """Rows of the components ranked ``start .. start+k-1`` on ``feature`` (best first).

    Ranking: descending ``table[feature]`` (``by="score"``) or its selectivity
    ``g_{i,p} = s_{i,p} − max_{p'≠p} s_{i,p'}`` (``by="selectivity"``, needs two features), ties
    by row order, NaN last; only components of ``kinds`` (default: those that compute something
    from the input, :data:`vitdecomp.core.labels.INPUT_KINDS`; ``embed``/``rest``/bias rows only
    when asked for) and not named in ``exclude`` are returned.
    """
    if k < 1 or start < 0:
        raise InputError(f"need k >= 1 and start >= 0, got k={k}, start={start}")
    if by not in ("score", "selectivity"):
        raise InputError(f"by must be 'score' or 'selectivity', got {by!r}")
    source = table.selectivity() if by == "selectivity" else table
    try:
        scores = np.array(source[feature], dtype=np.float64)
    except KeyError as exc:
        raise InputError(f"no feature {feature!r} in the score table; have {list(table.features)}") from exc
    from ...core.labels import kind_mask

    allowed = _selectable(table.labels, exclude) & kind_mask(table.labels, kinds)
    scores[~allowed] = -np.inf
    order = [int(i) for i in np.argsort(-scores, kind="stable") if allowed[i]]
    return order[start:start + k]


def feature_groups(
    table: ScoreTable,
    feature: str,
    *,
    size: int = 3,
    n_groups: int = 1,
    by: Literal["score", "selectivity"] = "score",
    exclude: Iterable[str] = UNSELECTABLE,
    kinds: Any = "input",
) -> list[ComponentGroup]:
    """Consecutive groups of ``size`` components in ``feature`` order (docs/method.md §6.2: threes).

    Group ``j`` (named ``"{feature}#{j}"``) holds the components ranked ``j·size .. (j+1)·size−1``
    by :func:`top_components`; use ``by="score"`` (``corr``) for text queries and
    ``by="selectivity"`` for image queries (§6.3). Fewer groups come back when components run out.
    """
    if size < 1 or n_groups < 1:
        raise InputError(f"need size >= 1 and n_groups >= 1, got {size}, {n_groups}")
    values = (table.selectivity() if by == "selectivity" else table)[feature]
    out = []
    for j in range(n_groups):
        rows = top_components(table, feature, size, by=by, start=j * size, exclude=exclude, kinds=kinds)
        if not rows:
            break
        out.append(ComponentGroup(
            f"{feature}#{j}", tuple(table.labels[i] for i in rows),
            {"feature": feature, "by": by, "kind": table.kind, "rank": [j * size + 1, j * size + len(rows)],
             "scores": {table.labels[i]: float(values[i]) for i in rows}}))
    return out




def read_score_table(path: str | Path, variant: str | None = None, *, what: str = "--scores") -> ScoreTable:
    """A :class:`~vitdecomp.interpret.score.ScoreTable` read from a file.

    The file is ``vitdecomp score``'s ``score.json`` (its table ``tables[variant]``; default the
    ``corr`` table, else the first) or a file holding one table (``ScoreTable.to_json()``).

    Args:
        path: the JSON file.
        variant: which table of a ``score.json`` (None: ``corr``, else its first).
        what: how errors name the file's argument (``"--scores"``, ``"--score"``).

    Raises:
        InputError: unreadable, not JSON, no such table, or no score table in it.
    """
    from ...interpret.score import ScoreTable

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot read it ({exc})") from None
    except ValueError as exc:
        raise InputError(f"{what} {path}: not JSON ({exc})") from None
    tables = data.get("tables") if isinstance(data, dict) else None
    try:
        if isinstance(tables, dict) and tables:
            if variant is None:
                variant = "corr" if "corr" in tables else next(iter(tables))
            if variant not in tables:
                raise InputError(f"{what} {path} has no {variant!r} table; it has {sorted(tables)}")
            return ScoreTable.from_json(tables[variant])
        if isinstance(data, dict) and {"labels", "features", "scores"} <= set(data):
            return ScoreTable.from_json(data)
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{what} {path}: not a valid score table ({exc})") from None
    raise InputError(f"{what} {path} holds no score table (write one with `vitdecomp score STORE FEATURE --out DIR`)")


def feature_texts(spec: str | Path | Mapping[str, Sequence[str]] = "default") -> dict[str, list[str]]:
    """Feature texts ``{feature: [text, ...]}`` to score components with.

    Args:
        spec: ``"default"`` (the eight docs/method.md §4 sets,
            :func:`vitdecomp.interpret.text.pools.feature_sets`), a JSON file ``{name: [texts]}``, or
            the mapping itself (e.g. :func:`vitdecomp.synth.generator.factor_phrases` for the
            synthetic world's factors).

    Raises:
        InputError: not one of these, or a malformed file.
    """
    if isinstance(spec, Mapping):
        data: Any = spec
        where = "feature texts"
    elif str(spec) == "default":
        from ...interpret.text.pools import feature_sets

        return feature_sets()
    else:
        path = Path(spec)
        where = f"--features {path}"
        if not path.is_file():
            raise InputError(f"--features {str(spec)!r}: not 'default', 'synth' or a JSON file")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{where}: cannot read JSON ({exc})") from exc
    if not isinstance(data, Mapping) or not data or not all(
            isinstance(v, (list, tuple)) and v and all(isinstance(t, str) for t in v) for v in data.values()):
        raise InputError(f"{where}: expected a JSON object {{feature: [text, ...]}}")
    return {str(k): list(v) for k, v in data.items()}
