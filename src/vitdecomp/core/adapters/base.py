"""What an adapter tells the decomposition engine about a stock model.

An adapter never re-implements a model. It reads the native modules and weights of one
family (timm, open_clip, transformers) and returns a :class:`ViTMap`: which modules to
hook, how to turn what the hooks see into per-head queries, keys and values, the per-head
output blocks ``W_O^h``, layer scales, and the readout (:class:`~vitdecomp.core.readout.ViTReadout`).
The representation itself is always computed by the stock module's own forward.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from ...errors import InputError, UnsupportedModelError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..readout import ViTReadout

__all__ = [
    "CapturePoint",
    "AttentionMap",
    "BlockMap",
    "ViTMap",
    "Preprocessing",
    "Adapter",
    "register_adapter",
    "adapter_for",
    "registered_adapters",
    "layer_scale_gamma",
]

log = logging.getLogger(__name__)

Captured = dict[str, "torch.Tensor"]


@dataclass(frozen=True)
class CapturePoint:
    """Hook ``module`` and store its first input or its output under ``key``."""

    module: nn.Module
    where: Literal["input", "output"]
    key: str


@dataclass
class AttentionMap:
    """One multi-head self-attention, as the engine needs it.

    Attributes:
        n_heads: H.
        d_head: d_h.
        scale: the softmax temperature applied to ``q k^T`` (usually ``d_h ** -0.5``).
        w_out: ``[H, d_h, d]``: head ``h`` writes ``y_h @ w_out[h]`` (W_O^h, transposed).
        b_out: output-projection bias ``[d]`` or None.
        v_bias: value bias per head ``[H, d_h]`` or None.
        captures: hook points feeding :attr:`qkv`.
        qkv: maps the captured tensors to ``q, k, v`` each ``[B, H, N, d_h]`` (v with its
            bias; q and k after any qk-norm the module applies).
        qkv_rows: optional cheaper form ``(captured, rows [|S|] long) -> (q[:, :, rows], k, v)``
            for adapters that must recompute the projections: queries only at the pooled rows.
    """

    n_heads: int
    d_head: int
    scale: float
    w_out: torch.Tensor
    b_out: torch.Tensor | None
    v_bias: torch.Tensor | None
    captures: list[CapturePoint]
    qkv: Callable[[Captured], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    qkv_rows: Callable[[Captured, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None


@dataclass
class BlockMap:
    """One pre-norm transformer block ``x + ls1*attn(norm1 x)``, then ``+ ls2*mlp(norm2 x)``.

    Attributes:
        module: the block (its input is the residual stream entering it).
        attn: the attention map.
        ls1: attention LayerScale gamma ``[d]`` or None.
        mlp_write: capture point whose value is the MLP's residual write (after LayerScale).
        mlp_hidden: capture point of the MLP's hidden activations ``[B, N, d_mlp]`` (the
            input of its output projection), for per-neuron terms; None if unavailable.
        w_mlp_out: ``[d_mlp, d]`` output projection with LayerScale folded in.
        b_mlp_out: ``[d]`` output bias with LayerScale folded in, or None.
    """

    module: nn.Module
    attn: AttentionMap
    ls1: torch.Tensor | None
    mlp_write: CapturePoint
    mlp_hidden: CapturePoint | None = None
    w_mlp_out: torch.Tensor | None = None
    b_mlp_out: torch.Tensor | None = None


@dataclass
class ViTMap:
    """An isotropic ViT as the engine sees it.

    Attributes:
        blocks: every transformer block, input to output.
        readout: final norm / pooling / projection.
        n_prefix: number of tokens before the patches (CLS, registers, distillation).
        prefix_types: ``"cls"`` or ``"reg"`` per prefix token.
        patch_size: (ph, pw) so the patch grid of an input is ``(H // ph, W // pw)``.
        forward: the stock forward returning the representation ``[B, d_z]``.
        engine: the decomposition engine that consumes this map (see :mod:`vitdecomp.core.engines`).
    """

    blocks: list[BlockMap]
    readout: ViTReadout
    n_prefix: int
    prefix_types: tuple[str, ...]
    patch_size: tuple[int, int]
    forward: Callable[[torch.Tensor], torch.Tensor]
    engine: str = "vit"


@dataclass(frozen=True)
class Preprocessing:
    """How the model expects images: the library's own data config."""

    input_size: tuple[int, int]
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    resize_mode: Literal["shortest_crop", "squash"] = "shortest_crop"
    source: str = "default"

    def to_json(self) -> dict[str, Any]:
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "resize_mode": self.resize_mode,
            "source": self.source,
        }


@runtime_checkable
class Adapter(Protocol):
    """A model family vitdecomp can read."""

    family: str
    description: str

    def matches(self, module: nn.Module) -> bool:
        """True when this adapter is the one for ``module`` (cheap; no errors)."""

    def vit_map(self, module: nn.Module) -> ViTMap:
        """Read the module; raise :class:`UnsupportedModelError` for anything not exact."""

    def preprocessing(self, module: nn.Module) -> Preprocessing:
        """The model's own data config."""

    def classifier(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(W ``[classes, d_z]``, b) mapping the representation to logits, if the model has one."""


def layer_scale_gamma(module: Any, name: str) -> torch.Tensor | None:
    """LayerScale gamma ``[d]`` of a timm/open_clip ``LayerScale``; None for a missing or Identity one."""
    from torch import nn

    if module is None or isinstance(module, nn.Identity):
        return None
    gamma = getattr(module, "gamma", None)
    if gamma is None:
        raise UnsupportedModelError(f"{name}: layer scale {type(module).__name__} has no `gamma`")
    return gamma


_ADAPTERS: list[Adapter] = []


def register_adapter(adapter: Adapter) -> Adapter:
    """Add an adapter to the registry (the first that matches a module wins)."""
    _ADAPTERS.append(adapter)
    return adapter


def registered_adapters() -> list[Adapter]:
    _load_builtin_adapters()
    return list(_ADAPTERS)


_BUILTIN = ("timm_vit", "open_clip_vit", "hf_vit", "timm_swin", "timm_maxvit")


def _load_builtin_adapters() -> None:
    """Import the built-in adapter modules (each registers itself once)."""
    from importlib import import_module

    for name in _BUILTIN:
        import_module(f"{__package__}.{name}")


def adapter_for(module: Any) -> Adapter:
    """The registered adapter for a stock module, or :class:`UnsupportedModelError`."""
    from torch import nn

    if not isinstance(module, nn.Module):
        raise InputError(f"expected a torch.nn.Module, got {type(module).__name__}")
    for adapter in registered_adapters():
        if adapter.matches(module):
            return adapter
    families = ", ".join(a.family for a in _ADAPTERS)
    raise UnsupportedModelError(
        f"no vitdecomp adapter for {type(module).__module__}.{type(module).__name__}; "
        f"supported families: {families}. See `vitdecomp models`."
    )

