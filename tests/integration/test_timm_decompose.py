"""Exactness and behaviour of decompose() on tiny random timm ViTs (offline, seconds)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vitdecomp as vd
from vitdecomp.testing import assert_exact, tiny_timm_vit

# (timm name, kwargs): CLS pool + LayerNorm; register + avg pool + fc_norm + LayerScale;
# RMSNorm; avg pool without fc_norm (per-token norm, then mean); DINOv2 with registers and
# LayerScale at a non-default image size; DeiT distilled (two pooled tokens); qk-norm;
# MAP attention pooling (timm's test_vit3 and a SigLIP-shaped tower).
VARIANTS = {
    "cls": ("test_vit", {}),
    "reg_avg_fcnorm_ls": ("test_vit2", {}),
    "rmsnorm": ("test_vit4", {}),
    "avg_token_norm": ("vit_tiny_patch16_224", dict(global_pool="avg", fc_norm=False, depth=2, img_size=64)),
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", dict(depth=2, img_size=56)),
    "distilled": ("deit_tiny_distilled_patch16_224", dict(depth=2, img_size=64)),
    "qk_norm": ("vit_tiny_patch16_224", dict(qk_norm=True, depth=2, img_size=64)),
    "map_pool": ("test_vit3", {}),
    "siglip_map": ("vit_base_patch16_siglip_224", dict(depth=2, embed_dim=64, num_heads=4, img_size=32)),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request):
    name, kwargs = VARIANTS[request.param]
    model = vd.wrap(tiny_timm_vit(name, **kwargs))
    return request.param, model, model.example_input(batch=2, seed=1)


@pytest.mark.parametrize("granularity", ["layer", "head", "head_token"])
@pytest.mark.parametrize("start_layer", [0, -1])
def test_sums_to_model_output_fp32(variant, granularity, start_layer):
    _, model, x = variant
    stack = vd.decompose(model, x, granularity=granularity, start_layer=start_layer)
    assert_exact(stack, 1e-5)
    torch.testing.assert_close(stack.reference, model.representation(x), rtol=0, atol=0)
    first = "embed" if start_layer == 0 else "rest"
    assert stack.names[0] == first and stack.names[-1] == "bias"
    if granularity == "head_token":
        assert stack.values.dim() == 4 and stack.tokens is not None
        assert stack.tokens.types.count("patch") == stack.tokens.grid[0] * stack.tokens.grid[1]


def test_sums_to_model_output_fp64(variant):
    _, model, x = variant
    for granularity in ("head", "head_token"):
        stack = vd.decompose(model, x, granularity=granularity, dtype=torch.float64)
        assert stack.values.dtype == torch.float64
        assert stack.error() < 1e-10
    assert model.dtype == torch.float32  # the model was cast back


@pytest.mark.parametrize("ln_mode", ["centered", "anchor"])
@pytest.mark.parametrize("bias_mode", ["explicit", "anchor", "split"])
def test_every_convention_is_exact(variant, ln_mode, bias_mode):
    _, model, x = variant
    for granularity in ("head", "head_token"):
        stack = vd.decompose(model, x, granularity=granularity, ln_mode=ln_mode, bias_mode=bias_mode)
        assert stack.error() < 1e-5
        has_bias_rows = any(lab.kind == "bias" for lab in stack.labels)
        assert has_bias_rows == (bias_mode == "explicit")
        assert ("bias" in stack.names) == (ln_mode == "centered" and bias_mode != "split")


@pytest.mark.parametrize("bias_mode", ["explicit", "anchor", "split"])
def test_token_terms_sum_to_head_terms(variant, bias_mode):
    _, model, x = variant
    heads = vd.decompose(model, x, granularity="head", bias_mode=bias_mode, dtype=torch.float64)
    tokens = vd.decompose(model, x, granularity="head_token", bias_mode=bias_mode, dtype=torch.float64)
    assert heads.labels == tokens.labels
    torch.testing.assert_close(tokens.sum_tokens().values, heads.values, rtol=1e-9, atol=1e-12)


def test_heads_sum_to_layer_attention_term(variant):
    _, model, x = variant
    heads = vd.decompose(model, x, granularity="head", dtype=torch.float64)
    layers = vd.decompose(model, x, granularity="layer", dtype=torch.float64)
    grouped = heads.group("attn_mlp")
    for layer in range(model.n_layers):
        attn = grouped[f"L{layer:02d}.attn"]
        torch.testing.assert_close(attn, layers[f"L{layer:02d}.attn"] + layers[f"L{layer:02d}.bias"])
        torch.testing.assert_close(grouped[f"L{layer:02d}.mlp"], layers[f"L{layer:02d}.mlp"])


def test_neurons_sum_to_mlp(variant):
    _, model, x = variant
    plain = vd.decompose(model, x, dtype=torch.float64)
    neurons = vd.decompose(model, x, mlp_neurons=True, dtype=torch.float64)
    assert neurons.error() < 1e-10
    for layer in range(model.n_layers):
        rows = neurons.select(kind=("neuron", "mlp_bias"), layer=layer).values.sum(0)
        torch.testing.assert_close(rows, plain[f"L{layer:02d}.mlp"], rtol=1e-9, atol=1e-10)


def test_rest_equals_everything_before_start(variant):
    _, model, x = variant
    full = vd.decompose(model, x, dtype=torch.float64)
    late = vd.decompose(model, x, start_layer=-1, dtype=torch.float64)
    last = model.n_layers - 1
    before = full.values[[i for i, lab in enumerate(full.labels) if lab.kind == "embed" or (lab.layer is not None and lab.layer < last)]]
    torch.testing.assert_close(late["rest"], before.sum(0), rtol=1e-9, atol=1e-10)
    for name in late.names[1:]:
        torch.testing.assert_close(late[name], full[name], rtol=1e-9, atol=1e-10)


def test_directions_project_before_expanding(variant):
    _, model, x = variant
    d = model.representation(x).shape[-1]
    dirs = F.normalize(torch.randn(7, d, generator=torch.Generator().manual_seed(3)), dim=-1)
    for granularity in ("head", "head_token"):
        direct = vd.decompose(model, x, granularity=granularity, directions=dirs, dtype=torch.float64)
        after = vd.decompose(model, x, granularity=granularity, dtype=torch.float64).project(dirs.double())
        assert direct.values.shape[-1] == 7 and direct.space == "projected"
        torch.testing.assert_close(direct.values, after.values, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(direct.reference, after.reference)


def test_normalize_divides_by_the_representation_norm(variant):
    _, model, x = variant
    stack = vd.decompose(model, x, normalize=True)
    torch.testing.assert_close(stack.total().norm(dim=-1), torch.ones(x.shape[0], dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert stack.error() < 1e-5


def test_batch_invariance(variant):
    _, model, x = variant
    x3 = torch.cat([x, model.example_input(batch=1, seed=9)])
    alone = vd.decompose(model, x3[1:2], granularity="head_token")
    batch = vd.decompose(model, x3, granularity="head_token")
    torch.testing.assert_close(batch.values[:, 1:2], alone.values, rtol=1e-4, atol=1e-5)


def test_hooks_removed_and_output_bit_identical(variant):
    _, model, x = variant
    before = model.module(x)
    vd.decompose(model, x, granularity="head_token", mlp_neurons=False)
    for module in model.module.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert torch.equal(model.module(x), before)


def test_hooks_removed_when_the_forward_fails():
    model = vd.wrap(tiny_timm_vit("vit_tiny_patch16_224", depth=1, img_size=32))
    with pytest.raises(vd.InputError, match="expected input size"):
        vd.decompose(model, torch.randn(1, 3, 48, 48))  # fixed-size model: timm asserts
    for module in model.module.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_fused_and_eager_attention_agree(variant):
    _, model, x = variant
    attns = [blk.attn for blk in model.module.blocks]
    fused_flags = [a.fused_attn for a in attns]
    try:
        for a in attns:
            a.fused_attn = True
        fused = vd.decompose(model, x, granularity="head_token")
        for a in attns:
            a.fused_attn = False
        eager = vd.decompose(model, x, granularity="head_token")
    finally:
        for a, flag in zip(attns, fused_flags):
            a.fused_attn = flag
    torch.testing.assert_close(fused.values, eager.values, rtol=1e-4, atol=1e-5)
    assert fused.error() < 1e-5 and eager.error() < 1e-5


def _naive_cls_heads(module, x):
    """Per-head direct effects for a CLS-pooled timm ViT, written out explicitly.

    Runs the blocks by hand from their weights (full attention matrices, every query row),
    then pushes each head's CLS write through the final LayerNorm with frozen statistics.
    """
    with torch.no_grad():
        h = module.norm_pre(module._pos_embed(module.patch_embed(x)))
        writes = {}
        for layer, blk in enumerate(module.blocks):
            u = blk.norm1(h)
            a = blk.attn
            qkv = u @ a.qkv.weight.T + a.qkv.bias
            b, n, _ = qkv.shape
            q, k, v = qkv.reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
            pattern = torch.softmax(q @ k.transpose(-1, -2) / a.head_dim**0.5, dim=-1)
            v_nobias = v - a.qkv.bias[2 * a.attn_dim :].reshape(1, a.num_heads, 1, a.head_dim)
            z = pattern @ v_nobias  # [B, H, N, dh]
            w_o = a.proj.weight.reshape(-1, a.num_heads, a.head_dim)  # [d, H, dh]
            for head in range(a.num_heads):
                writes[(layer, head)] = blk.ls1(z[:, head, 0] @ w_o[:, head].T)
            z_full = pattern @ v  # the block's own output keeps the value bias
            h = h + blk.ls1(a.proj(z_full.transpose(1, 2).reshape(b, n, -1)))
            h = h + blk.ls2(blk.mlp(blk.norm2(h)))
        final = module.norm
        cls = h[:, 0]
        sigma = (cls.var(dim=-1, unbiased=False, keepdim=True) + final.eps).sqrt()
        return {key: final.weight * (w - w.mean(-1, keepdim=True)) / sigma for key, w in writes.items()}


def test_head_terms_match_a_naive_reference():
    module = tiny_timm_vit("test_vit", seed=4)
    model = vd.wrap(module)
    x = model.example_input(batch=2, seed=5)
    stack = vd.decompose(model, x, granularity="head")
    naive = _naive_cls_heads(module, x)
    assert len(naive) == sum(lab.kind == "head" for lab in stack.labels)
    for (layer, head), value in naive.items():
        torch.testing.assert_close(stack[f"L{layer:02d}.H{head:02d}"], value, rtol=1e-4, atol=1e-5)


def test_classifier_logits_from_projection():
    model = vd.wrap(tiny_timm_vit("test_vit"))
    x = model.example_input(batch=3)
    weight, bias = model.classifier()
    logits = vd.decompose(model, x).project(weight).total() + bias
    torch.testing.assert_close(logits.float(), model.module(x), rtol=1e-4, atol=1e-4)


def test_anchor_ln_mode_differs_per_component_but_not_in_total():
    model = vd.wrap(tiny_timm_vit("test_vit"))
    x = model.example_input(batch=2)
    centered = vd.decompose(model, x, dtype=torch.float64)
    anchor = vd.decompose(model, x, ln_mode="anchor", dtype=torch.float64)
    assert not torch.allclose(centered["L00.H00"], anchor["L00.H00"])
    torch.testing.assert_close(anchor.total(), centered.total())
    # centred terms are gamma * (Pi c) / sigma: zero channel mean once gamma is divided out
    gamma = model.module.norm.weight.double()
    assert (centered["L00.H00"] / gamma).mean(-1).abs().max() < 1e-10
    assert (anchor["L00.H00"] / gamma).mean(-1).abs().max() > 1e-6


def test_training_mode_is_restored_and_dropout_ignored():
    module = tiny_timm_vit("test_vit", drop_rate=0.5, attn_drop_rate=0.5)
    module.train()
    model = vd.wrap(module)
    x = model.example_input(batch=2)
    stack = vd.decompose(model, x)
    assert module.training and stack.error() < 1e-5


def test_checkpoint_round_trip(tmp_path):
    from safetensors.torch import save_file

    source = tiny_timm_vit("test_vit", seed=11)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = vd.load("timm:test_vit", pretrained=False, checkpoint=path)
    assert model.weights.startswith("checkpoint:")
    x = model.example_input(batch=2)
    torch.testing.assert_close(model.representation(x), vd.wrap(source).representation(x), rtol=0, atol=0)
    torch_path = tmp_path / "weights.pth"
    torch.save({"state_dict": source.state_dict()}, torch_path)
    again = vd.load("timm:test_vit", pretrained=False, checkpoint=torch_path)
    torch.testing.assert_close(again.representation(x), model.representation(x), rtol=0, atol=0)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, str(wrong))
    with pytest.raises(vd.InputError):
        vd.load("timm:test_vit", pretrained=False, checkpoint=wrong)
    with pytest.raises(vd.InputError):
        vd.load("timm:test_vit", pretrained=False, checkpoint=tmp_path / "missing.safetensors")


def test_random_init_load_is_offline_and_labelled():
    model = vd.load("timm:test_vit", pretrained=False)
    assert model.weights == "random-init" and model.family == "timm-vit"
    assert vd.decompose(model, model.example_input()).error() < 1e-5


def test_pretrained_offline_fails_fast_with_a_fix():
    with pytest.raises(vd.WeightsUnavailableError, match="pretrained=False"):
        vd.load("timm:test_vit", pretrained=True)


@pytest.mark.parametrize(
    "spec, error",
    [("timm_vit", vd.InputError), ("nope:thing", vd.InputError), ("timm:no_such_model_xyz", vd.InputError), ("timm:", vd.InputError)],
)
def test_bad_specs(spec, error):
    with pytest.raises(error):
        vd.load(spec, pretrained=False)


@pytest.mark.parametrize(
    "name, kwargs, reason",
    [
        ("test_vit", dict(global_pool="max"), "max"),
        ("test_vit", dict(global_pool="avgmax"), "avgmax"),
        ("vit_tiny_patch16_224", dict(depth=1, scale_attn_norm=True), "scale_norm"),
    ],
)
def test_unsupported_variants_raise(name, kwargs, reason):
    import timm

    module = timm.create_model(name, pretrained=False, **kwargs)
    with pytest.raises(vd.UnsupportedModelError, match=reason):
        vd.wrap(module)


def test_multi_latent_attention_pool_is_unsupported():
    from timm.layers.attention_pool import AttentionPoolLatent

    module = tiny_timm_vit("test_vit3")
    module.attn_pool = AttentionPoolLatent(module.embed_dim, num_heads=2, latent_len=2)
    with pytest.raises(vd.UnsupportedModelError, match="latent"):
        vd.wrap(module)


def test_attention_pool_has_a_pool_mlp_leaf():
    model = vd.wrap(tiny_timm_vit("test_vit3"))
    x = model.example_input(batch=2)
    stack = vd.decompose(model, x)
    assert "pool_mlp" in stack.names
    neurons = vd.decompose(model, x, mlp_neurons=True)  # per-neuron terms through the pool routes
    assert neurons.error() < 1e-5 and "pool_mlp" in neurons.names


def test_non_vit_module_is_unsupported():
    with pytest.raises(vd.UnsupportedModelError, match="no vitdecomp adapter"):
        vd.wrap(torch.nn.Linear(3, 3))
    with pytest.raises(vd.InputError):
        vd.wrap("timm:test_vit")


@pytest.mark.parametrize(
    "kwargs",
    [dict(granularity="neuron"), dict(ln_mode="nope"), dict(bias_mode="nope"), dict(start_layer=7),
     dict(start_layer=-9), dict(granularity="head_token", mlp_neurons=True)],
)
def test_bad_arguments(kwargs):
    model = vd.wrap(tiny_timm_vit("test_vit"))
    with pytest.raises(vd.InputError):
        vd.decompose(model, model.example_input(), **kwargs)


def test_bad_pixels():
    model = vd.wrap(tiny_timm_vit("test_vit"))
    x = model.example_input()
    for bad in (x[0], x[:0], x.to(torch.uint8), x.numpy()):
        with pytest.raises(vd.InputError):
            vd.decompose(model, bad)


def test_register_and_cls_shares_are_reported():
    model = vd.wrap(tiny_timm_vit("vit_small_patch14_reg4_dinov2", depth=2, img_size=56))
    stack = vd.decompose(model, model.example_input(batch=2), granularity="head_token")
    shares = stack.token_shares()
    assert set(shares) == {"cls", "reg", "patch"}
    assert stack.tokens.types[:5] == ("cls", "reg", "reg", "reg", "reg") and stack.tokens.grid == (4, 4)
    head = stack.index("L01.H00")
    values = stack.values[head]  # [batch, token, d]
    expected = values[:, 1:5].sum(1).norm(dim=-1) / values.sum(1).norm(dim=-1)
    torch.testing.assert_close(shares["reg"][head], expected)
    with pytest.raises(ValueError):
        stack.sum_tokens().token_shares()
