"""``vitdecomp ablate STORE``: accuracy of a stored decomposition with components ablated (docs/method.md §6.1).

Parses the options and calls :func:`vitdecomp.interpret.ablate.run_ablation` (the two streaming passes,
reference sets and heads live there); prints its table or JSON and writes ``ablate.json`` (its
``to_json()`` with the run record first) and ``ablate.svg``.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ._common import add_model_arguments

log = logging.getLogger(__name__)


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "ablate",
        parents=parents,
        help="accuracy with components ablated (mean, zero, resample) and cumulative block curves",
        description="Ablating component i replaces its direct contribution c_i(x) by its mean over an explicit "
        "reference set (mean), by 0 (zero), or by c_i of a seeded random reference image (resample); the "
        "representation is z' = sum_i c_i + sum_{i in S} (r_i - c_i). Accuracy against the store's targets "
        "comes from a zero-shot head (--classes FILE, CLIP stores), the model's own classifier (--head model), "
        "or a ridge least-squares linear head fitted on the reference set (--head linear). The reference set is "
        "another store of the same model and settings (--reference-store), a seeded split of STORE disjoint "
        "from the evaluated rows (--reference-fraction, --seed), or the evaluated rows themselves "
        "(--reference-self, the published convention). Prints a table; --out DIR writes ablate.json and "
        "ablate.svg.",
    )
    p.add_argument("store", type=Path, help="a store written by `vitdecomp decompose ... --out STORE` (with targets)")
    head = p.add_mutually_exclusive_group(required=True)
    head.add_argument("--classes", type=Path, metavar="FILE",
                      help="class names, one per line, line i = target i (ImageFolder: sorted folder names); "
                      "zero-shot head from the store model's text tower")
    head.add_argument("--head", choices=("linear", "model"),
                      help="linear: ridge least squares on one-hot targets over the reference set; "
                      "model: the model's own classifier (e.g. a timm ViT's head)")
    add_model_arguments(p, help_model="model spec (must be the store's model)")
    p.add_argument("--templates", default="photo",
                   help="template set for --classes (plain, photo, synth, or one '{}' template; default photo)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--components", nargs="+", metavar="LABEL", help="components to ablate (L11.H03 L11.mlp ...)")
    which.add_argument("--top-from", type=Path, metavar="SCORE_JSON",
                       help="ablate the top components of a `vitdecomp score --out` result")
    p.add_argument("--top-by", metavar="contrast|FEATURE",
                   help="ranking of --top-from (default: contrast when the file has one, else its only feature)")
    p.add_argument("--top-k", type=int, default=10, help="components taken from --top-from (default 10)")
    p.add_argument("--top-variant", help="score variant of --top-from (default: the file's first)")
    p.add_argument("--mode", choices=("mean", "zero", "resample"), default="mean", help="default mean")
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--reference-store", type=Path, metavar="REF",
                     help="reference set: another store of the same model, settings and components")
    ref.add_argument("--reference-fraction", type=float, metavar="F",
                     help="reference set: rows of STORE with u(seed, row) < F (never evaluated)")
    ref.add_argument("--reference-self", action="store_true",
                     help="reference set = the evaluated rows (published convention; overstates nothing but "
                     "leaks the evaluation set into the means)")
    p.add_argument("--seed", type=int, default=0, help="seed of the reference split and of resampling (default 0)")
    p.add_argument("--curve", default="from_last,from_first",
                   help="cumulative block curves: from_last, from_first, both comma-separated (default), or none")
    p.add_argument("--ridge", type=float, default=1e-3,
                   help="--head linear: ridge lambda relative to mean feature energy (default 1e-3)")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    p.add_argument("--out", type=Path, metavar="DIR", help="write ablate.json and ablate.svg here")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from ..errors import InputError
    from ..interpret.ablate import TopComponents, run_ablation
    from ..interpret.inputs import ModelChoice
    from ..report.figures import ablation_curves
    from ..store.provenance import jsonable, run_record, write_json
    from ._common import pretrained_choice

    directions = [] if args.curve.strip().lower() == "none" else [s.strip() for s in args.curve.split(",") if s.strip()]
    if any(d not in ("from_last", "from_first") for d in directions):
        raise InputError(f"--curve {args.curve}: use from_last, from_first (comma-separated) or none")
    if args.top_k < 1:
        raise InputError("--top-k must be at least 1")
    reference = (args.reference_store if args.reference_store is not None
                 else args.reference_fraction if args.reference_fraction is not None
                 else "self" if args.reference_self else None)
    components = (TopComponents(args.top_from, by=args.top_by, k=args.top_k, variant=args.top_variant)
                  if args.top_from is not None else list(args.components or []))
    result = run_ablation(
        args.store, "zero-shot" if args.classes is not None else args.head, classes=args.classes,
        templates=args.templates, components=components, mode=args.mode, reference=reference, seed=args.seed,
        curves=directions, ridge=args.ridge, model=ModelChoice(args.model, args.checkpoint, pretrained_choice(args)),
        progress=not getattr(args, "quiet", False))
    reference_record = {k: v for k, v in (result.reference or {}).items() if k != "rows"}
    payload: dict[str, Any] = {
        "run": run_record("ablate", args, store=result.store,
                          stores={"reference": result.reference_store} if result.reference_store else None,
                          files=result.files or None, extra={"reference": reference_record}),
        **result.to_json(),
    }
    if args.out is not None:
        write_json(args.out / "ablate.json", payload)
        if result.curves:
            svg = ablation_curves(result.curve_points(),
                                  title=f"cumulative block {result.mode}-ablation ({result.store.path.name})")
            (args.out / "ablate.svg").write_text(svg + "\n", encoding="utf-8")
        log.info("wrote %s", args.out / "ablate.json")
    sys.stdout.write(json.dumps(jsonable(payload), indent=2) + "\n" if args.json else result.format() + "\n")
    return 0

