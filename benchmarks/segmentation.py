#!/usr/bin/env python
"""Throughput of the segmentation harness's maps (``vitdecomp segment``) against a plain forward pass.

Per batch, on a random-weight model at its input size (CPU by default), each configuration is
timed with ``time.perf_counter``:

* ``forward``: the model's own forward (no_grad), the baseline;
* ``attention``: one hooked forward giving every block's attention, raw attention and rollout
  (:func:`vitdecomp.apps.segmentation.relevance.attention_pass` with ``gradients=False``);
* ``gradients``: the same pass plus the backward for ``d logit / d alpha`` and both gradient
  maps (attention GradCAM, Chefer relevance);
* ``decomposition``: the contrastive decomposition map (``head_token`` decomposition projected
  onto the batch's contrast directions, :func:`vitdecomp.apps.segmentation.harness.decomposition_map`);
* ``all five``: gradients + decomposition (what one ``segment`` batch computes);
* ``metrics``: upsampling the five maps to the input size and scoring them against masks
  (:class:`vitdecomp.apps.segmentation.metrics.SegmentationMetrics`), no model involved.

Every configuration is called ``--warmup`` times, then ``--repeats`` rounds call each once
(order rotated); the table reports the median per-batch time, images/s and the ratio to the
forward pass of the same round (median over rounds).

Usage::

    nice -n 10 python benchmarks/segmentation.py                 # timm vit_base_patch16_224, batch 4
    python benchmarks/segmentation.py --model timm:vit_tiny_patch16_224 --batch 8
"""
from __future__ import annotations

import argparse
import platform
import statistics
from typing import Any

from _timing import median_ratio, paired_rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="timm:vit_base_patch16_224", help="random weights (no download)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F

    import vitdecomp as vd
    from vitdecomp.apps.segmentation.relevance import attention_pass, classifier_head
    from vitdecomp.apps.segmentation.harness import decomposition_map
    from vitdecomp.apps.segmentation.metrics import SegmentationMetrics

    torch.set_num_threads(args.threads)
    model = vd.load(args.model, pretrained=False, device=args.device)
    head = classifier_head(model)
    x = model.example_input(batch=args.batch, seed=0)
    size = model.preprocessing.input_size
    directions = head.directions()
    rng = np.random.default_rng(0)
    masks = [rng.random(size) > 0.6 for _ in range(args.batch)]
    with torch.no_grad():
        target = head.logits(model.representation(x)).argmax(1)
    maps = {k: torch.rand(args.batch, size[0] // 16, size[1] // 16) for k in range(5)}

    def forward() -> Any:
        return model.representation(x)

    def attention() -> Any:
        ap = attention_pass(model, x, head, gradients=False)
        return ap.raw_attention(), ap.rollout()

    def gradients() -> Any:
        ap = attention_pass(model, x, head)
        return ap.gradcam(), ap.chefer()

    def decomposition() -> Any:
        return decomposition_map(model, x, directions, target=target)

    def all_five() -> Any:
        ap = attention_pass(model, x, head)
        out = ap.raw_attention(), ap.rollout(), ap.gradcam(), ap.chefer()
        return out, decomposition_map(model, x, directions, target=ap.target)

    def metrics() -> Any:
        for grid in maps.values():
            up = F.interpolate(grid[:, None].double(), size=size, mode="bilinear", align_corners=False)[:, 0]
            scorer = SegmentationMetrics()
            for b in range(args.batch):
                scorer.update(up[b].numpy(), masks[b])

    configs = {"forward": forward, "attention": attention, "gradients": gradients,
               "decomposition": decomposition, "all five": all_five, "metrics": metrics}
    times = paired_rounds(configs, repeats=args.repeats, warmup=args.warmup,
                          sync=torch.cuda.synchronize if args.device != "cpu" else None)
    names = list(configs)

    desc = model.describe()
    print(f"### Segmentation maps vs a plain forward ({args.model}, random weights)\n")
    print(f"{desc['blocks']} blocks, {desc['heads']} heads, width {desc['width']}, input {size[0]}x{size[1]}, "
          f"{head.n_classes} classes; batch {args.batch}; {args.device}, {args.threads} threads "
          f"({platform.processor() or platform.machine()}); median of {args.repeats} rounds after "
          f"{args.warmup} warm-up.\n")
    print("| configuration | s / batch | images / s | × forward |")
    print("|---|---:|---:|---:|")
    for name in names:
        med = statistics.median(times[name])
        ratio = median_ratio(times[name], times["forward"])
        print(f"| {name} | {med:.3f} | {args.batch / med:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
