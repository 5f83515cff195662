"""``vitdecomp align STORE --clip-store CLIPSTORE --out DIR``: fit CompAlign (docs/method.md §3) from two stores.

STORE is a decomposition of any model; CLIPSTORE a decomposition of a CLIP model over the same
images (row ``i`` of both is the same image; only its ``reference`` rows, the CLIP image
embeddings, are read). The fit streams mini-batches from both stores (one batch in memory) and
writes:

* ``DIR/compalign.safetensors``: the maps (:meth:`vitdecomp.interpret.align.CompAlign.load`), read by
  ``vitdecomp label STORE --align DIR``;
* ``DIR/checkpoint`` (+ ``checkpoint.inputs.json``): the training state after every epoch; a
  killed run (or one ended by ``--stop-after``) continues with ``--resume`` and gives the maps
  of an uninterrupted run;
* ``DIR/align.json``: held-out metrics (mean cosine of the mapped sum with the CLIP embedding,
  orthogonality defect per map, optional zero-shot accuracy of the mapped sum, optional TextSpan
  match rate ``metrics.textspan_match_rate``, docs/method.md §3 metric (b), with ``--match-rate``) and the
  run record.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import InputError

CHECKPOINT = "checkpoint"
CHECKPOINT_INPUTS = "checkpoint.inputs.json"
RESULT_FILE = "align.json"
_STORE_KEYS = ("config_hash", "n_items", "labels_sha256", "chunks_done", "manifest_sha256")


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
        "row index measure the fit. Writes DIR/compalign.safetensors, DIR/align.json and a checkpoint per epoch "
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
    p.add_argument("--epochs", type=int, help="maximum passes over the training rows (default 2)")
    p.add_argument("--patience", type=int,
                   help="stop after N epochs without a better held-out cosine; 0: never (default 2)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default 3e-4)")
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


def _map_names(args: argparse.Namespace, labels: list[str]) -> tuple[Any, list[str]]:
    """``(groups or None, one name per map)`` for the chosen sharing."""
    from ..core.labels import parse_label

    if args.maps == "shared":
        return None, ["shared"]
    if args.maps == "per-component":
        return None, list(labels)
    keys: dict[str, list[int]] = {}
    for i, name in enumerate(labels):
        if args.group_by == "kind":
            key = parse_label(name).kind
        else:
            key = name.rsplit(".", 1)[0] if "." in name else name
        keys.setdefault(key, []).append(i)
    return [tuple(v) for v in keys.values()], list(keys)


def _config(args: argparse.Namespace, labels: list[str]) -> tuple[Any, list[str]]:
    """The :class:`~vitdecomp.interpret.align.AlignConfig` of the options (AlignConfig's defaults for those left out)."""
    from ..interpret.align import AlignConfig

    groups, names = _map_names(args, labels)
    given = {"parametrisation": args.objective, "constraint": args.constraint, "lam": args.lam, "lr": args.lr,
             "weight_decay": args.weight_decay, "epochs": args.epochs, "batch_size": args.batch_size,
             "val_fraction": args.val_fraction, "seed": args.seed}
    kwargs: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if args.patience is not None:
        if args.patience < 0:
            raise InputError("--patience must be >= 0 (0: never stop early)")
        kwargs["patience"] = args.patience or None
    config = AlignConfig(mode=args.maps.replace("-", "_"), groups=groups, common_scale=args.common_scale, **kwargs)
    return config, names


#: transformers ``model_type`` s that are image towers only (no text tower, so not a CLIP space to align into).
_HF_IMAGE_ONLY = frozenset({"clip_vision_model", "siglip_vision_model", "vit", "dinov2", "dinov2_with_registers"})


def _text_tower_missing(spec: str) -> str | None:
    """Why the model of ``spec`` (a store's recorded model) has no text tower, or None when it has one or
    that cannot be told without loading it. Reads no weights: timm models are image-only, open_clip
    models are CLIPs, a transformers model is judged by its config (from a local directory or the cache)."""
    prefix, _, rest = spec.partition(":")
    if prefix == "timm":
        return "a timm image model"
    if prefix != "hf" or not rest:
        return None
    try:
        import transformers

        path = Path(rest).expanduser()
        config = transformers.AutoConfig.from_pretrained(str(path) if path.is_dir() else rest)
    except Exception:  # noqa: BLE001 - unknown here: the fit goes on (and a later text step says so)
        return None
    model_type = getattr(config, "model_type", None)
    return f"a transformers {model_type} image model" if model_type in _HF_IMAGE_ONLY else None


def _require_text_tower(clip_store: Any, path: Path) -> None:
    """Refuse a CLIP store whose recorded model has no text tower (before anything is fitted)."""
    why = _text_tower_missing(str(clip_store.config.model))
    if why is not None:
        raise InputError(
            f"--clip-store {path} was written with {clip_store.config.model} ({why}, no text tower): its embeddings "
            "are not a CLIP space to align into; pass the store of a CLIP (open_clip:..., or an hf CLIP/SigLIP) over "
            "the same images")


def _cli_alternatives(exc: Exception) -> str:
    return (f"{exc}\nWith this command: (1) --objective penalty (the default; --constraint auto or coisometry "
            "penalises ||F F^T - I|| instead); (2) --objective orthogonal --constraint coisometry; (3) a CLIP store "
            "of a CLIP with a wider embedding; (4) --lam 0 (unconstrained; with --maps shared: Text-to-Concept).")


def _store_identity(store: Any) -> dict[str, Any]:
    from ..store.provenance import store_record

    rec = store_record(store)
    return {k: rec[k] for k in _STORE_KEYS}


def _summary(values: list[float]) -> dict[str, float]:
    import numpy as np

    a = np.asarray(values, dtype=np.float64)
    return {"min": float(a.min()), "median": float(np.median(a)), "mean": float(a.mean()), "max": float(a.max())}


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    from ..interpret.align import (
        ALIGN_FILE,
        AlignmentInfeasibleError,
        done_rows as _done_rows,
        fit_compalign,
        paired_rows,
        resolve_constraint,
        store_batches,
        validation_mask,
    )
    from ..store.provenance import run_record, write_json
    from ..store.component_store import ComponentStore

    if args.stop_after is not None and args.stop_after < 1:
        raise InputError("--stop-after must be >= 1")
    if args.read_batch is not None and args.read_batch < 1:
        raise InputError("--read-batch must be >= 1")
    if args.model and not (args.classes or args.match_rate):
        raise InputError("--model names the CLIP whose text tower embeds --classes; give --classes too")
    match_classes = args.match_classes or args.classes
    if args.match_rate and match_classes is None:
        raise InputError("--match-rate needs the names of the model's classes: --match-classes FILE (or --classes)")
    if args.match_classes is not None and not args.match_rate:
        raise InputError("--match-classes is only read with --match-rate")
    if args.match_m < 1:
        raise InputError("--match-m must be at least 1")
    store = ComponentStore.open(args.store)
    clip_store = ComponentStore.open(args.clip_store)
    _require_text_tower(clip_store, args.clip_store)
    labels = list(store.labels)
    n_comp, d_model, d_clip = len(labels), int(store.comp_shape[-1]), int(clip_store.ref_dim)
    config, map_names = _config(args, labels)
    try:
        resolve_constraint(config, d_model, d_clip)
    except AlignmentInfeasibleError as exc:
        raise AlignmentInfeasibleError(_cli_alternatives(exc)) from None
    if store.ref_dim != d_model:
        raise InputError(f"{args.store}: components are {d_model} wide but the reference {store.ref_dim}: a store of "
                         "projections (--directions) cannot be aligned")
    usable = paired_rows(store, clip_store)
    rows = np.flatnonzero(usable)
    n_val = int(validation_mask(rows, config.seed, config.val_fraction).sum())
    if n_val == 0 or n_val == rows.size:
        raise InputError(f"{rows.size} rows usable in both stores, {n_val} of them held out: the fit needs rows in "
                         "both splits (more rows, or another --val-fraction)")

    head = None
    zero_shot_model = None
    if args.classes is not None:
        head, zero_shot_model = _class_head(args, clip_store, d_clip)
    match_inputs = _match_inputs(args, store, clip_store, match_classes, d_clip) if args.match_rate else None

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    ckpt, ckpt_inputs = out / CHECKPOINT, out / CHECKPOINT_INPUTS
    identity = {"model": _store_identity(store), "clip": _store_identity(clip_store)}
    next_epoch = 0
    if ckpt.exists():
        if not args.resume:
            raise InputError(f"{ckpt} exists (an earlier run): continue it with --resume, or choose another --out")
        recorded = json.loads(ckpt_inputs.read_text(encoding="utf-8")) if ckpt_inputs.is_file() else None
        if recorded != identity:
            raise InputError(f"{ckpt} was written for other stores (or they changed since: {ckpt_inputs}); "
                             "delete the checkpoint or choose another --out")
        state = torch.load(ckpt, map_location="cpu", weights_only=True).get("state", {})
        next_epoch = int(state.get("next_epoch", 0)) if not state.get("stopped") else config.epochs
    else:
        write_json(ckpt_inputs, identity)

    read_batch = args.read_batch or store.batch_size
    base = store_batches(store, clip_store, batch_size=read_batch, rows=usable)
    total = math.ceil(int(_done_rows(store)[1].sum()) / read_batch)  # batches of the store's valid rows
    quiet = bool(getattr(args, "quiet", False))
    remaining = config.epochs - next_epoch
    stop_after = args.stop_after if args.stop_after is not None and args.stop_after < remaining else None
    passes = {"n": 0}

    class _Stop(Exception):
        pass

    def source() -> Any:
        if stop_after is not None and passes["n"] >= stop_after:
            raise _Stop
        passes["n"] += 1
        return tqdm(base(), total=total, desc=f"align pass {passes['n']}", unit="batch",
                    disable=quiet or total < 2, leave=False)

    t0 = time.perf_counter()
    try:
        align = fit_compalign(source, n_comp, d_model, d_clip, config, checkpoint=ckpt, labels=labels,
                              device=args.device)
    except _Stop:
        done = next_epoch + stop_after  # type: ignore[operator]
        sys.stdout.write(f"stopped after epoch {done}/{config.epochs}; the state is in {ckpt}: run the same "
                         "command with --resume to finish\n")
        return 0
    fit_s = time.perf_counter() - t0
    align.meta.update(model=store.config.model, weights=store.config.weights, clip_model=clip_store.config.model,
                      clip_weights=clip_store.config.weights, store_config_hash=store.config.hash(),
                      clip_store_config_hash=clip_store.config.hash())
    align_path = align.save(out / ALIGN_FILE)

    val = align.metrics(base, split="val")
    defects = [float(x) for x in val["defect"]]
    scales = [float(x) for x in val["scale"]]
    metrics: dict[str, Any] = {
        "val_cosine": val["cosine"],
        "val_cosine_distance": val["cosine_distance"],
        "val_rows": val["n"],
        "lsq_scale": val["lsq_scale"],
        "constraint": val["constraint"],
        "defect": {"summary": _summary(defects), "per_map": dict(zip(map_names, defects))},
        "scale": {"summary": _summary(scales), "per_map": dict(zip(map_names, scales))},
        "energy_retained": _summary([float(x) for x in val["energy_retained"]]),
    }
    if head is not None:
        metrics["zero_shot"] = _zero_shot(align, base, store, head, config)
    if match_inputs is not None:
        metrics["textspan_match_rate"] = _match_rate(args, align, base, labels, config, match_inputs)
    payload = {
        "store": str(args.store),
        "clip_store": str(args.clip_store),
        "alignment": str(align_path),
        "config": config.to_json(),
        "constraint": align.constraint,
        "n_components": n_comp,
        "d_model": d_model,
        "d_clip": d_clip,
        "maps": map_names,
        "rows": {"usable": int(rows.size), "val": n_val, "train": int(rows.size) - n_val,
                 "store": store.n_items},
        "fit": {k: align.meta[k] for k in ("val_cosine", "best_epoch", "stopped_early", "scale_calibration",
                                           "history", "train_loss")},
        "fit_seconds": fit_s,
        "metrics": metrics,
        "run": run_record("align", args, stores={"model": store, "clip": clip_store},
                          files={k: v for k, v in (("classes", args.classes), ("match_classes", args.match_classes))
                                 if v is not None} or None,
                          extra={"config": config.to_json(), "resumed_at_epoch": next_epoch or None,
                                 "zero_shot_model": zero_shot_model}),
    }
    write_json(out / RESULT_FILE, payload)
    lines = [f"CompAlign {n_comp} components -> {align.n_maps} maps [{d_clip}x{d_model}], {config.parametrisation}, "
             f"{align.constraint}",
             f"held-out cosine {val['cosine']:.4f} on {val['n']} rows (best epoch {align.meta['best_epoch']}), "
             f"defect max {max(defects):.3g}"]
    if head is not None:
        zs = metrics["zero_shot"]
        lines.append(f"zero-shot accuracy of the mapped sum {_pct(zs['val']['aligned'])} (CLIP itself "
                     f"{_pct(zs['val']['clip'])}) on {zs['val']['n']} held-out rows")
    if match_inputs is not None:
        mr = metrics["textspan_match_rate"]
        lines.append(f"TextSpan match rate {_pct(mr['match_rate'])} (ordered {_pct(mr['match_rate_ordered'])}) over "
                     f"{mr['n_components']} components, m = {mr['m']} (chance {_pct(mr['chance'])}), {mr['n_images']} "
                     f"{args.match_split} rows")
    lines.append(f"wrote {align_path} and {out / RESULT_FILE}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _class_head(args: argparse.Namespace, clip_store: Any, d_clip: int, path: Path | None = None) -> tuple[Any, str]:
    """Zero-shot head ``[n_classes, d_clip]`` of the class names in ``path`` (default ``--classes``)."""
    from ..core.loading import load
    from ..interpret.text import text_encoder, zero_shot_head
    from ._common import load_store_model, pretrained_choice

    path = path if path is not None else args.classes
    if not path.is_file():
        raise InputError(f"--classes: no such file {path}")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise InputError(f"--classes {path} lists no class names")
    spec = args.model or clip_store.config.model
    if args.model is None:
        model = load_store_model(clip_store, None, pretrained=pretrained_choice(args))
    else:
        model = load(spec, pretrained=not args.no_pretrained)
    head = zero_shot_head(text_encoder(model), names, args.templates)
    if head.shape[1] != d_clip:
        raise InputError(f"the text tower of {spec} is {head.shape[1]} wide, the CLIP store's embeddings {d_clip}")
    return head, spec


def _zero_shot(align: Any, source: Any, store: Any, head: Any, config: Any) -> dict[str, Any]:
    """Top-1 zero-shot accuracy of the mapped sum ``Σ_i F_i c_i`` and of the CLIP embedding itself,
    on the held-out rows and on all usable rows with a known target in ``[0, n_classes)``."""
    import numpy as np
    import torch

    from ..interpret.align import validation_mask
    from ..interpret.text import zero_shot_logits

    n_classes = int(head.shape[0])
    counts = {split: {"n": 0, "aligned": 0, "clip": 0} for split in ("val", "all")}
    out_of_range = 0
    with torch.no_grad():
        for values, targets, rows in source():
            idx = rows.numpy()
            tgt = store.targets(idx)
            known = tgt >= 0
            out_of_range += int((tgt >= n_classes).sum())
            keep = known & (tgt < n_classes)
            if not keep.any():
                continue
            k = torch.from_numpy(keep)
            pred_a = zero_shot_logits(align.predict(values[k]), head).argmax(-1).numpy()
            pred_c = zero_shot_logits(targets[k], head).argmax(-1).numpy()
            t = tgt[keep]
            val = validation_mask(idx[keep], config.seed, config.val_fraction)
            for split, sel in (("val", val), ("all", np.ones_like(val))):
                counts[split]["n"] += int(sel.sum())
                counts[split]["aligned"] += int((pred_a[sel] == t[sel]).sum())
                counts[split]["clip"] += int((pred_c[sel] == t[sel]).sum())
    result: dict[str, Any] = {"n_classes": n_classes, "targets_out_of_range": out_of_range}
    for split, c in counts.items():
        n = c["n"]
        result[split] = {"n": n, "aligned": c["aligned"] / n if n else None, "clip": c["clip"] / n if n else None}
    if counts["all"]["n"] == 0:
        result["note"] = "no usable row has a known target below the number of classes"
    return result


def _classifier_rows(store: Any) -> Any:
    """The classifier rows ``W [n_classes, d_model]`` of the store's own model (``logits = z Wᵀ + b``).

    The model is loaded as the store records it (:func:`~vitdecomp.cli._common.load_store_model`); a store
    of a shipped tiny model (``tiny:KIND:FOLDER``) reloads that shipped model.
    """
    import torch

    from ._common import load_store_model

    name = str(store.config.model)
    if name.startswith("tiny:"):
        from ..core.tiny import load_tiny
        from ..core.shipped import shipped_path

        model = load_tiny(shipped_path(name.rsplit(":", 1)[-1]))
    else:
        model = load_store_model(store, None)
    found = model.classifier()
    if found is None:
        raise InputError(f"{name} has no classifier head of its own: the match rate needs its class vectors")
    return found[0].detach().to(torch.float64).cpu()


def _match_inputs(args: argparse.Namespace, store: Any, clip_store: Any, classes: Path, d_clip: int) -> dict[str, Any]:
    """Classifier rows, CLIP class embeddings and class names for :func:`_match_rate` (checked before the fit)."""
    rows = _classifier_rows(store)
    if rows.shape[1] != store.comp_shape[-1]:
        raise InputError(f"the classifier of {store.config.model} is {rows.shape[1]} wide, the components "
                         f"{store.comp_shape[-1]}: the store does not hold the classifier's input features")
    emb, spec = _class_head(args, clip_store, d_clip, classes)
    names = [n.strip() for n in classes.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if len(names) != rows.shape[0]:
        raise InputError(f"{classes} names {len(names)} classes, the classifier of {store.config.model} has "
                         f"{rows.shape[0]}: line k must name the model's class k")
    return {"rows": rows, "embeddings": emb, "names": names, "text_model": spec}


def _match_rate(args: argparse.Namespace, align: Any, source: Any, labels: list[str], config: Any,
                inputs: dict[str, Any]) -> dict[str, Any]:
    """TextSpan match rate (:func:`vitdecomp.interpret.textspan.textspan_match_rate`) from one pass over the rows of
    ``--match-split``: the model-space moments of the scored components (the mapped moments follow exactly)."""
    import torch

    from ..interpret.align import validation_mask
    from ..store.component_store import RunningMoments
    from ..interpret.textspan import textspan_match_rate

    comps = ([i for i, n in enumerate(labels) if ".H" in n] if args.match_components == "heads"
             else list(range(len(labels))))
    if not comps:
        raise InputError("--match-rate: the store has no attention heads (use --match-components all)")
    idx = torch.as_tensor(comps, dtype=torch.long)
    moments = RunningMoments(len(comps), align.d_model, covariance=True)
    for values, _, rows in source():
        if args.match_split == "val":
            keep = torch.from_numpy(validation_mask(rows.numpy(), config.seed, config.val_fraction))
            values = values[keep]
        if values.shape[0]:
            moments.update(values.index_select(1, idx).to(torch.float64))
    if moments.count < 2:
        raise InputError(f"--match-rate: {moments.count} {args.match_split} rows; the moments need more "
                         "(--match-split all, or more rows)")
    maps = align.maps.index_select(0, idx)
    result = textspan_match_rate(moments, maps, inputs["rows"], inputs["embeddings"],
                                 labels=[labels[i] for i in comps], class_names=inputs["names"], m=args.match_m,
                                 rank=args.match_rank)
    result.update(split=args.match_split, text_model=inputs["text_model"], templates=args.templates,
                  components=args.match_components)
    return result
