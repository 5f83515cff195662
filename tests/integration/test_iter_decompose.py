"""vd.iter_decompose: the decomposition delivered part by part (for token stacks that do not fit)."""
from __future__ import annotations

import pytest
import torch

import vitdecomp as vd
from vitdecomp.testing import tiny_timm_vit

VARIANTS = {
    "cls": ("test_vit", {}),  # CLS pooling: blocks reduced inside the hooks
    "avg_token_norm": ("vit_tiny_patch16_224", dict(global_pool="avg", fc_norm=False, depth=2, img_size=64)),
    "map_pool": ("test_vit3", {}),  # attention pool: pattern only known after the pass
}

OPTIONS = [
    dict(granularity="head_token"),
    dict(granularity="head_token", start_layer=-1, normalize=True),
    dict(granularity="layer", ln_mode="anchor", bias_mode="split"),
    dict(granularity="head", bias_mode="anchor"),
    dict(granularity="head_token", ln_mode="anchor", bias_mode="anchor"),
    dict(granularity="head", dtype=torch.float64),
]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def model(request):
    name, kwargs = VARIANTS[request.param]
    return vd.wrap(tiny_timm_vit(name, **kwargs))


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_parts_concatenate_to_the_whole_stack(model, options):
    x = model.example_input(batch=2, seed=3)
    whole = vd.decompose(model, x, **options)
    parts = list(vd.iter_decompose(model, x, **options))
    n_layers = whole.meta["n_layers"] - whole.meta["start_layer"]
    assert len(parts) >= n_layers + 1  # the first row, every block, the readout terms (if any)
    assert [str(label) for p in parts for label in p.labels] == [str(label) for label in whole.labels]
    torch.testing.assert_close(torch.cat([p.values for p in parts]), whole.values, rtol=1e-6, atol=1e-7)
    for p in parts:
        assert p.reference is parts[0].reference
        torch.testing.assert_close(p.reference, whole.reference, rtol=0, atol=0)
        assert p.meta["n_components_total"] == len(whole)
    # every block's rows arrive together, in block order
    block_of = [{label.layer for label in p.labels} - {None} for p in parts]
    layers = [next(iter(b)) for b in block_of if b]
    assert layers == sorted(layers) and all(len(b) <= 1 for b in block_of)


def test_model_is_restored_before_the_first_part():
    model = vd.wrap(tiny_timm_vit("test_vit"))
    x = model.example_input(batch=1)
    before = model.representation(x)
    parts = vd.iter_decompose(model, x, granularity="head_token", dtype=torch.float64)
    first = next(parts)
    assert model.dtype == torch.float32  # cast back already, while parts are pending
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.module.modules())
    rest = list(parts)
    assert first.values.dtype == torch.float64
    total = first.total() + sum(p.total() for p in rest)
    assert float(((total - first.reference).norm() / first.reference.norm())) < 1e-10
    torch.testing.assert_close(model.representation(x), before, rtol=0, atol=0)
    assert torch.is_grad_enabled()  # the consumer's grad mode is not changed between parts


def test_the_running_check_raises_after_the_last_part():
    model = vd.wrap(tiny_timm_vit("test_vit"))
    x = model.example_input(batch=2)
    seen = []
    with pytest.raises(vd.DecompositionError):
        for part in vd.iter_decompose(model, x, rtol=0.0):  # fp32 rounding > 0
            seen.append(part)
    assert len(seen) == seen[0].meta["n_parts"]  # every part was delivered first
    assert len(list(vd.iter_decompose(model, x, rtol=0.0, check=False))) == len(seen)


def test_engines_without_parts_yield_one_whole_stack():
    import timm

    from vitdecomp.core.engines import parts_engine_for

    assert parts_engine_for("vit") is not None
    assert parts_engine_for("swin") is None
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(2, 2))
    swin = vd.wrap(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **cfg))
    x = swin.example_input(batch=1)
    parts = list(vd.iter_decompose(swin, x, granularity="head"))
    assert len(parts) == 1
    torch.testing.assert_close(parts[0].values, vd.decompose(swin, x, granularity="head").values)


def test_neurons_projected_onto_directions_match_the_projected_stack():
    model = vd.wrap(tiny_timm_vit("test_vit"))
    x = model.example_input(batch=2)
    d_z = model.representation(x).shape[-1]
    dirs = torch.randn(5, d_z, generator=torch.Generator().manual_seed(0))
    full = vd.decompose(model, x, mlp_neurons=True)
    projected = vd.decompose(model, x, mlp_neurons=True, directions=dirs)
    assert projected.values.shape == (len(full), 2, 5)
    torch.testing.assert_close(projected.values, full.values @ dirs.T, rtol=1e-4, atol=1e-5)


def test_public_names_survive_importing_every_submodule():
    import importlib
    import pkgutil
    import types

    for info in pkgutil.walk_packages(vd.__path__, "vitdecomp."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    for name in vd.__all__:
        assert not isinstance(getattr(vd, name), types.ModuleType), name
    assert callable(vd.decompose) and callable(vd.iter_decompose) and callable(vd.decompose_dataset)
