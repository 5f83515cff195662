"""Evaluating TextSpan labels (docs/method.md §5 "Evaluation") and CompAlign's TextSpan match rate (§3 metric (b)).

:func:`reconstruct` replaces a head's term by its mean plus the projection of the centred term on
the span of its chosen texts, ``x -> μ + (x − μ) BᵀB``; :func:`reconstruction_accuracy` streams a
store once and scores the zero-shot accuracy with every analysed head so replaced, for several
``m`` at once; :func:`textspan_match_rate` compares TextSpan over a model's classifier rows on the
raw components with TextSpan over CLIP class-name embeddings on the mapped components.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np

from ...errors import InputError
from .span import SpanResult, check_m, float64_array, textspan_from_moments

if TYPE_CHECKING:
    import torch

    from ...core.stack import ComponentStack
    from ...store.component_store import RunningMoments
    from ..align.maps import CompAlign

__all__ = ["earlier_heads", "reconstruct", "reconstruction_accuracy", "textspan_match_rate"]

log = logging.getLogger(__name__)

ArrayLike = TypeVar("ArrayLike", "np.ndarray", "torch.Tensor")


def reconstruct(values: ArrayLike, result: SpanResult) -> ArrayLike:
    """A component's term replaced by its TextSpan reconstruction (docs/method.md §5 "Evaluation").

    ``x -> μ + (x - μ) Bᵀ B`` with ``B = result.reconstruction_basis [m, d]`` (orthonormal
    rows) and ``μ = result.mean``: the mean plus the projection of the centred term on the
    span of the chosen texts.

    Args:
        values: ``[..., d]`` the component's values (e.g. ``[batch, d]``), numpy or torch.

    Returns:
        Same type, shape and (floating) dtype/device as ``values``; computed in float64.
    """
    basis = np.asarray(result.reconstruction_basis, dtype=np.float64)
    mean = np.asarray(result.mean, dtype=np.float64)
    d = mean.shape[0]
    if values.shape[-1] != d:
        raise InputError(f"values have dim {values.shape[-1]}, the TextSpan result has {d}")
    if hasattr(values, "detach"):
        import torch

        x = values.detach().to(torch.float64)
        b = torch.as_tensor(basis, dtype=torch.float64, device=x.device)
        mu = torch.as_tensor(mean, dtype=torch.float64, device=x.device)
        out = mu + ((x - mu) @ b.T) @ b
        return out.to(values.dtype if values.is_floating_point() else torch.float64)  # type: ignore[return-value]
    arr = np.asarray(values)
    out_np = mean + ((arr.astype(np.float64) - mean) @ basis.T) @ basis
    dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float64
    return out_np.astype(dtype, copy=False)  # type: ignore[return-value]


# --------------------------------------------------------------------------- evaluation at dataset scale
def earlier_heads(names: Sequence[str], analysed: Sequence[int]) -> list[int]:
    """Rows of the heads that are not analysed and sit in a block before the first analysed block.

    This is what the published evaluation mean-ablates (``clip_text_span``: every head of the layers
    before the analysed last ones; MLPs and constant rows are kept). Blocks are ordered by
    :func:`vitdecomp.interpret.ablate.block_key` (``layer``, or ``(stage, block)`` for hierarchical labels).
    """
    from ...core.labels import parse_label
    from ..ablate.kernels import block_key

    keys: list[tuple[int, ...] | None] = []
    heads: list[bool] = []
    for name in names:
        try:
            lab = parse_label(str(name))
        except (ValueError, KeyError):
            keys.append(None)
            heads.append(False)
            continue
        keys.append(block_key(lab))
        heads.append(lab.kind == "head")
    own = [keys[i] for i in analysed if keys[i] is not None]
    if not own:
        return []
    first = min(own)  # type: ignore[type-var]
    chosen = set(analysed)
    return [i for i, (key, is_head) in enumerate(zip(keys, heads))
            if is_head and i not in chosen and key is not None and key < first]


def _count(correct: int, n: int) -> dict[str, Any]:
    return {"correct": int(correct), "n": int(n), "accuracy": correct / n if n else None}


def reconstruction_accuracy(
    batches: Iterable[tuple[ComponentStack, Any]],
    results: Sequence[SpanResult],
    class_directions: np.ndarray | torch.Tensor,
    *,
    m_values: Sequence[int],
    earlier: Literal["mean", "keep"] = "mean",
    means: np.ndarray | torch.Tensor | None = None,
) -> dict[str, Any]:
    """Zero-shot accuracy with every analysed head replaced by its ``m``-text reconstruction (docs/method.md §5).

    For analysed heads ``A`` (one :class:`SpanResult` each, matched to the stack rows by label)
    with means ``μ_i`` and orthonormal bases ``B_i`` (rows in selection order), the set ``E`` of
    earlier heads (``earlier="mean"``: the heads not analysed in blocks before the first analysed
    block, as the published code; ``"keep"``: none) and reference means ``μ̄_i``::

        z'_m(x) = Σ_i c_i(x) + Σ_{i∈E} (μ̄_i − c_i(x)) + Σ_{i∈A} (r_i^m(x) − c_i(x)),
        r_i^m(x) = μ_i + (c_i(x) − μ_i) B_i[:m]ᵀ B_i[:m]       (:func:`reconstruct` with m texts)

    and the prediction is ``argmax_c ⟨z'_m, w_c⟩`` (rows of ``class_directions`` used as given;
    unit rows make it the cosine argmax). Every ``m`` of ``m_values`` is scored in the same pass
    (memory: one batch, ``[batch, Σ_i k_i]`` coefficients). A head with fewer than ``m`` chosen
    texts uses all of them (counted in ``heads_short``). MLPs and constant rows are never changed.

    Reference points (same rows): ``unablated`` (``z``), ``analysed_kept`` (only ``E``
    mean-ablated, the ceiling of the reconstruction; None when ``E`` is empty) and
    ``mean_ablated`` (every analysed head at its mean, ``E`` as above: ``m = 0``).

    Args:
        batches: ``(stack, targets [batch])`` pairs (component stacks, tokens summed here, in the
            space of ``class_directions``); rows with a negative target are left out.
        results: TextSpan results of the analysed heads, e.g. from :func:`textspan_heads` with
            ``m = max(m_values)``; ``label`` must name a stack row.
        class_directions: ``[C, d]`` class rows (a zero-shot head).
        m_values: numbers of texts per head to evaluate (``>= 0``).
        earlier: ``"mean"`` (published protocol) or ``"keep"``.
        means: ``[comp, d]`` reference means of all stack rows; needed when ``earlier="mean"``
            and there are earlier heads (e.g. ``moments.mean``).

    Returns:
        ``{"n", "n_classes", "analysed", "earlier", "earlier_ablated", "unablated",
        "analysed_kept", "mean_ablated", "by_m": [{"m", "correct", "n", "accuracy",
        "heads_short"}]}``; accuracies are None when no row was scored.

    Raises:
        InputError: bad ``m_values``/``earlier``, labels missing from the stacks, widths that
            disagree, targets ``>= C``, or missing ``means``.
    """
    import torch

    if earlier not in ("mean", "keep"):
        raise InputError(f"earlier must be 'mean' or 'keep', got {earlier!r}")
    ms = sorted({int(m) for m in m_values})
    if not ms or ms[0] < 0:
        raise InputError(f"m_values must be a non-empty list of integers >= 0, got {list(m_values)}")
    if not results:
        raise InputError("reconstruction_accuracy needs at least one TextSpan result")
    w = torch.from_numpy(float64_array(class_directions, "class_directions", 2))  # [C, d]
    n_classes, d = w.shape
    labels = [r.label for r in results]
    if len(set(labels)) != len(labels):
        raise InputError("two TextSpan results have the same label")
    bases: list[np.ndarray] = []
    for r in results:
        b = np.asarray(r.reconstruction_basis, dtype=np.float64).reshape(-1, d) if np.size(
            r.reconstruction_basis) else np.zeros((0, d))
        if np.asarray(r.mean).shape != (d,) or b.shape[1] != d:
            raise InputError(f"TextSpan result {r.label!r} is {np.asarray(r.mean).shape[-1]} wide, the class "
                             f"directions {d}")
        bases.append(b)
    mu_a = torch.from_numpy(np.stack([np.asarray(r.mean, dtype=np.float64) for r in results]))  # [A, d]
    basis_t = [torch.from_numpy(b) for b in bases]
    steps = torch.from_numpy(np.concatenate([np.arange(b.shape[0]) for b in bases]))  # [K]
    bw = torch.cat(basis_t) @ w.T  # [K, C]: the class logits of every basis direction
    select = {m: steps < m for m in ms}
    short = {m: sum(b.shape[0] < m for b in bases) for m in ms}

    names = ["unablated", "analysed_kept", "mean_ablated", *(f"m={m}" for m in ms)]
    counts = {name: [0, 0] for name in names}
    rows_a: torch.Tensor | None = None
    rows_e: list[int] = []
    mean_e: torch.Tensor | None = None
    earlier_names: list[str] = []
    n_rows = 0
    for stack, targets in batches:
        stack = stack.sum_tokens()
        if rows_a is None:
            index = {str(n): i for i, n in enumerate(stack.names)}
            missing = [lab for lab in labels if lab not in index]
            if missing:
                raise InputError(f"analysed component(s) {missing[:5]} are not rows of the stacks")
            analysed = [index[lab] for lab in labels]
            rows_a = torch.as_tensor(analysed, dtype=torch.long)
            rows_e = earlier_heads(stack.names, analysed) if earlier == "mean" else []
            if rows_e:
                if means is None:
                    raise InputError(f"earlier='mean' needs the reference means [comp, d] "
                                     f"({len(rows_e)} earlier heads to mean-ablate)")
                mt = torch.from_numpy(float64_array(means, "means", 2))
                if tuple(mt.shape) != (stack.n_components, d):
                    raise InputError(f"means must be [{stack.n_components}, {d}], got {tuple(mt.shape)}")
                mean_e = mt[rows_e].sum(0)
            earlier_names = [str(stack.names[i]) for i in rows_e]
        if stack.dim != d:
            raise InputError(f"the stacks are {stack.dim} wide, the class directions {d}")
        t = torch.as_tensor(np.asarray(targets)).reshape(-1).long()
        if t.numel() != stack.batch_size:
            raise InputError(f"{t.numel()} targets for a batch of {stack.batch_size}")
        keep = t >= 0
        if not bool(keep.any()):
            continue
        t = t[keep]
        if int(t.max()) >= n_classes:
            raise InputError(f"target {int(t.max())} but only {n_classes} class directions")
        v = stack.values.to(torch.float64)[:, keep]  # [comp, b, d]
        b = v.shape[1]
        n_rows += b
        z = v.sum(0)
        z_e = z - v[rows_e].sum(0) + mean_e if rows_e else z
        c_a = v.index_select(0, rows_a)  # [A, b, d]
        z_base = z_e - c_a.sum(0) + mu_a.sum(0)
        # coefficients of each head's centred term on its own basis rows: [b, K]
        coef = torch.cat([(c_a[j] - mu_a[j]) @ basis_t[j].T for j in range(len(basis_t))], dim=1)
        base_logits = z_base @ w.T

        def score(name: str, logits: torch.Tensor) -> None:
            counts[name][0] += int((logits.argmax(-1) == t).sum())
            counts[name][1] += b

        score("unablated", z @ w.T)
        if rows_e:
            score("analysed_kept", z_e @ w.T)
        score("mean_ablated", base_logits)
        for m in ms:
            sel = select[m]
            score(f"m={m}", base_logits + coef[:, sel] @ bw[sel])
    log.info("TextSpan evaluation: %d heads, %d rows, m in %s", len(labels), n_rows, ms)
    return {
        "n": n_rows,
        "n_classes": int(n_classes),
        "analysed": labels,
        "earlier": earlier,
        "earlier_ablated": earlier_names,
        "unablated": _count(*counts["unablated"]),
        "analysed_kept": _count(*counts["analysed_kept"]) if rows_e else None,
        "mean_ablated": _count(*counts["mean_ablated"]),
        "by_m": [{"m": m, **_count(*counts[f"m={m}"]), "heads_short": short[m]} for m in ms],
    }


def _unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise InputError(f"{name} has a zero row")
    return x / norms


def textspan_match_rate(
    moments: RunningMoments,
    maps: CompAlign | np.ndarray | torch.Tensor,
    class_rows: np.ndarray | torch.Tensor,
    class_embeddings: np.ndarray | torch.Tensor,
    *,
    labels: Sequence[str],
    components: Sequence[int | str] | None = None,
    class_names: Sequence[str] | None = None,
    m: int = 10,
    rank: int | None = 80,
    normalize_candidates: bool = True,
    min_norm: float = 1e-6,
) -> dict[str, Any]:
    """TextSpan match rate of CompAlign maps (docs/method.md §3, metric (b)).

    Per component ``i`` (model-space moments ``μ_i``, ``Σ_i``; map ``F_i [d_clip, d_model]``):

    * ground truth: TextSpan (:func:`textspan_from_moments`, ``m`` picks) with the model's own
      class vectors (``class_rows [C, d_model]``, rows scaled to unit norm) as the pool, on the
      raw component: moments ``(μ_i, Σ_i)``;
    * prediction: TextSpan with the CLIP class-name embeddings (``class_embeddings [C, d_clip]``,
      row ``k`` = the same class as ``class_rows[k]``) on the mapped component ``a_i = F_i c_i``,
      whose moments are exactly ``(F_i μ_i, F_i Σ_i F_iᵀ)`` (the maps are linear), so the one
      streaming pass of the model-space moments serves both sides;
    * score: ``|T_i ∩ P_i| / max(|T_i|, |P_i|)`` (the class sets, ``match_rate``) and the
      position-wise agreement ``#{k: T_i[k] = P_i[k]} / max(|T_i|, |P_i|)``
      (``match_rate_ordered`` <= ``match_rate``), each averaged over components.

    The paper's "exact-match fraction" [paper Tab. 1] does not say whether order counts; the set
    version is our headline (TextSpan's later picks depend on the earlier ones, so the order is
    noisy while the chosen set is what a reader uses); both are reported.

    For ``F_i = s_i Q_i`` with orthonormal columns and ``class_embeddings = Q_i class_rows``
    (normalised), both TextSpans see the same problem up to the rotation and the scale ``s_i²``, so
    the match rate is 1.

    Args:
        moments: model-space moments with covariance over ``[batch, comp, d_model]``.
        maps: a :class:`~vitdecomp.interpret.align.CompAlign` (its per-component maps), ``[comp, d_clip,
            d_model]`` per-component maps, or one shared ``[d_clip, d_model]`` map.
        class_rows: ``[C, d_model]`` the model's classifier rows (logits ``z W_cᵀ``).
        class_embeddings: ``[C, d_clip]`` CLIP class-name embeddings, same class order.
        labels: one label per component of ``moments``.
        components: indices or labels to score (default all).
        class_names: ``C`` names for the output (default ``"0", "1", ...``).
        m, rank, normalize_candidates, min_norm: as in :func:`textspan_from_moments`, both sides.

    Returns:
        ``{"match_rate", "match_rate_ordered", "chance", "m", "rank", "n_components", "n_images",
        "per_component": [{"label", "set", "ordered", "truth", "predicted"}]}``; ``chance = m / C`` is
        the expected set match of two independent uniform draws of ``m`` of the ``C`` classes.

    Raises:
        InputError: no covariance, shapes that disagree, zero class rows.
    """
    if moments.m2 is None:
        raise InputError("the match rate needs second moments: accumulate RunningMoments with covariance=True")
    if moments.count < 1:
        raise InputError("the moments hold no data (count == 0)")
    check_m(m)
    n_comp, d_model = moments.shape
    names = [str(lab) for lab in labels]
    if len(names) != n_comp:
        raise InputError(f"{len(names)} labels for {n_comp} components in the moments")
    if hasattr(maps, "group_maps"):  # CompAlign, without importing torch here
        f_all = float64_array(maps.maps, "maps", 3)  # type: ignore[union-attr]
    else:
        raw = maps.detach().cpu().double().numpy() if hasattr(maps, "detach") else np.asarray(maps, np.float64)
        f_all = float64_array(raw[None] if raw.ndim == 2 else raw, "maps", 3)
    if f_all.shape[0] not in (1, n_comp) or f_all.shape[2] != d_model:
        raise InputError(f"maps must be [{n_comp}, d_clip, {d_model}] (or one shared [d_clip, {d_model}]), got "
                         f"{tuple(f_all.shape)}")
    d_clip = f_all.shape[1]
    rows = _unit_rows(float64_array(class_rows, "class_rows", 2), "class_rows")
    emb = float64_array(class_embeddings, "class_embeddings", 2)
    if rows.shape[1] != d_model:
        raise InputError(f"class rows are {rows.shape[1]} wide, the components {d_model}")
    if emb.shape != (rows.shape[0], d_clip):
        raise InputError(f"class embeddings must be [{rows.shape[0]}, {d_clip}] (one per model class, CLIP width), "
                         f"got {tuple(emb.shape)}")
    texts = [str(c) for c in class_names] if class_names is not None else [str(k) for k in range(rows.shape[0])]
    if len(texts) != rows.shape[0]:
        raise InputError(f"{len(texts)} class names for {rows.shape[0]} classes")
    index = {name: i for i, name in enumerate(names)}
    order: list[int] = []
    for c in range(n_comp) if components is None else components:
        if isinstance(c, str):
            if c not in index:
                raise InputError(f"unknown component label {c!r}")
            order.append(index[c])
        elif not 0 <= int(c) < n_comp:
            raise InputError(f"component index {c} out of range for {n_comp} components")
        else:
            order.append(int(c))

    per: list[dict[str, Any]] = []
    for c in order:
        mu = moments.mean[c]
        sigma = moments.m2[c] / moments.count
        f = f_all[c if f_all.shape[0] > 1 else 0]
        kw = {"m": m, "rank": rank, "normalize_candidates": normalize_candidates, "min_norm": min_norm,
              "label": names[c]}
        truth = textspan_from_moments(mu, sigma, texts, rows, **kw).indices  # type: ignore[arg-type]
        pred = textspan_from_moments(f @ mu, f @ sigma @ f.T, texts, emb, **kw).indices  # type: ignore[arg-type]
        size = max(len(truth), len(pred))
        per.append({
            "label": names[c],
            "set": len(set(truth) & set(pred)) / size if size else None,
            "ordered": sum(a == b for a, b in zip(truth, pred)) / size if size else None,
            "truth": [texts[k] for k in truth],
            "predicted": [texts[k] for k in pred],
        })
    scored = [p for p in per if p["set"] is not None]
    return {
        "match_rate": float(np.mean([p["set"] for p in scored])) if scored else None,
        "match_rate_ordered": float(np.mean([p["ordered"] for p in scored])) if scored else None,
        "definition": "per component |T∩P|/max(|T|,|P|) of the TextSpan class picks (set) and the share of "
                      "equal picks position by position (ordered); T over the model's classifier rows on c_i, P "
                      "over the CLIP class-name embeddings on F_i c_i; averaged over components",
        "chance": min(m, rows.shape[0]) / rows.shape[0],
        "m": m,
        "rank": rank,
        "n_components": len(per),
        "n_images": int(moments.count),
        "per_component": per,
    }
