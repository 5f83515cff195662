"""Streaming ablation (accuracy_over_batches), precomputed means, curve row sets and curve plots."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from vitdecomp.interpret.ablate import (
    ablate,
    ablate_values,
    ablate_with_means,
    accuracy_over_batches,
    curve_sets,
    layer_curve,
    reference_means,
)
from vitdecomp.errors import InputError
from vitdecomp.core.labels import ComponentLabel
from vitdecomp.core.stack import ComponentStack

LABELS = (ComponentLabel("embed"), ComponentLabel("head", layer=0, head=0), ComponentLabel("head", layer=0, head=1),
          ComponentLabel("mlp", layer=0), ComponentLabel("head", layer=1, head=0), ComponentLabel("mlp", layer=1),
          ComponentLabel("head", layer=2, head=0), ComponentLabel("const"))


def _stack(n: int = 30, d: int = 6, seed: int = 0) -> ComponentStack:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(len(LABELS), n, d, generator=g, dtype=torch.float64)
    values[0] += 0.5 * torch.randn(d, generator=g, dtype=torch.float64)  # a per-component offset: means matter
    return ComponentStack(values, LABELS, values.sum(0))


def _part(stack: ComponentStack, start: int, stop: int) -> ComponentStack:
    return replace(stack, values=stack.values[:, start:stop], reference=stack.reference[start:stop])


def test_means_and_values_kernels_equal_ablate():
    stack, ref = _stack(), _stack(seed=1)
    means = reference_means(ref)
    for rows in ([], [1], [0, 3, 7], list(range(len(LABELS)))):
        expected = ablate(stack, rows, mode="mean", reference=ref)
        torch.testing.assert_close(ablate_with_means(stack, rows, means), expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(ablate_values(stack.values, rows, None), ablate(stack, rows, mode="zero"),
                                   rtol=0, atol=1e-12)
    with pytest.raises(InputError):
        ablate_with_means(stack, [1], means[:3])
    with pytest.raises(InputError):
        ablate_values(stack.values, [99], means)


def test_curve_sets_are_the_layer_curve_sets_and_read_hierarchical_strings():
    sets = curve_sets(LABELS, "from_last")
    assert sets == [[], [6], [4, 5, 6], [1, 2, 3, 4, 5, 6]]
    assert curve_sets([str(lab) for lab in LABELS], "from_first") == [[], [1, 2, 3], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6]]
    hier = ["embed", "S0.B00.H00", "S0.B01.mlp", "S1.B00.H01", "bias"]
    assert curve_sets(hier, "from_last") == [[], [3], [2, 3], [1, 2, 3]]
    with pytest.raises(InputError):
        curve_sets(["embed", "bias"])
    with pytest.raises(InputError):
        curve_sets(LABELS, "sideways")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["mean", "zero"])
def test_accuracy_over_batches_equals_layer_curve_on_the_whole_set(mode):
    stack, ref = _stack(), _stack(seed=1)
    head = torch.randn(4, stack.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    targets = (stack.values.sum(0) @ head.T).argmax(-1)  # the unablated head is always right
    targets[::7] = -1  # unknown targets are left out

    def predict(z: torch.Tensor) -> torch.Tensor:
        return (z @ head.T).argmax(-1)

    known = targets >= 0
    sets = {f"p{n}": s for n, s in enumerate(curve_sets(LABELS, "from_last"))}
    batches = [(_part(stack, a, a + 8), targets[a:a + 8]) for a in range(0, stack.batch_size, 8)]  # uneven last
    got = accuracy_over_batches(batches, sets, predict, mode=mode, means=reference_means(ref))
    kept = replace(stack, values=stack.values[:, known], reference=stack.reference[known])
    lib = layer_curve(kept, lambda z: float((predict(z) == targets[known]).double().mean()), mode=mode, reference=ref)
    assert [got[f"p{n}"]["accuracy"] for n in range(len(sets))] == pytest.approx([a for _, a in lib], abs=1e-12)
    assert got["p0"]["accuracy"] == 1.0 and all(v["n"] == int(known.sum()) for v in got.values())


def test_resample_uses_the_drawn_rows_and_errors():
    stack, ref = _stack(n=10), _stack(n=10, seed=1)
    head = torch.randn(3, stack.dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    targets = torch.zeros(10, dtype=torch.long)

    def predict(z: torch.Tensor) -> torch.Tensor:
        return (z @ head.T).argmax(-1)

    # drawing "row j of the reference for item j" and ablating everything gives the reference's own predictions
    got = accuracy_over_batches([(stack, targets)], {"all": list(range(len(LABELS)))}, predict, mode="resample",
                                resample=lambda s: ref.values)
    assert got["all"]["accuracy"] == pytest.approx(float((predict(ref.values.sum(0)) == 0).double().mean()))
    with pytest.raises(InputError):
        accuracy_over_batches([(stack, targets)], {"x": [1]}, predict, mode="mean")
    with pytest.raises(InputError):
        accuracy_over_batches([(stack, targets)], {"x": [1]}, predict, mode="resample")
    with pytest.raises(InputError):
        accuracy_over_batches([(stack, targets[:3])], {"x": [1]}, predict, mode="zero")


def test_plot_curves_draws_one_series_per_curve():
    from vitdecomp.report.figures import ablation_curves as plot_curves

    svg = plot_curves({"from_last": [(0, 0.9), (1, 0.5), (2, 0.1)], "from_first": [(0, 0.9), (2, None)]})
    assert svg.startswith("<svg") and svg.count('class="series"') == 2
    assert "from_last" in svg and "from_first" in svg
    with pytest.raises(ValueError):
        plot_curves({})
