"""Text encoders: strings -> unit vectors in a CLIP model's image-embedding space.

A :class:`TextEncoder` runs the text tower of the *same* stock model whose image tower is
decomposed, with that model's own tokenizer, so that ``encode(texts) @ stack.values.T`` is a
dot product in one space:

=====================================  ==================================================
model                                  features (before the L2 normalisation)
=====================================  ==================================================
open_clip ``CLIP`` / ``CustomTextCLIP``  ``model.encode_text(tokenizer(texts))``
transformers ``CLIPModel``             ``get_text_features(input_ids, attention_mask)``
transformers ``SiglipModel``           ``get_text_features(input_ids)``, texts padded to
                                       ``max_position_embeddings`` (as SigLIP was trained)
=====================================  ==================================================

transformers 5.x returns a ``BaseModelOutputWithPooling`` from ``get_text_features`` (the
features are its ``pooler_output``); 4.x returns the tensor. Both are read.

A model without a text tower (a timm classifier, a vision-only tower) raises
:class:`~vitdecomp.errors.UnsupportedModelError`: such a model is read with text only after
CompAlign maps its components into a CLIP space, whose text encoder is then used.

Example (offline, a tiny random CLIP)::

    import vitdecomp as vd
    from vitdecomp.core.tiny import build_tiny_clip
    from vitdecomp.interpret.text import text_encoder

    encoder = text_encoder(vd.wrap(build_tiny_clip(0)))
    y = encoder.encode(["a red object", "a triangle on water"])   # [2, 128], unit rows
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Union

from ...errors import InputError, UnsupportedModelError
from .cache import CacheChoice, resolve_cache

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ...core.model import Model

__all__ = ["TextEncoder", "Tokenizer", "text_encoder"]

log = logging.getLogger(__name__)

#: A tokenizer: a list of strings -> ``input_ids`` ``[n, L]`` (a tensor), or a mapping of
#: keyword inputs of the text tower (``{"input_ids": ..., "attention_mask": ...}``).
Tokenizer = Callable[[list[str]], Union["torch.Tensor", Mapping[str, Any]]]

_Family = Literal["open_clip", "hf_clip", "hf_siglip"]
_HF_TEXT_MODELS: dict[str, _Family] = {"CLIPModel": "hf_clip", "SiglipModel": "hf_siglip"}
# Weights ids that do not identify the weights: the key then carries a digest of the parameters.
_UNIDENTIFIED = ("unknown", "random-init")
_OPEN_CLIP_VOCAB = 49408  # open_clip's SimpleTokenizer vocabulary size


class TextEncoder:
    """Embeds strings with a model's text tower, into the space of its image representation.

    Attributes:
        name: readable name of the model (its load spec, or its class for a raw module).
        module: the stock module whose text tower runs (put in eval mode while encoding).

    ``dim`` and ``key`` are properties: ``dim`` is the embedding width ``d``; ``key`` is a
    stable identity of (model, weights, tokenizer, parameter dtype), used by
    :class:`~vitdecomp.interpret.text.cache.EmbeddingCache`. When the weights have no identity
    (``"unknown"`` for a wrapped module, ``"random-init"``), the key holds a sha256 of the
    module's parameters and buffers, computed once on first access.

    Args:
        name: readable name.
        module: the stock module (for device, dtype and train/eval state).
        tokenize: strings -> tower inputs (a tensor of ``input_ids`` or a keyword mapping).
        features: tower inputs (already on the module's device) -> raw features ``[n, d]``.
        key: the identity string, or a zero-argument callable computing it lazily.
        dim: the width ``d``; None: found by encoding one empty string on first access.
    """

    def __init__(
        self,
        *,
        name: str,
        module: nn.Module,
        tokenize: Tokenizer,
        features: Callable[[Any], torch.Tensor],
        key: str | Callable[[], str],
        dim: int | None = None,
    ) -> None:
        self.name = name
        self.module = module
        self._tokenize = tokenize
        self._features = features
        self._key = key
        self._dim = dim

    @property
    def dim(self) -> int:
        """Embedding width ``d``."""
        if self._dim is None:
            self._dim = int(self.encode([""], normalize=False).shape[-1])
        return self._dim

    @property
    def key(self) -> str:
        """Stable identity: model name, weights, tokenizer and parameter dtype."""
        if callable(self._key):
            self._key = self._key()
        return f"{self._key}|{_param_dtype(self.module)}"

    def encode(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 256,
        normalize: bool = True,
        cache: CacheChoice = "default",
    ) -> torch.Tensor:
        """Embed ``texts``.

        Runs under ``torch.no_grad`` with the module in eval mode (each submodule's train/eval
        flag is restored afterwards), on the module's device; tokens are moved there. Unit
        embeddings are looked up in ``cache`` first (by :attr:`key` and the texts) and kept
        there, so a text is run through the tower once per set of weights. An encoding that
        takes more than 2 s shows a tqdm bar on stderr (none when logging is set to errors only).

        Args:
            texts: ``n`` strings (a single ``str`` is refused: wrap it in a list).
            batch_size: texts per forward pass; does not change the result.
            normalize: divide each row by its L2 norm (computed in float32). Raw features
                (``False``) are never cached.
            cache: ``"default"``: the on-disk :func:`~vitdecomp.interpret.text.cache.default_cache`
                (``VITDECOMP_CACHE``); an :class:`~vitdecomp.interpret.text.cache.EmbeddingCache`; None:
                always run the text tower.

        Returns:
            float32 CPU tensor ``[n, d]``.

        Raises:
            InputError: ``texts`` is a string or holds a non-string; ``batch_size < 1``.
        """
        import torch

        items = _check_texts(texts)
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        if not items:
            return torch.zeros(0, self.dim, dtype=torch.float32)
        store = resolve_cache(cache) if normalize else None
        if store is None:
            return self._run(items, batch_size, normalize)
        return store.get_or_compute(self, items, (), lambda: self._run(items, batch_size, True))

    def _run(self, items: list[str], batch_size: int, normalize: bool) -> torch.Tensor:
        """The text tower on ``items`` (batched, with a delayed progress bar): float32 CPU ``[n, d]``."""
        import torch
        import torch.nn.functional as F

        if len(items) >= 1000:
            log.info("%s: encoding %d texts with the text tower", self.name, len(items))
        device = _param_device(self.module)
        rows: list[torch.Tensor] = []
        with _eval_mode(self.module), torch.no_grad(), _progress(len(items), f"encoding texts ({self.name})") as bar:
            for start in range(0, len(items), batch_size):
                batch = items[start : start + batch_size]
                inputs = _to_device(self._tokenize(batch), device)
                feats = self._features(inputs).float()
                if normalize:
                    feats = F.normalize(feats, dim=-1)
                rows.append(feats.cpu())
                bar.update(len(batch))
        out = torch.cat(rows)
        log.debug("%s: encoded %d texts -> %s", self.name, len(items), tuple(out.shape))
        return out

    def __repr__(self) -> str:
        return f"TextEncoder({self.name!r}, module={type(self.module).__name__})"


def text_encoder(
    model: Model | nn.Module,
    *,
    tokenizer: Tokenizer | Any | None = None,
    key: str | None = None,
) -> TextEncoder:
    """The text encoder of a CLIP-style model.

    Accepts a :class:`~vitdecomp.core.model.Model` (the text side is ``model.extras["clip"]`` when
    present, else ``model.module``) or a raw module: an open_clip ``CLIP``/``CustomTextCLIP``
    (anything with ``encode_text``), a transformers ``CLIPModel`` or ``SiglipModel``.

    The tokenizer, in order: ``tokenizer`` when given; ``model.extras["tokenizer"]`` (or a
    processor's ``.tokenizer`` in ``extras["processor"]``); for open_clip, its stock
    ``SimpleTokenizer`` at the model's context length when the vocabulary is the stock one;
    for transformers, ``AutoTokenizer.from_pretrained`` of the directory or repository the
    model came from (local cache only when offline). A transformers tokenizer object passed
    as ``tokenizer`` is called with the padding its family was trained with.

    Args:
        model: the model or module.
        tokenizer: a callable ``list[str] -> input_ids [n, L]`` (or a mapping of tower inputs),
            or a transformers tokenizer.
        key: override the encoder's identity (see :attr:`TextEncoder.key`), e.g. when passing
            a tokenizer whose identity its type name does not capture.

    Raises:
        UnsupportedModelError: the model has no text tower (e.g. a timm classifier).
        WeightsUnavailableError: a transformers tokenizer is not in the local cache (offline).
        InputError: no tokenizer can be built (pass ``tokenizer=``).
    """
    from ...core.model import Model

    if isinstance(model, Model):
        name, weights, extras = model.name, model.weights, model.extras
        candidates = [extras.get("clip"), model.module]
    else:
        name, weights, extras = type(model).__name__, "unknown", {}
        candidates = [model]
    for module in candidates:
        if module is None:
            continue
        family = _family(module)
        if family is None:
            continue
        own = tokenizer if tokenizer is not None else _extras_tokenizer(extras)
        if family == "open_clip":
            tokenize, tok_id = _open_clip_tokenizer(module, own, name)
            features: Callable[[Any], torch.Tensor] = _open_clip_features(module)
            dim = _open_clip_dim(module)
        else:
            tokenize, tok_id = _hf_tokenizer(module, family, own, name)
            features = _hf_features(module)
            dim = _hf_dim(module, family)
        identity = key if key is not None else _identity(module, name, weights, tok_id)
        log.debug("text encoder for %s: %s, tokenizer %s", name, family, tok_id)
        return TextEncoder(name=name, module=module, tokenize=tokenize, features=features, key=identity, dim=dim)
    raise UnsupportedModelError(
        f"{name} ({type(candidates[-1]).__name__}) has no text tower: text embeddings need a CLIP-style model "
        "(open_clip CLIP / CustomTextCLIP, transformers CLIPModel or SiglipModel; for a loaded CLIP, the whole "
        "model rather than its vision tower). A model without a text tower (e.g. a timm classifier) is read "
        "with text through CompAlign, which maps its components into a CLIP space: use that CLIP model's "
        "text encoder."
    )


def _identity(module: Any, name: str, weights: str, tok_id: str) -> str | Callable[[], str]:
    """``name|weights|tok=...``; weights without an identity get a lazy parameter digest."""
    if weights not in _UNIDENTIFIED:
        return f"{name}|{weights}|tok={tok_id}"

    def with_digest() -> str:
        return f"{name}|{weights}@params:{_param_digest(module)}|tok={tok_id}"

    return with_digest


# ----------------------------------------------------------------------------- families
def _family(module: Any) -> _Family | None:
    for cls in type(module).__mro__:
        if cls.__module__.startswith("transformers") and cls.__name__ in _HF_TEXT_MODELS:
            return _HF_TEXT_MODELS[cls.__name__]
    if callable(getattr(module, "encode_text", None)) and callable(getattr(module, "encode_image", None)):
        return "open_clip"
    return None


def _extras_tokenizer(extras: Mapping[str, Any]) -> Any:
    tok = extras.get("tokenizer")
    if tok is None and extras.get("processor") is not None:
        tok = getattr(extras["processor"], "tokenizer", None)
    return tok


def _is_hf_tokenizer(tok: Any) -> bool:
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:  # pragma: no cover - transformers not installed
        return False
    return isinstance(tok, PreTrainedTokenizerBase)


def _tokenizer_id(tok: Any) -> str:
    cls = tok if callable(tok) and hasattr(tok, "__qualname__") else type(tok)
    ident = f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', type(tok).__name__)}"
    for attr in ("name_or_path", "context_length"):
        value = getattr(tok, attr, None)
        if value not in (None, ""):
            ident += f"/{attr}={value}"
    return ident


def _wrap_hf(tok: Any, *, padding: str | bool, max_length: int | None, keys: tuple[str, ...]) -> Tokenizer:
    """A transformers tokenizer called with fixed padding, returning only ``keys``."""

    def tokenize(texts: list[str]) -> dict[str, Any]:
        enc = tok(texts, padding=padding, truncation=max_length is not None, max_length=max_length,
                  return_tensors="pt")
        return {k: enc[k] for k in keys if k in enc}

    return tokenize


# ----------------------------------------------------------------------------- open_clip
def _open_clip_tokenizer(clip: Any, tok: Any, name: str) -> tuple[Tokenizer, str]:
    context = getattr(clip, "context_length", None)
    if tok is not None:
        if _is_hf_tokenizer(tok):
            return _wrap_hf(tok, padding="max_length", max_length=context, keys=("input_ids",)), _tokenizer_id(tok)
        return tok, _tokenizer_id(tok)
    vocab = getattr(clip, "vocab_size", None)
    if vocab != _OPEN_CLIP_VOCAB:
        raise InputError(
            f"{name}: no tokenizer for this open_clip model (vocabulary {vocab}, not open_clip's stock "
            f"{_OPEN_CLIP_VOCAB}-token one). Load it with vd.load('open_clip:...') (which keeps its tokenizer) "
            "or pass text_encoder(model, tokenizer=open_clip.get_tokenizer(ARCH))."
        )
    from open_clip.tokenizer import SimpleTokenizer

    simple = SimpleTokenizer(context_length=int(context or 77))
    return simple, _tokenizer_id(simple)


def _open_clip_features(clip: Any) -> Callable[[Any], torch.Tensor]:
    def features(inputs: Any) -> torch.Tensor:
        ids = inputs["input_ids"] if isinstance(inputs, Mapping) else inputs
        return clip.encode_text(ids)

    return features


def _open_clip_dim(clip: Any) -> int | None:
    from torch import nn

    proj = getattr(clip, "text_projection", None)
    if isinstance(proj, nn.Linear):
        return int(proj.out_features)
    if isinstance(proj, nn.Parameter) and proj.dim() == 2:
        return int(proj.shape[1])
    out = getattr(getattr(clip, "text", None), "output_dim", None)
    return int(out) if isinstance(out, int) else None


# ----------------------------------------------------------------------------- transformers
def _hf_tokenizer(module: Any, family: _Family, tok: Any, name: str) -> tuple[Tokenizer, str]:
    text_config = getattr(module.config, "text_config", None)
    max_length = getattr(text_config, "max_position_embeddings", None)
    if family == "hf_siglip":  # trained on max-length padded ids without a mask (big_vision)
        padding: str | bool = "max_length"
        keys: tuple[str, ...] = ("input_ids",)
    else:
        padding, keys = True, ("input_ids", "attention_mask")
    if tok is not None and not _is_hf_tokenizer(tok):
        return tok, _tokenizer_id(tok)
    if tok is None:
        tok = _auto_tokenizer(module, name)
    return _wrap_hf(tok, padding=padding, max_length=max_length, keys=keys), _tokenizer_id(tok)


def _auto_tokenizer(module: Any, name: str) -> Any:
    from pathlib import Path

    from ...core.model import WeightsUnavailableError

    source = getattr(module.config, "_name_or_path", "") or ""
    if not source and name.startswith("hf:"):
        source = name[len("hf:") :]
    if not source:
        raise InputError(
            f"{name}: no tokenizer: the module was not loaded from a repository or directory. "
            "Pass text_encoder(model, tokenizer=AutoTokenizer.from_pretrained(...)) or any callable "
            "list[str] -> input_ids."
        )
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        if Path(source).expanduser().is_dir():
            raise InputError(
                f"{name}: cannot build a tokenizer from {source} ({type(exc).__name__}: {exc}). Save the "
                "tokenizer there (tokenizer.save_pretrained(DIR)) or pass text_encoder(model, tokenizer=...)."
            ) from exc
        raise WeightsUnavailableError(
            f"{name}: cannot get the tokenizer of {source!r} ({type(exc).__name__}: {exc}). Without network "
            "access only tokenizers already in the local Hugging Face cache can be used. Fix: download it once "
            "where you have network, or pass text_encoder(model, tokenizer=...)."
        ) from exc


def _hf_features(module: Any) -> Callable[[Any], torch.Tensor]:
    import torch

    def features(inputs: Any) -> torch.Tensor:
        kwargs = dict(inputs) if isinstance(inputs, Mapping) else {"input_ids": inputs}
        out = module.get_text_features(**kwargs)
        if isinstance(out, torch.Tensor):  # transformers 4.x
            return out
        pooled = getattr(out, "pooler_output", None)  # transformers 5.x: BaseModelOutputWithPooling
        if isinstance(pooled, torch.Tensor):
            return pooled
        raise UnsupportedModelError(
            f"{type(module).__name__}.get_text_features returned {type(out).__name__} without a pooler_output"
        )

    return features


def _hf_dim(module: Any, family: _Family) -> int | None:
    if family == "hf_clip":
        proj = getattr(module, "text_projection", None)
        return int(proj.out_features) if hasattr(proj, "out_features") else None
    head = getattr(getattr(module, "text_model", None), "head", None)
    return int(head.out_features) if hasattr(head, "out_features") else None


# ----------------------------------------------------------------------------- helpers
def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise InputError("texts must be a sequence of strings, not one string (wrap it in a list)")
    items = list(texts)
    bad = [t for t in items if not isinstance(t, str)]
    if bad:
        raise InputError(f"texts must be strings; got {type(bad[0]).__name__} {bad[0]!r}")
    return items


def _param_device(module: nn.Module) -> torch.device:
    import torch

    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _param_dtype(module: nn.Module) -> str:
    for p in module.parameters():
        return str(p.dtype).replace("torch.", "")
    return "none"


def _to_device(inputs: Any, device: torch.device) -> Any:
    import torch

    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    raise InputError(
        f"the tokenizer returned {type(inputs).__name__}; expected a tensor of input_ids or a mapping of tensors"
    )


def _progress(total: int, desc: str) -> Any:
    """A tqdm bar in texts on stderr, shown only once 2 s have passed; off when logging is errors-only (``-q``)."""
    from tqdm import tqdm

    quiet = logging.getLogger("vitdecomp").getEffectiveLevel() > logging.WARNING
    return tqdm(total=total, desc=desc, unit="text", delay=2.0, dynamic_ncols=True, disable=quiet)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode inside; every submodule's own train/eval flag restored on exit."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def _param_digest(module: nn.Module) -> str:
    """sha256 (16 hex) over names, dtypes, shapes and bytes of the parameters and buffers."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
