#!/usr/bin/env python
"""``vitdecomp debias`` on a generated Waterbirds-layout set: accuracy table and cost.

Method: :func:`vitdecomp.synth.dataset.generate_dataset` writes a Waterbirds-layout folder
(``metadata.csv`` + PNGs, 64 px) where the class ``y`` is a group of values of one factor
(``--task``, default ``pattern``: {solid, dotted} vs {striped, checkered}) and the place is the
background (land / water), aligned with ``y`` in ``--spurious`` of train and balanced in val and
test. The shipped tiny CLIP is the model; spurious texts are the background phrases, core texts
the task factor's phrases (``describe``), template set ``synth``. Then, in this process:

1. **forward**: the plain model forward pass over the test split (the baseline of the ratios);
2. **stores**: ``vitdecomp debias --store-dir`` makes the train / val / test stores
   (``decompose_dataset``) and runs the protocol (linear head fitted on train);
3. **debias only**: the same command again, the stores reused, once per head (linear,
   zero-shot): its cost is the selection pass over val and the projection passes.

Prints the markdown table of each run (test split; selection on val) and the timings as ratios
to the forward pass.

Usage::

    python benchmarks/debias_synth.py                      # 200 images per split, k = 3, 10 random draws
    python benchmarks/debias_synth.py --per-split 400 --task shape --k 5
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-split", type=int, default=200)
    parser.add_argument("--task", default="pattern")
    parser.add_argument("--spurious", type=float, default=0.95)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import vitdecomp as vd
    from vitdecomp.cli.main import main as cli
    from vitdecomp.data.datasets import Waterbirds
    from vitdecomp.synth.dataset import SPURIOUS_GROUPS, generate_dataset
    from vitdecomp.synth.generator import VOCABULARY, describe
    from vitdecomp.core.shipped import shipped_path

    spec = f"open_clip:local-dir:{shipped_path('clip')}"
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        root = base / "waterbirds"
        n = args.per_split
        generate_dataset(root, 3 * n, seed=args.seed, task=args.task, spurious=args.spurious, splits=(n, n, n))
        (base / "spurious.txt").write_text("\n".join(describe("background", v) for v in VOCABULARY["background"]))
        (base / "core.txt").write_text("\n".join(describe(args.task, v) for v in VOCABULARY[args.task]))
        groups = SPURIOUS_GROUPS[args.task]
        class_names = ["|".join(describe(args.task, v) for v in g) for g in groups]

        model = vd.load(spec)
        test = Waterbirds(root, "test")
        pixels = torch.stack([model.transform(test.load(i)) for i in range(len(test))])
        start = time.perf_counter()
        for i in range(0, len(pixels), 64):
            model.representation(pixels[i:i + 64])
        forward = time.perf_counter() - start

        common = ["debias", str(root), "--model", spec, "--store-dir", str(base / "stores"), "--k", str(args.k),
                  "--random-draws", str(args.draws), "--spurious", str(base / "spurious.txt"), "--core",
                  str(base / "core.txt"), "--templates", "synth", "--class-names", *class_names, "-q"]
        timings = {}
        tables = {}
        for label, head in (("stores + linear", "linear"), ("linear", "linear"), ("zero-shot", "zero-shot")):
            out = base / f"out-{label.replace(' ', '')}"
            start = time.perf_counter()
            assert cli([*common, "--head", head, "--out", str(out)]) == 0
            timings[label] = time.perf_counter() - start
            payload = json.loads((out / "debias.json").read_text())
            tables[head] = (payload["selected"], (out / "debias.md").read_text(), payload["head"])
    print(f"task {args.task}: classes {groups[0]} vs {groups[1]}, place aligned with y in {args.spurious:.0%} of "
          f"train; {n} images per split; k = {args.k}; {args.draws} random draws\n")
    for head, (selected, table, info) in tables.items():
        extra = f", train accuracy {info['train_accuracy']:.3f}" if "train_accuracy" in info else ""
        print(f"{head} head{extra}; selected on val: {', '.join(selected)}\n\n{table}")
    print(f"forward pass over the {n} test images: {forward:.2f} s (threads {args.threads})")
    for label, seconds in timings.items():
        print(f"  debias [{label}]: {seconds:.2f} s = {seconds / forward:.1f}x forward")
    print(json.dumps({"forward_s": round(forward, 3), **{k: round(v, 3) for k, v in timings.items()}}))


if __name__ == "__main__":
    main()
