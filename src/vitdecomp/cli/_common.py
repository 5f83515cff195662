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
    from ..model import Model
    from ..stack import ComponentStack
    from ..store import ComponentStore

__all__ = ["open_complete_store", "load_store_model", "text_tower", "iter_with_progress"]

log = logging.getLogger(__name__)


def open_complete_store(path: Path, *, role: str = "store") -> ComponentStore:
    """Open a store and require every chunk to be done (exit code 2 otherwise)."""
    from ..errors import InputError
    from ..store import ComponentStore

    if not Path(path).exists():
        raise InputError(f"{role} {path} does not exist (write one with `vitdecomp decompose MODEL DATA --out STORE`)")
    store = ComponentStore.open(path)
    if not store.is_complete():
        raise InputError(f"{role} {path} is not complete ({len(store.done_chunks())}/{store.n_chunks} chunks); "
                         "finish it with the same `vitdecomp decompose` command first")
    return store


def load_store_model(store: ComponentStore, spec: str | None, checkpoint: Path | None = None) -> Model:
    """Load ``spec`` (default: the store's own model) and require it to be the store's model.

    Weights follow the store: a ``checkpoint`` file when given (the store must record its sha256),
    random initialisation for a ``random-init`` store (seed 0, as ``vitdecomp decompose --no-pretrained``),
    else the library's pretrained weights.
    """
    from ..errors import InputError
    from ..loading import load

    spec = spec or store.config.model
    weights = store.config.weights
    if checkpoint is None and weights.startswith("checkpoint:"):
        raise InputError(f"{store.path} was decomposed with a checkpoint ({weights}): pass the same --checkpoint FILE")
    model = load(spec, pretrained=weights != "random-init", checkpoint=checkpoint)
    if model.name != store.config.model or model.weights != weights:
        raise InputError(f"--model {spec} ({model.name}, {model.weights}) is not the store's model "
                         f"({store.config.model}, {weights})")
    return model


def text_tower(model: Model, *, hint: str) -> Any:
    """The model's text encoder; a model without one is bad input here (``hint`` says what to do)."""
    from ..errors import InputError, UnsupportedModelError
    from ..text import text_encoder

    try:
        return text_encoder(model)
    except UnsupportedModelError as exc:
        raise InputError(f"{model.name} has no text tower: {hint}") from exc


def iter_with_progress(store: ComponentStore, args: argparse.Namespace, desc: str,
                       chunks: list[int] | None = None) -> Iterator[ComponentStack]:
    """``store.iter_batches()`` with a tqdm bar in items on stderr (none with ``-q``)."""
    from ..dataset_run import _progress

    bar = _progress(store.n_items, enabled=not getattr(args, "quiet", False), desc=desc)
    try:
        for stack in store.iter_batches(chunks=chunks):
            yield stack
            bar.update(stack.batch_size)
    finally:
        bar.close()
