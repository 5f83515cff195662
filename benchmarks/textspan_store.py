#!/usr/bin/env python
"""TextSpan over every head of a ViT-B-sized store: covariance form against the direct form.

Unlike ``benchmarks/textspan.py`` (synthetic head outputs in memory), this runs the whole path
on a real store: an open_clip ``ViT-B-16`` with random weights (12 layers x 12 heads, width
768, CLIP space ``d = 512``), its input size forced to ``--image-size`` (default 64 px, so
``(64/16)^2 + 1 = 17`` tokens: the store has ViT-B's 144 heads and width; only the token count,
which the store does not hold, is smaller than at 224 px) decomposes ``--n`` generated
scenes (default 10,000) into a float16 store with ``vitdecomp.decompose_dataset``.

Then, on that store:

* **covariance form** -- ``store.compute_moments(covariance=True)`` (one streaming pass, one
  chunk in memory) and ``textspan_heads`` over all 144 heads.
* **direct form** -- the reference code's layout: every head's ``[n, d]`` matrix in memory
  (``n x 144 x d`` float32, gathered chunk by chunk), then ``textspan_direct`` per head.

The text pool is ``--pool`` random unit vectors in the CLIP space (the random text tower would
take longer to embed 3,000 prompts than TextSpan takes; embedding cost is the same for both
forms). The plain forward pass over the same images is timed in the same run, so the store
build is reported as a ratio to it. Peak memory: ``tracemalloc`` peak (numpy buffers) and the
process's max RSS.

Usage::

    python benchmarks/textspan_store.py --work /tmp/ts-bench          # builds the store once
    python benchmarks/textspan_store.py --work /tmp/ts-bench --n 2000  # smaller
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import resource
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

MIB = 1024.0**2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="folder for the images and the store (reused)")
    p.add_argument("--n", type=int, default=10_000, help="images (default 10,000)")
    p.add_argument("--image-size", type=int, default=64, help="model input side (default 64)")
    p.add_argument("--batch", type=int, default=100, help="images per chunk / forward pass (default 100)")
    p.add_argument("--pool", type=int, default=3_000, help="text pool size M (default 3,000)")
    p.add_argument("--m", type=int, default=10, help="texts per head (default 10)")
    p.add_argument("--rank", type=int, default=80, help="projection rank r (default 80)")
    p.add_argument("--forward-batches", type=int, default=10, help="batches timed for the plain forward pass")
    p.add_argument("--skip-direct", action="store_true", help="only the covariance form")
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p.parse_args(argv)


def build_model(image_size: int) -> Any:
    import open_clip
    import torch

    import vitdecomp as vd

    torch.manual_seed(0)
    module = open_clip.create_model("ViT-B-16", pretrained=None, force_image_size=image_size)
    return vd.wrap(module.eval(), name=f"open_clip:ViT-B-16@{image_size}px(random)")


def make_images(folder: Path, n: int) -> float:
    """Generated scenes (the synthetic world) as PNGs; returns seconds (0 when already there)."""
    from vitdecomp.synth.dataset import generate_dataset

    if (folder / "summary.json").is_file():
        return 0.0
    t0 = time.perf_counter()
    generate_dataset(folder, n=n, seed=0, size=64, splits=(n, 0, 0))
    return time.perf_counter() - t0


def forward_rate(model: Any, source: Any, batch: int, n_batches: int) -> float:
    """Images per second of the plain forward pass (model's own preprocessing excluded)."""
    import torch

    from vitdecomp.data.datasets import load_batch

    transform = model.transform
    batches = [load_batch(source, range(b * batch, (b + 1) * batch), transform).pixels for b in range(n_batches)]
    with torch.inference_mode():
        model.module.encode_image(batches[0])
        t0 = time.perf_counter()
        for x in batches:
            model.module.encode_image(x)
        dt = time.perf_counter() - t0
    return n_batches * batch / dt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import numpy as np
    import torch

    from vitdecomp.data.datasets import open_dataset
    from vitdecomp.store.dataset_run import decompose_dataset
    from vitdecomp.store.component_store import ComponentStore
    from vitdecomp.interpret.textspan import textspan_direct, textspan_heads

    args.work.mkdir(parents=True, exist_ok=True)
    images = args.work / "images"
    gen_s = make_images(images, args.n)
    model = build_model(args.image_size)
    source = open_dataset(images / "train", kind="folder")
    fwd = forward_rate(model, source, args.batch, args.forward_batches)

    store_path = args.work / "store"
    t0 = time.perf_counter()
    run = decompose_dataset(model, source, store_path, batch_size=args.batch, granularity="head")
    build_s = time.perf_counter() - t0
    store = ComponentStore.open(store_path)
    manifest = store.manifest()
    labels = list(store.labels)
    heads = [i for i, name in enumerate(labels) if ".H" in name]
    d = store.comp_shape[-1]
    rng = np.random.default_rng(0)
    t = rng.standard_normal((args.pool, d))
    emb = t / np.linalg.norm(t, axis=1, keepdims=True)
    texts = [f"text {i:05d}" for i in range(args.pool)]

    tracemalloc.start()
    gc.collect()
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    moments = store.compute_moments(covariance=True)
    t1 = time.perf_counter()
    res_cov = textspan_heads(moments, labels, texts, emb, components=heads, m=args.m, rank=args.rank)
    t2 = time.perf_counter()
    cov = {"data_pass_s": t1 - t0, "select_s": t2 - t1, "total_s": t2 - t0,
           "peak_mib": tracemalloc.get_traced_memory()[1] / MIB}
    del moments
    direct: dict[str, float] | None = None
    same = dfrac = None
    if not args.skip_direct:
        gc.collect()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        n_valid = store.manifest()["counts"]["valid"]
        data = np.empty((len(heads), n_valid, d), dtype=np.float32)
        row = 0
        hidx = torch.tensor(heads)
        for stack in store.iter_batches():
            v = stack.sum_tokens().values[hidx]  # [heads, batch, d]
            data[:, row : row + v.shape[1]] = v.numpy()
            row += v.shape[1]
        t1 = time.perf_counter()
        res_dir = [textspan_direct(data[j], texts, emb, m=args.m, rank=args.rank, label=labels[h])
                   for j, h in enumerate(heads)]
        t2 = time.perf_counter()
        direct = {"data_pass_s": t1 - t0, "select_s": t2 - t1, "total_s": t2 - t0,
                  "peak_mib": (tracemalloc.get_traced_memory()[1] - base) / MIB}
        same = sum(a.indices == b.indices for a, b in zip(res_cov, res_dir))
        dfrac = max(float(np.max(np.abs(np.subtract(a.variance_explained, b.variance_explained)), initial=0.0))
                    for a, b in zip(res_cov, res_dir) if len(a.indices) == len(b.indices))
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    n = manifest["counts"]["valid"]
    print(f"TextSpan on a store: {model.name}, {len(heads)} heads, d={d}, n={n}, pool M={args.pool}, "
          f"m={args.m}, r={args.rank}  ({platform.machine()}, torch {torch.__version__}, "
          f"threads={torch.get_num_threads()})")
    print(f"store build: {build_s:.1f} s = {n / build_s:.1f} img/s; plain forward {fwd:.1f} img/s "
          f"(decomposition+store / forward time = {fwd / (n / build_s):.2f}x); images generated in {gen_s:.1f} s")
    print(f"{'form':<28}{'data pass s':>13}{'select s':>10}{'total s':>10}{'peak MiB':>11}")
    rows = [("covariance (streamed)", cov)] + ([("direct (all heads in memory)", direct)] if direct else [])
    for name, r in rows:
        print(f"{name:<28}{r['data_pass_s']:>13.1f}{r['select_s']:>10.1f}{r['total_s']:>10.1f}{r['peak_mib']:>11.0f}")
    if direct:
        print(f"{'ratio direct/covariance':<28}{direct['data_pass_s'] / cov['data_pass_s']:>12.2f}x"
              f"{direct['select_s'] / cov['select_s']:>9.2f}x{direct['total_s'] / cov['total_s']:>9.2f}x"
              f"{direct['peak_mib'] / cov['peak_mib']:>10.2f}x")
        print(f"agreement: same picks in {same}/{len(heads)} heads, max |Δ variance fraction| = {dfrac:.2e}")
    print(f"process max RSS {rss:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps({
            "args": {k: str(v) for k, v in vars(args).items()}, "model": model.name, "heads": len(heads), "d": d,
            "n": n, "store_build_s": build_s, "forward_img_s": fwd, "covariance": cov, "direct": direct,
            "same_picks": same, "max_fraction_diff": dfrac, "max_rss_mib": rss, "store_error": manifest["error"],
            "torch": torch.__version__, "python": sys.version}, indent=2) + "\n")
    del run
    return 0


if __name__ == "__main__":
    sys.exit(main())
