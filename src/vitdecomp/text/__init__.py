"""The text side: encoders, prompt templates, zero-shot heads and an embedding cache.

Nothing here imports torch until it is used, so ``import vitdecomp.text`` stays cheap.

    from vitdecomp.text import EmbeddingCache, text_encoder, zero_shot_head

    encoder = text_encoder(model)                        # the model's own text tower
    head = zero_shot_head(encoder, classnames, cache=EmbeddingCache(".cache/text"))   # [C, d]
"""
from __future__ import annotations

from .cache import EmbeddingCache, cache_key
from .encoders import TextEncoder, Tokenizer, text_encoder
from .templates import TEMPLATES, embed_templates, fill_templates, resolve_templates
from .zero_shot import zero_shot_accuracy, zero_shot_head, zero_shot_logits

__all__ = [
    "TEMPLATES",
    "EmbeddingCache",
    "TextEncoder",
    "Tokenizer",
    "cache_key",
    "embed_templates",
    "fill_templates",
    "resolve_templates",
    "text_encoder",
    "zero_shot_accuracy",
    "zero_shot_head",
    "zero_shot_logits",
]
