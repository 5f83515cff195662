"""``vitdecomp score STORE FEATURE...``: score every component of a stored decomposition on text features
(docs/method.md §4): ``corr``, ``var_attributed``, ``var_explained``, plus selectivity and contrastive scores.

Parses the options and calls :func:`vitdecomp.interpret.score.score_store`; prints its tables or JSON and
writes ``score.json`` (its ``to_json()`` with the run record first) and one heat map per variant."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ._common import add_model_arguments

log = logging.getLogger(__name__)

_VARIANTS = ("corr", "var_attributed", "var_explained")  # = vitdecomp.interpret.score.VARIANTS (no import here)


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "score",
        parents=parents,
        help="score every component on text features (corr, var_attributed, var_explained)",
        description="One streaming pass over STORE accumulates the second moments of every component projected "
        "on the features' text directions (memory: one chunk plus comp × k² numbers, k the number of texts); "
        "each feature's texts are embedded with the store model's text tower and orthonormalised, and every "
        "component gets one score per feature (docs/method.md §4). A model without a text tower is read through a "
        "fitted CompAlign (--align, with --model naming the CLIP it maps into). Prints the top components per "
        "feature; --out DIR writes score.json (with a run record) and score.svg.",
    )
    p.add_argument("store", type=Path, help="a store written by `vitdecomp decompose ... --out STORE`")
    p.add_argument("features", nargs="*", metavar="FEATURE",
                   help="a feature set (colour, texture, animal, person, location, pattern, shape, fabric; "
                   "'all' for these eight), a shipped pool (waterbirds/spurious, feature/colour, ...) or a text "
                   "file with one text per line (the feature is named after the file)")
    p.add_argument("--pool", action="append", default=[], metavar="NAME|FILE",
                   help="score each text of this pool (shipped name or file) as its own one-text feature; repeatable")
    add_model_arguments(p, help_model="model spec of the text tower (default: the store's own model, rebuilt from its "
                        "record; with --align: the CLIP the maps go into, default the one recorded in the alignment)")
    p.add_argument("--align", type=Path, metavar="DIR|FILE",
                   help="a fitted CompAlign (`vitdecomp align --out DIR`, or its .safetensors file): maps the "
                   "components into CLIP space first")
    p.add_argument("--variant", nargs="+", choices=_VARIANTS, metavar="VARIANT",
                   help="corr (default), var_attributed, var_explained; several give several tables")
    p.add_argument("--templates", default="plain",
                   help="template set for the feature texts (plain, photo, synth, or one '{}' template; default plain)")
    p.add_argument("--absolute", action="store_true",
                   help="var_attributed as covariances (default: shares of the total's feature variance, summing to 1)")
    p.add_argument("--selectivity", action="store_true", help="also show selectivity s_ip - max_{p'!=p} s_ip'")
    p.add_argument("--contrast", nargs=2, metavar=("SPURIOUS", "CORE"),
                   help="rank components by s_spurious - s_core (two of the FEATUREs; Waterbirds selection)")
    n = p.add_argument_group("nulls and significance (docs/method.md §4)")
    n.add_argument("--n-null", type=int, default=200, metavar="R",
                   help="random text bases of the same rank per feature, drawn from --null-pool (default 200; "
                   "0: no nulls). Each score gets z, a permutation p-value and a Benjamini-Hochberg q-value; each "
                   "feature a verdict (max statistic over components)")
    n.add_argument("--null-pool", default="auto", metavar="NAME|FILE",
                   help="texts the random bases come from (default auto: the synthetic world's own captions for a "
                   "synth: model, else the shipped descriptions pool)")
    n.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    n.add_argument("--kinds", default="input",
                   help="components ranked and tested: input (heads, MLPs, neurons...: the default), all, or a "
                   "comma list such as input,embed")
    v = p.add_argument_group("validation against the CLIP proxy (docs/method.md §4, paper Tables 2 and 4)")
    v.add_argument("--validate", action="store_true",
                   help="also compute the CLIP proxy r_ip (mean over the feature's texts of Pearson(cos(a_i, y_s), "
                   "cos(Z_CLIP, y_s))) with Z_CLIP the real CLIP image embedding, and report Spearman rho of the "
                   "component ordering (per feature) and of the feature ordering (per component) of each score "
                   "table against it; needs two features for the feature ordering. Written as 'validation' in "
                   "score.json")
    v.add_argument("--clip-store", type=Path, metavar="CLIPSTORE",
                   help="with --validate and --align: the store of the CLIP over the same images (rows paired by id, "
                   "as `vitdecomp align` pairs them); its reference rows are Z_CLIP (default: the CLIP store recorded "
                   "in the alignment folder's align.json). Without --align the store's own embedding is Z_CLIP")
    p.add_argument("--top", type=int, default=5, help="components shown per feature (default 5)")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    p.add_argument("--out", type=Path, metavar="DIR", help="write score.json and score.svg here")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from ..errors import InputError
    from ..interpret.inputs import ModelChoice
    from ..interpret.score import score_store
    from ..report.figures import score_heatmap
    from ..store.provenance import jsonable, run_record, write_json
    from ._common import pretrained_choice

    if args.top < 1:
        raise InputError("--top must be at least 1")
    if args.clip_store is not None and not args.validate:
        raise InputError("--clip-store goes with --validate")
    if args.validate:  # bad validation inputs fail before the pass
        from ..interpret.score.validate import resolve_clip_store

        resolve_clip_store(args.store, args.align, args.clip_store)
    result = score_store(
        args.store, args.features, pools=args.pool, variants=args.variant or ["corr"], templates=args.templates,
        absolute=args.absolute, selectivity=args.selectivity, contrast=tuple(args.contrast) if args.contrast else None,
        model=ModelChoice(args.model, args.checkpoint, pretrained_choice(args)), align=args.align,
        progress=not getattr(args, "quiet", False), n_null=args.n_null, null_pool=_null_pool(args),
        kinds=args.kinds, alpha=args.alpha)
    payload: dict[str, Any] = {
        "run": run_record("score", args, store=result.store, files=result.files or None,
                          extra={"pools": {name: pool.manifest() for name, pool in result.features.items()},
                                 "alignment": result.alignment.describe() if result.alignment is not None else None}),
        **result.to_json(),
    }
    validation = None
    if args.validate:
        from ..interpret.score.validate import validate_scores

        validation = validate_scores(result, clip_store=args.clip_store,
                                     model=ModelChoice(args.model, args.checkpoint, pretrained_choice(args)),
                                     progress=not getattr(args, "quiet", False))
        payload["validation"] = validation.to_json()
    if args.out is not None:
        write_json(args.out / "score.json", payload)
        for j, (v, t) in enumerate(result.tables.items()):
            (args.out / ("score.svg" if j == 0 else f"score-{v}.svg")).write_text(
                score_heatmap(t, title=f"{t.kind} ({result.store.path.name}, n={result.n_items})",
                              significant=result.nulls[v].significant if result.nulls else None,
                              alpha=args.alpha), encoding="utf-8")
        log.info("wrote %s", args.out / "score.json")
    text = result.format(args.top) + ("\n\n" + validation.format() if validation is not None else "")
    sys.stdout.write(json.dumps(jsonable(payload), indent=2) + "\n" if args.json else text + "\n")
    return 0


def _null_pool(args: argparse.Namespace) -> Any:
    """``--null-pool auto``: the synthetic world's captions for a ``synth:`` store model, else descriptions."""
    if args.null_pool != "auto":
        return args.null_pool
    from ..store.component_store import ComponentStore

    try:
        spec = str(ComponentStore.open(args.store).config.model)
    except Exception:  # the library call reports a bad store with its own message
        return "descriptions"
    if spec.startswith("synth:") or spec.startswith("tiny:"):
        from ..synth.generator import caption_pool

        return caption_pool()
    return "descriptions"
