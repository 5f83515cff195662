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
import sys
from pathlib import Path
from typing import Any


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
    p.add_argument("--kinds", default="input",
                   help="components that may be chosen: input (heads, MLPs, neurons...: the default), all, or a comma "
                   "list such as input,embed (embed/rest/bias rows carry no input-specific computation)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """The analysis is :func:`vitdecomp.apps.debias.run_debias`; this writes its result (JSON, table, chart, report)."""
    import json

    from ..apps.debias import run_debias
    from ..report.figures import debias_chart
    from ..store.provenance import run_record, write_json
    from ._common import pretrained_choice

    run_ = run_debias(
        args.root, args.model, stores=args.stores, store_dir=args.store_dir, head=args.head, k=args.k,
        random_draws=args.random_draws, seed=args.seed, class_names=args.class_names, templates=args.templates,
        spurious=args.spurious, core=args.core, c=args.c, align=args.align, text_model=args.text_model,
        pretrained=pretrained_choice(args), checkpoint=args.checkpoint, device=args.device,
        batch_size=args.batch_size, granularity=args.granularity, start_layer=args.start_layer,
        store_dtype=args.store_dtype, num_workers=args.num_workers, progress=not getattr(args, "quiet", False),
        kinds=args.kinds)
    result, texts = run_.result, run_.texts
    files = {"metadata": args.root / "metadata.csv"}
    if texts.source != "waterbirds":
        files["task"] = Path(texts.source)
    if args.align is not None:
        files["align"] = args.align
    payload = {
        "run": run_record("debias", args, stores=run_.stores,
                          pool={"spurious": texts.spurious.manifest(), "core": texts.core.manifest()}, files=files,
                          extra={"model": run_.model, "weights": run_.weights, "text_model": args.text_model,
                                 "templates": texts.templates}),
        **run_.to_json(),
    }
    table = result.format_table()
    svg = debias_chart(result, title=f"Waterbirds test: {run_.model}, {run_.head.kind} head")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "debias.json", payload)
    (args.out / "debias.md").write_text(table + "\n", encoding="utf-8")
    (args.out / "debias.svg").write_text(svg, encoding="utf-8")
    _report(run_, svg).write(args.out / "report.html")
    class_names = " vs ".join("|".join(c) for c in texts.class_names)
    if args.json:
        from ..store.provenance import jsonable

        sys.stdout.write(json.dumps(jsonable(payload), indent=2) + "\n")
    else:
        origin = "the Waterbirds defaults" if texts.source == "waterbirds" else texts.source
        overridden = f" (overridden: {', '.join(run_.from_arguments)})" if run_.from_arguments else ""
        sys.stdout.write(f"texts: {class_names}; spurious {texts.spurious.name} ({len(texts.spurious)}), core "
                         f"{texts.core.name} ({len(texts.core)}), templates {texts.templates}; "
                         f"defaults from {origin}{overridden}\n")
        sys.stdout.write(f"{run_.model}, {run_.head.kind} head, k = {args.k}; selected on val ({result.n['val']} items): "
                         f"{', '.join(result.selected)}\n\n{table}\n\nwrote {args.out}/debias.json, debias.md, "
                         "debias.svg, report.html\n")
    return 0


def _report(run_: Any, svg: str) -> Any:
    """The HTML report of a :class:`~vitdecomp.apps.debias.DebiasRun`: test accuracies, chart, selected components."""
    import json

    from ..report import Figure, Report, Section, Table

    result, texts, k = run_.result, run_.texts, run_.result.k
    s = result.random_summary()
    rows = [[name, m["worst_group"], m["average_group"], m["weighted"]] for name, m in result.rows()]
    rows.append([f"random {k} mean ({len(result.random)} draws)", s["worst_group_mean"], s["average_group_mean"],
                 s["weighted_mean"]])
    rows.append([f"random {k} sd", s["worst_group_sd"], s["average_group_sd"], s["weighted_sd"]])
    rows.append([f"random {k} max", s["worst_group_max"], s["average_group_max"], s["weighted_max"]])
    return Report(
        title="Removing a spurious cue (Waterbirds)",
        subtitle=f"{run_.model}: {run_.head.kind} head, top {k} components by contrastive score on val, mean-ablated "
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
        meta={"model": run_.model, "weights": run_.weights, "n": json.dumps(result.n),
              "class names": " vs ".join("|".join(c) for c in texts.class_names), "templates": str(texts.templates),
              "spurious texts": f"{texts.spurious.name} ({texts.spurious.sha256[:12]})",
              "core texts": f"{texts.core.name} ({texts.core.sha256[:12]})", "default texts from": texts.source},
    )
