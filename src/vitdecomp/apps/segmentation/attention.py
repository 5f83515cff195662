"""Attention-based baselines for token maps, computed in the same harness as the decomposition.

These are the reference baselines of docs/method.md §6.5 that need only the model's own attention:

* **raw attention**: the last block's pattern, mean over heads, row of the target query
  (CLS), patch columns: ``m_p = (1/H) sum_h alpha^{L,h}_{cls,p}``;
* **rollout** (Abnar & Zuidema 2020, as in Chefer et al.'s ``compute_rollout_attention``):
  per block ``A_l = (1/H) sum_h alpha^{l,h}``, ``Â_l = (A_l + I) / rowsum(A_l + I)``, and
  ``R = Â_{L-1} ... Â_{s+1} Â_s`` (later blocks on the left; every row of ``R`` is a
  probability distribution), then the CLS row at the patch columns.

The attention probabilities are read exactly as :mod:`vitdecomp.core.engines.vit` reads them: the
adapter's capture points are hooked for one forward pass of the unmodified model, and
``alpha = softmax(scale * q k^T)`` is recomputed from the adapter's ``AttentionMap.qkv``
(so fused / SDPA attention needs no switch, and timm, open_clip and transformers models
are all covered). Isotropic ViTs only: Swin and MaxViT raise
:class:`~vitdecomp.errors.UnsupportedModelError`.

Models without a CLS token (SigLIP, mean-pooled timm ViTs with or without registers) have no
query row that the readout reads alone; for them (``query="auto"``) the map uses the mean
over all query rows, ``m_p = (1/N) sum_q A_{q,p}``, and says so in the log.

Chefer et al.'s ImageNet-Segmentation script calls rollout with ``start_layer=1`` (0-based,
i.e. skipping the first block), and so does :func:`rollout` by default (docs/method.md §6.5);
``start_layer=0`` gives the product over every block (Abnar & Zuidema's original rollout).

Example (tiny random timm ViT, offline)::

    import vitdecomp as vd
    from vitdecomp.apps.segmentation.attention import raw_attention, rollout
    from vitdecomp.testing import tiny_timm_vit

    model = vd.wrap(tiny_timm_vit("test_vit", img_size=64))
    x = model.example_input(batch=2)
    rollout(model, x).shape          # [2, 4, 4]
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from ...errors import InputError, UnsupportedModelError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ...core.adapters.base import ViTMap
    from ...core.model import Model

__all__ = ["attention_probs", "query_row", "raw_attention", "rollout", "rollout_matrix"]

log = logging.getLogger(__name__)

Query = Literal["auto", "cls", "mean"]


def attention_probs(model: Model | nn.Module, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Every block's attention probabilities ``alpha^{l,h}_{q,t}``.

    One forward pass of the unmodified model (eval mode, no grad, hooks removed afterwards).

    Args:
        model: a :class:`~vitdecomp.Model` or a stock module (isotropic ViT families).
        pixels: ``[batch, 3, H, W]`` preprocessed images.

    Returns:
        One tensor ``[batch, heads, N, N]`` per block (input to output), rows summing to 1,
        in float32 (float64 for a float64 model); ``N`` counts prefix and patch tokens.

    Raises:
        UnsupportedModelError: not an isotropic ViT (Swin, MaxViT) or no adapter.
        InputError: pixels of the wrong shape or type.
    """
    probs, _, _ = _run(model, pixels)
    return probs


def rollout_matrix(probs: Sequence[torch.Tensor], start_layer: int = 0) -> torch.Tensor:
    """Attention rollout ``R = Â_{L-1} ... Â_s``, ``Â_l = (A_l + I) / rowsum(A_l + I)``.

    Args:
        probs: per block ``[batch, heads, N, N]`` (averaged over heads here) or already
            head-averaged ``[batch, N, N]``.
        start_layer: first block in the product; negative counts from the end.

    Returns:
        ``[batch, N, N]``; every row is a probability distribution over source tokens.
    """
    import torch

    if len(probs) == 0:
        raise InputError("rollout needs at least one block's attention")
    s0 = resolve_layer(start_layer, len(probs), "start_layer")
    joint: torch.Tensor | None = None
    for a in probs[s0:]:
        if a.dim() == 4:
            a = a.mean(dim=1)
        if a.dim() != 3 or a.shape[-1] != a.shape[-2]:
            raise InputError(f"attention must be [batch, (heads,) N, N], got {tuple(a.shape)}")
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        aug = a + eye
        aug = aug / aug.sum(dim=-1, keepdim=True)
        joint = aug if joint is None else aug @ joint
    assert joint is not None
    return joint


def raw_attention(
    model: Model | nn.Module, pixels: torch.Tensor, layer: int = -1, *, query: Query = "auto"
) -> torch.Tensor:
    """Raw attention map: block ``layer``'s pattern, mean over heads, target row, patch columns.

    ``m_p = (1/H) sum_h alpha^{layer,h}_{cls,p}`` for every patch ``p``; for a model without
    a CLS token (``query="auto"`` or ``"mean"``) the CLS row is replaced by the mean over all
    query rows.

    Args:
        model: a :class:`~vitdecomp.Model` or a stock module (isotropic ViT families).
        pixels: ``[batch, 3, H, W]`` preprocessed images.
        layer: the block (negative counts from the end; default the last).
        query: ``"cls"`` (the CLS row; an error without one), ``"mean"`` (mean over query
            rows) or ``"auto"`` (CLS when the model has one, else the mean).

    Returns:
        ``[batch, gh, gw]`` on the patch grid (row-major), non-negative.
    """
    probs, vmap, grid = _run(model, pixels)
    block = resolve_layer(layer, len(probs), "layer")
    row = query_row(probs[block].mean(dim=1), vmap.prefix_types, query)
    return to_grid(row, vmap.n_prefix, grid)


def rollout(
    model: Model | nn.Module, pixels: torch.Tensor, start_layer: int = 1, *, query: Query = "auto"
) -> torch.Tensor:
    """Attention-rollout map: the target row of :func:`rollout_matrix` at the patch columns.

    Args:
        model: a :class:`~vitdecomp.Model` or a stock module (isotropic ViT families).
        pixels: ``[batch, 3, H, W]`` preprocessed images.
        start_layer: first block in the product (default 1, as Chefer et al.'s segmentation
            protocol; 0: from the first block).
        query: as in :func:`raw_attention` (CLS row, or the mean over query rows).

    Returns:
        ``[batch, gh, gw]`` on the patch grid (row-major), non-negative.
    """
    probs, vmap, grid = _run(model, pixels)
    joint = rollout_matrix(probs, start_layer)
    row = query_row(joint, vmap.prefix_types, query)
    return to_grid(row, vmap.n_prefix, grid)


def query_row(matrix: torch.Tensor, prefix_types: Sequence[str], query: Query = "auto") -> torch.Tensor:
    """The target row of a token-by-token matrix ``[batch, N, N]``: ``[batch, N]``.

    ``"cls"``: the CLS token's row; ``"mean"``: the mean over all query rows; ``"auto"``: the
    CLS row when ``prefix_types`` has a CLS token, else the mean.
    """
    if query not in ("auto", "cls", "mean"):
        raise InputError(f"query must be 'auto', 'cls' or 'mean', got {query!r}")
    cls_index = next((i for i, t in enumerate(prefix_types) if t == "cls"), None)
    if query == "cls" and cls_index is None:
        raise InputError("query='cls' but this model has no CLS token; use query='mean'")
    if query == "mean" or cls_index is None:
        if query == "auto":
            log.info("the model has no CLS token: the map uses the mean over all query rows")
        return matrix.mean(dim=-2)
    return matrix[:, cls_index]


def to_grid(row: torch.Tensor, n_prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    gh, gw = grid
    patch = row[:, n_prefix:]
    if patch.shape[-1] != gh * gw:
        raise InputError(f"{patch.shape[-1]} patch tokens do not fill the grid {gh}x{gw}")
    return patch.reshape(row.shape[0], gh, gw)


def resolve_layer(layer: int, n_layers: int, what: str) -> int:
    index = layer + n_layers if layer < 0 else layer
    if not 0 <= index < n_layers:
        raise InputError(f"{what}={layer} is outside a model with {n_layers} blocks")
    return index


def vit_map(m: Model) -> ViTMap:
    from ...core.adapters.base import ViTMap

    structure = m.structure
    if not isinstance(structure, ViTMap) or structure.engine != "vit":
        raise UnsupportedModelError(
            f"attention maps are implemented for isotropic ViTs only; {m.name} ({m.family}) is read "
            f"as {type(structure).__name__} (hierarchical/windowed attention such as Swin or MaxViT "
            "has no single token-by-token pattern per block)"
        )
    return structure


def check_pixels(pixels: Any) -> None:
    """``pixels`` must be a non-empty float tensor ``[batch, 3, H, W]`` (else :class:`InputError`)."""
    import torch

    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[0] == 0:
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise InputError(f"pixels must be a tensor [batch, 3, H, W], got {shape}")
    if not torch.is_floating_point(pixels):
        raise InputError("pixels must be a float tensor (preprocessed, normalised)")


class PatternHooks:
    """Forward hooks that recompute every block's attention pattern during the model's own forward.

    From the adapter's captured attention input, each block's pattern is the engine's
    (``engines/vit.py``, ``on_block_end``) for every query row: ``softmax(q kᵀ · scale)``
    ``[batch, heads, tokens, tokens]`` in ``dt``, computed without gradient. ``keep_values`` also
    keeps each block's ``v`` (detached). Build it with the ViT map read inside the
    ``prepared`` context, register :meth:`specs` with :func:`vitdecomp.core.capture.hooks`.
    """

    def __init__(self, vmap: ViTMap, dt: torch.dtype, *, keep_values: bool = False) -> None:
        n = len(vmap.blocks)
        self.vmap, self.dt = vmap, dt
        self.probs: list[torch.Tensor | None] = [None] * n
        self.values: list[torch.Tensor | None] | None = [None] * n if keep_values else None
        self.n_tokens: list[int] = []
        self._caps: dict[int, dict[str, torch.Tensor]] = {}

    def specs(self) -> list[Any]:
        specs: list[Any] = []
        for layer, blk in enumerate(self.vmap.blocks):
            for cp in blk.attn.captures:
                specs.append((cp.module, cp.where, self._capture(layer, cp.key)))
            specs.append((blk.module, "output", self._block_end(layer)))
        return specs

    def _capture(self, layer: int, key: str) -> Any:
        def fn(t: torch.Tensor) -> None:
            self._caps.setdefault(layer, {})[key] = t

        return fn

    def _block_end(self, layer: int) -> Any:
        import torch

        attn, dt = self.vmap.blocks[layer].attn, self.dt

        def fn(_: torch.Tensor) -> None:
            with torch.no_grad():
                q, k, v = attn.qkv(self._caps.pop(layer))
                self.probs[layer] = torch.softmax((q.to(dt) @ k.to(dt).transpose(-1, -2)) * attn.scale, dim=-1)
                if self.values is not None:
                    self.values[layer] = v.detach().to(dt)  # a view of the live graph for some adapters
            self.n_tokens.append(int(k.shape[-2]))

        return fn

    def complete(self) -> list[torch.Tensor]:
        """The patterns, one per block; :class:`InputError` when a block did not run."""
        if any(p is None for p in self.probs):
            raise InputError("the model's forward did not run through its blocks; is this the right model?")
        return [p for p in self.probs if p is not None]


def _run(model: Any, pixels: Any) -> tuple[list[torch.Tensor], ViTMap, tuple[int, int]]:
    """One hooked forward pass: per-block patterns, the ViT map and the patch grid."""
    import torch

    from ...core.capture import hooks
    from ...core.decomposition import input_errors, prepared
    from ...core.engines.vit import token_info
    from ...core.model import wrap

    m = wrap(model)
    check_pixels(pixels)
    vit_map(m)  # fail on Swin/MaxViT before running anything
    run_dtype = m.dtype
    dt = torch.float64 if run_dtype == torch.float64 else torch.float32
    x = pixels.to(device=m.device, dtype=run_dtype)

    with prepared(m.module, run_dtype), input_errors(m, x):
        vmap = vit_map(m)
        patterns = PatternHooks(vmap, dt)
        with hooks(patterns.specs()):
            vmap.forward(x)
    probs = patterns.complete()
    info = token_info(vmap, x, patterns.n_tokens[0])
    assert info.grid is not None
    return probs, vmap, info.grid
