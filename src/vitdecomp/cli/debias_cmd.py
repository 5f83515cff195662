"""``vitdecomp debias WATERBIRDS_ROOT --model SPEC``: remove a spurious cue by mean-ablating components.

docs/method.md §6.6 (see :mod:`vitdecomp.apps.debias`): components are ranked on the val split by the
contrastive text score (places − birds), the top ``k`` are mean-ablated with val means, and
worst-group / average-group accuracy is reported on the test split against ``k`` random
components (several seeded draws) and the top ``k`` by variance.

Texts: by default the Waterbirds ones (``landbird`` / ``waterbird``, the shipped
``waterbirds/spurious`` and ``waterbirds/core`` pools, ``photo`` templates); a root written by
``vitdecomp synth generate --spurious P`` brings its own in ``task.json`` (its class factor's
describe() texts per class, its background texts; :func:`vitdecomp.apps.debias.dataset_texts`).
``--class-names``, ``--spurious``, ``--core`` and ``--templates`` override either; ``debias.json``
records the texts used under ``"texts"``.

Stores: ``--store-dir DIR`` makes (or resumes, or reuses) one store per split under
``DIR/{train,val,test}`` with :func:`vitdecomp.store.dataset_run.decompose_dataset`; ``--stores TRAIN VAL
TEST`` reads existing ones (one store of all splits may be given three times). Writes
``debias.json`` (results + run record), ``debias.md`` (table), ``debias.svg`` (chart) and
``report.html`` under ``--out``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "debias",
        parents=parents,
        help="remove a spurious cue (Waterbirds) by mean-ablating the components that carry it",
        description="Rank components on Waterbirds' val split by the contrastive text score (spurious place texts "
        "minus core bird texts), mean-ablate the top K with val means, and report worst-group and average-group "
        "accuracy on the test split, against K random components and the top K by variance. The classifier is the "
        "CLIP zero-shot head over the class names or a logistic regression fitted on the train split. A dataset from "
        "`vitdecomp synth generate --spurious P` supplies its own class names and texts (task.json).",
    )
    p.add_argument("root", type=Path, help="Waterbirds root: metadata.csv (img_id, img_filename, y, split, place, "
                   "place_filename) and the images")
    p.add_argument("--model", help="model spec (timm:…, open_clip:…, hf:…, synth:…); default with --stores: the stores' "
                   "model, rebuilt from their record")
    p.add_argument("--no-pretrained", action="store_true", help="random weights (offline)")
    p.add_argument("--checkpoint", type=Path, help="load weights from a local .safetensors / torch file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--store-dir", type=Path, help="make, resume or reuse one store per split under DIR")
    src.add_argument("--stores", type=Path, nargs=3, metavar=("TRAIN", "VAL", "TEST"), help="existing stores")
    p.add_argument("--k", type=int, default=10, help="components to ablate (default 10)")
    p.add_argument("--random-draws", type=int, default=5, help="random-component draws for the control (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws and the linear head (default 0)")
    p.add_argument("--head", choices=("zero-shot", "linear", "model"), default="zero-shot",
                   help="zero-shot (CLIP text of --class-names), linear (logistic regression on train) or model "
                   "(the model's own 2-class classifier)")
    p.add_argument("--class-names", nargs=2, default=None, metavar=("Y0", "Y1"),
                   help="zero-shot class names of y=0 and y=1; 'a|b' ensembles several names (default landbird "
                   "waterbird; for a dataset from `vitdecomp synth generate --spurious` its task.json's class texts)")
    p.add_argument("--templates", default=None, help="template set name or one '{}' template (default photo; "
                   "synth for a generated dataset)")
    p.add_argument("--spurious", default=None, help="pool name or text file of the spurious texts (default "
                   "waterbirds/spurious; for a generated dataset the describe() texts of its backgrounds)")
    p.add_argument("--core", default=None, help="pool name or text file of the core texts (default waterbirds/core; "
                   "for a generated dataset the describe() texts of its class factor's values)")
    p.add_argument("--C", dest="c", type=float, default=1.0, help="inverse regularisation of the linear head")
    p.add_argument("--align", type=Path, help="CompAlign maps (non-CLIP model): scores read the mapped components")
    p.add_argument("--text-model", help="CLIP model spec whose text tower embeds the texts (with --align)")
    p.add_argument("--out", type=Path, default=Path("debias"), help="output folder (default ./debias)")
    p.add_argument("--json", action="store_true", help="print the results JSON instead of the table")
    g = p.add_argument_group("making stores (--store-dir)")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--granularity", choices=("layer", "head"), default="head")
    g.add_argument("--start-layer", type=int, default=0)
    g.add_argument("--store-dtype", choices=("float16", "float32"), default="float16")
    g.add_argument("--num-workers", type=int, default=0)
    g.add_argument("--device", default="cpu")
    p.set_defaults(run=run)


def _stores(args: argparse.Namespace, model: Any, opened: list[Any] | None, need_train: bool) -> dict[str, Any]:
    """The stores by split: ``opened`` (--stores), or made / resumed / reused under --store-dir."""
    from ..store.dataset_run import decompose_dataset
    from ..apps.debias import SPLITS

    if opened is not None:
        return dict(zip(SPLITS, opened))
    out: dict[str, Any] = {}
    for split in SPLITS:
        if split == "train" and not need_train:
            continue
        path = args.store_dir / split
        log.info("store %s (%s split)", path, split)
        run = decompose_dataset(model, args.root, path, batch_size=args.batch_size, granularity=args.granularity,
                                start_layer=args.start_layer, store_dtype=args.store_dtype, kind="waterbirds",
                                split=split, num_workers=args.num_workers, progress=not getattr(args, "quiet", False))
        out[split] = run.store
    return out


def _class_names(args: argparse.Namespace) -> list[list[str]]:
    from ..errors import InputError

    names = [[n.strip() for n in cls.split("|") if n.strip()] for cls in args.class_names]
    if not all(names):
        raise InputError(f"empty class name in --class-names {args.class_names}")
    return names


def run(args: argparse.Namespace) -> int:
    import json

    from ..apps import debias as db
    from ..errors import InputError
    from ..core.loading import load
    from ..store.provenance import run_record, write_json
    from ..report import Figure, Report, Section, Table
    from ..report.figures import debias_chart
    from ..interpret.text.pools import load_pool
    from ..interpret.align import find_alignment
    from ._common import load_store_model, open_complete_store, pretrained_choice, text_tower

    if args.k < 1:
        raise InputError("--k must be at least 1")
    if args.random_draws < 1:
        raise InputError("--random-draws must be at least 1 (the random control)")
    if (args.align is None) != (args.text_model is None):
        raise InputError("--align and --text-model go together (a non-CLIP model read through CompAlign)")
    labels = db.WaterbirdsLabels.read(args.root)  # clear errors for a missing or malformed metadata.csv
    defaults = db.dataset_texts(args.root)  # a generated world's own texts (task.json), else the Waterbirds ones
    spurious_pool = load_pool(args.spurious) if args.spurious is not None else defaults.spurious
    core_pool = load_pool(args.core) if args.core is not None else defaults.core
    templates = args.templates if args.templates is not None else defaults.templates
    class_names = _class_names(args) if args.class_names is not None else [list(c) for c in defaults.class_names]
    texts_used = {**db.DebiasTexts(tuple(tuple(c) for c in class_names), spurious_pool, core_pool, templates,
                                   defaults.source).describe(),
                  "from_arguments": [name for name in ("class_names", "spurious", "core", "templates")
                                     if getattr(args, name) is not None]}
    opened = None
    if args.stores is not None:
        opened = [open_complete_store(path, role=f"{split} store") for split, path in zip(db.SPLITS, args.stores)]
        spec = args.model or opened[1].config.model
        model = load_store_model(opened[1], args.model, args.checkpoint, pretrained=pretrained_choice(args),
                                 device=args.device)
    elif args.model is None:
        raise InputError("--model is required with --store-dir")
    else:
        spec = args.model
        model = load(spec, pretrained=not args.no_pretrained, checkpoint=args.checkpoint, device=args.device)
    stores = _stores(args, model, opened, need_train=args.head == "linear")
    for role, store in stores.items():
        if store.config.model != model.name or store.config.weights != model.weights:
            raise InputError(f"{role} store {store.path} holds {store.config.model} ({store.config.weights}), "
                             f"not --model {spec} ({model.name}, {model.weights})")
    db.check_stores(stores, labels)

    align = None
    if args.align is not None:
        from ..interpret.align import CompAlign

        align = CompAlign.load(find_alignment(args.align))
        encoder = text_tower(load(args.text_model, device=args.device), hint="--text-model must be a CLIP model")
    else:
        encoder = text_tower(model, hint="pass --align MAPS --text-model CLIP_SPEC (CompAlign into a CLIP space)")
    spurious = db.embed_texts(encoder, spurious_pool.texts, templates)
    core = db.embed_texts(encoder, core_pool.texts, templates)

    if args.head == "zero-shot":
        head = db.zero_shot_classifier(encoder, class_names, templates,
                                       space="aligned" if align is not None else "model")
    elif args.head == "linear":
        head = db.fit_linear_head(stores["train"], labels, c=args.c, seed=args.seed)
    else:
        weights = model.classifier()
        if weights is None or weights[0].shape[0] != 2:
            raise InputError(f"--head model needs a 2-class classifier; {spec} has "
                             f"{'none' if weights is None else f'{weights[0].shape[0]} classes'}")
        w, b = weights
        head = db.ClassifierHead(w.detach().double().numpy(),
                                 b.detach().double().numpy() if b is not None else [0.0, 0.0], "model")
    result = db.debias(stores, labels, head, spurious=spurious, core=core, k=args.k, random_draws=args.random_draws,
                       seed=args.seed, align=align, check=False)

    files = {"metadata": args.root / "metadata.csv"}
    if defaults.source != "waterbirds":
        files["task"] = Path(defaults.source)
    if args.align is not None:
        files["align"] = args.align
    payload = {
        "run": run_record("debias", args, stores={r: s for r, s in stores.items()},
                          pool={"spurious": spurious_pool.manifest(), "core": core_pool.manifest()}, files=files,
                          extra={"model": model.name, "weights": model.weights, "text_model": args.text_model,
                                 "templates": templates}),
        "texts": texts_used,
        **result.to_json(),
    }
    table = result.format_table()
    svg = debias_chart(result, title=f"Waterbirds test: {model.name}, {head.kind} head")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "debias.json", payload)
    (args.out / "debias.md").write_text(table + "\n", encoding="utf-8")
    (args.out / "debias.svg").write_text(svg, encoding="utf-8")
    s = result.random_summary()
    rows = [[name, m["worst_group"], m["average_group"], m["weighted"]] for name, m in result.rows()]
    rows.append([f"random {args.k} mean ({args.random_draws} draws)", s["worst_group_mean"], s["average_group_mean"],
                 s["weighted_mean"]])
    rows.append([f"random {args.k} sd", s["worst_group_sd"], s["average_group_sd"], s["weighted_sd"]])
    rows.append([f"random {args.k} max", s["worst_group_max"], s["average_group_max"], s["weighted_max"]])
    report = Report(
        title="Removing a spurious cue (Waterbirds)",
        subtitle=f"{model.name}: {head.kind} head, top {args.k} components by contrastive score on val, mean-ablated "
        "with val means, evaluated on test",
        sections=[
            Section("results", "Test accuracy", items=[
                Table(["", "worst-group", "average-group", "weighted (accuracy)"], rows),
                Figure.from_svg(svg, caption="worst-group and unweighted average-group accuracy on test"),
            ]),
            Section("components", "Selected components", items=[
                Table(["component", "contrastive", "spurious", "core"],
                      [[c, *result.scores[c].values()] for c in result.selected]),
            ]),
        ],
        meta={"model": model.name, "weights": model.weights, "n": json.dumps(result.n),
              "class names": " vs ".join("|".join(c) for c in class_names), "templates": str(templates),
              "spurious texts": f"{spurious_pool.name} ({spurious_pool.sha256[:12]})",
              "core texts": f"{core_pool.name} ({core_pool.sha256[:12]})", "default texts from": defaults.source},
    )
    report.write(args.out / "report.html")
    if args.json:
        from ..store.provenance import jsonable

        sys.stdout.write(json.dumps(jsonable(payload), indent=2) + "\n")
    else:
        origin = "the Waterbirds defaults" if defaults.source == "waterbirds" else defaults.source
        overridden = f" (overridden: {', '.join(texts_used['from_arguments'])})" if texts_used["from_arguments"] else ""
        sys.stdout.write(f"texts: {' vs '.join('|'.join(c) for c in class_names)}; spurious {spurious_pool.name} "
                         f"({len(spurious_pool)}), core {core_pool.name} ({len(core_pool)}), templates {templates}; "
                         f"defaults from {origin}{overridden}\n")
        sys.stdout.write(f"{model.name}, {head.kind} head, k = {args.k}; selected on val ({result.n['val']} items): "
                         f"{', '.join(result.selected)}\n\n{table}\n\nwrote {args.out}/debias.json, debias.md, "
                         "debias.svg, report.html\n")
    return 0
