"""Gradient-based relevance baselines on unmodified models: attention GradCAM and Chefer et al.'s rule.

Both need ``G^{l,h} = d target / d alpha^{l,h}``, the gradient of a target logit with respect to
every block's attention probabilities. Stock timm and open_clip models run fused attention
(SDPA, ``F.multi_head_attention_forward``), so the probabilities are never a node of their
graph. They do not have to be: with ``Y_h = alpha_h V_h`` (``V_h`` with its bias) the head's
output and the attention write ``w = gamma * (sum_h Y_h W_O^h + b_O)`` (``gamma`` the
LayerScale, 1 without one), the chain rule gives, per image,

    G^{l,h} = ((g_l * gamma) W_O^{h T}) V_h^T            [N, N],   g_l = d target / d w_l  [N, d],

so one forward pass of the stock module with a forward hook on the module that returns the
attention write (timm ``Block.ls1``, open_clip ``ResidualAttentionBlock.ls_1``; an ``Identity``
without LayerScale; for transformers models, whose attention output projection is an
``nn.Linear`` called as a module, that projection: ``g`` is then taken before the LayerScale,
so ``gamma`` is already in it and the rule reads ``G = (g W_O^{h T}) V_h^T``), one
``torch.autograd.grad`` of the target with respect to those writes,
and the adapter's own ``q, k, v`` (:class:`~vitdecomp.core.adapters.base.AttentionMap.qkv`, as
:mod:`vitdecomp.apps.segmentation.attention` reads them) give exact gradients. Nothing in the model is
replaced or edited, and no parameter's ``.grad`` is touched.

Maps (``[batch, gh, gw]`` on the patch grid; ``q`` the CLS row, or the mean over query rows for
a model without a CLS token, as in :func:`vitdecomp.apps.segmentation.attention.query_row`):

* **attention GradCAM** (Chefer et al. 2021's ``generate_cam_attn`` baseline, ``variant="chefer"``):
  on the last block, per head the weight ``w_h = mean_p G^{L,h}_{q,p}`` over patch columns ``p``,
  then ``m_p = max(0, (1/H) sum_h w_h alpha^{L,h}_{q,p})``. ``variant="elementwise"`` is
  ``m_p = (1/H) sum_h max(0, G^{L,h}_{q,p} alpha^{L,h}_{q,p})`` (the single-block form of the
  rule below).
* **Chefer relevance** (gradient-weighted rollout, Chefer et al. 2021b "Generic attention-model
  explainability", the rule their CLIP notebook uses): ``R = I``; for blocks
  ``l = s, ..., L-1``, ``Abar_l = (1/H) sum_h max(0, G^{l,h} * alpha^{l,h})`` and
  ``R <- R + Abar_l R``; the map is row ``q`` of ``R`` at the patch columns. (The LRP-based
  "transformer attribution" of Chefer et al. 2021a needs LRP relevances and is not this.)

Targets are logits of a :class:`LogitHead`: a classifier's (``logits = z W^T + b``, Chefer's
one-hot target on the model output) or CLIP zero-shot (``logits = s cos(z, y_c)`` with ``s``
the model's ``exp(logit_scale)``, as the ``logits_per_image`` their CLIP notebook
differentiates). The default target is each image's top class.

Isotropic timm, open_clip (also towers with a timm ViT trunk) and transformers ViTs (CLIP,
SigLIP, ViT, DINOv2 with or without registers; any attention implementation) are supported;
Swin and MaxViT (windowed attention, no token-by-token pattern per block) raise
:class:`~vitdecomp.errors.UnsupportedModelError`; :func:`gradient_support` says so without
running anything.

Example (tiny random timm ViT, offline)::

    import vitdecomp as vd
    from vitdecomp.apps.segmentation.relevance import attention_pass, classifier_head
    from vitdecomp.testing import tiny_timm_vit

    model = vd.wrap(tiny_timm_vit("test_vit", img_size=64))
    x = model.example_input(batch=2)
    result = attention_pass(model, x, classifier_head(model))
    result.gradcam().shape, result.chefer().shape, result.rollout().shape   # [2, gh, gw] each
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .attention import Query, query_row, rollout_matrix
from ...errors import InputError, UnsupportedModelError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ...core.model import Model

__all__ = [
    "LogitHead",
    "classifier_head",
    "text_head",
    "AttentionPass",
    "attention_pass",
    "attention_gradcam",
    "chefer_relevance",
    "gradcam_row",
    "chefer_relevance_matrix",
    "gradient_support",
]

log = logging.getLogger(__name__)

GradCamVariant = Literal["chefer", "elementwise"]


@dataclass(frozen=True)
class LogitHead:
    """Class logits from a representation: ``logits = scale * f(z) f(W)^T + bias``.

    ``f`` is the identity, or with ``normalize=True`` division by the L2 norm (CLIP cosines).

    Attributes:
        weight: ``[C, d_z]`` class rows (classifier weights or text embeddings).
        bias: ``[C]`` or None.
        normalize: cosine logits (both ``z`` and the rows normalised).
        scale: multiplies the (cosine) logits.
        names: optional class names, ``C`` of them.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    normalize: bool = False
    scale: float = 1.0
    names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.weight.dim() != 2 or self.weight.shape[0] == 0:
            raise InputError(f"a logit head needs a weight [C, d] with C >= 1, got {tuple(self.weight.shape)}")
        if self.bias is not None and tuple(self.bias.shape) != (self.weight.shape[0],):
            raise InputError(f"bias {tuple(self.bias.shape)} does not match {self.weight.shape[0]} classes")
        if self.names is not None and len(self.names) != self.weight.shape[0]:
            raise InputError(f"{len(self.names)} class names for {self.weight.shape[0]} classes")

    @property
    def n_classes(self) -> int:
        return int(self.weight.shape[0])

    def directions(self) -> torch.Tensor:
        """The rows a logit reads along (unit rows for a cosine head): ``[C, d_z]``, detached."""
        import torch.nn.functional as F

        w = self.weight.detach()
        return F.normalize(w, dim=-1) if self.normalize else w

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, C]`` logits of representations ``z [B, d_z]`` (differentiable in ``z``)."""
        import torch.nn.functional as F

        if z.dim() != 2 or z.shape[1] != self.weight.shape[1]:
            raise InputError(
                f"representation {tuple(z.shape)} does not fit a head of width {self.weight.shape[1]}: "
                "the head must belong to this model"
            )
        w = self.directions().to(device=z.device, dtype=z.dtype)
        feats = F.normalize(z, dim=-1) if self.normalize else z
        out = feats @ w.T
        if self.scale != 1.0:
            out = out * self.scale
        if self.bias is not None:
            out = out + self.bias.detach().to(device=z.device, dtype=z.dtype)
        return out


def classifier_head(model: Model | nn.Module, names: Sequence[str] | None = None) -> LogitHead:
    """The model's own linear classifier as a :class:`LogitHead` (raises InputError without one)."""
    from ...core.model import wrap

    m = wrap(model)
    cls = m.classifier()
    if cls is None:
        raise InputError(f"{m.name} has no linear classifier head; use text_head() with class texts (CLIP)")
    weight, bias = cls
    return LogitHead(weight.detach(), None if bias is None else bias.detach(),
                     names=tuple(names) if names is not None else None)


def text_head(
    model: Model | nn.Module, texts: torch.Tensor, *, scale: float | None = None, names: Sequence[str] | None = None
) -> LogitHead:
    """A CLIP zero-shot head: ``logits = s cos(z, y_c)`` for text embeddings ``texts [C, d_z]``.

    ``scale`` defaults to the model's ``exp(logit_scale)`` when it has one (the CLIP
    ``logits_per_image``), else 1.
    """
    from ...core.model import wrap

    m = wrap(model)
    if scale is None:
        scale = 1.0
        clip = m.extras.get("clip", m.module)
        logit_scale = getattr(clip, "logit_scale", None)
        if logit_scale is not None and hasattr(logit_scale, "detach") and logit_scale.numel() == 1:
            scale = float(logit_scale.detach().float().exp())
    return LogitHead(texts.detach(), None, normalize=True, scale=float(scale),
                     names=tuple(names) if names is not None else None)


# --------------------------------------------------------------------------- pure rules


def gradcam_row(
    probs: torch.Tensor,
    grads: torch.Tensor,
    prefix_types: Sequence[str],
    *,
    query: Query = "auto",
    variant: GradCamVariant = "chefer",
) -> torch.Tensor:
    """Attention GradCAM of one block: ``[batch, N]`` over all columns (prefix ones included).

    Args:
        probs: ``[batch, H, N, N]`` attention probabilities ``alpha``.
        grads: the same shape, ``d target / d alpha``.
        prefix_types: per prefix token ``"cls"`` / ``"reg"`` (selects the query row).
        query: as :func:`~vitdecomp.apps.segmentation.attention.query_row`.
        variant: ``"chefer"``: ``max(0, mean_h w_h alpha_{q,:})`` with ``w_h`` the mean of
            ``G_{q,p}`` over the patch columns; ``"elementwise"``: ``mean_h max(0, G_{q,:} alpha_{q,:})``.
    """
    if probs.shape != grads.shape or probs.dim() != 4:
        raise InputError(f"probs and grads must both be [batch, H, N, N]; got {tuple(probs.shape)}, {tuple(grads.shape)}")
    b, h, n, _ = probs.shape
    a_row = query_row(probs.reshape(b * h, n, n), prefix_types, query).reshape(b, h, n)
    g_row = query_row(grads.reshape(b * h, n, n), prefix_types, query).reshape(b, h, n)
    if variant == "chefer":
        n_prefix = len(prefix_types)
        weight = g_row[:, :, n_prefix:].mean(dim=-1, keepdim=True)  # [B, H, 1]
        return (a_row * weight).mean(dim=1).clamp(min=0)
    if variant == "elementwise":
        return (a_row * g_row).clamp(min=0).mean(dim=1)
    raise InputError(f"variant must be 'chefer' or 'elementwise', got {variant!r}")


def chefer_relevance_matrix(
    probs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], start_layer: int = 0
) -> torch.Tensor:
    """``R`` of the gradient-weighted rollout: ``R = I``, ``R <- R + mean_h((G * alpha)^+) R`` per block.

    Args:
        probs: per block ``[batch, H, N, N]``.
        grads: per block, the same shapes.
        start_layer: first block used (negative counts from the end).

    Returns:
        ``[batch, N, N]``; all-zero gradients give the identity.
    """
    import torch

    from .attention import resolve_layer

    if len(probs) == 0 or len(probs) != len(grads):
        raise InputError(f"need one gradient per block's attention; got {len(probs)} and {len(grads)}")
    s0 = resolve_layer(start_layer, len(probs), "start_layer")
    b, _, n, _ = probs[0].shape
    rel = torch.eye(n, dtype=probs[0].dtype, device=probs[0].device).expand(b, n, n).clone()
    for a, g in zip(probs[s0:], grads[s0:]):
        if a.shape != g.shape or a.dim() != 4:
            raise InputError(f"probs and grads must both be [batch, H, N, N]; got {tuple(a.shape)}, {tuple(g.shape)}")
        cam = (g * a).clamp(min=0).mean(dim=1)
        rel = rel + cam @ rel
    return rel


# --------------------------------------------------------------------------- the pass


@dataclass
class AttentionPass:
    """Everything one (optionally differentiated) forward pass yields for attention-based maps.

    Attributes:
        probs: per block ``[batch, H, N, N]`` attention probabilities (float32, or float64 for a
            float64 model), detached.
        grads: per block ``d target / d probs`` of the same shapes, or None (no gradients asked).
        representation: ``z [batch, d_z]``, detached.
        logits: ``[batch, C]`` of the head (None without a head).
        target: ``[batch]`` long: the class whose logit was differentiated (None without a head).
        prefix_types: ``"cls"`` / ``"reg"`` per prefix token.
        grid: ``(gh, gw)`` patch grid.
    """

    probs: list[torch.Tensor]
    grads: list[torch.Tensor] | None
    representation: torch.Tensor
    logits: torch.Tensor | None
    target: torch.Tensor | None
    prefix_types: tuple[str, ...]
    grid: tuple[int, int]

    @property
    def n_prefix(self) -> int:
        return len(self.prefix_types)

    def _grid(self, row: torch.Tensor) -> torch.Tensor:
        from .attention import to_grid

        return to_grid(row, self.n_prefix, self.grid)

    def _need_grads(self, what: str) -> list[torch.Tensor]:
        if self.grads is None:
            raise InputError(f"{what} needs gradients: run attention_pass(..., gradients=True) with a head")
        return self.grads

    def raw_attention(self, layer: int = -1, *, query: Query = "auto") -> torch.Tensor:
        """As :func:`vitdecomp.apps.segmentation.attention.raw_attention`: ``[batch, gh, gw]``."""
        from .attention import resolve_layer

        block = resolve_layer(layer, len(self.probs), "layer")
        return self._grid(query_row(self.probs[block].mean(dim=1), self.prefix_types, query))

    def rollout(self, start_layer: int = 0, *, query: Query = "auto") -> torch.Tensor:
        """As :func:`vitdecomp.apps.segmentation.attention.rollout`: ``[batch, gh, gw]``."""
        return self._grid(query_row(rollout_matrix(self.probs, start_layer), self.prefix_types, query))

    def gradcam(self, layer: int = -1, *, query: Query = "auto", variant: GradCamVariant = "chefer") -> torch.Tensor:
        """Attention GradCAM of block ``layer`` (default the last): ``[batch, gh, gw]``, >= 0."""
        from .attention import resolve_layer

        grads = self._need_grads("GradCAM")
        block = resolve_layer(layer, len(self.probs), "layer")
        row = gradcam_row(self.probs[block], grads[block], self.prefix_types, query=query, variant=variant)
        return self._grid(row)

    def chefer(self, start_layer: int = 0, *, query: Query = "auto") -> torch.Tensor:
        """Chefer relevance (gradient-weighted rollout) from block ``start_layer``: ``[batch, gh, gw]``."""
        rel = chefer_relevance_matrix(self.probs, self._need_grads("Chefer relevance"), start_layer)
        return self._grid(query_row(rel, self.prefix_types, query))


def _write_module(blk: Any, layer: int) -> tuple[nn.Module, bool]:
    """The module whose output is block ``layer``'s attention write, and whether LayerScale follows it.

    timm ``Block.ls1`` / open_clip ``ResidualAttentionBlock.ls_1`` return ``gamma * w`` (the write
    itself; ``False``). Otherwise the attention's output projection, found as the ``nn.Linear``
    inside the block whose weight is the adapter's ``W_O`` (``AttentionMap.w_out`` is a view of
    it; transformers CLIP/SigLIP ``out_proj``, ViT/DINOv2 ``o_proj`` / ``output.dense``): its
    output is ``sum_h Y_h W_O^h + b_O``, before any LayerScale (``True``: the gradient seen there
    already carries ``gamma``). A projection that is not called as a module (torch
    ``nn.MultiheadAttention`` inside open_clip) never reaches here because ``ls_1`` exists.
    """
    from torch import nn

    module = blk.module
    for name in ("ls1", "ls_1"):  # timm Block, open_clip ResidualAttentionBlock
        found = getattr(module, name, None)
        if isinstance(found, nn.Module):
            return found, False
    w_out = blk.attn.w_out
    d_in = int(w_out.shape[0] * w_out.shape[1])
    for sub in module.modules():
        if (isinstance(sub, nn.Linear) and sub.in_features == d_in and sub.out_features == int(w_out.shape[-1])
                and sub.weight.data_ptr() == w_out.data_ptr()):
            return sub, True
    raise UnsupportedModelError(
        f"block {layer} ({type(module).__name__}): gradient maps (GradCAM, Chefer relevance) read the attention "
        "write as the output of the block's layer-scale module (timm `ls1`, open_clip `ls_1`) or of the "
        "attention's output projection (an nn.Linear holding W_O, as in transformers ViT/CLIP/SigLIP/DINOv2); "
        "this block has neither"
    )


def gradient_support(model: Model | nn.Module) -> str | None:
    """None when :func:`attention_pass` can compute gradient maps for ``model``, else the reason.

    Cheap (reads the adapter's map, runs nothing). Supported: isotropic timm, open_clip and
    transformers ViTs; Swin / MaxViT (windowed attention) are not.
    """
    from .attention import vit_map
    from ...core.model import wrap

    try:
        vmap = vit_map(wrap(model))
        for i, blk in enumerate(vmap.blocks):
            _write_module(blk, i)
    except UnsupportedModelError as exc:
        return str(exc)
    return None


def attention_pass(
    model: Model | nn.Module,
    pixels: torch.Tensor,
    head: LogitHead | None = None,
    *,
    target: torch.Tensor | Sequence[int] | None = None,
    gradients: bool = True,
) -> AttentionPass:
    """One forward pass of the unmodified model: every block's attention, logits and (optionally) gradients.

    Args:
        model: a :class:`~vitdecomp.Model` or stock module (timm / open_clip isotropic ViT).
        pixels: ``[batch, 3, H, W]`` preprocessed images.
        head: the logits to target; required for gradients.
        target: ``[batch]`` class indices to differentiate; default each image's top logit.
        gradients: compute ``d logit[target] / d alpha`` for every block.

    Returns:
        An :class:`AttentionPass`.

    Raises:
        UnsupportedModelError: not an isotropic ViT, or (with gradients) no attention-write module.
        InputError: bad pixels, a head of the wrong width, or targets out of range.
    """
    import torch

    from .attention import check_pixels, PatternHooks, vit_map
    from ...core.capture import hooks
    from ...core.decomposition import input_errors, prepared
    from ...core.engines.vit import token_info
    from ...core.model import wrap

    m = wrap(model)
    check_pixels(pixels)
    if gradients and head is None:
        raise InputError("gradients need a target: pass a LogitHead (classifier_head / text_head)")
    vmap = vit_map(m)  # fail on Swin/MaxViT before running anything
    writers = [_write_module(blk, i) for i, blk in enumerate(vmap.blocks)] if gradients else []
    pre_scale = [after for _, after in writers]
    run_dtype = m.dtype
    dt = torch.float64 if run_dtype == torch.float64 else torch.float32
    batch = int(pixels.shape[0])
    x = pixels.detach().to(device=m.device, dtype=run_dtype)
    if gradients:
        x.requires_grad_(True)  # a graph even when every parameter is frozen

    writes: list[torch.Tensor | None] = [None] * len(vmap.blocks)

    def write(layer: int) -> Any:
        def fn(t: torch.Tensor) -> None:
            writes[layer] = t

        return fn

    grad_mode = torch.enable_grad() if gradients else nullcontext()
    with prepared(m.module, run_dtype), input_errors(m, x), grad_mode:
        vmap = vit_map(m)
        patterns = PatternHooks(vmap, dt, keep_values=True)
        specs = patterns.specs()
        if gradients:
            specs += [(writers[layer][0], "output", write(layer)) for layer in range(len(vmap.blocks))]
        with hooks(specs):
            z = vmap.forward(x)
        probs = patterns.complete()
        values = patterns.values
        assert values is not None
        logits = chosen = None
        if head is not None:
            logits = head.logits(z)
            chosen = resolve_targets(target, logits)
        grads: list[torch.Tensor] | None = None
        if gradients:
            assert logits is not None and chosen is not None
            missing = [i for i, w in enumerate(writes) if w is None or not w.requires_grad]
            if missing:
                raise UnsupportedModelError(f"blocks {missing}: the attention write was not seen in the forward graph")
            selected = logits.gather(1, chosen[:, None]).sum()
            g_writes = torch.autograd.grad(selected, [w for w in writes if w is not None], allow_unused=True)
            grads = []
            for layer, blk in enumerate(vmap.blocks):
                grads.append(_prob_grads(blk, g_writes[layer], values[layer], probs[layer], dt, batch,
                                         scaled=not pre_scale[layer]))
    info = token_info(vmap, x, patterns.n_tokens[0])
    assert info.grid is not None
    return AttentionPass(
        probs=probs,
        grads=grads,
        representation=z.detach(),
        logits=None if logits is None else logits.detach(),
        target=chosen,
        prefix_types=tuple(vmap.prefix_types),
        grid=info.grid,
    )


def resolve_targets(target: Any, logits: torch.Tensor) -> torch.Tensor:
    import torch

    if target is None:
        return logits.detach().argmax(dim=1)
    t = torch.as_tensor(target, dtype=torch.long, device=logits.device).reshape(-1)
    if t.shape[0] != logits.shape[0]:
        raise InputError(f"{t.shape[0]} targets for a batch of {logits.shape[0]}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= logits.shape[1]):
        raise InputError(f"targets must be class indices in [0, {logits.shape[1]})")
    return t


def _prob_grads(
    blk: Any, g_write: torch.Tensor | None, v: torch.Tensor | None, probs: torch.Tensor | None,
    dt: torch.dtype, batch: int, *, scaled: bool = True,
) -> torch.Tensor:
    """``G_h = ((g * gamma) W_O^{hT}) V_h^T``: ``[B, H, N, N]`` from the write's gradient ``g [B, N, d]``.

    ``scaled=False``: ``g`` was taken at the output projection, before LayerScale, so ``gamma``
    is already in it and is not applied again.
    """
    import torch

    assert v is not None and probs is not None
    if g_write is None:  # the write does not reach the target (cannot happen for a ViT readout)
        return torch.zeros_like(probs)
    if g_write.dim() != 3 or g_write.shape[0] != batch:
        raise UnsupportedModelError(
            f"attention write of shape {tuple(g_write.shape)} is not batch-first [B, N, d] for a batch of {batch}"
        )
    g = g_write.detach().to(dt)
    gamma = blk.ls1 if scaled else None
    if gamma is not None:
        g = g * gamma.detach().to(dt)
    w_out = blk.attn.w_out.detach().to(device=g.device, dtype=dt)  # [H, dh, d]
    dy = torch.einsum("bnd,hed->bhne", g, w_out)  # d target / d Y_h: [B, H, N, dh]
    return dy @ v.transpose(-1, -2)


# --------------------------------------------------------------------------- one-call maps


def attention_gradcam(
    model: Model | nn.Module,
    pixels: torch.Tensor,
    head: LogitHead | None = None,
    *,
    target: torch.Tensor | Sequence[int] | None = None,
    layer: int = -1,
    query: Query = "auto",
    variant: GradCamVariant = "chefer",
) -> torch.Tensor:
    """Attention GradCAM map ``[batch, gh, gw]`` (see the module doc); ``head`` defaults to the classifier."""
    head = head if head is not None else classifier_head(model)
    return attention_pass(model, pixels, head, target=target).gradcam(layer, query=query, variant=variant)


def chefer_relevance(
    model: Model | nn.Module,
    pixels: torch.Tensor,
    head: LogitHead | None = None,
    *,
    target: torch.Tensor | Sequence[int] | None = None,
    start_layer: int = 0,
    query: Query = "auto",
) -> torch.Tensor:
    """Chefer relevance map ``[batch, gh, gw]`` (gradient-weighted rollout); ``head`` defaults to the classifier."""
    head = head if head is not None else classifier_head(model)
    return attention_pass(model, pixels, head, target=target).chefer(start_layer, query=query)
