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
    p.add_argument("--rollout-start", type=int, default=0, help="first block of rollout (Chefer et al.: 1)")
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


def _default_classes() -> str | None:
    from ..interpret.text.pools import POOLS

    for name in POOLS:
        if "imagenet" in name.lower():
            return name
    return None


def run(args: argparse.Namespace) -> int:
    import vitdecomp as vd

    from ..errors import InputError
    from ..store.provenance import run_record, write_json
    from ..apps.segmentation.relevance import classifier_head, text_head
    from ..apps.segmentation.harness import SegmentationPairs, format_table, run_segmentation

    if args.batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise InputError("--limit must be at least 1")
    if args.examples < 0:
        raise InputError("--examples must be >= 0")
    if args.mat is not None:
        if args.split is not None:
            raise InputError("--split applies to --pairs on a dataset written by `vitdecomp synth generate`")
        from ..data.datasets import ImageNetSegmentation

        source: Any = ImageNetSegmentation(args.mat)
    else:
        source = SegmentationPairs(args.pairs, split=args.split)
    model = vd.load(args.model, pretrained=not args.no_pretrained, checkpoint=args.checkpoint, device=args.device)

    pool = None
    classes_arg = args.classes
    has_classifier = model.classifier() is not None
    use_text = args.head == "text" or (args.head == "auto" and not has_classifier)
    world = getattr(source, "task", None) if classes_arg is None else None  # a generated dataset's own classes
    templates = args.templates or (world["templates"] if use_text and world is not None else "photo")
    if use_text and classes_arg is None and world is None:
        classes_arg = _default_classes()
        if classes_arg is None:
            raise InputError(
                f"{model.name} has no classifier head, so its targets are class texts: pass --classes "
                "(a shipped pool name or a text file with one class name per line)"
            )
    if classes_arg is not None:
        from ..interpret.text.pools import load_pool

        pool = load_pool(classes_arg)
    names = list(pool.texts) if pool is not None else None
    if use_text and world is not None:
        head, names = _world_text_head(model, world, templates)
    elif use_text:
        from ..interpret.text import text_encoder, zero_shot_head

        assert names is not None
        head = text_head(model, zero_shot_head(text_encoder(model), names, templates), names=names)
    else:
        if not has_classifier:
            raise InputError(f"--head classifier: {model.name} has no linear classifier head")
        head = classifier_head(model)
        if names is not None and len(names) != head.n_classes:
            raise InputError(f"--classes has {len(names)} names but the classifier has {head.n_classes} classes")
        if names is not None:
            head = classifier_head(model, names)

    result = run_segmentation(
        model, source, head, methods=args.methods, batch_size=args.batch_size, limit=args.limit,
        target=args.target, rollout_start=args.rollout_start, chefer_start=args.chefer_start,
        decomposition_start=args.decomposition_start, n_examples=args.examples if args.out else 0,
        progress=not args.no_progress,
    )
    sys.stdout.write(format_table(result) + "\n")
    if args.out is not None:
        files: dict[str, Path] = {}
        if args.mat is not None:
            files["mat"] = args.mat
        if classes_arg is not None and Path(classes_arg).is_file():
            files["classes"] = Path(classes_arg)
        extra = {"dataset": source.fingerprint(), "model": model.describe(), "head": "text" if use_text else "classifier",
                 "templates": templates if use_text else None}
        if use_text and world is not None:  # the generated dataset's own class texts (task.json, or its summary)
            task_file = next(f for f in (Path(source.root) / "task.json", Path(source.root) / "summary.json")
                             if f.is_file())
            files["task"] = task_file
            extra["classes"] = {"source": str(task_file), "names": names, "texts": world["class_texts"]}
        payload = {"run": run_record("segment", args, pool=pool.manifest() if pool is not None else None,
                                     files=files or None, extra=extra),
                   **result.to_json()}
        figures = _figures(result, args.out / "figures")
        payload["figures"] = [str(f.relative_to(args.out)) for f in figures]
        path = write_json(args.out / "results.json", payload)
        sys.stdout.write(f"wrote {path}" + (f" and {len(figures)} figure(s)" if figures else "") + "\n")
    return 0


def _world_text_head(model: Any, world: dict[str, Any], templates: str) -> tuple[Any, list[str]]:
    """The CLIP text head over a generated dataset's classes: per class, the renormalised mean of its
    template-ensembled ``class_texts`` (one text per class in the plain variant), so the head's class
    index is the dataset's label."""
    import torch

    from ..apps.segmentation.relevance import text_head
    from ..interpret.text import text_encoder, zero_shot_head

    encoder = text_encoder(model)
    rows = []
    for texts in world["class_texts"]:
        mean = zero_shot_head(encoder, list(texts), templates).mean(dim=0)
        rows.append(mean / mean.norm().clamp_min(1e-12))
    names = ["/".join(texts) for texts in world["class_texts"]]
    return text_head(model, torch.stack(rows), names=names), names


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
