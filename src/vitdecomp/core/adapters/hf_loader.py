"""Loads transformers models for ``vd.load("hf:...")``: :func:`load_hf` and :func:`preprocessing_from_processor`.

One job: from a hub id or a ``save_pretrained`` directory, build the decomposable transformers
class for the config (``model_type`` and ``architectures``), load its weights (hub cache when
offline, a local directory hashed into the weights id, or a strict checkpoint), refuse what is
missing with a typed error (:class:`~vitdecomp.core.model.WeightsUnavailableError` for
unavailable configs or weights, InputError for bad paths), and set the preprocessing from the
repository's image processor when it has one (else the family defaults of
:meth:`HFViTAdapter.preprocessing <vitdecomp.core.adapters.hf_reader.HFViTAdapter.preprocessing>`).

Split from :mod:`vitdecomp.core.adapters.hf_vit` (which re-exports both names): loading is I/O
and configuration, the reader is module structure; ``transformers`` is imported only inside
functions.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import InputError, UnsupportedModelError
from .base import Preprocessing
from .hf_names import SIGLIP2_REFUSAL
from .hf_reader import HFViTAdapter

if TYPE_CHECKING:
    from ..model import Model

__all__ = ["load_hf", "preprocessing_from_processor"]

log = logging.getLogger(__name__)

_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bicubic"}  # PIL codes


def _size_field(size: Any, key: str) -> int | None:
    if size is None:
        return None
    if isinstance(size, int):
        return size if key in ("height", "width", "shortest_edge") else None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value is not None else None


def preprocessing_from_processor(processor: Any, fallback: Preprocessing) -> Preprocessing:
    """A :class:`Preprocessing` from a transformers image processor's settings.

    ``size={"shortest_edge": s}`` + ``crop_size`` ``(h, w)`` -> resize shortest side then
    centre crop (``crop_pct = min(h, w) / s``); ``size={"height", "width"}`` without a crop ->
    squash. Settings that do not map (no normalisation, an unusual rescale factor) are logged
    and the fallback's values are kept for them.

    Args:
        processor: e.g. ``AutoImageProcessor.from_pretrained(repo)``.
        fallback: the family defaults (used for anything the processor does not say).
    """
    mean = tuple(float(v) for v in (getattr(processor, "image_mean", None) or fallback.mean))
    std = tuple(float(v) for v in (getattr(processor, "image_std", None) or fallback.std))
    if getattr(processor, "do_normalize", True) is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if len(mean) == 1:
        mean, std = mean * 3, std * 3
    factor = getattr(processor, "rescale_factor", 1 / 255)
    if getattr(processor, "do_rescale", True) and factor is not None and abs(float(factor) - 1 / 255) > 1e-9:
        log.warning("image processor rescale_factor=%s is not 1/255; the vitdecomp transform uses 1/255", factor)
    resample = getattr(processor, "resample", None)
    code = getattr(resample, "value", resample)
    interpolation = (
        _RESAMPLE.get(int(code), fallback.interpolation) if isinstance(code, int) else fallback.interpolation
    )
    size = getattr(processor, "size", None)
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    shortest = _size_field(size, "shortest_edge")
    height, width = _size_field(size, "height"), _size_field(size, "width")
    crop_hw = (_size_field(crop, "height"), _size_field(crop, "width"))
    input_size, crop_pct, mode = fallback.input_size, fallback.crop_pct, fallback.resize_mode
    if crop is not None and crop_hw[0] and crop_hw[1]:
        input_size = (crop_hw[0], crop_hw[1])
        mode = "shortest_crop"
        resized = shortest if shortest else min(height or crop_hw[0], width or crop_hw[1])
        crop_pct = min(input_size) / resized
    elif height and width:
        input_size, crop_pct, mode = (height, width), 1.0, "squash"
    elif shortest:
        input_size, crop_pct, mode = (shortest, shortest), 1.0, "shortest_crop"
        log.warning(
            "image processor resizes the shortest side to %d without a crop; vitdecomp centre-crops a square", shortest
        )
    return Preprocessing(
        input_size=input_size,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        interpolation=interpolation,
        crop_pct=float(crop_pct),
        resize_mode=mode,  # type: ignore[arg-type]
        source=f"transformers {type(processor).__name__}",
    )


def _local_dir(rest: str) -> Path | None:
    """The local directory ``rest`` names, None for a hub id; InputError for a missing path."""
    path = Path(rest).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"hf:{rest} is a file; pass the model directory (with config.json), or checkpoint=FILE")
        return path.resolve()
    looks_local = rest.startswith(("/", "./", "../", "~", ".\\")) or rest.count("/") > 1 or "\\" in rest
    if looks_local:
        raise InputError(f"hf:{rest}: no such local directory (a hub id looks like 'org/name')")
    return None


def _model_class(config: Any, spec: str) -> Any:
    """The transformers class to build for a config (by ``model_type`` and ``architectures``)."""
    import transformers

    model_type = getattr(config, "model_type", None)
    archs = list(getattr(config, "architectures", None) or [])
    if model_type == "clip":
        name = "CLIPForImageClassification" if "CLIPForImageClassification" in archs else "CLIPModel"
    elif model_type == "clip_vision_model":
        name = "CLIPVisionModelWithProjection" if "CLIPVisionModelWithProjection" in archs else "CLIPVisionModel"
    elif model_type == "vit":
        name = "ViTForImageClassification" if "ViTForImageClassification" in archs else "ViTModel"
    elif model_type == "dinov2":
        name = "Dinov2Model"
    elif model_type == "dinov2_with_registers":
        name = "Dinov2WithRegistersModel"
    elif model_type == "siglip":
        name = "SiglipForImageClassification" if "SiglipForImageClassification" in archs else "SiglipModel"
    elif model_type == "siglip_vision_model":
        name = "SiglipVisionModel"
    elif model_type in ("siglip2", "siglip2_vision_model"):
        raise UnsupportedModelError(f"{spec}: model_type {model_type!r}: {SIGLIP2_REFUSAL}")
    else:
        raise UnsupportedModelError(
            f"{spec}: transformers model_type {model_type!r} (architectures {archs}) is not supported; "
            "supported: clip, clip_vision_model, siglip, siglip_vision_model, vit, dinov2, dinov2_with_registers"
        )
    if archs and name not in archs:
        log.info("%s: architectures %s; loading %s (the decomposable part)", spec, archs, name)
    cls = getattr(transformers, name, None)
    if cls is None:
        raise UnsupportedModelError(f"{spec}: transformers {transformers.__version__} has no {name}")
    return cls


def _weights_digest(directory: Path) -> str:
    """sha256 (16 hex) over the weight files of a local model directory."""
    from ..model import file_sha256

    digest = hashlib.sha256()
    files = sorted(
        p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth") and p.is_file()
    )
    for path in files:
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()[:16]


def _image_processor(source: str, local: Path | None) -> Any:
    """``AutoImageProcessor.from_pretrained(source)`` when the repository has one, else None."""
    if local is not None and not (local / "preprocessor_config.json").is_file():
        return None
    try:
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001  (offline and not cached, or no processor: family defaults)
        log.debug("no image processor for %s (%s: %s); using family defaults", source, type(exc).__name__, exc)
        return None


def load_hf(rest: str, *, pretrained: bool, checkpoint: Path | None = None) -> Model:
    """Build a transformers model from a hub id or a local directory (``vd.load("hf:...")``).

    The class comes from the config (``model_type``, ``architectures``): ``clip`` ->
    ``CLIPModel`` (or ``CLIPForImageClassification``), ``clip_vision_model`` ->
    ``CLIPVisionModelWithProjection`` when the config names it, else ``CLIPVisionModel``;
    ``vit`` -> ``ViTForImageClassification`` when named, else ``ViTModel``; ``dinov2`` ->
    ``Dinov2Model``; ``dinov2_with_registers`` -> ``Dinov2WithRegistersModel``; ``siglip`` ->
    ``SiglipForImageClassification`` when named, else ``SiglipModel``; ``siglip_vision_model``
    -> ``SiglipVisionModel`` (``siglip2*`` raise UnsupportedModelError).

    Args:
        rest: hub repository id (``"openai/clip-vit-base-patch16"``) or local directory.
        pretrained: ``from_pretrained`` (hub cache when offline); False: random init from
            the config alone (a local directory, or a hub config already in the cache).
        checkpoint: a state dict loaded strictly (after random init) instead of the hub weights.

    Returns:
        A :class:`~vitdecomp.core.model.Model`; ``extras["clip"]`` holds a full ``CLIPModel`` or
        ``SiglipModel`` (image and text towers; text side via ``get_text_features``),
        ``extras["image_processor"]`` the repository's image processor when it has one.

    Raises:
        InputError: a local path that does not exist or is not a model directory.
        WeightsUnavailableError: the config or weights are not local and cannot be fetched.
        UnsupportedModelError: a model type this adapter does not read.
    """
    import transformers

    from ..model import Model, WeightsUnavailableError, load_checkpoint, weights_unavailable

    spec = f"hf:{rest}"
    local = _local_dir(rest)
    source = str(local) if local is not None else rest
    if local is not None and not (local / "config.json").is_file():
        raise InputError(f"{spec}: not a transformers model directory (no config.json in {local})")
    try:
        config = transformers.AutoConfig.from_pretrained(source)
    except Exception as exc:
        if local is not None:
            raise InputError(f"{spec}: not a transformers model directory ({type(exc).__name__}: {exc})") from exc
        detail = " ".join(str(exc).split())[:160]
        raise WeightsUnavailableError(
            f"the config of {spec} is not available (not in the local Hugging Face cache; {type(exc).__name__}: "
            f"{detail}). Fix: download it once with network, or save the model with save_pretrained(DIR) and "
            "use 'hf:DIR'."
        ) from exc
    cls = _model_class(config, spec)
    use_hub = pretrained and checkpoint is None
    if use_hub:
        try:
            module = cls.from_pretrained(source)
        except Exception as exc:
            raise weights_unavailable(spec, exc) from exc
        if local is not None:
            weights = f"pretrained:hf/{local.name}@sha256:{_weights_digest(local)}"
        else:
            commit = getattr(module.config, "_commit_hash", None)
            weights = f"pretrained:hf/{rest}" + (f"@{commit}" if commit else "")
    else:
        module = cls(config)
        weights = "random-init"
    if checkpoint is not None:
        weights = load_checkpoint(module, Path(checkpoint))
    module.eval()

    adapter = HFViTAdapter()
    prep = adapter.preprocessing(module)
    processor = _image_processor(source, local)
    if processor is not None:
        prep = preprocessing_from_processor(processor, prep)
    extras: dict[str, Any] = {}
    if type(module).__name__ in ("CLIPModel", "SiglipModel"):
        extras["clip"] = module
    if processor is not None:
        extras["image_processor"] = processor
    log.info("loaded %s as %s (%s)", spec, type(module).__name__, weights)
    return Model(module, name=spec, weights=weights, preprocessing=prep, extras=extras)
