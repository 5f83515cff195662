"""Timing helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``, which puts this
folder on ``sys.path``).

* :func:`best_of` -- the fastest of ``repeat`` calls (for one workload timed on its own).
* :func:`paired_rounds` -- several configurations timed in the same rounds, the order rotated every
  round, so a configuration's time and the baseline's come from the same stretch of machine load;
  :func:`median_ratio` then gives the median of the per-round ratios to the baseline.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["best_of", "paired_rounds", "median_ratio"]


def best_of(repeat: int, fn: Callable[[], Any]) -> float:
    """Seconds of the fastest of ``repeat`` calls of ``fn``."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def paired_rounds(configs: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int = 1,
                  sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of every configuration in each of ``repeats`` rounds (after ``warmup`` calls of each).

    Round ``r`` runs the configurations starting at the ``r``-th (rotated), so none is always first.
    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before and after each timed call.
    """
    for fn in configs.values():
        for _ in range(warmup):
            fn()
    names = list(configs)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            if sync is not None:
                sync()
            t0 = time.perf_counter()
            configs[name]()
            if sync is not None:
                sync()
            times[name].append(time.perf_counter() - t0)
    return times


def median_ratio(times: list[float], base: list[float]) -> float:
    """Median over rounds of ``times[r] / base[r]``."""
    return statistics.median(t / b for t, b in zip(times, base))
