"""``vitdecomp label STORE``: label every head of a stored decomposition with text (TextSpan, METHOD §5)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

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
        "(default: the CLIP the maps were fitted to) embeds the texts. Prints a table, or JSON with --json; --out "
        "writes the JSON, with the run record.",
    )
    p.add_argument("store", type=Path, help="a store written by `vitdecomp decompose ... --out STORE`")
    p.add_argument("--model", help="model spec of the text tower (default: the store's own model name; with --align "
                   "the CLIP the maps were fitted to)")
    p.add_argument("--align", type=Path, metavar="DIR",
                   help="map the components into a CLIP space with the CompAlign maps of `vitdecomp align --out DIR` "
                   "(DIR or its compalign.safetensors) before TextSpan")
    p.add_argument("--pool", default="descriptions", help="a shipped pool name or a text file (default descriptions)")
    p.add_argument("--m", type=int, default=5, help="texts per head (default 5)")
    p.add_argument("--rank", type=int, default=80, help="rank of the span projection (default 80)")
    p.add_argument("--dedupe", action="store_true", help="a text labels at most one head")
    p.add_argument("--layers", type=int, help="only heads of the last N layers")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--out", type=Path, help="write the JSON here")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..loading import load
    from ..provenance import jsonable, run_record, write_json
    from ..store import ComponentStore
    from ..text import text_encoder
    from ..text.pools import load_pool
    from ..textspan import format_table, textspan_heads

    if args.m < 1:
        raise InputError("--m must be at least 1")
    store = ComponentStore.open(args.store)
    if not store.is_complete():
        raise InputError(f"{args.store} is not complete ({len(store.done_chunks())}/{store.n_chunks} chunks); "
                         "finish it with the same `vitdecomp decompose` command first")
    align = _load_align(args.align, store) if args.align is not None else None
    if align is None:
        spec = args.model or store.config.model
    else:
        spec = args.model or align.meta.get("clip_model")
        if not spec:
            raise InputError(f"{args.align} does not record its CLIP model: give --model")
    model = load(spec)
    if align is None and (model.name != store.config.model or model.weights != store.config.weights):
        raise InputError(f"--model {spec} ({model.name}, {model.weights}) is not the store's model "
                         f"({store.config.model}, {store.config.weights})")
    if align is not None and align.meta.get("clip_weights") not in (None, model.weights):
        log.warning("the maps were fitted to %s (%s); the texts come from %s (%s)", align.meta.get("clip_model"),
                    align.meta.get("clip_weights"), model.name, model.weights)
    pool = load_pool(args.pool)
    embeddings = text_encoder(model).encode(pool.texts).double().numpy()
    width = store.comp_shape[-1] if align is None else align.d_clip
    if embeddings.shape[1] != width:
        where = "store width" if align is None else f"CLIP width of the maps in {args.align}"
        raise InputError(f"text width {embeddings.shape[1]} of {spec} != {where} {width}")
    labels = list(store.labels)
    heads = [i for i, name in enumerate(labels) if ".H" in name]
    if args.layers is not None:
        last = sorted({int(labels[i][1:3]) for i in heads})[-args.layers:]
        heads = [i for i in heads if int(labels[i][1:3]) in last]
    if align is not None:
        moments, span_labels, order = aligned_moments(store, align, heads), [labels[i] for i in heads], None
    else:
        moments, span_labels, order = store.compute_moments(covariance=True), labels, heads
    results = textspan_heads(moments, span_labels, pool.texts, embeddings, components=order, m=args.m,
                             rank=args.rank, dedupe=args.dedupe)
    payload = {"store": str(args.store), "model": model.name, "weights": model.weights, "pool": pool.manifest(),
               "align": align.describe() if align is not None else None,
               "m": args.m, "rank": args.rank, "dedupe": args.dedupe, "n_items": store.n_items,
               "heads": [r.to_json() for r in results],
               "run": run_record("label", args, store=store, pool=pool.manifest(),
                                 files={"align": align.meta["file"]} if align is not None else None)}
    if args.out is not None:
        write_json(args.out, payload)
    sys.stdout.write(json.dumps(jsonable(payload), indent=2) + "\n" if args.json
                     else format_table(results, top=args.m) + "\n")
    return 0


def _load_align(path: Path, store: Any) -> Any:
    """The CompAlign of ``vitdecomp align --out DIR`` (DIR or the file), checked against ``store``."""
    from ..align import CompAlign
    from ..errors import InputError
    from ._common import find_alignment

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
    :meth:`CompAlign.apply <vitdecomp.align.CompAlign.apply>` (memory: one batch and ``k`` covariances
    ``[d_clip, d_clip]``)."""
    import torch

    from ..store import RunningMoments

    idx = torch.as_tensor(components, dtype=torch.long)
    moments = RunningMoments(len(components), align.d_clip, covariance=True)
    for stack in store.iter_batches():
        mapped = align.apply(stack.sum_tokens()).values.index_select(0, idx)  # [k, batch, d_clip]
        moments.update(mapped.movedim(0, 1))
    return moments
