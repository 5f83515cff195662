"""What ``vitdecomp align`` computes: CompAlign fitted from two stores, and its held-out metrics (docs/method.md §3).

:func:`fit_alignment` pairs row ``r`` of a store of any model with row ``r`` of a store of a CLIP over
the same images (its ``reference`` rows ``y(x) ∈ ℝ^{d_clip}`` are the targets), fits one map
``F_i ∈ ℝ^{d_clip × d_model}`` per component (or per group, or one shared map) with
:func:`~vitdecomp.interpret.align.fit.fit_compalign`, streaming one batch at a time and checkpointing
every epoch in ``out``, and measures on the held-out rows (``u(seed, r) < val_fraction``):

* (a) the mean cosine ``cos(Σ_i F_i c_i(x), y(x))`` and the least-squares scale;
* (c) the orthogonality defect ``‖G/ŝ² − I‖_F / √d`` and scale ``ŝ`` of every map, and the energy
  each component keeps, ``Σ‖F_i c_i‖² / (ŝ_i² Σ‖c_i‖²)``;
* optionally the zero-shot accuracy of the mapped sum next to CLIP's own (``classes``): top-1 of
  ``argmax_k ⟨Σ_i F_i c_i, w_k⟩`` against the stores' targets, ``w_k`` the CLIP text embeddings of
  the class names;
* optionally (b) the TextSpan match rate (``match_rate``,
  :func:`~vitdecomp.interpret.textspan.textspan_match_rate`).

The maps go to ``out/compalign.safetensors``; :meth:`AlignmentResult.to_json` is ``align.json``
without its run record.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ...errors import InputError
from ..inputs import ModelChoice, read_classes
from .config import AlignConfig, resolve_constraint
from .data import BatchSource, done_rows, paired_rows, store_batches, validation_mask
from .fit import fit_compalign
from .maps import ALIGN_FILE, CompAlign

if TYPE_CHECKING:
    import torch

    from ...core.model import Model
    from ...store.component_store import ComponentStore

__all__ = ["CHECKPOINT", "CHECKPOINT_INPUTS", "RESULT_FILE", "AlignmentResult", "MapSharing", "MatchRateOptions",
           "alignment_config", "fit_alignment", "text_tower_missing"]

log = logging.getLogger(__name__)

#: Files in the output folder: the training state, the stores it belongs to, the result.
CHECKPOINT = "checkpoint"
CHECKPOINT_INPUTS = "checkpoint.inputs.json"
RESULT_FILE = "align.json"
_STORE_KEYS = ("config_hash", "n_items", "labels_sha256", "chunks_done", "manifest_sha256")
#: transformers ``model_type`` s that are image towers only (no text tower, so not a CLIP space to align into).
_HF_IMAGE_ONLY = frozenset({"clip_vision_model", "siglip_vision_model", "vit", "dinov2", "dinov2_with_registers"})

MapSharing = Literal["per-component", "grouped", "shared"]


@dataclass(frozen=True)
class MatchRateOptions:
    """The TextSpan match rate (docs/method.md §3 metric (b)) of :func:`fit_alignment`.

    Attributes:
        classes: names of the store model's classifier classes (line ``k`` = class ``k``), or their file.
        m: TextSpan picks per component.
        rank: TextSpan rank.
        split: rows whose moments feed it: ``"val"`` (held out) or ``"all"`` usable rows.
        components: ``"heads"`` (attention heads) or ``"all"``.
    """

    classes: Sequence[str] | str | os.PathLike
    m: int = 10
    rank: int = 80
    split: Literal["val", "all"] = "val"
    components: Literal["heads", "all"] = "heads"

    def __post_init__(self) -> None:
        if self.m < 1:
            raise InputError("--match-m must be at least 1")
        if self.split not in ("val", "all") or self.components not in ("heads", "all"):
            raise InputError(f"match rate: split must be val or all, components heads or all "
                             f"(got {self.split!r}, {self.components!r})")


def alignment_config(labels: Sequence[str], *, maps: MapSharing = "per-component", group_by: Literal["layer", "kind"]
                     = "layer", settings: Mapping[str, Any] | None = None) -> tuple[AlignConfig, list[str]]:
    """The :class:`~vitdecomp.interpret.align.AlignConfig` for components ``labels`` and one name per map.

    Args:
        labels: the store's component labels.
        maps: one map per component (``"per-component"``, CompAlign), per group (``"grouped"``) or one
            for all (``"shared"``, Text-to-Concept).
        group_by: with ``"grouped"``: components of one block (``"layer"``: the label up to its last
            ``.``) or of one kind (``"kind"``) share a map.
        settings: other :class:`AlignConfig` fields (``lam``, ``epochs``, ``seed``, ...); the rest keep
            their defaults.

    Returns:
        ``(config, map names)``: the names are the labels, ``["shared"]``, or the group keys.
    """
    from ...core.labels import parse_label

    extra = dict(settings or {})
    clash = sorted({"mode", "groups"} & set(extra))
    if clash:
        raise InputError(f"settings {clash}: the map sharing is given by maps= and group_by=")
    if maps not in ("per-component", "grouped", "shared"):
        raise InputError(f"maps must be per-component, grouped or shared, got {maps!r}")
    groups: list[tuple[int, ...]] | None = None
    if maps == "shared":
        names = ["shared"]
    elif maps == "per-component":
        names = list(labels)
    else:
        if group_by not in ("layer", "kind"):
            raise InputError(f"group_by must be layer or kind, got {group_by!r}")
        keys: dict[str, list[int]] = {}
        for i, name in enumerate(labels):
            key = parse_label(name).kind if group_by == "kind" else (name.rsplit(".", 1)[0] if "." in name else name)
            keys.setdefault(key, []).append(i)
        groups, names = [tuple(v) for v in keys.values()], list(keys)
    return AlignConfig(mode=maps.replace("-", "_"), groups=groups, **extra), names  # type: ignore[arg-type]


def text_tower_missing(spec: str) -> str | None:
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


@dataclass
class AlignmentResult:
    """What :func:`fit_alignment` computed.

    Attributes:
        store, clip_store: the stores read (for run records).
        out: the output folder.
        config: the fit's settings.
        map_names: one name per map.
        rows: ``{"usable", "val", "train", "store"}`` row counts.
        align: the fitted maps (None when ``stop_after`` ended the run before the last epoch).
        alignment_file: where the maps were saved (None likewise).
        metrics: held-out metrics (see :func:`fit_alignment`).
        fit_seconds: wall time of the fit.
        resumed_at_epoch: the epoch a resumed run started at (0: a fresh run).
        stopped_at_epoch: epochs done when ``stop_after`` ended the run (None: it finished).
        zero_shot_model: the model that embedded the class names, if any.
        files: class files read, by role (``classes``, ``match_classes``).
    """

    store: ComponentStore
    clip_store: ComponentStore
    out: Path
    config: AlignConfig
    map_names: list[str]
    rows: dict[str, int]
    align: CompAlign | None = None
    alignment_file: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    fit_seconds: float = 0.0
    resumed_at_epoch: int = 0
    stopped_at_epoch: int | None = None
    zero_shot_model: str | None = None
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """The maps were fitted (not stopped early by ``stop_after``)."""
        return self.align is not None

    @property
    def checkpoint(self) -> Path:
        return self.out / CHECKPOINT

    def to_json(self) -> dict[str, Any]:
        """``align.json`` without the run record (the CLI adds ``"run"``). ``fit`` is the training record
        (``history``: the held-out cosine of every evaluated state, epoch 0 being the start; ``init``: the
        closed-form start; ``converged``), ``warnings`` the fit's warnings (held-out cosine below 0.5, or not
        converged at the epoch limit), also printed by :meth:`format`.

        Raises:
            InputError: the run was stopped before the maps were fitted.
        """
        if self.align is None:
            raise InputError(f"the fit stopped after epoch {self.stopped_at_epoch}: no maps yet (resume it)")
        align = self.align
        return {
            "store": str(self.store.path),
            "clip_store": str(self.clip_store.path),
            "alignment": str(self.alignment_file),
            "config": self.config.to_json(),
            "constraint": align.constraint,
            "n_components": align.n_components,
            "d_model": align.d_model,
            "d_clip": align.d_clip,
            "maps": list(self.map_names),
            "rows": dict(self.rows),
            "fit": {k: align.meta.get(k) for k in ("val_cosine", "best_epoch", "stopped_early", "converged",
                                                   "scale_calibration", "init", "history", "train_loss")},
            "fit_seconds": self.fit_seconds,
            "metrics": self.metrics,
            "warnings": list(align.meta.get("warnings", [])),
        }

    def format(self) -> str:
        """The summary ``vitdecomp align`` prints (before the files it wrote): the fit and its held-out metrics,
        or, when ``stop_after`` ended it early, where the training state is."""
        if self.align is None:
            return (f"stopped after epoch {self.stopped_at_epoch}/{self.config.epochs}; the state is in "
                    f"{self.checkpoint}: run the same command with --resume to finish")
        align, metrics = self.align, self.metrics
        lines = [f"CompAlign {align.n_components} components -> {align.n_maps} maps [{align.d_clip}x{align.d_model}], "
                 f"{self.config.parametrisation}, {align.constraint}",
                 f"held-out cosine {metrics['val_cosine']:.4f} on {metrics['val_rows']} rows (best epoch "
                 f"{align.meta['best_epoch']}{_start(align.meta)}), "
                 f"defect max {metrics['defect']['summary']['max']:.3g}"]
        if "zero_shot" in metrics:
            zs = metrics["zero_shot"]
            lines.append(f"zero-shot accuracy of the mapped sum {_pct(zs['val']['aligned'])} (CLIP itself "
                         f"{_pct(zs['val']['clip'])}) on {zs['val']['n']} held-out rows")
        if "textspan_match_rate" in metrics:
            mr = metrics["textspan_match_rate"]
            lines.append(f"TextSpan match rate {_pct(mr['match_rate'])} (ordered {_pct(mr['match_rate_ordered'])}) "
                         f"over {mr['n_components']} components, m = {mr['m']} (chance {_pct(mr['chance'])}), "
                         f"{mr['n_images']} {mr['split']} rows")
        lines.extend(f"warning: {w}" for w in align.meta.get("warnings", []))
        return "\n".join(lines)


def fit_alignment(
    store: ComponentStore | str | os.PathLike,
    clip_store: ComponentStore | str | os.PathLike,
    out: str | os.PathLike,
    *,
    maps: MapSharing = "per-component",
    group_by: Literal["layer", "kind"] = "layer",
    settings: Mapping[str, Any] | None = None,
    read_batch: int | None = None,
    device: str = "cpu",
    resume: bool = False,
    stop_after: int | None = None,
    classes: Sequence[str] | str | os.PathLike | None = None,
    text_model: Model | ModelChoice | None = None,
    templates: str | Sequence[str] = "photo",
    match_rate: MatchRateOptions | None = None,
    progress: bool = False,
) -> AlignmentResult:
    """Fit CompAlign from a store of any model to a store of a CLIP over the same images, and measure it.

    Row ``r`` of both stores must be the same image (same ids; only rows done and valid in both are
    used). The components ``c_i(x) [comp, d_model]`` (tokens summed) are mapped so that
    ``Σ_i F_i c_i(x) ≈ y(x)``, ``y [d_clip]`` the CLIP store's reference row, by
    :func:`~vitdecomp.interpret.align.fit.fit_compalign` (objective, constraint and optimiser from
    ``settings``; :func:`alignment_config`). After every epoch the training state is written to
    ``out/checkpoint``; a run with ``resume=True`` continues it and gives the maps of an uninterrupted run.

    Args:
        store: the model's store (or its path).
        clip_store: the CLIP's store over the same images, in the same order.
        out: output folder (``compalign.safetensors``, ``checkpoint``, ``checkpoint.inputs.json``).
        maps, group_by, settings: the map sharing and other :class:`AlignConfig` fields.
        read_batch: rows read from the store at a time (default: its chunk size).
        device: torch device of the fit.
        resume: continue from ``out/checkpoint`` (same stores and settings); without one, start afresh.
            An existing checkpoint without ``resume`` is an error.
        stop_after: end this call after that many more epochs, keeping the checkpoint (the result then
            has no maps; finish with ``resume=True``).
        classes: class names (line ``k`` = the stores' target ``k``) or their file: adds
            ``metrics["zero_shot"]``, the top-1 accuracy of the mapped sum and of the CLIP embedding on
            the held-out rows and on all usable rows with a known target in ``[0, C)``.
        text_model: the CLIP whose text tower embeds the class names (default: the CLIP store's model,
            rebuilt from its record; a :class:`~vitdecomp.interpret.inputs.ModelChoice` with a spec loads that).
        templates: template set of the class names.
        match_rate: adds ``metrics["textspan_match_rate"]`` (needs the store model's own classifier).
        progress: progress bars on stderr.

    Returns:
        An :class:`AlignmentResult` (``to_json()`` is ``align.json`` without the run record).

    Raises:
        AlignmentInfeasibleError: the orthogonality constraint cannot hold for the widths.
        InputError: bad arguments, stores of different images, a CLIP store without a text tower, no rows in
            one of the splits, or a checkpoint of another run.
    """
    import torch
    from tqdm import tqdm

    from ...store.component_store import ComponentStore
    from ...store.provenance import store_record, write_json

    if stop_after is not None and stop_after < 1:
        raise InputError("--stop-after must be >= 1")
    if read_batch is not None and read_batch < 1:
        raise InputError("--read-batch must be >= 1")
    named = text_model is not None and not (isinstance(text_model, ModelChoice) and text_model.spec is None)
    if named and classes is None and match_rate is None:
        raise InputError("--model names the CLIP whose text tower embeds --classes; give --classes too")
    store = store if isinstance(store, ComponentStore) else ComponentStore.open(store)
    clip_store = clip_store if isinstance(clip_store, ComponentStore) else ComponentStore.open(clip_store)
    why = text_tower_missing(str(clip_store.config.model))
    if why is not None:
        raise InputError(
            f"--clip-store {clip_store.path} was written with {clip_store.config.model} ({why}, no text tower): its "
            "embeddings are not a CLIP space to align into; pass the store of a CLIP (open_clip:..., or an hf "
            "CLIP/SigLIP) over the same images")
    labels = list(store.labels)
    n_comp, d_model, d_clip = len(labels), int(store.comp_shape[-1]), int(clip_store.ref_dim)
    config, map_names = alignment_config(labels, maps=maps, group_by=group_by, settings=settings)
    resolve_constraint(config, d_model, d_clip)
    if store.ref_dim != d_model:
        raise InputError(f"{store.path}: components are {d_model} wide but the reference {store.ref_dim}: a store of "
                         "projections (--directions) cannot be aligned")
    usable = paired_rows(store, clip_store)
    rows = np.flatnonzero(usable)
    n_val = int(validation_mask(rows, config.seed, config.val_fraction).sum())
    if n_val == 0 or n_val == rows.size:
        raise InputError(f"{rows.size} rows usable in both stores, {n_val} of them held out: the fit needs rows in "
                         "both splits (more rows, or another --val-fraction)")

    texts = _TextModel(text_model, clip_store)
    files: dict[str, Path] = {}
    head = None
    if classes is not None:
        if not isinstance(classes, (str, os.PathLike)):
            names = [str(c) for c in classes]
        else:
            names = read_classes(classes)
            files["classes"] = Path(classes)
        head = texts.head(names, templates, d_clip)
    match_inputs = None
    if match_rate is not None:
        if isinstance(match_rate.classes, (str, os.PathLike)):
            files["match_classes"] = Path(match_rate.classes)
        match_inputs = _match_inputs(store, match_rate, texts, templates, d_clip)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, ckpt_inputs = out / CHECKPOINT, out / CHECKPOINT_INPUTS
    identity = {"model": _store_identity(store_record(store)), "clip": _store_identity(store_record(clip_store))}
    next_epoch = 0
    start_pending = config.init == "lstsq"  # the closed-form start reads the rows once before the first epoch
    if ckpt.exists():
        if not resume:
            raise InputError(f"{ckpt} exists (an earlier run): continue it with --resume, or choose another --out")
        recorded = json.loads(ckpt_inputs.read_text(encoding="utf-8")) if ckpt_inputs.is_file() else None
        if recorded != identity:
            raise InputError(f"{ckpt} was written for other stores (or they changed since: {ckpt_inputs}); "
                             "delete the checkpoint or choose another --out")
        state = torch.load(ckpt, map_location="cpu", weights_only=True).get("state", {})
        next_epoch = int(state.get("next_epoch", 0)) if not state.get("stopped") else config.epochs
        start_pending = start_pending and not state.get("initialised", next_epoch > 0)
    else:
        write_json(ckpt_inputs, identity)

    read_batch = read_batch or store.batch_size
    base = store_batches(store, clip_store, batch_size=read_batch, rows=usable)
    total = math.ceil(int(done_rows(store)[1].sum()) / read_batch)  # batches of the store's valid rows
    remaining = config.epochs - next_epoch
    stop = stop_after if stop_after is not None and stop_after < remaining else None
    passes = {"n": 0}

    class _Stop(Exception):
        pass

    def source() -> Any:
        if stop is not None and passes["n"] >= stop + start_pending:
            raise _Stop
        passes["n"] += 1
        what = "least-squares start" if start_pending and passes["n"] == 1 else f"pass {passes['n'] - start_pending}"
        return tqdm(base(), total=total, desc=f"align {what}", unit="batch",
                    disable=not progress or total < 2, leave=False)

    result = AlignmentResult(store=store, clip_store=clip_store, out=out, config=config, map_names=map_names,
                             rows={"usable": int(rows.size), "val": n_val, "train": int(rows.size) - n_val,
                                   "store": store.n_items},
                             resumed_at_epoch=next_epoch, zero_shot_model=texts.spec if head is not None else None,
                             files=files)
    t0 = time.perf_counter()
    try:
        align = fit_compalign(source, n_comp, d_model, d_clip, config, checkpoint=ckpt, labels=labels, device=device)
    except _Stop:
        result.stopped_at_epoch = next_epoch + stop  # type: ignore[operator]
        return result
    result.fit_seconds = time.perf_counter() - t0
    align.meta.update(model=store.config.model, weights=store.config.weights, clip_model=clip_store.config.model,
                      clip_weights=clip_store.config.weights, store_config_hash=store.config.hash(),
                      clip_store_config_hash=clip_store.config.hash())
    result.align, result.alignment_file = align, align.save(out / ALIGN_FILE)

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
        assert match_rate is not None
        metrics["textspan_match_rate"] = _match_rate(align, base, labels, config, match_rate, match_inputs, templates)
    result.metrics = metrics
    return result


# ---------------------------------------------------------------------------- helpers
def _store_identity(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: record[k] for k in _STORE_KEYS}


def _summary(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"min": float(a.min()), "median": float(np.median(a)), "mean": float(a.mean()), "max": float(a.max())}


def _start(meta: Mapping[str, Any]) -> str:
    """``; least-squares start 0.8538`` (its held-out cosine) for the summary line; empty for a random start."""
    init = meta.get("init") or {}
    history = meta.get("history") or []
    if init.get("method") != "lstsq" or not history or history[0].get("epochs_trained") != 0:
        return ""
    return f"; least-squares start {history[0]['val_cosine']:.4f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


class _TextModel:
    """The CLIP whose text tower embeds class names, loaded once on first use."""

    def __init__(self, choice: Model | ModelChoice | None, clip_store: ComponentStore) -> None:
        from ...core.model import Model

        self.clip_store = clip_store
        self.model: Model | None = choice if isinstance(choice, Model) else None
        self.choice = choice if isinstance(choice, ModelChoice) else ModelChoice()
        self.spec = (self.model.name if self.model is not None
                     else self.choice.spec or str(clip_store.config.model))

    def head(self, names: Sequence[str], templates: str | Sequence[str], d_clip: int) -> torch.Tensor:
        """Zero-shot head ``[len(names), d_clip]`` of the class names."""
        from ...core.loading import load
        from ...store.reopen import load_store_model
        from ..text import text_encoder, zero_shot_head

        if self.model is None:
            c = self.choice
            if c.spec is None:
                self.model = load_store_model(self.clip_store, None, c.checkpoint, pretrained=c.pretrained,
                                              device=c.device)
            else:
                self.model = load(c.spec, pretrained=c.pretrained is not False, checkpoint=c.checkpoint,
                                  device=c.device)
        head = zero_shot_head(text_encoder(self.model), list(names), templates)
        if head.shape[1] != d_clip:
            raise InputError(f"the text tower of {self.spec} is {head.shape[1]} wide, the CLIP store's embeddings "
                             f"{d_clip}")
        return head


def _zero_shot(align: CompAlign, source: BatchSource, store: ComponentStore, head: torch.Tensor,
               config: AlignConfig) -> dict[str, Any]:
    """Top-1 zero-shot accuracy of the mapped sum ``Σ_i F_i c_i`` and of the CLIP embedding itself,
    on the held-out rows and on all usable rows with a known target in ``[0, n_classes)``."""
    import torch

    from ..text import zero_shot_logits

    n_classes = int(head.shape[0])
    counts = {split: {"n": 0, "aligned": 0, "clip": 0} for split in ("val", "all")}
    out_of_range = 0
    with torch.no_grad():
        for values, targets, rows in source():  # type: ignore[misc]
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


def _classifier_rows(store: ComponentStore) -> torch.Tensor:
    """The classifier rows ``W [n_classes, d_model]`` of the store's own model (``logits = z Wᵀ + b``).

    The model is loaded as the store records it (:func:`~vitdecomp.store.reopen.load_store_model`); a store
    of a shipped tiny model (``tiny:KIND:FOLDER``) reloads that shipped model.
    """
    import torch

    name = str(store.config.model)
    if name.startswith("tiny:"):
        from ...core.shipped import shipped_path
        from ...core.tiny import load_tiny

        model = load_tiny(shipped_path(name.rsplit(":", 1)[-1]))
    else:
        from ...store.reopen import load_store_model

        model = load_store_model(store, None)
    found = model.classifier()
    if found is None:
        raise InputError(f"{name} has no classifier head of its own: the match rate needs its class vectors")
    return found[0].detach().to(torch.float64).cpu()


def _match_inputs(store: ComponentStore, options: MatchRateOptions, texts: _TextModel,
                  templates: str | Sequence[str], d_clip: int) -> dict[str, Any]:
    """Classifier rows, CLIP class embeddings and class names for :func:`_match_rate` (checked before the fit)."""
    rows = _classifier_rows(store)
    if rows.shape[1] != store.comp_shape[-1]:
        raise InputError(f"the classifier of {store.config.model} is {rows.shape[1]} wide, the components "
                         f"{store.comp_shape[-1]}: the store does not hold the classifier's input features")
    if isinstance(options.classes, (str, os.PathLike)):
        names, where = read_classes(options.classes), str(options.classes)
    else:
        names, where = [str(c) for c in options.classes], "the match-rate classes"
    emb = texts.head(names, templates, d_clip)
    if len(names) != rows.shape[0]:
        raise InputError(f"{where} names {len(names)} classes, the classifier of {store.config.model} has "
                         f"{rows.shape[0]}: line k must name the model's class k")
    return {"rows": rows, "embeddings": emb, "names": names, "text_model": texts.spec}


def _match_rate(align: CompAlign, source: BatchSource, labels: list[str], config: AlignConfig,
                options: MatchRateOptions, inputs: dict[str, Any], templates: str | Sequence[str]) -> dict[str, Any]:
    """TextSpan match rate (:func:`vitdecomp.interpret.textspan.textspan_match_rate`) from one pass over the rows of
    ``options.split``: the model-space moments of the scored components (the mapped moments follow exactly)."""
    import torch

    from ...store.component_store import RunningMoments
    from ..textspan.evaluate import textspan_match_rate

    comps = ([i for i, n in enumerate(labels) if ".H" in n] if options.components == "heads"
             else list(range(len(labels))))
    if not comps:
        raise InputError("--match-rate: the store has no attention heads (use --match-components all)")
    idx = torch.as_tensor(comps, dtype=torch.long)
    moments = RunningMoments(len(comps), align.d_model, covariance=True)
    for values, _, rows in source():  # type: ignore[misc]
        if options.split == "val":
            keep = torch.from_numpy(validation_mask(rows.numpy(), config.seed, config.val_fraction))
            values = values[keep]
        if values.shape[0]:
            moments.update(values.index_select(1, idx).to(torch.float64))
    if moments.count < 2:
        raise InputError(f"--match-rate: {moments.count} {options.split} rows; the moments need more "
                         "(--match-split all, or more rows)")
    maps = align.maps.index_select(0, idx)
    result = textspan_match_rate(moments, maps, inputs["rows"], inputs["embeddings"],
                                 labels=[labels[i] for i in comps], class_names=inputs["names"], m=options.m,
                                 rank=options.rank)
    result.update(split=options.split, text_model=inputs["text_model"], templates=templates,
                  components=options.components)
    return result
