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
    p.set_defaults(run=run)


def _feature_texts(spec: str) -> dict[str, list[str]]:
    from ..errors import InputError

    if spec == "default":
        from ..interpret.text.pools import feature_sets

        return feature_sets()
    if spec == "synth":
        from ..synth.generator import SCENE_FACTORS, VOCABULARY, describe

        return {f: [describe(f, v) for v in VOCABULARY[f]] for f in SCENE_FACTORS}
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"--features {spec!r}: not 'default', 'synth' or a JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"--features {path}: cannot read JSON ({exc})") from exc
    if not isinstance(data, dict) or not data or not all(
            isinstance(v, list) and v and all(isinstance(t, str) for t in v) for v in data.values()):
        raise InputError(f"--features {path}: expected a JSON object {{feature: [text, ...]}}")
    return {str(k): list(v) for k, v in data.items()}


def _score_table(args: argparse.Namespace, store: Any, encoder: Any) -> tuple[Any, dict[str, Any]]:
    """The feature score table (read from --scores or computed in one pass) and what it was made from."""
    import numpy as np

    from ..errors import InputError
    from ..interpret.score import ScoreMoments, ScoreTable, feature_basis, score_table
    from ..interpret.text import embed_templates

    if args.scores is not None:
        try:
            data = json.loads(args.scores.read_text(encoding="utf-8"))
            if isinstance(data, dict) and "tables" in data:  # score.json of `vitdecomp score`
                data = data["tables"].get("corr") or next(iter(data["tables"].values()))
            table = ScoreTable.from_json(data)
        except (OSError, ValueError, KeyError, StopIteration, TypeError) as exc:
            raise InputError(f"--scores {args.scores}: cannot read a ScoreTable or a `vitdecomp score` "
                             f"score.json ({exc})") from exc
        if list(table.labels) != list(store.labels):
            raise InputError(f"--scores {args.scores} was computed for other components than the store's")
        return table, {"source": str(args.scores)}
    sets = _feature_texts(args.features)
    if encoder is None:
        raise InputError("scoring features needs the model's text tower")
    bases = {}
    for name, texts in sets.items():
        emb = embed_templates(encoder, texts, args.templates).double().numpy()
        if emb.shape[1] != store.comp_shape[-1]:
            raise InputError(f"text width {emb.shape[1]} != store width {store.comp_shape[-1]}: feature scores "
                             "need a store in the text space (a CLIP model or an aligned store), or pass --scores")
        bases[name] = feature_basis(emb)
    log.info("scoring %d features over %s (one pass)", len(bases), store.path)
    moments = ScoreMoments.from_store(store, directions=np.concatenate(list(bases.values())))
    table = score_table(moments, bases, kind="corr")
    return table, {"source": "computed", "features": sets, "templates": args.templates, "n_items": moments.count}


def _groups(args: argparse.Namespace, store: Any, encoder: Any, by: str) -> tuple[list[Any], dict[str, Any]]:
    from ..errors import InputError
    from ..apps.retrieve import ComponentGroup, feature_groups, full_group

    groups: list[Any] = []
    info: dict[str, Any] = {}
    if args.components:
        comps = [c.strip() for c in args.components.split(",") if c.strip()]
        unknown = [c for c in comps if c not in store.labels]
        if unknown:
            raise InputError(f"--components: no {unknown} in the store (e.g. {', '.join(store.labels[:5])})")
        groups.append(ComponentGroup.of(comps))
    elif args.feature:
        table, info = _score_table(args, store, encoder)
        if args.feature not in table.features:
            raise InputError(f"--feature {args.feature!r} is not one of {list(table.features)}")
        if by == "selectivity" and len(table.features) < 2:
            raise InputError("selectivity needs at least two features; pass --by score")
        groups += feature_groups(table, args.feature, size=args.top, n_groups=args.groups,
                                 by=by)  # type: ignore[arg-type]
        info = {**info, "feature": args.feature, "by": by, "kind": table.kind, "scores": table.to_json()}
    if not args.no_full or not groups:
        groups.append(full_group())
    return groups, info


def _item(gi: Any, arg: str, roots: list[tuple[str, Path]] | None = None) -> int:
    """Index position of an --image argument: an item id, a store row number, or an image path.

    A path is turned into item ids (its path relative to each dataset root, POSIX style): an
    absolute path (or one relative to the current folder) under a root, or a path relative to a
    root. ``roots`` are ``(what, folder)`` pairs (--images, the root recorded in the store).

    Raises:
        InputError: one line listing everything tried.
    """
    import os

    from ..errors import InputError

    tried: list[str] = [f"item id {arg!r}"]
    try:
        return int(gi.position(arg))
    except InputError:
        pass
    if arg.isdigit():
        tried.append(f"row {arg}")
        try:
            return int(gi.position(int(arg)))
        except InputError:
            pass
    path = Path(arg).expanduser()
    here = Path(os.path.abspath(path))
    for what, root in roots or []:
        candidates = []
        for base in dict.fromkeys((os.path.abspath(root), os.path.realpath(root))):
            for full in dict.fromkeys((str(here), os.path.realpath(here))):
                rel = os.path.relpath(full, base)
                if not rel.startswith(".."):
                    candidates.append(Path(rel).as_posix())
        if not path.is_absolute():
            candidates.append(path.as_posix())
        for item_id in dict.fromkeys(candidates):
            if item_id in (arg, "."):
                continue
            tried.append(f"item id {item_id!r} ({root / item_id} under {what})")
            try:
                return int(gi.position(item_id))
            except InputError:
                pass
    hint = "" if roots else "; pass --images DATASET_ROOT to look image paths up"
    extra = "" if roots or not here.is_file() else f" ({here} exists but the store records no dataset root)"
    raise InputError(f"--image {arg}: no stored item{extra}; tried {', '.join(tried)}{hint}")


def _image_roots(args: argparse.Namespace, store: Any) -> list[tuple[str, Path]]:
    """Dataset roots an --image path may be relative to: --images, then the root the store records."""
    from ..store.dataset_run import dataset_root

    roots: list[tuple[str, Path]] = []
    if args.images is not None:
        roots.append(("--images", Path(args.images)))
    recorded = dataset_root(store)
    if recorded is not None and all(recorded != r for _, r in roots):
        roots.append(("the store's dataset root", recorded))
    return roots


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..store.provenance import run_record, write_json
    from ..apps.retrieve import build_index, by_image, by_text
    from ..store.component_store import ComponentStore

    if args.k < 1 or args.top < 1 or args.groups < 1:
        raise InputError("--k, --top and --groups must be at least 1")
    if args.images is not None and args.out is None:
        raise InputError("--images draws grid.png into --out; pass --out DIR")
    store = ComponentStore.open(args.store)
    if not store.done_chunks():
        raise InputError(f"{args.store} has no finished chunks yet")
    mode = "text" if args.text else "image"
    by = args.by or ("score" if mode == "text" else "selectivity")
    needs_text = mode == "text" or (args.feature is not None and args.scores is None)
    align = align_rec = None
    if args.align is not None:
        from ..apps.retrieve import alignment_record

        align, align_rec = alignment_record(args.align)
        if args.feature is not None and args.scores is None:
            raise InputError("--feature with --align ranks components by their scores in the CLIP space: pass "
                             "--scores (score.json of `vitdecomp score --align`), or --components")
    encoder = None
    if needs_text and align is not None:
        encoder = _aligned_text_tower(args, align, align_rec)
    elif needs_text:
        from ._common import load_store_model, pretrained_choice, text_tower

        encoder = text_tower(load_store_model(store, args.model, args.checkpoint, pretrained=pretrained_choice(args)),
                             hint="text queries need a CLIP store (or --align DIR with the maps of `vitdecomp "
                             "align`); for image queries pass --components, or --scores from `vitdecomp score --align`")
    groups, feature_info = _groups(args, store, encoder, by)
    index = build_index(store, groups, args.index_dir, backend=args.backend, rebuild=args.rebuild,
                        progress=not getattr(args, "quiet", False),
                        align=args.align)  # the path: the index records the file and its sha256
    results: list[dict[str, Any]] = []
    hits_by_group = {}
    if mode == "text":
        from ..interpret.text import embed_templates

        emb = embed_templates(encoder, args.text, args.templates).numpy()
        for g in groups:
            hits_by_group[g.key] = by_text(index[g], emb, args.k, texts=args.text)
        queries = list(args.text)
    else:
        first = index[groups[0]]
        roots = _image_roots(args, store)
        queries = [first.ids[_item(first, a, roots)] for a in args.image]
        for g in groups:
            hits_by_group[g.key] = by_image(index[g], queries, args.k)
    for qi, query in enumerate(queries):
        per_group = {}
        for g in groups:
            h = hits_by_group[g.key]
            per_group[g.name] = [{"rank": r + 1, "row": int(h.rows[qi, r]), "id": h.ids[qi][r],
                                  "score": float(h.scores[qi, r])} for r in range(h.rows.shape[1])]
        results.append({"query": query, "kind": mode, "results": per_group})
    index_info = {"path": str(index.path), "n": len(index), "backend": args.backend,
                  "groups": {g.name: g.key for g in groups}, "alignment": index.alignment}
    files = {"scores": args.scores} if args.scores is not None else {}
    if align_rec is not None and align_rec["file"] is not None:
        files["align"] = Path(align_rec["file"])
    payload: dict[str, Any] = {
        "run": run_record("retrieve", args, store=store, files=files or None, extra={"index": index_info}),
        "store": str(args.store), "mode": mode, "k": args.k, "templates": args.templates,
        "index": index_info, "groups": [g.to_json() for g in groups], "feature": feature_info or None,
        "queries": results, "grid": None,
    }
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        if args.images is not None:
            grid_error = _write_grid(args.out / "grid.png", args.images, results, groups, mode, args.k)
            payload["grid"] = "grid.png" if grid_error is None else None
            if grid_error is not None:
                payload["grid_skipped"] = grid_error
                log.warning("grid.png not drawn: %s", grid_error)
        write_json(args.out / "results.json", payload)
    if args.json:
        from ..store.provenance import jsonable

        sys.stdout.write(json.dumps(jsonable(payload), indent=2) + "\n")
    else:
        sys.stdout.write(_format(results, groups, index_info) + "\n")
    return 0


def _aligned_text_tower(args: argparse.Namespace, align: Any, record: dict[str, Any]) -> Any:
    """The text encoder of the CLIP the maps lead into (``--model``, else the one the maps record)."""
    from ._common import load_alignment_clip, pretrained_choice, text_tower

    model = load_alignment_clip(align, args.model, checkpoint=args.checkpoint, pretrained=pretrained_choice(args))
    return text_tower(model, hint="with --align, --model must be the CLIP the maps lead into")


def _format(results: list[dict[str, Any]], groups: list[Any], index_info: dict[str, Any]) -> str:
    lines = [f"index {index_info['path']} ({index_info['n']} items, {index_info['backend']})"]
    if index_info.get("alignment"):
        rec = index_info["alignment"]
        where = rec["file"] or rec["maps_sha256"][:12]
        lines.append(f"  through CompAlign {where} into a {rec['d_clip']}-d CLIP space")
    for g in groups:
        comps = "the model's representation" if g.components is None else ", ".join(g.components)
        lines.append(f"  group {g.name}: {comps}")
    for r in results:
        lines.append(f"\n{r['kind']} query: {r['query']}")
        for name, hits in r["results"].items():
            shown = "  ".join(f"{h['id']} ({h['score']:.3f})" for h in hits[:5])
            more = f"  ... {len(hits) - 5} more" if len(hits) > 5 else ""
            lines.append(f"  {name:<12} {shown}{more}")
    return "\n".join(lines)


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
