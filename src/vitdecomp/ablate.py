"""Ablating components of a decomposition (METHOD §6.1).

Because a decomposition is exact, ``z = sum_i c_i(x)``, an intervention on the *direct* effect of
component ``i`` is a replacement of its row:

* ``"mean"``: ``c_i(x) <- E_{x' in D_ref}[c_i(x')]`` over an explicit reference set (default);
* ``"zero"``: ``c_i(x) <- 0`` (overstates effects; offered for comparison);
* ``"resample"``: ``c_i(x) <- c_i(x_pi(x))`` with ``x_pi`` a seeded random image of the reference set.

:func:`ablate` returns the new representations ``[batch, d]``; :func:`layer_curve` ablates blocks
cumulatively (from the last block backwards or from the first forwards, one point per block,
plus the unablated point) and scores each point with a caller's ``score(z) -> float`` (e.g. the
accuracy of a linear or zero-shot head).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

from .errors import InputError

if TYPE_CHECKING:
    import torch

    from .labels import ComponentLabel
    from .stack import ComponentStack

__all__ = ["AblationMode", "reference_means", "ablate", "layer_curve"]

AblationMode = Literal["mean", "zero", "resample"]


def reference_means(reference: ComponentStack) -> torch.Tensor:
    """Per-component mean over the reference set: ``[comp, d]`` (tokens summed), float64."""
    return reference.sum_tokens().values.double().mean(dim=1)


def _rows(stack: ComponentStack, components: Sequence[str | ComponentLabel | int]) -> list[int]:
    rows = []
    for c in components:
        if isinstance(c, int):
            if not 0 <= c < len(stack.labels):
                raise InputError(f"component index {c} out of range (0..{len(stack.labels) - 1})")
            rows.append(c)
        else:
            try:
                rows.append(stack.index(c))
            except (KeyError, ValueError) as exc:
                raise InputError(f"no component {c!s} in this stack") from exc
    return sorted(set(rows))


def ablate(stack: ComponentStack, components: Sequence[str | ComponentLabel | int], *,
           mode: AblationMode = "mean", reference: ComponentStack | None = None, seed: int = 0) -> torch.Tensor:
    """Representations ``[batch, d]`` (float64) with ``components`` replaced as ``mode`` says.

    ``z' = sum_{i not in S} c_i(x) + sum_{i in S} r_i(x)``, ``r_i`` the replacement. ``reference``
    (a stack with the same labels and width) is required for "mean" and "resample"; pass the
    stack itself to use the evaluation set's own means (the published convention, which
    METHOD §6.6 flags: prefer a separate reference split).
    """
    import torch

    stack = stack.sum_tokens()
    rows = _rows(stack, components)
    values = stack.values.double()
    z = values.sum(0)
    if not rows:
        return z
    if mode == "zero":
        replacement = torch.zeros_like(values[rows])
    else:
        if reference is None:
            raise InputError(f"mode {mode!r} needs a reference stack (the set the means or samples come from)")
        if [str(x) for x in reference.labels] != [str(x) for x in stack.labels] or reference.dim != stack.dim:
            raise InputError("the reference stack has other components or another width than the stack")
        ref = reference.sum_tokens().values.double()
        if mode == "mean":
            replacement = ref[rows].mean(dim=1, keepdim=True).expand(-1, values.shape[1], -1)
        elif mode == "resample":
            gen = torch.Generator().manual_seed(seed)
            pick = torch.randint(ref.shape[1], (values.shape[1],), generator=gen)
            replacement = ref[rows][:, pick]
        else:
            raise InputError(f"unknown ablation mode {mode!r}; use mean, zero or resample")
    return z - values[rows].sum(0) + replacement.sum(0)


def layer_curve(stack: ComponentStack, score: Callable[[torch.Tensor], float], *, direction: Literal[
        "from_last", "from_first"] = "from_last", mode: AblationMode = "mean",
        reference: ComponentStack | None = None, seed: int = 0) -> list[tuple[int, float]]:
    """Cumulative block ablation curve: ``[(n_blocks_ablated, score), ...]`` starting at ``(0, unablated)``.

    ``from_last`` ablates blocks ``L-1, L-2, ...`` (attention and MLP of a block together, every
    per-block row: heads, biases, MLP, neurons); ``from_first`` ablates ``0, 1, ...``.
    """
    layers = sorted({lab.layer for lab in stack.labels if lab.layer is not None})
    if not layers:
        raise InputError("the stack has no per-block components to ablate")
    order = layers[::-1] if direction == "from_last" else layers
    points = [(0, float(score(ablate(stack, [], mode=mode, reference=reference))))]
    chosen: list[int] = []
    for n, layer in enumerate(order, start=1):
        chosen += [i for i, lab in enumerate(stack.labels) if lab.layer == layer]
        points.append((n, float(score(ablate(stack, chosen, mode=mode, reference=reference, seed=seed)))))
    return points
