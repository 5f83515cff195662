#!/usr/bin/env python
"""Cost of ``vitdecomp heatmap`` per batch against a plain forward pass.

On a random-weight model at its input size (CPU by default), each configuration is timed with
``time.perf_counter``:

* ``forward``: the model's own forward (no_grad), the baseline;
* ``heatmap (projected)``: what the command computes: a ``head_token`` decomposition contracted
  with the direction and its contrast *before* the token expansion (``directions=[y1, y2]``),
  the contrastive token map, and the head-level decomposition of the sum check;
* ``heatmap (unprojected)``: the naive route: a full ``head_token`` stack ``[comp, batch, token, d]``,
  then ``token_heatmap`` with ``y1 - y2``;
* ``draw``: mapping one map back onto a 640 x 480 original (:func:`crop_box`,
  :func:`render_original`) and the panel (:func:`render_panel`), per image, no model.

Every configuration is called ``--warmup`` times, then ``--repeats`` rounds call each once; the
table reports the median per-batch time, images/s and the ratio to the forward pass of the same
round (median over rounds).

Usage::

    nice -n 10 python benchmarks/heatmap.py                       # timm vit_small_patch16_224, batch 4
    python benchmarks/heatmap.py --model timm:vit_base_patch16_224 --batch 8
"""
from __future__ import annotations

import argparse
import platform
import statistics
from typing import Any

from _timing import median_ratio, paired_rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="timm:vit_small_patch16_224", help="random weights (no download)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    import vitdecomp as vd
    from vitdecomp.apps.heatmap import crop_box, render_original, render_panel, token_heatmap

    torch.set_num_threads(args.threads)
    model = vd.load(args.model, pretrained=False, device=args.device)
    x = model.example_input(batch=args.batch, seed=0)
    with torch.no_grad():
        d = model.representation(x).shape[-1]
    gen = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(2, d, generator=gen), dim=-1).to(x.device)
    original = Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8))

    def forward() -> Any:
        return model.representation(x)

    def projected() -> Any:
        tokens = vd.decompose(model, x, granularity="head_token", directions=dirs)
        heads = vd.decompose(model, x, granularity="head", directions=dirs)
        return token_heatmap(tokens, 0, contrast=1), heads.values.sum(0)

    def unprojected() -> Any:
        stack = vd.decompose(model, x, granularity="head_token")
        return token_heatmap(stack, dirs[0], contrast=dirs[1])

    patch = token_heatmap(vd.decompose(model, x[:1], granularity="head_token", directions=dirs), 0, contrast=1).patch[0]

    def draw() -> Any:
        for _ in range(args.batch):
            box = crop_box(model, original.size)
            overlay = render_original(original, patch, box)
            render_panel(overlay, vmax=float(patch.abs().max()), prefix={"cls": 0.1}, title="bench")

    configs = {"forward": forward, "heatmap (projected)": projected, "heatmap (unprojected)": unprojected,
               "draw (640x480)": draw}
    with torch.no_grad():
        times = paired_rounds(configs, repeats=args.repeats, warmup=args.warmup)
    base = times["forward"]
    print(f"model {args.model} (random weights), batch {args.batch}, {args.threads} threads, device {args.device}, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"{'configuration':<24} {'s/batch':>9} {'img/s':>8} {'x forward':>10}")
    for name, ts in times.items():
        med = statistics.median(ts)
        ratio = median_ratio(ts, base)
        print(f"{name:<24} {med:9.4f} {args.batch / med:8.2f} {ratio:10.1f}")


if __name__ == "__main__":
    main()
