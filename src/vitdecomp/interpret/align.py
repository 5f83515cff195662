"""CompAlign: linear maps from a model's components into a CLIP space (docs/method.md §3).

A decomposition writes a representation as ``z = Σ_i c_i`` with ``c_i ∈ ℝ^{d_model}``. To read
the components with CLIP text, CompAlign fits one linear map ``f_i: ℝ^{d_model} → ℝ^{d_clip}``
per component (or per group of components, or one shared map), stored as a matrix
``F_i ∈ ℝ^{d_clip × d_model}`` (``a_i = F_i c_i``), so that the mapped sum matches the CLIP image
embedding ``y(x)`` of the same image::

    Σ_i F_i c_i(x)  ≈  y(x)                 (in direction: the loss is a cosine)

and keeps every ``F_i`` close to a *scaled isometry*, ``F_iᵀF_i = s_i² I``, so inner products
between mapped vectors (and therefore text readings ``⟨a_i, y_text⟩``) are those of the model
space up to the scale. Training is label-free.

**Objectives** (``AlignConfig.parametrisation``):

* ``"penalty"`` (the paper, [paper §4]): minimise
  ``L = mean_x [1 − cos(Σ_i F_i c_i, y)] + λ Σ_maps ‖F_iᵀF_i − I‖_F``
  (Frobenius norm, *not* squared, scale fixed to ``k = 1``; the cosine is scale-free and the
  penalty picks the scale). ``lam=0`` is the unconstrained ("λ = 0") ablation.
* ``"orthogonal"`` [ext]: the constraint holds exactly, ``F_i = s_i Q_i`` with ``Q_iᵀQ_i = I``.
  ``Q_i`` is the Q factor of the reduced QR decomposition of a free matrix ``W_i`` (signs fixed
  so ``diag R > 0``: a smooth map onto *every* matrix with orthonormal columns, both
  orientations), ``s_i = exp(ℓ_i)``; with ``common_scale=True`` one ``s`` is shared by all maps,
  the ``f_iᵀf_i = kI`` with a common ``k`` of Theorem 1. The cosine loss leaves one global
  scale free, so after training all scales are multiplied by the least-squares factor
  ``α = Σ⟨ŷ, y⟩ / Σ‖ŷ‖²`` over the validation rows (this changes no cosine; it makes
  ``Σ_i a_i ≈ y`` in norm as well).

**Map sharing** (``AlignConfig.mode``): ``"per_component"`` (CompAlign, one map per component),
``"grouped"`` (one map per group of components; ``groups`` must partition the components) and
``"shared"`` (one map for everything: the Text-to-Concept baseline). Since the maps are linear,
a group's prediction only needs the group sum: ``ŷ = Σ_g F_g (Σ_{i∈g} c_i)``.

**Feasibility.** A matrix ``F ∈ ℝ^{d_clip × d_model}`` with ``FᵀF = s²I`` needs
``d_model ≤ d_clip`` (Swin-B, 1024, into ViT-L-14, 768, is infeasible). ``AlignConfig.constraint``:

* ``"isometry"``: ``FᵀF = s² I_{d_model}`` (the paper); raises :class:`AlignmentInfeasibleError`
  when ``d_model > d_clip``.
* ``"coisometry"``: ``FFᵀ = s² I_{d_clip}`` (the smaller Gram side when ``d_model ≥ d_clip``):
  ``F = s Pᵀ`` with orthonormal ``P ∈ ℝ^{d_model × d_clip}``, an isometry on a learned
  ``d_clip``-dimensional subspace of the model space that discards its complement (a learned
  version of "project on a d_clip-dim PCA subspace first"). It is what the published code
  penalises. Needs ``d_model ≥ d_clip``.
* ``"auto"`` (default): the isometry when ``d_model ≤ d_clip``; otherwise the co-isometry in
  penalty mode (with a warning) and :class:`AlignmentInfeasibleError` in orthogonal mode (a hard
  co-isometry throws away ``d_model − d_clip`` dimensions of every component, so it must be
  asked for by name).

**Training** (:func:`fit_compalign`): mini-batches stream from a callable (a fresh iterator per
epoch), so nothing but one batch is in memory. Each row goes to the validation split when
``hash(seed, row) < val_fraction`` (splitmix64 of the row index: the split depends on neither
batch size, order of arrival nor resumption). Train rows are re-chunked into optimiser steps
of ``batch_size`` rows (AdamW; weight decay never applies to the log-scales). The state after
``k`` epochs is evaluated on the validation rows during pass ``k + 1`` (with a frozen copy of
the parameters, so this is exact and saves a pass per epoch), the last state in one extra
pass; early stopping after ``patience`` evaluated epochs without improvement of the mean
validation cosine, and the best state is restored. With ``checkpoint=PATH`` the full
training state is saved atomically after every epoch, and a run started with an existing
checkpoint continues at the next epoch; the result equals an uninterrupted run.

**Departures from docs/method.md §3 / the published code** (documented, deliberate):

* Published code: ``x·W`` with ``W ∈ ℝ^{d_z × d_c}`` penalised by ``‖WᵀW − I‖²_F/(N·d_c)``
  at ``λ = 1``, i.e. the co-isometry ``FFᵀ − I``, squared and averaged; plus one shared bias
  added as ``b/n`` per component. Here penalty mode follows the paper (``FᵀF − I``, unsquared,
  summed over maps, default ``λ = 1/768``), uses the co-isometry only when the isometry is
  infeasible or requested, and has no bias: the maps stay linear, so ``Σ_i a_i`` is exactly the
  image of ``Σ_i c_i`` and the decomposition's constant rows (``bias``) are mapped like any other.
* Early stopping is per epoch on the held-out mean cosine (code: after 50 batches without
  improvement; paper: up to an epoch). Optimiser AdamW with ``weight_decay=0`` by default
  (paper: Adam with defaults; code: weight decay 1e-6).
* Rows are used in stream order (no shuffling). For a class-sorted store, write a batch source
  that reads chunks in a fixed shuffled order (``store.components(rows)``) and yields the row
  indices as the third element of each batch, so the train/validation split stays tied to the
  rows; the order must be the same on every call for a resumed run to equal an uninterrupted one.

Example::

    from vitdecomp.interpret.align import AlignConfig, fit_compalign, store_batches
    batches = store_batches(store, clip_embeddings)          # [n_items, d_clip] CLIP targets
    # or: store_batches(store, clip_store), a store of a CLIP over the same images (its reference rows)
    align = fit_compalign(batches, len(store.labels), d_model, d_clip,
                          AlignConfig(parametrisation="orthogonal", lr=1e-3),
                          checkpoint=Path("align.ckpt"), labels=store.labels)
    aligned = align.apply(stack)                              # space="clip"
    print(align.metrics(batches, split="val"))
    align.save("align.safetensors")
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:
    import torch

    from ..core.stack import ComponentStack
    from ..store.component_store import ComponentStore

__all__ = [
    "ALIGN_FILE",
    "find_alignment",
    "AlignConfig",
    "AlignmentInfeasibleError",
    "CompAlign",
    "fit_compalign",
    "orthogonality_defect",
    "resolve_constraint",
    "paired_rows",
    "store_batches",
    "validation_mask",
]

log = logging.getLogger(__name__)

Mode = Literal["per_component", "shared", "grouped"]
Parametrisation = Literal["penalty", "orthogonal"]
Constraint = Literal["auto", "isometry", "coisometry"]
Side = Literal["isometry", "coisometry"]
#: One mini-batch: ``values [batch, comp, d_model]``, ``clip_targets [batch, d_clip]`` and,
#: optionally, ``rows [batch]`` (int64 global row indices; default: position in the stream).
Batch = Union["tuple[torch.Tensor, torch.Tensor]", "tuple[torch.Tensor, torch.Tensor, torch.Tensor]"]
BatchSource = Callable[[], Iterable[Batch]]

FORMAT = "vitdecomp.CompAlign/1"
CHECKPOINT_FORMAT = "vitdecomp.CompAlign.checkpoint/1"
_MODES = ("per_component", "shared", "grouped")
_PARAMETRISATIONS = ("penalty", "orthogonal")
_CONSTRAINTS = ("auto", "isometry", "coisometry")


#: File name of the maps in a folder written by ``vitdecomp align --out DIR``.
ALIGN_FILE = "compalign.safetensors"


def find_alignment(path: str | Path) -> Path:
    """The CompAlign file a user points to (``--align``): the file itself, or in a folder written by ``vitdecomp align
    --out DIR`` its ``compalign.safetensors`` (else ``align.safetensors``, else its only ``*.safetensors``)."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        for name in (ALIGN_FILE, "align.safetensors"):
            if (p / name).is_file():
                return p / name
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise InputError(f"--align {p}: expected {ALIGN_FILE} (written by `vitdecomp align --out DIR`) in it, "
                         f"found {[f.name for f in found]}")
    raise InputError(f"--align {p} does not exist")


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
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay of the map weights (never of the scales).
        epochs: maximum number of passes over the training rows.
        batch_size: training rows per optimiser step.
        val_fraction: share of rows held out for validation (``0 < val_fraction < 1``).
        patience: stop after this many evaluated epochs without a better validation cosine;
            None: run every epoch (the best state is still restored).
        seed: initialisation and train/validation split.
    """

    mode: Mode = "per_component"
    groups: Sequence[Sequence[int]] | None = None
    parametrisation: Parametrisation = "penalty"
    constraint: Constraint = "auto"
    common_scale: bool = False
    lam: float = 1.0 / 768.0
    lr: float = 3e-4
    weight_decay: float = 0.0
    epochs: int = 2
    batch_size: int = 32
    val_fraction: float = 0.1
    patience: int | None = 2
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

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict of every field (groups as lists)."""
        data = dataclasses.asdict(self)
        data["groups"] = [list(g) for g in self.groups] if self.groups is not None else None
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AlignConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise InputError(f"alignment config has unknown fields {sorted(unknown)} (written by a newer vitdecomp?)")
        kwargs = dict(data)
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


def _map_index(config: AlignConfig, n_components: int) -> list[int]:
    """Map used by each component: ``[comp]`` ints in ``range(n_maps)``."""
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


# ---------------------------------------------------------------- maths helpers
def orthogonality_defect(maps: torch.Tensor, side: Side = "isometry") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale-free distance of each map from a scaled (co-)isometry.

    For ``F`` of shape ``[d_clip, d_model]``, with Gram ``G = FᵀF`` (isometry, ``d = d_model``)
    or ``G = FFᵀ`` (co-isometry, ``d = d_clip``), the best scale is ``ŝ² = tr(G)/d`` and

        defect = ‖G/ŝ² − I‖_F / √d          (0 for a scaled isometry; docs/method.md §3 metric (c))

    Args:
        maps: ``[n, d_clip, d_model]``.
        side: which Gram matrix.

    Returns:
        ``(defect [n], scale [n])`` in float64, ``scale = ŝ``.
    """
    import torch

    f = maps.detach().to(torch.float64)
    gram = f.mT @ f if side == "isometry" else f @ f.mT
    d = gram.shape[-1]
    s2 = gram.diagonal(dim1=-2, dim2=-1).sum(-1) / d
    eye = torch.eye(d, dtype=torch.float64, device=f.device)
    safe = s2.clamp_min(torch.finfo(torch.float64).tiny)
    defect = torch.linalg.matrix_norm(gram / safe[:, None, None] - eye) / math.sqrt(d)
    return defect, s2.sqrt()


def _orthonormal_columns(w: torch.Tensor) -> torch.Tensor:
    """Q of the reduced QR of tall ``w [..., m, n]`` (``m >= n``) with ``diag R > 0``: ``[..., m, n]``."""
    import torch

    q, r = torch.linalg.qr(w)
    sign = torch.sign(r.diagonal(dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return q * sign.unsqueeze(-2)


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


def _group_sum(values: torch.Tensor, map_index: torch.Tensor, n_maps: int, identity: bool) -> torch.Tensor:
    """``[batch, comp, d] -> [batch, n_maps, d]``: sum of the components sharing a map."""
    if identity:
        return values
    if n_maps == 1:
        return values.sum(1, keepdim=True)
    out = values.new_zeros(values.shape[0], n_maps, values.shape[-1])
    return out.index_add_(1, map_index, values)


# ---------------------------------------------------------------- parameters
class _Params:
    """Trainable tensors and how they become maps ``F [n_maps, d_clip, d_model]``.

    penalty:     ``weight [n_maps, d_clip, d_model]`` is ``F``.
    orthogonal:  ``weight [n_maps, m, n]`` tall (``m >= n``), ``Q = qr(weight)``;
                 ``F = exp(log_scale) · Q`` (isometry: ``m, n = d_clip, d_model``) or
                 ``exp(log_scale) · Qᵀ`` (co-isometry: ``m, n = d_model, d_clip``).
    """

    def __init__(self, config: AlignConfig, side: Side, n_maps: int, d_model: int, d_clip: int,
                 device: torch.device) -> None:
        import torch

        self.parametrisation = config.parametrisation
        self.side = side
        gen = torch.Generator().manual_seed(int(config.seed))
        tall = (d_clip, d_model) if d_model <= d_clip else (d_model, d_clip)
        q = _orthonormal_columns(torch.randn(n_maps, *tall, generator=gen, dtype=torch.float64))
        if config.parametrisation == "penalty":
            init = q if d_model <= d_clip else q.mT  # a (co-)isometry with k = 1
            self.tensors = {"weight": init.to(torch.float32).contiguous()}
        else:
            # resolve_constraint guarantees the stored orientation is tall for the chosen side
            assert d_model == d_clip or (side == "isometry") == (d_model < d_clip)
            n_scales = 1 if config.common_scale else n_maps
            self.tensors = {"weight": q.to(torch.float32).contiguous(),
                            "log_scale": torch.zeros(n_scales, dtype=torch.float32)}
        self.tensors = {k: v.to(device).requires_grad_(True) for k, v in self.tensors.items()}

    def maps(self, tensors: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``F [n_maps, d_clip, d_model]`` (differentiable in the tensors)."""
        import torch

        t = self.tensors if tensors is None else tensors
        if self.parametrisation == "penalty":
            return t["weight"]
        q = _orthonormal_columns(t["weight"])
        if self.side == "coisometry":
            q = q.mT
        return torch.exp(t["log_scale"])[:, None, None] * q

    def penalty(self, maps: torch.Tensor) -> torch.Tensor:
        """``Σ_maps ‖G − I‖_F`` with ``G = FᵀF`` (isometry) or ``FFᵀ`` (co-isometry); unsquared, k = 1."""
        import torch

        gram = maps.mT @ maps if self.side == "isometry" else maps @ maps.mT
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        return torch.linalg.matrix_norm(gram - eye).sum()

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.tensors.items()}

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        import torch

        with torch.no_grad():
            for k, v in self.tensors.items():
                if tuple(state[k].shape) != tuple(v.shape):
                    raise InputError(f"checkpoint tensor {k} has shape {tuple(state[k].shape)}, "
                                     f"expected {tuple(v.shape)}")
                v.copy_(state[k])

    def optimizer(self, config: AlignConfig) -> torch.optim.Optimizer:
        import torch

        groups: list[dict[str, Any]] = [{"params": [self.tensors["weight"]], "weight_decay": config.weight_decay}]
        if "log_scale" in self.tensors:
            groups.append({"params": [self.tensors["log_scale"]], "weight_decay": 0.0})
        return torch.optim.AdamW(groups, lr=config.lr)


# ---------------------------------------------------------------- data
def _batches(source: BatchSource, n_components: int, d_model: int, d_clip: int,
             device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
    """Validated ``(values [b, comp, d_model] float32, targets [b, d_clip] float32, rows [b])``."""
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


class _ValStats:
    """Running sums over validation rows: cosine, and ``⟨ŷ, y⟩``, ``‖ŷ‖²`` for the scale fit."""

    def __init__(self) -> None:
        self.n = 0
        self.cos = 0.0
        self.dot = 0.0
        self.sq = 0.0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        import torch

        p, y = pred.to(torch.float64), target.to(torch.float64)
        self.n += int(p.shape[0])
        self.cos += float(torch.nn.functional.cosine_similarity(p, y, dim=-1, eps=1e-12).sum())
        self.dot += float((p * y).sum())
        self.sq += float((p * p).sum())

    @property
    def mean_cosine(self) -> float:
        return self.cos / self.n if self.n else float("nan")

    @property
    def lsq_scale(self) -> float:
        return self.dot / self.sq if self.sq > 0 else float("nan")


# ---------------------------------------------------------------- the fitted maps
@dataclass(frozen=True, eq=False)
class CompAlign:
    """Fitted linear maps into a CLIP space.

    Attributes:
        group_maps: ``[n_maps, d_clip, d_model]``, one matrix ``F_g`` per map (scales included).
        map_index: for each component, the map it uses (``len == n_components``).
        config: how the maps were fitted.
        constraint: the Gram side kept orthogonal (``"isometry"``: ``FᵀF``, ``"coisometry"``: ``FFᵀ``).
        labels: component label strings the maps belong to (checked by :meth:`apply`), or None.
        meta: training record (history, best epoch, validation cosine, fitted scale).
    """

    group_maps: torch.Tensor
    map_index: tuple[int, ...]
    config: AlignConfig
    constraint: Side = "isometry"
    labels: tuple[str, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.group_maps.dim() != 3:
            raise InputError(f"group_maps must be [n_maps, d_clip, d_model], got {tuple(self.group_maps.shape)}")
        if not self.map_index or min(self.map_index) < 0 or max(self.map_index) >= self.group_maps.shape[0]:
            raise InputError("map_index must name a map for every component")
        if self.labels is not None and len(self.labels) != len(self.map_index):
            raise InputError(f"{len(self.labels)} labels for {len(self.map_index)} components")

    # ------------------------------------------------------------ shape
    @property
    def n_components(self) -> int:
        return len(self.map_index)

    @property
    def n_maps(self) -> int:
        return int(self.group_maps.shape[0])

    @property
    def d_clip(self) -> int:
        return int(self.group_maps.shape[1])

    @property
    def d_model(self) -> int:
        return int(self.group_maps.shape[2])

    @property
    def is_identity(self) -> bool:
        return bool(self.meta.get("identity", False))

    @property
    def maps(self) -> torch.Tensor:
        """Per-component maps, materialised: ``[comp, d_clip, d_model]``."""
        import torch

        idx = torch.as_tensor(self.map_index, dtype=torch.long, device=self.group_maps.device)
        return self.group_maps.index_select(0, idx)

    def _index_tensor(self, device: torch.device) -> torch.Tensor:
        import torch

        return torch.as_tensor(self.map_index, dtype=torch.long, device=device)

    @classmethod
    def identity(cls, n_components: int, d: int, *, labels: Sequence[str] | None = None) -> CompAlign:
        """Identity maps (``f_i = I``) for a model that is its own CLIP space (docs/method.md §3)."""
        import torch

        config = AlignConfig(mode="shared", parametrisation="orthogonal", lam=0.0)
        return cls(group_maps=torch.eye(d, dtype=torch.float32)[None], map_index=(0,) * n_components,
                   config=config, constraint="isometry",
                   labels=tuple(str(s) for s in labels) if labels is not None else None, meta={"identity": True})

    # ------------------------------------------------------------ mapping
    def predict(self, values: torch.Tensor) -> torch.Tensor:
        """Mapped sum ``Σ_i F_i c_i``: ``values [batch, comp, d_model] -> [batch, d_clip]``."""
        import torch

        if values.dim() != 3 or tuple(values.shape[1:]) != (self.n_components, self.d_model):
            raise InputError(f"values must be [batch, {self.n_components}, {self.d_model}], got {tuple(values.shape)}")
        dtype = torch.promote_types(values.dtype, torch.float32)
        maps = self.group_maps.to(device=values.device, dtype=dtype)
        per_component = self.n_maps == self.n_components and self.map_index == tuple(range(self.n_components))
        grouped = _group_sum(values.to(dtype), self._index_tensor(values.device), self.n_maps, per_component)
        return torch.einsum("bgm,gkm->bk", grouped, maps)

    def apply(self, stack: ComponentStack) -> ComponentStack:
        """Map every component into CLIP space: ``a_i = F_i c_i`` (per token for token stacks).

        Returns a stack with ``space="clip"``, values ``[comp, batch, (token,) d_clip]``, the
        same labels, ``reference = Σ_i a_i`` (so ``error()`` is rounding only) and
        ``meta["alignment"]`` describing the maps. The identity alignment returns the stack
        unchanged (values and reference), only relabelled ``space="clip"``.

        Raises:
            InputError: the stack's component count, labels or dimension do not match.
        """
        import torch

        if stack.n_components != self.n_components or stack.dim != self.d_model:
            raise InputError(
                f"stack has {stack.n_components} components of dim {stack.dim}; these maps expect "
                f"{self.n_components} of dim {self.d_model}")
        if self.labels is not None and tuple(stack.names) != self.labels:
            raise InputError("stack labels differ from the labels the maps were fitted for")
        meta = {**stack.meta, "alignment": self.describe()}
        if self.is_identity:
            return replace(stack, space="clip", meta=meta)
        values = stack.values
        dtype = torch.promote_types(values.dtype, torch.float32)
        maps = self.group_maps.to(device=values.device, dtype=dtype)
        if self.n_maps == 1:
            mapped = values.to(dtype) @ maps[0].T
        else:
            per = maps.index_select(0, self._index_tensor(values.device))  # [comp, d_clip, d_model]
            flat = values.to(dtype).reshape(values.shape[0], -1, values.shape[-1])  # [comp, batch*tok, d]
            mapped = (flat @ per.mT).reshape(*values.shape[:-1], self.d_clip)
        total = mapped.to(torch.float64).sum(0)
        if stack.has_tokens:
            total = total.sum(1)
        return replace(stack, values=mapped, reference=total.to(dtype), space="clip", meta=meta, scale=None)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary recorded in aligned stacks' ``meta["alignment"]``."""
        return {
            "identity": self.is_identity,
            "mode": self.config.mode,
            "parametrisation": self.config.parametrisation,
            "constraint": self.constraint,
            "lam": self.config.lam,
            "n_maps": self.n_maps,
            "d_model": self.d_model,
            "d_clip": self.d_clip,
            "val_cosine": self.meta.get("val_cosine"),
        }

    # ------------------------------------------------------------ metrics
    def defects(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per map: ``(defect [n_maps], scale [n_maps])``, see :func:`orthogonality_defect`."""
        return orthogonality_defect(self.group_maps, self.constraint)

    def metrics(self, batches: BatchSource, *, split: Literal["all", "val", "train"] = "all") -> dict[str, Any]:
        """Held-out quality of the maps (docs/method.md §3 metrics (a), (c), (e)).

        Args:
            batches: like :func:`fit_compalign`'s (``values [batch, comp, d_model]``,
                ``clip_targets [batch, d_clip]``, optional ``rows``).
            split: ``"all"`` rows (pass held-out data), or only the ``"val"`` / ``"train"`` rows of
                the fit's split (same seed and fraction).

        Returns:
            ``cosine`` (mean ``cos(Σ_i a_i, y)``), ``cosine_distance`` (1 − cosine), ``n`` rows,
            ``lsq_scale`` (``Σ⟨ŷ,y⟩/Σ‖ŷ‖²``; ≈1 for calibrated maps), per map ``defect``
            (``‖G/ŝ² − I‖_F/√d``) and ``scale`` (``ŝ``), ``defect_max``, per component
            ``energy_retained`` (``Σ‖F_i c_i‖² / (ŝ_i² Σ‖c_i‖²)``: 1 for an isometry, the share of
            the component's energy in the kept subspace for a co-isometry), ``constraint``, ``split``.
        """
        import torch

        stats = _ValStats()
        dev = self.group_maps.device
        maps = self.maps.to(torch.float32)
        defect, scale = self.defects()
        comp_scale2 = (scale.to(torch.float64) ** 2).index_select(0, self._index_tensor(scale.device))
        mapped_sq = torch.zeros(self.n_components, dtype=torch.float64)
        raw_sq = torch.zeros(self.n_components, dtype=torch.float64)
        with torch.no_grad():
            for values, targets, rows in _batches(batches, self.n_components, self.d_model, self.d_clip, dev):
                if split != "all":
                    val = validation_mask(rows, self.config.seed, self.config.val_fraction)
                    keep = torch.as_tensor(val if split == "val" else ~val, device=dev)
                    values, targets = values[keep], targets[keep]
                if values.shape[0] == 0:
                    continue
                per = torch.einsum("bcm,ckm->bck", values, maps)  # [batch, comp, d_clip]
                stats.update(per.sum(1), targets)
                mapped_sq += (per.to(torch.float64) ** 2).sum((0, 2)).cpu()
                raw_sq += (values.to(torch.float64) ** 2).sum((0, 2)).cpu()
        retained = mapped_sq / (comp_scale2.cpu() * raw_sq).clamp_min(torch.finfo(torch.float64).tiny)
        return {
            "cosine": stats.mean_cosine,
            "cosine_distance": 1.0 - stats.mean_cosine,
            "n": stats.n,
            "lsq_scale": stats.lsq_scale,
            "defect": defect.tolist(),
            "defect_max": float(defect.max()),
            "scale": scale.tolist(),
            "energy_retained": retained.tolist(),
            "constraint": self.constraint,
            "split": split,
        }

    # ------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write ``group_maps`` and ``map_index`` to a ``.safetensors`` file; config, constraint,
        labels and meta go into its JSON metadata header."""
        import torch
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {
            "format": FORMAT,
            "config": json.dumps(self.config.to_json()),
            "constraint": self.constraint,
            "labels": json.dumps(list(self.labels) if self.labels is not None else None),
            "meta": json.dumps(self.meta, default=str),
        }
        tensors = {
            "group_maps": self.group_maps.detach().contiguous().cpu(),
            "map_index": torch.as_tensor(self.map_index, dtype=torch.int64),
        }
        save_file(tensors, str(path), metadata=header)
        return path

    @classmethod
    def load(cls, path: str | Path) -> CompAlign:
        """Read maps written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise InputError(f"no alignment file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                group_maps = f.get_tensor("group_maps")
                map_index = f.get_tensor("map_index")
        except Exception as exc:  # safetensors raises its own error types
            raise InputError(f"{path} is not a readable alignment file: {exc}") from exc
        if header.get("format") != FORMAT:
            raise InputError(f"{path} is a safetensors file but not a vitdecomp CompAlign")
        labels = json.loads(header.get("labels", "null"))
        return cls(
            group_maps=group_maps,
            map_index=tuple(int(i) for i in map_index.tolist()),
            config=AlignConfig.from_json(json.loads(header["config"])),
            constraint=header.get("constraint", "isometry"),  # type: ignore[arg-type]
            labels=tuple(labels) if labels is not None else None,
            meta=json.loads(header.get("meta", "{}")),
        )

    def __repr__(self) -> str:
        return (f"CompAlign({self.n_components} components -> {self.n_maps} maps "
                f"[{self.d_clip}x{self.d_model}], {self.config.parametrisation}, {self.constraint}, "
                f"val cosine={self.meta.get('val_cosine')})")


# ---------------------------------------------------------------- fitting
def _atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def fit_compalign(
    batches: BatchSource,
    n_components: int,
    d_model: int,
    d_clip: int,
    config: AlignConfig | None = None,
    *,
    checkpoint: Path | str | None = None,
    labels: Sequence[str] | None = None,
    device: str | None = None,
) -> CompAlign:
    """Fit CompAlign maps on streamed ``(components, CLIP embedding)`` pairs.

    Args:
        batches: called once per pass, returns an iterable of ``(values [batch, comp, d_model],
            clip_targets [batch, d_clip])`` or ``(values, clip_targets, rows [batch])``; every call
            must yield the same rows (in any order when ``rows`` are given).
        n_components, d_model, d_clip: shapes.
        config: objective, sharing and optimisation (default :class:`AlignConfig`).
        checkpoint: file for the training state, written atomically after every epoch; if it
            exists, training resumes from it (same config and shapes required).
        labels: component label strings, recorded so :meth:`CompAlign.apply` can check stacks.
        device: torch device to train on (default CPU); the result lives on CPU.

    Returns:
        The best (highest mean validation cosine) maps, with the training record in ``meta``.

    Raises:
        AlignmentInfeasibleError: the orthogonality constraint cannot hold (see the module docs).
        InputError: bad shapes or groups, no validation rows, or a checkpoint of another run.
    """
    import torch

    config = config or AlignConfig()
    side = resolve_constraint(config, d_model, d_clip)
    map_index = _map_index(config, n_components)
    n_maps = max(map_index) + 1
    if labels is not None and len(labels) != n_components:
        raise InputError(f"{len(labels)} labels for {n_components} components")
    dev = torch.device(device or "cpu")
    params = _Params(config, side, n_maps, d_model, d_clip, dev)
    opt = params.optimizer(config)
    index_t = torch.as_tensor(map_index, dtype=torch.long, device=dev)
    per_component = config.mode == "per_component"
    penalised = config.parametrisation == "penalty" and config.lam > 0
    identity_key = {"config": config.to_json(), "dims": [n_components, d_model, d_clip],
                    "labels": list(labels) if labels is not None else None}

    state: dict[str, Any] = {"next_epoch": 0, "stopped": False, "best": None, "best_cosine": -math.inf,
                             "best_epoch": -1, "history": [], "train_loss": []}
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    if ckpt_path is not None and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=dev, weights_only=True)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise InputError(f"{ckpt_path} is not a CompAlign checkpoint")
        if ckpt["key"] != identity_key:
            diff = [k for k in identity_key if ckpt["key"].get(k) != identity_key[k]]
            raise InputError(f"checkpoint {ckpt_path} belongs to another run (differs in {diff}); "
                             "delete it or choose another checkpoint path")
        params.load(ckpt["params"])
        opt.load_state_dict(ckpt["optimizer"])
        state = ckpt["state"]
        log.info("CompAlign: resuming from %s at epoch %d", ckpt_path, state["next_epoch"])

    def record(epochs_trained: int, stats: _ValStats, snap: dict[str, torch.Tensor]) -> None:
        if stats.n == 0:
            raise InputError("no validation rows: use more data or a larger val_fraction")
        cos = stats.mean_cosine
        if not math.isfinite(cos):
            raise InputError(f"validation cosine is {cos} after {epochs_trained} epochs: non-finite components "
                             "or targets, or a learning rate that diverged")
        state["history"].append({"epochs_trained": epochs_trained, "val_cosine": cos, "val_rows": stats.n,
                                 "lsq_scale": stats.lsq_scale})
        if cos > state["best_cosine"]:
            state.update(best=snap, best_cosine=cos, best_epoch=epochs_trained)

    def run_pass(train: bool) -> tuple[_ValStats, dict[str, torch.Tensor], float, int]:
        """One pass: evaluate the state at the start on validation rows; train on the others."""
        snap = params.snapshot()
        with torch.no_grad():
            snap_maps = params.maps(snap)
        stats = _ValStats()
        buf_x: list[torch.Tensor] = []
        buf_y: list[torch.Tensor] = []
        n_buf, loss_sum, steps = 0, 0.0, 0

        def step(x: torch.Tensor, y: torch.Tensor) -> float:
            opt.zero_grad(set_to_none=True)
            maps = params.maps()
            pred = torch.einsum("bgm,gkm->bk", x, maps)
            loss = (1.0 - torch.nn.functional.cosine_similarity(pred, y, dim=-1, eps=1e-8)).mean()
            if penalised:
                loss = loss + config.lam * params.penalty(maps)
            loss.backward()
            opt.step()
            return float(loss.detach())

        for values, targets, rows in _batches(batches, n_components, d_model, d_clip, dev):
            val = torch.as_tensor(validation_mask(rows, config.seed, config.val_fraction), device=dev)
            grouped = _group_sum(values, index_t, n_maps, per_component)
            if bool(val.any()):
                with torch.no_grad():
                    stats.update(torch.einsum("bgm,gkm->bk", grouped[val], snap_maps), targets[val])
            if not train or bool(val.all()):
                continue
            buf_x.append(grouped[~val])
            buf_y.append(targets[~val])
            n_buf += int(buf_x[-1].shape[0])
            while n_buf >= config.batch_size:
                x, y = torch.cat(buf_x), torch.cat(buf_y)
                loss_sum += step(x[: config.batch_size], y[: config.batch_size])
                steps += 1
                buf_x, buf_y = [x[config.batch_size:]], [y[config.batch_size:]]
                n_buf -= config.batch_size
        if train and n_buf:
            loss_sum += step(torch.cat(buf_x), torch.cat(buf_y))
            steps += 1
        return stats, snap, loss_sum / max(steps, 1), steps

    for epoch in range(int(state["next_epoch"]), config.epochs):
        if state["stopped"]:
            break
        stats, snap, train_loss, steps = run_pass(train=True)
        if steps == 0:
            raise InputError("no training rows: every row fell into the validation split")
        record(epoch, stats, snap)
        state["train_loss"].append(train_loss)
        state["next_epoch"] = epoch + 1
        log.info("CompAlign epoch %d/%d: train loss %.5g (%d steps); val cosine after %d epochs %.6f",
                 epoch + 1, config.epochs, train_loss, steps, epoch, stats.mean_cosine)
        if config.patience is not None and epoch - state["best_epoch"] >= config.patience:
            state["stopped"] = True
            log.info("CompAlign: early stop, best val cosine %.6f after %d epochs",
                     state["best_cosine"], state["best_epoch"])
        if ckpt_path is not None:
            _atomic_torch_save({"format": CHECKPOINT_FORMAT, "key": identity_key, "params": params.snapshot(),
                                "optimizer": opt.state_dict(), "state": state}, ckpt_path)
    if not state["stopped"]:  # evaluate the last state (no training)
        stats, snap, _, _ = run_pass(train=False)
        record(config.epochs, stats, snap)
        log.info("CompAlign: val cosine after %d epochs %.6f", config.epochs, stats.mean_cosine)

    best = state["best"]
    params.load(best)
    best_entry = next(h for h in state["history"] if h["epochs_trained"] == state["best_epoch"])
    calibration = 1.0
    if config.parametrisation == "orthogonal":
        alpha = best_entry["lsq_scale"]
        if alpha > 0 and math.isfinite(alpha):
            calibration = float(alpha)
            with torch.no_grad():
                params.tensors["log_scale"] += math.log(alpha)
        else:
            log.warning("CompAlign: least-squares scale %.3g is not positive; scales left uncalibrated", alpha)
    with torch.no_grad():
        group_maps = params.maps().detach().to("cpu", torch.float32).contiguous()
    meta = {
        "val_cosine": state["best_cosine"],
        "best_epoch": state["best_epoch"],
        "stopped_early": bool(state["stopped"]),
        "scale_calibration": calibration,
        "history": state["history"],
        "train_loss": state["train_loss"],
    }
    return CompAlign(group_maps=group_maps, map_index=tuple(map_index), config=config, constraint=side,
                     labels=tuple(str(s) for s in labels) if labels is not None else None, meta=meta)


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

    from ..store.component_store import ComponentStore

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
