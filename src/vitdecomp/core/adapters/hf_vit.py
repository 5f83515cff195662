"""Hugging Face ``transformers`` ViTs: CLIP and SigLIP vision towers, ViT, DINOv2 (+/- registers).

Supported classes and the representation each one is decomposed into (``d``: width,
``d_z``: output width; always computed by the stock module's own forward):

====================================  =====================================================
class                                 representation ``[batch, d_z]``
====================================  =====================================================
``CLIPVisionModel``                   ``pooler_output`` = ``post_layernorm(x_L[:, 0])``
``CLIPVisionModelWithProjection``     ``image_embeds`` = ``visual_projection(pooler_output)``
``CLIPModel`` (image tower)           ``get_image_features(pixel_values)`` (same as above);
                                      the whole model is kept in ``Model.extras["clip"]``
``CLIPForImageClassification``        the classifier's input, ``mean(x_L[:, 1:])``
``ViTModel``                          ``last_hidden_state[:, 0]`` = ``layernorm(x_L)[:, 0]``
``ViTForImageClassification``         the classifier's input (pre-logits), same as above;
                                      logits = ``stack.project(W).total() + b``
``Dinov2Model``                       ``pooler_output`` = ``layernorm(x_L)[:, 0]``
``Dinov2WithRegistersModel``          ``pooler_output``; tokens are CLS, registers, patches
``SiglipVisionModel``                 ``pooler_output`` = ``head(post_layernorm(x_L))``, the
                                      attention-pooling (MAP) head; no CLS token
``SiglipModel`` (image tower)         ``get_image_features(pixel_values).pooler_output`` (same
                                      as above); the whole model is kept in ``Model.extras["clip"]``
``SiglipForImageClassification``      the classifier's input, ``mean(post_layernorm(x_L))``
====================================  =====================================================

SigLIP's ``SiglipMultiheadAttentionPoolingHead`` computes ``a = MHA(probe, y, y)`` (one learned
query, ``torch.nn.MultiheadAttention``) and ``z = a + mlp(layernorm(a))``. It is read as an
:class:`~vitdecomp.core.readout.AttentionPool` (docs/method.md §2.4): ``post_layernorm`` is the per-token
norm, every pool head is one *route* ``W_V^r W_O^r`` with its frozen pattern
``softmax(q_probe^r k^r(y)^T / sqrt(d_h))``, and ``mlp(layernorm(a))`` is one non-linear leaf,
``pool_mlp``. With ``vision_use_head=False`` transformers' ``pooler_output`` is None; the
representation is then the mean of ``last_hidden_state`` (the post-layernormed tokens), as
``SiglipForImageClassification`` and big_vision's ``pool_type='gap'`` pool them, and
``representation="pooler_output"`` raises UnsupportedModelError. SigLIP 2
(``Siglip2*``, NaFlex) is refused: its inputs are patch sequences with per-image
``spatial_shapes`` and a padding mask, not a pixel batch.

``ViTModel.pooler`` (``dense`` then ``tanh``) is non-linear, so by default it is **not**
part of the representation: ``ViTModel`` is decomposed at ``last_hidden_state[:, 0]``.
``HFViTAdapter(representation="pooler_output")`` asks for the stock ``pooler_output``
instead; for ViT that is exact only with ``pooler_act="linear"`` and raises
:class:`~vitdecomp.errors.UnsupportedModelError` otherwise.

The work is split by job: :mod:`~vitdecomp.core.adapters.hf_names` (the transformers class and
module-path names read or refused, across 4.x / 5.x), :mod:`~vitdecomp.core.adapters.hf_reader`
(:class:`HFViTAdapter`: modules -> ``ViTMap``, registered on import),
:mod:`~vitdecomp.core.adapters.hf_siglip` (SigLIP's attention-pooling head -> ``AttentionPool``)
and :mod:`~vitdecomp.core.adapters.hf_loader` (:func:`load_hf`, :func:`preprocessing_from_processor`).
Their public names are importable from here, as before the split.

Eager, SDPA and the other attention implementations all work: the engine recomputes the
pattern rows from the captured ``q``/``k`` projections. ``interpolate_pos_encoding`` is
left as the stock forward has it (DINOv2 always interpolates; CLIP/ViT need the built size).

``transformers`` is imported only inside functions, so ``import vitdecomp`` stays light.
"""

from .hf_loader import load_hf, preprocessing_from_processor
from .hf_reader import (  # noqa: F401  (the constants and Representation: importable here as before)
    CLIP_MEAN,
    CLIP_STD,
    HALF,
    IMAGENET_MEAN,
    IMAGENET_STD,
    HFViTAdapter,
    Representation,
)

__all__ = ["HFViTAdapter", "load_hf", "preprocessing_from_processor"]
