"""ComponentStack: the labelled, exact decomposition every analysis takes and returns.

A stack holds, for a batch of images, one row per component::

    values     Tensor [comp, batch, d]           (or [comp, batch, token, d] for token stacks)
    labels     tuple[ComponentLabel, ...]        one per row of ``values``
    reference  Tensor [batch, d]                 the model's own representation

and the identity it is built to satisfy,

    sum_comp (sum_token) values  ==  reference   (fp32: rel. error <= 1e-5, fp64: <= 1e-10).

``error()`` measures how far that holds (max over images of ||total - reference|| / scale, where
the scale is ||reference|| for a stack in the model's space and ||z|| * ||U||_2 for one projected
onto directions ``U``: errors are always measured against the *unprojected* representation ``z``,
so a projection onto a direction nearly orthogonal to ``z`` cannot inflate them),
``check()`` raises :class:`~vitdecomp.errors.DecompositionError` above tolerance. Every
transformation here is linear, so it keeps the identity: ``project(directions)``
maps values and reference alike, ``group()`` sums rows, ``select(..., keep_rest=True)``
folds what it drops into one ``other`` row.

Example (tiny random model, runs offline)::

    >>> import vitdecomp as vd
    >>> from vitdecomp.testing import tiny_timm_vit
    >>> model = vd.wrap(tiny_timm_vit())
    >>> stack = vd.decompose(model, model.example_input(batch=2))
    >>> stack.error() < 1e-5
    True
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DecompositionError, InputError
from .labels import ComponentLabel, parse_label

if TYPE_CHECKING:
    import torch

__all__ = ["ComponentStack", "TokenInfo", "default_rtol", "directions_norm", "projected_scale", "relative_error", "check_error"]

log = logging.getLogger(__name__)


#: ``meta`` keys that hold one entry per image (batch position); :meth:`ComponentStack.take_items`
#: and :meth:`ComponentStack.concat` keep them aligned with the items.
PER_ITEM_META: tuple[str, ...] = ("rows", "ids", "valid", "images")


def default_rtol(dtype: torch.dtype) -> float:
    """Tolerance of the exactness check for a model run in ``dtype``."""
    import torch

    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-5
    return 1e-2  # float16 / bfloat16: the model's own rounding is ~1e-3


@dataclass(frozen=True)
class TokenInfo:
    """Where the tokens of a token stack sit.

    Attributes:
        types: per token ``"cls"``, ``"reg"`` (register / distillation) or ``"patch"``.
        grid: (rows, cols) of the patch tokens, row-major after the prefix tokens.
    """

    types: tuple[str, ...]
    grid: tuple[int, int] | None = None

    @property
    def patch_index(self) -> list[int]:
        return [i for i, t in enumerate(self.types) if t == "patch"]

    def to_json(self) -> dict[str, Any]:
        return {"types": list(self.types), "grid": list(self.grid) if self.grid else None}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> TokenInfo | None:
        if data is None:
            return None
        grid = tuple(data["grid"]) if data.get("grid") else None
        return cls(types=tuple(data["types"]), grid=grid)  # type: ignore[arg-type]


LayerSelector = int | slice | Sequence[int] | None


@dataclass(frozen=True)
class ComponentStack:
    """Labelled additive decomposition of a batch of representations.

    Attributes:
        values: ``[comp, batch, d]`` or ``[comp, batch, token, d]``.
        labels: one :class:`ComponentLabel` per component row.
        reference: ``[batch, d]``, the model's own output this stack sums to.
        space: ``"model"`` (the model's representation), ``"clip"`` (after alignment)
            or ``"projected"`` (after :meth:`project`).
        tokens: token geometry for token stacks, else None.
        meta: how the stack was made (model, granularity, modes, dtype, ...).
        scale: ``[batch]`` the size errors are measured against, or None for
            ``||reference||``. A projection sets it to ``||z|| * ||U||_2`` (``z`` the
            unprojected representation, ``U`` the directions), the largest the projected
            reference can be, so the relative error never grows under projection.
    """

    values: torch.Tensor
    labels: tuple[ComponentLabel, ...]
    reference: torch.Tensor
    space: str = "model"
    tokens: TokenInfo | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.values.shape[0] != len(self.labels):
            raise ValueError(f"{self.values.shape[0]} rows but {len(self.labels)} labels")
        if self.values.shape[1] != self.reference.shape[0] or self.values.shape[-1] != self.reference.shape[-1]:
            raise ValueError(
                f"values {tuple(self.values.shape)} do not match reference {tuple(self.reference.shape)}"
            )
        if self.has_tokens and self.tokens is not None and len(self.tokens.types) != self.values.shape[2]:
            raise ValueError("token info does not match the token axis")
        if self.scale is not None and tuple(self.scale.shape) != (self.reference.shape[0],):
            raise ValueError(f"scale has shape {tuple(self.scale.shape)}, expected ({self.reference.shape[0]},)")

    @classmethod
    def concat(cls, stacks: Sequence[ComponentStack]) -> ComponentStack:
        """Stacks of the same components over different images, joined along the batch axis.

        Labels, space, tokens and meta come from the first stack; the error scales and the
        per-item meta lists (:data:`PER_ITEM_META`) are joined with the values.
        """
        import torch

        if not stacks:
            raise ValueError("concat() needs at least one stack")
        first = stacks[0]
        if any(s.labels != first.labels for s in stacks[1:]):
            raise ValueError("concat() needs stacks with the same components")
        if len(stacks) == 1:
            return first
        scaled = any(s.scale is not None for s in stacks)
        meta = dict(first.meta)
        for key in PER_ITEM_META:  # per-item lists follow their items; dropped where a part lacks them
            parts = [s.meta.get(key) for s in stacks]
            if all(isinstance(p, list) and len(p) == s.batch_size for p, s in zip(parts, stacks)):
                meta[key] = [x for p in parts for x in p]
            else:
                meta.pop(key, None)
        return replace(
            first,
            values=torch.cat([s.values for s in stacks], dim=1),
            reference=torch.cat([s.reference for s in stacks], dim=0),
            scale=torch.cat([s.error_scale() for s in stacks]) if scaled else None,
            meta=meta,
        )

    def take_items(self, index: torch.Tensor | Sequence[int]) -> ComponentStack:
        """The images at ``index`` (batch positions), with their references, error scales and
        per-item ``meta`` lists (:data:`PER_ITEM_META`: store rows, ids, ...)."""
        import torch

        idx = torch.as_tensor(index, dtype=torch.long, device=self.values.device)
        positions = idx.tolist()
        meta = dict(self.meta)
        for key in PER_ITEM_META:
            if isinstance(meta.get(key), list) and len(meta[key]) == self.batch_size:
                meta[key] = [meta[key][i] for i in positions]
        return replace(
            self,
            values=self.values.index_select(1, idx),
            reference=self.reference.index_select(0, idx.to(self.reference.device)),
            scale=self.scale.index_select(0, idx.to(self.scale.device)) if self.scale is not None else None,
            meta=meta,
        )

    # ------------------------------------------------------------------ shape
    @property
    def has_tokens(self) -> bool:
        """True when values carry a token axis: ``[comp, batch, token, d]``."""
        return self.values.dim() == 4

    @property
    def n_components(self) -> int:
        return len(self.labels)

    @property
    def batch_size(self) -> int:
        return int(self.values.shape[1])

    @property
    def dim(self) -> int:
        return int(self.values.shape[-1])

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def names(self) -> list[str]:
        """Canonical label strings, one per row."""
        return [str(label) for label in self.labels]

    def index(self, label: str | ComponentLabel) -> int:
        """Row index of a label (given as object or canonical string)."""
        key = str(parse_label(label)) if isinstance(label, str) else str(label)
        try:
            return self._name_index[key]
        except KeyError:
            raise KeyError(f"no component {label!s} in this stack") from None

    @property
    def _name_index(self) -> dict[str, int]:
        cache = self.__dict__.get("_names_cache")
        if cache is None:
            cache = {name: i for i, name in enumerate(self.names)}
            object.__setattr__(self, "_names_cache", cache)
        return cache

    def __getitem__(self, label: str | ComponentLabel) -> torch.Tensor:
        """Values of one component: ``[batch, (token,) d]``."""
        return self.values[self.index(label)]

    # -------------------------------------------------------------- exactness
    def total(self) -> torch.Tensor:
        """Sum over components (and tokens), accumulated in float64: ``[batch, d]``."""
        import torch

        total = torch.zeros(self.reference.shape, dtype=torch.float64, device=self.values.device)
        row = max(1, self.values[0].numel()) if len(self.values) else 1
        for chunk in self.values.split(max(1, 2**20 // row)):  # bounded memory: <= 8 MiB of float64 at a time
            part = chunk.to(torch.float64).sum(dim=0)
            total += part.sum(dim=1) if self.has_tokens else part
        return total

    def error(self) -> float:
        """Max over images of ``||total - reference||_2 / scale`` (``scale``: see the class)."""
        return relative_error(self.total(), self.reference, self.scale)

    def error_scale(self) -> torch.Tensor:
        """``[batch]`` float64: the size errors are measured against (``||reference||`` unless projected)."""
        import torch

        if self.scale is not None:
            return self.scale.to(torch.float64)
        return self.reference.to(torch.float64).norm(dim=-1)

    def check(self, rtol: float | None = None) -> ComponentStack:
        """Raise :class:`DecompositionError` if ``error() > rtol``; return self otherwise.

        Args:
            rtol: tolerance; defaults to the one recorded when the stack was made
                (1e-5 for fp32, 1e-10 for fp64).
        """
        rtol = rtol if rtol is not None else float(self.meta.get("rtol", 1e-5))
        check_error(self.error(), rtol, self.meta.get("model", "?"))
        return self

    # ------------------------------------------------------------- selection
    def _mask(
        self,
        kind: str | Sequence[str] | None,
        layer: LayerSelector,
        head: int | Sequence[int] | None,
    ) -> list[bool]:
        kinds = {kind} if isinstance(kind, str) else set(kind) if kind is not None else None
        n_layers = self.meta.get("n_layers")
        layers: set[int] | None = None
        if layer is not None:
            if n_layers is None:
                n_layers = 1 + max((lab.layer for lab in self.labels if lab.layer is not None), default=-1)
            all_layers = list(range(int(n_layers)))
            if isinstance(layer, slice):
                layers = set(all_layers[layer])
            elif isinstance(layer, int):
                layers = {all_layers[layer]}
            else:
                layers = {all_layers[i] for i in layer}
        heads = {head} if isinstance(head, int) else set(head) if head is not None else None
        out = []
        for lab in self.labels:
            ok = kinds is None or lab.kind in kinds
            ok = ok and (layers is None or lab.layer in layers)
            ok = ok and (heads is None or lab.head in heads)
            out.append(ok)
        return out

    def select(
        self,
        kind: str | Sequence[str] | None = None,
        layer: LayerSelector = None,
        head: int | Sequence[int] | None = None,
        *,
        keep_rest: bool = False,
    ) -> ComponentStack:
        """Rows matching every given filter.

        Args:
            kind: label kind(s), e.g. ``"head"`` or ``("head", "mlp")``.
            layer: block index, slice or list; negatives count from the end.
            head: head index or list.
            keep_rest: add one ``other`` row holding the sum of every dropped row, so
                the result still sums to the reference.
        """
        mask = self._mask(kind, layer, head)
        return self._take([i for i, m in enumerate(mask) if m], keep_rest=keep_rest)

    def take(self, labels: Sequence[str | ComponentLabel], *, keep_rest: bool = False) -> ComponentStack:
        """Rows with the given labels, in the given order."""
        return self._take([self.index(lab) for lab in labels], keep_rest=keep_rest)

    def _take(self, rows: list[int], *, keep_rest: bool) -> ComponentStack:
        import torch

        idx = torch.as_tensor(rows, dtype=torch.long, device=self.values.device)
        values = self.values.index_select(0, idx)
        labels = tuple(self.labels[i] for i in rows)
        if keep_rest:
            dropped = sorted(set(range(len(self.labels))) - set(rows))
            if dropped:
                drop_idx = torch.as_tensor(dropped, dtype=torch.long, device=self.values.device)
                rest = self.values.index_select(0, drop_idx).sum(0, keepdim=True)
            else:
                rest = torch.zeros_like(self.values[:1])
            values = torch.cat([values, rest])
            labels = labels + (ComponentLabel("other"),)
        return replace(self, values=values, labels=labels)

    def group(self, by: str | Callable[[ComponentLabel], ComponentLabel] = "layer") -> ComponentStack:
        """Sum rows that share a key; totals are unchanged.

        Args:
            by: ``"layer"`` (one row per block: ``L07``), ``"attn_mlp"`` (heads and
                attention bias -> ``L07.attn``, neurons and MLP bias -> ``L07.mlp``; a conv
                layer's bias stays with its ``conv``), or a function mapping a label to its
                group label.
        """
        import torch

        if isinstance(by, str) and by not in _GROUPERS:
            raise ValueError(f"unknown grouping {by!r}; use one of {sorted(_GROUPERS)} or a function")
        key = _GROUPERS[by] if isinstance(by, str) else by
        if by == "attn_mlp":
            # a conv layer's bias row (MaxViT shortcut bias) belongs to the conv, not to attention
            conv_layers = {(lab.layer, lab.stage, lab.block) for lab in self.labels if lab.kind == "conv"}

            def key(lab: ComponentLabel) -> ComponentLabel:
                if lab.kind == "bias" and (lab.layer, lab.stage, lab.block) in conv_layers:
                    return ComponentLabel("conv", lab.layer, stage=lab.stage, block=lab.block)
                return _by_attn_mlp(lab)
        order: dict[ComponentLabel, list[int]] = {}
        for i, lab in enumerate(self.labels):
            order.setdefault(key(lab), []).append(i)
        rows = []
        for members in order.values():
            idx = torch.as_tensor(members, dtype=torch.long, device=self.values.device)
            rows.append(self.values.index_select(0, idx).sum(0))
        return replace(self, values=torch.stack(rows), labels=tuple(order))

    def sum_tokens(self) -> ComponentStack:
        """Collapse the token axis: ``[comp, batch, token, d] -> [comp, batch, d]``."""
        if not self.has_tokens:
            return self
        return replace(self, values=self.values.sum(dim=2), tokens=None)

    def flatten_tokens(self) -> ComponentStack:
        """One row per (component, token): labels gain ``.tNNN``; ``[comp*token, batch, d]``."""
        if not self.has_tokens:
            return self
        c, b, t, d = self.values.shape
        values = self.values.permute(0, 2, 1, 3).reshape(c * t, b, d)
        labels = tuple(lab.with_token(j) for lab in self.labels for j in range(t))
        return replace(self, values=values, labels=labels, tokens=None)

    # ------------------------------------------------------------ projection
    def project(self, directions: torch.Tensor) -> ComponentStack:
        """Contributions to ``k`` directions: ``[comp, batch, (token,) k]``.

        Args:
            directions: ``[k, d]`` rows (class weights, unit text embeddings).

        The reference is projected too, so the result still sums to it; for a
        classifier ``stack.project(W).total() + b`` are the logits. The error scale becomes
        ``scale * ||directions||_2`` (spectral norm): a projection can shrink the error but
        never the yardstick below what the projected error can reach.
        """
        if directions.dim() == 1:
            directions = directions[None]
        if directions.shape[-1] != self.dim:
            raise InputError(f"directions have dim {directions.shape[-1]}, the stack has {self.dim}")
        dirs = directions.to(device=self.values.device, dtype=self.values.dtype)
        values = self.values @ dirs.T
        reference = self.reference @ directions.to(self.reference.device, self.reference.dtype).T
        scale = self.error_scale() * directions_norm(directions)
        return replace(self, values=values, reference=reference, space="projected", scale=scale)

    def token_shares(self) -> dict[str, torch.Tensor]:
        """Mass share of each token type in every component (docs/method.md §2.3).

        For type ``T`` (``"cls"``, ``"reg"``, ``"patch"``) and component ``i``,
        ``||sum_{t in T} c_{i,t}|| / ||sum_t c_{i,t}||`` per image: ``{type: [comp, batch]}``.
        Registers can carry a head's global information, so a heatmap over patches alone
        can mislead where the register share is large.
        """
        import torch

        if not self.has_tokens or self.tokens is None:
            raise ValueError("token_shares() needs a token stack (granularity='head_token')")
        total = self.values.sum(2).norm(dim=-1).clamp_min(torch.finfo(self.values.dtype).tiny)
        shares = {}
        for kind in dict.fromkeys(self.tokens.types):
            idx = [i for i, t in enumerate(self.tokens.types) if t == kind]
            part = self.values[:, :, idx].sum(2).norm(dim=-1)
            shares[kind] = part / total
        return shares

    def norms(self) -> torch.Tensor:
        """L2 norm of every component per image: ``[comp, batch]`` (tokens summed first)."""
        return self.sum_tokens().values.norm(dim=-1)

    def to(self, *args: Any, **kwargs: Any) -> ComponentStack:
        """``Tensor.to`` applied to values and reference."""
        scale = self.scale.to(self.reference.to(*args, **kwargs).device) if self.scale is not None else None
        return replace(self, values=self.values.to(*args, **kwargs), reference=self.reference.to(*args, **kwargs),
                       scale=scale)

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write to a ``.safetensors`` file (tensors + labels/meta as JSON metadata)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {
            "format": "vitdecomp.ComponentStack/1",
            "labels": json.dumps(self.names),
            "space": self.space,
            "tokens": json.dumps(self.tokens.to_json() if self.tokens else None),
            "meta": json.dumps(self.meta, default=str),
        }
        tensors = {
            "values": self.values.detach().contiguous().cpu(),
            "reference": self.reference.detach().contiguous().cpu(),
        }
        if self.scale is not None:
            tensors["scale"] = self.scale.detach().contiguous().cpu()
        save_file(tensors, str(path), metadata=header)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ComponentStack:
        """Read a stack written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise InputError(f"no stack file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                values = f.get_tensor("values")
                reference = f.get_tensor("reference")
                scale = f.get_tensor("scale") if "scale" in f.keys() else None
        except Exception as exc:  # safetensors raises its own error types
            raise InputError(f"{path} is not a readable stack file: {exc}") from exc
        if header.get("format") != "vitdecomp.ComponentStack/1":
            raise InputError(f"{path} is a safetensors file but not a vitdecomp ComponentStack")
        return cls(
            values=values,
            reference=reference,
            labels=tuple(parse_label(s) for s in json.loads(header["labels"])),
            space=header.get("space", "model"),
            tokens=TokenInfo.from_json(json.loads(header.get("tokens", "null"))),
            meta=json.loads(header.get("meta", "{}")),
            scale=scale,
        )

    def __repr__(self) -> str:
        return (
            f"ComponentStack({len(self.labels)} components, values={tuple(self.values.shape)}, "
            f"space={self.space!r}, error={self.error():.2e})"
        )


def _by_layer(lab: ComponentLabel) -> ComponentLabel:
    if lab.layer is None:
        return replace(lab, token=None)
    return ComponentLabel("block", lab.layer, stage=lab.stage)


def _by_attn_mlp(lab: ComponentLabel) -> ComponentLabel:
    if lab.kind in ("head", "bias", "attn"):
        return ComponentLabel("attn", lab.layer, stage=lab.stage, block=lab.block)
    if lab.kind in ("neuron", "mlp_bias", "mlp"):
        return ComponentLabel("mlp", lab.layer, stage=lab.stage, block=lab.block)
    return replace(lab, token=None)


_GROUPERS: dict[str, Callable[[ComponentLabel], ComponentLabel]] = {
    "layer": _by_layer,
    "attn_mlp": _by_attn_mlp,
}


def directions_norm(directions: torch.Tensor) -> torch.Tensor:
    """Spectral norm ``||U||_2`` of ``[k, d]`` directions (a 0-d float64 tensor).

    For any error vector ``e``, ``||U e|| <= ||U||_2 ||e||``: the factor by which a projection
    can grow an error, and so the factor the error scale grows by (for one direction ``u``,
    ``||u||``; for orthonormal rows, 1).
    """
    import torch

    u = directions.detach().to(torch.float64)
    if u.dim() == 1:
        u = u[None]
    if u.shape[0] == 1:
        return u[0].norm()
    return torch.linalg.matrix_norm(u.cpu(), ord=2).to(u.device)


def projected_scale(
    reference: torch.Tensor, directions: torch.Tensor | None, norm: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Error scale of a stack projected at decomposition time: ``||z|| * ||U||_2 / norm``.

    Args:
        reference: the *unprojected* representation ``z`` ``[batch, d]``.
        directions: ``[k, d]`` or None (no projection: returns None, i.e. ``||reference||``).
        norm: ``[batch]`` divisor applied to every row (``normalize=True``), or None.
    """
    if directions is None:
        return None
    import torch

    scale = reference.detach().to(torch.float64).norm(dim=-1) * directions_norm(directions).to(reference.device)
    if norm is not None:
        scale = scale / norm.to(torch.float64)
    return scale


def relative_error(total: torch.Tensor, reference: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """Max over images of ``||total - reference||_2 / scale`` (float64; 0 for no images).

    Args:
        total: summed components ``[batch, d]``; reference: the model's output ``[batch, d]``.
        scale: ``[batch]`` yardstick; default ``||reference||_2``. For a stack projected onto
            directions ``U`` pass ``||z|| * ||U||_2`` (``z`` unprojected): otherwise a direction
            nearly orthogonal to ``z`` divides a rounding-level error by a near-zero size.
    """
    import torch

    ref = reference.to(torch.float64)
    diff = (total.to(torch.float64) - ref).norm(dim=-1)
    if scale is None:
        scale = ref.norm(dim=-1)
    scale = scale.to(device=diff.device, dtype=torch.float64).clamp_min(torch.finfo(torch.float64).tiny)
    return float((diff / scale).max()) if ref.shape[0] else 0.0


def check_error(err: float, rtol: float, model: str) -> None:
    """Raise :class:`DecompositionError` when ``err > rtol`` (or NaN)."""
    if not err <= rtol:  # also catches NaN
        raise DecompositionError(
            f"components sum to the reference only to relative error {err:.3g} "
            f"(tolerance {rtol:.1g}); model {model}. "
            "This is a bug or an unsupported module: please report it with the model name."
        )
