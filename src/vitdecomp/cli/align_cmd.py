"""``vitdecomp align STORE --clip-store CLIPSTORE --out DIR``: fit CompAlign (docs/method.md §3) from two stores.

STORE is a decomposition of any model; CLIPSTORE a decomposition of a CLIP model over the same images
(row ``i`` of both is the same image; only its ``reference`` rows, the CLIP image embeddings, are read).
Parses the options and calls :func:`vitdecomp.interpret.align.fit_alignment`, which streams mini-batches
from both stores (one batch in memory) and writes into DIR:

* ``DIR/compalign.safetensors``: the maps (:meth:`vitdecomp.interpret.align.CompAlign.load`), read by
  ``vitdecomp label STORE --align DIR``;
* ``DIR/checkpoint`` (+ ``checkpoint.inputs.json``): the training state after every epoch; a
  killed run (or one ended by ``--stop-after``) continues with ``--resume`` and gives the maps
  of an uninterrupted run;

and this command writes ``DIR/align.json``: the result's ``to_json()`` (held-out metrics: mean cosine of the
mapped sum with the CLIP embedding, orthogonality defect per map, optional zero-shot accuracy of the mapped
sum, optional TextSpan match rate ``metrics.textspan_match_rate``, docs/method.md §3 metric (b), with
``--match-rate``) and the run record.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    # Options left out take AlignConfig's defaults (named in the help; read in run(), so that
    # `vitdecomp --help` imports nothing heavy).
    p = sub.add_parser(
        "align",
        parents=parents,
        help="fit CompAlign maps from a model's stored components into a CLIP space",
        description="Fit one linear map per component (CompAlign, docs/method.md §3) from STORE's components into the CLIP "
        "space of CLIPSTORE, so that the mapped sum matches the CLIP image embedding of the same image (cosine "
        "loss), keeping each map close to a scaled isometry. Label-free; rows held out by a seeded hash of the "
        "row index measure the fit. The optimiser starts from the closed-form least-squares maps (one extra pass); "
        "the held-out cosine after every epoch is recorded, and a warning is printed (and written to align.json) "
        "when it stays below 0.5 or training stopped at --epochs while still improving. Writes "
        "DIR/compalign.safetensors, DIR/align.json and a checkpoint per epoch "
        "(continue an interrupted run with --resume). Use the maps with `vitdecomp label STORE --align DIR`.",
    )
    p.add_argument("store", type=Path, metavar="STORE",
                   help="store of the model to align (`vitdecomp decompose MODEL DATA --out STORE`)")
    p.add_argument("--clip-store", type=Path, required=True, metavar="CLIPSTORE",
                   help="store of a CLIP model over the same images, in the same order (its reference rows are the "
                   "CLIP image embeddings)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument("--objective", choices=("penalty", "orthogonal"),
                   help="penalty: cosine loss + lam * sum ||F^T F - I||_F (the paper; default); orthogonal: "
                   "F = s Q with orthonormal Q exactly")
    p.add_argument("--constraint", choices=("auto", "isometry", "coisometry"),
                   help="Gram side kept orthogonal; auto (default): the isometry F^T F when d_model <= d_clip")
    p.add_argument("--lam", type=float, help="penalty weight (penalty objective; 0: unconstrained; default 1/768)")
    p.add_argument("--common-scale", action="store_true",
                   help="orthogonal objective: one scale shared by all maps (Theorem 1's common k)")
    p.add_argument("--maps", choices=("per-component", "grouped", "shared"), default="per-component",
                   help="one map per component (CompAlign, default), per group (--group-by) or one for all "
                   "(Text-to-Concept)")
    p.add_argument("--group-by", choices=("layer", "kind"), default="layer",
                   help="with --maps grouped: components of one block (layer, default) or of one kind share a map")
    p.add_argument("--preset", choices=("default", "published"), default="default",
                   help="starting settings, overridden by the options given: default (least-squares start, then "
                   "the objective; lr 3e-5, 10 epochs) or published (the published code's random start, lr 3e-4, "
                   "2 epochs, batch 32, for comparison)")
    p.add_argument("--init", choices=("lstsq", "random"),
                   help="start of the optimiser: lstsq (default) the closed-form least-squares maps (made scaled "
                   "(co-)isometries for a constrained objective), from one extra pass; random: a random isometry")
    p.add_argument("--ridge", type=float,
                   help="relative ridge of the least-squares start, times tr(A_gg)/d_model per map (default 1e-4)")
    p.add_argument("--sweeps", type=int,
                   help="most block-coordinate Procrustes sweeps of the least-squares start (default 50; 0: polar "
                   "projection only)")
    p.add_argument("--epochs", type=int, help="maximum passes over the training rows (default 10)")
    p.add_argument("--patience", type=int,
                   help="stop after N epochs without a better held-out cosine; 0: never (default 2)")
    p.add_argument("--min-delta", type=float,
                   help="for --patience, an epoch is better only when it raises the held-out cosine by more than "
                   "this (default 1e-4)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default 3e-5)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay of the maps (default 0)")
    p.add_argument("--batch-size", type=int, help="training rows per optimiser step (default 32)")
    p.add_argument("--read-batch", type=int, help="rows read from the store at a time (default: its chunk size)")
    p.add_argument("--val-fraction", type=float, help="share of rows held out (default 0.1)")
    p.add_argument("--seed", type=int, help="initialisation and held-out split (default 0)")
    p.add_argument("--device", default="cpu", help="torch device for the fit (default cpu)")
    p.add_argument("--resume", action="store_true",
                   help="continue from DIR/checkpoint (same stores and options); without one, start afresh")
    p.add_argument("--stop-after", type=int, metavar="EPOCHS",
                   help="end this run after EPOCHS more epochs, keeping the checkpoint (finish later with --resume)")
    z = p.add_argument_group("zero-shot accuracy of the mapped sum (optional)")
    z.add_argument("--classes", type=Path,
                   help="text file, one class name per line, line k naming the stores' target k")
    z.add_argument("--model", help="CLIP model spec for the class texts (default: the CLIP store's model, rebuilt "
                   "from its record)")
    z.add_argument("--no-pretrained", action="store_true", help="random weights for --model (offline)")
    z.add_argument("--templates", default="photo", help="template set for the class names (default photo)")
    t = p.add_argument_group("TextSpan match rate (docs/method.md §3 metric (b), optional)")
    t.add_argument("--match-rate", action="store_true",
                   help="per head, TextSpan over the model's own classifier rows on the raw components against "
                   "TextSpan over the CLIP embeddings of the class names on the mapped components; writes the mean "
                   "agreement as metrics.textspan_match_rate (needs the store's model to have a classifier)")
    t.add_argument("--match-classes", type=Path, metavar="FILE",
                   help="names of the model's classifier classes, line k = class k (default: --classes)")
    t.add_argument("--match-m", type=int, default=10, help="TextSpan picks per head for the match rate (default 10)")
    t.add_argument("--match-rank", type=int, default=80, help="TextSpan rank for the match rate (default 80)")
    t.add_argument("--match-split", choices=("val", "all"), default="val",
                   help="rows whose moments feed the match rate: held-out (default) or all usable rows")
    t.add_argument("--match-components", choices=("heads", "all"), default="heads",
                   help="components scored: attention heads (default) or every component")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from ..errors import InputError
    from ..interpret.align import PRESETS, RESULT_FILE, AlignmentInfeasibleError, MatchRateOptions, fit_alignment
    from ..interpret.inputs import ModelChoice
    from ..store.provenance import run_record, write_json

    match_classes = args.match_classes or args.classes
    if args.match_rate and match_classes is None:
        raise InputError("--match-rate needs the names of the model's classes: --match-classes FILE (or --classes)")
    if args.match_classes is not None and not args.match_rate:
        raise InputError("--match-classes is only read with --match-rate")
    if args.patience is not None and args.patience < 0:
        raise InputError("--patience must be >= 0 (0: never stop early)")
    given = {"parametrisation": args.objective, "constraint": args.constraint, "lam": args.lam, "lr": args.lr,
             "weight_decay": args.weight_decay, "epochs": args.epochs, "batch_size": args.batch_size,
             "val_fraction": args.val_fraction, "seed": args.seed, "common_scale": args.common_scale,
             "init": args.init, "ridge": args.ridge, "sweeps": args.sweeps, "min_delta": args.min_delta}
    settings: dict[str, Any] = {**PRESETS[args.preset], **{k: v for k, v in given.items() if v is not None}}
    if args.patience is not None:
        settings["patience"] = args.patience or None
    match = (MatchRateOptions(match_classes, m=args.match_m, rank=args.match_rank, split=args.match_split,
                              components=args.match_components) if args.match_rate else None)
    text_model = (ModelChoice(args.model, pretrained=False if args.no_pretrained else None)
                  if args.model or args.no_pretrained else None)
    try:
        result = fit_alignment(args.store, args.clip_store, args.out, maps=args.maps, group_by=args.group_by,
                               settings=settings, read_batch=args.read_batch, device=args.device, resume=args.resume,
                               stop_after=args.stop_after, classes=args.classes, text_model=text_model,
                               templates=args.templates, match_rate=match, progress=not getattr(args, "quiet", False))
    except AlignmentInfeasibleError as exc:
        raise AlignmentInfeasibleError(_cli_alternatives(exc)) from None
    text = result.format()
    if result.finished:
        payload = {**result.to_json(),
                   "run": run_record("align", args, stores={"model": result.store, "clip": result.clip_store},
                                     files=result.files or None,
                                     extra={"config": result.config.to_json(),
                                            "resumed_at_epoch": result.resumed_at_epoch or None,
                                            "zero_shot_model": result.zero_shot_model})}
        write_json(result.out / RESULT_FILE, payload)
        text += f"\nwrote {result.alignment_file} and {result.out / RESULT_FILE}"
    sys.stdout.write(text + "\n")
    return 0


def _cli_alternatives(exc: Exception) -> str:
    return (f"{exc}\nWith this command: (1) --objective penalty (the default; --constraint auto or coisometry "
            "penalises ||F F^T - I|| instead); (2) --objective orthogonal --constraint coisometry; (3) a CLIP store "
            "of a CLIP with a wider embedding; (4) --lam 0 (unconstrained; with --maps shared: Text-to-Concept).")
