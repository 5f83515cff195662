"""``vitdecomp decompose MODEL IMAGE_OR_DIR...``: decompose images and show the top components.

With ``--out STORE`` (a directory or ``*.zarr``, anything but ``.safetensors``) the input is a
dataset and the components are streamed into a resumable on-disk store instead
(:func:`vitdecomp.store.dataset_run.decompose_dataset`); under ``torchrun`` every rank writes its
own chunks of the same store. Ctrl-C there ends the run with one line saying how many chunks are
kept in the store (exit code 130); running the same command again resumes from them.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

#: Exit code of a run ended by Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130

log = logging.getLogger(__name__)


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "decompose",
        parents=parents,
        help="decompose images into component contributions",
        description=(
            "Run MODEL on the images, split each representation exactly into component "
            "contributions, print the largest ones (and, for a classifier, their contributions "
            "to the predicted class logit) and optionally save the stack."
        ),
    )
    p.add_argument("model", help="timm:NAME | open_clip:ARCH[:TAG] | hf:REPO_OR_PATH (see `vitdecomp models`)")
    p.add_argument(
        "inputs", nargs="+",
        help="image files or directories (searched recursively); with --out STORE one dataset: an image "
        "folder, ImageNet val, a Waterbirds root or ImageNet-Segmentation's gtsegs_ijcv.mat",
    )
    p.add_argument("--granularity", choices=("layer", "head", "head_token"), default="head")
    p.add_argument("--start-layer", type=int, default=0, help="first decomposed block; earlier ones form 'rest'")
    p.add_argument("--top", type=int, default=10, help="components to show (default 10)")
    p.add_argument(
        "--out", type=Path,
        help="FILE.safetensors: save the stack (read with ComponentStack.load); any other path: a "
        "dataset store (zarr directory), streamed, resumable (run the same command again after a kill)",
    )
    p.add_argument("--no-pretrained", action="store_true", help="random weights (offline; for trying things out)")
    p.add_argument("--checkpoint", type=Path, help="load weights from a local .safetensors / torch file")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--ln-mode", choices=("centered", "anchor"), default="centered")
    p.add_argument("--bias-mode", choices=("explicit", "anchor", "split"), default="explicit")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    g = p.add_argument_group("dataset runs (--out STORE)")
    g.add_argument("--kind", choices=("folder", "imagenet-val", "waterbirds", "imagenet-seg"), help="default: detected")
    g.add_argument("--split", choices=("train", "val", "test"), help="Waterbirds split (default: all)")
    g.add_argument("--store-dtype", choices=("float16", "float32"), default="float16")
    g.add_argument("--num-workers", type=int, default=0, help="image decoding processes (default 0)")
    g.add_argument("--max-chunks", type=int, help="stop after N chunks (resume later with the same command)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Image files: :func:`vitdecomp.store.image_run.decompose_images`; ``--out STORE``: :func:`run_dataset`."""
    from ..store.image_run import decompose_images

    if args.out is not None and args.out.suffix.lower() not in (".safetensors",):
        return run_dataset(args)
    result = decompose_images(
        args.model, args.inputs, granularity=args.granularity, start_layer=args.start_layer, ln_mode=args.ln_mode,
        bias_mode=args.bias_mode, dtype=args.dtype, batch_size=args.batch_size, top=args.top,
        progress=not (args.json or getattr(args, "quiet", False)), pretrained=not args.no_pretrained,
        checkpoint=args.checkpoint, device=args.device)
    report = result.to_json()
    if args.out is not None:
        report["saved"] = str(result.stack.save(args.out))
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        sys.stdout.write(_format(report))
    return 0


def run_dataset(args: argparse.Namespace) -> int:
    """``--out STORE``: stream one dataset into a store (this rank's share under torchrun)."""
    import torch

    import vitdecomp as vd

    from ..store.dataset_run import decompose_dataset
    from ..store.distributed import dist_info, init_process_group, rank_device, shutdown
    from ..errors import InputError

    if len(args.inputs) != 1:
        raise InputError("with --out STORE give exactly one dataset (a folder, a Waterbirds root or a .mat file)")
    if args.dtype == "float64" and args.store_dtype == "float16":
        raise InputError("--dtype float64 with --store-dtype float16 would discard the precision; use float32")
    info = dist_info()
    device = rank_device(args.device, info)
    joined = init_process_group(device)
    try:
        model = vd.load(args.model, pretrained=not args.no_pretrained, checkpoint=args.checkpoint, device=device)
        if args.dtype == "float64":
            model.module.to(torch.float64)
        result = decompose_dataset(
            model, args.inputs[0], args.out, batch_size=args.batch_size, granularity=args.granularity,
            start_layer=args.start_layer, ln_mode=args.ln_mode, bias_mode=args.bias_mode,
            store_dtype=args.store_dtype, kind=args.kind, split=args.split, num_workers=args.num_workers,
            progress=not (args.json or args.quiet),
            max_chunks=args.max_chunks,
        )
    except KeyboardInterrupt:
        log.error("%s", interrupted_message(args.out))
        return EXIT_INTERRUPTED
    finally:
        if joined:
            shutdown()
    manifest = result.manifest
    summary = result.summary(rank=info.rank, world_size=info.world_size)
    if info.rank == 0:
        if args.json:
            sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        else:
            sys.stdout.write(_format_dataset(summary, manifest))
    return 0


def interrupted_message(out: Path) -> str:
    """One line for a dataset run ended by Ctrl-C: the chunks kept in ``out`` and how to resume.

    A chunk is kept once its done record is written (the last step of writing it), so the count
    read back from the store is exactly what a rerun will not recompute.
    """
    from ..store.component_store import ComponentStore

    try:
        store = ComponentStore.open(out)
        done, total = len(store.done_chunks()), store.n_chunks
    except Exception:  # noqa: BLE001 - interrupted before the store existed (or while creating it)
        return f"interrupted: nothing kept in {out}; run the same command again to start"
    return (f"interrupted: {done} of {total} chunks kept in {out}; run the same command again to resume "
            f"({total - done} to go)")


def _format_dataset(summary: dict[str, Any], manifest: dict[str, Any]) -> str:
    c, e, r = summary["counts"], summary["error"], summary["this_run"]
    state = "complete" if summary["complete"] else f"incomplete ({len(manifest['pending_chunks'])} chunks pending; run again to resume)"
    lines = [
        f"store {summary['store']}: {state}",
        f"  {c['valid']} images decomposed, {c['skipped']} skipped, {c['chunks_done']}/{c['chunks']} chunks",
        f"  this run: {r['images']} images in {r['seconds']:.1f} s ({r['images_per_s']:.1f} img/s)"
        + (f" on {summary['world_size']} ranks" if summary["world_size"] > 1 else ""),
    ]
    if e["max"] is not None:
        lines.append(f"  Σ components = model output: max rel. error {e['max']:.1e} (stored dtype: {e['stored_max']:.1e})")
    for item in manifest["skipped"][:10]:
        lines.append(f"  skipped {item['id']}: {item['reason']}")
    if len(manifest["skipped"]) > 10:
        lines.append(f"  ... {len(manifest['skipped']) - 10} more skipped (see manifest.json)")
    return "\n".join(lines) + "\n"


def _format(report: dict[str, Any]) -> str:
    lines = [f"model {report['model']} ({report['weights']}), {report['components']} components"]
    if report["weights"] == "random-init":
        lines.append("note: random weights (--no-pretrained): the numbers show the mechanics, not meaning")
    for row in report["rows"]:
        image = report["images"][row["image"]] if row["image"] is not None else f"mean over {len(report['images'])} images"
        lines.append(f"\n{image}")
        lines.append(f"  {'component':<14} {'|c|':>10} {'share of z':>11}")
        for item in row["top"]:
            lines.append(f"  {item['component']:<14} {item['norm']:>10.4f} {item['share']:>11.1%}")
        if "predicted_class" in row:
            lines.append(f"  predicted class {row['predicted_class']} (logit {row['logit']:.3f}); contributions:")
            for item in row["logit_top"]:
                lines.append(f"    {item['component']:<14} {item['contribution']:>+10.4f}")
    if report["skipped"]:
        lines.append(f"\nskipped {len(report['skipped'])} file(s):")
        lines.extend(f"  {path}: {reason}" for path, reason in report["skipped"].items())
    lines.append(
        f"\nΣ components = model output: max rel. error {report['error']:.1e} (tolerance {report['tolerance']:.0e})"
    )
    if "saved" in report:
        lines.append(f"stack saved to {report['saved']}")
    return "\n".join(lines) + "\n"
