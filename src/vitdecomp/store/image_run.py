"""``decompose_images``: a handful of image files decomposed in memory, with their largest components.

The in-memory counterpart of :func:`~vitdecomp.store.dataset_run.decompose_dataset` (which streams a
dataset into an on-disk store): image files (or folders, searched recursively) are read with the
shared skip rules, decomposed batch by batch (``vitdecomp.decompose``, checked: ``Σ_i c_i = z``)
and concatenated into one :class:`~vitdecomp.core.stack.ComponentStack` ``[comp, n, (token,) d]``.
:meth:`ImageDecomposition.to_json` reports the largest components (what ``vitdecomp decompose``
prints): per image for a few images, on average for many, and for a classifier each image's
contributions to its predicted logit.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError

if TYPE_CHECKING:
    from ..core.model import Model
    from ..core.stack import ComponentStack

__all__ = ["SHOW_PER_IMAGE", "ImageDecomposition", "decompose_images", "top_components_report"]

log = logging.getLogger(__name__)

#: Up to this many images the report lists each image; above, the mean over images.
SHOW_PER_IMAGE = 4


@dataclass
class ImageDecomposition:
    """What :func:`decompose_images` computed.

    Attributes:
        model: the model; ``stack``: every image's decomposition, ``[comp, n, (token,) d]``, with
            ``meta["images"]`` and ``meta["skipped"]``.
        images: the files decomposed (in stack order); ``skipped``: ``{path: reason}`` of unreadable ones.
        top: components per list of the report.
    """

    model: Model
    stack: ComponentStack
    images: list[Path]
    skipped: dict[str, str] = field(default_factory=dict)
    top: int = 10

    def to_json(self) -> dict[str, Any]:
        """``vitdecomp decompose --json`` (without ``saved``): :func:`top_components_report` plus the
        image paths and the skipped files."""
        report = top_components_report(self.model, self.stack, self.top)
        report.update(images=[str(p) for p in self.images], skipped=dict(self.skipped))
        return report


def decompose_images(
    model: Model | str,
    inputs: str | Path | Sequence[str | Path],
    *,
    granularity: str = "head",
    start_layer: int = 0,
    ln_mode: str = "centered",
    bias_mode: str = "explicit",
    dtype: str = "float32",
    batch_size: int = 16,
    top: int = 10,
    progress: bool = False,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    device: str | None = None,
) -> ImageDecomposition:
    """Decompose image files exactly: ``z(x) = Σ_i c_i(x)`` for every readable image.

    Args:
        model: a Model, or a spec loaded with ``pretrained`` / ``checkpoint`` / ``device``.
        inputs: image files or directories (searched recursively, sorted).
        granularity: ``"layer"``, ``"head"`` or ``"head_token"``; start_layer: first decomposed block
            (earlier ones form ``rest``); ln_mode, bias_mode: see :func:`vitdecomp.decompose`.
        dtype: ``"float32"`` or ``"float64"`` (the decomposition's arithmetic).
        batch_size: images per forward pass.
        top: components per list of :meth:`ImageDecomposition.to_json`.
        progress: a progress bar over batches.

    Returns:
        An :class:`ImageDecomposition`: the stack ``[comp, n, (token,) d]`` of the readable images.

    Raises:
        InputError: no image files, none readable, bad settings. DecompositionError: the sum
            check failed.
    """
    import torch
    from tqdm import tqdm

    from ..core.decomposition import decompose
    from ..core.model import Model as _Model
    from ..core.stack import ComponentStack
    from ..data.images import find_images, iter_image_batches

    if batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    if top < 1:
        raise InputError("--top must be at least 1")
    if dtype not in ("float32", "float64"):
        raise InputError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    given = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    paths = find_images(given)
    if not paths:
        raise InputError(f"no image files found in {' '.join(map(str, given))}")
    if not isinstance(model, _Model):
        from ..core.loading import load

        model = load(model, pretrained=pretrained, checkpoint=checkpoint, device=device)
    work = torch.float64 if dtype == "float64" else torch.float32
    stacks, used, skipped = [], [], {}
    n_batches = -(-len(paths) // batch_size)
    batches = iter_image_batches(paths, model.transform, batch_size)
    for batch in tqdm(batches, total=n_batches, desc="decompose", unit="batch", disable=n_batches < 2 or not progress):
        skipped.update(batch.skipped)
        if batch.pixels is None:
            continue
        stacks.append(decompose(model, batch.pixels, granularity=granularity, start_layer=start_layer,
                                ln_mode=ln_mode, bias_mode=bias_mode, dtype=work).to("cpu"))
        used.extend(batch.paths)
    if not stacks:
        raise InputError(f"none of the {len(paths)} images could be read: {skipped}")
    stack = ComponentStack.concat(stacks)
    stack = replace(stack, meta={**stack.meta, "images": [str(p) for p in used], "skipped": skipped})
    return ImageDecomposition(model=model, stack=stack, images=list(used), skipped=skipped, top=top)


def top_components_report(model: Model, stack: ComponentStack, top: int = 10) -> dict[str, Any]:
    """The largest components of a stack, per image (up to :data:`SHOW_PER_IMAGE` images) or on average.

    With tokens summed, ``c_i [comp, n, d]`` and ``z = Σ_i c_i``: components are ranked by ``‖c_i‖``
    and reported with their share of ``z``, ``<c_i, z> / ‖z‖²`` (which sums to 1 over components). For
    a classifier ``logits = W z + b`` each image also gets its predicted class ``p`` and the
    components of largest ``|<W_p, c_i>|`` (their contributions to the logit ``W_p z + b_p``).

    Returns:
        ``{"model", "weights", "granularity", "components", "error", "tolerance", "rows": [{"image"
        (index, None for the mean), "top": [{"component", "norm", "share"}], "predicted_class",
        "logit", "logit_top": [{"component", "contribution"}]}]}``.
    """
    import torch

    summed = stack.sum_tokens()
    ref = summed.reference.double()
    values = summed.values.double()  # [comp, batch, d]
    share = torch.einsum("cbd,bd->cb", values, ref) / ref.pow(2).sum(-1)  # sums to 1 over components
    norms = values.norm(dim=-1)
    report: dict[str, Any] = {
        "model": model.name,
        "weights": model.weights,
        "granularity": stack.meta.get("granularity"),
        "components": len(stack),
        "error": stack.error(),
        "tolerance": float(stack.meta.get("rtol", 1e-5)),
    }
    classifier = model.classifier()
    per_image = stack.batch_size <= SHOW_PER_IMAGE
    rows = []
    columns = range(stack.batch_size) if per_image else [None]
    for b in columns:
        n = norms[:, b] if b is not None else norms.mean(1)
        s = share[:, b] if b is not None else share.mean(1)
        order = torch.argsort(n, descending=True)[:top]
        entry: dict[str, Any] = {
            "image": None if b is None else b,
            "top": [{"component": stack.names[i], "norm": float(n[i]), "share": float(s[i])} for i in order],
        }
        if classifier is not None and b is not None:
            weight, bias = (t.detach() if t is not None else None for t in classifier)
            logits = ref[b] @ weight.double().T + (bias.double() if bias is not None else 0.0)
            pred = int(logits.argmax())
            contrib = values[:, b] @ weight[pred].double()
            best = torch.argsort(contrib.abs(), descending=True)[:top]
            entry["predicted_class"] = pred
            entry["logit"] = float(logits[pred])
            entry["logit_top"] = [{"component": stack.names[i], "contribution": float(contrib[i])} for i in best]
        rows.append(entry)
    report["rows"] = rows
    return report
