#!/usr/bin/env python
"""The streaming passes of ``vitdecomp score`` and ``vitdecomp ablate`` on a ViT-B-shaped store,
as ratios to one plain read pass over the same store.

A float16 store of ``--n`` items with ViT-B/16 CLIP's components (12 layers x (12 heads + bias +
MLP) + embed + bias = 170 rows, width ``d = 512``, random values, 10 classes) is written once
with the store API. Then, each timed in the same run:

* **read** -- ``for stack in store.iter_batches(): stack.values.double().sum(0)``: the baseline
  every streamed command pays (zarr read, float16 -> float64).
* **score** -- what ``vitdecomp score STORE all`` does after embedding the texts: a
  :class:`~vitdecomp.interpret.score.ScoreMoments` projected on the 52 directions of the eight feature
  sets (random orthonormal bases here, k = 7, 8, 7, 7, 7, 6, 5, 5), fed batch by batch, then
  ``score_table`` for corr, var_attributed and var_explained.
* **ablate** -- what ``vitdecomp ablate STORE --classes ... --components (10) --reference-self``
  does: a reference pass (per-component sums) and :func:`~vitdecomp.interpret.ablate.accuracy_over_batches`
  with 2 + 2 x 13 ablation sets (unablated, the chosen set, both cumulative curves) and a
  zero-shot-like head of 10 unit rows.

Usage::

    python benchmarks/score_ablate.py --work /tmp/sa-bench --n 2000
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

from _timing import best_of

FEATURE_K = (7, 8, 7, 7, 7, 6, 5, 5)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="folder for the store (reused when it exists)")
    p.add_argument("--n", type=int, default=2000, help="items (default 2,000)")
    p.add_argument("--chunk", type=int, default=250, help="items per store chunk (default 250)")
    p.add_argument("--repeat", type=int, default=2, help="timed runs of each pass; the best is kept (default 2)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p.parse_args(argv)


def build_store(path: Path, n: int, chunk: int):  # noqa: ANN201 - ComponentStore
    import numpy as np
    import torch

    from vitdecomp.core.labels import parse_label
    from vitdecomp.core.stack import ComponentStack
    from vitdecomp.store.component_store import ComponentStore, StoreConfig

    labels = ["embed"] + [f"L{l:02d}.{k}" for l in range(12) for k in [f"H{h:02d}" for h in range(12)] + ["bias", "mlp"]]
    labels.append("bias")
    d = 512
    cfg = StoreConfig(model="bench:vit-b-shaped", weights="random", n_items=n, batch_size=chunk, dtype="float16",
                      extra={"bench": "score_ablate"})
    store = ComponentStore.create_or_open(path, cfg, labels=labels, comp_shape=(len(labels), d))
    gen = torch.Generator().manual_seed(0)
    scale = torch.linspace(0.2, 1.0, len(labels))[:, None, None]
    for index in store.pending_chunks():
        rows = store.chunk_rows(index)
        values = torch.randn(len(labels), len(rows), d, generator=gen) * scale
        stack = ComponentStack(values=values, labels=tuple(parse_label(s) for s in labels), reference=values.sum(0))
        store.write_chunk(index, stack, [f"item{r}" for r in rows], targets=(np.asarray(rows) % 10).tolist())
    return ComponentStore.open(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch

    from vitdecomp.interpret.ablate import accuracy_over_batches, curve_sets
    from vitdecomp.interpret.score import ScoreMoments, feature_basis, score_table

    t0 = time.perf_counter()
    store = build_store(args.work / "store.zarr", args.n, args.chunk)
    build_s = time.perf_counter() - t0
    labels, d = list(store.labels), int(store.comp_shape[-1])
    rng = np.random.default_rng(0)
    bases = {f"f{j}": feature_basis(rng.standard_normal((k, d))) for j, k in enumerate(FEATURE_K)}
    directions = np.concatenate(list(bases.values()))
    head = torch.nn.functional.normalize(torch.randn(10, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), dim=-1)

    def read() -> None:
        for stack in store.iter_batches():
            stack.values.double().sum(0)

    def score() -> None:
        moments = ScoreMoments(len(labels), d, directions=directions, labels=labels)
        for stack in store.iter_batches():
            moments.add_stack(stack)
        for kind in ("corr", "var_attributed", "var_explained"):
            score_table(moments, bases, kind, share=kind == "var_attributed")

    sets = {"unablated": [], "ablated": list(range(150, 160))}
    for direction in ("from_last", "from_first"):
        sets.update({f"{direction}:{i}": s for i, s in enumerate(curve_sets(labels, direction))})

    def ablate() -> None:
        total = torch.zeros(len(labels), d, dtype=torch.float64)
        count = 0
        for stack in store.iter_batches():
            total += stack.values.double().sum(1)
            count += stack.batch_size
        means = total / count
        batches = ((s, torch.as_tensor(store.targets(s.meta["rows"]))) for s in store.iter_batches())
        accuracy_over_batches(batches, sets, lambda z: (z @ head.T).argmax(-1), mode="mean", means=means)

    read_s = best_of(args.repeat, read)
    score_s = best_of(args.repeat, score)
    ablate_s = best_of(args.repeat, ablate)
    figures = {
        "n": args.n, "components": len(labels), "d": d, "chunk": args.chunk, "directions": int(directions.shape[0]),
        "ablation_sets": len(sets), "build_s": build_s, "read_s": read_s, "score_s": score_s, "ablate_s": ablate_s,
        "score_over_read": score_s / read_s, "ablate_over_read": ablate_s / read_s,
        "read_items_per_s": args.n / read_s, "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    print(f"store: {args.n} items x {len(labels)} components x d={d} (float16), chunks of {args.chunk}")
    print(f"read pass        {read_s:7.2f} s  ({args.n / read_s:,.0f} items/s)  = 1.00x")
    print(f"score pass       {score_s:7.2f} s  = {score_s / read_s:.2f}x read  ({directions.shape[0]} directions, "
          "3 variants)")
    print(f"ablate (2 passes){ablate_s:7.2f} s  = {ablate_s / read_s:.2f}x read  ({len(sets)} ablation sets)")
    print(f"max RSS {figures['max_rss_mib']:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
