"""Helpers shared by the store-reading commands (``score``, ``ablate``): opening a finished store,
loading the model a store was written with, streaming with a progress bar.

Nothing here imports torch at module import time.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..core.model import Model
    from ..core.stack import ComponentStack
    from ..store.component_store import ComponentStore

__all__ = ["open_complete_store", "add_model_arguments", "pretrained_choice", "load_store_model", "load_alignment_clip", "text_tower",
           "iter_with_progress"]

log = logging.getLogger(__name__)


def open_complete_store(path: Path, *, role: str = "store") -> ComponentStore:
    """Open a store and require every chunk to be done (exit code 2 otherwise)."""
    from ..errors import InputError
    from ..store.component_store import ComponentStore

    if not Path(path).exists():
        raise InputError(f"{role} {path} does not exist (write one with `vitdecomp decompose MODEL DATA --out STORE`)")
    store = ComponentStore.open(path)
    if not store.is_complete():
        raise InputError(f"{role} {path} is not complete ({len(store.done_chunks())}/{store.n_chunks} chunks); "
                         "finish it with the same `vitdecomp decompose` command first")
    return store


def add_model_arguments(p: argparse.ArgumentParser, *, required: bool = False, store: bool = True,
                        help_model: str | None = None) -> None:
    """The model options every model-building command shares: ``--model``, ``--no-pretrained``, ``--checkpoint``.

    Args:
        required: ``--model`` must be given (commands that do not read a store).
        store: the command reads a store, whose recorded model is the default.
    """
    default = " (default: the store's own model, rebuilt offline from its record)" if store else ""
    p.add_argument("--model", required=required,
                   help=(help_model or "model spec: timm:NAME | open_clip:ARCH[:TAG] | hf:REPO_OR_PATH | synth:KIND "
                         "(`vitdecomp models`)") + default)
    p.add_argument("--no-pretrained", action="store_true",
                   help="random weights (offline)" + ("; a store records this itself" if store else ""))
    p.add_argument("--checkpoint", type=Path, help="load weights from a local .safetensors / torch file"
                   + (" (the one the store was decomposed with)" if store else ""))


def pretrained_choice(args: argparse.Namespace) -> bool | None:
    """``False`` when ``--no-pretrained`` was given, else None (follow the record)."""
    return False if getattr(args, "no_pretrained", False) else None


def load_store_model(store: ComponentStore, spec: str | None, checkpoint: Path | None = None,
                     *, pretrained: bool | None = None, device: str | None = None) -> Model:
    """The model a store was written with, rebuilt from the store's record (offline-first).

    ``spec`` (``--model``) overrides the recorded spec but must name the same model. Weights follow
    the record (:func:`~vitdecomp.core.loading.load_recorded`): random init (checked against the recorded
    digest, no hub access), a shipped tiny model, the same ``checkpoint`` file, or pretrained
    weights from the local cache.
    """
    from ..errors import InputError
    from ..core.loading import load_recorded

    model = load_recorded(
        spec or store.config.model, store.config.weights, checkpoint=checkpoint, pretrained=pretrained,
        device=device, weights_digest=(store.config.extra or {}).get("weights_digest"), what=f"store {store.path}",
    )
    if model.name != store.config.model:
        raise InputError(f"--model {spec} is not the store's model ({store.config.model}); drop --model to use it")
    return model


def load_alignment_clip(align: Any, spec: str | None, *, checkpoint: Path | None = None,
                        pretrained: bool | None = None, device: str | None = None) -> Model:
    """The CLIP a CompAlign was fitted to, rebuilt from the maps' record (``clip_model``, ``clip_weights``).

    ``spec`` (``--model``) replaces the recorded CLIP; its weights then follow ``pretrained`` and
    ``checkpoint`` (a warning notes that the texts come from another CLIP than the maps were fitted to).
    """
    from ..errors import InputError
    from ..core.loading import load, load_recorded

    recorded, weights = align.meta.get("clip_model"), align.meta.get("clip_weights")
    if spec is None and not recorded:
        raise InputError("the alignment does not record its CLIP model: give --model")
    if (spec is None or spec == recorded) and weights:
        return load_recorded(recorded, weights, checkpoint=checkpoint, pretrained=pretrained, device=device,
                             what="the alignment's CLIP", strict=False)
    spec = spec or recorded
    model = load(spec, pretrained=pretrained is not False, checkpoint=checkpoint, device=device)
    if weights not in (None, model.weights):
        log.warning("the maps were fitted to %s (%s); the texts come from %s (%s)", recorded, weights,
                    model.name, model.weights)
    return model


def text_tower(model: Model, *, hint: str) -> Any:
    """The model's text encoder; a model without one is bad input here (``hint`` says what to do)."""
    from ..errors import InputError, UnsupportedModelError
    from ..interpret.text import text_encoder

    try:
        return text_encoder(model)
    except UnsupportedModelError as exc:
        raise InputError(f"{model.name} has no text tower: {hint}") from exc


def iter_with_progress(store: ComponentStore, args: argparse.Namespace, desc: str,
                       chunks: list[int] | None = None) -> Iterator[ComponentStack]:
    """``store.iter_batches()`` with a tqdm bar in items on stderr (none with ``-q``)."""
    from ..store.dataset_run import progress_bar as _progress

    bar = _progress(store.n_items, enabled=not getattr(args, "quiet", False), desc=desc)
    try:
        for stack in store.iter_batches(chunks=chunks):
            yield stack
            bar.update(stack.batch_size)
    finally:
        bar.close()
