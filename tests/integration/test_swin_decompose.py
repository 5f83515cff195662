"""Exactness and behaviour of decompose() on tiny random timm Swin Transformers (offline, seconds).

The independent references in this file are written from the Swin definition, not from the
engine: windows are cut with strided slicing after an explicit roll, the shift mask comes from
region labels, merges concatenate ``x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]``
(the original Swin order), and the frozen readout is applied with statistics computed here
from the captured activations.
"""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import vitdecomp as vd
from vitdecomp.testing import assert_exact
from vitdecomp.testing.tiny_models import perturb

BASE = dict(patch_size=4, window_size=4, embed_dim=16, num_classes=10, drop_path_rate=0.0)
# "even": 64 px, grids 16 -> 8, every grid a multiple of the window.
# "padded": 72 px, grids 18 -> 9 -> 5: window padding in every stage, odd grids before merges.
# "dynamic": dynamic_img_size=True (masks built per forward), fed 80 x 72 pixels.
VARIANTS = {
    "even": (dict(img_size=64, depths=(2, 2), num_heads=(2, 4)), (64, 64)),
    "padded": (dict(img_size=72, depths=(2, 2, 2), num_heads=(2, 2, 4)), (72, 72)),
    "dynamic": (dict(img_size=64, depths=(2, 2), num_heads=(2, 4), dynamic_img_size=True), (80, 72)),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and a busy machine makes them spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_swin(seed: int = 0, **kwargs):
    """A timm SwinTransformer at random init, with sharpened attention and perturbed norms/biases.

    The relative position tables and qkv weights are scaled up so patterns are far from
    uniform (a wrong window/shift/bias bookkeeping would then show).
    """
    torch.manual_seed(seed)
    cfg = dict(BASE)
    cfg.update(kwargs)
    module = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "relative_position_bias_table" in name:
                p.add_(torch.randn(p.shape, generator=gen))
            elif name.endswith("attn.qkv.weight"):
                p.mul_(6.0)
    return perturb(module, seed)


def pixels(size: tuple[int, int], batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request):
    kwargs, size = VARIANTS[request.param]
    model = vd.wrap(tiny_swin(**kwargs))
    return request.param, model, pixels(size)


def _starts(model) -> list[int]:
    """0, a block inside a later stage (not its first), and -1."""
    depths = [len(stage.blocks) for stage in model.module.layers]
    return [0, depths[0] + 1, -1]


def _last_stage_start(model) -> int:
    return -len(model.module.layers[-1].blocks)


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("granularity", ["layer", "head", "head_token"])
def test_sums_to_model_output_fp32_and_fp64(variant, granularity):
    _, model, x = variant
    starts = _starts(model) if granularity != "head_token" else [_last_stage_start(model), -1]
    for start in starts:
        for ln_mode in ("centered", "anchor"):
            stack = vd.decompose(model, x, granularity=granularity, start_layer=start, ln_mode=ln_mode)
            assert_exact(stack, 1e-5)
            torch.testing.assert_close(stack.reference, model.representation(x), rtol=0, atol=0)
            assert stack.names[0] == ("embed" if start == 0 else "rest")
            assert (stack.names[-1] == "bias") == (ln_mode == "centered")
            s64 = vd.decompose(
                model, x, granularity=granularity, start_layer=start, ln_mode=ln_mode, dtype=torch.float64
            )
            assert s64.values.dtype == torch.float64 and s64.error() < 1e-10
    assert model.dtype == torch.float32


@pytest.mark.parametrize("ln_mode", ["centered", "anchor"])
@pytest.mark.parametrize("bias_mode", ["explicit", "anchor", "split"])
def test_every_convention_is_exact(variant, ln_mode, bias_mode):
    _, model, x = variant
    for granularity, start in (("layer", 0), ("head", 0), ("head", _starts(model)[1]), ("head_token", -1)):
        stack = vd.decompose(model, x, granularity=granularity, start_layer=start, ln_mode=ln_mode, bias_mode=bias_mode)
        assert stack.error() < 1e-5
        assert any(lab.kind == "bias" for lab in stack.labels) == (bias_mode == "explicit")
        assert ("bias" in stack.names) == (ln_mode == "centered" and bias_mode != "split")


def test_labels_name_stage_and_block(variant):
    _, model, x = variant
    stack = vd.decompose(model, x)
    depths = [len(stage.blocks) for stage in model.module.layers]
    heads = [stage.blocks[0].attn.num_heads for stage in model.module.layers]
    expected = ["embed"]
    layer = 0
    for k, depth in enumerate(depths):
        for b in range(depth):
            expected += [f"S{k}.B{b:02d}.H{h:02d}" for h in range(heads[k])]
            expected += [f"S{k}.B{b:02d}.bias", f"S{k}.B{b:02d}.mlp"]
            assert stack.labels[stack.index(f"S{k}.B{b:02d}.mlp")].layer == layer
            layer += 1
    assert stack.names == expected + ["bias"]
    assert stack.meta["n_layers"] == sum(depths)
    assert len(stack.select(kind="head", layer=-1)) == heads[-1]


# ----------------------------------------------------------------------------- consistency
@pytest.mark.parametrize("bias_mode", ["explicit", "anchor", "split"])
@pytest.mark.parametrize("ln_mode", ["centered", "anchor"])
def test_token_terms_sum_to_head_terms(variant, bias_mode, ln_mode):
    _, model, x = variant
    for start in (_last_stage_start(model), -1):
        kw = dict(start_layer=start, bias_mode=bias_mode, ln_mode=ln_mode, dtype=torch.float64)
        heads = vd.decompose(model, x, granularity="head", **kw)
        tokens = vd.decompose(model, x, granularity="head_token", **kw)
        assert heads.labels == tokens.labels
        torch.testing.assert_close(tokens.sum_tokens().values, heads.values, rtol=1e-9, atol=1e-12)


def test_token_stack_knows_the_stage_grid(variant):
    _, model, x = variant
    stack = vd.decompose(model, x, granularity="head_token", start_layer=-1)
    feats = model.module.forward_features(x)
    grid = tuple(feats.shape[1:3])
    assert stack.tokens is not None and stack.tokens.grid == grid
    assert stack.tokens.types == ("patch",) * (grid[0] * grid[1])
    assert stack.values.shape[2] == grid[0] * grid[1]
    assert stack.meta["token_stage"] == len(model.module.layers) - 1


def test_head_token_outside_the_last_stage_is_refused(variant):
    _, model, x = variant
    with pytest.raises(vd.InputError, match="last stage"):
        vd.decompose(model, x, granularity="head_token", start_layer=0)
    with pytest.raises(vd.InputError):
        vd.decompose(model, x, granularity="head_token", start_layer=-1, mlp_neurons=True)


def test_heads_sum_to_layer_attention_term(variant):
    _, model, x = variant
    heads = vd.decompose(model, x, granularity="head", dtype=torch.float64)
    layers = vd.decompose(model, x, granularity="layer", dtype=torch.float64)
    grouped = heads.group("attn_mlp")
    for lab in layers.labels:
        if lab.kind == "attn":
            base = str(lab)[: -len(".attn")]
            torch.testing.assert_close(grouped[str(lab)], layers[str(lab)] + layers[f"{base}.bias"])
            torch.testing.assert_close(grouped[f"{base}.mlp"], layers[f"{base}.mlp"])


def test_neurons_sum_to_mlp(variant):
    _, model, x = variant
    start = _starts(model)[1]
    plain = vd.decompose(model, x, start_layer=start, dtype=torch.float64)
    neurons = vd.decompose(model, x, start_layer=start, mlp_neurons=True, dtype=torch.float64)
    assert neurons.error() < 1e-10
    for lab in plain.labels:
        if lab.kind == "mlp":
            rows = neurons.select(kind=("neuron", "mlp_bias"), layer=lab.layer).values.sum(0)
            torch.testing.assert_close(rows, plain[str(lab)], rtol=1e-9, atol=1e-10)


def test_rest_equals_everything_before_start(variant):
    _, model, x = variant
    start = _starts(model)[1]
    full = vd.decompose(model, x, dtype=torch.float64)
    late = vd.decompose(model, x, start_layer=start, dtype=torch.float64)
    before = [
        i for i, lab in enumerate(full.labels) if lab.kind == "embed" or (lab.layer is not None and lab.layer < start)
    ]
    # merge betas of merges before the start stage are inside `rest`, not in the `bias` row
    torch.testing.assert_close(
        late["rest"] + late["bias"], full.values[before].sum(0) + full["bias"], rtol=1e-9, atol=1e-10
    )
    for name in late.names[1:-1]:
        torch.testing.assert_close(late[name], full[name], rtol=1e-9, atol=1e-10)


def test_directions_project_before_expanding(variant):
    _, model, x = variant
    d = model.representation(x).shape[-1]
    dirs = F.normalize(torch.randn(5, d, generator=torch.Generator().manual_seed(3)), dim=-1)
    for granularity, start in (("head", 0), ("head_token", -1)):
        kw = dict(granularity=granularity, start_layer=start, dtype=torch.float64)
        direct = vd.decompose(model, x, directions=dirs, **kw)
        after = vd.decompose(model, x, **kw).project(dirs.double())
        assert direct.values.shape[-1] == 5 and direct.space == "projected"
        torch.testing.assert_close(direct.values, after.values, rtol=1e-9, atol=1e-10)


def test_normalize_divides_by_the_representation_norm(variant):
    _, model, x = variant
    stack = vd.decompose(model, x, normalize=True)
    ones = torch.ones(x.shape[0], dtype=torch.float64)
    torch.testing.assert_close(stack.total().norm(dim=-1), ones, rtol=1e-5, atol=1e-5)


def test_batch_invariance(variant):
    _, model, x = variant
    x3 = torch.cat([x, pixels(tuple(x.shape[-2:]), batch=1, seed=9)])
    for granularity, start in (("head", 0), ("head_token", -1)):
        alone = vd.decompose(model, x3[1:2], granularity=granularity, start_layer=start)
        batch = vd.decompose(model, x3, granularity=granularity, start_layer=start)
        torch.testing.assert_close(batch.values[:, 1:2], alone.values, rtol=1e-4, atol=1e-5)


def test_hooks_removed_and_output_bit_identical(variant):
    _, model, x = variant
    before = model.module(x)
    vd.decompose(model, x, granularity="head", mlp_neurons=True)
    vd.decompose(model, x, granularity="head_token", start_layer=-1)
    for module in model.module.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert torch.equal(model.module(x), before)


def test_fused_and_eager_attention_agree(variant):
    _, model, x = variant
    attns = [blk.attn for stage in model.module.layers for blk in stage.blocks]
    flags = [a.fused_attn for a in attns]
    try:
        results = []
        for fused in (True, False):
            for a in attns:
                a.fused_attn = fused
            results.append(vd.decompose(model, x, granularity="head"))
    finally:
        for a, flag in zip(attns, flags, strict=True):
            a.fused_attn = flag
    torch.testing.assert_close(results[0].values, results[1].values, rtol=1e-4, atol=1e-5)


def test_classifier_logits_from_projection(variant):
    _, model, x = variant
    weight, bias = model.classifier()
    logits = vd.decompose(model, x).project(weight).total() + bias
    torch.testing.assert_close(logits.float(), model.module(x), rtol=1e-4, atol=1e-4)


def test_anchor_ln_mode_differs_per_component_but_not_in_total(variant):
    _, model, x = variant
    centered = vd.decompose(model, x, dtype=torch.float64)
    anchor = vd.decompose(model, x, ln_mode="anchor", dtype=torch.float64)
    assert not torch.allclose(centered["S0.B00.H00"], anchor["S0.B00.H00"])
    torch.testing.assert_close(anchor.total(), centered.total())
    gamma = model.module.norm.weight.double()
    name = anchor.names[-2]  # a last-stage row: centred terms have zero channel mean once gamma is divided out
    assert (centered[name] / gamma).mean(-1).abs().max() < 1e-10


# ----------------------------------------------------------------------------- independent references
class _Captured:
    """Block inputs, merge inputs and the final norm input of one forward pass."""

    def __init__(self, module, x):
        self.block_in: dict[tuple[int, int], torch.Tensor] = {}
        self.merge_in: dict[int, torch.Tensor] = {}
        handles = []
        for k, stage in enumerate(module.layers):
            if not isinstance(stage.downsample, torch.nn.Identity):
                handles.append(stage.downsample.register_forward_pre_hook(
                    lambda m, a, k=k: self.merge_in.__setitem__(k, a[0].detach().double())))
            for b, blk in enumerate(stage.blocks):
                handles.append(blk.register_forward_pre_hook(
                    lambda m, a, k=k, b=b: self.block_in.__setitem__((k, b), a[0].detach().double())))
        handles.append(module.norm.register_forward_pre_hook(
            lambda m, a: setattr(self, "final_in", a[0].detach().double())))
        try:
            with torch.no_grad():
                module(x.double())
        finally:
            for h in handles:
                h.remove()


def _sigma(x: torch.Tensor, eps: float) -> torch.Tensor:
    return (x.var(dim=-1, unbiased=False, keepdim=True) + eps).sqrt()


def _naive_readout(module, caps: _Captured, stage: int, write: torch.Tensor) -> torch.Tensor:
    """Centred direct effect of a stage-``stage`` write ``[..., B, H, W, C]`` on the representation."""
    a = write
    for j in range(stage + 1, len(module.layers)):
        merge = module.layers[j].downsample
        xin = caps.merge_in[j]
        h, w = xin.shape[1:3]

        def cat(t, h=h, w=w):
            t = F.pad(t, (0, 0, 0, w % 2, 0, h % 2))
            quads = (t[..., 0::2, 0::2, :], t[..., 1::2, 0::2, :], t[..., 0::2, 1::2, :], t[..., 1::2, 1::2, :])
            return torch.cat(quads, -1)

        x4, a4 = cat(xin), cat(a)
        sig = _sigma(x4, merge.norm.eps)
        a = ((a4 - a4.mean(-1, keepdim=True)) * merge.norm.weight.double() / sig) @ merge.reduction.weight.double().T
    xf = caps.final_in
    sig = _sigma(xf, module.norm.eps)
    out = (a - a.mean(-1, keepdim=True)) * module.norm.weight.double() / sig
    return out.mean(dim=(-3, -2))


def _region_mask(hp: int, wp: int, window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """Region label of every position of the shifted, padded grid (Swin's SW-MSA regions)."""
    def segment(n, m, s):
        lab = torch.zeros(n, dtype=torch.long)
        lab[n - m : n - s] = 1
        lab[n - s :] = 2
        return lab

    return segment(hp, window[0], shift[0])[:, None] * 3 + segment(wp, window[1], shift[1])[None, :]


def _naive_head_writes(blk, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every head's write ``[H, B, h, w, C]`` (value bias removed) and the dense pattern
    ``[B, H, hw (query), hw (key)]`` on the unshifted grid, from the weights only."""
    attn = blk.attn
    bsz, h, w, c = x.shape
    (mh, mw), (sh, sw) = blk.window_size, blk.shift_size
    n_heads = attn.num_heads
    dh = attn.qkv.weight.shape[0] // (3 * n_heads)
    u = F.layer_norm(x, (c,), blk.norm1.weight.double(), blk.norm1.bias.double(), blk.norm1.eps)
    # shifted coordinates: position (i, j) of the shifted grid holds original ((i + sh) % h, (j + sw) % w)
    hp, wp = math.ceil(h / mh) * mh, math.ceil(w / mw) * mw
    orig = torch.full((hp, wp), -1, dtype=torch.long)
    for i in range(h):
        for j in range(w):
            orig[i, j] = ((i + sh) % h) * w + (j + sw) % w
    region = _region_mask(hp, wp, (mh, mw), (sh, sw)) if (sh or sw) else torch.zeros(hp, wp, dtype=torch.long)
    w_qkv, b_qkv = attn.qkv.weight.double(), attn.qkv.bias.double()
    table = attn.relative_position_bias_table.double()
    u_flat = u.reshape(bsz, h * w, c)
    dense = torch.zeros(bsz, n_heads, h * w, h * w, dtype=torch.float64)
    v_nobias = (u_flat @ w_qkv[2 * n_heads * dh :].T).reshape(bsz, h * w, n_heads, dh)
    for wi in range(0, hp, mh):
        for wj in range(0, wp, mw):
            cells = [(wi + a, wj + b) for a in range(mh) for b in range(mw)]
            idx = torch.tensor([orig[p] for p in cells])
            real = idx >= 0
            uw = torch.zeros(bsz, len(cells), c, dtype=torch.float64)
            uw[:, real] = u_flat[:, idx[real]]
            qkv = uw @ w_qkv.T + b_qkv
            q, k, _ = qkv.reshape(bsz, len(cells), 3, n_heads, dh).permute(2, 0, 3, 1, 4)
            rel = torch.tensor(
                [[(pa[0] - pb[0] + mh - 1) * (2 * mw - 1) + (pa[1] - pb[1] + mw - 1) for pb in cells] for pa in cells]
            )
            bias = table[rel].permute(2, 0, 1)  # [H, N, N]
            reg = torch.tensor([region[p] for p in cells])
            mask = torch.where(reg[:, None] == reg[None, :], 0.0, -100.0).double()
            alpha = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh) + bias + mask, dim=-1)
            qi = idx[real]
            for a_pos, qg in zip(torch.nonzero(real)[:, 0].tolist(), qi.tolist(), strict=True):
                dense[:, :, qg, idx[real]] += alpha[:, :, a_pos, real]
    w_o = attn.proj.weight.double().reshape(c, n_heads, dh)
    writes = torch.einsum("bhps,bshd,chd->hbpc", dense, v_nobias, w_o).reshape(n_heads, bsz, h, w, c)
    return writes, dense


@pytest.mark.parametrize("name", ["even", "padded"])
def test_head_terms_match_a_naive_reference(name):
    kwargs, size = VARIANTS[name]
    module = tiny_swin(seed=4, **kwargs)
    model = vd.wrap(module)
    x = pixels(size, seed=5)
    stack = vd.decompose(model, x, granularity="head", dtype=torch.float64)
    module.double()
    try:
        caps = _Captured(module, x)
        for k, stage in enumerate(module.layers):
            for b in (len(stage.blocks) - 1,):  # the shifted block of each stage
                blk = stage.blocks[b]
                writes, _ = _naive_head_writes(blk, caps.block_in[(k, b)])
                expected = _naive_readout(module, caps, k, writes)  # [H, B, d]
                for h in range(writes.shape[0]):
                    torch.testing.assert_close(stack[f"S{k}.B{b:02d}.H{h:02d}"], expected[h], rtol=1e-8, atol=1e-10)
    finally:
        module.float()


@pytest.mark.parametrize("name", ["even", "padded"])
def test_token_terms_match_a_naive_reference(name):
    kwargs, size = VARIANTS[name]
    module = tiny_swin(seed=6, **kwargs)
    model = vd.wrap(module)
    x = pixels(size, seed=7)
    stack = vd.decompose(model, x, granularity="head_token", start_layer=-1, dtype=torch.float64)
    module.double()
    try:
        caps = _Captured(module, x)
        k = len(module.layers) - 1
        b = len(module.layers[k].blocks) - 1
        blk = module.layers[k].blocks[b]
        xin = caps.block_in[(k, b)]
        _, dense = _naive_head_writes(blk, xin)  # [B, H, P, P]
        bsz, hh, ww, c = xin.shape
        n_heads = blk.attn.num_heads
        dh = c // n_heads
        u = F.layer_norm(xin, (c,), blk.norm1.weight.double(), blk.norm1.bias.double(), blk.norm1.eps)
        u = u.reshape(bsz, hh * ww, c)
        v = (u @ blk.attn.qkv.weight.double()[2 * c :].T).reshape(bsz, hh * ww, n_heads, dh)
        sig = _sigma(caps.final_in, module.norm.eps).reshape(bsz, hh * ww)
        omega = 1.0 / (sig * hh * ww)  # readout weight of every query position
        beta = torch.einsum("bp,bhps->bhs", omega, dense)
        w_o = blk.attn.proj.weight.double().reshape(c, n_heads, dh)
        raw = torch.einsum("bhs,bshd,chd->hbsc", beta, v, w_o)
        expected = (raw - raw.mean(-1, keepdim=True)) * module.norm.weight.double()
        for h in range(n_heads):
            torch.testing.assert_close(stack[f"S{k}.B{b:02d}.H{h:02d}"], expected[h], rtol=1e-8, atol=1e-10)
    finally:
        module.float()


def test_heads_plus_bias_equal_the_attention_branch():
    """Sum of a block's head rows and bias row = its actual attention branch output at every
    position (from the module's own ``_attn``), pushed through the frozen readout."""
    kwargs, size = VARIANTS["padded"]
    module = tiny_swin(seed=8, **kwargs)
    model = vd.wrap(module)
    x = pixels(size, seed=9)
    stack = vd.decompose(model, x, granularity="head", dtype=torch.float64)
    module.double()
    try:
        caps = _Captured(module, x)
        for k, stage in enumerate(module.layers):
            for b, blk in enumerate(stage.blocks):
                with torch.no_grad():
                    branch = blk._attn(blk.norm1(caps.block_in[(k, b)]))
                expected = _naive_readout(module, caps, k, branch)
                prefix = f"S{k}.B{b:02d}"
                got = stack[f"{prefix}.bias"] + sum(stack[f"{prefix}.H{h:02d}"] for h in range(blk.attn.num_heads))
                torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    finally:
        module.float()


# ----------------------------------------------------------------------------- models and errors
def test_describe_and_registry():
    model = vd.wrap(tiny_swin(**VARIANTS["padded"][0]))
    facts = model.describe()
    assert facts["family"] == "timm-swin" and facts["depths"] == [2, 2, 2] and facts["blocks"] == 6
    assert facts["input_size"] == [72, 72] and model.n_layers == 6
    assert model.preprocessing.input_size == (72, 72)


def test_training_mode_with_drop_path_is_restored():
    cfg = {**BASE, **VARIANTS["even"][0], "drop_path_rate": 0.3, "drop_rate": 0.5}
    module = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **cfg)
    module.train()
    model = vd.wrap(module)
    stack = vd.decompose(model, pixels((64, 64)), granularity="head")
    assert module.training and stack.error() < 1e-5


def test_fixed_size_model_rejects_other_sizes_and_cleans_up():
    model = vd.wrap(tiny_swin(**VARIANTS["even"][0]))
    with pytest.raises(vd.InputError):
        vd.decompose(model, pixels((72, 72)))
    for module in model.module.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


@pytest.mark.parametrize(
    "name, kwargs, reason",
    [
        ("swin_tiny_patch4_window7_224", dict(global_pool=""), "global_pool=''"),
        ("swin_tiny_patch4_window7_224", dict(global_pool="max"), "max"),
        ("swinv2_tiny_window8_256", {}, "SwinTransformerV2 is not supported"),
        ("swinv2_cr_tiny_224", {}, "SwinTransformerV2Cr is not supported"),
    ],
)
def test_unsupported_variants_raise(name, kwargs, reason):
    cfg = dict(img_size=64, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=10)
    cfg.update(kwargs)
    module = timm.create_model(name, pretrained=False, **cfg)
    with pytest.raises(vd.UnsupportedModelError, match=reason):
        vd.wrap(module)


@pytest.mark.parametrize(
    "kwargs", [dict(start_layer=4), dict(start_layer=-5), dict(granularity="head_token", start_layer=1)]
)
def test_bad_arguments(kwargs):
    model = vd.wrap(tiny_swin(**VARIANTS["even"][0]))
    with pytest.raises(vd.InputError):
        vd.decompose(model, pixels((64, 64)), **kwargs)
