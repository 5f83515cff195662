"""Helpers shipped for users and for vitdecomp's own tests: tiny random models, assertions."""
from .assertions import assert_exact
from .tiny_models import (
    tiny_hf_clip,
    tiny_hf_clip_vision,
    tiny_hf_dinov2,
    tiny_hf_dinov2_registers,
    tiny_hf_siglip,
    tiny_hf_siglip_vision,
    tiny_hf_vit,
    tiny_open_clip,
    tiny_open_clip_vision,
    tiny_timm_vit,
)

__all__ = [
    "assert_exact",
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
