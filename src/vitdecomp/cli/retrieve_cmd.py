"""``vitdecomp retrieve STORE``: text -> images and image -> images through a feature's components (docs/method.md §6.2-6.3)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from pathlib import Path
from typing import Any

from ._common import add_model_arguments

log = logging.getLogger(__name__)

_EPILOG = """\
examples:
  vitdecomp retrieve clip.zarr --text "a red object on water" --feature colour --features synth --k 8 \\
      --images data/train --out out/red
  vitdecomp retrieve clip.zarr --image train/red/000012.png --feature colour --features synth --out out/q12
  vitdecomp retrieve clip.zarr --image train/red/000012.png --components L03.H00,L02.H01
  vitdecomp retrieve clip.zarr --image /data/train/red/000012.png --components L03.H00  # a path works too
  vitdecomp retrieve vit.zarr --align out/align --text "a red object" --scores out/score/score.json \
      --feature colour    # a non-CLIP store, through its fitted CompAlign (text tower: the aligned CLIP)
"""


def _wrap(text: str) -> str:
    return "\n".join(textwrap.wrap(text, 100))


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "retrieve",
        parents=parents,
        help="nearest images to a text or an image through a feature's components",
        description=_wrap("Ranks the images of STORE by the cosine of a component group's summed contribution "
        "with a text embedding (--text, docs/method.md §6.2) or with the same group of a query image (--image, §6.3; "
        "the query itself is excluded), next to the full representation for comparison. The group is the "
        "top --top components of --feature (by its correlation score for text queries, its selectivity for "
        "image queries) or an explicit --components list. Per-group float16 indexes (faiss, or an exact numpy "
        "brute force) are built once in STORE/retrieval (or --index-dir) and reused. With --align (a non-CLIP "
        "store and the maps of `vitdecomp align`), every component is mapped into the CLIP space before the "
        "groups are summed, and texts are embedded by the CLIP the maps lead into."),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("store", type=Path, help="a store written by `vitdecomp decompose ... --out STORE`")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", action="append", metavar="TEXT", help="a text query (repeatable)")
    q.add_argument("--image", action="append", metavar="ID|PATH",
                   help="a stored item id, a row number, or an image file of the dataset (absolute, or relative to "
                   "the current folder, --images or the dataset root the store records) (repeatable)")
    g = p.add_argument_group("component group")
    w = g.add_mutually_exclusive_group()
    w.add_argument("--feature", help="the feature whose top components form the group (a name of --features)")
    w.add_argument("--components", help="explicit comma-separated components, e.g. L03.H01,L02.H00")
    g.add_argument("--features", default="default",
                   help="feature texts: 'default' (docs/method.md §4 sets), 'synth' (the synthetic world's factors) or "
                   "a JSON file {name: [texts]} (default: default)")
    g.add_argument("--scores", type=Path, help="score.json of `vitdecomp score` (its corr table) or a ScoreTable "
                   "JSON to rank components with (default: one pass over STORE scores every feature of --features)")
    g.add_argument("--top", type=int, default=3, help="components per group (default 3, docs/method.md §6.2)")
    g.add_argument("--groups", type=int, default=1, help="consecutive groups of --top components (default 1)")
    g.add_argument("--by", choices=("score", "selectivity"),
                   help="rank components by score or selectivity (default: score for --text, selectivity for --image)")
    g.add_argument("--no-full", action="store_true", help="leave out the full-representation comparison")
    add_model_arguments(p, help_model="model spec of the text tower (default: the store's own model, rebuilt from its "
                        "record; with --align the CLIP recorded in the maps)")
    p.add_argument("--align", type=Path, metavar="DIR",
                   help="a CompAlign (`vitdecomp align --out DIR`, or its .safetensors): search in its CLIP space")
    p.add_argument("--templates", default="plain", help="template set for texts (plain, synth, photo; default plain)")
    p.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--images", type=Path, metavar="DATASET_ROOT", help="dataset root of the ids: draw grid.png")
    p.add_argument("--out", type=Path, help="folder for results.json (and grid.png)")
    p.add_argument("--index-dir", type=Path, help="index folder (default STORE/retrieval)")
    p.add_argument("--backend", choices=("faiss", "numpy"), default="faiss",
                   help="faiss float16 index (default) or exact numpy brute force")
    p.add_argument("--rebuild", action="store_true", help="rebuild the index folder from scratch")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    p.add_argument("--kinds", default="input",
                   help="components that may be chosen: input (heads, MLPs, neurons...: the default), all, or a comma "
                   "list such as input,embed (embed/rest/bias rows carry no input-specific computation)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Everything but the grid is :func:`vitdecomp.apps.retrieve.search_store`; this writes its result."""
    from ..apps.retrieve import search_store
    from ..errors import InputError
    from ..store.provenance import run_record, write_json
    from ._common import pretrained_choice

    if args.images is not None and args.out is None:
        raise InputError("--images draws grid.png into --out; pass --out DIR")
    features: Any = args.features
    if features == "synth":
        from ..synth.generator import factor_phrases

        features = factor_phrases()
    result = search_store(
        args.store, text=args.text, image=args.image, feature=args.feature, components=args.components,
        features=features, scores=args.scores, top=args.top, groups=args.groups, by=args.by, full=not args.no_full,
        k=args.k, templates=args.templates, align=args.align, model=args.model, checkpoint=args.checkpoint,
        pretrained=pretrained_choice(args), images_root=args.images, index_dir=args.index_dir, backend=args.backend,
        rebuild=args.rebuild, progress=not getattr(args, "quiet", False), kinds=args.kinds)
    files: dict[str, Path] = {"scores": result.scores_file} if result.scores_file is not None else {}
    if result.alignment is not None and result.alignment["file"] is not None:
        files["align"] = Path(result.alignment["file"])
    payload: dict[str, Any] = {
        "run": run_record("retrieve", args, store=result.store, files=files or None, extra={"index": result.index}),
        **result.to_json(),
    }
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        if args.images is not None:
            grid_error = _write_grid(args.out / "grid.png", args.images, result.queries, result.groups, result.mode,
                                     args.k)
            payload["grid"] = "grid.png" if grid_error is None else None
            if grid_error is not None:
                payload["grid_skipped"] = grid_error
                log.warning("grid.png not drawn: %s", grid_error)
        write_json(args.out / "results.json", payload)
    if args.json:
        from ..store.provenance import jsonable

        sys.stdout.write(json.dumps(jsonable(payload), indent=2) + "\n")
    else:
        sys.stdout.write(result.format_table() + "\n")
    return 0


def _image_reader(root: Path) -> Any:
    """``id -> PIL image``: ``root / id`` when that file exists, else the dataset reader's item of that id."""
    from ..data.images import load_image

    source: dict[str, Any] = {}

    def read(item_id: str) -> Any:
        path = root / item_id
        if path.is_file():
            return load_image(path)
        if not source:
            from ..data.datasets import open_dataset

            ds = open_dataset(root)
            source.update({"ds": ds, "index": {ds.id(i): i for i in range(len(ds))}})
        i = source["index"].get(item_id)
        if i is None:
            from ..errors import InputError

            raise InputError(f"no image {item_id!r} under {root}")
        return source["ds"].load(i)

    return read


def _text_tile(text: str, size: tuple[int, int]) -> Any:
    from PIL import Image, ImageDraw, ImageFont

    tile = Image.new("RGB", size, (245, 245, 245))
    draw = ImageDraw.Draw(tile)
    font = ImageFont.load_default()
    width = max(4, int(size[0] / 6.5))
    y = 2
    for line in textwrap.wrap(text, width)[: max(1, size[1] // 12)]:
        draw.text((2, y), line, fill=(31, 35, 40), font=font)
        y += 12
    return tile


def _write_grid(path: Path, root: Path, results: list[dict[str, Any]], groups: list[Any], mode: str,
                k: int) -> str | None:
    """One row per (query, group): the query (image, or its text) then its hits. Returns why not, or None."""
    from ..errors import InputError
    from ..report.figures import image_grid

    read = _image_reader(root)
    side = 128
    cache: dict[str, Any] = {}

    def tile(item_id: str) -> Any:
        if item_id not in cache:
            im = read(item_id).convert("RGB")
            im.thumbnail((side, side))
            cache[item_id] = im
        return cache[item_id]

    try:
        images, labels = [], []
        for r in results:
            for g in groups:
                hits = r["results"][g.name]
                row = [tile(h["id"]) for h in hits]
                size = row[0].size if row else (64, 64)
                images.append(tile(r["query"]) if mode == "image" else _text_tile(r["query"], size))
                labels.append(g.name)
                images += row + [_text_tile("", size)] * (k - len(row))
                labels += [f"{h['rank']}: {h['score']:.2f}" for h in hits] + [""] * (k - len(row))
    except (InputError, OSError) as exc:
        return str(exc)
    scale = 2 if max(max(im.size) for im in images) <= 80 else 1
    image_grid(images, columns=k + 1, scale=scale, labels=labels).save(path, format="PNG")
    return None
