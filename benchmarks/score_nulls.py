"""Cost of the score nulls: `score_store` with R random text bases per feature vs without (R = 0).

Builds a store of the shipped tiny CLIP on a generated world (or reads ``--store``), then times the
whole scoring call (one streaming pass + tables) with ``n_null=0`` and with ``n_null=R`` in paired,
rotated rounds, and prints the median per-round ratio. The nulls reuse the pass's moments, so the
extra cost is the quadratic forms of the random bases (and embedding the null pool, cached on disk
after the first run).

    python benchmarks/score_nulls.py [--n 2000] [--null 200] [--features colour shape location]
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, help="an existing store (default: build one of the shipped CLIP)")
    parser.add_argument("--n", type=int, default=2000, help="generated images for the default store")
    parser.add_argument("--null", type=int, default=200, help="random bases per feature")
    parser.add_argument("--features", nargs="+", default=["colour", "shape", "location"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    import vitdecomp as vd
    from _timing import median_ratio, paired_rounds
    from vitdecomp.interpret.score import score_store
    from vitdecomp.synth import generate_dataset
    from vitdecomp.synth.generator import caption_pool

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-nulls-"))
    store = args.store
    if store is None:
        generate_dataset(work / "world", args.n, seed=0, task="colour")
        store = work / "clip.zarr"
        vd.decompose_dataset(vd.load("synth:clip"), work / "world" / "train", store, batch_size=64)
    pool = caption_pool()
    configs = {
        "no nulls": lambda: score_store(store, args.features, n_null=0),
        f"{args.null} nulls": lambda: score_store(store, args.features, n_null=args.null, null_pool=pool),
    }
    times = paired_rounds(configs, repeats=args.repeats)
    base = min(times["no nulls"])
    print(f"store {store} ({len(args.features)} features), {torch.get_num_threads()} torch thread(s)")
    for name, ts in times.items():
        print(f"  {name:<12} best {min(ts):.2f} s   median ratio to no nulls "
              f"{median_ratio(ts, times['no nulls']):.2f}x   (best/best {min(ts) / base:.2f}x)")


if __name__ == "__main__":
    main()
