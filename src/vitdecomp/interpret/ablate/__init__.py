"""Ablating components of a decomposition (docs/method.md §6.1).

Because a decomposition is exact, ``z = Σ_i c_i(x)``, an intervention on the direct effect of a set ``S`` of
components replaces their rows: ``z'(x) = z(x) + Σ_{i∈S} (r_i(x) − c_i(x))`` with ``r_i`` the mean over an
explicit reference set (``"mean"``), 0 (``"zero"``) or the row of a seeded random reference image
(``"resample"``).

**Modules.** :mod:`~vitdecomp.interpret.ablate.kernels` (ablating stacks and streamed batches, block curves,
accuracy of many sets in one pass) and :mod:`~vitdecomp.interpret.ablate.run` (:func:`run_ablation`: what
``vitdecomp ablate`` computes on a store: reference sets, heads, both passes). Every name is importable from
here.
"""
from __future__ import annotations

from .kernels import (
    AblationMode,
    CurveDirection,
    ablate,
    ablate_values,
    ablate_with_means,
    accuracy_over_batches,
    block_key,
    curve_sets,
    layer_curve,
    reference_means,
)
from .run import (
    ROWS_RECORDED,
    AblationResult,
    HeadKind,
    Reference,
    TopComponents,
    check_compatible,
    components_from_scores,
    resample_uniform,
    run_ablation,
    take_items,
)

__all__ = [
    "ROWS_RECORDED",
    "AblationMode",
    "AblationResult",
    "CurveDirection",
    "HeadKind",
    "Reference",
    "TopComponents",
    "ablate",
    "ablate_values",
    "ablate_with_means",
    "accuracy_over_batches",
    "block_key",
    "check_compatible",
    "components_from_scores",
    "curve_sets",
    "layer_curve",
    "reference_means",
    "resample_uniform",
    "run_ablation",
    "take_items",
]
