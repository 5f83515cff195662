"""Tiny, seeded, random-weight models of every supported family, built with each library's
own classes (no downloads). Norm weights and layer scales are perturbed away from their
initial values so a decomposition that ignored them would fail its exactness check.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "perturb",
    "tiny_timm_vit",
    "tiny_open_clip_vision",
    "tiny_open_clip",
    "tiny_hf_clip_vision",
    "tiny_hf_vit",
    "tiny_hf_dinov2",
    "tiny_hf_clip",
    "tiny_hf_dinov2_registers",
    "tiny_hf_siglip_vision",
    "tiny_hf_siglip",
]


def perturb(module: nn.Module, seed: int = 0, scale: float = 0.3) -> nn.Module:
    """Add seeded noise to every norm weight/bias, layer-scale gamma and bias vector."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            lname = name.lower()
            if p.dim() == 1 and any(k in lname for k in ("norm", "ln", "gamma", "lambda", "bias", "scale")):
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return module.eval()


def tiny_timm_vit(name: str = "test_vit", seed: int = 0, **kwargs: Any) -> nn.Module:
    """A timm VisionTransformer at random init via ``timm.create_model(name, pretrained=False)``.

    ``test_vit`` (CLS pool), ``test_vit2`` (register token, avg pool, LayerScale), ``test_vit4``
    (RMSNorm) are timm's own tiny test architectures; any other timm ViT name works with
    kwargs such as ``depth=2, img_size=32``.
    """
    import timm
    import torch

    torch.manual_seed(seed)
    return perturb(timm.create_model(name, pretrained=False, **kwargs), seed)


def tiny_open_clip_vision(seed: int = 0, **kwargs: Any) -> nn.Module:
    """An open_clip ``VisionTransformer`` tower: 32 px, patch 8, width 64, 2 layers, 4 heads."""
    import torch
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(seed)
    cfg: dict[str, Any] = dict(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=4.0, output_dim=32)
    cfg.update(kwargs)
    return perturb(VisionTransformer(**cfg), seed)


def tiny_open_clip(seed: int = 0) -> nn.Module:
    """A whole open_clip ``CLIP`` (image + text towers), embed dim 32, for text-side tests."""
    import torch
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    vision = dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16, mlp_ratio=4.0)
    text = dict(context_length=16, vocab_size=1000, width=64, heads=4, layers=2)
    return perturb(CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text), seed)


def _hf_vision_kwargs(**kwargs: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8
    )
    cfg.update(kwargs)
    return cfg


def tiny_hf_clip_vision(seed: int = 0, with_projection: bool = True, **kwargs: Any) -> nn.Module:
    """transformers ``CLIPVisionModelWithProjection`` (or ``CLIPVisionModel``) at random init."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(projection_dim=32, **_hf_vision_kwargs(**kwargs))
    cls = CLIPVisionModelWithProjection if with_projection else CLIPVisionModel
    return perturb(cls(config), seed)


def tiny_hf_vit(seed: int = 0, classifier: bool = False, **kwargs: Any) -> nn.Module:
    """transformers ``ViTModel`` (or ``ViTForImageClassification`` with 10 labels) at random init."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    torch.manual_seed(seed)
    if classifier:
        return perturb(ViTForImageClassification(ViTConfig(num_labels=10, **_hf_vision_kwargs(**kwargs))), seed)
    return perturb(ViTModel(ViTConfig(**_hf_vision_kwargs(**kwargs)), add_pooling_layer=False), seed)


def tiny_hf_dinov2(seed: int = 0, **kwargs: Any) -> nn.Module:
    """transformers ``Dinov2Model`` (LayerScale) at random init."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    return perturb(Dinov2Model(Dinov2Config(**_hf_vision_kwargs(**kwargs))), seed)


def tiny_hf_clip(
    seed: int = 0, classifier: bool = False, attn_implementation: str | None = None, **kwargs: Any
) -> nn.Module:
    """transformers ``CLIPModel`` (image + text towers, projection dim 32) at random init.

    With ``classifier=True``, a ``CLIPForImageClassification`` (10 labels) on the same
    vision config. ``kwargs`` go to the vision config; the text tower is 2 layers, width 32,
    vocabulary 100, context 16.
    """
    import torch
    from transformers import CLIPConfig, CLIPForImageClassification, CLIPModel

    torch.manual_seed(seed)
    text = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    config = CLIPConfig(text_config=text, vision_config=_hf_vision_kwargs(**kwargs), projection_dim=32, num_labels=10)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    cls = CLIPForImageClassification if classifier else CLIPModel
    return perturb(cls(config), seed)


def tiny_hf_dinov2_registers(seed: int = 0, num_register_tokens: int = 2, **kwargs: Any) -> nn.Module:
    """transformers ``Dinov2WithRegistersModel`` (CLS + registers, LayerScale) at random init."""
    import torch
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(seed)
    config = Dinov2WithRegistersConfig(num_register_tokens=num_register_tokens, **_hf_vision_kwargs(**kwargs))
    return perturb(Dinov2WithRegistersModel(config), seed)


def tiny_hf_siglip_vision(seed: int = 0, **kwargs: Any) -> nn.Module:
    """transformers ``SiglipVisionModel`` (no CLS, attention-pooling head) at random init.

    ``kwargs`` go to ``SiglipVisionConfig`` (e.g. ``vision_use_head=False``,
    ``attn_implementation="eager"``). The head's probe is scaled up so that the pooling
    pattern is far from uniform.
    """
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    return _sharpen_probe(perturb(SiglipVisionModel(SiglipVisionConfig(**_hf_vision_kwargs(**kwargs))), seed))


def tiny_hf_siglip(
    seed: int = 0, classifier: bool = False, attn_implementation: str | None = None, **kwargs: Any
) -> nn.Module:
    """transformers ``SiglipModel`` (image + text towers) at random init.

    With ``classifier=True``, a ``SiglipForImageClassification`` (10 labels) on the same
    vision config. ``kwargs`` go to the vision config; the text tower is 2 layers, width 32,
    vocabulary 100, context 16 (its ``pooler_output`` is 32 wide; the image tower's is 64).
    """
    import torch
    from transformers import SiglipConfig, SiglipForImageClassification, SiglipModel

    torch.manual_seed(seed)
    text = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    config = SiglipConfig(text_config=text, vision_config=_hf_vision_kwargs(**kwargs), num_labels=10)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    cls = SiglipForImageClassification if classifier else SiglipModel
    return _sharpen_probe(perturb(cls(config), seed))


def _sharpen_probe(module: nn.Module, factor: float = 8.0) -> nn.Module:
    """Scale every SigLIP pooling ``probe`` so the pooled pattern is not near-uniform."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("head.probe"):
                p.mul_(factor)
    return module
