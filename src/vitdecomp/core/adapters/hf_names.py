"""What vitdecomp knows about transformers' names, and the lookups that match them.

Which transformers classes the :class:`~vitdecomp.core.adapters.hf_reader.HFViTAdapter` reads (by
family: ``"clip"``, ``"siglip"``, ``"vit"``, ``"dinov2"``), which it recognises and refuses (with
the reason and what to do instead), and where each part of an encoder layer lives. These are
the names that change between transformers releases, so they are data here and the reader is
logic over them. Module paths read (checked, since they changed between transformers 4.x and 5.x):

* layers: ``encoder.layers`` (CLIP), ``layers`` (ViT 5.x), ``encoder.layer`` (ViT 4.x, DINOv2);
* attention: ``self_attn.{q,k,v,out}_proj`` (CLIP), ``attention.{q,k,v,o}_proj`` (5.x),
  ``attention.attention.{query,key,value}`` + ``attention.output.dense`` (4.x); the
  attention module may hold no other parameter or buffer (no relative bias, no qk-norm);
* MLP write: ``mlp`` output (CLIP, ViT 5.x), ``output.dense`` output (ViT 4.x, whose
  ``ViTOutput`` adds the residual itself), ``layer_scale2`` output (DINOv2);
* neurons: input of ``mlp.fc2`` / ``mlp.down_proj`` / ``mlp.weights_out`` (SwiGLU) /
  ``output.dense``, with the LayerScale ``layer_scale2.lambda1`` folded into ``W_out``;
* readout: ``post_layernorm`` (CLIP, after pooling; SigLIP, before pooling), ``layernorm``
  (ViT, DINOv2, before pooling), ``visual_projection`` (no bias in CLIP; a bias would be read);
  SigLIP's ``head.{probe, attention.{in_proj_weight, in_proj_bias, out_proj}, layernorm, mlp}``.

Split from :mod:`vitdecomp.core.adapters.hf_vit`: the reader and the SigLIP pooling head both
match classes with :func:`known_name`, and the reader and the loader both refuse SigLIP 2 with
:data:`SIGLIP2_REFUSAL`, so these names need a home below all three.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...errors import UnsupportedModelError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "ATTN_LAYOUTS",
    "LAYER_CHILDREN",
    "LAYER_CLASSES",
    "MLP_OUT",
    "REFUSED",
    "SIGLIP2_REFUSAL",
    "SUPPORTED",
    "known_name",
    "output_field",
    "pair",
    "submodule",
]

#: Model classes the adapter reads, by family ("clip", "siglip", "vit", "dinov2").
SUPPORTED: dict[str, str] = {
    "CLIPVisionModel": "clip",
    "CLIPVisionModelWithProjection": "clip",
    "CLIPModel": "clip",
    "CLIPForImageClassification": "clip",
    "CLIPVisionTransformer": "clip",  # transformers 4.x: the tower inside CLIPVisionModel
    "ViTModel": "vit",
    "ViTForImageClassification": "vit",
    "Dinov2Model": "dinov2",
    "Dinov2WithRegistersModel": "dinov2",
    "SiglipVisionModel": "siglip",
    "SiglipModel": "siglip",
    "SiglipForImageClassification": "siglip",
    "SiglipVisionTransformer": "siglip",  # transformers 4.x: the tower inside SiglipVisionModel
}

#: Why SigLIP 2 (NaFlex) is refused (its classes here, its model_type in the loader).
SIGLIP2_REFUSAL = (
    "SigLIP 2 (NaFlex) takes patchified pixel sequences with per-image `spatial_shapes` and a "
    "`pixel_attention_mask` (variable resolution, position embeddings resized per image, masked "
    "attention and masked pooling), not a [batch, 3, H, W] pixel batch; vitdecomp's engine reads "
    "fixed-grid towers only. Use a SigLIP (v1) checkpoint, or the timm/open_clip build of a "
    "fixed-resolution SigLIP 2 tower"
)

#: Classes recognised but refused, with the reason and what to do instead.
REFUSED: dict[str, str] = {
    "Dinov2ForImageClassification": (
        "the classifier reads the concatenation [CLS ; mean(patches)] (2d wide), which is not one "
        "pooled vector; wrap `model.dinov2` (the Dinov2Model) and project onto the two halves of "
        "`classifier.weight` yourself"
    ),
    "Dinov2WithRegistersForImageClassification": (
        "the classifier reads the concatenation [CLS ; mean(patches)] (2d wide), which is not one "
        "pooled vector; wrap `model.dinov2_with_registers` instead"
    ),
    "Dinov2Backbone": "a backbone returns feature maps of several stages, not one representation; wrap a Dinov2Model",
    "Dinov2WithRegistersBackbone": (
        "a backbone returns feature maps, not one representation; wrap a Dinov2WithRegistersModel"
    ),
    "ViTForMaskedImageModeling": "the output is a reconstructed image, not a representation; wrap `model.vit`",
    "CLIPTextModel": "a text tower; vitdecomp decomposes image towers (use CLIPModel or CLIPVisionModel)",
    "CLIPTextModelWithProjection": "a text tower; vitdecomp decomposes image towers",
    "SiglipTextModel": "a text tower; vitdecomp decomposes image towers (use SiglipModel or SiglipVisionModel)",
    "Siglip2VisionModel": SIGLIP2_REFUSAL,
    "Siglip2Model": SIGLIP2_REFUSAL,
    "Siglip2ForImageClassification": SIGLIP2_REFUSAL,
    "Siglip2VisionTransformer": SIGLIP2_REFUSAL,
    "Siglip2TextModel": "a text tower; vitdecomp decomposes image towers",
}

#: Encoder-layer classes whose forward is the pre-norm block x + [ls1*]attn(norm1 x), + [ls2*]mlp(norm2 .).
LAYER_CLASSES = ("CLIPEncoderLayer", "SiglipEncoderLayer", "ViTLayer", "Dinov2Layer", "Dinov2WithRegistersLayer")

#: (q, k, v, out) projection paths inside an encoder layer, newest layout first.
ATTN_LAYOUTS: tuple[tuple[str, str, str, str], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),  # CLIP
    ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"),  # ViT/DINOv2 5.x
    ("attention.attention.query", "attention.attention.key", "attention.attention.value", "attention.output.dense"),
)

#: Output projections of the MLP (their input is the hidden activation, one column per neuron).
MLP_OUT = ("mlp.fc2", "mlp.down_proj", "mlp.weights_out", "output.dense")

#: Children of an encoder layer that may hold parameters: norms, attention, MLP, layer scales.
LAYER_CHILDREN = frozenset(
    {
        "layer_norm1",
        "layer_norm2",
        "layernorm_before",
        "layernorm_after",
        "norm1",
        "norm2",
        "self_attn",
        "attention",
        "mlp",
        "intermediate",
        "output",
        "layer_scale1",
        "layer_scale2",
    }
)


def known_name(module: Any, names: Any) -> str | None:
    """The first class in ``type(module).__mro__`` defined by transformers whose name is in ``names``."""
    for klass in type(module).__mro__:
        if klass.__module__.startswith("transformers.") and klass.__name__ in names:
            return klass.__name__
    return None


def submodule(root: nn.Module, path: str) -> nn.Module | None:
    """``root.get_submodule(path)`` or None when any part is missing (or None)."""
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def output_field(out: Any, field: str) -> torch.Tensor:
    """``out.<field>`` of a ModelOutput (or ``out`` itself when a version returns a tensor)."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    value = getattr(out, field, None)
    if value is None and isinstance(out, (tuple, list)):
        raise UnsupportedModelError(f"the forward returned a tuple without a `{field}` field; pass return_dict=True")
    if not isinstance(value, torch.Tensor):
        raise UnsupportedModelError(f"the forward returned no `{field}` tensor (got {type(value).__name__})")
    return value


def pair(value: Any) -> tuple[int, int]:
    """``(h, w)`` from a config size that is an int (square) or a pair."""
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)
