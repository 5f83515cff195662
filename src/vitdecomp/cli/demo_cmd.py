"""``vitdecomp demo``: the whole pipeline on the shipped tiny models, as a self-contained HTML report."""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Loggers whose INFO lines (the numbered stages, long text encodings) the demo shows without -v.
_PROGRESS_LOGGERS = ("vitdecomp.synth.demo", "vitdecomp.interpret.text")


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        parents=parents,
        help="run the whole pipeline offline on the shipped tiny models and write an HTML report",
        description="Decompose a tiny CLIP trained on the synthetic world, read its components with text "
        "(zero-shot, TextSpan, feature scores), check them against the known factors (factor agreement, "
        "retrieval by feature, zero-shot segmentation vs attention baselines) and remove a spurious cue from "
        "a tiny classifier; writes OUT/report.html (opens from disk) and OUT/results.json. With --model and "
        "--images: the same report, as far as the model allows, for a real model and a folder of images. "
        "Prints one line per stage with its time on stderr (-q: none). Text embeddings are cached in "
        "~/.cache/vitdecomp/text (VITDECOMP_CACHE=DIR: DIR/text; VITDECOMP_CACHE=off: no cache), so a CLIP's "
        "text pool is encoded on the first run only.",
    )
    p.add_argument("--out", type=Path, default=Path("vitdecomp-demo"), help="output folder (default ./vitdecomp-demo)")
    p.add_argument("--model", help="a model spec (see `vitdecomp models`) instead of the shipped tiny models")
    p.add_argument("--images", type=Path, help="folder of images for --model")
    p.add_argument("--n-images", type=int, help="images to decompose (default 600; 64 with --model)")
    p.add_argument("--quick", action="store_true",
                   help="120 scenes instead of 600, every section kept (about 8 s on 2 CPU cores instead of about "
                   "15 s; for a first look and tests)")
    p.add_argument("--no-pretrained", action="store_true",
                   help="with --model: random weights, offline (to try the pipeline without a download)")
    p.add_argument("--weights", type=Path, help=argparse.SUPPRESS)  # folder with clip/ and spurious/ (tests)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """The demo is :func:`vitdecomp.synth.demo.run_demo` (settings: :meth:`DemoConfig.for_run`); this prints
    its summary."""
    from ..synth.demo import DemoConfig, run_demo

    cfg = DemoConfig.for_run(quick=args.quick, model=args.model, n_images=args.n_images,
                             pretrained=not args.no_pretrained, weights=args.weights)
    with _stage_lines(args):
        results = run_demo(args.out, model=args.model, images=args.images, config=cfg)
    out = sys.stdout
    out.write(f"vitdecomp demo: {results['model']}, {results['n_images']} images, {results['n_components']} components, "
              f"sum error {results['decomposition_relative_error']:.1e}, {results['seconds']} s\n")
    verdicts = {f: v["verdict"] for f, v in results.get("significance", {}).get("features", {}).items()}
    for factor, a in results.get("factor_agreement", {}).items():
        r = results["retrieval"][factor]
        out.write(f"  {factor:<10} {verdicts.get(factor, ''):<15} | zero-shot {a['full']:.2f} | top-3 components {a['top_k']:.2f} "
                  f"(random {a['random_k']['mean']:.2f}) | p@10 top-3 {r['top_k']:.2f} vs full {r['full']:.2f}  "
                  f"[{', '.join(a['components'])}]\n")
    if "segmentation" in results:
        seg = results["segmentation"]
        out.write("  segmentation mIoU: " + ", ".join(f"{k} {v['miou_two_class']:.3f}" for k, v in seg.items()) + "\n")
    if "spurious" in results:
        s = results["spurious"]
        out.write(f"  spurious cue: worst-group {s['before']['worst_group']:.3f} -> {s['after']['worst_group']:.3f} "
                  f"ablating {', '.join(s['selected'])} (random: {s['random']['worst_group_mean']:.3f} "
                  f"± {s['random']['worst_group_sd']:.3f})\n")
    out.write(f"report: {Path(args.out) / 'report.html'}\n")
    return 0


@contextlib.contextmanager
def _stage_lines(args: argparse.Namespace) -> Iterator[None]:
    """Show the demo's stage lines ("[3/10] TextSpan labels ... 0.3 s") on stderr unless -q; levels restored after."""
    if getattr(args, "quiet", False):
        yield
        return
    loggers = [logging.getLogger(name) for name in _PROGRESS_LOGGERS]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved):
            lg.setLevel(level)
