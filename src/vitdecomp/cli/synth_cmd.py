"""``vitdecomp synth generate OUT``: write a synthetic dataset with known factors and exact masks;
``vitdecomp synth train {clip,vit,swin,spurious} --out DIR``: train a tiny model on generated scenes."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "synth",
        parents=parents,
        help="the synthetic world: generate datasets with known factors",
        description="Procedural scenes whose generating factors (shape, colour, pattern, size, position, "
        "background) are known, with exact object masks and captions.",
    )
    actions = p.add_subparsers(dest="synth_command", metavar="ACTION")
    g = actions.add_parser(
        "generate",
        parents=parents,
        help="write a dataset (ImageFolder splits, factors.csv, masks; Waterbirds layout with --spurious)",
        description="Write N generated images under OUT: {split}/{class}/{id}.png, masks/, factors.csv, "
        "summary.json and task.json (the class factor and its texts); with --spurious P also a Waterbirds-format "
        "metadata.csv (class = a group of values of the class factor, correlated with water/land backgrounds with "
        "probability P in train, balanced in val/test). The same arguments give byte-identical files. Decompose it "
        "with `vitdecomp decompose MODEL OUT/test --out STORE` (or OUT itself for the --spurious variant); "
        "`vitdecomp segment --pairs OUT [--split test]` scores segmentation against its masks and `vitdecomp debias "
        "OUT` (--spurious variant) uses its class and background texts by default.",
    )
    g.add_argument("out", type=Path, help="output folder")
    g.add_argument("--n", type=int, default=1000, help="images over all splits (default 1000)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--task", "--class-factor", dest="task", default="shape",
                   help="the factor that is the class: shape, colour, pattern, size, position or background "
                   "(default shape; with --spurious not background). The shipped tiny CLIP reads colour, size and "
                   "background zero-shot, pattern partly, shape and position at chance")
    g.add_argument("--spurious", type=float, help="Waterbirds analogue: P(background matches class) in train")
    g.add_argument("--size", type=int, default=64, help="image side in px (default 64)")
    g.add_argument("--objects", type=int, choices=(1, 2), default=1, help="objects per image")
    g.add_argument("--overwrite", action="store_true", help="replace an earlier generated dataset in OUT")
    g.add_argument("--json", action="store_true", help="print the summary as JSON")
    t = actions.add_parser(
        "train",
        parents=parents,
        help="train a tiny model (CLIP, supervised ViT, or spurious-cue classifier) on generated scenes",
        description="Train a tiny model on scenes generated on the fly (or on the train split of --data) and "
        "write OUT/{model weights}.safetensors plus OUT/tiny_model.json (architecture, seed, steps, held-out "
        "accuracy). clip: open_clip CLIP, contrastive on full and partial captions (OUT is also an open_clip "
        "local-dir model); vit: timm ViT classifying --task; swin: timm Swin classifying --task; spurious: timm "
        "ViT on the binary task whose class matches the water/land background with probability --spurious. Deterministic given --seed.",
    )
    t.add_argument("model", choices=("clip", "vit", "swin", "spurious"), help="which tiny model")
    t.add_argument("--out", type=Path, required=True, help="output folder")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=2000, help="optimisation steps (default 2000)")
    t.add_argument("--batch-size", type=int, default=128, help="images per step (default 128)")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    t.add_argument("--task", default="shape", help="the factor to classify (vit, spurious) or to report (clip)")
    t.add_argument("--spurious", type=float, default=0.95, help="spurious: P(background matches class) in training")
    t.add_argument("--data", type=Path, help="train on this generated dataset's train split instead")
    t.add_argument("--n-images", type=int, help="cap the pool of generated training scenes")
    t.add_argument("--eval-n", type=int, default=500, help="held-out scenes for the accuracy (0: skip)")
    t.add_argument("--json", action="store_true", help="print the sidecar as JSON")
    b = actions.add_parser(
        "bench",
        parents=parents,
        help="ground-truth benchmark of the method on the shipped tiny models",
        description="Factor agreement and retrieval precision@10 of the top components per known factor vs the "
        "full representation and random components; zero-shot segmentation IoU of the decomposition map vs "
        "raw attention and rollout against exact masks; worst-group accuracy of a linear head on the CLIP trained "
        "on a background-biased split, before/after mean-ablating the background components selected on val, "
        "vs random-components and top-variance controls (and the tiny classifier trained on that split, which "
        "learned the background only). Prints a table; --out writes the JSON.",
    )
    b.add_argument("--out", type=Path, help="write the results as JSON here")
    b.add_argument("--n-images", type=int, default=600, help="scenes for scores, agreement and retrieval")
    b.add_argument("--n-segment", type=int, default=200, help="scenes for segmentation")
    b.add_argument("--n-spurious", type=int, default=400,
                   help="scenes per split (train, val, test) for the spurious cue (default 400)")
    b.add_argument("--k", type=int, default=3, help="components per factor (default 3)")
    b.add_argument("--seed", type=int, default=424_242)
    b.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    p.set_defaults(run=run, parser=p)


def run(args: argparse.Namespace) -> int:
    command = getattr(args, "synth_command", None)
    if command == "train":
        return _train(args)
    if command == "bench":
        return _bench(args)
    if command != "generate":
        args.parser.print_help()
        return 2
    from ..synth import generate_dataset

    summary = generate_dataset(
        args.out, args.n, seed=args.seed, task=args.task, spurious=args.spurious, size=args.size,
        n_objects=args.objects, overwrite=args.overwrite,
    )
    if args.json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        splits = ", ".join(f"{name} {info['n']}" for name, info in summary["splits"].items()) if "splits" in summary else ""
        sys.stdout.write(f"wrote {args.n} images to {args.out} ({summary.get('kind', 'folder')}; {splits})\n")
        values = summary.get("class_values") or {}
        sys.stdout.write(f"classes ({summary.get('task')}): " + ", ".join(
            str(c) + (f" ({'/'.join(values[c])})" if list(values.get(c, [c])) != [c] else "")
            for c in summary.get("classes", [])) + "\n")
    return 0


def _train(args: argparse.Namespace) -> int:
    from ..synth.train import train_tiny

    _, info = train_tiny(args.model, args.data, seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                         lr=args.lr, out_path=args.out, n_images=args.n_images, task=args.task,
                         spurious=args.spurious, eval_n=args.eval_n)
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2, sort_keys=True) + "\n")
        return 0
    sys.stdout.write(f"trained tiny {args.model} ({args.steps} steps, seed {args.seed}, {info['train_seconds']} s, "
                     f"final loss {info['final_loss']}) -> {args.out}\n")
    if "accuracy" in info:
        line = f"held-out accuracy ({info['task']}): {info['accuracy']:.3f}"
        if info.get("zero_shot_accuracy"):
            line += " | zero-shot " + ", ".join(f"{f} {a:.3f}" for f, a in info["zero_shot_accuracy"].items())
        if info.get("eval", {}).get("worst_group_accuracy") is not None:
            line += f" | worst group {info['eval']['worst_group_accuracy']:.3f}"
        sys.stdout.write(line + "\n")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from ..synth.bench import BenchConfig, run_bench

    cfg = BenchConfig(n_images=args.n_images, n_segment=args.n_segment, n_spurious=args.n_spurious, top_k=args.k,
                      seed=args.seed, n_queries=min(200, args.n_images))
    result = run_bench(cfg, args.weights)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    out = sys.stdout
    out.write(f"synthetic-world benchmark ({cfg.n_images} scenes, k={cfg.top_k}, seed {cfg.seed})\n")
    out.write(f"{'factor':<11}{'agree top-k':>12}{'full':>7}{'other':>7}{'random':>8}{'chance':>8}"
              f"{'p@10 top-k':>12}{'full':>7}{'random':>8}{'base':>7}\n")
    for f, a in result["factor_agreement"].items():
        r = result["retrieval"][f]
        out.write(f"{f:<11}{a['top_k']:>12.3f}{a['full']:>7.3f}{a['other_top_k']:>7.3f}{a['random_k']['mean']:>8.3f}"
                  f"{a['chance']:>8.3f}{r['top_k']:>12.3f}{r['full']:>7.3f}{r['random_k']['mean']:>8.3f}"
                  f"{r['base_rate']:>7.3f}\n")
    out.write("segmentation (pixel acc / mIoU / mAP / fg IoU):\n")
    for name, m in result["segmentation"].items():
        out.write(f"  {name:<30}{m['pixel_accuracy']:.3f} / {m['miou_two_class']:.3f} / {m['map_two_channel']:.3f}"
                  f" / {m['fg_iou']:.3f}\n")
    s = result["spurious"]
    out.write(f"spurious cue ({s['task']} {' vs '.join('/'.join(g) for g in s['groups'])}, background aligned in "
              f"{s['train_aligned_share']:.0%} of train; linear head on the CLIP; test split):\n{s['table']}\n")
    c = s["classifier"]
    out.write(f"spurious cue, {c['note']}: worst-group {c['before']['worst_group']:.3f} -> "
              f"{c['after']['worst_group']:.3f} (ablating {', '.join(c['selected'])}); random {c['k']}: "
              f"{c['random']['worst_group_mean']:.3f} ± {c['random']['worst_group_sd']:.3f}, max "
              f"{c['random']['worst_group_max']:.3f}\n")
    for key in ("aligned", "aligned_vit"):
        a = result[key]
        out.write(f"CompAlign ({a['model']} -> CLIP space): val cosine {a['val_cosine']:.3f}; factor agreement "
                  "top-k " + ", ".join(f"{f} {r['top_k']:.2f} (random {r['random_k']['mean']:.2f})"
                                      for f, r in a["factor_agreement"].items()) + "\n")
    return 0
