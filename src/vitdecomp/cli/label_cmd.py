"""``vitdecomp label STORE``: label every head of a stored decomposition with text (TextSpan, docs/method.md §5).

Parses the options and calls :func:`vitdecomp.interpret.textspan.label_store`; prints its table (or JSON) and
writes its ``to_json()`` with the run record. With ``--evaluate --classes FILE`` the JSON gets an
``"evaluation"`` entry: the zero-shot accuracy over the store's rows with every labelled head replaced by its
reconstruction from its first ``m`` texts, for each ``m`` of ``--m-values``, next to the unablated and
mean-ablated accuracies (:func:`vitdecomp.interpret.textspan.reconstruction_accuracy`)."""
from __future__ import annotations

import argparse
import logging
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
    import json
    import sys

    from ..errors import InputError
    from ..interpret.inputs import ModelChoice
    from ..interpret.textspan import LabelEvaluation, label_store
    from ..store.provenance import jsonable, run_record, write_json
    from ._common import pretrained_choice

    if args.m < 1:
        raise InputError("--m must be at least 1")
    m_values = _parse_m_values(args.m_values) if args.evaluate else []
    if args.evaluate and args.classes is None:
        raise InputError("--evaluate needs --classes FILE (one class name per line, line k = the store's target k)")
    if args.classes is not None and not args.evaluate:
        raise InputError("--classes is only read with --evaluate")
    evaluation = (LabelEvaluation(args.classes, m_values=m_values, templates=args.templates, earlier=args.earlier)
                  if args.evaluate else None)
    result = label_store(args.store, args.pool, m=args.m, rank=args.rank, dedupe=args.dedupe, layers=args.layers,
                         align=args.align, model=ModelChoice(args.model, args.checkpoint, pretrained_choice(args)),
                         evaluate=evaluation, progress=not getattr(args, "quiet", False))
    found = result.to_json()
    evaluated = {"evaluation": found.pop("evaluation")} if "evaluation" in found else {}
    payload = {**found, "run": run_record("label", args, store=result.store, pool=result.pool.manifest(),
                                          files=result.files or None), **evaluated}
    if args.out is not None:
        write_json(args.out, payload)
    sys.stdout.write(json.dumps(jsonable(payload), indent=2) + "\n" if args.json else result.format() + "\n")
    return 0


def last_layer_heads(labels: Sequence[str], layers: int | None = None) -> list[int]:
    """Moved: :func:`vitdecomp.interpret.textspan.last_layer_heads` (kept here for existing imports)."""
    from ..interpret.textspan import last_layer_heads as heads

    return heads(labels, layers)


def _parse_m_values(text: str) -> list[int]:
    from ..errors import InputError

    try:
        values = sorted({int(x) for x in str(text).split(",") if x.strip()})
    except ValueError:
        raise InputError(f"--m-values {text!r}: give comma-separated integers, e.g. 1,2,5,10") from None
    if not values or values[0] < 0:
        raise InputError(f"--m-values {text!r}: give integers >= 0")
    return values
