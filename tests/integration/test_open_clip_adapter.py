"""open_clip towers and CLIP models: exactness, independent references, hooks and loading.

Everything runs offline on tiny random models built with open_clip's own classes
(``HF_HUB_OFFLINE=1``; no weights are downloaded).
"""
from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitdecomp as vd
from vitdecomp.testing import assert_exact, tiny_open_clip, tiny_open_clip_vision
from vitdecomp.testing.tiny_models import perturb

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------ model builders
def _randomise_head_scale(module: nn.Module, seed: int) -> nn.Module:
    """open_clip initialises ``head_scale`` to ones (and ``perturb`` skips 3-d params): make it matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("head_scale"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
    return module


def _tower(seed: int = 0, *, no_proj: bool = False, **kwargs: Any) -> nn.Module:
    module = tiny_open_clip_vision(seed=seed, **kwargs)
    if no_proj:
        module.proj = None  # what open_clip's prune_intermediate_layers(prune_head=True) does
    return _randomise_head_scale(module, seed)


def _clip(seed: int = 0, custom_text: bool = False, **vision: Any) -> nn.Module:
    from open_clip.model import CLIP, CustomTextCLIP

    torch.manual_seed(seed)
    vision_cfg = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 16, "mlp_ratio": 4.0}
    vision_cfg.update(vision)
    text_cfg = {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 4, "layers": 2}
    cls = CustomTextCLIP if custom_text else CLIP
    return perturb(cls(embed_dim=32, vision_cfg=vision_cfg, text_cfg=text_cfg), seed)


def _timm_tower(seed: int = 0, **kwargs: Any) -> nn.Module:
    """open_clip ``TimmModel`` around timm's tiny ``test_vit`` (160 px, 6 blocks, 2 heads, width 64)."""
    from open_clip.timm_model import TimmModel

    torch.manual_seed(seed)
    return perturb(TimmModel("test_vit", embed_dim=32, image_size=160, **kwargs), seed)


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "tok": lambda: _tower(),
    "avg": lambda: _tower(pool_type="avg"),
    "tok_ln_after_pool": lambda: _tower(final_ln_after_pool=True),
    "avg_ln_after_pool": lambda: _tower(pool_type="avg", final_ln_after_pool=True),
    "layer_scale": lambda: _tower(ls_init_value=0.5),
    "no_proj": lambda: _tower(no_proj=True, pool_type="avg"),
    "output_tokens": lambda: _tower(output_tokens=True),
    "custom_plain": lambda: _tower(block_type="custom", ls_init_value=0.5),
    "custom_qk_norm_head_scale": lambda: _tower(qk_norm=True, scale_heads=True, ls_init_value=0.5),
    "custom_scale_fc": lambda: _tower(scale_fc=True, pool_type="avg"),
    "clip": lambda: _clip(),
    "custom_text_clip": lambda: _clip(custom_text=True, ls_init_value=0.5),
    "timm_token_linear_proj": lambda: _timm_tower(pool="token", proj="linear", proj_bias=True),
    "timm_avg_trunk_head": lambda: _timm_tower(pool="avg", proj=""),
    "timm_map": lambda: _timm_tower(pool="map", proj="none"),
}


def _own_output(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The stock representation: ``encode_image`` of a whole model, else the tower's (pooled) output."""
    with torch.no_grad():
        out = module.encode_image(x) if hasattr(module, "encode_image") else module(x)
    return out[0] if isinstance(out, tuple) else out


def _assert_no_hooks(module: nn.Module) -> None:
    for name, sub in module.named_modules():
        assert not sub._forward_hooks and not sub._forward_pre_hooks, f"hook left on {name or 'root'}"
        assert not getattr(sub, "_forward_hooks_with_kwargs", {}), name
        assert not getattr(sub, "_forward_pre_hooks_with_kwargs", {}), name


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def variant(request: pytest.FixtureRequest) -> tuple[str, vd.Model, torch.Tensor]:
    model = vd.wrap(BUILDERS[request.param]())
    return request.param, model, model.example_input(batch=2, seed=2)


# ------------------------------------------------------------------ exactness
@pytest.mark.parametrize("granularity", ["layer", "head", "head_token"])
@pytest.mark.parametrize("start_layer", [0, -1])
def test_sums_to_the_stock_representation(variant, granularity, start_layer):
    _, model, x = variant
    assert model.family == "open_clip-vit"
    stack = vd.decompose(model, x, granularity=granularity, start_layer=start_layer, check=False)
    assert_exact(stack, 1e-5)
    own = _own_output(model.module, x)
    assert own.dim() == 2
    # the reference is the model's own output, bit for bit (same no-grad path)
    torch.testing.assert_close(stack.reference, own, rtol=0, atol=0)
    n_blocks = model.n_layers
    first = stack.labels[0]
    assert str(first) == ("embed" if start_layer == 0 else "rest")
    if granularity != "layer":
        n_heads = model.structure.blocks[0].attn.n_heads
        heads = stack.select(kind="head")
        assert len(heads) == n_heads * (n_blocks if start_layer == 0 else 1)


def test_float64_and_token_terms_sum_to_heads(variant):
    name, model, x = variant
    heads = vd.decompose(model, x, dtype=torch.float64)
    tokens = vd.decompose(model, x, granularity="head_token", dtype=torch.float64)
    assert heads.error() < 1e-10 and tokens.error() < 1e-10
    assert [str(lab) for lab in tokens.sum_tokens().labels] == [str(lab) for lab in heads.labels]
    torch.testing.assert_close(tokens.sum_tokens().values, heads.values, rtol=1e-9, atol=1e-12)
    assert tokens.tokens is not None and tokens.tokens.types[0] == "cls"
    assert tokens.tokens.types.count("cls") == 1 and "reg" not in tokens.tokens.types
    side = 4 if not name.startswith("timm") else 10
    assert tokens.tokens.grid == (side, side)
    assert model.dtype == torch.float32  # the temporary float64 cast was undone


def test_neurons_fold_layer_scale_and_sum_to_the_mlp():
    model = vd.wrap(_tower(ls_init_value=0.5))
    x = model.example_input(batch=2, seed=5)
    plain = vd.decompose(model, x, dtype=torch.float64)
    neurons = vd.decompose(model, x, dtype=torch.float64, mlp_neurons=True)
    assert neurons.error() < 1e-10
    for layer in range(model.n_layers):
        split = neurons.select(kind="neuron", layer=layer).total() + neurons[f"L{layer:02d}.mlp_bias"]
        torch.testing.assert_close(split, plain[f"L{layer:02d}.mlp"], rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ independent references
@pytest.mark.parametrize(
    "kwargs",
    [{"ls_init_value": 0.5}, {"qk_norm": True, "scale_heads": True, "ls_init_value": 0.5}],
    ids=["mha_layer_scale", "custom_qk_norm_head_scale"],
)
def test_heads_and_bias_add_up_to_the_attention_write(kwargs):
    """Without a readout (ln_post Identity, no proj) a row is the residual write at CLS itself."""
    tower = _tower(seed=7, **kwargs)
    tower.ln_post = nn.Identity()
    tower.proj = None
    tower = tower.double()
    model = vd.wrap(tower)
    x = model.example_input(batch=2, seed=8)
    stack = vd.decompose(model, x)
    assert stack.error() < 1e-10

    seen: dict[str, torch.Tensor] = {}
    handles = [tower.transformer.resblocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0]))]
    for layer, blk in enumerate(tower.transformer.resblocks):
        handles.append(blk.ls_1.register_forward_hook(lambda m, a, o, l=layer: seen.__setitem__(f"attn{l}", o)))
        handles.append(blk.ls_2.register_forward_hook(lambda m, a, o, l=layer: seen.__setitem__(f"mlp{l}", o)))
    try:
        with torch.no_grad():
            tower(x)
    finally:
        for handle in handles:
            handle.remove()

    torch.testing.assert_close(stack["embed"], seen["in"][:, 0], rtol=1e-10, atol=1e-12)
    for layer in range(model.n_layers):
        heads = stack.select(kind="head", layer=layer).total()
        torch.testing.assert_close(heads + stack[f"L{layer:02d}.bias"], seen[f"attn{layer}"][:, 0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(stack[f"L{layer:02d}.mlp"], seen[f"mlp{layer}"][:, 0], rtol=1e-10, atol=1e-12)
    assert float(stack["bias"].abs().max()) == 0.0  # no readout: no constant


def _naive_head_terms(tower: nn.Module, x: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    """Per-head direct effect on the image embedding, written out from the weights.

    For each block the CLS query of head h attends over all tokens: a = softmax(q_cls K^T / sqrt(d_h)),
    the head writes (a V_plain) W_O^h (value bias left out: it is the layer's bias row), times the
    layer scale; the write reaches the output through ln_post with the CLS token's frozen statistics
    (centred, scaled by gamma / sigma) and then proj.
    """
    blocks = list(tower.transformer.resblocks)
    block_in: dict[int, torch.Tensor] = {}
    final: dict[str, torch.Tensor] = {}
    handles = [
        blk.register_forward_pre_hook(lambda m, a, l=layer: block_in.__setitem__(l, a[0]))
        for layer, blk in enumerate(blocks)
    ]
    handles.append(blocks[-1].register_forward_hook(lambda m, a, o: final.__setitem__("x", o)))
    try:
        with torch.no_grad():
            tower(x)
    finally:
        for handle in handles:
            handle.remove()
    x_cls = final["x"][:, 0]
    ln = tower.ln_post
    sigma = torch.sqrt(x_cls.var(-1, unbiased=False, keepdim=True) + ln.eps)
    terms: dict[tuple[int, int], torch.Tensor] = {}
    with torch.no_grad():
        for layer, blk in enumerate(blocks):
            attn = blk.attn
            d = attn.in_proj_weight.shape[1]
            n_heads = attn.num_heads
            dh = d // n_heads
            u = F.layer_norm(block_in[layer], (d,), blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)  # [B, N, d]
            w, b = attn.in_proj_weight, attn.in_proj_bias
            for head in range(n_heads):
                rq = slice(head * dh, (head + 1) * dh)
                rk = slice(d + head * dh, d + (head + 1) * dh)
                rv = slice(2 * d + head * dh, 2 * d + (head + 1) * dh)
                q = u[:, 0] @ w[rq].T + b[rq]  # [B, dh]
                k = u @ w[rk].T + b[rk]  # [B, N, dh]
                v = u @ w[rv].T  # [B, N, dh]
                ln_q = getattr(attn, "ln_q", None)
                if isinstance(ln_q, nn.LayerNorm):
                    q = F.layer_norm(q, (dh,), ln_q.weight, ln_q.bias, ln_q.eps)
                    k = F.layer_norm(k, (dh,), attn.ln_k.weight, attn.ln_k.bias, attn.ln_k.eps)
                pattern = torch.softmax(torch.einsum("bd,bnd->bn", q, k) / dh**0.5, dim=-1)  # [B, N]
                z = torch.einsum("bn,bnd->bd", pattern, v)
                if getattr(attn, "head_scale", None) is not None:
                    z = z * attn.head_scale[head, 0, 0]
                write = z @ attn.out_proj.weight[:, rq].T  # [B, d]
                if isinstance(getattr(blk.ls_1, "gamma", None), torch.Tensor):
                    write = write * blk.ls_1.gamma
                normed = ln.weight * (write - write.mean(-1, keepdim=True)) / sigma
                terms[(layer, head)] = normed @ tower.proj
    return terms


@pytest.mark.parametrize(
    "kwargs",
    [{"ls_init_value": 0.5}, {"qk_norm": True, "scale_heads": True, "ls_init_value": 0.5}],
    ids=["mha_layer_scale", "custom_qk_norm_head_scale"],
)
def test_heads_match_a_naive_reference(kwargs):
    tower = _tower(seed=3, **kwargs).double()
    model = vd.wrap(tower)
    x = model.example_input(batch=2, seed=4)
    stack = vd.decompose(model, x)
    assert stack.error() < 1e-10
    for (layer, head), expected in _naive_head_terms(tower, x).items():
        torch.testing.assert_close(stack[f"L{layer:02d}.H{head:02d}"], expected, rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------ hooks, batches, layouts
@pytest.mark.parametrize("name", ["layer_scale", "avg", "clip", "timm_map"])
def test_hooks_removed_and_outputs_unchanged(name):
    module = BUILDERS[name]()
    model = vd.wrap(module)
    x = model.example_input(batch=2, seed=1)
    before = _own_output(module, x)
    vd.decompose(model, x, granularity="head_token")
    vd.decompose(model, x, dtype=torch.float64, mlp_neurons=name != "timm_map")
    _assert_no_hooks(module)
    torch.testing.assert_close(_own_output(module, x), before, rtol=0, atol=0)
    with pytest.raises(vd.InputError):  # a forward that fails half-way still removes its hooks
        vd.decompose(model, x[..., :-8, :])
    _assert_no_hooks(module)
    assert all(p.dtype == torch.float32 for p in module.parameters())


@pytest.mark.parametrize("name", ["tok", "avg", "custom_qk_norm_head_scale", "clip"])
def test_batch_invariance(name):
    model = vd.wrap(BUILDERS[name]())
    x = model.example_input(batch=3, seed=6)
    batch = vd.decompose(model, x, granularity="head_token")
    alone = vd.decompose(model, x[1:2], granularity="head_token")
    torch.testing.assert_close(batch.values[:, 1:2], alone.values, rtol=1e-4, atol=1e-5)


def test_sequence_first_input_is_refused_at_run_time():
    """The layout guard in ``qkv``: a [N, B, d] attention input for the pass's batch size raises."""
    model = vd.wrap(_tower())
    vmap = model.vit_map
    x = model.example_input(batch=2)
    with torch.no_grad():
        vmap.forward(x)  # records the batch size of the pass
        q, k, v = vmap.blocks[0].attn.qkv({"attn_in": torch.randn(2, 17, 64)})
        assert q.shape == k.shape == v.shape == (2, 4, 17, 16)
        with pytest.raises(vd.UnsupportedModelError, match="sequence-first"):
            vmap.blocks[0].attn.qkv({"attn_in": torch.randn(17, 2, 64)})


def test_float64_is_refused_for_layernorm_fp32():
    from open_clip.transformer import LayerNormFp32

    module = tiny_open_clip_vision(norm_layer=LayerNormFp32)
    model = vd.wrap(module)
    x = model.example_input(batch=2)
    assert vd.decompose(model, x).error() < 1e-5
    with pytest.raises(vd.UnsupportedModelError, match="LayerNormFp32"):
        vd.decompose(model, x, dtype=torch.float64)
    assert all(p.dtype == torch.float32 for p in module.parameters())
    _assert_no_hooks(module)


# ------------------------------------------------------------------ what is read, what is refused
def test_whole_models_are_read_through_their_visual_tower():
    clip = tiny_open_clip()
    model = vd.wrap(clip)
    assert model.module is clip and model.classifier() is None
    facts = model.describe()
    assert facts["projection"] == (64, 32) and facts["pool"] == "cls" and facts["prefix_tokens"] == ["cls"]
    assert facts["input_size"] == [32, 32] and facts["heads"] == 4 and facts["blocks"] == 2
    from vitdecomp.core.adapters.base import adapter_for

    timm_vit = pytest.importorskip("timm").create_model("test_vit", pretrained=False)
    assert adapter_for(timm_vit).family == "timm-vit"
    with pytest.raises(vd.UnsupportedModelError):
        vd.wrap(nn.Linear(3, 3))


def _seq_first_tower() -> nn.Module:
    from open_clip.transformer import Transformer

    tower = _tower()
    tower.transformer = Transformer(64, 2, 4, batch_first=False)  # runs, transposing to [N, B, d]
    return tower


def _attn_swapped(**mha: Any) -> nn.Module:
    tower = _tower()
    tower.transformer.resblocks[1].attn = nn.MultiheadAttention(64, 4, **mha)
    return tower


def _extra_attention_param() -> nn.Module:
    tower = _tower()
    tower.transformer.resblocks[0].attn.register_parameter("rel_bias", nn.Parameter(torch.zeros(4, 17, 17)))
    return tower


UNSUPPORTED: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "attentional_pooler": (
        lambda: _tower(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2),
        "AttentionalPooler",
    ),
    "scaled_cosine": (lambda: _tower(scaled_cosine_attn=True), r"resblocks\.0\.attn: scaled-cosine"),
    "inner_norm": (lambda: _tower(scale_attn_inner=True), r"resblocks\.0\.attn\.ln_inner: .*scale_attn_inner"),
    "norm_after_attention": (lambda: _tower(scale_attn=True), r"resblocks\.0\.ln_attn: .*scale_attn"),
    "pool_none": (lambda: _tower(pool_type="none"), "pool_type='none'"),
    "sequence_first_transformer": (_seq_first_tower, "batch_first=False"),
    "sequence_first_mha": (lambda: _attn_swapped(), r"resblocks\.1\.attn: runs sequence-first"),
    "zero_attention": (lambda: _attn_swapped(batch_first=True, add_zero_attn=True), "add_zero_attn"),
    "bias_kv": (lambda: _attn_swapped(batch_first=True, add_bias_kv=True), "add_bias_kv"),
    "separate_kv_dims": (lambda: _attn_swapped(batch_first=True, kdim=32, vdim=32), "in_proj_weight"),
    "unknown_attention_param": (_extra_attention_param, r"resblocks\.0\.attn\.rel_bias"),
    "timm_mlp_head": (lambda: _timm_tower(pool="token", proj="mlp"), r"visual\.head\.mlp"),
    "timm_convnet_trunk": (
        lambda: __import__("open_clip.timm_model", fromlist=["TimmModel"]).TimmModel(
            "test_resnet", embed_dim=32, image_size=64, pool="avg", proj="linear"
        ),
        "VisionTransformer trunks",
    ),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_variants_raise_with_the_reason(name):
    build, reason = UNSUPPORTED[name]
    module = build()
    with pytest.raises(vd.UnsupportedModelError, match=reason):
        vd.wrap(module)


def test_preprocessing_reads_the_tower():
    tower = _tower()
    prep = vd.wrap(tower).preprocessing
    assert prep.input_size == (32, 32) and prep.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    tower = _tower()
    tower.image_mean, tower.image_std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # open_clip's legacy attributes
    prep = vd.wrap(tower).preprocessing
    assert prep.mean == (0.5, 0.5, 0.5) and prep.std == (0.25, 0.25, 0.25)
    tower.preprocess_cfg = {"mean": (0.1, 0.2, 0.3), "std": (1.0, 1.0, 1.0), "resize_mode": "squash"}
    prep = vd.wrap(tower).preprocessing
    assert prep.mean == (0.1, 0.2, 0.3) and prep.resize_mode == "squash"


# ------------------------------------------------------------------ loading
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8, "ls_init_value": 0.5},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 4, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real open_clip architecture config, registered the way users add their own."""
    folder = tmp_path_factory.mktemp("open_clip_configs")
    (folder / "vd-oc-tiny.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(folder)
    return "vd-oc-tiny"


def test_load_random_init_of_a_registered_config(tiny_arch):
    from PIL import Image

    model = vd.load(f"open_clip:{tiny_arch}", pretrained=False)
    assert model.weights == "random-init" and model.family == "open_clip-vit"
    assert model.name == f"open_clip:{tiny_arch}"
    assert model.module is model.extras["clip"] and not model.module.training
    tokens = model.extras["tokenizer"](["a photo of a cat"])
    assert tokens.shape == (1, 16)
    assert model.transform(Image.new("RGB", (50, 40), (120, 30, 200))).shape == (3, 32, 32)
    x = model.example_input(batch=2)
    stack = vd.decompose(model, x)
    assert stack.error() < 1e-5
    torch.testing.assert_close(stack.reference, _own_output(model.module, x), rtol=0, atol=0)


def test_checkpoint_round_trip(tiny_arch, tmp_path):
    from safetensors.torch import save_file

    from vitdecomp.core.model import file_sha256

    model = vd.load(f"open_clip:{tiny_arch}", pretrained=False)
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.module.state_dict().items()}, str(path))
    again = vd.load(f"open_clip:{tiny_arch}", checkpoint=path)  # pretrained=True + checkpoint: no download
    assert again.weights == f"checkpoint:{file_sha256(path, 16)}"
    x = model.example_input(batch=2, seed=3)
    fresh = vd.load(f"open_clip:{tiny_arch}", pretrained=False, seed=1)
    assert not torch.equal(fresh.representation(x), model.representation(x))  # other seed, other weights
    torch.testing.assert_close(again.representation(x), model.representation(x), rtol=0, atol=0)
    assert vd.decompose(again, x).error() < 1e-5
    bad = tmp_path / "bad.safetensors"
    save_file({"visual.proj": torch.zeros(3, 3)}, str(bad))
    with pytest.raises(vd.InputError, match="does not fit"):
        vd.load(f"open_clip:{tiny_arch}", pretrained=False, checkpoint=bad)


def test_local_dir_model(tmp_path):
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    cfg = {"model_cfg": TINY_CFG, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(11)
    saved = perturb(CLIP(**copy.deepcopy(TINY_CFG)), 11)
    save_file({k: v.contiguous() for k, v in saved.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))

    model = vd.load(f"open_clip:local-dir:{tmp_path}")
    assert model.weights.startswith(f"pretrained:open_clip/local-dir:{tmp_path.name}@sha256:")
    assert model.preprocessing.mean == (0.5, 0.5, 0.5) and model.preprocessing.std == (0.25, 0.25, 0.25)
    x = model.example_input(batch=2)
    torch.testing.assert_close(model.representation(x), _own_output(saved, x), rtol=0, atol=0)
    assert vd.decompose(model, x).error() < 1e-5
    assert vd.load(f"open_clip:local-dir:{tmp_path}", pretrained=False).weights == "random-init"
    with pytest.raises(vd.InputError, match=r"open_clip_config\.json"):
        vd.load(f"open_clip:local-dir:{tmp_path / 'missing'}")


def test_load_a_stock_architecture_with_its_tag_config():
    """ViT-B/32 at random init (about 2 s on a CPU); the tag sets QuickGELU and preprocessing."""
    model = vd.load("open_clip:ViT-B-32:openai", pretrained=False)
    assert model.weights == "random-init"
    visual = model.module.visual
    assert type(visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    facts = model.describe()
    assert facts["blocks"] == 12 and facts["heads"] == 12 and facts["projection"] == (768, 512)
    assert facts["input_size"] == [224, 224]
    x = model.example_input(batch=1)
    assert vd.decompose(model, x, start_layer=-2).error() < 1e-5


def _recording_create(calls: list[tuple[str, dict[str, Any]]]) -> Callable[..., Any]:
    """A stand-in for ``open_clip.create_model_and_transforms`` that records its call and stops."""

    def create(name: str, **kwargs: Any) -> Any:
        calls.append((name, kwargs))
        raise RuntimeError("sentinel: open_clip reached")

    return create


def test_offline_pretrained_fails_before_any_download(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path))  # open_clip's URL cache is ~/.cache/clip
    calls: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(open_clip, "create_model_and_transforms", _recording_create(calls))
    with pytest.raises(vd.WeightsUnavailableError, match=r"ViT-B-32:openai.*not in the local cache"):
        vd.load("open_clip:ViT-B-32:openai")
    with pytest.raises(vd.WeightsUnavailableError, match="checkpoint=FILE"):
        vd.load("open_clip:ViT-B-16:laion2b_s34b_b88k")
    with pytest.raises(vd.WeightsUnavailableError, match="ViT-B-32:openai"):  # no tag: open_clip's first one
        vd.load("open_clip:ViT-B-32")
    assert calls == []  # decided from the cache: open_clip (and the network) never reached


def test_offline_pretrained_in_the_cache_goes_to_open_clip(monkeypatch, tmp_path):
    """A tag whose weights are in the hub cache passes the offline check and reaches open_clip."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--timm--vit_base_patch32_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "open_clip_model.safetensors").write_bytes(b"")
    calls: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(open_clip, "create_model_and_transforms", _recording_create(calls))
    with pytest.raises(vd.WeightsUnavailableError, match="sentinel"):
        vd.load("open_clip:ViT-B-32:openai")
    assert calls and calls[0][0] == "ViT-B-32" and calls[0][1]["pretrained"] == "openai"
    assert calls[0][1]["force_quick_gelu"] is True


def test_random_init_takes_the_tag_preprocessing(monkeypatch):
    calls: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(open_clip, "create_model_and_transforms", _recording_create(calls))
    with pytest.raises(RuntimeError, match="sentinel"):  # random init: not a weights problem
        vd.load("open_clip:ViT-B-16-SigLIP:webli", pretrained=False)
    name, kwargs = calls[0]
    assert name == "ViT-B-16-SigLIP" and kwargs["pretrained"] is None and kwargs["require_pretrained"] is False
    assert kwargs["image_mean"] == (0.5, 0.5, 0.5) and kwargs["image_resize_mode"] == "squash"
    assert kwargs["pretrained_text"] is False  # no base-tower downloads at random init


def test_the_representation_is_encode_image():
    """A model whose ``encode_image`` is not its tower's output is caught, never decomposed wrongly."""
    from open_clip.model import CLIP

    class Doubled(CLIP):
        def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
            return 2 * super().encode_image(image, normalize)

    clip = tiny_open_clip()
    clip.__class__ = Doubled
    model = vd.wrap(clip)
    x = model.example_input(batch=2)
    with pytest.raises(vd.DecompositionError):
        vd.decompose(model, x)


def test_bad_names_fail_clearly(tiny_arch):
    with pytest.raises(vd.InputError, match="ViT-B-32"):
        vd.load("open_clip:ViT-B-33", pretrained=False)
    with pytest.raises(vd.InputError, match="laion2b_s34b_b79k"):
        vd.load("open_clip:ViT-B-32:no-such-tag", pretrained=False)
    with pytest.raises(vd.InputError, match="no pretrained weights"):
        vd.load(f"open_clip:{tiny_arch}")
