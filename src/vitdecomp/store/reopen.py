"""Reopening what an earlier step wrote: a finished store, and the model a store or an alignment records.

Every store-reading step (``score``, ``ablate``, ``retrieve``, ``debias`` ...) starts the same way:
open a store and require it to be finished (:func:`open_complete_store`), and rebuild the model it
was written with from its record, offline-first (:func:`load_store_model`). A CompAlign records
the CLIP whose space its maps lead into; :func:`load_alignment_clip` rebuilds that one. These are
library functions (the commands in :mod:`vitdecomp.cli` call them through their own arguments);
nothing here imports torch at module import time.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..core.model import Model
    from .component_store import ComponentStore

__all__ = ["open_complete_store", "load_store_model", "load_alignment_clip"]

log = logging.getLogger(__name__)


def open_complete_store(path: str | Path, *, role: str = "store") -> ComponentStore:
    """Open the store at ``path`` and require every chunk to be done.

    Args:
        path: the store folder (written by ``vitdecomp decompose ... --out STORE`` /
            :func:`~vitdecomp.store.dataset_run.decompose_dataset`).
        role: how the store is named in an error (``"val store"``).

    Raises:
        InputError: no store there, or an unfinished one (with the command that finishes it).
    """
    from ..errors import InputError
    from .component_store import ComponentStore

    if not Path(path).exists():
        raise InputError(f"{role} {path} does not exist (write one with `vitdecomp decompose MODEL DATA --out STORE`)")
    store = ComponentStore.open(path)
    if not store.is_complete():
        raise InputError(f"{role} {path} is not complete ({len(store.done_chunks())}/{store.n_chunks} chunks); "
                         "finish it with the same `vitdecomp decompose` command first")
    return store


def load_store_model(store: ComponentStore, spec: str | None = None, checkpoint: str | Path | None = None,
                     *, pretrained: bool | None = None, device: str | None = None) -> Model:
    """The model a store was written with, rebuilt from the store's record (offline-first).

    ``spec`` (``--model``) overrides the recorded spec but must name the same model. Weights follow
    the record (:func:`~vitdecomp.core.loading.load_recorded`): random init (checked against the recorded
    digest, no hub access), a shipped tiny model, the same ``checkpoint`` file, or pretrained
    weights from the local cache; ``pretrained=False`` asks for random weights (refused when the
    record says otherwise).

    Raises:
        InputError: ``spec`` names another model than the store's, or the recorded weights cannot
            be rebuilt.
    """
    from ..core.loading import load_recorded
    from ..errors import InputError

    model = load_recorded(
        spec or store.config.model, store.config.weights, checkpoint=checkpoint, pretrained=pretrained,
        device=device, weights_digest=(store.config.extra or {}).get("weights_digest"), what=f"store {store.path}",
    )
    if model.name != store.config.model:
        raise InputError(f"--model {spec} is not the store's model ({store.config.model}); drop --model to use it")
    return model


def load_alignment_clip(align: Any, spec: str | None = None, *, checkpoint: str | Path | None = None,
                        pretrained: bool | None = None, device: str | None = None) -> Model:
    """The CLIP a CompAlign was fitted to, rebuilt from the maps' record (``clip_model``, ``clip_weights``).

    Args:
        align: a :class:`~vitdecomp.interpret.align.CompAlign` (anything with its ``meta`` record).
        spec: another CLIP (``--model`` / ``--clip``) replacing the recorded one; its weights then follow
            ``pretrained`` and ``checkpoint`` (a warning notes that the texts come from another CLIP
            than the maps were fitted to).

    Raises:
        InputError: no ``spec`` and no recorded CLIP.
    """
    from ..core.loading import load, load_recorded
    from ..errors import InputError

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
