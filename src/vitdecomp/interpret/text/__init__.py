"""The text side: encoders, prompt templates, zero-shot heads and an embedding cache.

Nothing here imports torch until it is used, so ``import vitdecomp.interpret.text`` stays cheap.

    from vitdecomp.interpret.text import EmbeddingCache, text_encoder, zero_shot_head

    encoder = text_encoder(model)                        # the model's own text tower
    head = zero_shot_head(encoder, classnames)           # [C, d], kept in the default cache
    head = zero_shot_head(encoder, classnames, cache=EmbeddingCache(".cache/text"))   # a cache of your own

Text embeddings are cached on disk by default (``~/.cache/vitdecomp/text``; ``VITDECOMP_CACHE=DIR``
moves it to ``DIR/text``, ``VITDECOMP_CACHE=off`` turns it off): see :mod:`vitdecomp.interpret.text.cache`.
"""
from __future__ import annotations

from .cache import CACHE_ENV, EmbeddingCache, cache_key, default_cache, default_cache_dir
from .encoders import TextEncoder, Tokenizer, text_encoder
from .templates import TEMPLATES, embed_templates, fill_templates, resolve_templates
from .zero_shot import zero_shot_accuracy, zero_shot_head, zero_shot_logits

__all__ = [
    "CACHE_ENV",
    "TEMPLATES",
    "EmbeddingCache",
    "TextEncoder",
    "Tokenizer",
    "cache_key",
    "default_cache",
    "default_cache_dir",
    "embed_templates",
    "fill_templates",
    "resolve_templates",
    "text_encoder",
    "zero_shot_accuracy",
    "zero_shot_head",
    "zero_shot_logits",
]
