"""Zero-shot classification with a CLIP model's text tower.

The classifier ("head") has one unit row per class, the template-ensembled embedding of its
name (:func:`~vitdecomp.interpret.text.templates.embed_templates`). Logits are cosine similarities::

    logits[b, c] = <features[b] / |features[b]|, head[c] / |head[c]|>

The same head projects a :class:`~vitdecomp.core.stack.ComponentStack` (``stack.project(head)``):
each component's contribution to each class logit, before the division by ``|features|``.

Example (offline, a tiny random CLIP)::

    import vitdecomp as vd
    from vitdecomp.core.tiny import build_tiny_clip
    from vitdecomp.interpret.text import text_encoder, zero_shot_head, zero_shot_logits

    model = vd.wrap(build_tiny_clip(0))
    head = zero_shot_head(text_encoder(model), ["circle", "square"], templates="plain")   # [2, 128]
    logits = zero_shot_logits(model.representation(model.example_input(4)), head)        # [4, 2]
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ...errors import InputError
from .templates import embed_templates

if TYPE_CHECKING:
    import torch

    from .cache import CacheChoice
    from .encoders import TextEncoder

__all__ = ["zero_shot_head", "zero_shot_logits", "zero_shot_accuracy"]


def zero_shot_head(
    encoder: TextEncoder,
    classnames: Sequence[str],
    templates: str | Sequence[str] = "photo",
    *,
    cache: CacheChoice = "default",
    batch_size: int = 256,
) -> torch.Tensor:
    """The zero-shot classifier of ``classnames``: one template-ensembled unit row per class.

    Args:
        encoder: the model's text encoder.
        classnames: ``C`` class names.
        templates: a set name of :data:`~vitdecomp.interpret.text.templates.TEMPLATES`, one template,
            or a sequence of templates.
        cache: ``"default"`` (the on-disk :func:`~vitdecomp.interpret.text.cache.default_cache`), an
            :class:`~vitdecomp.interpret.text.cache.EmbeddingCache`, or None (always computed).
        batch_size: texts per forward pass.

    Returns:
        float32 CPU tensor ``[C, d]`` with unit rows.

    Raises:
        InputError: no class names.
    """
    if isinstance(classnames, str) or len(classnames) == 0:
        raise InputError("zero_shot_head needs a non-empty sequence of class names")
    return embed_templates(encoder, classnames, templates, cache=cache, batch_size=batch_size)


def zero_shot_logits(features: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Cosine logits of image features against a head.

    Args:
        features: ``[B, d]`` image representations (any norm; normalised here).
        head: ``[C, d]`` class rows (normalised here too, so any head gives cosines).

    Returns:
        ``[B, C]`` cosine similarities, float32 (float64 when either input is float64), on
        ``features``' device.

    Raises:
        InputError: not 2-D, or the widths differ.
    """
    import torch
    import torch.nn.functional as F

    if features.dim() != 2 or head.dim() != 2:
        raise InputError(
            f"features [B, d] and head [C, d] must be 2-D; got {tuple(features.shape)}, {tuple(head.shape)}"
        )
    if features.shape[1] != head.shape[1]:
        raise InputError(
            f"features are {features.shape[1]} wide but the head is {head.shape[1]} wide: the text encoder "
            "must belong to the model whose representation these are"
        )
    dtype = torch.float64 if torch.float64 in (features.dtype, head.dtype) else torch.float32
    f = F.normalize(features.detach().to(dtype), dim=-1)
    h = F.normalize(head.detach().to(device=features.device, dtype=dtype), dim=-1)
    return f @ h.T


def zero_shot_accuracy(
    features: torch.Tensor, head: torch.Tensor, targets: torch.Tensor | Sequence[int], *, k: int = 1
) -> float:
    """Top-``k`` accuracy of the cosine classifier: the fraction of rows whose target is among the ``k`` best.

    Args:
        features: ``[B, d]`` image representations.
        head: ``[C, d]`` class rows.
        targets: ``[B]`` class indices in ``[0, C)``.
        k: top-k (1: argmax accuracy).

    Returns:
        accuracy in ``[0, 1]`` (0.0 for an empty batch).

    Raises:
        InputError: target count or range does not match, or ``k`` outside ``[1, C]``.
    """
    import torch

    logits = zero_shot_logits(features, head)
    t = torch.as_tensor(targets, device=logits.device).reshape(-1).long()
    n_rows, n_classes = logits.shape
    if t.numel() != n_rows:
        raise InputError(f"{t.numel()} targets for {n_rows} feature rows")
    if not 1 <= k <= n_classes:
        raise InputError(f"k must be in [1, {n_classes}], got {k}")
    if n_rows == 0:
        return 0.0
    if int(t.min()) < 0 or int(t.max()) >= n_classes:
        raise InputError(f"targets must be class indices in [0, {n_classes}); got [{int(t.min())}, {int(t.max())}]")
    top = logits.topk(k, dim=-1).indices
    return float((top == t[:, None]).any(dim=-1).float().mean())
