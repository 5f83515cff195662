"""Train the tiny models of the synthetic world (``vitdecomp synth train``).

* :func:`train_clip`: the tiny CLIP (:func:`~vitdecomp.core.tiny.build_tiny_clip`), trained
  contrastively on full captions and partial captions (one or two attributes of the main
  object, so single-attribute texts such as ``"a red object"`` are meaningful). A batch may
  hold several images a partial caption is true of; the loss is a multi-positive symmetric
  InfoNCE (every text true of an image is a positive) at the model's own ``logit_scale``.
* :func:`train_classifier`: the tiny supervised ViT (:func:`~vitdecomp.core.tiny.build_tiny_vit`)
  on a task factor, or with ``spurious=p`` on the background-correlated binary task (the
  Waterbirds analogue of :func:`~vitdecomp.synth.dataset.generate_dataset`).
* :func:`evaluate_clip` / :func:`evaluate_classifier`: held-out accuracy on freshly generated
  scenes (zero-shot with :func:`~vitdecomp.synth.generator.describe` texts for CLIP; top-1, and
  per-group / worst-group for the spurious task).

Scenes are generated on the fly (item ``k`` from ``default_rng([seed, 0, k])``; ``n_images``
caps the pool) or read from the ``train`` split of a dataset written by ``generate_dataset``.
Everything is deterministic given the seed. Weights and a JSON sidecar are written with
:func:`~vitdecomp.core.tiny.save_tiny`; :func:`~vitdecomp.core.tiny.load_tiny` reads them back.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..apps.debias import group_accuracy
from ..errors import InputError
from .dataset import PLACES, SPURIOUS_CLASSES, SPURIOUS_GROUPS, read_factors
from .generator import SCENE_FACTORS, VOCABULARY, Scene, canonical_factor, pick, caption, describe, render_array, sample_scene
from ..core.tiny import CLIP_CONFIG, VIT_CONFIG, build_tiny_clip, build_tiny_vit, image_stats, round_to_storage, save_tiny

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["EVAL_SEED", "train_tiny", "train_clip", "train_classifier", "evaluate_clip", "evaluate_classifier", "group_accuracy",
           "pixels",
           "clip_batch", "clip_loss", "classifier_batch"]

log = logging.getLogger(__name__)

#: Seed of the held-out evaluation scenes (their own stream, disjoint from every training stream).
EVAL_SEED = 987_654
_SUBSETS = [c for k in (1, 2) for c in itertools.combinations(SCENE_FACTORS, k)]


# ----------------------------------------------------------------------------- data
class _Source:
    """Training items ``(uint8 image [64, 64, 3], scene, label)`` by global index ``k``."""

    def __init__(self, seed: int, root: str | Path | None, n_images: int | None, labeller: Any = None) -> None:
        self.seed, self.labeller = seed, labeller
        self.rows: list[dict[str, str]] | None = None
        self.root = Path(root) if root is not None else None
        if self.root is not None:
            self.rows = [r for r in read_factors(self.root) if r["split"] == "train"]
            if not self.rows:
                raise InputError(f"{self.root} has no train split")
            n_images = len(self.rows) if n_images is None else min(n_images, len(self.rows))
        if n_images is not None and n_images < 1:
            raise InputError(f"n_images must be at least 1, got {n_images}")
        self.n = n_images
        self._cache: dict[int, tuple[np.ndarray, Scene, int]] = {}

    def _index(self, k: int) -> int:
        if self.n is None:
            return k
        epoch, i = divmod(k, self.n)
        return int(np.random.default_rng([self.seed, 3, epoch]).permutation(self.n)[i])

    def item(self, k: int) -> tuple[np.ndarray, Scene, int]:
        j = self._index(k)
        if j in self._cache:
            return self._cache[j]
        if self.rows is not None:
            from PIL import Image

            row = self.rows[j]
            with Image.open(self.root / row["file"]) as im:  # type: ignore[operator]
                image = np.asarray(im.convert("RGB"))
            out = (image, Scene.from_factors(row), int(row["label"]))
        else:
            rng = np.random.default_rng([self.seed, 0, j])
            scene, label = self.labeller(rng) if self.labeller else (sample_scene(rng), -1)
            out = (render_array(scene)[0], scene, label)
        if self.n is not None and len(self._cache) < 20_000:
            self._cache[j] = out
        return out


def pixels(images: Sequence[np.ndarray], module: nn.Module) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` images -> float ``[B, 3, H, W]`` normalised with the model's own mean/std."""
    import torch

    mean, std = image_stats(module)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _text_for(scene: Scene, rng: np.random.Generator, p_full: float) -> tuple[str, tuple[str, ...] | None]:
    if rng.random() < p_full:
        return caption(scene), None
    attrs = _SUBSETS[int(rng.integers(len(_SUBSETS)))]
    return caption(scene, attrs), attrs


def clip_batch(source: _Source, step: int, batch_size: int, p_full: float = 0.4) -> tuple[
        list[np.ndarray], list[str], np.ndarray]:
    """(images, unique texts, bool targets [B, T]: text t is true of image b) for one training step."""
    items = [source.item(step * batch_size + b) for b in range(batch_size)]
    chosen = [_text_for(s, np.random.default_rng([source.seed, 2, step * batch_size + b]), p_full)
              for b, (_, s, _) in enumerate(items)]
    texts: dict[str, tuple[str, ...] | None] = {}
    for text, attrs in chosen:
        texts.setdefault(text, attrs)
    targets = np.array([[caption(s, attrs) == text for text, attrs in texts.items()] for _, s, _ in items])
    return [im for im, _, _ in items], list(texts), targets


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              targets: torch.Tensor) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE: cross-entropy against the uniform distribution over positives."""
    import torch.nn.functional as F

    logits = logit_scale.exp() * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
    t = targets.float()
    i2t = -(t / t.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    keep = t.sum(0) > 0
    t2i = -(t[:, keep] / t[:, keep].sum(0, keepdim=True) * F.log_softmax(logits[:, keep], dim=0)).sum(0).mean()
    return (i2t + t2i) / 2


def classifier_batch(source: _Source, step: int, batch_size: int) -> tuple[list[np.ndarray], list[int]]:
    items = [source.item(step * batch_size + b) for b in range(batch_size)]
    return [im for im, _, _ in items], [lab for _, _, lab in items]


def _task_labeller(task: str, classes: Sequence[str]) -> Any:
    def label(rng: np.random.Generator) -> tuple[Scene, int]:
        scene = sample_scene(rng)
        value = scene.background if task == "background" else getattr(scene.main, task)
        return scene, classes.index(value)
    return label


def _spurious_labeller(task: str, groups: Sequence[Sequence[str]], p: float) -> Any:
    def label(rng: np.random.Generator) -> tuple[Scene, int]:
        y = int(rng.integers(2))
        value = pick(rng, groups[y])
        place = y if rng.random() < p else 1 - y
        return sample_scene(rng, fixed={task: value, "background": PLACES[place]}), y
    return label


# ----------------------------------------------------------------------------- optimisation
def _optimizer(module: nn.Module, lr: float, weight_decay: float) -> Any:
    import torch

    decay = [p for n, p in module.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in module.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98))


def _lr_factor(step: int, steps: int) -> float:
    warmup = max(1, min(200, steps // 10))
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _run(module: nn.Module, steps: int, lr: float, weight_decay: float, loss_at: Any, what: str) -> list[float]:
    """``steps`` AdamW steps of ``loss_at(step)`` with warmup + cosine; returns the losses."""
    import torch

    opt = _optimizer(module, lr, weight_decay)
    module.train()
    losses: list[float] = []
    every = max(1, steps // 20)
    start = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor(step, steps)
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"{what}: loss is {losses[-1]} at step {step}")
        if (step + 1) % every == 0 or step + 1 == steps:
            recent = losses[-every:]
            log.info("%s step %d/%d loss %.4f (%.2f s/step)", what, step + 1, steps, sum(recent) / len(recent),
                     (time.perf_counter() - start) / (step + 1))
    module.eval()
    return losses


def _seeded(seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


# ----------------------------------------------------------------------------- CLIP
def train_clip(
    root: str | Path | None = None, *, seed: int = 0, steps: int = 3000, batch_size: int = 128, lr: float = 1e-3,
    out_path: str | Path | None = None, n_images: int | None = None, task: str = "shape", p_full: float = 0.4,
    weight_decay: float = 0.1, eval_n: int = 500, config: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train the tiny CLIP contrastively; returns (model in eval mode, sidecar info); saves it when ``out_path``.

    Args:
        root: a dataset written by ``generate_dataset`` (its train split), or None to generate
            scenes on the fly.
        seed: fixes the init, the scenes, the captions and their order.
        steps, batch_size, lr, weight_decay: AdamW with warmup and cosine decay to lr/10.
        out_path: folder for the weights + sidecar (also an open_clip ``local-dir`` model).
        n_images: on-the-fly: cap the pool of scenes (None: fresh scenes every step).
        task: the factor whose zero-shot accuracy is the sidecar's ``accuracy`` (all factors
            are measured, in ``zero_shot_accuracy``).
        p_full: probability that an image's text is its full caption (else 1-2 attributes).
        eval_n: held-out scenes for the evaluation (0: skip it).
    """
    import torch

    from open_clip.tokenizer import SimpleTokenizer

    task = canonical_factor(task)
    _seeded(seed)
    model = build_tiny_clip(seed, config)
    cfg = config or CLIP_CONFIG
    tokenizer = SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    source = _Source(seed, root, n_images)

    def loss_at(step: int) -> torch.Tensor:
        images, texts, targets = clip_batch(source, step, batch_size, p_full)
        feats_i = model.encode_image(pixels(images, model))
        feats_t = model.encode_text(tokenizer(texts))
        return clip_loss(feats_i, feats_t, model.logit_scale, torch.from_numpy(targets))

    start = time.perf_counter()
    losses = _run(model, steps, lr, weight_decay, loss_at, "clip")
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    round_to_storage(model)
    seconds = time.perf_counter() - start
    info: dict[str, Any] = {
        "kind": "clip", "architecture": cfg, "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr,
        "weight_decay": weight_decay, "p_full": p_full, "n_images": source.n,
        "data": str(root) if root else "on-the-fly",
        "task": task, "train_seconds": round(seconds, 1), "first_loss": _head(losses), "final_loss": _tail(losses),
    }
    if eval_n:
        acc = evaluate_clip(model, n=eval_n, tokenizer=tokenizer)
        info.update(accuracy=acc[task], zero_shot_accuracy=acc, eval={"n": eval_n, "seed": EVAL_SEED})
        log.info("clip zero-shot accuracy: %s", ", ".join(f"{f} {a:.3f}" for f, a in acc.items()))
    if out_path is not None:
        save_tiny(model, out_path, info)
    return model, info


def evaluate_clip(model: Any, *, factors: Sequence[str] = SCENE_FACTORS, n: int = 500, seed: int = EVAL_SEED,
                  batch_size: int = 250, tokenizer: Any = None) -> dict[str, float]:
    """Zero-shot accuracy per factor on ``n`` fresh one-object scenes, with :func:`describe` texts as classes."""
    import torch
    import torch.nn.functional as F

    clip = getattr(model, "extras", {}).get("clip", getattr(model, "module", model))
    if tokenizer is None:
        from open_clip.tokenizer import SimpleTokenizer

        tokenizer = SimpleTokenizer(context_length=clip.context_length)
    scenes = [sample_scene(np.random.default_rng([seed, 0, k])) for k in range(n)]
    was_training = clip.training
    clip.eval()
    with torch.no_grad():
        feats = torch.cat([clip.encode_image(pixels([render_array(s)[0] for s in scenes[i:i + batch_size]], clip))
                           for i in range(0, n, batch_size)])
        feats = F.normalize(feats, dim=-1)
        out = {}
        for factor in map(canonical_factor, factors):
            values = VOCABULARY[factor]
            text = F.normalize(clip.encode_text(tokenizer([describe(factor, v) for v in values])), dim=-1)
            pred = (feats @ text.T).argmax(1).tolist()
            truth = [values.index(s.background if factor == "background" else getattr(s.main, factor)) for s in scenes]
            out[factor] = float(np.mean(np.array(pred) == np.array(truth)))
    clip.train(was_training)
    return out


# ----------------------------------------------------------------------------- classifier
def _classes_of(root: Path | None, task: str, spurious: float | None) -> tuple[
        str, list[str], list[list[str]] | None, float | None]:
    """(task, classes, groups or None, spurious p or None), from a dataset's summary.json when ``root``."""
    if root is not None:
        path = Path(root) / "summary.json"
        if not path.is_file():
            raise InputError(f"{path} not found: not a dataset written by generate_dataset")
        summary = json.loads(path.read_text(encoding="utf-8"))
        task, classes = summary["task"], list(summary["classes"])
        if summary.get("spurious") is not None:
            groups = [list(summary["class_values"][c]) for c in classes]
            return task, classes, groups, float(summary["spurious"])
        return task, classes, None, None
    task = canonical_factor(task)
    if spurious is None:
        return task, sorted(VOCABULARY[task]), None, None
    if task not in SPURIOUS_GROUPS:
        raise InputError(f"spurious task {task!r} has no default class groups; use one of {', '.join(SPURIOUS_GROUPS)}")
    return task, list(SPURIOUS_CLASSES), [list(g) for g in SPURIOUS_GROUPS[task]], float(spurious)


def train_classifier(
    root: str | Path | None = None, *, seed: int = 0, steps: int = 3000, batch_size: int = 128, lr: float = 1e-3,
    out_path: str | Path | None = None, n_images: int | None = None, task: str = "shape",
    spurious: float | None = None, weight_decay: float = 0.05, eval_n: int = 500, config: dict[str, Any] | None = None,
    kind: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train the tiny timm ViT with cross-entropy; returns (model in eval mode, sidecar info).

    Saves weights + sidecar under ``out_path`` when given.

    The label is the main object's ``task`` value (classes sorted), or with ``spurious=p`` the
    binary class of :data:`~vitdecomp.synth.dataset.SPURIOUS_GROUPS` shown on the matching
    background (water for class 1) with probability p. With ``root`` the task, classes and
    p come from its ``summary.json`` and the train split is read from disk (a Waterbirds-layout
    dataset for the spurious variant). ``config``: the ``timm.create_model`` arguments (default
    :data:`~vitdecomp.core.tiny.VIT_CONFIG`; :data:`~vitdecomp.core.tiny.SWIN_CONFIG` for the tiny
    Swin); ``kind`` names the model in its sidecar (default ``vit``, or ``spurious``). Other
    arguments as :func:`train_clip`.
    """
    import torch
    import torch.nn.functional as F

    task, classes, groups, p = _classes_of(Path(root) if root is not None else None, task, spurious)
    labeller = _task_labeller(task, classes) if groups is None else _spurious_labeller(task, groups, p or 0.0)
    _seeded(seed)
    model = build_tiny_vit(seed, len(classes), config)
    source = _Source(seed, root, n_images, labeller)

    def loss_at(step: int) -> torch.Tensor:
        images, labels = classifier_batch(source, step, batch_size)
        return F.cross_entropy(model(pixels(images, model)), torch.tensor(labels))

    kind = kind or ("vit" if groups is None else "spurious")
    start = time.perf_counter()
    losses = _run(model, steps, lr, weight_decay, loss_at, kind)
    round_to_storage(model)
    info: dict[str, Any] = {
        "kind": kind, "architecture": dict(config or VIT_CONFIG), "num_classes": len(classes), "classes": classes,
        "task": task, "groups": groups, "spurious": p, "seed": seed, "steps": steps, "batch_size": batch_size,
        "lr": lr, "weight_decay": weight_decay, "n_images": source.n, "data": str(root) if root else "on-the-fly",
        "train_seconds": round(time.perf_counter() - start, 1), "first_loss": _head(losses),
        "final_loss": _tail(losses),
    }
    if eval_n:
        result = evaluate_classifier(model, task=task, classes=classes, groups=groups, n=eval_n)
        info.update(accuracy=result["accuracy"], eval={**result, "n": eval_n, "seed": EVAL_SEED})
        log.info("%s held-out accuracy %.3f%s", kind, result["accuracy"],
                 f" (worst group {result['worst_group_accuracy']:.3f})" if groups else "")
    if out_path is not None:
        save_tiny(model, out_path, info)
    return model, info


def evaluate_classifier(model: Any, *, task: str, classes: Sequence[str], groups: Sequence[Sequence[str]] | None = None,
                        n: int = 500, seed: int = EVAL_SEED, batch_size: int = 250) -> dict[str, Any]:
    """Top-1 accuracy on ``n`` fresh scenes; with ``groups`` (spurious task) balanced over land/water,
    with per-group accuracy (group ``2*y + place``) and the worst group's."""
    import torch

    module = getattr(model, "module", model)
    labeller = _task_labeller(task, list(classes)) if groups is None else _spurious_labeller(task, groups, 0.5)
    items = [labeller(np.random.default_rng([seed, 5, k])) for k in range(n)]
    was_training = module.training
    module.eval()
    with torch.no_grad():
        pred = torch.cat([module(pixels([render_array(s)[0] for s, _ in items[i:i + batch_size]], module)).argmax(1)
                          for i in range(0, n, batch_size)]).numpy()
    module.train(was_training)
    labels = np.array([y for _, y in items])
    out: dict[str, Any] = {"accuracy": float(np.mean(pred == labels))}
    if groups is not None:
        place = np.array([PLACES.index(s.background) for s, _ in items])
        groups_acc = group_accuracy(pred, labels, place)
        out.update(group_accuracy=groups_acc["groups"], worst_group_accuracy=groups_acc["worst_group"])
    return out


def _tail(losses: list[float]) -> float | None:
    tail = losses[-max(1, len(losses) // 10):]
    return round(float(np.mean(tail)), 5) if tail else None


def _head(losses: list[float]) -> float | None:
    head = losses[:max(1, len(losses) // 10)]
    return round(float(np.mean(head)), 5) if head else None


def train_tiny(
    kind: str, data: str | Path | None = None, *, seed: int = 0, steps: int = 2000, batch_size: int = 128,
    lr: float = 1e-3, out_path: str | Path | None = None, n_images: int | None = None, task: str = "shape",
    spurious: float = 0.95, eval_n: int = 500,
) -> tuple[nn.Module, dict[str, Any]]:
    """``vitdecomp synth train KIND``: one of the tiny models, trained on generated scenes.

    ``"clip"``: :func:`train_clip` (contrastive, full and partial captions); ``"vit"``: a timm ViT
    classifying ``task``; ``"swin"``: a timm Swin (:data:`~vitdecomp.core.tiny.SWIN_CONFIG`) classifying
    ``task``; ``"spurious"``: a timm ViT on the binary task whose class matches the water/land background
    with probability ``spurious`` (:func:`train_classifier`). ``data``: train on that generated dataset's
    train split instead of scenes made on the fly. Returns ``(model in eval mode, sidecar info)``.

    Raises:
        InputError: an unknown kind, fewer than one step or one image per step.
    """
    if kind not in ("clip", "vit", "swin", "spurious"):
        raise InputError(f"unknown tiny model {kind!r}; choose clip, vit, swin or spurious")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    common: dict[str, Any] = {"seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "out_path": out_path,
                              "n_images": n_images, "task": task, "eval_n": eval_n}
    if kind == "clip":
        return train_clip(data, **common)
    from ..core.tiny import SWIN_CONFIG

    extra: dict[str, Any] = {"config": SWIN_CONFIG, "kind": "swin"} if kind == "swin" else {}
    return train_classifier(data, spurious=spurious if kind == "spurious" else None, **common, **extra)
