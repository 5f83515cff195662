"""``vd.load(spec)``: build a stock model with its own library's loader and wrap it.

Kept apart from :mod:`vitdecomp.core.model` so that the adapters (which build :class:`Model`
objects) and the loader (which dispatches to the adapters) do not import each other.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import InputError
from .model import Model

log = logging.getLogger(__name__)

__all__ = ["load", "load_recorded", "SPEC_PREFIXES", "RANDOM_INIT"]

SPEC_PREFIXES = ("timm", "open_clip", "hf", "synth")

#: ``Model.weights`` of a model built with random weights (``pretrained=False``, seed 0 unless
#: the record says otherwise): rebuilt offline, never fetched.
RANDOM_INIT = "random-init"


def load(
    spec: str,
    *,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    device: str | None = None,
    seed: int = 0,
) -> Model:
    """Build a model with its library's own loader.

    Args:
        spec: ``"timm:NAME"``, ``"open_clip:ARCH[:TAG]"``, ``"hf:REPO_OR_LOCAL_PATH"``, or
            ``"synth:KIND"`` for a tiny model shipped with the package (``clip``, ``vit``,
            ``swin``, ``spurious``; ``vitdecomp models`` lists them) or ``"synth:FOLDER"`` for
            one trained with ``vitdecomp synth train``. Shipped models are always offline.
        pretrained: fetch the library's pretrained weights (from the local hub cache when
            offline). ``False`` builds the architecture with random weights, offline.
            Ignored for ``synth:`` models (their weights ship with them).
        checkpoint: a local ``.safetensors`` or torch file (loaded with ``weights_only``)
            whose state dict is loaded strictly into the architecture. Implies no download.
        device: move the model there (default: stay on CPU).
        seed: random weights (``pretrained=False`` without a checkpoint) are drawn from this
            seed, without touching the caller's random state, so every process (a resumed
            run, each torchrun rank) builds the same model.

    Raises:
        InputError: malformed spec or unknown model name.
        WeightsUnavailableError: pretrained weights are not in the cache and cannot be fetched.
        UnsupportedModelError: the architecture cannot be decomposed exactly.
    """
    prefix, sep, rest = spec.partition(":")
    if not sep or prefix not in SPEC_PREFIXES or not rest:
        raise InputError(
            f"model spec {spec!r} is not one of 'timm:NAME', 'open_clip:ARCH[:TAG]', 'hf:REPO_OR_PATH', "
            "'synth:KIND' (see `vitdecomp models`)"
        )
    if prefix == "synth":
        if checkpoint is not None:
            raise InputError(f"{spec}: a shipped tiny model brings its own weights; drop --checkpoint")
        model = _load_synth(rest)
        model.name = spec
        if device is not None:
            model.to(device)
        return model
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise InputError(f"checkpoint file not found: {checkpoint}")
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if prefix == "timm":
            from .adapters.timm_vit import load_timm

            model = load_timm(rest, pretrained=pretrained, checkpoint=checkpoint)
        elif prefix == "open_clip":
            from .adapters.open_clip_vit import load_open_clip

            model = load_open_clip(rest, pretrained=pretrained, checkpoint=checkpoint)
        else:
            from .adapters.hf_vit import load_hf

            model = load_hf(rest, pretrained=pretrained, checkpoint=checkpoint)
    model.name = spec
    model.module.eval()
    if device is not None:
        model.to(device)
    model.structure  # noqa: B018
    return model


def _load_synth(rest: str) -> Model:
    """``synth:KIND`` (a shipped tiny model) or ``synth:FOLDER`` (one from ``vitdecomp synth train``).

    The weights identity is ``shipped:KIND@sha256:<16 hex>`` (or ``tiny:FOLDER_NAME@sha256:...``)
    from the sha256 the sidecar records, which the loader checks against the file.
    """
    from .tiny import load_tiny
    from .shipped import SHIPPED, shipped_path

    if rest in SHIPPED:
        folder, origin = shipped_path(rest), f"shipped:{rest}"
    else:
        folder = Path(rest).expanduser()
        if not folder.exists():
            raise InputError(f"synth:{rest}: no shipped tiny model {rest!r} (choose from {', '.join(SHIPPED)}) "
                             "and no such folder")
        origin = f"tiny:{folder.resolve().name}"
    model = load_tiny(folder)
    info = model.extras["tiny"]
    model.weights = f"{origin}@sha256:{str(info.get('sha256', ''))[:16]}"
    return model


def load_recorded(
    spec: str,
    weights: str,
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool | None = None,
    device: str | None = None,
    weights_digest: str | None = None,
    what: str = "the record",
    strict: bool = True,
) -> Model:
    """Rebuild the model a record names (a store's config, an alignment's metadata), offline-first.

    ``weights`` is the recorded ``Model.weights``: ``random-init`` is rebuilt with random
    weights (seed 0, no hub access at all); ``checkpoint:<sha>`` needs the same ``checkpoint``
    file; ``shipped:...`` / ``tiny:...`` are the package's tiny models; ``pretrained:...`` goes
    through the library's loader (from the local cache when offline, failing at once with one
    line when the weights are not there and ``HF_HUB_OFFLINE`` is set).

    Args:
        spec: the recorded model spec (or the user's ``--model`` override).
        weights: the recorded weights identity.
        checkpoint: the weights file, for a ``checkpoint:`` record.
        pretrained: the user's choice (``False`` for ``--no-pretrained``); None follows the record.
            A choice that contradicts the record is refused.
        weights_digest: the recorded content digest of random weights, checked when given.
        what: how to name the record in messages (e.g. ``"store wb.zarr"``).
        strict: a rebuilt model whose weights identity differs from the record is an error
            (stores: their key depends on it); False logs a warning instead (e.g. the CLIP an
            alignment recorded under an older identity format).

    Raises:
        InputError: the rebuilt model is not the recorded one (name, weights or digest), or a
            checkpoint record without the file.
        WeightsUnavailableError: recorded pretrained weights are not available offline.
    """
    random_record = weights == RANDOM_INIT or weights.startswith(RANDOM_INIT + ":")
    if pretrained is False and not random_record:
        raise InputError(f"--no-pretrained asks for random weights, but {what} was made with {weights}; "
                         "drop --no-pretrained")
    if pretrained is True and random_record:
        raise InputError(f"{what} was made with random weights (--no-pretrained); it cannot be read with pretrained ones")
    if weights.startswith("checkpoint:") and checkpoint is None:
        raise InputError(f"{what} was made with a checkpoint ({weights}): pass the same --checkpoint FILE")
    model = load(spec, pretrained=not random_record, checkpoint=checkpoint, device=device)
    if model.name == spec and model.weights != weights and not strict:
        log.warning("%s loads weights %s; %s recorded %s", spec, model.weights, what, weights)
    elif model.name != spec or model.weights != weights:
        raise InputError(f"{spec} loads as ({model.name}, {model.weights}), which is not the model of {what} "
                         f"({spec}, {weights})")
    if weights_digest and random_record:
        from .model import weights_digest as digest_of

        if digest_of(model.module) != weights_digest:
            raise InputError(f"the random weights rebuilt for {spec} differ from those {what} was made with "
                             "(a different library version draws them differently); decompose again")
    return model
