"""CompAlign settings (docs/method.md §3): map sharing, objective, orthogonality constraint, optimiser.

:class:`AlignConfig` says how the maps are fitted; :func:`resolve_constraint` picks the Gram side kept
orthogonal for given widths (``FᵀF = s²I`` needs ``d_model <= d_clip``, ``FFᵀ = s²I`` needs
``d_model >= d_clip``) and :func:`map_assignment` which map each component uses.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ...errors import InputError

__all__ = ["PRESETS", "AlignConfig", "AlignmentInfeasibleError", "Constraint", "Init", "Mode", "Parametrisation",
           "Side", "map_assignment", "resolve_constraint"]

log = logging.getLogger(__name__)

Mode = Literal["per_component", "shared", "grouped"]
Parametrisation = Literal["penalty", "orthogonal"]
Constraint = Literal["auto", "isometry", "coisometry"]
Side = Literal["isometry", "coisometry"]
Init = Literal["lstsq", "random"]
_MODES = ("per_component", "shared", "grouped")
_PARAMETRISATIONS = ("penalty", "orthogonal")
_CONSTRAINTS = ("auto", "isometry", "coisometry")
_INITS = ("lstsq", "random")

#: Named settings (``vitdecomp align --preset NAME``; :meth:`AlignConfig.preset`). ``"default"``: the fields'
#: defaults (closed-form start, then the objective). ``"published"``: the published code's optimiser settings
#: (random orthogonal start, learning rate 3e-4, 2 epochs, batch 32), kept for comparison: on an exactly
#: solvable problem of 3,000 rows they reach a held-out cosine of about 0.04 (docs/benchmarks.md).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "published": {"init": "random", "lr": 3e-4, "epochs": 2, "batch_size": 32},
}


class AlignmentInfeasibleError(InputError):
    """The requested orthogonality constraint cannot hold for these dimensions (the message
    names the alternatives)."""


# ---------------------------------------------------------------- configuration
@dataclass(frozen=True, kw_only=True)
class AlignConfig:
    """How CompAlign is fitted.

    Attributes:
        mode: ``"per_component"`` (one map per component), ``"shared"`` (one map) or
            ``"grouped"`` (one map per group in ``groups``).
        groups: for ``mode="grouped"``: component indices per group, a partition of
            ``range(n_components)``; stored as a tuple of tuples.
        parametrisation: ``"penalty"`` (paper: cosine loss + ``lam · Σ‖FᵀF − I‖_F``) or
            ``"orthogonal"`` (hard ``F = s Q``, ``QᵀQ = I``).
        constraint: ``"auto"``, ``"isometry"`` (``FᵀF = s²I``) or ``"coisometry"``
            (``FFᵀ = s²I``); see the module docs.
        common_scale: orthogonal mode: one scale ``s`` for every map (Theorem 1's common ``k``)
            instead of one per map.
        lam: penalty weight λ (penalty mode; 0 = unconstrained baseline).
        init: where the optimiser starts. ``"lstsq"`` (default): the closed-form least-squares maps of
            ``Σ_g F_g c_g ≈ y`` from streamed normal equations (one pass over the training rows), for a
            constrained objective (orthogonal, or penalty with ``lam > 0``) made scaled-orthogonal (polar
            factor, least-squares scales, then up to ``sweeps`` block-coordinate Procrustes sweeps);
            ``"random"``: a random (co-)isometry, as the published code. See :func:`vitdecomp.interpret.align.fit.closed_form_maps`.
        ridge: relative ridge of the least-squares start: ``ridge · tr(A_gg)/d_model`` is added to the
            diagonal of map ``g``'s block of the normal matrix ``A = XᵀX`` (invariant to rescaling a
            component; it also makes constant components such as ``bias`` solvable).
        sweeps: block-coordinate Procrustes sweeps of the least-squares start (orthogonal objective,
            isometry side; 0: the polar projection with least-squares scales only).
        lstsq_max_columns: largest joint least-squares problem, in columns ``n_maps · d_model`` (the
            float64 normal matrix is ``8 · columns²`` bytes: 134 MB at 4,096); above it the start is the
            shared map's least-squares solution (one ``d_model``-column problem) for every map.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay of the map weights (never of the scales).
        epochs: maximum number of passes over the training rows.
        batch_size: training rows per optimiser step.
        val_fraction: share of rows held out for validation (``0 < val_fraction < 1``).
        patience: stop after this many evaluated epochs without a better validation cosine;
            None: run every epoch (the best state is still restored).
        min_delta: for ``patience``, an epoch is better only when it raises the best validation cosine by
            more than this (the best state is restored whatever the margin).
        seed: initialisation and train/validation split.
    """

    mode: Mode = "per_component"
    groups: Sequence[Sequence[int]] | None = None
    parametrisation: Parametrisation = "penalty"
    constraint: Constraint = "auto"
    common_scale: bool = False
    lam: float = 1.0 / 768.0
    init: Init = "lstsq"
    ridge: float = 1e-4
    sweeps: int = 50
    lstsq_max_columns: int = 4096
    lr: float = 3e-5
    weight_decay: float = 0.0
    epochs: int = 10
    batch_size: int = 32
    val_fraction: float = 0.1
    patience: int | None = 2
    min_delta: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise InputError(f"mode must be one of {_MODES}, got {self.mode!r}")
        if self.parametrisation not in _PARAMETRISATIONS:
            raise InputError(f"parametrisation must be one of {_PARAMETRISATIONS}, got {self.parametrisation!r}")
        if self.constraint not in _CONSTRAINTS:
            raise InputError(f"constraint must be one of {_CONSTRAINTS}, got {self.constraint!r}")
        if self.mode == "grouped":
            if not self.groups:
                raise InputError("mode='grouped' needs groups (component indices per group)")
            object.__setattr__(self, "groups", tuple(tuple(int(i) for i in g) for g in self.groups))
        elif self.groups is not None:
            raise InputError(f"groups are only used with mode='grouped', not mode={self.mode!r}")
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise InputError(f"lam must be a finite number >= 0, got {self.lam}")
        if self.init not in _INITS:
            raise InputError(f"init must be one of {_INITS}, got {self.init!r}")
        if not (self.ridge >= 0 and math.isfinite(self.ridge)):
            raise InputError(f"ridge must be a finite number >= 0, got {self.ridge}")
        if self.sweeps < 0 or self.lstsq_max_columns < 1:
            raise InputError(f"sweeps must be >= 0 and lstsq_max_columns >= 1, got {self.sweeps} and "
                             f"{self.lstsq_max_columns}")
        if not self.lr > 0:
            raise InputError(f"lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise InputError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.epochs < 1 or self.batch_size < 1:
            raise InputError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if not 0 < self.val_fraction < 1:
            raise InputError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.patience is not None and self.patience < 1:
            raise InputError(f"patience must be >= 1 or None, got {self.patience}")
        if not (self.min_delta >= 0 and math.isfinite(self.min_delta)):
            raise InputError(f"min_delta must be a finite number >= 0, got {self.min_delta}")

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict of every field (groups as lists)."""
        data = dataclasses.asdict(self)
        data["groups"] = [list(g) for g in self.groups] if self.groups is not None else None
        return data

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> AlignConfig:
        """The settings named ``name`` in :data:`PRESETS` (``"default"`` or ``"published"``), with ``overrides``."""
        if name not in PRESETS:
            raise InputError(f"unknown CompAlign preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def published(cls, **overrides: Any) -> AlignConfig:
        """The published code's optimiser settings (random start, lr 3e-4, 2 epochs, batch 32), for comparison."""
        return cls.preset("published", **overrides)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AlignConfig:
        """Inverse of :meth:`to_json`. A config written before ``init`` and ``min_delta`` existed was a random start
        stopped on any improvement (and is read so)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise InputError(f"alignment config has unknown fields {sorted(unknown)} (written by a newer vitdecomp?)")
        kwargs = dict(data)
        kwargs.setdefault("init", "random")
        kwargs.setdefault("min_delta", 0.0)
        if kwargs.get("groups") is not None:
            kwargs["groups"] = tuple(tuple(g) for g in kwargs["groups"])
        return cls(**kwargs)


def resolve_constraint(config: AlignConfig, d_model: int, d_clip: int) -> Side:
    """The Gram side the maps are kept orthogonal on (see the module docs).

    Raises:
        AlignmentInfeasibleError: the constraint cannot hold for ``d_model`` and ``d_clip``.
    """
    hard = config.parametrisation == "orthogonal" or config.lam > 0
    side: Side
    if config.constraint == "auto":
        if d_model <= d_clip:
            side = "isometry"
        elif config.parametrisation == "penalty":
            side = "coisometry"
            if config.lam > 0:
                log.warning(
                    "CompAlign: d_model=%d > d_clip=%d, no isometry exists; penalising the co-isometry "
                    "||F F^T - I|| on the smaller (d_clip) Gram side instead", d_model, d_clip)
        else:
            raise AlignmentInfeasibleError(_infeasible_message("isometry", d_model, d_clip))
    else:
        side = config.constraint
    if hard and side == "isometry" and d_model > d_clip:
        raise AlignmentInfeasibleError(_infeasible_message("isometry", d_model, d_clip))
    if hard and side == "coisometry" and d_model < d_clip:
        raise AlignmentInfeasibleError(_infeasible_message("coisometry", d_model, d_clip))
    return side


def _infeasible_message(side: Side, d_model: int, d_clip: int) -> str:
    if side == "coisometry":
        return (f"a co-isometry R^{d_model} -> R^{d_clip} (F F^T = s^2 I) needs d_model >= d_clip, got "
                f"d_model={d_model} < d_clip={d_clip}: use constraint='isometry' (or 'auto')")
    return (
        f"an isometry R^{d_model} -> R^{d_clip} (F^T F = s^2 I, orthonormal columns) needs d_model <= d_clip, "
        f"got d_model={d_model} > d_clip={d_clip} (docs/method.md §3: e.g. Swin-B 1024 into ViT-L-14 768). Alternatives: "
        "(1) parametrisation='penalty' with constraint='auto' or 'coisometry': penalises ||F F^T - I||_F on the "
        "smaller (d_clip) Gram side, as the published code does; "
        "(2) parametrisation='orthogonal' with constraint='coisometry': F = s P^T with orthonormal P, an isometry "
        "on a learned d_clip-dim subspace of each component (in place of projecting components on a d_clip-dim "
        "PCA subspace first); "
        "(3) a CLIP target with d_clip >= d_model (ViT-H-14: 1024, ViT-bigG-14: 1280); "
        "(4) lam=0, unconstrained (with mode='shared': the Text-to-Concept baseline)."
    )


def map_assignment(config: AlignConfig, n_components: int) -> list[int]:
    """The map each component uses: ``[comp]`` ints in ``range(n_maps)`` (identity for ``per_component``,
    all 0 for ``shared``, the group index for ``grouped``; the groups must partition the components)."""
    if n_components < 1:
        raise InputError(f"n_components must be >= 1, got {n_components}")
    if config.mode == "per_component":
        return list(range(n_components))
    if config.mode == "shared":
        return [0] * n_components
    assert config.groups is not None
    index = [-1] * n_components
    problems: list[str] = []
    for g, members in enumerate(config.groups):
        for i in members:
            if not 0 <= i < n_components:
                problems.append(f"index {i} out of range(0, {n_components})")
            elif index[i] >= 0:
                problems.append(f"component {i} in groups {index[i]} and {g}")
            else:
                index[i] = g
    missing = [i for i, g in enumerate(index) if g < 0]
    if missing:
        problems.append(f"components {missing[:10]} in no group")
    if problems:
        raise InputError("groups must partition the components: " + "; ".join(problems))
    return index
