"""Mean / zero / resample ablation of decomposition rows and cumulative layer curves."""
from __future__ import annotations

import pytest
import torch

from vitdecomp.interpret.ablate import ablate, layer_curve, reference_means
from vitdecomp.errors import InputError
from vitdecomp.core.labels import ComponentLabel
from vitdecomp.core.stack import ComponentStack

LABELS = (ComponentLabel("embed"), ComponentLabel("head", layer=0, head=0), ComponentLabel("head", layer=0, head=1),
          ComponentLabel("mlp", layer=0), ComponentLabel("head", layer=1, head=0), ComponentLabel("mlp", layer=1),
          ComponentLabel("const"))


def _stack(n: int = 12, d: int = 5, seed: int = 0) -> ComponentStack:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(len(LABELS), n, d, generator=g, dtype=torch.float64)
    return ComponentStack(values, LABELS, values.sum(0))


def test_ablating_every_component_with_means_gives_the_mean_representation():
    stack, ref = _stack(), _stack(seed=1)
    z = ablate(stack, list(range(len(LABELS))), mode="mean", reference=ref)
    torch.testing.assert_close(z, ref.values.sum(0).mean(0).expand_as(z), rtol=0, atol=1e-12)
    torch.testing.assert_close(reference_means(ref).sum(0), ref.reference.mean(0), rtol=0, atol=1e-12)


def test_one_component_mean_ablation_replaces_exactly_that_row():
    stack, ref = _stack(), _stack(seed=1)
    z = ablate(stack, ["L00.H01"], mode="mean", reference=ref)
    expected = stack.reference - stack.values[2] + ref.values[2].mean(0)
    torch.testing.assert_close(z, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(ablate(stack, [], reference=ref), stack.reference, rtol=0, atol=1e-12)


def test_zero_and_resample_modes():
    stack, ref = _stack(), _stack(seed=1)
    z0 = ablate(stack, [1, 4], mode="zero")
    torch.testing.assert_close(z0, stack.reference - stack.values[1] - stack.values[4], rtol=0, atol=1e-12)
    a = ablate(stack, [3], mode="resample", reference=ref, seed=3)
    b = ablate(stack, [3], mode="resample", reference=ref, seed=3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # every replaced row is one of the reference's rows for that component
    replaced = a - (stack.reference - stack.values[3])
    dist = torch.cdist(replaced, ref.values[3])
    assert bool((dist.min(dim=1).values < 1e-12).all())
    assert not torch.equal(a, ablate(stack, [3], mode="resample", reference=ref, seed=4))


def test_layer_curve_points_and_directions():
    stack, ref = _stack(), _stack(seed=1)
    norm = lambda z: float(z.norm(dim=1).mean())  # noqa: E731
    last = layer_curve(stack, norm, reference=ref)
    first = layer_curve(stack, norm, reference=ref, direction="from_first")
    assert [n for n, _ in last] == [0, 1, 2] and last[0] == first[0] == (0, norm(stack.reference))
    keep_l0 = ablate(stack, ["L01.H00", "L01.mlp"], reference=ref)
    assert last[1][1] == pytest.approx(norm(keep_l0), abs=1e-12)
    both = ablate(stack, [1, 2, 3, 4, 5], reference=ref)
    assert last[2][1] == pytest.approx(norm(both), abs=1e-12) and first[2][1] == pytest.approx(norm(both), abs=1e-12)


def test_errors():
    stack = _stack()
    with pytest.raises(InputError, match="reference"):
        ablate(stack, [1], mode="mean")
    with pytest.raises(InputError, match="no component"):
        ablate(stack, ["L05.H00"], mode="zero")
    with pytest.raises(InputError, match="out of range"):
        ablate(stack, [99], mode="zero")
    other = ComponentStack(stack.values[:3], LABELS[:3], stack.values[:3].sum(0))
    with pytest.raises(InputError, match="other components"):
        ablate(stack, [1], reference=other)


def test_mean_ablation_on_a_real_decomposition_matches_the_sum_of_kept_rows():
    import vitdecomp as vd
    from vitdecomp.testing.tiny_models import tiny_timm_vit

    model = vd.wrap(tiny_timm_vit())
    x = model.example_input(6)
    stack = vd.decompose(model, x, granularity="head", dtype=torch.float64)
    heads = [str(lab) for lab in stack.labels if lab.kind == "head" and lab.layer == 1]
    z = ablate(stack, heads, reference=stack)
    rows = [stack.index(h) for h in heads]
    expected = stack.reference.double() - stack.values[rows].sum(0) + stack.values[rows].mean(1).sum(0)
    torch.testing.assert_close(z, expected, rtol=0, atol=1e-10)
