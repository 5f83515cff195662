"""Ablating components of a decomposition (docs/method.md §6.1).

Because a decomposition is exact, ``z = sum_i c_i(x)``, an intervention on the *direct* effect of
component ``i`` is a replacement of its row:

* ``"mean"``: ``c_i(x) <- E_{x' in D_ref}[c_i(x')]`` over an explicit reference set (default);
* ``"zero"``: ``c_i(x) <- 0`` (overstates effects; offered for comparison);
* ``"resample"``: ``c_i(x) <- c_i(x_pi(x))`` with ``x_pi`` a seeded random image of the reference set.

:func:`ablate` returns the new representations ``[batch, d]``; :func:`layer_curve` ablates blocks
cumulatively (from the last block backwards or from the first forwards, one point per block,
plus the unablated point) and scores each point with a caller's ``score(z) -> float`` (e.g. the
accuracy of a linear or zero-shot head).

Dataset scale (what ``vitdecomp ablate`` uses, :func:`vitdecomp.interpret.ablate.run.run_ablation`): the
reference statistics are computed first (:func:`reference_means` per batch, or any streamed ``[comp, d]``
mean), then :func:`accuracy_over_batches` streams the evaluated rows once and scores every ablation set at
the same time (the unablated point, a chosen set, every point of :func:`curve_sets` in both
directions), holding one batch in memory. :func:`ablate_values` is the shared kernel::

    z'(x) = z(x) + sum_{i in S} (r_i(x) - c_i(x)),     z(x) = sum_i c_i(x),

with ``r_i = 0`` (zero), ``r_i = mu_i`` (mean) or ``r_i = c_i(x_pi(x))`` (resample).
:func:`vitdecomp.report.figures.ablation_curves` draws the curves.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from ...errors import InputError

if TYPE_CHECKING:
    import torch

    from ...core.labels import ComponentLabel
    from ...core.stack import ComponentStack

__all__ = [
    "AblationMode",
    "CurveDirection",
    "reference_means",
    "ablate",
    "ablate_values",
    "ablate_with_means",
    "curve_sets",
    "layer_curve",
    "accuracy_over_batches",
    "block_key",
]

AblationMode = Literal["mean", "zero", "resample"]
CurveDirection = Literal["from_last", "from_first"]
_SETS_PER_GEMM = 16  # ablation sets evaluated per matrix product in accuracy_over_batches (memory: 16·b·d)


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
    docs/method.md §6.6 flags: prefer a separate reference split).
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


def curve_sets(labels: Sequence[ComponentLabel | str], direction: CurveDirection = "from_last") -> list[list[int]]:
    """Row sets of a cumulative block-ablation curve: ``[S_0, S_1, ..., S_L]`` with ``S_0 = []``.

    ``S_n`` holds every per-block row (heads, biases, MLP, neurons: each label with a ``layer``)
    of the first ``n`` blocks in ablation order: blocks ``L-1, L-2, ...`` for ``from_last``,
    ``0, 1, ...`` for ``from_first``. Rows without a layer (``embed``, ``bias``) are never ablated.

    Args:
        labels: the stack's labels (:class:`~vitdecomp.core.labels.ComponentLabel` or their strings).
        direction: ``"from_last"`` or ``"from_first"``.

    Returns:
        ``L + 1`` sorted row lists, ``L`` the number of blocks present.
    """
    from ...core.labels import parse_label

    if direction not in ("from_last", "from_first"):
        raise InputError(f"unknown curve direction {direction!r}; use from_last or from_first")
    labs = [parse_label(lab) if isinstance(lab, str) else lab for lab in labels]
    keys = [block_key(lab) for lab in labs]
    blocks = sorted({k for k in keys if k is not None})
    if not blocks:
        raise InputError("the stack has no per-block components to ablate")
    order = blocks[::-1] if direction == "from_last" else blocks
    sets: list[list[int]] = [[]]
    chosen: list[int] = []
    for block in order:
        chosen += [i for i, k in enumerate(keys) if k == block]
        sets.append(sorted(chosen))
    return sets


def block_key(lab: ComponentLabel) -> tuple[int, ...] | None:
    """Sort key of a label's block: ``(layer,)``; ``(stage, block)`` for hierarchical labels parsed
    from strings (which carry no global layer); None for rows outside the blocks."""
    if lab.layer is not None:
        return (lab.layer,)
    if lab.stage is not None and lab.block is not None:
        return (lab.stage, lab.block)
    return None


def layer_curve(stack: ComponentStack, score: Callable[[torch.Tensor], float], *, direction: Literal[
        "from_last", "from_first"] = "from_last", mode: AblationMode = "mean",
        reference: ComponentStack | None = None, seed: int = 0) -> list[tuple[int, float]]:
    """Cumulative block ablation curve: ``[(n_blocks_ablated, score), ...]`` starting at ``(0, unablated)``.

    ``from_last`` ablates blocks ``L-1, L-2, ...`` (attention and MLP of a block together, every
    per-block row: heads, biases, MLP, neurons); ``from_first`` ablates ``0, 1, ...``
    (the row sets of :func:`curve_sets`).
    """
    sets = curve_sets(stack.labels, direction)
    points = [(0, float(score(ablate(stack, [], mode=mode, reference=reference))))]
    for n, chosen in enumerate(sets[1:], start=1):
        points.append((n, float(score(ablate(stack, chosen, mode=mode, reference=reference, seed=seed)))))
    return points


# ---------------------------------------------------------------------------- streaming
def ablate_values(values: torch.Tensor, rows: Sequence[int], replacement: torch.Tensor | None = None) -> torch.Tensor:
    """The ablation kernel on raw values: ``z' = sum_i c_i + sum_{i in S} (r_i - c_i)``, ``[batch, d]`` float64.

    Args:
        values: ``[comp, batch, d]`` component values (tokens already summed).
        rows: the ablated set ``S`` (component indices).
        replacement: ``None`` for zero-ablation; ``[comp, d]`` per-component constants (means);
            or ``[comp, batch, d]`` per-item replacements (resampled reference rows). Only the
            rows in ``S`` are read.
    """
    import torch

    v = values.to(torch.float64)
    if v.dim() != 3:
        raise InputError(f"values must be [comp, batch, d], got {tuple(values.shape)}")
    z = v.sum(0)
    idx = sorted({int(i) for i in rows})
    if not idx:
        return z
    if idx[0] < 0 or idx[-1] >= v.shape[0]:
        raise InputError(f"component index out of range (0..{v.shape[0] - 1})")
    sel = torch.as_tensor(idx, dtype=torch.long)
    out = z - v.index_select(0, sel).sum(0)
    if replacement is None:
        return out
    r = replacement.to(torch.float64)
    if r.dim() == 2 and r.shape == (v.shape[0], v.shape[2]):
        return out + r.index_select(0, sel).sum(0)[None, :]
    if r.dim() == 3 and r.shape == v.shape:
        return out + r.index_select(0, sel).sum(0)
    raise InputError(f"replacement must be [comp, d] or [comp, batch, d] like the values {tuple(v.shape)}, "
                     f"got {tuple(r.shape)}")


def ablate_with_means(stack: ComponentStack, components: Sequence[str | ComponentLabel | int],
                      means: torch.Tensor) -> torch.Tensor:
    """Mean-ablation with precomputed reference means: ``[batch, d]`` float64.

    ``z' = sum_{i not in S} c_i(x) + sum_{i in S} mu_i`` with ``means [comp, d]`` (e.g. streamed over a
    reference store); equals ``ablate(stack, components, mode="mean", reference=R)`` when
    ``means = reference_means(R)``.
    """
    stack = stack.sum_tokens()
    if tuple(means.shape) != (stack.n_components, stack.dim):
        raise InputError(f"means must be [{stack.n_components}, {stack.dim}], got {tuple(means.shape)}")
    return ablate_values(stack.values, _rows(stack, components), means)


def accuracy_over_batches(
    batches: Iterable[tuple[ComponentStack, torch.Tensor]],
    sets: Mapping[str, Sequence[int]],
    predict: Callable[[torch.Tensor], torch.Tensor],
    *,
    mode: AblationMode = "mean",
    means: torch.Tensor | None = None,
    resample: Callable[[ComponentStack], torch.Tensor] | None = None,
) -> dict[str, dict[str, Any]]:
    """Top-1 accuracy of every ablation set in one streaming pass (memory: one batch).

    For each batch ``(stack, targets)`` and each named set ``S``, the ablated representation
    ``z'_S = z + sum_{i in S} (r_i - c_i)`` (as :func:`ablate_values`; all sets of a batch in one
    matrix product ``M Δ`` of the ``[sets, comp]`` 0/1 membership matrix with the ``[comp, batch·d]``
    differences) is classified by ``predict`` and compared with ``targets``; counts are summed
    over batches, so the result equals ablating the concatenated data at once.

    Args:
        batches: ``(stack, targets [batch])`` pairs; targets are class indices (rows with a
            negative target are left out).
        sets: set name -> component indices (``[]`` is the unablated representation).
        predict: ``z [batch, d] float64 -> class index [batch]``.
        mode: ``"zero"``, ``"mean"`` (needs ``means [comp, d]``) or ``"resample"`` (needs
            ``resample(stack) -> [comp, batch, d]``, the reference rows drawn for the batch's items).

    Returns:
        set name -> ``{"correct", "n", "accuracy"}`` (accuracy None when no row was scored).
    """
    import torch

    if mode == "mean" and means is None:
        raise InputError("mode 'mean' needs the reference means ([comp, d])")
    if mode == "resample" and resample is None:
        raise InputError("mode 'resample' needs a resample(stack) source of reference rows")
    if mode not in ("mean", "zero", "resample"):
        raise InputError(f"unknown ablation mode {mode!r}; use mean, zero or resample")
    names = list(sets)
    counts = {name: [0, 0] for name in names}
    masks: torch.Tensor | None = None  # [n_sets, comp]: 1 where the set ablates the component
    for stack, targets in batches:
        t = torch.as_tensor(targets).reshape(-1).long()
        stack = stack.sum_tokens()
        if t.numel() != stack.batch_size:
            raise InputError(f"{t.numel()} targets for a batch of {stack.batch_size}")
        keep = t >= 0
        if not bool(keep.any()):
            continue
        values = stack.values.to(torch.float64)[:, keep]  # [comp, b, d]
        t = t[keep]
        n_comp, b, d = values.shape
        if masks is None:
            masks = torch.zeros(len(names), n_comp, dtype=torch.float64)
            for j, name in enumerate(names):
                idx = sorted({int(i) for i in sets[name]})
                if idx and (idx[0] < 0 or idx[-1] >= n_comp):
                    raise InputError(f"set {name!r}: component index out of range (0..{n_comp - 1})")
                masks[j, idx] = 1.0
        # delta_i = r_i - c_i, so that z'_S = z + sum_{i in S} delta_i for every set S at once (one GEMM)
        if mode == "mean":
            assert means is not None
            if tuple(means.shape) != (n_comp, d):
                raise InputError(f"means must be [{n_comp}, {d}], got {tuple(means.shape)}")
            delta = means.to(torch.float64)[:, None, :] - values
        elif mode == "resample":
            assert resample is not None
            drawn = resample(stack).to(torch.float64)
            if tuple(drawn.shape[:1] + drawn.shape[2:]) != (n_comp, d) or drawn.shape[1] != stack.batch_size:
                raise InputError(f"resample() must return [{n_comp}, {stack.batch_size}, {d}], "
                                 f"got {tuple(drawn.shape)}")
            delta = drawn[:, keep] - values
        else:
            delta = -values
        z = values.sum(0)
        flat = delta.reshape(n_comp, b * d)
        for start in range(0, len(names), _SETS_PER_GEMM):
            block = names[start:start + _SETS_PER_GEMM]
            shifted = (masks[start:start + len(block)] @ flat).reshape(len(block), b, d)
            for name, dz in zip(block, shifted):
                pred = torch.as_tensor(predict(z + dz)).reshape(-1).long()
                counts[name][0] += int((pred == t).sum())
                counts[name][1] += b
    return {name: {"correct": c, "n": n, "accuracy": c / n if n else None} for name, (c, n) in counts.items()}
