"""``vitdecomp synth generate OUT``: write a synthetic dataset with known factors and exact masks."""
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
        "summary.json; with --spurious P also a Waterbirds-format metadata.csv (class correlated with "
        "water/land backgrounds with probability P in train, balanced in val/test). The same arguments "
        "give byte-identical files. Decompose it with `vitdecomp decompose MODEL OUT/test --out STORE` "
        "(or OUT itself for the --spurious variant).",
    )
    g.add_argument("out", type=Path, help="output folder")
    g.add_argument("--n", type=int, default=1000, help="images over all splits (default 1000)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--task", default="shape", help="the factor that is the class (default shape)")
    g.add_argument("--spurious", type=float, help="Waterbirds analogue: P(background matches class) in train")
    g.add_argument("--size", type=int, default=64, help="image side in px (default 64)")
    g.add_argument("--objects", type=int, choices=(1, 2), default=1, help="objects per image")
    g.add_argument("--overwrite", action="store_true", help="replace an earlier generated dataset in OUT")
    g.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(run=run, parser=p)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "synth_command", None) != "generate":
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
        sys.stdout.write(f"classes: {', '.join(map(str, summary.get('classes', [])))}\n")
    return 0
