"""``vitdecomp score STORE FEATURE...``: score every component of a stored decomposition on text features
(docs/method.md §4): ``corr``, ``var_attributed``, ``var_explained``, plus selectivity and contrastive scores."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import add_model_arguments

if TYPE_CHECKING:
    from ..interpret.text.pools import TextPool

log = logging.getLogger(__name__)

_VARIANTS = ("corr", "var_attributed", "var_explained")
MAX_MOMENT_BYTES = 8 * 2**30
"""Largest second-moment memory (2 · comp · m² float64, m = all feature texts) a run may allocate."""


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
    p.add_argument("--top", type=int, default=5, help="components shown per feature (default 5)")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    p.add_argument("--out", type=Path, metavar="DIR", help="write score.json and score.svg here")
    p.set_defaults(run=run)


def resolve_feature(token: str) -> tuple[str, TextPool, Path | None]:
    """``(name, pool, file or None)`` of a FEATURE argument (feature set, shipped pool, or text file)."""
    from ..errors import InputError
    from ..interpret.text.pools import FEATURE_SETS, POOLS, load_pool

    if token in FEATURE_SETS:
        return token, load_pool(f"feature/{token}"), None
    if token in POOLS:
        return token, load_pool(token), None
    path = Path(token).expanduser()
    if path.is_file():
        pool = load_pool(path)
        return pool.name, pool, path
    raise InputError(f"unknown feature {token!r}: not a feature set ({', '.join(FEATURE_SETS)}, or 'all'), "
                     f"not a shipped pool ({', '.join(POOLS)}), and no such text file")


def _features(args: argparse.Namespace) -> tuple[dict[str, TextPool], dict[str, Path]]:
    from ..errors import InputError
    from ..interpret.text.pools import FEATURE_SETS, TextPool, load_pool

    tokens: list[str] = []
    for token in args.features:
        tokens += list(FEATURE_SETS) if token == "all" else [token]
    features: dict[str, TextPool] = {}
    files: dict[str, Path] = {}

    def add(name: str, pool: TextPool) -> None:
        if name in features:
            raise InputError(f"feature {name!r} is given twice (rename the file or drop the repeat)")
        features[name] = pool

    for token in tokens:
        name, pool, path = resolve_feature(token)
        add(name, pool)
        if path is not None:
            files[f"feature:{name}"] = path
    for spec in args.pool:
        pool = load_pool(spec)
        if Path(pool.source).is_file():
            files[f"pool:{pool.name}"] = Path(pool.source)
        for text in pool.texts:
            add(text, TextPool(text, pool.version, [text], f"text of pool {pool.name}", pool.source))
    if not features:
        raise InputError("no features: give FEATURE names (e.g. colour shape, or all) and/or --pool")
    return features, files


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..errors import InputError
    from ..store.provenance import run_record, write_json
    from ..interpret.score import ScoreMoments, feature_basis, score_table
    from ..interpret.text import embed_templates, resolve_templates
    from ..interpret.align import find_alignment
    from ._common import (
        iter_with_progress, load_alignment_clip, load_store_model, open_complete_store, pretrained_choice, text_tower,
    )

    if args.top < 1:
        raise InputError("--top must be at least 1")
    variants = list(dict.fromkeys(args.variant or ["corr"]))
    features, files = _features(args)
    if args.contrast:
        missing = [f for f in args.contrast if f not in features]
        if missing:
            raise InputError(f"--contrast {' '.join(args.contrast)}: {missing} not among the features {list(features)}")
    if args.selectivity and len(features) < 2:
        raise InputError("--selectivity needs at least two features")
    templates = resolve_templates(args.templates)
    store = open_complete_store(args.store)
    labels = list(store.labels)

    align = None
    if args.align is not None:
        from ..interpret.align import CompAlign

        align_file = find_alignment(args.align)
        align = CompAlign.load(align_file)
        files["align"] = align_file
        fitted_for = (align.meta.get("model"), align.meta.get("weights"))
        if fitted_for[0] is not None and fitted_for != (store.config.model, store.config.weights):
            raise InputError(f"--align {align_file} was fitted for {fitted_for[0]} ({fitted_for[1]}), the store holds "
                             f"{store.config.model} ({store.config.weights})")
        if align.n_components != len(labels) or align.d_model != store.comp_shape[-1]:
            raise InputError(f"--align {align_file}: maps for {align.n_components} components of dim {align.d_model}, "
                             f"the store has {len(labels)} of dim {store.comp_shape[-1]}")
        if align.labels is not None and list(align.labels) != labels:
            raise InputError(f"--align {align_file} was fitted for other components than the store's")
        model = load_alignment_clip(align, args.model, checkpoint=args.checkpoint, pretrained=pretrained_choice(args))
        dim = align.d_clip
        encoder = text_tower(model, hint="--model must be the CLIP model the alignment maps into")
    else:
        model = load_store_model(store, args.model, args.checkpoint, pretrained=pretrained_choice(args))
        dim = int(store.comp_shape[-1])
        encoder = text_tower(model, hint="fit a CompAlign into a CLIP space and pass --align FILE --model CLIP")

    bases: dict[str, np.ndarray] = {}
    for name, pool in features.items():
        emb = embed_templates(encoder, pool.texts, templates)
        if emb.shape[1] != dim:
            raise InputError(f"text width {emb.shape[1]} != component width {dim}: the text tower must belong to "
                             "the space the components are in")
        bases[name] = feature_basis(emb)
    directions = np.concatenate(list(bases.values()))  # moments projected on every feature's span (exact)
    need = 2 * len(labels) * directions.shape[0] ** 2 * 8
    if need > MAX_MOMENT_BYTES:
        raise InputError(f"{directions.shape[0]} feature texts need {need / 2**30:.1f} GiB of second moments for "
                         f"{len(labels)} components (limit {MAX_MOMENT_BYTES / 2**30:.0f} GiB): score fewer texts "
                         "per run (a smaller --pool, or fewer FEATUREs)")
    moments = ScoreMoments(len(labels), dim, directions=directions, labels=labels)
    for stack in iter_with_progress(store, args, f"score {store.path.name}"):
        stack = stack.sum_tokens()
        moments.add_stack(align.apply(stack) if align is not None else stack)

    tables = {v: score_table(moments, bases, v, share=(v == "var_attributed" and not args.absolute)) for v in variants}
    payload: dict[str, Any] = {
        "run": run_record("score", args, store=store, files=files or None,
                          extra={"pools": {name: pool.manifest() for name, pool in features.items()},
                                 "alignment": align.describe() if align is not None else None}),
        "store": str(store.path),
        "model": model.name,
        "weights": model.weights,
        "space": "clip (CompAlign)" if align is not None else store.space,
        "templates": list(templates),
        "n_items": moments.count,
        "features": {name: {"texts": pool.texts, "pool": pool.manifest(), "rank": int(bases[name].shape[0])}
                     for name, pool in features.items()},
        "tables": {v: t.to_json() for v, t in tables.items()},
    }
    lines = [t.format(top=args.top) for t in tables.values()]
    if args.selectivity:
        payload["selectivity"] = {v: t.selectivity().to_json() for v, t in tables.items()}
        lines += [t.format(top=args.top, by="selectivity") for t in tables.values()]
    if args.contrast:
        spur, core = args.contrast
        contrast: dict[str, Any] = {"spurious": spur, "core": core, "by_variant": {}}
        contrast_lines = []
        for v, t in tables.items():
            values = t.contrastive(spur, core)
            order = np.argsort(-values, kind="stable")
            contrast["by_variant"][v] = {"scores": {labels[i]: float(values[i]) for i in range(len(labels))},
                                         "ranking": [labels[i] for i in order]}
            shown = ", ".join(f"{labels[i]} {values[i]:+.3f}" for i in order[: args.top])
            contrast_lines.append(f"contrast[{t.kind}] {spur} - {core}, top {min(args.top, len(labels))}: {shown}")
        lines.append("\n".join(contrast_lines))
        payload["contrast"] = contrast
    if args.out is not None:
        write_json(args.out / "score.json", payload)
        for j, (v, t) in enumerate(tables.items()):
            t.plot(args.out / ("score.svg" if j == 0 else f"score-{v}.svg"),
                   title=f"{t.kind} ({store.path.name}, n={moments.count})")
        log.info("wrote %s", args.out / "score.json")
    if args.json:
        import json

        from ..store.provenance import jsonable

        sys.stdout.write(json.dumps(jsonable(payload), indent=2) + "\n")
    else:
        sys.stdout.write("\n\n".join(lines) + "\n")
    return 0
