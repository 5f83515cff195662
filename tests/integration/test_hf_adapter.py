"""The transformers adapter on tiny random CLIP / ViT / DINOv2 models (offline, seconds).

Covers every supported class (CLIPVisionModel, CLIPVisionModelWithProjection, CLIPModel,
CLIPForImageClassification, ViTModel, ViTForImageClassification, Dinov2Model with MLP and
SwiGLU, Dinov2WithRegistersModel), both eager and SDPA attention, the loader on real
``save_pretrained`` directories, checkpoints, preprocessing and the refusals.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

import vitdecomp as vd
from vitdecomp.core.adapters.hf_vit import HFViTAdapter
from vitdecomp.testing import assert_exact
from vitdecomp.testing.tiny_models import (
    perturb,
    tiny_hf_clip,
    tiny_hf_clip_vision,
    tiny_hf_dinov2,
    tiny_hf_dinov2_registers,
    tiny_hf_vit,
)

TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8
)


def _vit_with_pooler(attn_implementation: str | None = None, seed: int = 0, **kwargs: Any) -> nn.Module:
    """A ViTModel that has its (dense + tanh) pooler: the representation must ignore it."""
    torch.manual_seed(seed)
    config = transformers.ViTConfig(**{**TINY, **kwargs})
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return perturb(transformers.ViTModel(config, add_pooling_layer=True), seed)


def _registers(attn_implementation: str | None = None) -> nn.Module:
    try:
        return tiny_hf_dinov2_registers(attn_implementation=attn_implementation)
    except ImportError:  # transformers before Dinov2WithRegisters
        pytest.skip("this transformers has no Dinov2WithRegistersModel")


# name -> factory(attn_implementation)
VARIANTS: dict[str, Callable[[str | None], nn.Module]] = {
    "clip_vision": lambda impl: tiny_hf_clip_vision(with_projection=False, attn_implementation=impl),
    "clip_vision_proj": lambda impl: tiny_hf_clip_vision(attn_implementation=impl),
    "clip_model": lambda impl: tiny_hf_clip(attn_implementation=impl),
    "clip_classifier": lambda impl: tiny_hf_clip(classifier=True, attn_implementation=impl),
    "vit": lambda impl: tiny_hf_vit(attn_implementation=impl),
    "vit_no_qkv_bias": lambda impl: tiny_hf_vit(qkv_bias=False, attn_implementation=impl),
    "vit_with_pooler": lambda impl: _vit_with_pooler(impl),
    "vit_classifier": lambda impl: tiny_hf_vit(classifier=True, attn_implementation=impl),
    "dinov2": lambda impl: tiny_hf_dinov2(attn_implementation=impl),
    "dinov2_swiglu": lambda impl: tiny_hf_dinov2(use_swiglu_ffn=True, attn_implementation=impl),
    "dinov2_registers": lambda impl: _registers(impl),
}
IMPLS = ("eager", "sdpa")


def _core(module: nn.Module) -> Any:
    """The module owning embeddings and the layers (transformers 4.x and 5.x layouts)."""
    core: Any = getattr(module, "vit", module)
    while getattr(core, "encoder", None) is None and getattr(core, "vision_model", None) is not None:
        core = core.vision_model
    return core


def _stock_representation(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Each class's documented representation, computed here from the stock outputs."""
    m: Any = module
    name = type(m).__name__
    with torch.no_grad():
        if name == "CLIPVisionModel":
            return m(pixel_values=x).pooler_output
        if name == "CLIPVisionModelWithProjection":
            return m(pixel_values=x).image_embeds
        if name == "CLIPModel":
            return m.visual_projection(m.vision_model(pixel_values=x).pooler_output)
        if name == "CLIPForImageClassification":
            return m.vision_model(pixel_values=x).last_hidden_state[:, 1:].mean(dim=1)
        if name == "ViTModel":
            return m(pixel_values=x).last_hidden_state[:, 0]
        if name == "ViTForImageClassification":
            return m.vit(pixel_values=x).last_hidden_state[:, 0]
        if name.startswith("Dinov2"):
            out = m(pixel_values=x)
            assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])
            return out.pooler_output
    raise AssertionError(name)


@pytest.fixture(
    scope="module", params=[(v, i) for v in sorted(VARIANTS) for i in IMPLS], ids=lambda p: f"{p[0]}-{p[1]}"
)
def variant(request):
    name, impl = request.param
    module = VARIANTS[name](impl)
    assert module.config._attn_implementation == impl
    model = vd.wrap(module)
    return name, model, model.example_input(batch=2, seed=1)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def sdpa_variant(request):
    module = VARIANTS[request.param]("sdpa")
    model = vd.wrap(module)
    return request.param, model, model.example_input(batch=2, seed=1)


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("granularity", ["layer", "head", "head_token"])
@pytest.mark.parametrize("start_layer", [0, -1])
def test_sums_to_the_stock_representation_fp32(variant, granularity, start_layer):
    _, model, x = variant
    stack = vd.decompose(model, x, granularity=granularity, start_layer=start_layer)
    assert_exact(stack, 1e-5)
    torch.testing.assert_close(stack.reference, _stock_representation(model.module, x), rtol=0, atol=0)
    assert model.family == "hf-vit"
    assert stack.names[0] == ("embed" if start_layer == 0 else "rest") and stack.names[-1] == "bias"
    heads = [lab for lab in stack.labels if lab.kind == "head"]
    n_blocks = 2 if start_layer == 0 else 1
    assert len(heads) == (0 if granularity == "layer" else n_blocks * 4)  # 4 heads per tiny block
    if granularity == "head_token":
        assert stack.values.dim() == 4 and stack.tokens is not None
        assert stack.tokens.grid == (4, 4) and stack.tokens.types.count("patch") == 16


@pytest.mark.parametrize("granularity", ["layer", "head", "head_token"])
@pytest.mark.parametrize("start_layer", [0, -1])
def test_sums_to_the_stock_representation_fp64(sdpa_variant, granularity, start_layer):
    _, model, x = sdpa_variant
    stack = vd.decompose(model, x, granularity=granularity, start_layer=start_layer, dtype=torch.float64)
    assert stack.values.dtype == torch.float64
    assert stack.error() < 1e-10
    assert model.dtype == torch.float32  # cast back after the pass


def test_eager_fp64_is_exact_up_to_the_float32_softmax_of_eager_attention(variant):
    """transformers 5.x eager CLIP/ViT attention computes its softmax in float32 even for a
    float64 model, so the model's own fp64 output carries fp32 rounding of the pattern;
    the split (fp64 pattern) then agrees to ~1e-8, not 1e-10. SDPA and DINOv2 are fp64 exact."""
    name, model, x = variant
    stack = vd.decompose(model, x, granularity="head_token", dtype=torch.float64, check=False)
    assert stack.error() < 1e-6
    if variant[1].module.config._attn_implementation == "sdpa" or name.startswith("dinov2"):
        assert stack.error() < 1e-10


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_eager_and_sdpa_give_the_same_stack(name):
    stacks = {}
    weights = VARIANTS[name]("sdpa").state_dict()
    for impl in IMPLS:
        module = VARIANTS[name](impl)
        module.load_state_dict(weights)  # same weights, different attention kernel
        model = vd.wrap(module)
        assert model.module.config._attn_implementation == impl
        x = model.example_input(batch=2, seed=3)
        stacks[impl] = vd.decompose(model, x, granularity="head_token")
    assert stacks["eager"].labels == stacks["sdpa"].labels
    torch.testing.assert_close(stacks["eager"].values, stacks["sdpa"].values, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stacks["eager"].reference, stacks["sdpa"].reference, rtol=1e-5, atol=1e-5)


def test_set_attn_implementation_switch_keeps_the_stack():
    module = tiny_hf_clip(attn_implementation="sdpa")
    if not hasattr(module, "set_attn_implementation"):
        pytest.skip("this transformers has no set_attn_implementation")
    model = vd.wrap(module)
    x = model.example_input(batch=2)
    sdpa = vd.decompose(model, x, granularity="head")
    module.set_attn_implementation("eager")
    assert module.vision_model.config._attn_implementation == "eager"
    eager = vd.decompose(model, x, granularity="head")
    torch.testing.assert_close(eager.values, sdpa.values, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bias_mode", ["explicit", "anchor", "split"])
def test_token_terms_sum_to_head_terms(sdpa_variant, bias_mode):
    _, model, x = sdpa_variant
    heads = vd.decompose(model, x, granularity="head", bias_mode=bias_mode, dtype=torch.float64)
    tokens = vd.decompose(model, x, granularity="head_token", bias_mode=bias_mode, dtype=torch.float64)
    assert heads.labels == tokens.labels
    torch.testing.assert_close(tokens.sum_tokens().values, heads.values, rtol=1e-9, atol=1e-12)


def test_heads_sum_to_the_layer_attention_term(sdpa_variant):
    _, model, x = sdpa_variant
    heads = vd.decompose(model, x, granularity="head", dtype=torch.float64).group("attn_mlp")
    layers = vd.decompose(model, x, granularity="layer", dtype=torch.float64)
    for layer in range(model.n_layers):
        torch.testing.assert_close(
            heads[f"L{layer:02d}.attn"], layers[f"L{layer:02d}.attn"] + layers[f"L{layer:02d}.bias"]
        )
        torch.testing.assert_close(heads[f"L{layer:02d}.mlp"], layers[f"L{layer:02d}.mlp"])


def test_neurons_sum_to_the_mlp(sdpa_variant):
    """Checks W_out (fc2 / down_proj / output.dense) and the folded LayerScale."""
    _, model, x = sdpa_variant
    plain = vd.decompose(model, x, dtype=torch.float64)
    neurons = vd.decompose(model, x, mlp_neurons=True, dtype=torch.float64)
    assert neurons.error() < 1e-10
    for layer in range(model.n_layers):
        rows = neurons.select(kind=("neuron", "mlp_bias"), layer=layer).values.sum(0)
        torch.testing.assert_close(rows, plain[f"L{layer:02d}.mlp"], rtol=1e-9, atol=1e-10)


def test_batch_invariance(sdpa_variant):
    _, model, x = sdpa_variant
    x3 = torch.cat([x, model.example_input(batch=1, seed=9)])
    alone = vd.decompose(model, x3[1:2], granularity="head_token")
    batch = vd.decompose(model, x3, granularity="head_token")
    torch.testing.assert_close(batch.values[:, 1:2], alone.values, rtol=1e-4, atol=1e-5)


def test_hooks_removed_and_output_bit_identical(variant):
    _, model, x = variant
    m: Any = model.module
    with torch.no_grad():
        before = _stock_representation(m, x)
    vd.decompose(model, x, granularity="head_token")
    vd.decompose(model, x, mlp_neurons=True, dtype=torch.float64, check=False)
    for module in m.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert torch.equal(_stock_representation(m, x), before)


# ---------------------------------------------------------------------------- naive reference
def _find(root: nn.Module, paths: tuple[str, ...]) -> Any:
    for path in paths:
        obj: Any = root
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            return obj
    raise AssertionError(f"none of {paths} in {type(root).__name__}")


def _naive_head_terms(module: nn.Module, x: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    """Per-head direct effects written out from the weights, independently of vitdecomp.

    Block inputs come from the stock ``output_hidden_states`` (on a copy, so the capture hooks
    transformers installs stay off the tested module). For every block: full attention
    ``softmax(Q K^T / sqrt(dh))`` per head, the pooled query rows (CLS, or the patch mean
    for CLIPForImageClassification) times the bias-free values, through that head's slice of
    W_O and the layer scale, then the final norm with frozen statistics of the pooled vector
    and the projection.
    """
    import copy

    m: Any = copy.deepcopy(module)
    name = type(m).__name__
    core = _core(m)
    with torch.no_grad():
        hidden = core(pixel_values=x, output_hidden_states=True).hidden_states
        layers = list(_find(core, ("encoder.layers", "encoder.layer", "layers")))
        assert len(hidden) == len(layers) + 1
        avg = name == "CLIPForImageClassification"
        n = hidden[0].shape[1]
        pool = torch.zeros(n, dtype=x.dtype)
        if avg:
            pool[1:] = 1.0 / (n - 1)
        else:
            pool[0] = 1.0
        terms = {}
        n_heads = 4  # every tiny model here
        for i, layer in enumerate(layers):
            norm1 = _find(layer, ("layer_norm1", "layernorm_before", "norm1"))
            q_lin = _find(layer, ("self_attn.q_proj", "attention.q_proj", "attention.attention.query"))
            k_lin = _find(layer, ("self_attn.k_proj", "attention.k_proj", "attention.attention.key"))
            v_lin = _find(layer, ("self_attn.v_proj", "attention.v_proj", "attention.attention.value"))
            o_lin = _find(layer, ("self_attn.out_proj", "attention.o_proj", "attention.output.dense"))
            u = norm1(hidden[i])
            b = u.shape[0]
            dh = q_lin.out_features // n_heads

            def split(t: torch.Tensor, b: int = b, dh: int = dh) -> torch.Tensor:
                return t.reshape(b, n, n_heads, dh).permute(0, 2, 1, 3)  # [B, H, N, dh]

            q, k = split(q_lin(u)), split(k_lin(u))
            v = split(u @ v_lin.weight.T)  # no value bias: it is the layer's bias row
            pattern = torch.softmax(q @ k.transpose(-1, -2) / dh**0.5, dim=-1)  # [B, H, N, N]
            pooled = torch.einsum("q,bhqd->bhd", pool, pattern @ v)  # [B, H, dh]
            scale = getattr(getattr(layer, "layer_scale1", None), "lambda1", None)
            for h in range(n_heads):
                write = pooled[:, h] @ o_lin.weight[:, h * dh : (h + 1) * dh].T  # [B, d]
                terms[(i, h)] = write * scale if scale is not None else write
        if avg:
            return terms
        last = hidden[-1][:, 0]
        norm = core.post_layernorm if hasattr(core, "post_layernorm") else core.layernorm
        sigma = (last.var(dim=-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
        proj = getattr(m, "visual_projection", None)
        out = {}
        for key, write in terms.items():
            z = norm.weight * (write - write.mean(dim=-1, keepdim=True)) / sigma
            out[key] = z @ proj.weight.T if proj is not None else z
        return out


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_head_terms_match_a_naive_reference(name):
    model = vd.wrap(VARIANTS[name]("sdpa"))
    x = model.example_input(batch=2, seed=5)
    stack = vd.decompose(model, x, granularity="head")
    naive = _naive_head_terms(model.module, x)
    assert len(naive) == sum(lab.kind == "head" for lab in stack.labels) == 8
    for (layer, head), value in naive.items():
        torch.testing.assert_close(stack[f"L{layer:02d}.H{head:02d}"], value, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- readouts, heads
@pytest.mark.parametrize("name", ["vit_classifier", "clip_classifier"])
def test_classifier_logits_from_the_projection(name):
    module: Any = VARIANTS[name]("sdpa")
    model = vd.wrap(module)
    x = model.example_input(batch=3)
    weight, bias = model.classifier()
    assert weight.shape == (10, 64)
    logits = vd.decompose(model, x).project(weight).total() + bias
    with torch.no_grad():
        expected = module(pixel_values=x).logits
    torch.testing.assert_close(logits.float(), expected, rtol=1e-4, atol=1e-4)


def test_non_classifiers_have_no_classifier():
    for name in ("vit", "clip_model", "dinov2"):
        assert vd.wrap(VARIANTS[name]("sdpa")).classifier() is None


def test_vit_pooler_is_not_the_representation():
    module: Any = _vit_with_pooler()
    model = vd.wrap(module)
    x = model.example_input(batch=2)
    stack = vd.decompose(model, x)
    with torch.no_grad():
        out = module(pixel_values=x)
    torch.testing.assert_close(stack.reference, out.last_hidden_state[:, 0], rtol=0, atol=0)
    assert not torch.allclose(stack.reference, out.pooler_output, atol=1e-3)


def test_requested_tanh_pooler_is_unsupported():
    module = _vit_with_pooler()
    with pytest.raises(vd.UnsupportedModelError, match="pooler.*non-linear"):
        _ = vd.Model(module, adapter=HFViTAdapter(representation="pooler_output")).structure
    with pytest.raises(vd.UnsupportedModelError, match="no pooler"):
        _ = vd.Model(tiny_hf_vit(), adapter=HFViTAdapter(representation="pooler_output")).structure


def test_requested_linear_pooler_is_exact():
    if not hasattr(transformers.ViTConfig(), "pooler_act"):
        pytest.skip("this transformers' ViT pooler is always tanh")
    module: Any = _vit_with_pooler(pooler_act="linear", pooler_output_size=24)
    model = vd.Model(module, adapter=HFViTAdapter(representation="pooler_output"))
    x = model.example_input(batch=2)
    stack = vd.decompose(model, x, granularity="head_token", dtype=torch.float64)
    assert stack.error() < 1e-10 and stack.dim == 24
    with torch.no_grad():
        expected = module(pixel_values=x).pooler_output
    torch.testing.assert_close(stack.reference.float(), expected, rtol=1e-6, atol=1e-6)


def test_pooler_output_of_clip_is_before_the_projection():
    module: Any = tiny_hf_clip_vision()
    model = vd.Model(module, adapter=HFViTAdapter(representation="pooler_output"))
    x = model.example_input(batch=2)
    stack = vd.decompose(model, x)
    assert stack.dim == 64 and stack.error() < 1e-5
    with torch.no_grad():
        torch.testing.assert_close(stack.reference, module.vision_model(pixel_values=x).pooler_output, rtol=0, atol=0)


def test_registers_are_prefix_tokens():
    model = vd.wrap(_registers())
    x = model.example_input(batch=2)
    stack = vd.decompose(model, x, granularity="head_token")
    assert stack.tokens.types[:4] == ("cls", "reg", "reg", "patch")
    assert len(stack.tokens.types) == 1 + 2 + 16 and stack.tokens.grid == (4, 4)
    assert model.describe()["prefix_tokens"] == ["cls", "reg", "reg"]
    # registers carry part of the heads' direct effect
    reg = stack.values[:, :, 1:3].abs().sum()
    assert reg > 0


def test_wrong_image_size_is_an_input_error_and_hooks_are_removed():
    model = vd.wrap(tiny_hf_clip())
    with pytest.raises(vd.InputError):
        vd.decompose(model, torch.randn(1, 3, 48, 48))
    for module in model.module.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


# ---------------------------------------------------------------------------- refusals
def test_dinov2_classifier_is_refused_with_a_reason():
    torch.manual_seed(0)
    module = transformers.Dinov2ForImageClassification(transformers.Dinov2Config(num_labels=3, **TINY))
    with pytest.raises(vd.UnsupportedModelError, match="concatenation"):
        vd.wrap(module)
    vd.wrap(module.dinov2)  # the backbone alone is fine


def test_unknown_attention_parameter_is_refused():
    module: Any = tiny_hf_vit()
    attn = _find(module.layers[0] if hasattr(module, "layers") else module.encoder.layer[0], ("attention",))
    attn.register_parameter("relative_bias", nn.Parameter(torch.zeros(4, 17, 17)))
    with pytest.raises(vd.UnsupportedModelError, match="relative_bias"):
        vd.wrap(module)


def test_non_layernorm_final_norm_is_refused():
    module: Any = tiny_hf_dinov2()
    module.layernorm = nn.Tanh()
    with pytest.raises(vd.UnsupportedModelError, match="normalisation Tanh"):
        vd.wrap(module)


def test_identity_final_norm_is_still_exact():
    module: Any = tiny_hf_dinov2()
    module.layernorm = nn.Identity()
    model = vd.wrap(module)
    assert vd.decompose(model, model.example_input(batch=2), dtype=torch.float64).error() < 1e-10


def test_unknown_layer_type_is_refused():
    module: Any = tiny_hf_clip_vision()
    layers = module.vision_model.encoder.layers
    layers[1] = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(vd.UnsupportedModelError, match="encoder.layers.1"):
        vd.wrap(module)


# ---------------------------------------------------------------------------- loading
SAVED = [
    "clip_vision",
    "clip_vision_proj",
    "clip_model",
    "clip_classifier",
    "vit",
    "vit_classifier",
    "dinov2",
    "dinov2_registers",
]


@pytest.mark.parametrize("name", SAVED)
def test_load_from_a_save_pretrained_directory(tmp_path, name):
    source: Any = VARIANTS[name]("sdpa")
    source.save_pretrained(tmp_path)
    model = vd.load(f"hf:{tmp_path}", pretrained=True)
    assert type(model.module).__name__ == type(source).__name__
    assert model.name == f"hf:{tmp_path}" and model.family == "hf-vit"
    assert model.weights.startswith(f"pretrained:hf/{tmp_path.name}@sha256:")
    assert not model.module.training
    x = model.example_input(batch=2)
    torch.testing.assert_close(model.representation(x), _stock_representation(source, x), rtol=0, atol=0)
    assert_exact(vd.decompose(model, x, granularity="head_token"), 1e-5)
    if name == "clip_model":
        assert model.extras["clip"] is model.module
    else:
        assert "clip" not in model.extras
    # same directory, same weights id; random init from the same config differs
    assert vd.load(f"hf:{tmp_path}").weights == model.weights
    random = vd.load(f"hf:{tmp_path}", pretrained=False)
    assert random.weights == "random-init" and type(random.module).__name__ == type(source).__name__
    assert not torch.allclose(random.representation(x), model.representation(x))
    assert_exact(vd.decompose(random, x, granularity="head"), 1e-5)


def test_family_default_preprocessing_without_a_processor(tmp_path):
    for name, mean, mode in [
        ("clip_vision_proj", (0.48145466, 0.4578275, 0.40821073), "shortest_crop"),
        ("vit", (0.5, 0.5, 0.5), "squash"),
        ("dinov2", (0.485, 0.456, 0.406), "shortest_crop"),
    ]:
        directory = tmp_path / name
        VARIANTS[name]("sdpa").save_pretrained(directory)
        prep = vd.load(f"hf:{directory}", pretrained=False).preprocessing
        assert prep.mean == pytest.approx(mean) and prep.resize_mode == mode and prep.input_size == (32, 32)


def test_preprocessing_comes_from_the_saved_image_processor(tmp_path):
    from PIL import Image

    vit_dir, clip_dir = tmp_path / "vit", tmp_path / "clip"
    VARIANTS["vit"]("sdpa").save_pretrained(vit_dir)
    transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.1, 0.2, 0.3], image_std=[0.3, 0.2, 0.1]
    ).save_pretrained(vit_dir)
    VARIANTS["clip_vision_proj"]("sdpa").save_pretrained(clip_dir)
    transformers.CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}).save_pretrained(
        clip_dir
    )

    vit = vd.load(f"hf:{vit_dir}", pretrained=False)
    prep = vit.preprocessing
    assert prep.mean == pytest.approx((0.1, 0.2, 0.3)) and prep.std == pytest.approx((0.3, 0.2, 0.1))
    assert prep.resize_mode == "squash" and prep.input_size == (32, 32) and prep.interpolation == "bilinear"
    assert "image_processor" in vit.extras

    clip = vd.load(f"hf:{clip_dir}", pretrained=False)
    prep = clip.preprocessing
    assert (
        prep.resize_mode == "shortest_crop" and prep.crop_pct == pytest.approx(0.8) and prep.interpolation == "bicubic"
    )
    assert prep.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))

    image = Image.fromarray((torch.rand(50, 70, 3) * 255).to(torch.uint8).numpy())
    for model in (vit, clip):
        pixels = model.transform(image)
        assert pixels.shape == (3, 32, 32)
        assert_exact(vd.decompose(model, pixels[None]), 1e-5)
    # the squash transform against the processor's own normalisation of a constant image
    flat = Image.new("RGB", (50, 70), (255, 0, 128))
    got = vit.transform(flat)[:, 0, 0]
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor([0.1, 0.2, 0.3])) / torch.tensor([0.3, 0.2, 0.1])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["vit_classifier", "clip_model", "dinov2_swiglu"])
def test_checkpoint_round_trip(tmp_path, name):
    from safetensors.torch import save_file

    factory = VARIANTS[name]
    factory("sdpa").save_pretrained(tmp_path / "config")  # an architecture directory
    source: Any = perturb(factory("sdpa"), seed=11, scale=0.5)  # different weights
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    x = vd.wrap(source).example_input(batch=2)
    for pretrained in (False, True):  # a checkpoint means no hub weights either way
        model = vd.load(f"hf:{tmp_path / 'config'}", pretrained=pretrained, checkpoint=path)
        assert model.weights.startswith("checkpoint:")
        torch.testing.assert_close(model.representation(x), _stock_representation(source, x), rtol=0, atol=0)
        assert_exact(vd.decompose(model, x), 1e-5)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"embeddings.cls_token": torch.zeros(3)}, str(wrong))
    with pytest.raises(vd.InputError):
        vd.load(f"hf:{tmp_path / 'config'}", pretrained=False, checkpoint=wrong)


@pytest.mark.parametrize("pretrained", [True, False])
def test_uncached_hub_id_offline_raises_weights_unavailable(pretrained):
    with pytest.raises(vd.WeightsUnavailableError, match="vitdecomp-tests/not-a-cached-repo"):
        vd.load("hf:vitdecomp-tests/not-a-cached-repo", pretrained=pretrained)


def test_missing_weights_in_a_local_directory_raise_weights_unavailable(tmp_path):
    VARIANTS["vit"]("sdpa").config.save_pretrained(tmp_path)  # config only
    with pytest.raises(vd.WeightsUnavailableError, match="pretrained=False"):
        vd.load(f"hf:{tmp_path}", pretrained=True)
    assert vd.load(f"hf:{tmp_path}", pretrained=False).weights == "random-init"


def test_bad_local_paths_are_input_errors(tmp_path):
    for spec in ("hf:./no/such/model-dir", f"hf:{tmp_path / 'missing' / 'dir'}"):
        with pytest.raises(vd.InputError) as info:
            vd.load(spec)
        assert not isinstance(info.value, vd.WeightsUnavailableError)
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(vd.InputError, match="is a file"):
        vd.load(f"hf:{tmp_path / 'file.bin'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(vd.InputError, match="not a transformers model directory"):
        vd.load(f"hf:{empty}", pretrained=False)


def test_unsupported_model_type_from_a_directory(tmp_path):
    transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2]).save_pretrained(
        tmp_path
    )
    with pytest.raises(vd.UnsupportedModelError, match="model_type 'swin'"):
        vd.load(f"hf:{tmp_path}", pretrained=False)


def test_importing_the_adapter_does_not_import_transformers():
    code = (
        "import sys, vitdecomp, vitdecomp.core.adapters.hf_vit\n"
        "from vitdecomp.core.adapters.base import registered_adapters\n"
        "assert any(a.family == 'hf-vit' for a in registered_adapters())\n"
        "assert 'transformers' not in sys.modules, 'transformers imported eagerly'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_split_modules_keep_the_old_import_path_and_register_once():
    from vitdecomp.core.adapters import hf_loader, hf_reader, hf_vit
    from vitdecomp.core.adapters.base import registered_adapters

    assert hf_vit.HFViTAdapter is hf_reader.HFViTAdapter is HFViTAdapter
    assert hf_vit.load_hf is hf_loader.load_hf
    assert hf_vit.preprocessing_from_processor is hf_loader.preprocessing_from_processor
    for name in ("CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "HALF", "Representation"):
        assert getattr(hf_vit, name) is getattr(hf_reader, name)
    assert sum(isinstance(a, HFViTAdapter) for a in registered_adapters()) == 1


def test_bad_representation_option():
    with pytest.raises(vd.InputError):
        HFViTAdapter(representation="logits")  # type: ignore[arg-type]


def test_directions_project_before_expanding():
    model = vd.wrap(tiny_hf_clip())
    x = model.example_input(batch=2)
    dirs = F.normalize(torch.randn(5, 32, generator=torch.Generator().manual_seed(3)), dim=-1)
    direct = vd.decompose(model, x, granularity="head_token", directions=dirs, dtype=torch.float64)
    after = vd.decompose(model, x, granularity="head_token", dtype=torch.float64).project(dirs.double())
    torch.testing.assert_close(direct.values, after.values, rtol=1e-9, atol=1e-10)
