"""Token heatmaps (docs/method.md §6.4) and attention baselines (§6.5) on tiny models (offline, seconds).

Independent references: heatmap entries are read by hand from the token stack (prefix offset,
row-major grid); attention probabilities come from the models' own eager paths (timm with
``fused_attn = False`` and a hook on ``attn_drop``'s input, which is the softmax output;
open_clip's ``nn.MultiheadAttention`` asked for its weights), not from the adapters' ``qkv``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vitdecomp as vd
from vitdecomp.apps.segmentation.attention import attention_probs, raw_attention, rollout, rollout_matrix
from vitdecomp.errors import InputError, UnsupportedModelError
from vitdecomp.apps.heatmap import Heatmap, render_overlay, token_heatmap
from vitdecomp.core.tiny import build_tiny_clip
from vitdecomp.testing import tiny_timm_vit
from vitdecomp.testing.tiny_models import perturb


@pytest.fixture(scope="module")
def clip():
    return vd.wrap(perturb(build_tiny_clip(seed=0)))


@pytest.fixture(scope="module")
def clip_run(clip):
    x = clip.example_input(batch=2, seed=1)
    return x, vd.decompose(clip, x, granularity="head_token")


def unit(d: int, seed: int) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


# ----------------------------------------------------------------------------- heatmaps
def test_grid_prefix_and_hand_read_entries(clip_run):
    x, stack = clip_run
    assert x.shape[-2:] == (64, 64)
    y = unit(stack.dim, 0)
    heat = token_heatmap(stack, y)
    assert isinstance(heat, Heatmap)
    assert heat.patch.shape == (2, 8, 8) and heat.grid == (8, 8)
    assert list(heat.prefix) == ["cls"] and heat.prefix["cls"].shape == (2,)
    assert heat.components == tuple(stack.names)

    one = token_heatmap(stack, y, components=["L02.H01"])
    row = stack["L02.H01"]  # [batch, token, d]; token 0 is CLS, patches follow row-major
    for b, i, j in [(0, 0, 0), (1, 0, 5), (0, 6, 1), (1, 7, 7)]:
        expected = row[b, 1 + 8 * i + j] @ y
        torch.testing.assert_close(one.patch[b, i, j], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one.prefix["cls"], row[:, 0] @ y, rtol=1e-5, atol=1e-6)


def test_heatmap_sums_to_the_projection_of_the_summed_components(clip_run):
    _, stack = clip_run
    y = unit(stack.dim, 1)
    everything = token_heatmap(stack, y)
    reference = stack.reference @ y  # the model's own <y, z>
    scale = stack.reference.norm(dim=-1)
    assert ((everything.total() - reference).abs() <= 1e-5 * scale).all()

    chosen = ["embed", "L00.H02", "L03.H00", "L03.H03", "L02.mlp", "L01.bias"]
    part = token_heatmap(stack, y, components=chosen)
    direct = stack.take(chosen).sum_tokens().values.to(torch.float64) @ y.to(torch.float64)  # [comp, batch]
    torch.testing.assert_close(part.total().to(torch.float64), direct.sum(0), rtol=1e-5, atol=1e-5)
    assert part.components == tuple(chosen)
    # non-head rows write at the pooled (CLS) position only: heads alone make the patch map
    heads_only = token_heatmap(stack, y, components=[n for n in stack.names if ".H" in n])
    torch.testing.assert_close(heads_only.patch, everything.patch, rtol=1e-5, atol=1e-6)


def test_contrast_is_the_difference_of_maps(clip_run):
    _, stack = clip_run
    y1, y2 = unit(stack.dim, 2), unit(stack.dim, 3)
    comps = ["L03.H01", "L02.H00"]
    both = token_heatmap(stack, y1, contrast=y2, components=comps)
    a = token_heatmap(stack, y1, components=comps)
    b = token_heatmap(stack, y2, components=comps)
    torch.testing.assert_close(both.patch, a.patch - b.patch, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both.prefix["cls"], a.prefix["cls"] - b.prefix["cls"], rtol=1e-5, atol=1e-6)


def test_projected_stack_gives_the_same_map(clip, clip_run):
    x, stack = clip_run
    directions = torch.stack([unit(stack.dim, 4), unit(stack.dim, 5)])
    projected = vd.decompose(clip, x, granularity="head_token", directions=directions)
    comps = ["L03.H02", "L01.H00"]
    via_column = token_heatmap(projected, 0, contrast=1, components=comps)
    via_vector = token_heatmap(stack, directions[0], contrast=directions[1], components=comps)
    torch.testing.assert_close(via_column.patch, via_vector.patch, rtol=1e-4, atol=1e-5)
    single = vd.decompose(clip, x, granularity="head_token", directions=directions[:1])
    torch.testing.assert_close(
        token_heatmap(single, components=comps).patch,
        token_heatmap(stack, directions[0], components=comps).patch,
        rtol=1e-4,
        atol=1e-5,
    )
    with pytest.raises(InputError):
        token_heatmap(projected, 2)  # only columns 0 and 1
    with pytest.raises(InputError):
        token_heatmap(projected)  # two columns: which one?


def test_upsample_shapes_and_identity(clip_run):
    _, stack = clip_run
    heat = token_heatmap(stack, unit(stack.dim, 6))
    assert heat.upsample(64).shape == (2, 64, 64)
    assert heat.upsample((30, 50)).shape == (2, 30, 50)
    torch.testing.assert_close(heat.upsample(8), heat.patch)  # same size: bilinear is the identity
    flat = Heatmap(patch=torch.full((1, 8, 8), 0.25))
    torch.testing.assert_close(flat.upsample(17), torch.full((1, 17, 17), 0.25))


def test_heatmap_input_errors(clip, clip_run):
    x, stack = clip_run
    y = unit(stack.dim, 7)
    with pytest.raises(InputError, match="head_token"):
        token_heatmap(vd.decompose(clip, x, granularity="head"), y)
    with pytest.raises(InputError):
        token_heatmap(stack, y[:-1])
    with pytest.raises(InputError):
        token_heatmap(stack, 0)  # a column index needs a projected stack
    with pytest.raises(InputError):
        token_heatmap(stack, y, components=["L09.H00"])
    with pytest.raises(InputError):
        token_heatmap(stack, y, components=["not a label"])


def test_render_overlay_colours_and_size(tmp_path):
    from vitdecomp.synth.generator import Scene, SceneObject, render

    image, _ = render(Scene(objects=(SceneObject("circle", "red", "solid", "large", "centre"),), background="water"))
    heat = np.zeros((8, 8), dtype=np.float32)
    heat[:4] = 2.0
    heat[4:] = -1.0
    path = tmp_path / "sub" / "overlay.png"
    out = render_overlay(image, heat, path)
    assert out.size == image.size == (64, 64) and out.mode == "RGB"
    assert path.is_file() and Image.open(path).size == (64, 64)

    white = np.full((20, 30, 3), 255, dtype=np.uint8)
    bands = torch.tensor([1.0, 0.0, -1.0]).repeat_interleave(10).expand(20, 30).contiguous()  # at image size
    full = np.asarray(render_overlay(white, bands, alpha=1.0))
    assert full.shape == (20, 30, 3)
    assert tuple(full[10, 0]) == (255, 0, 0)  # positive extreme: red
    assert tuple(full[10, -1]) == (0, 0, 255)  # negative extreme: blue
    assert tuple(full[10, 15]) == (255, 255, 255)  # zero: white
    black = np.zeros((8, 8), dtype=np.uint8)  # grayscale input
    half = np.asarray(render_overlay(black, np.full((8, 8), 3.0), alpha=0.5))
    assert tuple(half[0, 0]) == (128, 0, 0)
    untouched = np.asarray(render_overlay(white, np.ones((4, 4)), alpha=0.0))
    assert (untouched == 255).all()


# ------------------------------------------------------------------- attention baselines
def eager_timm_attention(module: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Softmax outputs from timm's own eager path: ``fused_attn = False``, input of ``attn_drop``."""
    seen: list[torch.Tensor] = []
    flags = [blk.attn.fused_attn for blk in module.blocks]
    handles = [
        blk.attn.attn_drop.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
        for blk in module.blocks
    ]
    try:
        for blk in module.blocks:
            blk.attn.fused_attn = False
        with torch.no_grad():
            module.forward_features(x)
    finally:
        for blk, flag in zip(module.blocks, flags):
            blk.attn.fused_attn = flag
        for h in handles:
            h.remove()
    assert len(seen) == len(module.blocks)
    return seen


def rollout_by_hand(probs: list[torch.Tensor], start: int) -> torch.Tensor:
    """R = Â_{L-1} @ ... @ Â_start, per image, with Â = row-normalised (head mean + I)."""
    out = []
    for b in range(probs[0].shape[0]):
        mats = []
        for a in probs[start:]:
            m = a[b].mean(0) + torch.eye(a.shape[-1])
            mats.append(m / m.sum(1, keepdim=True))
        out.append(torch.linalg.multi_dot(mats[::-1]) if len(mats) > 1 else mats[0])
    return torch.stack(out)


@pytest.fixture(scope="module")
def timm_vit():
    return vd.wrap(tiny_timm_vit("test_vit", img_size=64))


def test_attention_probs_match_timm_eager_softmax(timm_vit):
    module = timm_vit.module
    assert any(blk.attn.fused_attn for blk in module.blocks)  # the harness must not need eager mode
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))  # grid 4 x 6
    probs = attention_probs(timm_vit, x)
    reference = eager_timm_attention(module, x)
    assert len(probs) == len(reference) == 6
    for ours, ref in zip(probs, reference):
        assert ours.shape == (2, 2, 25, 25)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


def test_rollout_and_raw_attention_against_the_eager_reference(timm_vit):
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    reference = eager_timm_attention(timm_vit.module, x)
    probs = attention_probs(timm_vit, x)
    for start in (0, 1, -2):
        joint = rollout_matrix(probs, start)
        assert (joint >= 0).all()
        torch.testing.assert_close(joint.sum(-1), torch.ones(2, 25), rtol=0, atol=1e-5)  # rows are distributions
        expected = rollout_by_hand(reference, start % 6)
        torch.testing.assert_close(joint, expected, rtol=1e-4, atol=1e-6)
        maps = rollout(timm_vit, x, start_layer=start)
        assert maps.shape == (2, 4, 6)
        torch.testing.assert_close(maps, expected[:, 0, 1:].reshape(2, 4, 6), rtol=1e-4, atol=1e-6)
    raw = raw_attention(timm_vit, x)
    torch.testing.assert_close(raw, reference[-1].mean(1)[:, 0, 1:].reshape(2, 4, 6), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        raw_attention(timm_vit, x, layer=2), reference[2].mean(1)[:, 0, 1:].reshape(2, 4, 6), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(InputError):
        raw_attention(timm_vit, x, layer=6)


def test_models_without_cls_use_the_mean_query_row():
    model = vd.wrap(tiny_timm_vit("test_vit2", img_size=64, depth=3))  # one register, avg pool
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    reference = eager_timm_attention(model.module, x)
    raw = raw_attention(model, x)
    torch.testing.assert_close(raw, reference[-1].mean(1).mean(1)[:, 1:].reshape(1, 4, 4), rtol=1e-5, atol=1e-6)
    expected = rollout_by_hand(reference, 1).mean(1)[:, 1:].reshape(1, 4, 4)  # default: from block 1 (Chefer)
    torch.testing.assert_close(rollout(model, x), expected, rtol=1e-4, atol=1e-6)
    from_zero = rollout_by_hand(reference, 0).mean(1)[:, 1:].reshape(1, 4, 4)
    torch.testing.assert_close(rollout(model, x, start_layer=0), from_zero, rtol=1e-4, atol=1e-6)
    with pytest.raises(InputError, match="no CLS"):
        raw_attention(model, x, query="cls")


def test_attention_probs_match_open_clip_multihead_weights(clip, clip_run):
    x, _ = clip_run
    visual = clip.module.visual
    inputs: list[torch.Tensor] = []
    blocks = visual.transformer.resblocks
    handles = [blk.ln_1.register_forward_hook(lambda m, a, out: inputs.append(out)) for blk in blocks]
    try:
        with torch.no_grad():
            clip.module.encode_image(x)
    finally:
        for h in handles:
            h.remove()
    probs = attention_probs(clip, x)
    assert len(probs) == len(inputs) == 4
    for blk, u, ours in zip(blocks, inputs, probs):
        with torch.no_grad():
            _, weights = blk.attn(u, u, u, need_weights=True, average_attn_weights=False)
        assert ours.shape == weights.shape == (2, 4, 65, 65)
        torch.testing.assert_close(ours, weights, rtol=1e-5, atol=1e-6)
    assert rollout(clip, x).shape == raw_attention(clip, x).shape == (2, 8, 8)


def test_hierarchical_models_are_refused():
    import timm

    swin = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4, window_size=4,
        embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=4,
    ).eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(UnsupportedModelError, match="isotropic"):
        attention_probs(swin, x)
    with pytest.raises(UnsupportedModelError):
        rollout(vd.wrap(swin), x)
