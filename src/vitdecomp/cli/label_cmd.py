"""``vitdecomp label STORE``: label every head of a stored decomposition with text (TextSpan, docs/method.md §5).

With ``--evaluate --classes FILE`` the JSON gets an ``"evaluation"`` entry: the zero-shot accuracy over the
store's rows with every labelled head replaced by its reconstruction from its first ``m`` texts, for each
``m`` of ``--m-values``, next to the unablated and mean-ablated accuracies
(:func:`vitdecomp.interpret.textspan.reconstruction_accuracy`)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._common import add_model_arguments

log = logging.getLogger(__name__)


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "label",
        parents=parents,
        help="label every head of a stored decomposition with texts (TextSpan)",
        description="One streaming pass over STORE accumulates each component's mean and covariance; TextSpan "
        "(covariance form) then picks, per head, the texts of a pool that explain most of its variance. The "
        "text embeddings come from the store's own model (a CLIP); for any other model, fit CompAlign first "
        "(`vitdecomp align`) and pass --align DIR: the components are mapped into that CLIP's space and --model "
        "(default: the CLIP the maps were fitted to) embeds the texts. With --evaluate --classes FILE, a second pass "
        "scores the zero-shot accuracy with every labelled head replaced by its reconstruction from its first m "
        "texts, for each m of --m-values (docs/method.md §5). Prints a table, or JSON with --json; --out writes the JSON, "
        "with the run record.",
    )
    p.add_argument("store", type=Path, help="a store written by `vitdecomp decompose ... --out STORE`")
    add_model_arguments(p, help_model="model spec of the text tower (default: the store's own model, rebuilt from "
                        "its record; with --align the CLIP the maps were fitted to)")
    p.add_argument("--align", type=Path, metavar="DIR",
                   help="map the components into a CLIP space with the CompAlign maps of `vitdecomp align --out DIR` "
                   "(DIR or its compalign.safetensors) before TextSpan")
    p.add_argument("--pool", default="descriptions", help="a shipped pool name or a text file (default descriptions)")
    p.add_argument("--m", type=int, default=5, help="texts per head (default 5)")
    p.add_argument("--rank", type=int, default=80, help="rank of the span projection (default 80)")
    p.add_argument("--dedupe", action="store_true", help="a text labels at most one head")
    p.add_argument("--layers", type=int, help="only heads of the last N layers (blocks; for Swin and MaxViT the "
                   "last N blocks counted across stages)")
    e = p.add_argument_group("evaluation (docs/method.md §5): zero-shot accuracy with each head replaced by its "
                             "reconstruction from its first m texts")
    e.add_argument("--evaluate", action="store_true",
                   help="stream the store once more and score, for every m of --m-values, the zero-shot accuracy "
                   "with each labelled head replaced by its mean plus its projection on the span of its first m "
                   "texts (TextSpan runs once with m = max(--m, --m-values)); needs --classes")
    e.add_argument("--classes", type=Path, metavar="FILE",
                   help="class names, one per line, line k naming the store's target k (the zero-shot head)")
    e.add_argument("--templates", default="photo", help="template set for --classes (default photo)")
    e.add_argument("--m-values", default="1,2,5,10", metavar="LIST",
                   help="comma-separated numbers of texts per head to evaluate (default 1,2,5,10)")
    e.add_argument("--earlier", choices=("mean", "keep"), default="mean",
                   help="heads of the blocks before the labelled ones: mean-ablated (the published protocol, "
                   "default) or kept")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--out", type=Path, help="write the JSON here")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..store.provenance import jsonable, run_record, write_json
    from ._common import load_alignment_clip, load_store_model, pretrained_choice
    from ..store.component_store import ComponentStore
    from ..interpret.text import text_encoder
    from ..interpret.text.pools import load_pool
    from ..interpret.textspan import format_table, textspan_heads

    if args.m < 1:
        raise InputError("--m must be at least 1")
    m_values = _parse_m_values(args.m_values) if args.evaluate else []
    if args.evaluate and args.classes is None:
        raise InputError("--evaluate needs --classes FILE (one class name per line, line k = the store's target k)")
    if args.classes is not None and not args.evaluate:
        raise InputError("--classes is only read with --evaluate")
    m_span = max([args.m, *m_values])
    store = ComponentStore.open(args.store)
    if not store.is_complete():
        raise InputError(f"{args.store} is not complete ({len(store.done_chunks())}/{store.n_chunks} chunks); "
                         "finish it with the same `vitdecomp decompose` command first")
    align = _load_align(args.align, store) if args.align is not None else None
    if align is None:
        model = load_store_model(store, args.model, args.checkpoint, pretrained=pretrained_choice(args))
    else:
        model = load_alignment_clip(align, args.model, checkpoint=args.checkpoint, pretrained=pretrained_choice(args))
    pool = load_pool(args.pool)
    embeddings = text_encoder(model).encode(pool.texts).double().numpy()
    width = store.comp_shape[-1] if align is None else align.d_clip
    if embeddings.shape[1] != width:
        where = "store width" if align is None else f"CLIP width of the maps in {args.align}"
        raise InputError(f"text width {embeddings.shape[1]} of {model.name} != {where} {width}")
    labels = list(store.labels)
    heads = last_layer_heads(labels, args.layers)
    if align is not None:
        moments, all_means = _aligned_pass(store, align, heads)
        span_labels, order = [labels[i] for i in heads], None
    else:
        moments, span_labels, order = store.compute_moments(covariance=True), labels, heads
        all_means = moments.mean
    results = textspan_heads(moments, span_labels, pool.texts, embeddings, components=order, m=m_span,
                             rank=args.rank, dedupe=args.dedupe)
    evaluation = None
    if args.evaluate:
        evaluation = _evaluate(args, store, align, model, results, all_means, m_values)
    files: dict[str, Any] = {}
    if align is not None:
        files["align"] = align.meta["file"]
    if args.classes is not None:
        files["classes"] = args.classes
    payload = {"store": str(args.store), "model": model.name, "weights": model.weights, "pool": pool.manifest(),
               "align": align.describe() if align is not None else None,
               "m": m_span, "rank": args.rank, "dedupe": args.dedupe, "n_items": store.n_items,
               "heads": [r.to_json() for r in results],
               "run": run_record("label", args, store=store, pool=pool.manifest(), files=files or None)}
    if evaluation is not None:
        payload["evaluation"] = evaluation
    if args.out is not None:
        write_json(args.out, payload)
    if args.json:
        sys.stdout.write(json.dumps(jsonable(payload), indent=2) + "\n")
    else:
        text = format_table(results, top=m_span)
        if evaluation is not None:
            text += "\n\n" + format_evaluation(evaluation)
        sys.stdout.write(text + "\n")
    return 0


def last_layer_heads(labels: Sequence[str], layers: int | None = None) -> list[int]:
    """Rows of ``labels`` that are attention heads, only those of the last ``layers`` blocks when given.

    Blocks are ordered by their place in the network: ``L07`` by its layer, hierarchical labels
    (Swin, MaxViT: ``S2.B05.H03``) by (stage, block within the stage), which is the order of their
    global layer index (stored labels keep only the string form, so the global index itself is
    not available here).

    Raises:
        InputError: ``layers`` below 1.
    """
    from ..errors import InputError
    from ..core.labels import parse_label

    if layers is not None and layers < 1:
        raise InputError(f"--layers must be at least 1, got {layers}")
    parsed = [parse_label(name) for name in labels]
    heads = [i for i, lab in enumerate(parsed) if lab.kind == "head"]
    if layers is None:
        return heads

    def block(i: int) -> tuple[int, int]:
        lab = parsed[i]
        if lab.stage is not None and lab.block is not None:
            return (lab.stage, lab.block)
        return (-1, int(lab.layer if lab.layer is not None else -1))

    last = set(sorted({block(i) for i in heads})[-layers:])
    return [i for i in heads if block(i) in last]


def _parse_m_values(text: str) -> list[int]:
    from ..errors import InputError

    try:
        values = sorted({int(x) for x in str(text).split(",") if x.strip()})
    except ValueError:
        raise InputError(f"--m-values {text!r}: give comma-separated integers, e.g. 1,2,5,10") from None
    if not values or values[0] < 0:
        raise InputError(f"--m-values {text!r}: give integers >= 0")
    return values


def _evaluate(args: argparse.Namespace, store: Any, align: Any, model: Any, results: list[Any], all_means: Any,
              m_values: list[int]) -> dict[str, Any]:
    """Zero-shot accuracy of the TextSpan reconstructions (:func:`vitdecomp.interpret.textspan.reconstruction_accuracy`)
    over the store's rows with a known target, in the space the heads were labelled in (the store's, or the
    CLIP space of the maps)."""
    import numpy as np
    import torch

    from ..errors import InputError
    from ..interpret.text import resolve_templates, text_encoder, zero_shot_head
    from ..interpret.textspan import reconstruction_accuracy
    from ._common import iter_with_progress
    from .ablate_cmd import read_classes

    classes = read_classes(args.classes)
    templates = resolve_templates(args.templates)
    head = zero_shot_head(text_encoder(model), classes, templates).to(torch.float64)
    all_targets = store.targets(slice(None))
    if not (all_targets >= 0).any():
        raise InputError(f"{store.path} has no class targets (decompose a labelled dataset, e.g. a class folder)")
    if int(all_targets.max()) >= len(classes):
        raise InputError(f"{store.path} has targets up to {int(all_targets.max())} but {args.classes} lists "
                         f"{len(classes)} classes")

    def batches() -> Any:
        for stack in iter_with_progress(store, args, f"evaluate {store.path.name}"):
            rows = np.asarray(stack.meta["rows"], dtype=np.int64)
            stack = stack.sum_tokens()
            yield (stack if align is None else align.apply(stack)), torch.as_tensor(store.targets(rows))

    out = reconstruction_accuracy(batches(), results, head, m_values=m_values, earlier=args.earlier,
                                  means=all_means)
    return {"classes": classes, "templates": list(templates), "rows": "every stored row with a known target (the "
            "rows TextSpan was computed on, as the published protocol)", **out}


def format_evaluation(ev: dict[str, Any]) -> str:
    """Plain-text summary of :func:`_evaluate`'s result."""
    def pct(entry: dict[str, Any] | None) -> str:
        return "n/a" if entry is None or entry["accuracy"] is None else f"{100 * entry['accuracy']:.1f}%"

    lines = [f"zero-shot accuracy, {len(ev['analysed'])} heads replaced by their TextSpan reconstruction "
             f"({ev['n']} images, {ev['n_classes']} classes; earlier heads: {ev['earlier']}"
             f"{', ' + str(len(ev['earlier_ablated'])) + ' mean-ablated' if ev['earlier_ablated'] else ''})",
             f"  {'unablated':<24}{pct(ev['unablated'])}"]
    if ev["analysed_kept"] is not None:
        lines.append(f"  {'earlier heads ablated':<24}{pct(ev['analysed_kept'])}")
    lines.append(f"  {'heads at their mean':<24}{pct(ev['mean_ablated'])}")
    for row in ev["by_m"]:
        note = f"  ({row['heads_short']} heads have fewer texts)" if row["heads_short"] else ""
        lines.append(f"  {'m = ' + str(row['m']):<24}{pct(row)}{note}")
    return "\n".join(lines)


def _load_align(path: Path, store: Any) -> Any:
    """The CompAlign of ``vitdecomp align --out DIR`` (DIR or the file), checked against ``store``."""
    from ..interpret.align import CompAlign
    from ..errors import InputError
    from ..interpret.align import find_alignment

    file = find_alignment(path)
    align = CompAlign.load(file)
    align.meta["file"] = str(file)
    if align.d_model != store.comp_shape[-1] or align.n_components != len(store.labels):
        raise InputError(f"{file} maps {align.n_components} components of width {align.d_model}; {store.path} has "
                         f"{len(store.labels)} of width {store.comp_shape[-1]}")
    if align.labels is not None and tuple(align.labels) != tuple(store.labels):
        raise InputError(f"{file} was fitted for other components than those of {store.path}")
    fitted = (align.meta.get("model"), align.meta.get("weights"))
    if fitted[0] is not None and fitted != (store.config.model, store.config.weights):
        raise InputError(f"{file} was fitted on a store of {fitted[0]} ({fitted[1]}); {store.path} is of "
                         f"{store.config.model} ({store.config.weights})")
    return align


def aligned_moments(store: Any, align: Any, components: list[int]) -> Any:
    """Mean and covariance of the mapped components ``a_c = F_c c_c`` (tokens summed), for
    ``components`` only and in that order: one streaming pass over ``store`` mapping each batch with
    :meth:`CompAlign.apply <vitdecomp.interpret.align.CompAlign.apply>` (memory: one batch and ``k`` covariances
    ``[d_clip, d_clip]``)."""
    return _aligned_pass(store, align, components)[0]


def _aligned_pass(store: Any, align: Any, components: list[int]) -> tuple[Any, Any]:
    """:func:`aligned_moments` plus the means ``[comp, d_clip]`` of *every* mapped component (the
    reference means of ``--evaluate``'s mean-ablation), in the same pass."""
    import torch

    from ..store.component_store import RunningMoments

    idx = torch.as_tensor(components, dtype=torch.long)
    moments = RunningMoments(len(components), align.d_clip, covariance=True)
    means = RunningMoments(align.n_components, align.d_clip)
    for stack in store.iter_batches():
        mapped = align.apply(stack.sum_tokens()).values  # [comp, batch, d_clip]
        moments.update(mapped.index_select(0, idx).movedim(0, 1))
        means.update(mapped.movedim(0, 1))
    return moments, means.mean
