"""``vitdecomp label STORE``: label every head of a stored decomposition with text (TextSpan, METHOD §5)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "label",
        parents=parents,
        help="label every head of a stored decomposition with texts (TextSpan)",
        description="One streaming pass over STORE accumulates each component's mean and covariance; TextSpan "
        "(covariance form) then picks, per head, the texts of a pool that explain most of its variance. The "
        "text embeddings come from the store's own model (a CLIP; a non-CLIP model needs CompAlign first). "
        "Prints a table, or JSON with --json; --out writes the JSON.",
    )
    p.add_argument("store", type=Path, help="a store written by `vitdecomp decompose ... --out STORE`")
    p.add_argument("--model", help="model spec of the text tower (default: the store's own model name)")
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
    spec = args.model or store.config.model
    model = load(spec)
    if model.name != store.config.model or model.weights != store.config.weights:
        raise InputError(f"--model {spec} ({model.name}, {model.weights}) is not the store's model "
                         f"({store.config.model}, {store.config.weights})")
    pool = load_pool(args.pool)
    embeddings = text_encoder(model).encode(pool.texts).double().numpy()
    if embeddings.shape[1] != store.comp_shape[-1]:
        raise InputError(f"text width {embeddings.shape[1]} != store width {store.comp_shape[-1]}")
    moments = store.compute_moments(covariance=True)
    labels = list(store.labels)
    heads = [i for i, name in enumerate(labels) if ".H" in name]
    if args.layers is not None:
        last = sorted({int(labels[i][1:3]) for i in heads})[-args.layers:]
        heads = [i for i in heads if int(labels[i][1:3]) in last]
    results = textspan_heads(moments, labels, pool.texts, embeddings, components=heads, m=args.m, rank=args.rank,
                             dedupe=args.dedupe)
    payload = {"store": str(args.store), "model": model.name, "weights": model.weights, "pool": pool.manifest(),
               "m": args.m, "rank": args.rank, "dedupe": args.dedupe, "n_items": store.n_items,
               "heads": [r.to_json() for r in results]}
    if args.out is not None:
        args.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    sys.stdout.write(json.dumps(payload, indent=2) + "\n" if args.json else format_table(results, top=args.m) + "\n")
    return 0
