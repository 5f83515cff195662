"""``vitdecomp ablate STORE``: accuracy of a stored decomposition with components ablated (docs/method.md §6.1).

Two streaming passes over the stores: the reference set first (per-component means, and the linear
head's normal equations for ``--head linear``), then the evaluated rows, where the unablated point,
the chosen set and every point of the cumulative block curves are scored together.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import add_model_arguments

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ..core.stack import ComponentStack
    from ..store.component_store import ComponentStore

log = logging.getLogger(__name__)

ROWS_RECORDED = 100_000
"""Reference / evaluated row lists up to this length are written to ablate.json in full (always their sha256)."""
_RESAMPLE_KEY = 0x5DEECE66D  # decorrelates the resample draw from the reference split of the same seed
_COMPATIBLE_IGNORED = ("n_items", "batch_size", "dtype", "package_version", "extra.dataset")


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


# ---------------------------------------------------------------------------- inputs
def read_classes(path: Path) -> list[str]:
    """Class names of a file: one per line, blank lines and ``#`` comments skipped; repeats are an error."""
    from ..errors import InputError

    if not path.is_file():
        raise InputError(f"class file {path} does not exist (one class name per line, line i = target i)")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read class file {path}: {exc}") from exc
    names = [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]
    if not names:
        raise InputError(f"class file {path} holds no class names")
    repeats = sorted({n for n in names if names.count(n) > 1})
    if repeats:
        raise InputError(f"class file {path} repeats {repeats[:5]}: each line must be one distinct class")
    return names


def components_from_scores(path: Path, *, by: str | None, k: int, variant: str | None) -> list[str]:
    """The ``k`` best components of a ``score.json``: by its contrast ranking or by one feature's scores."""
    import numpy as np

    from ..errors import InputError
    from ..interpret.score import ScoreTable

    if not path.is_file():
        raise InputError(f"--top-from {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        tables = data["tables"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"--top-from {path} is not a `vitdecomp score` result: {exc}") from exc
    if not tables:
        raise InputError(f"--top-from {path} holds no score tables")
    variant = variant or next(iter(tables))
    if variant not in tables:
        raise InputError(f"--top-variant {variant} not in {path} (has {list(tables)})")
    table = ScoreTable.from_json(tables[variant])
    if by is None:
        if "contrast" in data:
            by = "contrast"
        elif len(table.features) == 1:
            by = table.features[0]
        else:
            raise InputError(f"{path} scores {len(table.features)} features; say which with --top-by "
                             f"({', '.join(table.features)})")
    if by == "contrast":
        if "contrast" not in data:
            raise InputError(f"{path} has no contrast ranking (run `vitdecomp score ... --contrast SPURIOUS CORE`)")
        return list(data["contrast"]["by_variant"][variant]["ranking"][:k])
    if by not in table.features:
        raise InputError(f"--top-by {by}: not a feature of {path} ({', '.join(table.features)}) nor 'contrast'")
    col = table[by]
    return [table.labels[i] for i in np.argsort(-col, kind="stable")[:k]]


def check_compatible(store: ComponentStore, ref: ComponentStore) -> None:
    """A reference store must hold the same components of the same model run the same way."""
    from ..errors import InputError

    problems = [d for d in store.config.diff(ref.config)
                if not any(d.startswith(f"{key}:") or d.startswith(f"{key}.") for key in _COMPATIBLE_IGNORED)]
    if list(store.labels) != list(ref.labels):
        problems.append("components (labels) differ")
    if store.comp_shape[-1] != ref.comp_shape[-1]:
        problems.append(f"width {store.comp_shape[-1]} != {ref.comp_shape[-1]}")
    if store.space != ref.space:
        problems.append(f"space {store.space} != {ref.space}")
    if problems:
        raise InputError(f"reference store {ref.path} does not match {store.path}: " + "; ".join(problems[:8]))
    ds, dr = store.config.extra.get("dataset"), ref.config.extra.get("dataset")
    if ds is not None and ds == dr:
        log.warning("the reference store %s holds the same dataset as %s: the means come from the evaluated "
                    "images (use a separate split)", ref.path, store.path)


# ---------------------------------------------------------------------------- passes
def _uniform(rows: np.ndarray, seed: int) -> np.ndarray:
    """u(seed, row) in [0, 1) from splitmix64 (as vitdecomp.interpret.align.validation_mask, other key)."""
    import numpy as np

    from ..interpret.align import splitmix64 as _splitmix64

    key = _splitmix64(np.asarray([seed ^ _RESAMPLE_KEY], dtype=np.int64).astype(np.uint64))[0]
    with np.errstate(over="ignore"):
        h = _splitmix64(np.asarray(rows, dtype=np.int64).astype(np.uint64) ^ key)
    return (h >> np.uint64(11)).astype(np.float64) / float(2**53)


def _subset(stack: ComponentStack, keep: np.ndarray) -> ComponentStack:
    """The items of a (token-summed) stack where ``keep`` is true."""
    import numpy as np
    import torch

    idx = torch.as_tensor(np.flatnonzero(keep) if keep.dtype == bool else keep, dtype=torch.long)
    meta = dict(stack.meta)
    for key in ("rows", "ids", "valid"):
        if key in meta:
            meta[key] = [meta[key][i] for i in idx.tolist()]
    return replace(stack.take_items(idx), meta=meta)


class _Reference:
    """Pass 1: per-component sums (means) and, for the linear head, normal equations over the reference rows."""

    def __init__(self, n_components: int, dim: int, *, linear: bool) -> None:
        import torch

        self.sum = torch.zeros(n_components, dim, dtype=torch.float64)
        self.count = 0
        self.rows: list[np.ndarray] = []
        self.linear = linear
        self.gram = torch.zeros(dim + 1, dim + 1, dtype=torch.float64) if linear else None
        self.class_sums: dict[int, torch.Tensor] = {}

    def update(self, stack: ComponentStack, targets: np.ndarray) -> None:
        import numpy as np
        import torch

        values = stack.values.to(torch.float64)  # [comp, b, d]
        self.sum += values.sum(1)
        self.count += values.shape[1]
        self.rows.append(np.asarray(stack.meta["rows"], dtype=np.int64))
        if self.linear:
            assert self.gram is not None
            known = torch.as_tensor(targets >= 0)
            x = torch.cat([values.sum(0), torch.ones(values.shape[1], 1, dtype=torch.float64)], 1)[known]
            self.gram += x.T @ x
            for c in np.unique(targets[targets >= 0]).tolist():
                part = x[torch.as_tensor(targets[targets >= 0] == c)].sum(0)
                self.class_sums[int(c)] = self.class_sums.get(int(c), 0) + part

    @property
    def means(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    def all_rows(self) -> np.ndarray:
        import numpy as np

        return np.concatenate(self.rows) if self.rows else np.zeros(0, dtype=np.int64)

    def fit_linear(self, n_classes: int, ridge: float) -> tuple[torch.Tensor, dict[str, Any]]:
        """Ridge least squares ``W = (X̃ᵀX̃ + λ I')⁻¹ X̃ᵀY`` on ``x̃ = [z, 1]`` and one-hot ``Y``
        (``I'`` leaves the intercept unpenalised, ``λ = ridge · tr(ZᵀZ)/d``): ``[d + 1, C]``."""
        import torch

        from ..errors import InputError

        assert self.gram is not None
        n = int(round(float(self.gram[-1, -1])))
        if n < 2 or len(self.class_sums) < 2:
            raise InputError(f"--head linear needs reference rows of at least 2 classes with known targets "
                             f"(got {n} rows, {len(self.class_sums)} classes)")
        d = self.gram.shape[0] - 1
        n_classes = max(n_classes, max(self.class_sums) + 1)
        xty = torch.zeros(d + 1, n_classes, dtype=torch.float64)
        for c, v in self.class_sums.items():
            xty[:, c] = v
        lam = ridge * float(torch.trace(self.gram[:d, :d])) / d
        penalty = torch.eye(d + 1, dtype=torch.float64) * lam
        penalty[-1, -1] = 0.0
        w = torch.linalg.solve(self.gram + penalty, xty)
        return w, {"fit": "ridge least squares on one-hot targets, intercept unpenalised", "n_classes": n_classes,
                   "ridge": ridge,
                   "lambda": lam, "n_train": n, "classes_seen": sorted(self.class_sums)}


def _rows_record(rows: np.ndarray) -> dict[str, Any]:
    import numpy as np

    out: dict[str, Any] = {"n_rows": int(rows.size),
                           "rows_sha256": hashlib.sha256(np.ascontiguousarray(rows, dtype="<i8").tobytes()).hexdigest()}
    if rows.size <= ROWS_RECORDED:
        out["rows"] = rows.tolist()
    return out


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..interpret.ablate import accuracy_over_batches, curve_sets
    from ..report.figures import ablation_curves
    from ..interpret.align import validation_mask
    from ..errors import InputError
    from ..store.provenance import run_record, write_json
    from ..interpret.text import resolve_templates, zero_shot_head
    from ._common import iter_with_progress, load_store_model, open_complete_store, pretrained_choice, text_tower

    directions = [] if args.curve.strip().lower() == "none" else [s.strip() for s in args.curve.split(",") if s.strip()]
    bad = [d for d in directions if d not in ("from_last", "from_first")]
    if bad:
        raise InputError(f"--curve {args.curve}: use from_last, from_first (comma-separated) or none")
    if args.top_k < 1:
        raise InputError("--top-k must be at least 1")
    if args.reference_fraction is not None and not 0.0 < args.reference_fraction < 1.0:
        raise InputError(f"--reference-fraction must be in (0, 1), got {args.reference_fraction}")
    classes = read_classes(args.classes) if args.classes is not None else None
    store = open_complete_store(args.store)
    labels = list(store.labels)
    files: dict[str, Path] = {}
    if args.classes is not None:
        files["classes"] = args.classes

    # ---- components
    if args.top_from is not None:
        chosen_names = components_from_scores(args.top_from, by=args.top_by, k=args.top_k, variant=args.top_variant)
        files["top_from"] = args.top_from
    else:
        chosen_names = list(dict.fromkeys(args.components or []))
    unknown = [c for c in chosen_names if c not in labels]
    if unknown:
        raise InputError(f"no component(s) {unknown[:5]} in {store.path} (it has {', '.join(labels[:6])}, ...)")
    chosen = sorted(labels.index(c) for c in chosen_names)
    if not chosen and not directions:
        raise InputError("nothing to do: give --components / --top-from, or a --curve")
    sets: dict[str, list[int]] = {"unablated": []}
    if chosen:
        sets["ablated"] = chosen
    curve_rows = {d: curve_sets(labels, d) for d in directions}  # type: ignore[arg-type]
    for d, rows in curve_rows.items():
        for n, s in enumerate(rows):
            sets[f"{d}:{n}"] = s

    # ---- reference set
    needs_ref = args.mode != "zero" or args.head == "linear"
    kind = ("store" if args.reference_store is not None else "split" if args.reference_fraction is not None
            else "self" if args.reference_self else None)
    if needs_ref and kind is None:
        what = "--head linear" if args.mode == "zero" else f"--mode {args.mode}"
        raise InputError(f"{what} needs an explicit reference set: --reference-store REF, "
                         "--reference-fraction F [--seed S], or --reference-self")
    if args.head == "linear" and kind == "self":
        raise InputError("--head linear is fitted on the reference set, which must be disjoint from the evaluated "
                         "rows: use --reference-store or --reference-fraction")
    ref_store = None
    if kind == "store":
        ref_store = open_complete_store(args.reference_store, role="reference store")
        check_compatible(store, ref_store)

    # ---- targets
    all_targets = store.targets(slice(None))
    if not (all_targets >= 0).any():
        raise InputError(f"{store.path} has no class targets (decompose a labelled dataset, e.g. a class folder)")

    # ---- head (zero-shot / model) before the passes, so bad input fails fast
    head_info: dict[str, Any]
    predict: Callable[[torch.Tensor], torch.Tensor] | None = None
    n_classes: int
    if classes is not None:
        model = load_store_model(store, args.model, args.checkpoint, pretrained=pretrained_choice(args))
        encoder = text_tower(model, hint="zero-shot needs a CLIP store; use --head linear (or --head model)")
        templates = resolve_templates(args.templates)
        w_zs = zero_shot_head(encoder, classes, templates).to(torch.float64)
        if w_zs.shape[1] != store.comp_shape[-1]:
            raise InputError(f"text width {w_zs.shape[1]} != store width {store.comp_shape[-1]}")
        n_classes = len(classes)
        predict = lambda z: (z @ w_zs.T).argmax(-1)  # noqa: E731 - cosine argmax (unit rows; |z| irrelevant)
        head_info = {"kind": "zero-shot", "classes": classes, "templates": list(templates),
                     "model": model.name, "weights": model.weights}
    elif args.head == "model":
        model = load_store_model(store, args.model, args.checkpoint, pretrained=pretrained_choice(args))
        found = model.classifier()
        if found is None:
            raise InputError(f"{model.name} has no classifier head of its own; use --classes FILE or --head linear")
        w_m = found[0].detach().to(torch.float64).cpu()
        b_m = (found[1].detach().to(torch.float64).cpu() if found[1] is not None
               else torch.zeros(w_m.shape[0], dtype=torch.float64))
        if w_m.shape[1] != store.comp_shape[-1]:
            raise InputError(f"classifier width {w_m.shape[1]} != store width {store.comp_shape[-1]}: the store "
                             "does not hold the classifier's input features")
        n_classes = int(w_m.shape[0])
        predict = lambda z: (z @ w_m.T + b_m).argmax(-1)  # noqa: E731
        head_info = {"kind": "model", "n_classes": n_classes, "model": model.name, "weights": model.weights}
    else:
        n_classes = int(all_targets.max()) + 1
        head_info = {"kind": "linear", "n_classes": n_classes}
    if int(all_targets.max()) >= n_classes:
        raise InputError(f"{store.path} has targets up to {int(all_targets.max())} but the head has {n_classes} classes"
                         + (f" ({args.classes} lists {n_classes} names)" if classes is not None else ""))

    # ---- pass 1: the reference set
    split_seed, fraction = args.seed, args.reference_fraction

    def is_reference(rows: np.ndarray) -> np.ndarray:
        if kind == "split":
            return validation_mask(rows, split_seed, fraction)
        return np.zeros(rows.shape, dtype=bool)

    reference = None
    dim = int(store.comp_shape[-1])
    if needs_ref or kind is not None:
        reference = _Reference(len(labels), dim, linear=args.head == "linear")
        source = ref_store if ref_store is not None else store
        for stack in iter_with_progress(source, args, f"reference {source.path.name}"):
            stack = stack.sum_tokens()
            rows = np.asarray(stack.meta["rows"], dtype=np.int64)
            keep = is_reference(rows) if kind == "split" else np.ones(rows.shape, dtype=bool)
            if keep.any():
                part = _subset(stack, keep) if not keep.all() else stack
                reference.update(part, source.targets(rows[keep]))
        if reference.count == 0:
            raise InputError("the reference set is empty (no valid rows); use a larger --reference-fraction or "
                             "another --reference-store")
    if args.head == "linear":
        assert reference is not None
        w_lin, fit = reference.fit_linear(n_classes, args.ridge)
        predict = lambda z: (z @ w_lin[:-1] + w_lin[-1]).argmax(-1)  # noqa: E731
        head_info.update(fit)
        n_classes = int(fit["n_classes"])
    assert predict is not None

    # ---- pass 2: the evaluated rows
    ref_rows = reference.all_rows() if reference is not None else np.zeros(0, dtype=np.int64)
    resample_source = ref_store if ref_store is not None else store

    def resample(stack: ComponentStack) -> torch.Tensor:
        rows = np.asarray(stack.meta["rows"], dtype=np.int64)
        pick = ref_rows[np.minimum((_uniform(rows, args.seed) * ref_rows.size).astype(np.int64), ref_rows.size - 1)]
        drawn = resample_source.components(pick, as_stack=True)
        return drawn.sum_tokens().values.to(torch.float64)  # type: ignore[union-attr]

    evaluated: list[np.ndarray] = []

    def batches() -> Iterator[tuple[ComponentStack, torch.Tensor]]:
        for stack in iter_with_progress(store, args, f"ablate {store.path.name}"):
            rows = np.asarray(stack.meta["rows"], dtype=np.int64)
            targets = store.targets(rows)
            keep = ~is_reference(rows) & (targets >= 0)
            if not keep.any():
                continue
            evaluated.append(rows[keep])
            yield _subset(stack.sum_tokens(), keep), torch.as_tensor(targets[keep])

    results = accuracy_over_batches(batches(), sets, predict, mode=args.mode,
                                    means=reference.means if reference is not None else None,
                                    resample=resample if args.mode == "resample" else None)
    eval_rows = np.concatenate(evaluated) if evaluated else np.zeros(0, dtype=np.int64)
    if eval_rows.size == 0:
        raise InputError("no evaluated rows with a known target (is --reference-fraction too large?)")
    if kind == "split":
        assert not np.intersect1d(eval_rows, ref_rows).size  # disjoint by construction

    # ---- report
    ref_record: dict[str, Any] | None = None
    if kind is not None:
        assert reference is not None
        ref_record = {"kind": kind, **_rows_record(ref_rows)}
        if kind == "store":
            ref_record["store"] = str(ref_store.path)  # type: ignore[union-attr]
        if kind == "split":
            ref_record.update(fraction=fraction, seed=split_seed,
                              rule="row r is a reference row when u(seed, r) < fraction, u from a splitmix64 hash "
                              "of (seed, r) (vitdecomp.interpret.align.validation_mask); the other rows are evaluated")
    curves = {d: [{"n_blocks": n, "components": [labels[i] for i in s], **results[f"{d}:{n}"]}
                  for n, s in enumerate(rows)] for d, rows in curve_rows.items()}
    payload: dict[str, Any] = {
        "run": run_record("ablate", args, store=store, stores={"reference": ref_store} if ref_store else None,
                          files=files or None, extra={"reference": {k: v for k, v in (ref_record or {}).items()
                                                                    if k != "rows"}}),
        "store": str(store.path),
        "mode": args.mode,
        "seed": args.seed,
        "head": head_info,
        "reference": ref_record,
        "evaluated": _rows_record(eval_rows),
        "components": [labels[i] for i in chosen],
        "unablated": results["unablated"],
        "ablated": results.get("ablated"),
        "curves": curves,
    }
    text = _format(payload, n_classes)
    if args.out is not None:
        write_json(args.out / "ablate.json", payload)
        if curves:
            svg = ablation_curves({d: [(p["n_blocks"], p["accuracy"]) for p in pts] for d, pts in curves.items()},
                              title=f"cumulative block {args.mode}-ablation ({store.path.name})")
            (args.out / "ablate.svg").write_text(svg + "\n", encoding="utf-8")
        log.info("wrote %s", args.out / "ablate.json")
    sys.stdout.write(json.dumps(_jsonable(payload), indent=2) + "\n" if args.json else text + "\n")
    return 0


def _jsonable(payload: Any) -> Any:
    from ..store.provenance import jsonable

    return jsonable(payload)


def _acc(entry: dict[str, Any] | None) -> str:
    return "n/a" if entry is None or entry["accuracy"] is None else f"{entry['accuracy']:.4f}"


def _format(payload: dict[str, Any], n_classes: int) -> str:
    ref = payload["reference"]
    head = payload["head"]
    where = "none" if ref is None else {
        "store": lambda: f"store {ref.get('store')}",
        "split": lambda: f"split of the store (fraction {ref['fraction']}, seed {ref['seed']})",
        "self": lambda: "the evaluated rows themselves",
    }[ref["kind"]]()
    lines = [
        f"ablate {payload['store']}: mode {payload['mode']}, head {head['kind']} ({n_classes} classes), "
        f"reference {where}" + (f" ({ref['n_rows']} rows)" if ref else ""),
        f"evaluated rows: {payload['evaluated']['n_rows']}",
        f"unablated accuracy  {_acc(payload['unablated'])}",
    ]
    if payload["ablated"] is not None:
        base, abl = payload["unablated"]["accuracy"], payload["ablated"]["accuracy"]
        delta = f"  (change {abl - base:+.4f})" if base is not None and abl is not None else ""
        comps = payload["components"]
        shown = " ".join(comps[:8]) + (" ..." if len(comps) > 8 else "")
        lines.append(f"ablated accuracy    {_acc(payload['ablated'])}{delta}  [{len(comps)} components: {shown}]")
    for d, points in payload["curves"].items():
        lines.append(f"curve {d} (blocks ablated -> accuracy):")
        lines += [f"  {p['n_blocks']:>3}  {_acc(p)}" for p in points]
    return "\n".join(lines)
