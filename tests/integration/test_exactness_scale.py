"""The exactness check is well-conditioned: errors are measured against the unprojected scale.

For a stack projected onto directions ``U`` the check divides ``||Σ - ref||`` by
``||z|| * ||U||_2`` (``z`` the unprojected representation), never by ``||U z||``, which is near
zero for a direction nearly orthogonal to ``z``. These tests check, on every family, that no
valid decomposition fails the check whatever the directions (random, orthogonal to every ``z``
of the batch, one, a thousand; fp32 and fp64), and that the check still catches a real error of
the size it should.
"""
from __future__ import annotations

import pytest
import timm
import torch

import vitdecomp as vd
from vitdecomp.errors import DecompositionError
from vitdecomp.core.stack import directions_norm, relative_error
from vitdecomp.testing import tiny_hf_clip_vision, tiny_hf_siglip_vision, tiny_open_clip_vision, tiny_timm_vit
from vitdecomp.testing.tiny_models import perturb


def _swin() -> torch.nn.Module:
    torch.manual_seed(0)
    module = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, patch_size=4, window_size=4,
                               embed_dim=16, num_classes=10, img_size=32, depths=(2, 2), num_heads=(2, 4))
    return perturb(module, 0)


def _maxvit() -> torch.nn.Module:
    torch.manual_seed(0)
    return perturb(timm.create_model("test_maxvit", pretrained=False, img_size=64), 0)


FAMILIES = {
    "timm_vit": lambda: tiny_timm_vit("test_vit"),
    "timm_map_pool": lambda: tiny_timm_vit("test_vit3"),
    "open_clip": lambda: tiny_open_clip_vision(),
    "hf_clip": lambda: tiny_hf_clip_vision(),
    "hf_siglip": lambda: tiny_hf_siglip_vision(),
    "swin": _swin,
    "maxvit": _maxvit,
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    model = vd.wrap(FAMILIES[request.param]())
    x = model.example_input(batch=2)
    return request.param, model, x


def _directions(kind: str, z: torch.Tensor, seed: int) -> torch.Tensor:
    """``[k, d]`` directions of the named kind for the unprojected representations ``z [B, d]``."""
    gen = torch.Generator().manual_seed(seed)
    d = z.shape[-1]
    z = z.to(torch.float64)
    if kind == "one":
        return torch.randn(1, d, generator=gen, dtype=torch.float64)
    if kind == "random":
        return torch.randn(5, d, generator=gen, dtype=torch.float64)
    if kind == "thousand":
        return torch.randn(1000, d, generator=gen, dtype=torch.float64) / d**0.5
    if kind == "orthogonal":  # orthogonal to every image's z: the projected reference is ~0
        q, _ = torch.linalg.qr(z.T)  # [d, B] orthonormal basis of span(z)
        u = torch.randn(3, d, generator=gen, dtype=torch.float64)
        return u - (u @ q) @ q.T
    raise AssertionError(kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", ["one", "random", "thousand", "orthogonal"])
def test_no_valid_decomposition_fails_the_projected_check(family, kind, dtype):
    name, model, x = family
    full = vd.decompose(model, x, dtype=dtype)
    dirs = _directions(kind, full.reference, seed=len(name)).to(dtype)
    if kind == "orthogonal":
        projected_ref = full.reference.to(torch.float64) @ dirs.to(torch.float64).T
        assert float(projected_ref.abs().max()) < 1e-6 * float(full.reference.norm() * directions_norm(dirs))
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    # projected at decomposition time (before any token expansion), and after the fact
    at_source = vd.decompose(model, x, dtype=dtype, directions=dirs)  # raises if the check fails
    after = full.project(dirs)
    for stack in (at_source, after):
        assert stack.error() <= tol
        expected = full.reference.to(torch.float64).norm(dim=-1) * directions_norm(dirs)
        torch.testing.assert_close(stack.error_scale(), expected, rtol=1e-6, atol=0)
    # the projected error is bounded by the unprojected one (up to the projection's own rounding)
    assert after.error() <= full.error() + 10 * torch.finfo(dtype).eps


def test_token_stacks_projected_before_expansion_pass(family):
    name, model, x = family
    full = vd.decompose(model, x)
    dirs = _directions("orthogonal", full.reference, seed=3).to(torch.float32)
    start = -1 if name in ("swin", "maxvit") else 0  # hierarchical: token rows on the last stage's grid
    tokens = vd.decompose(model, x, granularity="head_token", directions=dirs, start_layer=start)
    assert tokens.has_tokens and tokens.error() <= 1e-5
    parts = list(vd.iter_decompose(model, x, granularity="head_token", directions=dirs, start_layer=start))  # checked at the end
    assert sum(p.values.shape[0] for p in parts) == tokens.values.shape[0]


def test_the_check_still_catches_a_real_error(family):
    """A corruption of 1e-3 ||z|| along a direction is caught, projected or not."""
    name, model, x = family
    full = vd.decompose(model, x)
    u = torch.nn.functional.normalize(torch.randn(full.dim, generator=torch.Generator().manual_seed(7)), dim=0)
    bad_values = full.values.clone()
    bad_values[-1] += 1e-3 * full.reference.norm(dim=-1)[:, None] * u
    bad = vd.ComponentStack(bad_values, full.labels, full.reference, meta=full.meta)
    with pytest.raises(DecompositionError):
        bad.check(1e-5)
    for dirs in (u[None], torch.stack([u, torch.nn.functional.normalize(torch.randn(full.dim), dim=0)])):
        projected = bad.project(dirs)
        assert projected.error() > 5e-4  # ||U||_2 <= sqrt(2): at least 1e-3 / sqrt(2)
        with pytest.raises(DecompositionError):
            projected.check(1e-5)


def test_relative_error_uses_the_given_scale():
    ref = torch.tensor([[1e-9, 0.0]], dtype=torch.float64)
    total = ref + torch.tensor([[1e-8, 0.0]], dtype=torch.float64)
    assert relative_error(total, ref) == pytest.approx(10.0)  # ill-conditioned: divided by ||ref||
    assert relative_error(total, ref, torch.tensor([1.0])) == pytest.approx(1e-8)


def test_scale_survives_save_load_concat_and_item_selection(tmp_path):
    model = vd.wrap(tiny_timm_vit("test_vit"))
    x = model.example_input(batch=3)
    full = vd.decompose(model, x)
    dirs = _directions("orthogonal", full.reference, seed=1).to(torch.float32)
    projected = full.project(dirs)
    loaded = vd.ComponentStack.load(projected.save(tmp_path / "p.safetensors"))
    torch.testing.assert_close(loaded.error_scale(), projected.error_scale())
    assert loaded.error() <= 1e-5
    joined = vd.ComponentStack.concat([projected.take_items([0]), projected.take_items([1, 2])])
    torch.testing.assert_close(joined.values, projected.values)
    torch.testing.assert_close(joined.error_scale(), projected.error_scale())
    with pytest.raises(ValueError):
        vd.ComponentStack(projected.values, projected.labels, projected.reference, scale=torch.ones(5))
    # per-item meta lists follow their items through selection and joining
    from dataclasses import replace

    tagged = replace(projected, meta={**projected.meta, "ids": ["a", "b", "c"], "model": "m"})
    assert tagged.take_items([2, 0]).meta["ids"] == ["c", "a"]
    rejoined = vd.ComponentStack.concat([tagged.take_items([1]), tagged.take_items([0, 2])])
    assert rejoined.meta["ids"] == ["b", "a", "c"] and rejoined.meta["model"] == "m"


def test_heatmap_over_a_synthetic_test_split_with_the_shipped_clip(tmp_path):
    """Before the scale fix this exited 4 (relative error 1.8e-5 of a near-orthogonal projection)."""
    from vitdecomp.cli.main import main
    from vitdecomp.synth import generate_dataset

    generate_dataset(tmp_path / "world", 300, seed=0)
    test_split = tmp_path / "world" / "test"
    n_images = sum(1 for _ in test_split.rglob("*.png"))
    assert n_images >= 40
    out = tmp_path / "maps"
    assert main(["heatmap", str(test_split), "--model", "synth:clip", "--text", "a red object", "--out", str(out)]) == 0
    import json

    records = json.loads((out / "heatmaps.json").read_text(encoding="utf-8"))
    images = records["images"] if isinstance(records, dict) else records
    assert len(images) == n_images
