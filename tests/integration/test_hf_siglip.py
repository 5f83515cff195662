"""The transformers adapter on tiny random SigLIP models (offline, seconds).

SigLIP has no CLS token: ``post_layernorm`` normalises every token and the
``SiglipMultiheadAttentionPoolingHead`` (one learned probe query, ``nn.MultiheadAttention``,
then ``a + mlp(layernorm(a))``) pools them. vitdecomp reads it as an attention pool: every
pool head is a route, ``mlp(layernorm(a))`` one leaf (``pool_mlp``). Covered:
``SiglipVisionModel`` (eager and SDPA), ``SiglipModel`` (image tower),
``SiglipForImageClassification``, a tower without head (``vision_use_head=False``), the
loader on ``save_pretrained`` directories with and without a ``SiglipImageProcessor``, an
independent per-(layer head, pool head) reference, and the refusals (SigLIP 2 NaFlex,
text towers, non-standard ``nn.MultiheadAttention`` settings).

fp64 exactness is tested with SDPA attention: transformers' eager attention computes its
softmax in float32 even for a float64 model, so eager fp64 only reaches ~1e-8 (tested too).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "SiglipVisionModel"):  # pragma: no cover - old transformers
    pytest.skip("this transformers has no SigLIP", allow_module_level=True)

import vitdecomp as vd
from vitdecomp.core.adapters.hf_vit import HFViTAdapter
from vitdecomp.core.readout import AttentionPool
from vitdecomp.testing import assert_exact, tiny_hf_siglip, tiny_hf_siglip_vision

N_HEADS = 4  # every tiny tower: width 64, 4 heads of 16, 2 blocks, 32 px, patch 8 -> 4x4 grid
N_LAYERS = 2

VARIANTS: dict[str, Callable[[str], nn.Module]] = {
    "vision": lambda impl: tiny_hf_siglip_vision(attn_implementation=impl),
    "model": lambda impl: tiny_hf_siglip(attn_implementation=impl),
    "classifier": lambda impl: tiny_hf_siglip(classifier=True, attn_implementation=impl),
    "no_head": lambda impl: tiny_hf_siglip_vision(vision_use_head=False, attn_implementation=impl),
}
IMPLS = ("eager", "sdpa")


def _tower(module: nn.Module) -> Any:
    """The SiglipVisionModel (5.x) / SiglipVisionTransformer (4.x) owning embeddings, encoder, head."""
    core: Any = module
    while getattr(core, "encoder", None) is None and getattr(core, "vision_model", None) is not None:
        core = core.vision_model
    return core


def _stock_representation(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Each class's documented representation, computed here from the stock outputs."""
    m: Any = module
    name = type(m).__name__
    with torch.no_grad():
        if name == "SiglipModel":
            out = m.get_image_features(pixel_values=x)
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        if name == "SiglipForImageClassification":
            return m.vision_model(pixel_values=x).last_hidden_state.mean(dim=1)
        out = m(pixel_values=x)
        if out.pooler_output is None:  # vision_use_head=False
            return out.last_hidden_state.mean(dim=1)
        return out.pooler_output


def _has_head(module: nn.Module) -> bool:
    return type(module).__name__ != "SiglipForImageClassification" and bool(getattr(_tower(module), "use_head", True))


@pytest.fixture(
    scope="module", params=[(v, i) for v in sorted(VARIANTS) for i in IMPLS], ids=lambda p: f"{p[0]}-{p[1]}"
)
def variant(request):
    name, impl = request.param
    module = VARIANTS[name](impl)
    assert _tower(module).config._attn_implementation == impl
    model = vd.wrap(module)
    return name, model, model.example_input(batch=2, seed=1)


@pytest.fixture(scope="module")
def vision():
    """The SDPA SiglipVisionModel, its wrapper and a batch."""
    model = vd.wrap(tiny_hf_siglip_vision(attn_implementation="sdpa"))
    return model, model.example_input(batch=3, seed=2)


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("granularity", ["layer", "head", "head_token"])
@pytest.mark.parametrize("start_layer", [0, 1])
def test_sums_to_the_stock_representation_fp32(variant, granularity, start_layer):
    name, model, x = variant
    stack = vd.decompose(model, x, granularity=granularity, start_layer=start_layer)
    assert_exact(stack, 1e-5)
    assert stack.error() <= 1e-5
    # the reference is the stock output itself (pooler_output for the towers with a head)
    torch.testing.assert_close(stack.reference, _stock_representation(model.module, x), rtol=0, atol=0)
    assert model.family == "hf-vit"
    assert stack.names[0] == ("embed" if start_layer == 0 else "rest")
    assert ("pool_mlp" in stack.names) == _has_head(model.module)
    heads = [lab for lab in stack.labels if lab.kind == "head"]
    assert len(heads) == (0 if granularity == "layer" else (N_LAYERS - start_layer) * N_HEADS)
    if granularity == "head_token":
        assert stack.values.dim() == 4 and stack.values.shape[2] == 16


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("granularity", ["layer", "head", "head_token"])
@pytest.mark.parametrize("start_layer", [0, 1])
def test_sums_to_the_stock_representation_fp64_sdpa(name, granularity, start_layer):
    model = vd.wrap(VARIANTS[name]("sdpa"))
    x = model.example_input(batch=2, seed=1)
    stack = vd.decompose(model, x, granularity=granularity, start_layer=start_layer, dtype=torch.float64)
    assert stack.values.dtype == torch.float64
    assert stack.error() < 1e-10
    assert model.dtype == torch.float32  # cast back after the pass


def test_eager_fp64_is_exact_up_to_the_float32_softmax_of_eager_attention(variant):
    """transformers' eager SigLIP attention runs its softmax in float32 even for a float64
    model, so the model's own fp64 output carries fp32 rounding of the pattern and the split
    (fp64 pattern) agrees to ~1e-8 only; with SDPA it is fp64 exact."""
    _, model, x = variant
    stack = vd.decompose(model, x, granularity="head_token", dtype=torch.float64, check=False)
    assert stack.error() < 1e-6
    if _tower(model.module).config._attn_implementation == "sdpa":
        assert stack.error() < 1e-10


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_eager_and_sdpa_give_the_same_stack(name):
    weights = VARIANTS[name]("sdpa").state_dict()
    stacks = {}
    for impl in IMPLS:
        module = VARIANTS[name](impl)
        module.load_state_dict(weights)
        model = vd.wrap(module)
        stacks[impl] = vd.decompose(model, model.example_input(batch=2, seed=3), granularity="head_token")
    assert stacks["eager"].labels == stacks["sdpa"].labels
    torch.testing.assert_close(stacks["eager"].values, stacks["sdpa"].values, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bias_mode", ["explicit", "anchor", "split"])
def test_token_terms_sum_to_head_terms(vision, bias_mode):
    model, x = vision
    heads = vd.decompose(model, x, granularity="head", bias_mode=bias_mode, dtype=torch.float64)
    tokens = vd.decompose(model, x, granularity="head_token", bias_mode=bias_mode, dtype=torch.float64)
    assert heads.labels == tokens.labels
    torch.testing.assert_close(tokens.sum_tokens().values, heads.values, rtol=1e-9, atol=1e-12)


def test_heads_sum_to_the_layer_attention_term(vision):
    model, x = vision
    heads = vd.decompose(model, x, granularity="head", dtype=torch.float64).group("attn_mlp")
    layers = vd.decompose(model, x, granularity="layer", dtype=torch.float64)
    for layer in range(N_LAYERS):
        torch.testing.assert_close(
            heads[f"L{layer:02d}.attn"], layers[f"L{layer:02d}.attn"] + layers[f"L{layer:02d}.bias"]
        )
        torch.testing.assert_close(heads[f"L{layer:02d}.mlp"], layers[f"L{layer:02d}.mlp"])
    torch.testing.assert_close(heads["pool_mlp"], layers["pool_mlp"])


# ---------------------------------------------------------------------------- the pooling head
def _pool_capture(module: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the stock head sees and writes: its input ``y`` (post-layernormed tokens), the
    attention output ``a`` and the MLP leaf ``mlp(layernorm(a))``; fp64 model copy."""
    m: Any = copy.deepcopy(module).double()
    head = _tower(m).head
    got: dict[str, torch.Tensor] = {}
    handles = [
        head.register_forward_pre_hook(lambda _m, args: got.__setitem__("y", args[0])),
        head.attention.register_forward_hook(lambda _m, _i, out: got.__setitem__("a", out[0][:, 0])),
        head.mlp.register_forward_hook(lambda _m, _i, out: got.__setitem__("mlp", out[:, 0])),
        head.register_forward_hook(lambda _m, _i, out: got.__setitem__("z", out)),
    ]
    with torch.no_grad():
        _stock_representation(m, x.double())
    for h in handles:
        h.remove()
    return got


def _naive_pool_heads(module: nn.Module, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head outputs of the head's nn.MultiheadAttention, from its weights:
    ``o_r = softmax(q_r k_r^T / sqrt(d_h)) (y W_V^r + b_V^r) W_O^r`` ``[R, B, d]`` and the
    patterns ``beta [R, B, N]``, with ``q = probe W_Q + b_Q``, ``k = y W_K + b_K``."""
    head = _tower(module).head
    mha = head.attention
    d = mha.embed_dim
    w, b = mha.in_proj_weight.double(), mha.in_proj_bias.double()
    q = head.probe.double()[0] @ w[:d].T + b[:d]  # [1, d]
    k = y @ w[d : 2 * d].T + b[d : 2 * d]  # [B, N, d]
    v = y @ w[2 * d :].T + b[2 * d :]
    dh = d // N_HEADS
    outs, betas = [], []
    for r in range(N_HEADS):
        sl = slice(r * dh, (r + 1) * dh)
        beta = torch.softmax((q[:, sl] @ k[..., sl].transpose(-1, -2)) / dh**0.5, dim=-1)[:, 0]  # [B, N]
        outs.append(torch.einsum("bn,bnd->bd", beta, v[..., sl]) @ mha.out_proj.weight.double()[:, sl].T)
        betas.append(beta)
    return torch.stack(outs), torch.stack(betas)


class _OneRoute(HFViTAdapter):
    """The stock adapter with the attention pool cut down to pool head ``route`` (and no
    pool biases, no pool MLP): its stack holds each component's term through that pool head."""

    def __init__(self, route: int) -> None:
        super().__init__()
        self.route = route

    def vit_map(self, module: nn.Module) -> Any:
        vmap = super().vit_map(module)
        pool = vmap.readout.attn_pool
        mask = torch.zeros(pool.n_routes, 1, 1, dtype=pool.w_vo.dtype)
        mask[self.route] = 1
        one = AttentionPool(w_vo=pool.w_vo * mask, b_vo=None, pattern=pool.pattern, mlp_write=None, pooled=pool.pooled)
        vmap.readout = dataclasses.replace(vmap.readout, attn_pool=one)
        return vmap


def test_naive_pool_heads_reproduce_the_stock_attention(vision):
    """Sanity of the reference below: sum_r o_r + b_O is the head's nn.MultiheadAttention output."""
    model, x = vision
    got = _pool_capture(model.module, x)
    outs, betas = _naive_pool_heads(model.module, got["y"])
    b_o = _tower(model.module).head.attention.out_proj.bias.double()
    torch.testing.assert_close(outs.sum(0) + b_o, got["a"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(betas.sum(-1), torch.ones_like(betas.sum(-1)))
    assert betas.max() > 2.0 / betas.shape[-1]  # the tiny probe gives a far-from-uniform pattern


def test_components_without_the_pool_mlp_sum_to_the_pool_attention_output(vision):
    """z = a + mlp(layernorm(a)): every row but ``pool_mlp`` sums to a, and ``pool_mlp`` is the leaf."""
    model, x = vision
    got = _pool_capture(model.module, x)
    for granularity in ("layer", "head", "head_token"):
        stack = vd.decompose(model, x, granularity=granularity, dtype=torch.float64)
        if stack.has_tokens:
            stack = stack.sum_tokens()
        rest = stack.values[[i for i, n in enumerate(stack.names) if n != "pool_mlp"]].sum(0)
        torch.testing.assert_close(rest, got["a"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(stack["pool_mlp"], got["mlp"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(stack.reference, got["z"], rtol=1e-10, atol=1e-12)


def test_pool_heads_sum_to_the_pool_attention_term(vision):
    """Each pool head's stack (the pool cut to one route) totals that head's bias-free output
    o_r - b_V^r W_O^r, and the pool heads' rows sum to the full stack's rows."""
    model, x = vision
    module: Any = model.module
    got = _pool_capture(module, x)
    outs, _ = _naive_pool_heads(module, got["y"])
    mha = _tower(module).head.attention
    d, dh = mha.embed_dim, mha.embed_dim // N_HEADS
    b_v = mha.in_proj_bias.double()[2 * d :]
    full = vd.decompose(model, x, granularity="head_token", dtype=torch.float64)
    keep = [i for i, n in enumerate(full.names) if n not in ("pool_mlp", "bias")]
    summed = torch.zeros_like(full.values[keep])
    for r in range(N_HEADS):
        one_model = vd.Model(module, adapter=_OneRoute(r))
        one = vd.decompose(one_model, x, granularity="head_token", dtype=torch.float64, check=False)
        assert "pool_mlp" not in one.names
        sl = slice(r * dh, (r + 1) * dh)
        bias_free = outs[r] - b_v[sl] @ mha.out_proj.weight.double()[:, sl].T
        torch.testing.assert_close(one.total(), bias_free, rtol=1e-10, atol=1e-12)
        summed += one.values[[one.index(full.names[i]) for i in keep]]
    torch.testing.assert_close(summed, full.values[keep], rtol=1e-9, atol=1e-12)


def _naive_head_pool_terms(module: nn.Module, x: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    """Direct effect of every (encoder layer l, head h) through every pool head r, from the
    weights alone: ``[R, B, d]`` per (l, h).

    For all N positions p (no CLS): the head's write ``w_p = sum_t alpha_{p,t} (u_t W_V^h) W_O^h``
    (full ``softmax(Q K^T / sqrt(d_h))``, no value bias), then ``post_layernorm`` frozen at p:
    ``gamma * Pi w_p / sigma_p``, then pool head r: ``sum_p beta^r_p (.) W_V^r W_O^r``.
    Block inputs come from the stock ``output_hidden_states`` on an fp64 copy.
    """
    m: Any = copy.deepcopy(module).double()
    core = _tower(m)
    x = x.double()
    with torch.no_grad():
        hidden = core(pixel_values=x, output_hidden_states=True).hidden_states
        layers = list(core.encoder.layers)
        assert len(hidden) == len(layers) + 1
        last = hidden[-1]
        post = core.post_layernorm
        sigma = (last.var(dim=-1, unbiased=False, keepdim=True) + post.eps).sqrt()  # [B, N, 1]
        y = post(last)
        _, betas = _naive_pool_heads(m, y)  # [R, B, N]
        mha = core.head.attention
        d = mha.embed_dim
        dh = d // N_HEADS
        w_v = mha.in_proj_weight[2 * d :]
        terms = {}
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            u = layer.layer_norm1(hidden[i])
            b, n, _ = u.shape

            def split(t: torch.Tensor, b: int = b, n: int = n) -> torch.Tensor:
                return t.reshape(b, n, N_HEADS, dh).permute(0, 2, 1, 3)  # [B, H, N, dh]

            q, k, v = split(attn.q_proj(u)), split(attn.k_proj(u)), split(u @ attn.v_proj.weight.T)
            alpha = torch.softmax(q @ k.transpose(-1, -2) / dh**0.5, dim=-1)  # [B, H, N, N]
            for h in range(N_HEADS):
                write = (alpha[:, h] @ v[:, h]) @ attn.out_proj.weight[:, h * dh : (h + 1) * dh].T  # [B, N, d]
                normed = post.weight * (write - write.mean(dim=-1, keepdim=True)) / sigma
                per_route = []
                for r in range(N_HEADS):
                    sl = slice(r * dh, (r + 1) * dh)
                    pooled = torch.einsum("bn,bnd->bd", betas[r], normed)
                    per_route.append(pooled @ w_v[sl].T @ mha.out_proj.weight[:, sl].T)
                terms[(i, h)] = torch.stack(per_route)
        return terms


def test_head_terms_through_each_pool_head_match_a_naive_reference(vision):
    model, x = vision
    module: Any = model.module
    naive = _naive_head_pool_terms(module, x)
    full = vd.decompose(model, x, granularity="head", dtype=torch.float64)
    per_route = [
        vd.decompose(vd.Model(module, adapter=_OneRoute(r)), x, granularity="head", dtype=torch.float64, check=False)
        for r in range(N_HEADS)
    ]
    assert len(naive) == sum(lab.kind == "head" for lab in full.labels) == N_LAYERS * N_HEADS
    for (layer, head), value in naive.items():
        name = f"L{layer:02d}.H{head:02d}"
        for r in range(N_HEADS):
            torch.testing.assert_close(per_route[r][name], value[r], rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(full[name], value.sum(0), rtol=1e-8, atol=1e-10)
    # the fp32 stack agrees with the fp64 reference to fp32 precision
    fp32 = vd.decompose(model, x, granularity="head")
    for (layer, head), value in naive.items():
        torch.testing.assert_close(fp32[f"L{layer:02d}.H{head:02d}"].double(), value.sum(0), rtol=1e-4, atol=1e-5)


def test_neurons_sum_to_their_mlp_through_the_pool(vision):
    model, x = vision
    plain = vd.decompose(model, x, dtype=torch.float64)
    neurons = vd.decompose(model, x, mlp_neurons=True, dtype=torch.float64)
    assert neurons.error() < 1e-10
    for layer in range(model.n_layers):
        rows = neurons.select(kind=("neuron", "mlp_bias"), layer=layer).values.sum(0)
        torch.testing.assert_close(rows, plain[f"L{layer:02d}.mlp"], rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------- tokens, hooks, batch
def test_tokens_are_patches_only(vision):
    model, x = vision
    stack = vd.decompose(model, x, granularity="head_token")
    assert stack.tokens.types == ("patch",) * 16 and stack.tokens.grid == (4, 4)
    assert stack.tokens.patch_index == list(range(16))
    desc = model.describe()
    assert desc["prefix_tokens"] == [] and desc["pool"] == "attention"
    assert model.structure.n_prefix == 0 and model.structure.patch_size == (8, 8)
    # every patch carries part of some head's direct effect
    assert (stack.values[stack.index("L01.H00")].abs().sum(-1) > 0).all()


def test_hooks_removed_and_output_bit_identical(variant):
    _, model, x = variant
    m: Any = model.module
    before = _stock_representation(m, x)
    vd.decompose(model, x, granularity="head_token")
    vd.decompose(model, x, dtype=torch.float64, check=False)
    for module in m.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert torch.equal(_stock_representation(m, x), before)


@pytest.mark.parametrize("name", ["vision", "no_head"])
def test_batch_invariance(name):
    model = vd.wrap(VARIANTS[name]("sdpa"))
    x3 = model.example_input(batch=3, seed=4)
    alone = vd.decompose(model, x3[1:2], granularity="head_token")
    batch = vd.decompose(model, x3, granularity="head_token")
    torch.testing.assert_close(batch.values[:, 1:2], alone.values, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- classes
def test_siglip_model_decomposes_its_image_tower():
    module: Any = tiny_hf_siglip(attn_implementation="sdpa")
    model = vd.wrap(module)
    x = model.example_input(batch=2)
    whole = vd.decompose(model, x, granularity="head_token", dtype=torch.float64)
    tower = vd.decompose(vd.wrap(module.vision_model), x, granularity="head_token", dtype=torch.float64)
    assert whole.labels == tower.labels and whole.error() < 1e-10
    torch.testing.assert_close(whole.values, tower.values, rtol=0, atol=0)
    with torch.no_grad():
        expected = module.vision_model(pixel_values=x).pooler_output
    torch.testing.assert_close(whole.reference.float(), expected, rtol=1e-6, atol=1e-6)
    assert model.classifier() is None


def test_classifier_logits_from_the_projection():
    module: Any = tiny_hf_siglip(classifier=True, attn_implementation="sdpa")
    model = vd.wrap(module)
    x = model.example_input(batch=3)
    weight, bias = model.classifier()
    assert weight.shape == (10, 64)
    stack = vd.decompose(model, x)
    assert "pool_mlp" not in stack.names  # the classifier reads mean(last_hidden_state), not the head
    with torch.no_grad():
        expected = module(pixel_values=x).logits
    torch.testing.assert_close(stack.project(weight).total().float() + bias, expected, rtol=1e-4, atol=1e-4)


def test_classifier_pooler_output_is_the_unused_head():
    module: Any = tiny_hf_siglip(classifier=True, attn_implementation="sdpa")
    model = vd.Model(module, adapter=HFViTAdapter(representation="pooler_output"))
    x = model.example_input(batch=2)
    stack = vd.decompose(model, x, dtype=torch.float64)
    assert stack.error() < 1e-10 and "pool_mlp" in stack.names
    with torch.no_grad():
        expected = module.vision_model(pixel_values=x).pooler_output
    torch.testing.assert_close(stack.reference.float(), expected, rtol=1e-6, atol=1e-6)
    assert model.classifier() is None


def test_without_head_the_representation_is_the_token_mean():
    module: Any = tiny_hf_siglip_vision(vision_use_head=False)
    assert getattr(module, "head", None) is None
    model = vd.wrap(module)
    x = model.example_input(batch=2)
    with torch.no_grad():
        out = module(pixel_values=x)
    assert out.pooler_output is None
    stack = vd.decompose(model, x, granularity="head_token", dtype=torch.float64)
    assert stack.error() < 1e-10 and "pool_mlp" not in stack.names
    torch.testing.assert_close(stack.reference.float(), out.last_hidden_state.mean(dim=1), rtol=1e-6, atol=1e-6)
    assert model.describe()["pool"] == "avg"
    with pytest.raises(vd.UnsupportedModelError, match="vision_use_head=False"):
        _ = vd.Model(module, adapter=HFViTAdapter(representation="pooler_output")).structure


def test_pooler_output_representation_of_the_vision_model_is_the_default():
    module: Any = tiny_hf_siglip_vision(attn_implementation="sdpa")
    x = vd.wrap(module).example_input(batch=2)
    a = vd.decompose(vd.wrap(module), x, granularity="head")
    b = vd.decompose(vd.Model(module, adapter=HFViTAdapter(representation="pooler_output")), x, granularity="head")
    assert a.labels == b.labels
    torch.testing.assert_close(a.values, b.values, rtol=0, atol=0)


# ---------------------------------------------------------------------------- refusals
def _siglip2_vision() -> nn.Module:
    if not hasattr(transformers, "Siglip2VisionModel"):
        pytest.skip("this transformers has no SigLIP 2")
    config = transformers.Siglip2VisionConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128, patch_size=8, num_patches=16
    )
    return transformers.Siglip2VisionModel(config)


def test_siglip2_naflex_is_refused_with_a_reason():
    with pytest.raises(vd.UnsupportedModelError, match="NaFlex.*spatial_shapes"):
        vd.wrap(_siglip2_vision())
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    vision = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128, patch_size=8)
    whole = transformers.Siglip2Model(transformers.Siglip2Config(text_config=text, vision_config=vision))
    with pytest.raises(vd.UnsupportedModelError, match="NaFlex"):
        vd.wrap(whole)


def test_siglip2_directory_is_refused(tmp_path):
    _siglip2_vision().config.save_pretrained(tmp_path)
    with pytest.raises(vd.UnsupportedModelError, match="siglip2_vision_model.*NaFlex"):
        vd.load(f"hf:{tmp_path}", pretrained=False)


def test_text_tower_is_refused():
    module: Any = tiny_hf_siglip()
    with pytest.raises(vd.UnsupportedModelError, match="text tower"):
        vd.wrap(module.text_model)


def _with_attention(**kwargs: Any) -> nn.Module:
    module: Any = tiny_hf_siglip_vision()
    module.head.attention = nn.MultiheadAttention(64, N_HEADS, **{"batch_first": True, **kwargs})
    return module


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(add_bias_kv=True), "add_bias_kv"),
        (dict(add_zero_attn=True), "add_zero_attn"),
        (dict(kdim=32, vdim=32), "kdim"),
        (dict(batch_first=False), "batch_first"),
    ],
)
def test_unsupported_pool_attention_settings_are_refused(kwargs, match):
    with pytest.raises(vd.UnsupportedModelError, match=match):
        vd.wrap(_with_attention(**kwargs))


def test_stock_pool_attention_settings_are_accepted():
    model = vd.wrap(_with_attention(bias=False))  # no in_proj / out_proj bias is still exact
    assert vd.decompose(model, model.example_input(batch=2), dtype=torch.float64).error() < 1e-10


def test_several_probes_are_refused():
    module: Any = tiny_hf_siglip_vision()
    module.head.probe = nn.Parameter(torch.randn(1, 2, 64))
    with pytest.raises(vd.UnsupportedModelError, match="probe"):
        vd.wrap(module)


def test_unknown_pool_head_parameter_is_refused():
    module: Any = tiny_hf_siglip_vision()
    module.head.register_parameter("gate", nn.Parameter(torch.ones(64)))
    with pytest.raises(vd.UnsupportedModelError, match="head.gate"):
        vd.wrap(module)


# ---------------------------------------------------------------------------- loading
@pytest.mark.parametrize("name", ["vision", "model", "classifier", "no_head"])
def test_load_from_a_save_pretrained_directory(tmp_path, name):
    source: Any = VARIANTS[name]("sdpa")
    source.save_pretrained(tmp_path)
    model = vd.load(f"hf:{tmp_path}", pretrained=True)
    assert type(model.module).__name__ == type(source).__name__
    assert model.family == "hf-vit" and model.weights.startswith(f"pretrained:hf/{tmp_path.name}@sha256:")
    x = model.example_input(batch=2)
    torch.testing.assert_close(model.representation(x), _stock_representation(source, x), rtol=0, atol=0)
    assert_exact(vd.decompose(model, x, granularity="head_token"), 1e-5)
    assert vd.decompose(model, x, granularity="head", dtype=torch.float64).error() < 1e-10
    assert ("clip" in model.extras) == (name == "model")
    if name == "model":
        assert model.extras["clip"] is model.module
    prep = model.preprocessing  # no processor saved: the SiglipImageProcessor defaults
    assert prep.mean == pytest.approx((0.5, 0.5, 0.5)) and prep.std == pytest.approx((0.5, 0.5, 0.5))
    assert prep.resize_mode == "squash" and prep.input_size == (32, 32) and prep.interpolation == "bicubic"


def test_preprocessing_comes_from_the_saved_siglip_processor(tmp_path):
    from PIL import Image

    VARIANTS["vision"]("sdpa").save_pretrained(tmp_path)
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    model = vd.load(f"hf:{tmp_path}", pretrained=True)
    assert "image_processor" in model.extras
    prep = model.preprocessing
    assert prep.source.startswith("transformers Siglip")
    assert prep.mean == pytest.approx((0.5, 0.5, 0.5)) and prep.std == pytest.approx((0.5, 0.5, 0.5))
    assert prep.resize_mode == "squash" and prep.input_size == (32, 32) and prep.interpolation == "bicubic"
    image = Image.fromarray((torch.rand(50, 70, 3) * 255).to(torch.uint8).numpy())
    pixels = model.transform(image)
    assert pixels.shape == (3, 32, 32)
    assert_exact(vd.decompose(model, pixels[None]), 1e-5)
    # the transform against the processor's own output (squash, bicubic, (x - 0.5) / 0.5)
    expected = model.extras["image_processor"](images=image, return_tensors="pt")["pixel_values"][0]
    assert expected.shape == pixels.shape
    torch.testing.assert_close(pixels, expected.to(pixels.dtype), rtol=0, atol=2.1 / 255)  # uint8 rounding
