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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ..interpret.align import CompAlign
    from ..core.model import Model
    from ..core.stack import ComponentStack

JSON_NAME = "heatmaps.json"
#: Default ``--max-side``: longest side of a written overlay, in pixels.
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
    p.set_defaults(run=run)


# ----------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    import torch

    from ..data.images import find_images, load_image, record_skip
    from ..errors import InputError, UnsupportedModelError
    from ..apps.heatmap import crop_box, default_start_layer, fit_overlay, render_original, render_panel, token_heatmap
    from ..core.loading import load
    from ..store.provenance import run_record, write_json

    _check_args(args)
    paths = find_images(args.images)
    if not paths:
        raise InputError(f"no image files found in {' '.join(map(str, args.images))}")
    model = load(args.model, pretrained=not args.no_pretrained, checkpoint=args.checkpoint, device=args.device)
    if args.start_layer is None:
        args.start_layer = default_start_layer(model)
    direction = _direction(args, model)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32

    images: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    chosen: list[str] | None = None
    token_types: list[str] | None = None
    n_rows = 0
    used_stems: set[str] = set()
    batches = [paths[i:i + args.batch_size] for i in range(0, len(paths), args.batch_size)]
    for batch_paths in _progress(batches, len(paths)):
        loaded: list[tuple[Path, Any, Any, Any, torch.Tensor]] = []  # path, shrunk image, its box, box, input
        for path in batch_paths:
            try:
                image = load_image(path)
            except InputError as exc:
                record_skip(skipped, path, exc)
                continue
            box = crop_box(model, image.size)
            tensor = model.transform(image)
            if (box.input_height, box.input_width) != tuple(tensor.shape[-2:]):
                raise UnsupportedModelError(
                    f"{model.name}: cannot map the model input back onto the image: its preprocessing gives "
                    f"{tuple(tensor.shape[-2:])} but its resize/crop steps give {(box.input_height, box.input_width)}")
            # only the (shrunk) copy to draw on is kept: memory stays bounded for a large original
            small, small_box = fit_overlay(image, box, args.max_side or None)
            del image
            loaded.append((path, small, small_box, box, tensor))
        if not loaded:
            continue
        pixels = torch.stack([t for *_, t in loaded]).to(device=model.device, dtype=model.dtype)
        tokens, heads = _stacks(model, pixels, direction, args, dtype)
        if tokens.tokens is None or tokens.tokens.grid is None:
            raise UnsupportedModelError(
                f"{model.name}: its token decomposition has no patch grid, so there is no per-token map to draw")
        if chosen is None:
            chosen = _components(args, tokens)
            token_types, n_rows = list(tokens.tokens.types), tokens.n_components
        contrast = 1 if direction["k"] == 2 else None
        heat = token_heatmap(tokens, 0, contrast=contrast, components=chosen)
        weights = torch.tensor([1.0, -1.0] if contrast is not None else [1.0], dtype=torch.float64)
        expected = heads.take(chosen).values.to(torch.float64).sum(0).cpu() @ weights  # [batch]
        model_total = heads.reference.to(torch.float64).cpu() @ weights
        for b, (path, small, small_box, box, _) in enumerate(loaded):
            patch = heat.patch[b].to(torch.float64).cpu()
            prefix = {name: float(v[b]) for name, v in heat.prefix.items()}
            vmax = float(args.vmax) if args.vmax is not None else float(patch.abs().max())
            stem = _unique_stem(path.stem, used_stems)
            overlay = render_original(small, patch, small_box, args.out / f"{stem}.png", alpha=args.alpha, vmax=vmax)
            which = "all components" if len(chosen) == tokens.n_components else f"{len(chosen)} components"
            render_panel(overlay, vmax=vmax, prefix=prefix, title=f"{direction['caption']} · {which} · {path.name}",
                         path=args.out / f"{stem}_panel.png")
            record = _image_record(path, stem, (box.image_width, box.image_height), box, patch, prefix, vmax,
                                   float(expected[b]), float(model_total[b]), direction)
            record["overlay_size"] = list(small.size)
            images.append(record)
    if not images:
        raise InputError(f"none of the {len(paths)} images could be read: {skipped}")
    assert chosen is not None
    payload = {
        "run": run_record("heatmap", args, files={f"image{i}": p for i, p in enumerate(paths)},
                          extra={"skipped": skipped}),
        "model": model.name,
        "weights": model.weights,
        "family": model.family,
        "direction": {k: v for k, v in direction.items() if k not in ("rows", "columns", "align", "k")},
        "components": chosen,
        "n_components": len(chosen),
        "all_components": len(chosen) == n_rows,
        "start_layer": args.start_layer,
        "normalize": args.normalize,
        "token_types": token_types,
        "images": images,
        "skipped": skipped,
    }
    write_json(args.out / JSON_NAME, payload)
    for rec in images:
        check = rec["sum_check"]
        sys.stdout.write(
            f"{rec['path']}: grid {rec['grid'][0]}x{rec['grid'][1]}, Σ_t h_t = {check['sum_tokens']:+.6g} "
            f"(<y, Σ c_i> = {check['expected']:+.6g}, diff {check['difference']:.1e}) "
            f"-> {args.out / rec['overlay']}\n")
    for path, reason in skipped.items():
        sys.stdout.write(f"skipped {path}: {reason}\n")
    sys.stdout.write(f"wrote {args.out / JSON_NAME}\n")
    return 0


def _progress(batches: list[Any], n_images: int) -> Any:
    from tqdm import tqdm

    return tqdm(batches, desc="heatmap", unit="batch", disable=len(batches) < 2 or n_images < 2)


def _check_args(args: argparse.Namespace) -> None:
    from ..errors import InputError

    if (args.text is None) == (args.class_index is None):
        raise InputError("give exactly one direction: --text TEXT (a CLIP, or any model with --align) "
                         "or --class-index N (a classifier)")
    if args.contrast is not None and args.text is None:
        raise InputError("--contrast goes with --text (use --contrast-index with --class-index)")
    if args.contrast_index is not None and args.class_index is None:
        raise InputError("--contrast-index goes with --class-index")
    if args.align is not None and args.text is None:
        raise InputError("--align reads the model with a CLIP's text: it goes with --text")
    if args.clip is not None and args.align is None:
        raise InputError("--clip names the CLIP of an alignment: it goes with --align")
    picks = sum(x is not None for x in (args.component, args.layers, args.feature))
    if picks > 1:
        raise InputError("choose components one way: --component, --layers or --feature")
    if args.feature is not None and args.score is None:
        raise InputError("--feature needs --score SCORE.json (a score table from `vitdecomp score`)")
    if args.score is not None and args.feature is None:
        raise InputError("--score goes with --feature NAME")
    if args.top < 1:
        raise InputError("--top must be at least 1")
    if args.batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    if not 0.0 <= args.alpha <= 1.0:
        raise InputError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.vmax is not None and not args.vmax > 0:
        raise InputError(f"--vmax must be positive, got {args.vmax}")
    if args.max_side < 0:
        raise InputError(f"--max-side must be a number of pixels (0: the original size), got {args.max_side}")


# ----------------------------------------------------------------------------- direction
def _direction(args: argparse.Namespace, model: Model) -> dict[str, Any]:
    """The direction(s) as rows for ``decompose(directions=...)`` plus what to record.

    Keys: ``rows [r, d_model]`` (float64), ``columns`` (per-component column lists for aligned
    models, else None), ``k`` (1, or 2 for a contrast), ``caption``, and JSON-able facts.
    """
    import torch

    from ..errors import InputError
    from ..apps.heatmap import aligned_directions
    from ..interpret.text import embed_templates, text_encoder
    from ._common import text_tower

    if args.class_index is not None:
        head = model.classifier()
        if head is None:
            raise InputError(f"{model.name} has no classifier head: --class-index needs one (use --text for a CLIP)")
        weight, bias = head
        indices = [args.class_index] + ([args.contrast_index] if args.contrast_index is not None else [])
        for i in indices:
            if not 0 <= i < weight.shape[0]:
                raise InputError(f"class index {i} is out of range: the classifier has {weight.shape[0]} classes")
        rows = weight[indices].detach().to(torch.float64).cpu()
        bias_value = [float(bias[i].detach()) for i in indices] if bias is not None else None
        caption = f"class {args.class_index}" + (f" - class {args.contrast_index}" if len(indices) == 2 else "")
        return {"kind": "class", "class_index": args.class_index, "contrast_index": args.contrast_index,
                "bias": bias_value, "rows": rows, "columns": None, "k": len(indices), "caption": caption,
                "space": "model"}

    texts = [args.text] + ([args.contrast] if args.contrast is not None else [])
    caption = f'"{args.text}"' + (f' - "{args.contrast}"' if args.contrast is not None else "")
    if args.align is None:
        encoder = text_tower(model, hint="--text needs one; pass --align DIR (CompAlign maps of this model into a "
                             "CLIP space, written by `vitdecomp align`) or use --class-index for a classifier")
        embeddings = embed_templates(encoder, texts, args.templates).to(torch.float64)
        return {"kind": "text", "text": args.text, "contrast": args.contrast, "templates": args.templates,
                "rows": embeddings, "columns": None, "k": len(texts), "caption": caption, "space": "model"}

    from ._common import load_alignment_clip

    align, clip_spec, align_file = _load_alignment(args, model)
    clip = load_alignment_clip(align, args.clip, device=args.device)  # the recorded CLIP, offline-first
    embeddings = embed_templates(text_encoder(clip), texts, args.templates)
    rows, columns = aligned_directions(align, embeddings)
    return {"kind": "text", "text": args.text, "contrast": args.contrast, "templates": args.templates,
            "rows": rows, "columns": columns, "k": len(texts), "caption": caption, "space": "clip",
            "align": align, "align_file": str(align_file), "clip": clip_spec,
            "align_val_cosine": align.meta.get("val_cosine")}


def _load_alignment(args: argparse.Namespace, model: Model) -> tuple[CompAlign, str, Path]:
    """(maps, CLIP spec, file) from ``--align`` (see :func:`~vitdecomp.interpret.align.find_alignment`) and
    ``--clip`` (default: the CLIP recorded in the maps by ``vitdecomp align``)."""
    from ..interpret.align import CompAlign
    from ..errors import InputError
    from ..interpret.align import find_alignment

    file = find_alignment(args.align)
    align = CompAlign.load(file)
    fitted_on = align.meta.get("model")
    if fitted_on is not None and fitted_on != model.name:
        raise InputError(f"{file} maps the components of {fitted_on}, not of --model {model.name}")
    spec = args.clip or align.meta.get("clip_model") or align.meta.get("clip")
    if not isinstance(spec, str):
        raise InputError(f"{file} does not record which CLIP its maps lead into: pass --clip SPEC")
    return align, spec, file


# ----------------------------------------------------------------------------- stacks
def _stacks(model: Model, pixels: torch.Tensor, direction: dict[str, Any], args: argparse.Namespace,
            dtype: torch.dtype) -> tuple[ComponentStack, ComponentStack]:
    """The token stack and the head stack, both contracted with the direction rows first
    (``[comp, batch, token, k]`` and ``[comp, batch, k]``, column 0 = y, column 1 = the contrast)."""
    import vitdecomp as vd

    from ..errors import InputError
    from ..apps.heatmap import take_columns

    rows = direction["rows"].to(device=pixels.device, dtype=dtype)
    kwargs = dict(start_layer=args.start_layer, directions=rows, normalize=args.normalize, dtype=dtype)
    tokens = vd.decompose(model, pixels, granularity="head_token", **kwargs).to("cpu")
    heads = vd.decompose(model, pixels, granularity="head", **kwargs).to("cpu")
    align = direction.get("align")
    if align is not None:
        if tokens.n_components != align.n_components or (
                align.labels is not None and tuple(tokens.names) != tuple(align.labels)):
            raise InputError(
                f"the alignment was fitted for {align.n_components} components"
                + (f" ({', '.join(align.labels[:3])}, ...)" if align.labels else "")
                + f", but this decomposition has {tokens.n_components} ({', '.join(tokens.names[:3])}, ...): "
                "use the model, granularity (head) and --start-layer the maps were fitted on")
        tokens = take_columns(tokens, direction["columns"])
        heads = take_columns(heads, direction["columns"])
    return tokens, heads


def _components(args: argparse.Namespace, stack: ComponentStack) -> list[str]:
    """Canonical labels of the chosen rows (all rows by default)."""
    from ..errors import InputError
    from ..core.labels import parse_label

    names = stack.names
    if args.component:
        out = []
        for raw in args.component:
            try:
                name = str(parse_label(raw))
            except (KeyError, ValueError) as exc:
                raise InputError(f"--component {raw!r} is not a component label ({exc})") from None
            if name not in names:
                raise InputError(f"--component {raw!r}: this model has no such component; its labels look like "
                                 f"{', '.join(names[:4])} ... {names[-1]} ({len(names)} in all)")
            out.append(name)
        return list(dict.fromkeys(out))
    if args.layers is not None:
        wanted = _parse_layers(args.layers)
        present = sorted({lab.layer for lab in stack.labels if lab.layer is not None})
        missing = sorted(wanted - set(present))
        if missing:
            raise InputError(f"--layers {args.layers}: no block {missing} in this decomposition "
                             f"(blocks {present[0]}..{present[-1]})" if present else "this decomposition has no blocks")
        return [str(lab) for lab in stack.labels if lab.layer in wanted]
    if args.feature is not None:
        table = _score_table(args.score, args.variant)
        if args.feature not in table.features:
            raise InputError(f"--feature {args.feature!r} is not in {args.score}; it has {list(table.features)}")
        top = [label for label, _ in table.top(args.feature, args.top, by=args.by)]
        missing = [t for t in top if t not in names]
        if missing:
            raise InputError(f"{args.score} ranks components this decomposition does not have ({missing[:3]}): "
                             "was it scored on this model with the same --start-layer?")
        return top
    return list(names)


def _parse_layers(text: str) -> set[int]:
    from ..errors import InputError

    out: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                a, b = int(lo), int(hi)
                if b < a:
                    raise ValueError
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
    except ValueError:
        raise InputError(f"--layers {text!r}: give blocks as 9-11, 9,10,11 or 11 (counted from 0)") from None
    if not out or min(out) < 0:
        raise InputError(f"--layers {text!r}: give blocks as 9-11, 9,10,11 or 11 (counted from 0)")
    return out


def _score_table(path: Path, variant: str | None) -> Any:
    """A :class:`~vitdecomp.interpret.score.ScoreTable` from ``vitdecomp score``'s score.json (``tables[variant]``,
    default ``corr`` or the first) or from a file holding one table."""
    import json

    from ..errors import InputError
    from ..interpret.score import ScoreTable

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"--score {path}: cannot read it ({exc})") from None
    except ValueError as exc:
        raise InputError(f"--score {path}: not JSON ({exc})") from None
    tables = data.get("tables") if isinstance(data, dict) else None
    if isinstance(tables, dict) and tables:
        if variant is None:
            variant = "corr" if "corr" in tables else next(iter(tables))
        if variant not in tables:
            raise InputError(f"--score {path} has no {variant!r} table; it has {sorted(tables)}")
        return ScoreTable.from_json(tables[variant])
    if isinstance(data, dict) and {"labels", "features", "scores"} <= set(data):
        return ScoreTable.from_json(data)
    raise InputError(f"--score {path} holds no score table (write one with `vitdecomp score STORE FEATURE --out DIR`)")


# ----------------------------------------------------------------------------- output
def _unique_stem(stem: str, used: set[str]) -> str:
    name, k = stem, 1
    while name in used:
        name, k = f"{stem}-{k}", k + 1
    used.add(name)
    return name


def _image_record(path: Path, stem: str, size: tuple[int, int], box: Any, patch: torch.Tensor,
                  prefix: dict[str, float], vmax: float, expected: float, model_total: float,
                  direction: dict[str, Any]) -> dict[str, Any]:
    """One image's entry of heatmaps.json."""
    sum_patch = float(patch.sum())
    sum_prefix = float(sum(prefix.values()))
    total = sum_patch + sum_prefix
    mass = float(patch.abs().sum()) + sum(abs(v) for v in prefix.values()) + abs(expected)
    diff = total - expected
    record: dict[str, Any] = {
        "path": str(path),
        "overlay": f"{stem}.png",
        "panel": f"{stem}_panel.png",
        "original_size": list(size),
        "crop_box": box.to_json(),
        "grid": list(patch.shape),
        "values": patch.tolist(),
        "prefix": prefix,
        "vmax": vmax,
        "sum_check": {
            "sum_patch": sum_patch,
            "sum_prefix": sum_prefix,
            "sum_tokens": total,
            "expected": expected,
            "difference": diff,
            "relative_difference": abs(diff) / mass if mass > 0 else 0.0,
            "what": "sum_tokens = Σ_t h_t of the token stack; expected = <y, Σ_i c_i> of the chosen components "
                    "from a separate head-level decomposition",
        },
        "model_projection": model_total,
    }
    bias = direction.get("bias")
    if bias is not None:  # the class logit (or logit difference) is <W, z> + b
        record["logit"] = model_total + (bias[0] - bias[1] if len(bias) == 2 else bias[0])
    return record
