"""Exactness and behaviour of decompose() on tiny random timm MaxViT / MaxxViT models (offline, seconds).

Independent references used here:

* every ``layer``-granularity row against the model's *own* intermediate writes (stem output,
  MBConv branch, attention branch, MLP branch, shortcut bias), pushed forward through the later
  downsample shortcuts with the pool modules' forward and the 1x1 weights, then the readout
  linearised by hand;
* per-head and per-token terms against a dense, hand-written window/grid attention (a block
  mask over all positions instead of timm's partition functions).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitdecomp as vd
from vitdecomp.testing import assert_exact
from vitdecomp.testing.tiny_models import perturb

TINY = dict(embed_dim=(32, 64, 128, 256), depths=(1, 1, 1, 1), stem_width=(16, 32))

# (timm name, kwargs, pooled_norm): MBConv + BatchNorm with biased avg2 downsample shortcuts, an
# identity-shortcut block, rel-pos bias, norm-then-pool; relative-position MLP + LayerScale +
# overlapping 3x3 shortcut pool; TF-style (interleaved qkv, TF rel-pos bias, 'same' padding) with
# a pool-then-norm head; ConvNeXt conv blocks (MaxxViT); grid attention only (MaxxViT-v2).
VARIANTS = {
    "mbconv": ("test_maxvit", dict(img_size=96, depths=(1, 2, 1, 1), conv_output_bias=True), False),
    "rmlp_ls_avg3": (
        "test_maxvit",
        dict(
            img_size=64, conv_output_bias=True, conv_pool_type="avg", transformer_rel_pos_type="mlp",
            transformer_init_values=0.5,
        ),
        False,
    ),
    "tf_pooled_norm": (
        "maxvit_tiny_tf_224",
        dict(embed_dim=(32, 64, 96, 128), depths=(1, 1, 1, 1), stem_width=16, img_size=64, head_hidden_size=128),
        True,
    ),
    "convnext": ("maxxvit_rmlp_nano_rw_256", dict(TINY, img_size=64), False),
    "grid_only": ("maxxvitv2_nano_rw_256", dict(TINY, img_size=64), False),
}


def tiny_maxvit(name: str, seed: int = 0, pooled_norm: bool = False, **kwargs) -> nn.Module:
    """A timm MaxxVit at random init with perturbed norms, biases, BN running stats, rel-pos biases.

    ``pooled_norm=True`` drops the head's tanh pre-logits MLP (``head.pre_logits = Identity``), which
    leaves a pool-then-norm readout.
    """
    import timm

    torch.manual_seed(seed)
    module = timm.create_model(name, pretrained=False, **kwargs)
    if pooled_norm:
        module.head.pre_logits = nn.Identity()
    perturb(module, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in module.named_parameters():
            if "relative_position" in pname:
                p.add_(torch.randn(p.shape, generator=gen))
        for mod in module.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.add_(0.3 * torch.randn(mod.running_mean.shape, generator=gen))
                mod.running_var.mul_(torch.exp(0.3 * torch.randn(mod.running_var.shape, generator=gen)))
    return module.eval()


@pytest.fixture(scope="module", autouse=True)
def _one_cpu_thread():
    """oneDNN convolutions on these tiny maps are ~30x slower with 2 threads on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request):
    name, kwargs, pooled = VARIANTS[request.param]
    model = vd.wrap(tiny_maxvit(name, pooled_norm=pooled, **kwargs))
    return request.param, model, model.example_input(batch=2, seed=1)


@pytest.fixture(scope="module")
def mbconv():
    name, kwargs, pooled = VARIANTS["mbconv"]
    model = vd.wrap(tiny_maxvit(name, pooled_norm=pooled, **kwargs))
    return model, model.example_input(batch=2, seed=1)


def _unit_rows(stack, layer):
    return [i for i, lab in enumerate(stack.labels) if lab.layer == layer]


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("granularity", ["layer", "head", "head_token"])
@pytest.mark.parametrize("start_layer", [0, 4, -1])
def test_sums_to_model_output_fp32(variant, granularity, start_layer):
    _, model, x = variant
    stack = vd.decompose(model, x, granularity=granularity, start_layer=start_layer)
    assert_exact(stack, 1e-5)
    torch.testing.assert_close(stack.reference, model.representation(x), rtol=0, atol=0)
    assert stack.names[0] == ("embed" if start_layer == 0 else "rest") and stack.names[-1] == "bias"
    if granularity == "head_token":
        final = model.module.forward_features(x)  # the token axis is the final stage grid
        grid = stack.tokens.grid
        assert grid == tuple(final.shape[-2:]) and stack.values.shape[2] == grid[0] * grid[1]
        assert stack.meta["token_grid"] == list(grid)


def test_sums_to_model_output_fp64(variant):
    _, model, x = variant
    for granularity in ("layer", "head", "head_token"):
        for ln_mode in ("centered", "anchor"):
            stack = vd.decompose(model, x, granularity=granularity, ln_mode=ln_mode, dtype=torch.float64)
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
@pytest.mark.parametrize("start_layer", [0, -4])
def test_token_terms_sum_to_head_terms(variant, bias_mode, start_layer):
    _, model, x = variant
    kw = dict(bias_mode=bias_mode, start_layer=start_layer, dtype=torch.float64)
    heads = vd.decompose(model, x, granularity="head", **kw)
    tokens = vd.decompose(model, x, granularity="head_token", **kw)
    assert heads.labels == tokens.labels
    torch.testing.assert_close(tokens.sum_tokens().values, heads.values, rtol=1e-9, atol=1e-12)


def test_heads_sum_to_layer_attention_term(variant):
    _, model, x = variant
    heads = vd.decompose(model, x, granularity="head", dtype=torch.float64)
    layers = vd.decompose(model, x, granularity="layer", dtype=torch.float64)
    grouped = heads.group("attn_mlp")
    for unit in model.structure.units:
        prefix = f"S{unit.stage}.B{unit.index:02d}"
        if unit.layout == "nchw":  # conv unit: its own rows, same in both stacks
            torch.testing.assert_close(heads[f"{prefix}.conv"], layers[f"{prefix}.conv"])
            continue
        torch.testing.assert_close(grouped[f"{prefix}.attn"], layers[f"{prefix}.attn"] + layers[f"{prefix}.bias"])
        torch.testing.assert_close(grouped[f"{prefix}.mlp"], layers[f"{prefix}.mlp"])


def test_neurons_sum_to_mlp(variant):
    _, model, x = variant
    plain = vd.decompose(model, x, dtype=torch.float64)
    neurons = vd.decompose(model, x, mlp_neurons=True, dtype=torch.float64)
    assert neurons.error() < 1e-10
    for unit in model.structure.units:
        if unit.layout == "nchw":
            continue
        rows = neurons.select(kind=("neuron", "mlp_bias"), layer=unit.layer).values.sum(0)
        torch.testing.assert_close(rows, plain[f"S{unit.stage}.B{unit.index:02d}.mlp"], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("start", ["conv_with_shortcut", "window", "grid"])
def test_rest_equals_everything_before_start(variant, start):
    _, model, x = variant
    units = model.structure.units
    if start == "conv_with_shortcut":
        cands = [u.layer for u in units if u.layout == "nchw" and u.shortcut is not None and u.stage == 2]
    else:
        cands = [u.layer for u in units if u.layout == "nhwc" and u.partition == start and u.stage == 1]
    if not cands:
        pytest.skip(f"no {start} unit in stage 1/2 of this variant")
    s0 = cands[0]
    full = vd.decompose(model, x, dtype=torch.float64)
    late = vd.decompose(model, x, start_layer=s0, dtype=torch.float64)
    earlier = [lab.kind == "embed" or (lab.layer is not None and lab.layer < s0) for lab in full.labels]
    before = [i for i, keep in enumerate(earlier) if keep]
    torch.testing.assert_close(late["rest"], full.values[before].sum(0), rtol=1e-9, atol=1e-10)
    for name in late.names[1:]:
        torch.testing.assert_close(late[name], full[name], rtol=1e-9, atol=1e-10)


# ----------------------------------------------------------------------------- independent references
def _push(module, y, after_unit_layer, units):
    """A write ``y [B, C, H, W]`` after unit ``after_unit_layer`` -> its image on the final grid
    (later shortcut pools run forward, 1x1 weights without bias)."""
    for unit in units:
        if unit.layer <= after_unit_layer or unit.layout != "nchw":
            continue
        sc = unit.module.shortcut
        if isinstance(sc, nn.Identity):
            continue
        pool = getattr(sc, "pool", None)
        conv = sc.expand if pool is not None else sc
        if pool is not None:
            y = pool(y)
        if isinstance(conv, nn.Conv2d):
            y = F.conv2d(y, conv.weight)
    return y


def _readout_lin(module, final):
    """The readout's linear part with frozen statistics (centred), applied to a final-grid map."""
    x = final.flatten(2).transpose(1, 2)  # [B, P, C] actual final map
    norm = module.norm
    if isinstance(norm, nn.LayerNorm):
        sigma = (x.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()

        def apply(y):
            y = y.flatten(2).transpose(1, 2)
            return (norm.weight * (y - y.mean(-1, keepdim=True)) / sigma).mean(1)

        return apply
    head_norm = module.head.norm
    pooled = x.mean(1)
    sigma = (pooled.var(-1, unbiased=False, keepdim=True) + head_norm.eps).sqrt()

    def apply_pooled(y):
        m = y.mean((2, 3))
        return head_norm.weight * (m - m.mean(-1, keepdim=True)) / sigma

    return apply_pooled


def _capture_writes(model, x):
    """The model's own writes: stem output, conv branches, attention and MLP branches, final map."""
    module = model.module
    units = model.structure.units
    got: dict = {}
    handles = [module.stem.register_forward_hook(lambda m, a, o: got.__setitem__("embed", o.detach().clone()))]
    last = module.stages[-1]
    handles.append(last.register_forward_hook(lambda m, a, o: got.__setitem__("final", o.detach().clone())))
    for unit in units:
        if unit.layout == "nchw":
            handles.append(unit.module.drop_path.register_forward_hook(
                lambda m, a, o, u=unit.layer: got.__setitem__(("conv", u), o.detach().clone())))
        else:
            for key, mod in (("attn", unit.module.ls1), ("mlp", unit.module.ls2)):
                def keep(m, a, o, u=unit.layer, key=key):
                    got[(key, u)] = o.detach().permute(0, 3, 1, 2).clone()  # NHWC -> NCHW

                handles.append(mod.register_forward_hook(keep))
    try:
        with torch.no_grad():
            model.representation(x)
    finally:
        for h in handles:
            h.remove()
    return got


def test_layer_rows_match_the_models_own_writes_pushed_forward(variant):
    _, model, x = variant
    module = model.module.double()
    try:
        xd = x.double()
        units = model.structure.units
        stack = vd.decompose(model, xd, granularity="layer", dtype=torch.float64)
        got = _capture_writes(model, xd)
        lin = _readout_lin(module, got["final"])
        with torch.no_grad():
            close = dict(rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(stack["embed"], lin(_push(module, got["embed"], -1, units)), **close)
            for unit in units:
                prefix = f"S{unit.stage}.B{unit.index:02d}"
                if unit.layout == "nchw":
                    expect = lin(_push(module, got[("conv", unit.layer)], unit.layer, units))
                    torch.testing.assert_close(stack[f"{prefix}.conv"], expect, **close)
                    bias = unit.shortcut.bias if unit.shortcut is not None else None
                    if bias is not None:
                        shape = got[("conv", unit.layer)].shape
                        const = bias.double()[None, :, None, None].expand(shape)
                        expect = lin(_push(module, const, unit.layer, units))
                        torch.testing.assert_close(stack[f"{prefix}.bias"], expect, **close)
                    else:
                        assert f"{prefix}.bias" not in stack.names
                    continue
                attn = lin(_push(module, got[("attn", unit.layer)], unit.layer, units))
                torch.testing.assert_close(stack[f"{prefix}.attn"] + stack[f"{prefix}.bias"], attn, **close)
                mlp = lin(_push(module, got[("mlp", unit.layer)], unit.layer, units))
                torch.testing.assert_close(stack[f"{prefix}.mlp"], mlp, **close)
    finally:
        module.float()


def _dense_head_writes(unit_map, unit_input, cells=None, final_grid=None):
    """Per-head writes of one partition unit at every position, from a dense masked attention.

    Position ``(i, j)`` of an ``H x W`` grid lies in window ``(i // P, j // P)`` at slot
    ``(i % P, j % P)`` (block attention), or in grid group ``(i % (H/G), j % (W/G))`` at slot
    ``(i // (H/G), j // (W/G))`` (grid attention). Values without their bias (explicit mode).
    With ``cells``, also returns each head's write restricted to the sources in each final-grid
    cell: ``[T, B, H, C, Hg, Wg]``.
    """
    unit = unit_map.module
    attn = unit.attn
    b, hh, ww, c = unit_input.shape
    ii, jj = torch.meshgrid(torch.arange(hh), torch.arange(ww), indexing="ij")
    p = tuple(unit.partition_size)
    if unit.partition_block:
        group = (ii // p[0]) * (ww // p[1]) + jj // p[1]
        slot = (ii % p[0]) * p[1] + jj % p[1]
    else:
        sh, sw = hh // p[0], ww // p[1]
        group = (ii % sh) * sw + jj % sw
        slot = (ii // sh) * p[1] + jj // sw
    group, slot = group.reshape(-1), slot.reshape(-1)
    u = unit.norm1(unit_input).reshape(b, hh * ww, c)
    qkv = u @ attn.qkv.weight.T + attn.qkv.bias
    nh, dh = attn.num_heads, attn.dim_head
    assert attn.head_first
    q, k, v = qkv.reshape(b, -1, nh, 3 * dh).transpose(1, 2).chunk(3, dim=-1)  # [B, H, N, dh]
    v = v - attn.qkv.bias.reshape(nh, 3 * dh)[:, 2 * dh :][None, :, None, :]
    scores = (q @ k.transpose(-1, -2)) * dh**-0.5
    rel = attn.rel_pos.get_bias().reshape(nh, p[0] * p[1], p[0] * p[1])
    scores = scores + rel[:, slot][:, :, slot][None]
    scores = scores.masked_fill(group[:, None] != group[None, :], float("-inf"))
    alpha = scores.softmax(-1)  # [B, H, N(query), N(key)]
    w_o = attn.proj.weight.T.reshape(nh, dh, c)
    gamma = unit.ls1.gamma if hasattr(unit.ls1, "gamma") else torch.ones(c, dtype=u.dtype)
    per_source = torch.einsum("bhps,bhsd,hdc->bhpsc", alpha, v, w_o) * gamma  # [B, H, N, N, C]
    heads = per_source.sum(3).reshape(b, nh, hh, ww, c).permute(0, 1, 4, 2, 3)  # [B, H, C, Hg, Wg]
    if cells is None:
        return heads, None
    hf, wf = final_grid
    cell = ((ii * hf // hh) * wf + jj * wf // ww).reshape(-1)
    by_cell = torch.stack([per_source[:, :, :, cell == t].sum(3) for t in range(hf * wf)])
    return heads, by_cell.reshape(hf * wf, b, nh, hh, ww, c).permute(0, 1, 2, 5, 3, 4)


@pytest.mark.parametrize("partition", ["window", "grid"])
@pytest.mark.parametrize("stage", [0, 3])
def test_head_and_token_terms_match_a_dense_reference(mbconv, partition, stage):
    model, x = mbconv
    module = model.module.double()
    try:
        xd = x.double()
        units = model.structure.units
        unit = next(u for u in units if u.layout == "nhwc" and u.partition == partition and u.stage == stage)
        seen = {}
        handle = unit.module.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach().clone()))
        try:
            got = _capture_writes(model, xd)
        finally:
            handle.remove()
        heads = vd.decompose(model, xd, granularity="head", dtype=torch.float64)
        toks = vd.decompose(model, xd, granularity="head_token", dtype=torch.float64)
        grid = toks.tokens.grid
        lin = _readout_lin(module, got["final"])
        with torch.no_grad():
            dense, by_cell = _dense_head_writes(unit, seen["x"], cells=True, final_grid=grid)
            for h in range(unit.n_heads):
                name = f"S{unit.stage}.B{unit.index:02d}.H{h:02d}"
                expect = lin(_push(module, dense[:, h], unit.layer, units))
                torch.testing.assert_close(heads[name], expect, rtol=1e-9, atol=1e-10)
                for t in range(grid[0] * grid[1]):
                    expect_t = lin(_push(module, by_cell[t, :, h], unit.layer, units))
                    torch.testing.assert_close(toks[name][:, t], expect_t, rtol=1e-9, atol=1e-10)
    finally:
        module.float()


# ----------------------------------------------------------------------------- behaviour
def test_labels_units_and_layer_convention(mbconv):
    model, x = mbconv
    stack = vd.decompose(model, x, granularity="head")
    units = stack.meta["units"]
    assert stack.meta["layer_convention"] == "maxvit-units" and stack.meta["n_layers"] == len(units) == model.n_layers
    assert [u["kind"] for u in units[:3]] == ["mbconv", "window", "grid"]
    assert units[1]["module"] == "stages.0.blocks.0.attn_block" and units[1]["label"] == "S0.B01"
    assert "S0.B00.conv" in stack.names and "S0.B00.bias" not in stack.names  # stem width == stage width: pool only
    assert "S1.B00.bias" in stack.names  # biased downsample shortcut (avg pool + 1x1 conv)
    assert "S1.B03.conv" in stack.names and "S1.B03.bias" not in stack.names  # identity shortcut
    assert "S0.B01.H00" in stack.names and "S0.B02.H00" in stack.names  # window vs grid heads
    for name in ("S0.B00.conv", "S2.B01.H01", "S3.B02.mlp"):
        assert str(vd.parse_label(name)) == name
        assert stack[name].shape == stack.reference.shape
    assert stack.select(kind="conv").n_components == sum(u["kind"] == "mbconv" for u in units)
    grouped = stack.group("layer")
    assert grouped.error() < 1e-5 and len(grouped) == 1 + model.n_layers + 1
    facts = model.describe()
    assert facts["family"] == "timm-maxvit" and facts["blocks"] == model.n_layers


def test_directions_project_before_expanding(variant):
    _, model, x = variant
    d = model.representation(x).shape[-1]
    dirs = F.normalize(torch.randn(5, d, generator=torch.Generator().manual_seed(3)), dim=-1)
    for granularity in ("head", "head_token"):
        direct = vd.decompose(model, x, granularity=granularity, directions=dirs, dtype=torch.float64)
        after = vd.decompose(model, x, granularity=granularity, dtype=torch.float64).project(dirs.double())
        assert direct.values.shape[-1] == 5 and direct.space == "projected"
        torch.testing.assert_close(direct.values, after.values, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(direct.reference, after.reference)


def test_normalize_divides_by_the_representation_norm(mbconv):
    model, x = mbconv
    stack = vd.decompose(model, x, normalize=True)
    ones = torch.ones(x.shape[0], dtype=torch.float64)
    torch.testing.assert_close(stack.total().norm(dim=-1), ones, rtol=1e-5, atol=1e-5)
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
    vd.decompose(model, x, granularity="head_token")
    vd.decompose(model, x, mlp_neurons=True, start_layer=3)
    for module in model.module.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert torch.equal(model.module(x), before)


def test_fused_and_eager_attention_agree(mbconv):
    model, x = mbconv
    attns = [m for m in model.module.modules() if hasattr(m, "fused_attn")]
    flags = [a.fused_attn for a in attns]
    try:
        for a in attns:
            a.fused_attn = True
        fused = vd.decompose(model, x, granularity="head_token")
        for a in attns:
            a.fused_attn = False
        eager = vd.decompose(model, x, granularity="head_token")
    finally:
        for a, flag in zip(attns, flags):
            a.fused_attn = flag
    torch.testing.assert_close(fused.values, eager.values, rtol=1e-4, atol=1e-5)
    assert fused.error() < 1e-5 and eager.error() < 1e-5


def test_classifier_logits_from_projection(variant):
    _, model, x = variant
    weight, bias = model.classifier()
    logits = vd.decompose(model, x).project(weight).total() + bias
    torch.testing.assert_close(logits.float(), model.module(x), rtol=1e-4, atol=1e-4)


def test_anchor_ln_mode_differs_per_component_but_not_in_total(mbconv):
    model, x = mbconv
    centered = vd.decompose(model, x, dtype=torch.float64)
    anchor = vd.decompose(model, x, ln_mode="anchor", dtype=torch.float64)
    assert not torch.allclose(centered["S0.B01.H00"], anchor["S0.B01.H00"])
    torch.testing.assert_close(anchor.total(), centered.total())
    gamma = model.module.norm.weight.double()
    assert (centered["S0.B01.H00"] / gamma).mean(-1).abs().max() < 1e-10


def test_training_mode_is_restored_and_dropout_ignored():
    name, kwargs, _ = VARIANTS["mbconv"]
    module = tiny_maxvit(name, drop_path_rate=0.3, drop_rate=0.5, transformer_attn_drop=0.5, **kwargs)
    module.train()
    model = vd.wrap(module)
    stack = vd.decompose(model, model.example_input(batch=2))
    assert module.training and stack.error() < 1e-5


def test_other_input_sizes_and_hooks_removed_when_the_forward_fails():
    model = vd.wrap(tiny_maxvit("test_maxvit", img_size=64))  # 2x2 partitions
    stack = vd.decompose(model, torch.randn(1, 3, 128, 128), granularity="head_token")  # grids still split
    assert stack.error() < 1e-5 and stack.tokens.grid == (4, 4)
    with pytest.raises(vd.InputError, match="partition"):
        vd.decompose(model, torch.randn(1, 3, 96, 96))  # last stage grid 3x3 does not split into 2x2
    for module in model.module.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_random_init_load_is_offline_and_labelled():
    model = vd.load("timm:test_maxvit", pretrained=False)
    assert model.weights == "random-init" and model.family == "timm-maxvit"
    assert model.preprocessing.input_size == (160, 160)
    stack = vd.decompose(model, model.example_input(), start_layer=-3, granularity="head_token")
    assert stack.error() < 1e-5 and stack.tokens.grid == (5, 5)


def test_tanh_head_decomposes_its_input():
    """maxvit_*_tf heads end in Linear + tanh: the representation is that MLP's input."""
    module = tiny_maxvit("maxvit_tiny_tf_224", embed_dim=(32, 64, 96, 128), depths=(1,) * 4, stem_width=16, img_size=64)
    model = vd.wrap(module)
    x = model.example_input(batch=2)
    stack = vd.decompose(model, x, dtype=torch.float64)
    assert stack.error() < 1e-10 and model.classifier() is None
    head = module.head
    with torch.no_grad():
        expected = head.norm(head.global_pool(module.forward_features(x)))
    torch.testing.assert_close(stack.reference.float(), expected.flatten(1), rtol=1e-5, atol=1e-6)
    assert model.dtype == torch.float32


# ----------------------------------------------------------------------------- unsupported / bad input
@pytest.mark.parametrize(
    "name, kwargs, reason",
    [
        ("test_coatnet", dict(img_size=64), "CoAtNet"),
        ("maxvit_tiny_pm_256", dict(TINY, img_size=64), "ParallelMaxxVitBlock"),
        ("test_maxvit", dict(img_size=64, transformer_use_nchw_attn=True), "NCHW"),
        ("test_maxvit", dict(img_size=64, global_pool="max"), "average pooling"),
        ("test_maxvit", dict(img_size=64, conv_pool_type="max2"), "not linear"),
    ],
)
def test_unsupported_variants_raise(name, kwargs, reason):
    import timm

    module = timm.create_model(name, pretrained=False, **kwargs)
    with pytest.raises(vd.UnsupportedModelError, match=reason):
        vd.wrap(module)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(start_layer=12),
        dict(start_layer=-13),
        dict(granularity="head_token", mlp_neurons=True),
        dict(granularity="neuron"),
    ],
)
def test_bad_arguments(kwargs):
    model = vd.wrap(tiny_maxvit("test_maxvit", img_size=64))
    assert model.n_layers == 12
    with pytest.raises(vd.InputError):
        vd.decompose(model, model.example_input(), **kwargs)
