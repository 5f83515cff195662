"""open_clip ViT towers: exactness, consistency and loading on tiny random models (offline)."""
from __future__ import annotations

import json

import pytest
import torch

import vitdecomp as vd
from vitdecomp.testing import assert_exact, tiny_open_clip, tiny_open_clip_vision

VARIANTS = {
    "tok": {},
    "avg": dict(pool_type="avg"),
    "ln_after_pool_avg": dict(pool_type="avg", final_ln_after_pool=True),
    "layer_scale": dict(ls_init_value=0.5),
    "output_tokens": dict(output_tokens=True),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def tower(request):
    model = vd.wrap(tiny_open_clip_vision(**VARIANTS[request.param]))
    return model, model.example_input(batch=2, seed=2)


@pytest.mark.parametrize("granularity", ["layer", "head", "head_token"])
@pytest.mark.parametrize("start_layer", [0, -1])
def test_sums_to_the_image_embedding(tower, granularity, start_layer):
    model, x = tower
    stack = vd.decompose(model, x, granularity=granularity, start_layer=start_layer)
    assert_exact(stack, 1e-5)
    with torch.no_grad():  # nn.MultiheadAttention's no-grad fast path rounds differently
        out = model.module(x)
    torch.testing.assert_close(stack.reference, out[0] if isinstance(out, tuple) else out, rtol=0, atol=0)
    assert stack.dim == 32  # after the projection


def test_fp64_and_token_terms_sum_to_heads(tower):
    model, x = tower
    heads = vd.decompose(model, x, dtype=torch.float64)
    tokens = vd.decompose(model, x, granularity="head_token", dtype=torch.float64)
    assert heads.error() < 1e-10 and tokens.error() < 1e-10
    torch.testing.assert_close(tokens.sum_tokens().values, heads.values, rtol=1e-9, atol=1e-12)
    assert tokens.tokens.types[0] == "cls" and tokens.tokens.grid == (4, 4)


def test_heads_match_a_naive_reference():
    module = tiny_open_clip_vision(seed=3)
    model = vd.wrap(module)
    x = model.example_input(batch=2, seed=4)
    stack = vd.decompose(model, x, dtype=torch.float64)
    m = module.double()
    try:
        with torch.no_grad():
            h = m._embeds(x.double())
            writes = {}
            for layer, blk in enumerate(m.transformer.resblocks):
                u = blk.ln_1(h)
                a = blk.attn
                d, n_heads = a.embed_dim, a.num_heads
                dh = d // n_heads
                q, k, v = (u @ a.in_proj_weight.T + a.in_proj_bias).split(d, dim=-1)
                split = lambda t: t.reshape(t.shape[0], t.shape[1], n_heads, dh).transpose(1, 2)  # noqa: E731
                q, k, v = split(q), split(k), split(v)
                pattern = torch.softmax(q @ k.transpose(-1, -2) / dh**0.5, dim=-1)
                v_plain = v - a.in_proj_bias[2 * d :].reshape(1, n_heads, 1, dh)
                for head in range(n_heads):
                    w_o = a.out_proj.weight[:, head * dh : (head + 1) * dh]
                    z = torch.einsum("bn,bnd->bd", pattern[:, head, 0], v_plain[:, head])
                    writes[(layer, head)] = z @ w_o.T
                h = h + blk.attention(q_x=u)
                h = h + blk.mlp(blk.ln_2(h))
            cls = h[:, 0]
            ln = m.ln_post
            sigma = (cls.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
            for (layer, head), w in writes.items():
                expected = (ln.weight * (w - w.mean(-1, keepdim=True)) / sigma) @ m.proj
                torch.testing.assert_close(stack[f"L{layer:02d}.H{head:02d}"], expected, rtol=1e-8, atol=1e-10)
    finally:
        m.float()


def test_whole_clip_model_is_read_through_its_visual_tower():
    clip = tiny_open_clip()
    model = vd.wrap(clip)
    x = model.example_input(batch=2)
    stack = vd.decompose(model, x)
    assert stack.error() < 1e-5
    with torch.no_grad():
        torch.testing.assert_close(stack.reference, clip.encode_image(x), rtol=0, atol=0)


def test_hooks_removed_and_batch_invariance(tower):
    model, x = tower
    with torch.no_grad():
        before = model.module(x)
    batch = vd.decompose(model, x, granularity="head_token")
    for module in model.module.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    with torch.no_grad():
        after = model.module(x)
    for a, b in zip(before if isinstance(before, tuple) else (before,), after if isinstance(after, tuple) else (after,)):
        assert torch.equal(a, b)
    alone = vd.decompose(model, x[1:], granularity="head_token")
    torch.testing.assert_close(batch.values[:, 1:], alone.values, rtol=1e-4, atol=1e-5)


@pytest.fixture()
def tiny_arch(tmp_path):
    import open_clip

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 4, "layers": 2},
    }
    (tmp_path / "vd-tiny-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    return "vd-tiny-test"


def test_load_random_init_and_checkpoint(tiny_arch, tmp_path):
    from safetensors.torch import save_file

    model = vd.load(f"open_clip:{tiny_arch}", pretrained=False)
    assert model.weights == "random-init" and model.family == "open_clip-vit"
    assert "clip" in model.extras and "tokenizer" in model.extras
    x = model.example_input(batch=2)
    assert vd.decompose(model, x).error() < 1e-5
    path = tmp_path / "w.safetensors"
    clip = model.extras["clip"]
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    again = vd.load(f"open_clip:{tiny_arch}", pretrained=False, checkpoint=path)
    assert again.weights.startswith("checkpoint:")
    torch.testing.assert_close(again.representation(x), model.representation(x), rtol=0, atol=0)


def test_pretrained_offline_and_bad_names_fail_clearly(tiny_arch):
    with pytest.raises(vd.WeightsUnavailableError):
        vd.load("open_clip:ViT-B-32:openai", pretrained=True)
    with pytest.raises(vd.InputError, match="no architecture"):
        vd.load("open_clip:ViT-Nope-99", pretrained=False)
    with pytest.raises(vd.InputError, match="no pretrained weights"):
        vd.load(f"open_clip:{tiny_arch}", pretrained=True)


def test_attentional_pooler_is_unsupported():
    module = tiny_open_clip_vision(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2)
    with pytest.raises(vd.UnsupportedModelError, match="AttentionalPooler"):
        vd.wrap(module)
