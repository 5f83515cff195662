"""Gradient relevance baselines (vitdecomp.apps.segmentation.relevance) against direct autograd through explicit attention."""
from __future__ import annotations

import pytest
import torch

import vitdecomp as vd
from vitdecomp.errors import InputError
from vitdecomp.apps.segmentation.relevance import (
    LogitHead,
    attention_gradcam,
    attention_pass,
    chefer_relevance,
    chefer_relevance_matrix,
    classifier_head,
    gradcam_row,
    text_head,
)
from vitdecomp.testing import tiny_timm_vit
from vitdecomp.testing.tiny_models import tiny_open_clip, tiny_open_clip_vision


def _explicit_timm(module):
    """Eager attention in every block; the probabilities (the attn_drop output) keep their grad."""
    store = []
    handles = []
    for blk in module.blocks:
        blk.attn.fused_attn = False

        def hook(mod, args, out):
            out.retain_grad()
            store.append(out)

        handles.append(blk.attn.attn_drop.register_forward_hook(hook))
    return store, handles


def _explicit_open_clip(tower):
    """Replace each MultiheadAttention's output by softmax(q k^T / sqrt(d_h)) v W_O + b, probs kept."""
    store = []
    handles = []
    for blk in tower.transformer.resblocks:
        attn = blk.attn

        def hook(mod, args, kwargs, out, attn=attn):
            u = args[0] if args else kwargs["query"]
            b, n, d = u.shape
            h = attn.num_heads
            qkv = torch.nn.functional.linear(u, attn.in_proj_weight, attn.in_proj_bias)
            q, k, v = qkv.reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
            p = torch.softmax(q @ k.transpose(-1, -2) * (d // h) ** -0.5, dim=-1)
            p.retain_grad()
            store.append(p)
            y = (p @ v).transpose(1, 2).reshape(b, n, d)
            explicit = attn.out_proj(y)
            assert torch.allclose(explicit, out[0], atol=1e-5)  # the same attention, now explicit
            return (explicit, None)

        handles.append(attn.register_forward_hook(hook, with_kwargs=True))
    return store, handles


def _reference(module, forward, x, head, explicit):
    """(probs, grads, target) by plain autograd through explicit attention probabilities."""
    store, handles = explicit(module)
    try:
        z = forward(x)
        logits = head.logits(z)
        target = logits.argmax(1)
        logits.gather(1, target[:, None]).sum().backward()
    finally:
        for hd in handles:
            hd.remove()
    return [p.detach() for p in store], [p.grad.detach() for p in store], target


def _ref_gradcam(p, g, cls, n_prefix, variant):
    out = []
    for b in range(p.shape[0]):
        # [H, N]: the CLS row, or the mean over query rows for a model without CLS
        a_row, g_row = (p[b, :, cls], g[b, :, cls]) if cls is not None else (p[b].mean(1), g[b].mean(1))
        if variant == "chefer":
            w = g_row[:, n_prefix:].mean(dim=1)
            cam = sum(w[h] * a_row[h] for h in range(p.shape[1])) / p.shape[1]
            out.append(cam.clamp(min=0)[n_prefix:])
        else:
            cam = sum(torch.relu(g_row[h] * a_row[h]) for h in range(p.shape[1])) / p.shape[1]
            out.append(cam[n_prefix:])
    return torch.stack(out)


def _ref_chefer(probs, grads, cls, n_prefix):
    out = []
    for b in range(probs[0].shape[0]):
        n = probs[0].shape[-1]
        r = torch.eye(n, dtype=torch.float64)
        for p, g in zip(probs, grads):
            cam = torch.zeros(n, n, dtype=torch.float64)
            for h in range(p.shape[1]):
                cam += torch.relu(g[b, h].double() * p[b, h].double()) / p.shape[1]
            r = r + cam @ r
        out.append((r[cls] if cls is not None else r.mean(0))[n_prefix:])
    return torch.stack(out)


@pytest.mark.parametrize("name", ["test_vit", "test_vit2"])
def test_timm_gradients_gradcam_and_chefer_match_explicit_autograd(name):
    module = tiny_timm_vit(name, img_size=32).eval()
    model = vd.wrap(module)
    head = classifier_head(model)
    x = model.example_input(batch=3, seed=1)
    assert all(blk.attn.fused_attn for blk in module.blocks)  # the stock model runs fused SDPA
    result = attention_pass(model, x, head)
    assert all(p.grad is None for p in module.parameters())  # no parameter's .grad was touched
    ref_p, ref_g, ref_t = _reference(
        module, lambda t: module.forward_head(module.forward_features(t), pre_logits=True), x, head, _explicit_timm
    )
    assert torch.equal(result.target, ref_t)
    scale = max(float(g.abs().max()) for g in ref_g)
    assert scale > 0
    for mine, ref in zip(result.grads, ref_g):
        torch.testing.assert_close(mine, ref, atol=1e-6 * max(scale, 1.0), rtol=1e-4)
    for mine, ref in zip(result.probs, ref_p):
        torch.testing.assert_close(mine, ref, atol=1e-6, rtol=1e-5)
    n_prefix = result.n_prefix
    cls = list(result.prefix_types).index("cls") if "cls" in result.prefix_types else None
    gh, gw = result.grid
    for variant in ("chefer", "elementwise"):
        want = _ref_gradcam(ref_p[-1], ref_g[-1], cls, n_prefix, variant).reshape(3, gh, gw)
        torch.testing.assert_close(result.gradcam(variant=variant), want, atol=1e-6 * max(scale, 1), rtol=1e-4)
    want = _ref_chefer(ref_p, ref_g, cls, n_prefix).reshape(3, gh, gw).float()
    torch.testing.assert_close(result.chefer(), want, atol=1e-6 * max(scale, 1), rtol=1e-4)
    # the one-call forms agree with the pass
    torch.testing.assert_close(attention_gradcam(model, x), result.gradcam())
    torch.testing.assert_close(chefer_relevance(model, x, head), result.chefer())


def test_open_clip_text_target_matches_explicit_autograd():
    tower = tiny_open_clip_vision(seed=2).eval()
    model = vd.wrap(tower)
    gen = torch.Generator().manual_seed(0)
    texts = torch.nn.functional.normalize(torch.randn(5, 32, generator=gen), dim=-1)
    head = text_head(model, texts, scale=50.0)
    x = model.example_input(batch=2, seed=3)
    result = attention_pass(model, x, head)
    ref_p, ref_g, ref_t = _reference(tower, tower, x, head, _explicit_open_clip)
    assert torch.equal(result.target, ref_t)
    scale = max(float(g.abs().max()) for g in ref_g)
    for mine, ref in zip(result.grads, ref_g):
        torch.testing.assert_close(mine, ref, atol=1e-6 * max(scale, 1.0), rtol=1e-4)
    gh, gw = result.grid
    want = _ref_chefer(ref_p, ref_g, 0, 1).reshape(2, gh, gw).float()
    torch.testing.assert_close(result.chefer(), want, atol=1e-6 * max(scale, 1), rtol=1e-4)
    want = _ref_gradcam(ref_p[-1], ref_g[-1], 0, 1, "chefer").reshape(2, gh, gw)
    torch.testing.assert_close(result.gradcam(), want, atol=1e-6 * max(scale, 1), rtol=1e-4)
    # an explicit target is differentiated instead of the top class
    other = (result.target + 1) % 5
    forced = attention_pass(model, x, head, target=other)
    assert torch.equal(forced.target, other)
    assert not torch.allclose(forced.grads[-1], result.grads[-1])


def test_text_head_scale_defaults_to_clip_logit_scale():
    clip = tiny_open_clip(seed=0)
    model = vd.wrap(clip)
    head = text_head(model, torch.randn(3, 32))
    assert head.scale == pytest.approx(float(clip.logit_scale.detach().exp()))
    z = torch.randn(4, 32)
    want = head.scale * torch.nn.functional.normalize(z, dim=-1) @ torch.nn.functional.normalize(head.weight, dim=-1).T
    torch.testing.assert_close(head.logits(z), want)


def test_zero_gradients_give_identity_rows_and_zero_gradcam():
    gen = torch.Generator().manual_seed(0)
    probs = [torch.softmax(torch.randn(2, 3, 6, 6, generator=gen), dim=-1) for _ in range(4)]
    zeros = [torch.zeros_like(p) for p in probs]
    rel = chefer_relevance_matrix(probs, zeros)
    torch.testing.assert_close(rel, torch.eye(6).expand(2, 6, 6))
    assert torch.equal(gradcam_row(probs[-1], zeros[-1], ("cls",)), torch.zeros(2, 6))
    # negative gradient x attention is cut by the ReLU: still the identity
    rel = chefer_relevance_matrix(probs, [-p for p in probs])
    torch.testing.assert_close(rel, torch.eye(6).expand(2, 6, 6))
    # start_layer skips the earlier blocks
    ones = [torch.ones_like(p) for p in probs]
    last = chefer_relevance_matrix(probs, ones, start_layer=-1)
    torch.testing.assert_close(last, torch.eye(6) + probs[-1].mean(dim=1))


def test_errors_are_clear():
    module = tiny_timm_vit("test_vit", img_size=32).eval()
    model = vd.wrap(module)
    x = model.example_input(batch=2)
    with pytest.raises(InputError, match="need a target"):
        attention_pass(model, x, None)
    plain = attention_pass(model, x, None, gradients=False)
    with pytest.raises(InputError, match="needs gradients"):
        plain.chefer()
    with pytest.raises(InputError, match="targets must be class indices"):
        attention_pass(model, x, classifier_head(model), target=[0, 10_000])
    with pytest.raises(InputError, match="does not fit a head"):
        attention_pass(model, x, LogitHead(torch.randn(3, 7)))
    with pytest.raises(InputError, match="no linear classifier"):
        classifier_head(tiny_open_clip_vision())


def test_hf_models_are_supported_through_their_output_projection():
    """transformers ViTs: gradients read at the attention's o_proj (checked against autograd in test_relevance_hf.py)."""
    from vitdecomp.testing.tiny_models import tiny_hf_vit

    model = vd.wrap(tiny_hf_vit(classifier=True))
    x = model.example_input(batch=1)
    result = attention_pass(model, x, LogitHead(torch.randn(3, model.describe()["width"])))
    assert len(result.grads) == len(result.probs) and result.grads[0].shape == result.probs[0].shape
