"""``vitdecomp heatmap IMAGE... --model SPEC --text T``: where in each image components write along a direction.

Per image, the signed token map ``h_t = <y, sum_{i in I} c_{i,t}>`` (docs/method.md §6.4) of the chosen
components ``I`` along ``y`` (a text embedding, a contrast ``y1 - y2``, or a classifier's class
weight), drawn over the image at its original size (the model's resize/centre-crop undone, the
pixels it never saw greyed out), with the prefix tokens (CLS, registers) beside the map and a
colour bar. Writes ``OUT/<stem>.png`` (overlay, original size, shrunk so that its longest side is at
most ``--max-side``, default 1024 px), ``OUT/<stem>_panel.png`` (overlay, colour bar, prefix tokens, caption) and ``OUT/heatmaps.json`` (grids, prefix values and the sum
check ``sum_t h_t = <y, sum_{i in I} c_i>`` against a separate head-level decomposition).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

JSON_NAME = "heatmaps.json"
#: Default ``--max-side``: longest side of a written overlay, in pixels (:data:`vitdecomp.apps.heatmap_run.MAX_SIDE`).
MAX_SIDE = 1024


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "heatmap",
        parents=parents,
        help="token heatmaps of components along a text or class direction, over the original images",
        description=(
            "Decompose each image by head and source token, contract with a direction y (a text embedding, "
            "a text contrast y1 - y2, or a classifier's class weight) and draw the signed token map "
            "h_t = <y, sum_i c_i,t> of the chosen components over the image at its original size. Prefix "
            "tokens (CLS, registers) have no place on the image: their values are shown beside the map and "
            "written to the JSON. The tokens' values sum exactly to the components' contribution <y, sum_i c_i>; "
            "heatmaps.json reports the difference against a separate head-level decomposition."
        ),
    )
    p.add_argument("images", nargs="+", type=Path, help="image files or directories (searched recursively)")
    p.add_argument("--model", required=True, help="timm:NAME | open_clip:ARCH[:TAG] | hf:REPO_OR_PATH | synth:KIND")
    p.add_argument("--no-pretrained", action="store_true", help="random weights (offline; for trying things out)")
    p.add_argument("--checkpoint", type=Path, help="load weights from a local .safetensors / torch file")
    d = p.add_argument_group("direction (one of)")
    d.add_argument("--text", help="y = the unit text embedding of this text (a CLIP, or any model with --align)")
    d.add_argument("--class-index", type=int, help="y = the classifier's weight row of this class (a classifier head)")
    d.add_argument("--contrast", help="with --text: map along y(text) - y(contrast)")
    d.add_argument("--contrast-index", type=int, help="with --class-index: map along W[class] - W[contrast]")
    d.add_argument("--templates", default="plain",
                   help="template set (plain, photo, synth) or one '{}' template for the texts (default plain)")
    d.add_argument("--align", type=Path,
                   help="CompAlign maps (a .safetensors file, or a folder holding align.safetensors) to read a "
                   "non-CLIP model with a CLIP's text; the CLIP comes from --clip or the alignment's record")
    d.add_argument("--clip", help="model spec of the CLIP whose text tower embeds --text for --align")
    c = p.add_argument_group("components (default: all, so the map sums to the model's own <y, z>)")
    c.add_argument("--component", action="extend", nargs="+", default=None, metavar="LABEL",
                   help="component labels such as L11.H03 (repeatable)")
    c.add_argument("--layers", help="every component of these blocks: 9-11, 9,10,11 or 11")
    c.add_argument("--feature", help="the --top components of this feature in --score")
    c.add_argument("--score", type=Path, help="a score table JSON (vitdecomp score) for --feature")
    c.add_argument("--top", type=int, default=5, help="components taken with --feature (default 5)")
    c.add_argument("--by", choices=("score", "selectivity"), default="score", help="rank --feature by (default score)")
    c.add_argument("--variant", help="which table of score.json (default corr, else its first)")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=Path("heatmaps"), help="output folder (default ./heatmaps)")
    o.add_argument("--alpha", type=float, default=0.5, help="weight of the colour map over the image (default 0.5)")
    o.add_argument("--vmax", type=float, help="value drawn at full colour (default: max |h| of each image's map)")
    o.add_argument("--normalize", action="store_true", help="divide by ||z|| (with unit texts: cosine contributions)")
    o.add_argument("--max-side", type=int, default=MAX_SIDE, metavar="PX",
                   help=f"longest side of the written overlays in pixels: larger images are shrunk before drawing "
                   f"(bounds memory and file size; the map's geometry is unchanged); 0: the original size "
                   f"(default {MAX_SIDE})"),
    p.add_argument("--start-layer", type=int, default=None,
                   help="first decomposed block; earlier ones form one 'rest' row (default 0; for Swin the first "
                   "block of the last stage, the only stage whose heads split over one token grid)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--kinds", default="input",
                   help="components that may be chosen: input (heads, MLPs, neurons...: the default), all, or a comma "
                   "list such as input,embed (embed/rest/bias rows carry no input-specific computation)")
    p.set_defaults(run=run)


# ----------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    """The maps are :func:`vitdecomp.apps.heatmap_run.heatmaps_for_images`; this writes heatmaps.json."""
    from ..apps.heatmap_run import heatmaps_for_images
    from ..store.provenance import run_record, write_json

    result = heatmaps_for_images(
        args.model, args.images, text=args.text, contrast=args.contrast, class_index=args.class_index,
        contrast_index=args.contrast_index, templates=args.templates, align=args.align, clip=args.clip,
        components=args.component, layers=args.layers, feature=args.feature, score=args.score, top=args.top,
        by=args.by, variant=args.variant, start_layer=args.start_layer, normalize=args.normalize,
        batch_size=args.batch_size, dtype=args.dtype, out=args.out, alpha=args.alpha, vmax=args.vmax,
        max_side=args.max_side, pretrained=not args.no_pretrained, checkpoint=args.checkpoint, device=args.device,
        progress=not getattr(args, "quiet", False), kinds=args.kinds)
    args.start_layer = result.start_layer  # the run record shows the block the maps start at
    payload = {
        "run": run_record("heatmap", args, files={f"image{i}": p for i, p in enumerate(result.paths)},
                          extra={"skipped": result.skipped}),
        **result.to_json(),
    }
    write_json(args.out / JSON_NAME, payload)
    for rec in result.images:
        check = rec["sum_check"]
        sys.stdout.write(
            f"{rec['path']}: grid {rec['grid'][0]}x{rec['grid'][1]}, Σ_t h_t = {check['sum_tokens']:+.6g} "
            f"(<y, Σ c_i> = {check['expected']:+.6g}, diff {check['difference']:.1e}) "
            f"-> {args.out / rec['overlay']}\n")
    for path, reason in result.skipped.items():
        sys.stdout.write(f"skipped {path}: {reason}\n")
    sys.stdout.write(f"wrote {args.out / JSON_NAME}\n")
    return 0
