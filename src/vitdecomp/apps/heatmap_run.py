"""Token heatmaps of image files in one call: what ``vitdecomp heatmap`` computes (docs/method.md §6.4).

:func:`heatmaps_for_images` reads image files, decomposes each by head and source token, and
contracts with a direction ``y``:

* ``text``: the unit template-ensembled text embedding of a CLIP (or, with ``align``, of the CLIP a
  CompAlign leads into, pulled back through the maps: ``<y, F_i c_{i,t}> = <F_iᵀ y, c_{i,t}>``);
* ``contrast``: with a text, ``y = y(text) − y(contrast)``;
* ``class_index`` (``contrast_index``): a classifier's weight row ``W[class]`` (``− W[contrast]``).

For the chosen components ``I`` (all, explicit labels, whole blocks, or a feature's top components
in a score table) the map is ``h_t = <y, Σ_{i∈I} c_{i,t}>`` (:func:`~vitdecomp.apps.heatmap.token_heatmap`):
``[gh, gw]`` over the patch grid plus one value per prefix token (CLS, registers). Since every step is
linear, ``Σ_t h_t = <y, Σ_{i∈I} c_i>`` exactly; each image's record checks it against a separate
head-level decomposition. With ``out`` the overlays (original size, shrunk to ``max_side``) and
panels are drawn there as each batch is done (memory: one batch).

Example (the shipped tiny CLIP, offline)::

    from vitdecomp.apps.heatmap_run import heatmaps_for_images
    from vitdecomp.core.shipped import shipped_path

    run = heatmaps_for_images(f"open_clip:local-dir:{shipped_path('clip')}", ["scenes/"], text="a red object")
    run.images[0]["sum_check"]["difference"]      # ~1e-7
    run.maps()[0].shape                           # (8, 8): h_t on the patch grid
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:
    import torch

    from ..core.model import Model
    from ..core.stack import ComponentStack
    from ..interpret.align import CompAlign
    from ..interpret.score import ScoreTable

__all__ = ["MAX_SIDE", "HeatmapRun", "heatmaps_for_images", "heatmap_direction", "choose_components", "parse_layers"]

log = logging.getLogger(__name__)

#: Default longest side of a drawn overlay, in pixels (``--max-side``).
MAX_SIDE = 1024


@dataclass
class HeatmapRun:
    """What :func:`heatmaps_for_images` computed (``to_json()``: ``heatmaps.json`` without its run record).

    Attributes:
        model, weights, family: the model read.
        direction: what ``y`` is (kind, texts or class indices, templates, space, alignment facts, bias).
        components: canonical labels of the summed components; ``all_components``: every row.
        start_layer: first decomposed block; ``normalize``: contributions divided by ``‖z‖``.
        token_types: the token stack's token types (``"cls"``, ``"reg"``, ``"patch"``).
        images: one record per image read: ``path``, ``overlay`` / ``panel`` (file names under ``out``,
            None when nothing was drawn), ``original_size``, ``crop_box``, ``grid``, ``values``
            (``h_t`` on the grid, ``[gh][gw]``), ``prefix`` ({name: h_t}), ``vmax``, ``sum_check``,
            ``model_projection`` (``<y, z>``, the model's own), ``logit`` (class directions), ``overlay_size``.
        skipped: ``{path: reason}`` of unreadable images.
        paths: every image file found (read or skipped), in order.
        out: the folder the figures were drawn into, or None.
    """

    model: str
    weights: str
    family: str
    direction: dict[str, Any]
    components: list[str]
    all_components: bool
    start_layer: int
    normalize: bool
    token_types: list[str]
    images: list[dict[str, Any]]
    skipped: dict[str, str] = field(default_factory=dict)
    paths: list[Path] = field(default_factory=list)
    out: Path | None = None

    def maps(self) -> list[np.ndarray]:
        """Each image's patch map ``h_t`` as a float64 array ``[gh, gw]``."""
        return [np.asarray(rec["values"], dtype=np.float64) for rec in self.images]

    def to_json(self) -> dict[str, Any]:
        """``heatmaps.json`` of ``vitdecomp heatmap`` without its run record."""
        return {
            "model": self.model,
            "weights": self.weights,
            "family": self.family,
            "direction": self.direction,
            "components": self.components,
            "n_components": len(self.components),
            "all_components": self.all_components,
            "start_layer": self.start_layer,
            "normalize": self.normalize,
            "token_types": self.token_types,
            "images": self.images,
            "skipped": self.skipped,
        }


def _check_options(*, text: str | None, contrast: str | None, class_index: int | None, contrast_index: int | None,
                   align: Any, clip: Any, components: Any, layers: Any, feature: str | None, score: Any, top: int,
                   batch_size: int, alpha: float, vmax: float | None, max_side: int | None) -> None:
    if (text is None) == (class_index is None):
        raise InputError("give exactly one direction: --text TEXT (a CLIP, or any model with --align) "
                         "or --class-index N (a classifier)")
    if contrast is not None and text is None:
        raise InputError("--contrast goes with --text (use --contrast-index with --class-index)")
    if contrast_index is not None and class_index is None:
        raise InputError("--contrast-index goes with --class-index")
    if align is not None and text is None:
        raise InputError("--align reads the model with a CLIP's text: it goes with --text")
    if clip is not None and align is None:
        raise InputError("--clip names the CLIP of an alignment: it goes with --align")
    if sum(x is not None for x in (components, layers, feature)) > 1:
        raise InputError("choose components one way: --component, --layers or --feature")
    if feature is not None and score is None:
        raise InputError("--feature needs --score SCORE.json (a score table from `vitdecomp score`)")
    if score is not None and feature is None:
        raise InputError("--score goes with --feature NAME")
    if top < 1:
        raise InputError("--top must be at least 1")
    if batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"--alpha must be in [0, 1], got {alpha}")
    if vmax is not None and not vmax > 0:
        raise InputError(f"--vmax must be positive, got {vmax}")
    if max_side is not None and max_side < 0:
        raise InputError(f"--max-side must be a number of pixels (0: the original size), got {max_side}")


def heatmaps_for_images(
    model: Model | str,
    images: str | Path | Sequence[str | Path],
    *,
    text: str | None = None,
    contrast: str | None = None,
    class_index: int | None = None,
    contrast_index: int | None = None,
    templates: str = "plain",
    align: CompAlign | str | Path | None = None,
    clip: Model | str | None = None,
    components: Sequence[str] | None = None,
    layers: str | Sequence[int] | None = None,
    feature: str | None = None,
    score: str | Path | ScoreTable | None = None,
    top: int = 5,
    by: Literal["score", "selectivity"] = "score",
    variant: str | None = None,
    start_layer: int | None = None,
    normalize: bool = False,
    batch_size: int = 8,
    dtype: str = "float32",
    out: str | Path | None = None,
    alpha: float = 0.5,
    vmax: float | None = None,
    max_side: int | None = MAX_SIDE,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
    kinds: Any = "input",
) -> HeatmapRun:
    """Token maps ``h_t = <y, Σ_{i∈I} c_{i,t}>`` of image files, with their sum check (docs/method.md §6.4).

    Each image is decomposed by head and source token with the direction rows contracted first
    (``decompose(..., granularity="head_token", directions=Y)``: ``[comp, batch, token, k]``, ``k`` = 1,
    or 2 for a contrast), and by head (``[comp, batch, k]``) for the check
    ``Σ_t h_t = <y, Σ_{i∈I} c_i>``. The patch map ``[gh, gw]`` and the prefix tokens' values go into
    one record per image (see :class:`HeatmapRun`).

    Args:
        model: a Model, or a spec loaded with ``pretrained`` / ``checkpoint`` / ``device`` once the
            options are checked.
        images: image files or directories (searched recursively).
        text, contrast: ``y`` = the unit text embedding of ``text`` (minus that of ``contrast``);
            needs a text tower, or ``align``.
        class_index, contrast_index: ``y`` = the classifier's weight row (minus another row).
        templates: template set (plain, photo, synth) or one ``'{}'`` template for the texts.
        align: CompAlign maps of this model into a CLIP space (an object, a ``.safetensors`` file or a
            folder holding ``align.safetensors``); ``clip``: the CLIP whose text tower embeds the texts
            (a Model or a spec; default the one the maps record).
        components: labels such as ``L11.H03``; or ``layers``: every component of these blocks
            (``"9-11"``, ``"9,10,11"``, or ints); or ``feature``: its ``top`` components in the score
            table ``score`` (a ScoreTable or ``score.json``; ``variant``: which table), ranked ``by``.
            Default: every component, so the map sums to the model's own ``<y, z>``.
        start_layer: first decomposed block (default 0; for Swin the first block of the last stage).
        normalize: divide by ``‖z‖`` (with unit texts: cosine contributions).
        batch_size: images per decomposition; dtype: ``"float32"`` or ``"float64"``.
        out: draw ``<stem>.png`` (overlay) and ``<stem>_panel.png`` (overlay, colour bar, prefix tokens)
            of each image here; None: no figures.
        alpha: weight of the colour map; vmax: value at full colour (default ``max |h|`` per image);
        max_side: longest side of a drawn overlay (None or 0: the original size).
        progress: a progress bar over batches.

    Returns:
        A :class:`HeatmapRun`.

    Raises:
        InputError: inconsistent options, no images, none readable, a direction the model cannot give,
            unknown components. UnsupportedModelError: no patch grid, or a preprocessing that cannot be
            mapped back onto the image.
    """
    import torch

    from ..core.model import Model as _Model
    from ..data.images import find_images, load_image, record_skip
    from ..errors import UnsupportedModelError
    from .heatmap import (
        crop_box,
        default_start_layer,
        fit_overlay,
        panel_label,
        render_original,
        render_panel,
        token_heatmap,
    )

    _check_options(text=text, contrast=contrast, class_index=class_index, contrast_index=contrast_index, align=align,
                   clip=clip, components=components, layers=layers, feature=feature, score=score, top=top,
                   batch_size=batch_size, alpha=alpha, vmax=vmax, max_side=max_side)
    if dtype not in ("float32", "float64"):
        raise InputError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    paths = find_images([images] if isinstance(images, (str, Path)) else images)
    if not paths:
        shown = " ".join(map(str, [images] if isinstance(images, (str, Path)) else images))
        raise InputError(f"no image files found in {shown}")
    if not isinstance(model, _Model):
        from ..core.loading import load

        model = load(model, pretrained=pretrained, checkpoint=checkpoint, device=device)
    if start_layer is None:
        start_layer = default_start_layer(model)
    direction = heatmap_direction(model, text=text, contrast=contrast, class_index=class_index,
                                  contrast_index=contrast_index, templates=templates, align=align, clip=clip,
                                  device=device)
    work = torch.float64 if dtype == "float64" else torch.float32
    folder = Path(out) if out is not None else None

    records: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    chosen: list[str] | None = None
    token_types: list[str] = []
    n_rows = 0
    used_stems: set[str] = set()
    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    for batch_paths in _progress(batches, len(paths), progress):
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
            small, small_box = fit_overlay(image, box, max_side or None)
            del image
            loaded.append((path, small, small_box, box, tensor))
        if not loaded:
            continue
        pixels = torch.stack([t for *_, t in loaded]).to(device=model.device, dtype=model.dtype)
        tokens, heads = _stacks(model, pixels, direction, start_layer=start_layer, normalize=normalize, dtype=work)
        if tokens.tokens is None or tokens.tokens.grid is None:
            raise UnsupportedModelError(
                f"{model.name}: its token decomposition has no patch grid, so there is no per-token map to draw")
        if chosen is None:
            chosen = choose_components(tokens, components=components, layers=layers, feature=feature, score=score,
                                       kinds=kinds,
                                       top=top, by=by, variant=variant)
            token_types, n_rows = list(tokens.tokens.types), tokens.n_components
        pair = 1 if direction["k"] == 2 else None
        heat = token_heatmap(tokens, 0, contrast=pair, components=chosen)
        weights = torch.tensor([1.0, -1.0] if pair is not None else [1.0], dtype=torch.float64)
        expected = heads.take(chosen).values.to(torch.float64).sum(0).cpu() @ weights  # [batch]
        model_total = heads.reference.to(torch.float64).cpu() @ weights
        for b, (path, small, small_box, box, _) in enumerate(loaded):
            patch = heat.patch[b].to(torch.float64).cpu()
            prefix = {name: float(v[b]) for name, v in heat.prefix.items()}
            scale = float(vmax) if vmax is not None else float(patch.abs().max())
            stem = _unique_stem(path.stem, used_stems)
            if folder is not None:
                overlay = render_original(small, patch, small_box, folder / f"{stem}.png", alpha=alpha, vmax=scale)
                which = "all components" if len(chosen) == tokens.n_components else f"{len(chosen)} components"
                render_panel(overlay, vmax=scale, prefix=prefix, title=f"{direction['caption']} · {which} · {path.name}",
                             path=folder / f"{stem}_panel.png", label=panel_label(direction))
            record = _image_record(path, stem if folder is not None else None, (box.image_width, box.image_height),
                                   box, patch, prefix, scale, float(expected[b]), float(model_total[b]), direction)
            record["overlay_size"] = list(small.size)
            records.append(record)
    if not records:
        raise InputError(f"none of the {len(paths)} images could be read: {skipped}")
    assert chosen is not None
    return HeatmapRun(
        model=model.name, weights=model.weights, family=model.family,
        direction={k: v for k, v in direction.items() if k not in ("rows", "columns", "align", "k")},
        components=chosen, all_components=len(chosen) == n_rows, start_layer=start_layer, normalize=normalize,
        token_types=token_types, images=records, skipped=skipped, paths=list(paths), out=folder)


def _progress(batches: list[Any], n_images: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(batches, desc="heatmap", unit="batch", disable=not enabled or len(batches) < 2 or n_images < 2)


# ----------------------------------------------------------------------------- direction
def heatmap_direction(
    model: Model,
    *,
    text: str | None = None,
    contrast: str | None = None,
    class_index: int | None = None,
    contrast_index: int | None = None,
    templates: str = "plain",
    align: CompAlign | str | Path | None = None,
    clip: Model | str | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """The direction(s) ``y`` as rows for ``decompose(directions=...)``, plus what to record.

    Returns a dict with ``rows`` (``[k, d_model]`` float64: ``y`` and, for a contrast, the second
    direction; through ``align``: the pulled-back rows ``F_gᵀ y_j``,
    :func:`~vitdecomp.apps.heatmap.aligned_directions`), ``columns`` (per component its column list for
    aligned models, else None), ``k`` (1, or 2 for a contrast), ``caption``, and JSON-able facts:
    ``kind`` (``"text"`` / ``"class"``), the texts or class indices, ``templates``, ``space``
    (``"model"`` / ``"clip"``), ``bias`` (class rows), ``align_file``, ``clip``, ``align_val_cosine``.

    Raises:
        InputError: no classifier head / text tower, a class index out of range, an alignment of
            another model or without a recorded CLIP.
    """
    import torch

    from ..errors import UnsupportedModelError
    from ..interpret.text import embed_templates, text_encoder
    from .heatmap import aligned_directions

    if class_index is not None:
        head = model.classifier()
        if head is None:
            raise InputError(f"{model.name} has no classifier head: --class-index needs one (use --text for a CLIP)")
        weight, bias = head
        indices = [class_index] + ([contrast_index] if contrast_index is not None else [])
        for i in indices:
            if not 0 <= i < weight.shape[0]:
                raise InputError(f"class index {i} is out of range: the classifier has {weight.shape[0]} classes")
        rows = weight[indices].detach().to(torch.float64).cpu()
        bias_value = [float(bias[i].detach()) for i in indices] if bias is not None else None
        caption = f"class {class_index}" + (f" - class {contrast_index}" if len(indices) == 2 else "")
        return {"kind": "class", "class_index": class_index, "contrast_index": contrast_index,
                "bias": bias_value, "rows": rows, "columns": None, "k": len(indices), "caption": caption,
                "space": "model"}
    if text is None:
        raise InputError("give a direction: text= (--text) or class_index= (--class-index)")

    texts = [text] + ([contrast] if contrast is not None else [])
    caption = f'"{text}"' + (f' - "{contrast}"' if contrast is not None else "")
    if align is None:
        try:
            encoder = text_encoder(model)
        except UnsupportedModelError as exc:
            raise InputError(f"{model.name} has no text tower: --text needs one; pass --align DIR (CompAlign maps of "
                             "this model into a CLIP space, written by `vitdecomp align`) or use --class-index for a "
                             "classifier") from exc
        embeddings = embed_templates(encoder, texts, templates).to(torch.float64)
        return {"kind": "text", "text": text, "contrast": contrast, "templates": templates,
                "rows": embeddings, "columns": None, "k": len(texts), "caption": caption, "space": "model"}

    maps, clip_spec, align_file = _load_alignment(align, clip, model)
    clip_model = _alignment_clip(maps, clip, device if device is not None else str(model.device))
    embeddings = embed_templates(text_encoder(clip_model), texts, templates)
    rows, columns = aligned_directions(maps, embeddings)
    return {"kind": "text", "text": text, "contrast": contrast, "templates": templates,
            "rows": rows, "columns": columns, "k": len(texts), "caption": caption, "space": "clip",
            "align": maps, "align_file": None if align_file is None else str(align_file), "clip": clip_spec,
            "align_val_cosine": maps.meta.get("val_cosine")}


def _load_alignment(align: CompAlign | str | Path, clip: Model | str | None,
                    model: Model) -> tuple[CompAlign, str, Path | None]:
    """(maps, CLIP spec, file) of ``align`` (see :func:`~vitdecomp.interpret.align.find_alignment`);
    the CLIP is ``clip`` or the one the maps record (``vitdecomp align`` records it)."""
    from ..core.model import Model as _Model
    from ..interpret.align import CompAlign, find_alignment

    if isinstance(align, CompAlign):
        maps, file, where = align, None, "the alignment"
    else:
        file = find_alignment(Path(align))
        maps, where = CompAlign.load(file), str(file)
    fitted_on = maps.meta.get("model")
    if fitted_on is not None and fitted_on != model.name:
        raise InputError(f"{where} maps the components of {fitted_on}, not of --model {model.name}")
    spec = clip.name if isinstance(clip, _Model) else clip
    spec = spec or maps.meta.get("clip_model") or maps.meta.get("clip")
    if not isinstance(spec, str):
        raise InputError(f"{where} does not record which CLIP its maps lead into: pass --clip SPEC")
    return maps, spec, file


def _alignment_clip(maps: CompAlign, clip: Model | str | None, device: str) -> Model:
    from ..core.model import Model as _Model
    from ..store.reopen import load_alignment_clip

    if isinstance(clip, _Model):
        return clip
    return load_alignment_clip(maps, clip, device=device)  # the recorded CLIP, offline-first


# ----------------------------------------------------------------------------- stacks
def _stacks(model: Model, pixels: torch.Tensor, direction: dict[str, Any], *, start_layer: int, normalize: bool,
            dtype: torch.dtype) -> tuple[ComponentStack, ComponentStack]:
    """The token stack and the head stack, both contracted with the direction rows first
    (``[comp, batch, token, k]`` and ``[comp, batch, k]``, column 0 = y, column 1 = the contrast)."""
    from ..core.decomposition import decompose
    from .heatmap import take_columns

    rows = direction["rows"].to(device=pixels.device, dtype=dtype)
    kwargs: dict[str, Any] = {"start_layer": start_layer, "directions": rows, "normalize": normalize, "dtype": dtype}
    tokens = decompose(model, pixels, granularity="head_token", **kwargs).to("cpu")
    heads = decompose(model, pixels, granularity="head", **kwargs).to("cpu")
    maps = direction.get("align")
    if maps is not None:
        if tokens.n_components != maps.n_components or (
                maps.labels is not None and tuple(tokens.names) != tuple(maps.labels)):
            raise InputError(
                f"the alignment was fitted for {maps.n_components} components"
                + (f" ({', '.join(maps.labels[:3])}, ...)" if maps.labels else "")
                + f", but this decomposition has {tokens.n_components} ({', '.join(tokens.names[:3])}, ...): "
                "use the model, granularity (head) and --start-layer the maps were fitted on")
        tokens = take_columns(tokens, direction["columns"])
        heads = take_columns(heads, direction["columns"])
    return tokens, heads


# ----------------------------------------------------------------------------- components
def choose_components(
    stack: ComponentStack,
    *,
    components: Sequence[str] | None = None,
    layers: str | Sequence[int] | None = None,
    feature: str | None = None,
    score: str | Path | ScoreTable | None = None,
    top: int = 5,
    by: Literal["score", "selectivity"] = "score",
    variant: str | None = None,
    kinds: Any = "input",
) -> list[str]:
    """Canonical labels of the chosen rows of ``stack`` (all rows when nothing is asked for).

    Args:
        components: labels (``"L11.H03"``, parsed and made canonical; repeats dropped); or
        layers: every row of these blocks (``"9-11"``, ``"9,10,11"``, ``"11"`` or ints); or
        feature: the ``top`` components of this feature in ``score`` (a ScoreTable or a
            ``score.json`` / table file; ``variant``: which table), ranked ``by`` score or selectivity.

    Raises:
        InputError: a malformed or unknown label, a block the stack lacks, an unknown feature, or a
            table ranking components the stack does not have.
    """
    from ..core.labels import parse_label
    from ..interpret.score import ScoreTable
    from .retrieve.groups import read_score_table

    names = stack.names
    if components:
        out = []
        for raw in components:
            try:
                name = str(parse_label(raw))
            except (KeyError, ValueError) as exc:
                raise InputError(f"--component {raw!r} is not a component label ({exc})") from None
            if name not in names:
                raise InputError(f"--component {raw!r}: this model has no such component; its labels look like "
                                 f"{', '.join(names[:4])} ... {names[-1]} ({len(names)} in all)")
            out.append(name)
        return list(dict.fromkeys(out))
    if layers is not None:
        wanted = parse_layers(layers)
        present = sorted({lab.layer for lab in stack.labels if lab.layer is not None})
        missing = sorted(wanted - set(present))
        if missing:
            raise InputError(f"--layers {layers}: no block {missing} in this decomposition "
                             f"(blocks {present[0]}..{present[-1]})" if present else "this decomposition has no blocks")
        return [str(lab) for lab in stack.labels if lab.layer in wanted]
    if feature is not None:
        if score is None:
            raise InputError("--feature needs --score SCORE.json (a score table from `vitdecomp score`)")
        table = score if isinstance(score, ScoreTable) else read_score_table(score, variant, what="--score")
        where = "the score table" if isinstance(score, ScoreTable) else str(score)
        if feature not in table.features:
            raise InputError(f"--feature {feature!r} is not in {where}; it has {list(table.features)}")
        top_rows = [label for label, _ in table.top(feature, top, by=by, kinds=kinds)]
        missing_rows = [t for t in top_rows if t not in names]
        if missing_rows:
            raise InputError(f"{where} ranks components this decomposition does not have ({missing_rows[:3]}): "
                             "was it scored on this model with the same --start-layer?")
        return top_rows
    return list(names)


def parse_layers(layers: str | Sequence[int]) -> set[int]:
    """Block indices (from 0) of ``"9-11"``, ``"9,10,11"``, ``"11"`` (or a sequence of ints).

    Raises:
        InputError: anything else, or a negative block.
    """
    text = layers if isinstance(layers, str) else ",".join(str(int(x)) for x in layers)
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


# ----------------------------------------------------------------------------- records
def _unique_stem(stem: str, used: set[str]) -> str:
    name, k = stem, 1
    while name in used:
        name, k = f"{stem}-{k}", k + 1
    used.add(name)
    return name


def _image_record(path: Path, stem: str | None, size: tuple[int, int], box: Any, patch: torch.Tensor,
                  prefix: dict[str, float], vmax: float, expected: float, model_total: float,
                  direction: dict[str, Any]) -> dict[str, Any]:
    """One image's entry of heatmaps.json (``stem`` None: no figures drawn)."""
    sum_patch = float(patch.sum())
    sum_prefix = float(sum(prefix.values()))
    total = sum_patch + sum_prefix
    mass = float(patch.abs().sum()) + sum(abs(v) for v in prefix.values()) + abs(expected)
    diff = total - expected
    record: dict[str, Any] = {
        "path": str(path),
        "overlay": None if stem is None else f"{stem}.png",
        "panel": None if stem is None else f"{stem}_panel.png",
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
