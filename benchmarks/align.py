#!/usr/bin/env python
"""Cost of a CompAlign fit streamed from two stores (``vitdecomp align``) against reading them.

Method: two float32 stores of N rows are written once under a temp folder (a "model" store of
``COMP`` components of width ``D_MODEL``, chunk 256; a "CLIP" store whose reference rows are
``D_CLIP`` wide, chunk 200, so the chunk grids differ as they may in practice). Then, in this
process, on the same rows:

1. **read**: one pass of :func:`vitdecomp.interpret.align.store_batches` (both stores, ids checked, rows
   valid in both), nothing computed -- the I/O floor of every fit pass;
2. **fit, streamed**: :func:`vitdecomp.interpret.align.fit_compalign` for one epoch (one training pass that
   also evaluates the initial state on the held-out rows, plus one evaluation pass of the final
   state), for ``--objective penalty`` and ``orthogonal``;
3. **fit, in memory**: the same fit from tensors already in memory (no store reads).

Ratios: streamed fit / (2 x read) (the fit makes two passes), and streamed / in-memory (the share
of the store reads). Timings are the best of ``--repeat`` runs (torch threads: ``--threads``).

Usage::

    python benchmarks/align.py --quick          # N=2048, COMP=26, D=128 (the shipped tiny ViT's shape)
    python benchmarks/align.py --rows 20000 --comp 50 --d-model 384 --d-clip 512
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from _timing import best_of


def _write(path: Path, values: np.ndarray, ref: np.ndarray, names: list[str], chunk: int) -> None:
    from vitdecomp import ComponentStack
    from vitdecomp.core.labels import parse_label
    from vitdecomp.store.component_store import ComponentStore, StoreConfig

    n, comp, d = values.shape
    cfg = StoreConfig(model=f"bench-{d}", weights="none", dtype="float32", n_items=n, batch_size=chunk)
    store = ComponentStore.create_or_open(path, cfg, names, (comp, d), ref.shape[1])
    labels = tuple(parse_label(s) for s in names)
    for i in range(-(-n // chunk)):
        lo, hi = i * chunk, min((i + 1) * chunk, n)
        stack = ComponentStack(torch.from_numpy(values[lo:hi]).movedim(0, 1).contiguous(), labels,
                               torch.from_numpy(ref[lo:hi]))
        store.write_chunk(i, stack, [f"img{j:07d}" for j in range(lo, hi)], {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--comp", type=int, default=26)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--d-clip", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32, help="optimiser step rows (AlignConfig default)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="2048 rows")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.rows = 2048
    torch.set_num_threads(args.threads)

    from vitdecomp.interpret.align import AlignConfig, fit_compalign, store_batches
    from vitdecomp.store.component_store import ComponentStore

    n, comp, dm, dc = args.rows, args.comp, args.d_model, args.d_clip
    gen = np.random.default_rng(0)
    c = gen.standard_normal((n, comp, dm), dtype=np.float32)
    maps = np.linalg.qr(gen.standard_normal((comp, max(dm, dc), min(dm, dc))))[0]
    maps = maps if dc >= dm else maps.transpose(0, 2, 1)
    y = np.einsum("bcm,ckm->bk", c, maps.astype(np.float32)).astype(np.float32)
    names = [f"L{i // 6:02d}.H{i % 6:02d}" for i in range(comp)]
    result: dict[str, object] = {"rows": n, "comp": comp, "d_model": dm, "d_clip": dc, "threads": args.threads,
                                 "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        _write(Path(tmp) / "m.zarr", c, c.sum(1), names, 256)
        _write(Path(tmp) / "c.zarr", y[:, None], y, ["embed"], 200)
        store, clip = ComponentStore.open(Path(tmp) / "m.zarr"), ComponentStore.open(Path(tmp) / "c.zarr")
        source = store_batches(store, clip)

        def read() -> None:
            for _ in source():
                pass

        read()  # warm the page cache
        t_read = best_of(args.repeat, read)
        result["read_pass_s"] = t_read
        ct, yt = torch.from_numpy(c), torch.from_numpy(y)

        def memory() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
            return [(ct[i : i + 256], yt[i : i + 256], torch.arange(i, min(i + 256, n))) for i in range(0, n, 256)]

        for objective in ("penalty", "orthogonal"):
            cfg = AlignConfig(parametrisation=objective, epochs=1, batch_size=args.batch_size, patience=None)
            fit_compalign(memory, comp, dm, dc, cfg)  # warm-up (imports, allocator)
            t_fit = best_of(args.repeat, lambda cfg=cfg: fit_compalign(source, comp, dm, dc, cfg))
            t_mem = best_of(args.repeat, lambda cfg=cfg: fit_compalign(memory, comp, dm, dc, cfg))
            result[objective] = {"fit_streamed_s": t_fit, "fit_in_memory_s": t_mem,
                                 "streamed_over_two_reads": t_fit / (2 * t_read),
                                 "streamed_over_in_memory": t_fit / t_mem,
                                 "train_rows_per_s": 0.9 * n / max(t_fit - t_read, 1e-9)}
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
