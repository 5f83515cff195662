"""``vitdecomp segment``: zero-shot segmentation benchmark (docs/method.md §6.5), decomposition vs attention baselines."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path, PurePosixPath
from typing import Any

METHOD_CHOICES = ("decomposition", "raw_attention", "rollout", "gradcam", "chefer")


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "segment",
        parents=parents,
        help="zero-shot segmentation benchmark: decomposition maps vs attention baselines",
        description=(
            "Score token maps as foreground segmentations of image/mask pairs with Chefer et al.'s protocol "
            "(image and mask resized to the model's input size without a crop; map upsampled bilinearly, "
            "min-max normalised, thresholded at its mean): pixel accuracy, two-class mIoU and two-channel mAP, "
            "plus foreground IoU and foreground AP. Methods: the decomposition's contrastive map (top class vs "
            "the mean of the classes, summed over heads), raw last-layer attention, rollout, attention GradCAM "
            "and Chefer et al.'s gradient-weighted rollout, all on the same batches. Methods a model cannot run "
            "(the attention baselines on Swin/MaxViT, whose attention is windowed) are reported as n/a with the "
            "reason and the others still run. Prints a table; --out writes results.json (with a run record and "
            "'unavailable': method -> reason) and overlay figures."
        ),
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--mat", type=Path, help="ImageNet-Segmentation gtsegs_ijcv.mat (MATLAB v7.3)")
    src.add_argument("--pairs", type=Path, help="a folder with images/NAME.jpg and masks/NAME.png, or a dataset "
                     "written by `vitdecomp synth generate` as it is (foreground = its object masks)")
    p.add_argument("--split", choices=("train", "val", "test"),
                   help="with --pairs on a generated dataset: score only this split (default: every image)")
    p.add_argument("--model", required=True,
                   help="timm:NAME | open_clip:ARCH[:TAG] | hf:REPO_OR_DIR (see `vitdecomp models`)")
    p.add_argument(
        "--classes",
        help="class names: a shipped pool name or a text file, one name per line (required for CLIP unless an "
        "ImageNet class pool is shipped, or --pairs is a generated dataset: then its own class texts from task.json; "
        "for a classifier only used to name its classes)",
    )
    p.add_argument("--templates", default=None,
                   help="prompt template set for --classes (default photo; a generated dataset's own classes: synth)")
    p.add_argument("--head", choices=("auto", "classifier", "text"), default="auto",
                   help="target logits: the model's classifier, or CLIP text (default: classifier if it has one)")
    p.add_argument("--methods", nargs="+", choices=METHOD_CHOICES, default=list(METHOD_CHOICES))
    p.add_argument("--target", choices=("pred", "label"), default="pred",
                   help="class whose map is drawn: the top prediction (default) or the item's label")
    p.add_argument("--limit", type=int, help="score only the first N items")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rollout-start", type=int, default=1,
                   help="first block of rollout (default 1, Chefer et al.'s protocol; 0: every block)")
    p.add_argument("--chefer-start", type=int, default=0, help="first block of Chefer relevance")
    p.add_argument("--decomposition-start", type=int, default=None,
                   help="first block whose heads the decomposition map sums (default 0; for Swin the first block "
                   "of the last stage, the only stage whose heads split over one token grid; vit-decompose: 5)")
    p.add_argument("--examples", type=int, default=4, help="overlay figures of the first N items (with --out)")
    p.add_argument("--out", type=Path, help="folder for results.json and figures/")
    p.add_argument("--no-pretrained", action="store_true", help="random weights (offline; for trying things out)")
    p.add_argument("--checkpoint", type=Path, help="load weights from a local .safetensors / torch file")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """The benchmark is :func:`vitdecomp.apps.segmentation.harness.segmentation_benchmark`; this writes its result."""
    from ..apps.segmentation.harness import format_table, segmentation_benchmark
    from ..store.provenance import run_record, write_json

    result = segmentation_benchmark(
        args.model, args.mat if args.mat is not None else args.pairs, source_kind="mat" if args.mat else "pairs",
        split=args.split, classes=args.classes,
        templates=args.templates, head=args.head, methods=args.methods, target=args.target, limit=args.limit,
        batch_size=args.batch_size, rollout_start=args.rollout_start, chefer_start=args.chefer_start,
        decomposition_start=args.decomposition_start, n_examples=args.examples if args.out else 0,
        progress=not args.no_progress, pretrained=not args.no_pretrained, checkpoint=args.checkpoint,
        device=args.device)
    sys.stdout.write(format_table(result.result) + "\n")
    if args.out is not None:
        files, facts = result.inputs()
        payload = {"run": run_record("segment", args, pool=result.pool.manifest() if result.pool is not None else None,
                                     files=files or None, extra=facts),
                   **result.to_json()}
        figures = _figures(result.result, args.out / "figures")
        payload["figures"] = [str(f.relative_to(args.out)) for f in figures]
        path = write_json(args.out / "results.json", payload)
        sys.stdout.write(f"wrote {path}" + (f" and {len(figures)} figure(s)" if figures else "") + "\n")
    return 0


def _figures(result: Any, folder: Path) -> list[Path]:
    """One grid per example item: image, mask, then each method's normalised map over the image."""
    import numpy as np

    from ..apps.heatmap import render_overlay
    from ..report.figures import image_grid
    from ..apps.segmentation.metrics import normalise_relevance

    written = []
    for k, ex in enumerate(result.examples):
        tiles = [ex["image"], (ex["mask"].astype(np.uint8) * 255)]
        labels = ["image", "mask"]
        for name, heat in ex["maps"].items():
            tiles.append(render_overlay(ex["image"], normalise_relevance(heat), alpha=0.6, vmax=1.0))
            labels.append(name)
        grid = image_grid(tiles, columns=len(tiles), scale=1 if ex["image"].shape[0] >= 128 else 2, labels=labels)
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(PurePosixPath(str(ex["id"])).with_suffix("")))[-60:]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"example_{k:02d}_{stem}.png"
        grid.save(path)
        written.append(path)
    return written
