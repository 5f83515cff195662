"""Fitted CompAlign maps (docs/method.md §3): :class:`CompAlign` (map, save, load, metrics) and the maths
they are judged by.

``F_i ∈ ℝ^{d_clip × d_model}`` maps component ``i``: ``a_i = F_i c_i``; the mapped sum ``Σ_i a_i``
should point like the CLIP image embedding ``y``. :func:`orthogonality_defect` is the scale-free
distance ``‖G/ŝ² − I‖_F / √d`` of a map from a scaled (co-)isometry (``G = FᵀF`` or ``FFᵀ``,
``ŝ² = tr G / d``), and :class:`CosineStats` the running mean cosine and least-squares scale
``Σ⟨ŷ, y⟩ / Σ‖ŷ‖²`` over held-out rows.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ...errors import InputError
from .config import AlignConfig, Side
from .data import BatchSource, checked_batches, validation_mask

if TYPE_CHECKING:
    import torch

    from ...core.stack import ComponentStack

__all__ = ["ALIGN_FILE", "FORMAT", "CompAlign", "CosineStats", "find_alignment", "group_sum",
           "orthogonality_defect"]

FORMAT = "vitdecomp.CompAlign/1"

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


def group_sum(values: torch.Tensor, map_index: torch.Tensor, n_maps: int, identity: bool) -> torch.Tensor:
    """``[batch, comp, d] -> [batch, n_maps, d]``: ``Σ_{i: map(i) = g} c_i`` per map ``g`` (``map_index [comp]``;
    ``identity``: one map per component, returned as is). Since the maps are linear,
    ``Σ_i F_{map(i)} c_i = Σ_g F_g (Σ_{i∈g} c_i)``."""
    if identity:
        return values
    if n_maps == 1:
        return values.sum(1, keepdim=True)
    out = values.new_zeros(values.shape[0], n_maps, values.shape[-1])
    return out.index_add_(1, map_index, values)


class CosineStats:
    """Running sums over held-out rows: ``Σ cos(ŷ, y)``, ``Σ⟨ŷ, y⟩`` and ``Σ‖ŷ‖²`` (float64), so that
    :attr:`mean_cosine` is the mean cosine and :attr:`lsq_scale` ``= Σ⟨ŷ, y⟩ / Σ‖ŷ‖²`` the least-squares
    factor ``α`` minimising ``Σ‖αŷ − y‖²``; ``pred`` and ``target`` are ``[batch, d_clip]``."""

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
        grouped = group_sum(values.to(dtype), self._index_tensor(values.device), self.n_maps, per_component)
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

        stats = CosineStats()
        dev = self.group_maps.device
        maps = self.maps.to(torch.float32)
        defect, scale = self.defects()
        comp_scale2 = (scale.to(torch.float64) ** 2).index_select(0, self._index_tensor(scale.device))
        mapped_sq = torch.zeros(self.n_components, dtype=torch.float64)
        raw_sq = torch.zeros(self.n_components, dtype=torch.float64)
        with torch.no_grad():
            for values, targets, rows in checked_batches(batches, self.n_components, self.d_model, self.d_clip, dev):
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
