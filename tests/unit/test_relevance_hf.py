"""Gradient relevance (vitdecomp.apps.segmentation.relevance) on transformers ViTs against plain autograd through eager attention.

The stock models run SDPA; the reference switches them to eager attention and replaces each
module's ``eager_attention_forward`` by an explicit ``softmax(q k^T * scaling) v`` whose
probabilities keep their gradient, so ``d logit / d alpha`` comes from ``backward()`` alone.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import vitdecomp as vd
from vitdecomp.errors import UnsupportedModelError
from vitdecomp.apps.segmentation.relevance import LogitHead, attention_pass, classifier_head, gradient_support
from vitdecomp.testing.tiny_models import (
    tiny_hf_clip_vision,
    tiny_hf_dinov2_registers,
    tiny_hf_siglip_vision,
    tiny_hf_vit,
)

pytest.importorskip("transformers")

MODULES = {
    "vit": "transformers.models.vit.modeling_vit",
    "dinov2_registers": "transformers.models.dinov2_with_registers.modeling_dinov2_with_registers",
    "siglip": "transformers.models.siglip.modeling_siglip",
    "clip": "transformers.models.clip.modeling_clip",
}
BUILD = {
    "vit": lambda: tiny_hf_vit(seed=3, classifier=True),
    "dinov2_registers": lambda: tiny_hf_dinov2_registers(seed=4),
    "siglip": lambda: tiny_hf_siglip_vision(seed=5),
    "clip": lambda: tiny_hf_clip_vision(seed=6),
}


def _explicit(monkeypatch, family, module):
    """Eager attention with explicit probabilities (kept, with their grad) in every layer."""
    store = []

    def eager(mod, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        assert attention_mask is None and dropout == 0.0
        scaling = query.size(-1) ** -0.5 if scaling is None else scaling
        p = torch.softmax(query @ key.transpose(2, 3) * scaling, dim=-1)
        p.retain_grad()
        store.append(p)
        return (p @ value).transpose(1, 2).contiguous(), p

    monkeypatch.setattr(importlib.import_module(MODULES[family]), "eager_attention_forward", eager)
    for sub in module.modules():
        config = getattr(sub, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            monkeypatch.setattr(config, "_attn_implementation", "eager")
    return store


def _head(model, family):
    if family == "vit":
        return classifier_head(model)
    gen = torch.Generator().manual_seed(7)
    width = model.describe()["width"] if family != "clip" else 32
    return LogitHead(torch.randn(5, width, generator=gen), torch.randn(5, generator=gen))


@pytest.mark.parametrize("family", list(BUILD))
def test_hf_gradients_match_autograd_through_eager_attention(monkeypatch, family):
    module = BUILD[family]().eval()
    model = vd.wrap(module)
    assert gradient_support(model) is None
    head = _head(model, family)
    x = model.example_input(batch=2, seed=1)
    result = attention_pass(model, x, head)
    assert all(p.grad is None for p in module.parameters())
    z_ref = model.representation(x)
    store = _explicit(monkeypatch, family, module)
    z = model.structure.forward(x)
    torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-4)  # the explicit attention is the same model
    logits = head.logits(z)
    target = logits.argmax(1)
    logits.gather(1, target[:, None]).sum().backward()
    assert len(store) == len(result.probs) and torch.equal(result.target, target)
    scale = max(float(p.grad.abs().max()) for p in store)
    assert scale > 0
    for mine, ref in zip(result.probs, store):
        torch.testing.assert_close(mine, ref.detach(), atol=1e-6, rtol=1e-5)
    for mine, ref in zip(result.grads, store):
        torch.testing.assert_close(mine, ref.grad, atol=1e-6 * max(scale, 1.0), rtol=1e-4)
    assert not any(g.requires_grad for g in result.grads)  # no graph kept alive
    # the maps follow from those gradients (rules tested in test_relevance.py)
    assert result.gradcam().shape == (2, *result.grid) and result.chefer().shape == (2, *result.grid)


def test_windowed_models_say_why():
    import timm

    swin = vd.wrap(timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4, window_size=4, embed_dim=16,
        depths=(1, 2), num_heads=(1, 2), num_classes=4).eval())
    reason = gradient_support(swin)
    assert reason is not None and "isotropic" in reason
    with pytest.raises(UnsupportedModelError, match="isotropic"):
        attention_pass(swin, swin.example_input(batch=1), classifier_head(swin))
