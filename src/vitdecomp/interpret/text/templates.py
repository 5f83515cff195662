"""Prompt templates and template-ensembled text embeddings.

A template is a format string with exactly one ``{}`` (``"a blurry photo of a {}."``); a
template set is a tuple of them. :data:`TEMPLATES` names the built-in sets:

* ``"plain"``: the text itself;
* ``"photo"``: twelve photograph phrasings, for natural-image class names;
* ``"synth"``: phrasings of the synthetic world's captions (``"a red object"``,
  ``"a triangle on water"``, see :func:`vitdecomp.synth.generator.describe`), which already
  carry their article, so the templates add none;
* ``"imagenet80"``: the 80 ImageNet prompts published with CLIP (Radford et al. 2021), the set
  TextSpan's published code ensembles over (docs/method.md §4); ``"imagenet7"``: the 7-prompt
  subset CLIP's authors recommend. Both are read from ``open_clip.zero_shot_metadata``, the
  maintained copy, rather than retyped here.

A path to a text file is a set too: one template per line (blank lines and ``#`` comments
skipped). The 79-line set of the scoring paper's code (docs/method.md §4) is not shipped by any
package this project can install; pass that file with ``--templates FILE``.

The embedding of a name under a template set (docs/method.md §1, ``y_s``) is::

    y(name) = normalise( mean_t normalise( encode(t.format(name)) ) )
"""
from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import InputError

if TYPE_CHECKING:
    import torch

    from .cache import CacheChoice
    from .encoders import TextEncoder

__all__ = ["TEMPLATES", "LIBRARY_SETS", "resolve_templates", "fill_templates", "embed_templates"]

TEMPLATES: dict[str, tuple[str, ...]] = {
    "plain": ("{}",),
    "photo": (
        "a photo of a {}.",
        "a blurry photo of a {}.",
        "a sharp, well-lit photo of a {}.",
        "a grainy old photograph of a {}.",
        "a zoomed-in picture of a {}.",
        "a wide shot with a {} in it.",
        "an amateur snapshot of a {}.",
        "a professional photograph of a {}.",
        "a {} seen from a distance.",
        "a poorly framed photo of a {}.",
        "a dim, underexposed image of a {}.",
        "a high-resolution image of a {}.",
    ),
    "synth": (
        "{}",
        "an image of {}",
        "a picture of {}",
        "a rendering of {}",
    ),
}


#: Published template sets read from a maintained package: name -> (module, attribute).
LIBRARY_SETS: dict[str, tuple[str, str]] = {
    "imagenet80": ("open_clip.zero_shot_metadata", "OPENAI_IMAGENET_TEMPLATES"),
    "imagenet7": ("open_clip.zero_shot_metadata", "SIMPLE_IMAGENET_TEMPLATES"),
}


def _library_set(name: str) -> tuple[str, ...]:
    """A published set as format strings (the package stores callables ``name -> prompt``)."""
    import importlib

    module, attr = LIBRARY_SETS[name]
    try:
        entries = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"template set {name!r} is read from {module} ({exc}); install open_clip_torch") from exc
    return tuple(e("{}") if callable(e) else str(e) for e in entries)


def _read_template_file(path: Path) -> tuple[str, ...]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"template file {path} is not a readable UTF-8 text file: {exc}") from exc
    found = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not found:
        raise InputError(f"template file {path} holds no template")
    return found


def _check_template(template: str) -> None:
    if not isinstance(template, str):
        raise InputError(f"a template must be a string, got {type(template).__name__}")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise InputError(f"template {template!r} is not a valid format string: {exc}") from exc
    if fields != [""]:
        raise InputError(f"template {template!r} must hold exactly one '{{}}' placeholder (found {len(fields)} fields)")


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """The template tuple for a set name, a template file, one template string, or a sequence of templates.

    A string is a name of :data:`TEMPLATES` or :data:`LIBRARY_SETS` when it is one, a file of
    templates (one per line) when such a file exists, and otherwise one template holding ``{}``.

    Raises:
        InputError: unknown name, empty set, or a template without exactly one ``{}``.
    """
    if isinstance(templates, str):
        if templates in TEMPLATES:
            return TEMPLATES[templates]
        if templates in LIBRARY_SETS:
            templates = _library_set(templates)
        elif "{" not in templates and Path(templates).expanduser().is_file():
            templates = _read_template_file(Path(templates).expanduser())
        elif "{" not in templates:
            raise InputError(f"unknown template set {templates!r}; known: {sorted([*TEMPLATES, *LIBRARY_SETS])}, "
                             "a '{}' template, or a text file with one template per line")
        else:
            templates = (templates,)
    resolved = tuple(templates)
    if not resolved:
        raise InputError("a template set needs at least one template")
    for template in resolved:
        _check_template(template)
    return resolved


def fill_templates(names: Sequence[str], templates: str | Sequence[str]) -> list[str]:
    """Every template filled with every name, name-major: ``[n * T]`` strings."""
    if isinstance(names, str):
        raise InputError("names must be a sequence of strings, not one string (wrap it in a list)")
    resolved = resolve_templates(templates)
    return [template.format(name) for name in names for template in resolved]


def embed_templates(
    encoder: TextEncoder,
    names: Sequence[str],
    templates: str | Sequence[str] = "plain",
    *,
    cache: CacheChoice = "default",
    batch_size: int = 256,
) -> torch.Tensor:
    """Template-ensembled unit embeddings of ``names``.

    For each name, every template is filled with it and embedded; each embedding is
    L2-normalised, the ``T`` unit vectors are averaged, and the mean is renormalised.
    With one template this is the normalised embedding of the filled text.

    Args:
        encoder: the text encoder.
        names: ``n`` names (class names, attribute values, captions).
        templates: a set name of :data:`TEMPLATES`, one template, or a sequence of templates.
        cache: where the result is looked up by (encoder key, templates, names) and computed
            only on a miss: ``"default"``, the on-disk
            :func:`~vitdecomp.interpret.text.cache.default_cache` (``VITDECOMP_CACHE``); an
            :class:`~vitdecomp.interpret.text.cache.EmbeddingCache`; None: always computed.
        batch_size: texts per forward pass (all ``n * T`` filled texts are batched together).

    Returns:
        float32 CPU tensor ``[n, d]`` with unit rows.
    """
    import torch.nn.functional as F

    from .cache import resolve_cache

    if isinstance(names, str):
        raise InputError("names must be a sequence of strings, not one string (wrap it in a list)")
    resolved = resolve_templates(templates)
    texts = list(names)

    def compute() -> torch.Tensor:
        filled = fill_templates(texts, resolved)
        if not filled:
            return encoder.encode([], batch_size=batch_size, cache=None)
        emb = encoder.encode(filled, batch_size=batch_size, normalize=True, cache=None)  # [n*T, d]
        emb = emb.reshape(len(texts), len(resolved), -1).mean(dim=1)
        return F.normalize(emb, dim=-1)

    store = resolve_cache(cache)
    if store is None or not texts:
        return compute()
    return store.get_or_compute(encoder, texts, resolved, compute)
