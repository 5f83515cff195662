"""Fitting CompAlign (docs/method.md §3): the closed-form start, the parametrised maps, the streaming training
loop, checkpoints and the convergence record.

:func:`closed_form_maps` solves the least-squares problem ``Σ_g F_g x_g ≈ y`` from streamed normal
equations (one pass) and, for a constrained objective, makes the maps scaled (co-)isometries (polar
factor, least-squares scales, block-coordinate Procrustes); :func:`fit_compalign` starts there by default.
Mini-batches stream from a callable (a fresh iterator per epoch), so nothing but one batch is in
memory. Penalty objective: ``L = mean_x [1 − cos(Σ_i F_i c_i, y)] + λ Σ_maps ‖G_i − I‖_F``;
orthogonal objective: ``F_i = s_i Q_i`` with ``Q_i`` the Q factor of a free matrix (``QᵀQ = I``)
and the least-squares scale calibration afterwards. The state after ``k`` epochs is evaluated on
the held-out rows during pass ``k + 1``; early stopping on the held-out mean cosine restores the
best state; with a checkpoint the full training state is saved atomically after every epoch and a
resumed run equals an uninterrupted one (see :mod:`vitdecomp.interpret.align`).
"""
from __future__ import annotations

import logging
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import InputError
from .config import AlignConfig, Side, map_assignment, resolve_constraint
from .data import BatchSource, checked_batches, validation_mask
from .maps import CompAlign, CosineStats, group_sum

if TYPE_CHECKING:
    import torch

__all__ = ["CHECKPOINT_FORMAT", "CONVERGENCE_GAIN", "LOW_COSINE", "ClosedForm", "closed_form_maps", "fit_compalign"]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "vitdecomp.CompAlign.checkpoint/1"

#: A held-out cosine below this is reported as a warning: the mapped sum explains little of the CLIP embedding.
LOW_COSINE = 0.5
#: A fit that ran to its epoch limit is "not converged" when its last state is the best and beats every earlier
#: state's held-out cosine by more than this.
CONVERGENCE_GAIN = 1e-3
#: Block-coordinate Procrustes stops early once a sweep lowers the training squared error by less than this
#: share of ``‖Y‖²`` (i.e. raises the training ``R²`` by less than this).
SWEEP_TOL = 1e-6


def _orthonormal_columns(w: torch.Tensor) -> torch.Tensor:
    """Q of the reduced QR of tall ``w [..., m, n]`` (``m >= n``) with ``diag R > 0``: ``[..., m, n]``."""
    import torch

    q, r = torch.linalg.qr(w)
    sign = torch.sign(r.diagonal(dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return q * sign.unsqueeze(-2)


# ---------------------------------------------------------------- parameters
class _Params:
    """Trainable tensors and how they become maps ``F [n_maps, d_clip, d_model]``.

    penalty:     ``weight [n_maps, d_clip, d_model]`` is ``F``.
    orthogonal:  ``weight [n_maps, m, n]`` tall (``m >= n``), ``Q = qr(weight)``;
                 ``F = exp(log_scale) · Q`` (isometry: ``m, n = d_clip, d_model``) or
                 ``exp(log_scale) · Qᵀ`` (co-isometry: ``m, n = d_model, d_clip``).
    """

    def __init__(self, config: AlignConfig, side: Side, n_maps: int, d_model: int, d_clip: int,
                 device: torch.device) -> None:
        import torch

        self.parametrisation = config.parametrisation
        self.side = side
        gen = torch.Generator().manual_seed(int(config.seed))
        tall = (d_clip, d_model) if d_model <= d_clip else (d_model, d_clip)
        q = _orthonormal_columns(torch.randn(n_maps, *tall, generator=gen, dtype=torch.float64))
        if config.parametrisation == "penalty":
            init = q if d_model <= d_clip else q.mT  # a (co-)isometry with k = 1
            self.tensors = {"weight": init.to(torch.float32).contiguous()}
        else:
            # resolve_constraint guarantees the stored orientation is tall for the chosen side
            assert d_model == d_clip or (side == "isometry") == (d_model < d_clip)
            n_scales = 1 if config.common_scale else n_maps
            self.tensors = {"weight": q.to(torch.float32).contiguous(),
                            "log_scale": torch.zeros(n_scales, dtype=torch.float32)}
        self.tensors = {k: v.to(device).requires_grad_(True) for k, v in self.tensors.items()}

    def maps(self, tensors: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``F [n_maps, d_clip, d_model]`` (differentiable in the tensors)."""
        import torch

        t = self.tensors if tensors is None else tensors
        if self.parametrisation == "penalty":
            return t["weight"]
        q = _orthonormal_columns(t["weight"])
        if self.side == "coisometry":
            q = q.mT
        return torch.exp(t["log_scale"])[:, None, None] * q

    def penalty(self, maps: torch.Tensor) -> torch.Tensor:
        """``Σ_maps ‖G − I‖_F`` with ``G = FᵀF`` (isometry) or ``FFᵀ`` (co-isometry); unsquared, k = 1."""
        import torch

        gram = maps.mT @ maps if self.side == "isometry" else maps @ maps.mT
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        return torch.linalg.matrix_norm(gram - eye).sum()

    def start_from(self, start: ClosedForm) -> None:
        """Set the tensors to the closed-form start (:func:`closed_form_maps`)."""
        import torch

        with torch.no_grad():
            weight = self.tensors["weight"]
            if self.parametrisation == "penalty":
                weight.copy_(start.maps)
                return
            assert start.unit is not None and start.scales is not None
            weight.copy_(start.unit if self.side == "isometry" else start.unit.mT)
            log_scale = self.tensors["log_scale"]
            log_scale.copy_(torch.log(start.scales[: log_scale.shape[0]]))

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.tensors.items()}

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        import torch

        with torch.no_grad():
            for k, v in self.tensors.items():
                if tuple(state[k].shape) != tuple(v.shape):
                    raise InputError(f"checkpoint tensor {k} has shape {tuple(state[k].shape)}, "
                                     f"expected {tuple(v.shape)}")
                v.copy_(state[k])

    def optimizer(self, config: AlignConfig) -> torch.optim.Optimizer:
        import torch

        groups: list[dict[str, Any]] = [{"params": [self.tensors["weight"]], "weight_decay": config.weight_decay}]
        if "log_scale" in self.tensors:
            groups.append({"params": [self.tensors["log_scale"]], "weight_decay": 0.0})
        return torch.optim.AdamW(groups, lr=config.lr)


# ---------------------------------------------------------------- the closed-form start
@dataclass(frozen=True)
class ClosedForm:
    """The least-squares start of a fit (:func:`closed_form_maps`).

    Attributes:
        maps: ``[n_maps, d_clip, d_model]`` float64, the start ``F_g`` (scales included).
        unit: ``[n_maps, d_clip, d_model]`` float64, ``U_g`` with orthonormal columns (isometry) or rows
            (co-isometry), ``F_g = s_g U_g`` before any penalty rescaling; None for the unconstrained
            (``lam = 0``) penalty objective.
        scales: ``[n_maps]`` float64 ``s_g > 0`` (all equal with ``common_scale``), or None likewise.
        info: JSON-able record (system solved, columns, ridge, rows, training ``R²`` before and after
            the constraint, sweeps done); no timings, so that equal inputs give equal records.
    """

    maps: torch.Tensor
    unit: torch.Tensor | None
    scales: torch.Tensor | None
    info: dict[str, Any]


def _polar(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Polar factor ``U Vᵀ`` of ``g = U Σ Vᵀ`` (``[..., m, n]``, orthonormal columns when ``m >= n``, rows
    otherwise: the orthogonal Procrustes solution ``argmax_{U} tr(Uᵀ g)``) and the nuclear norm ``Σσ``."""
    import torch

    u, sig, vh = torch.linalg.svd(g, full_matrices=False)
    return u @ vh, sig.sum(-1)


def _solve_ridge(a: torch.Tensor, b: torch.Tensor, ridge: torch.Tensor) -> torch.Tensor:
    """``(A + diag(ridge))⁻¹ B`` for symmetric PSD ``A [p, p]``; least squares when that is singular."""
    import torch

    reg = a + torch.diag(ridge)
    chol, info = torch.linalg.cholesky_ex(reg)
    if int(info) == 0:
        return torch.cholesky_solve(b, chol)
    return torch.linalg.pinv(reg, hermitian=True) @ b


def closed_form_maps(
    batches: BatchSource,
    n_components: int,
    d_model: int,
    d_clip: int,
    config: AlignConfig,
    side: Side,
    *,
    device: str | torch.device | None = None,
) -> ClosedForm:
    """The least-squares maps CompAlign starts from (``AlignConfig.init="lstsq"``; docs/method.md §3).

    One pass over the **training** rows (the held-out rows are skipped) accumulates, in float64, the
    normal equations of the linear regression ``Σ_g F_g x_g ≈ y``, where ``x_g = Σ_{i∈g} c_i [d_model]``
    is map ``g``'s (group) sum and ``X = [x_1 … x_G]`` is ``[rows, G·d_model]``::

        A = XᵀX  [G·d_model, G·d_model],   B = XᵀY  [G·d_model, d_clip],   W = (A + R)⁻¹ B,   F_g = W_gᵀ

    with the ridge ``R`` diagonal, ``config.ridge · tr(A_gg)/d_model`` on block ``g`` (scale-free per map).
    When ``G·d_model > config.lstsq_max_columns`` the system is the shared map's (``X = Σ_g x_g``,
    ``d_model`` columns) and every map starts from its solution.

    Orthogonal objective, and penalty objective with ``lam > 0`` (whose penalty favours the same set):
    the least-squares scaled (co-)isometries ``F_g = s_g U_g``. ``U_g`` = the polar factor of ``F_g``
    (of ``F_gᵀ`` for the co-isometry), the nearest matrix with orthonormal columns (rows); then the
    scales minimising
    ``‖Y − Σ_g s_g U_g x_g‖²`` (``M s = b`` with ``M_gh = tr(U_g A_gh U_hᵀ)``, ``b_g = tr(U_g B_g)``; one
    common ``s`` with ``common_scale``; a negative ``s_g`` flips ``U_g``); then, on the isometry side,
    up to ``config.sweeps`` sweeps (fewer once a sweep gains less than :data:`SWEEP_TOL` of ``R²``) of
    block-coordinate Procrustes on the same normal equations: for each ``g``,
    with ``G_g = B_gᵀ − Σ_{h≠g} s_h U_h A_hg`` (the correlation of ``x_g`` with the residual of the other
    maps), ``U_g = polar(G_g)`` and ``s_g = ‖G_g‖_* / tr(A_gg)`` (common scale: ``s`` refitted after each
    sweep). Each step exactly minimises the squared error over one map (``‖U_g x‖ = ‖x‖``), so the
    training error never rises. No further pass over the data is needed.

    Penalty objective: those maps (with ``lam = 0``, the unconstrained ``F_g`` themselves) times one global
    factor that makes the mean squared scale ``mean_g tr(G_g)/d_G`` equal to 1 (the penalty's ``k = 1``;
    the cosine does not see it). Starting a penalised fit from the unconstrained solution would let the
    held-out-cosine selection keep maps far from isometries (measured: defect 6 on the tiny Swin).

    Args:
        batches, n_components, d_model, d_clip: as :func:`fit_compalign`.
        config: sharing, objective, ``ridge``, ``sweeps``, ``lstsq_max_columns``, split.
        side: the constrained Gram side (:func:`~vitdecomp.interpret.align.config.resolve_constraint`).
        device: where the batches are read to (the sums are kept on it).

    Raises:
        InputError: no training rows.
    """
    import torch

    dev = torch.device(device or "cpu")
    f64 = torch.float64
    map_index = map_assignment(config, n_components)
    n_maps = max(map_index) + 1
    index_t = torch.as_tensor(map_index, dtype=torch.long, device=dev)
    per_component = config.mode == "per_component"
    joint = n_maps * d_model <= config.lstsq_max_columns
    k = n_maps if joint else 1
    p = k * d_model
    a = torch.zeros(p, p, dtype=f64, device=dev)
    b = torch.zeros(p, d_clip, dtype=f64, device=dev)
    yy, n = 0.0, 0
    for values, targets, rows in checked_batches(batches, n_components, d_model, d_clip, dev):
        train = ~torch.as_tensor(validation_mask(rows, config.seed, config.val_fraction), device=dev)
        if not bool(train.any()):
            continue
        grouped = group_sum(values[train], index_t, n_maps, per_component).to(f64)  # [b, n_maps, d_model]
        x = grouped.reshape(grouped.shape[0], -1) if joint else grouped.sum(1)
        y = targets[train].to(f64)
        a.addmm_(x.T, x)
        b.addmm_(x.T, y)
        yy += float((y * y).sum())
        n += int(x.shape[0])
    if n == 0:
        raise InputError("no training rows: every row fell into the validation split")
    diag = a.diagonal().reshape(k, d_model)
    block = diag.sum(1) / d_model  # tr(A_gg) / d_model
    fallback = block[block > 0].mean() if bool((block > 0).any()) else torch.ones((), dtype=f64, device=dev)
    ridge = config.ridge * torch.where(block > 0, block, fallback)
    w = _solve_ridge(a, b, ridge.repeat_interleave(d_model))
    maps = w.reshape(k, d_model, d_clip).mT.contiguous()  # [k, d_clip, d_model]

    def r2(f: torch.Tensor) -> float:
        """``1 − ‖Y − Σ_g F_g x_g‖² / ‖Y‖²`` on the training rows, from the normal equations."""
        flat = f.mT.reshape(p, d_clip)  # [p, d_clip], block g = F_gᵀ
        sse = yy - 2.0 * float((flat * b).sum()) + float((flat * (a @ flat)).sum())
        return 1.0 - sse / yy if yy > 0 else float("nan")

    info: dict[str, Any] = {"method": "lstsq", "system": "joint" if joint else "shared", "columns": p,
                            "ridge": config.ridge, "train_rows": n, "train_r2": r2(maps)}
    unit = scales = None
    if config.parametrisation == "orthogonal" or config.lam > 0:
        unit, scales, done = _orthogonal_start(maps, a, b, yy, k, d_model, side, config)
        maps = scales[:, None, None] * unit
        info.update(sweeps=done, train_r2_constrained=r2(maps))
    if config.parametrisation == "penalty":
        gram = maps.mT @ maps if side == "isometry" else maps @ maps.mT
        mean_s2 = float((gram.diagonal(dim1=-2, dim2=-1).sum(-1) / gram.shape[-1]).mean())
        factor = 1.0 / math.sqrt(mean_s2) if mean_s2 > 0 and math.isfinite(mean_s2) else 1.0
        maps = maps * factor
        info["rescaled_by"] = factor
    if not joint:
        maps = maps.expand(n_maps, -1, -1).contiguous()
        if unit is not None and scales is not None:
            unit, scales = unit.expand(n_maps, -1, -1).contiguous(), scales.expand(n_maps).contiguous()
    return ClosedForm(maps=maps, unit=unit, scales=scales, info=info)


def _orthogonal_start(maps: torch.Tensor, a: torch.Tensor, b: torch.Tensor, yy: float, k: int, d_model: int,
                      side: Side, config: AlignConfig) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(U [k, d_clip, d_model], s [k], sweeps done)``: polar factors, least-squares scales and block-coordinate
    Procrustes sweeps (isometry side) of :func:`closed_form_maps`."""
    import torch

    d_clip = maps.shape[1]
    if side == "isometry":
        unit, _ = _polar(maps)
    else:
        unit = _polar(maps.mT.contiguous())[0].mT.contiguous()
    a4 = a.reshape(k, d_model, k, d_model)
    bb = b.reshape(k, d_model, d_clip)  # B_g = Σ x_g yᵀ

    def lsq_scales(u: torch.Tensor) -> torch.Tensor:
        m = torch.einsum("gkm,gmhn,hkn->gh", u, a4, u)
        rhs = torch.einsum("gkm,gmk->g", u, bb)
        if config.common_scale:
            total = float(m.sum())
            return torch.full((k,), float(rhs.sum()) / total if total > 0 else 1.0, dtype=u.dtype, device=u.device)
        return torch.linalg.pinv(m, hermitian=True) @ rhs

    s = lsq_scales(unit)
    if config.common_scale and float(s[0]) < 0:
        unit, s = -unit, -s
    else:
        unit, s = unit * torch.sign(s).where(s != 0, torch.ones_like(s))[:, None, None], s.abs()
    done = 0
    if side == "isometry" and config.sweeps > 0:
        tr_a = a.diagonal().reshape(k, d_model).sum(1)
        b_flat = bb.permute(2, 0, 1).reshape(d_clip, k * d_model)  # block g = B_gᵀ

        def flat_maps() -> torch.Tensor:
            return (s[:, None, None] * unit).permute(1, 0, 2).reshape(d_clip, k * d_model)  # [F_1 … F_k]

        def sse_part(flat: torch.Tensor, h: torch.Tensor) -> float:  # ‖Y − Σ F_g x_g‖² − ‖Y‖²
            return float((flat * (h - 2.0 * b_flat)).sum())

        flat = flat_maps()
        h = flat @ a  # H = Σ_h F_h A_h·, [d_clip, k·d_model]
        last = sse_part(flat, h)
        for _ in range(config.sweeps):
            for g in range(k):
                cols = slice(g * d_model, (g + 1) * d_model)
                f_old = s[g] * unit[g]
                grad = bb[g].T - h[:, cols] + f_old @ a[cols, cols]  # B_gᵀ − Σ_{h≠g} F_h A_hg
                u_new, nuc = _polar(grad)
                s_new = nuc / tr_a[g] if float(tr_a[g]) > 0 else s[g]
                if config.common_scale:
                    s_new = s[g]
                unit[g] = u_new
                delta = s_new * u_new - f_old
                h += delta @ a[cols, :]
                s[g] = s_new
            if config.common_scale:
                s = lsq_scales(unit)
                if float(s[0]) < 0:
                    unit, s = -unit, -s
                h = flat_maps() @ a
            done += 1
            now = sse_part(flat_maps(), h)
            if yy <= 0 or (last - now) / yy < SWEEP_TOL:
                break
            last = now
    top = float(s.max()) if s.numel() else 1.0
    s = s.clamp_min(max(top, 1e-30) * 1e-8)  # log-scales must be finite
    return unit, s, done


def _atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def fit_compalign(
    batches: BatchSource,
    n_components: int,
    d_model: int,
    d_clip: int,
    config: AlignConfig | None = None,
    *,
    checkpoint: Path | str | None = None,
    labels: Sequence[str] | None = None,
    device: str | None = None,
) -> CompAlign:
    """Fit CompAlign maps on streamed ``(components, CLIP embedding)`` pairs.

    Args:
        batches: called once per pass, returns an iterable of ``(values [batch, comp, d_model],
            clip_targets [batch, d_clip])`` or ``(values, clip_targets, rows [batch])``; every call
            must yield the same rows (in any order when ``rows`` are given).
        n_components, d_model, d_clip: shapes.
        config: objective, sharing and optimisation (default :class:`AlignConfig`).
        checkpoint: file for the training state, written atomically after every epoch; if it
            exists, training resumes from it (same config and shapes required).
        labels: component label strings, recorded so :meth:`CompAlign.apply` can check stacks.
        device: torch device to train on (default CPU); the result lives on CPU.

    With ``config.init="lstsq"`` (the default) one extra pass computes the closed-form start
    (:func:`closed_form_maps`) before the first epoch (and a checkpoint is written after it); the state
    after ``k`` epochs is then evaluated on the held-out rows as before, ``k = 0`` being the start.

    Returns:
        The best (highest mean validation cosine) maps, with the training record in ``meta``:
        ``val_cosine``, ``best_epoch``, ``stopped_early``, ``scale_calibration``, ``history`` (per
        evaluated state: ``epochs_trained``, ``val_cosine``, ``val_rows``, ``lsq_scale``), ``train_loss``,
        ``init`` (:attr:`ClosedForm.info`, or ``{"method": "random"}``), ``converged`` and ``warnings``
        (not converged at the epoch limit, held-out cosine below
        :data:`LOW_COSINE`; each is also logged with ``logging.warning``).

    Raises:
        AlignmentInfeasibleError: the orthogonality constraint cannot hold (see the module docs).
        InputError: bad shapes or groups, no validation rows, or a checkpoint of another run.
    """
    import torch

    config = config or AlignConfig()
    side = resolve_constraint(config, d_model, d_clip)
    map_index = map_assignment(config, n_components)
    n_maps = max(map_index) + 1
    if labels is not None and len(labels) != n_components:
        raise InputError(f"{len(labels)} labels for {n_components} components")
    dev = torch.device(device or "cpu")
    params = _Params(config, side, n_maps, d_model, d_clip, dev)
    opt = params.optimizer(config)
    index_t = torch.as_tensor(map_index, dtype=torch.long, device=dev)
    per_component = config.mode == "per_component"
    penalised = config.parametrisation == "penalty" and config.lam > 0
    identity_key = {"config": config.to_json(), "dims": [n_components, d_model, d_clip],
                    "labels": list(labels) if labels is not None else None}

    state: dict[str, Any] = {"next_epoch": 0, "stopped": False, "best": None, "best_cosine": -math.inf,
                             "best_epoch": -1, "history": [], "train_loss": [], "initialised": False, "init": None}
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    if ckpt_path is not None and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=dev, weights_only=True)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise InputError(f"{ckpt_path} is not a CompAlign checkpoint")
        if ckpt["key"] != identity_key:
            diff = [k for k in identity_key if ckpt["key"].get(k) != identity_key[k]]
            raise InputError(f"checkpoint {ckpt_path} belongs to another run (differs in {diff}); "
                             "delete it or choose another checkpoint path")
        params.load(ckpt["params"])
        opt.load_state_dict(ckpt["optimizer"])
        state = ckpt["state"]
        log.info("CompAlign: resuming from %s at epoch %d", ckpt_path, state["next_epoch"])

    def save_checkpoint() -> None:
        if ckpt_path is not None:
            _atomic_torch_save({"format": CHECKPOINT_FORMAT, "key": identity_key, "params": params.snapshot(),
                                "optimizer": opt.state_dict(), "state": state}, ckpt_path)

    if not state.get("initialised", state["next_epoch"] > 0):  # checkpoints before the closed-form start: done
        if config.init == "lstsq":
            start = closed_form_maps(batches, n_components, d_model, d_clip, config, side, device=dev)
            params.start_from(start)
            state["init"] = start.info
            log.info("CompAlign: least-squares start (%s system, %d columns, %d training rows): training R^2 %.4f%s",
                     start.info["system"], start.info["columns"], start.info["train_rows"], start.info["train_r2"],
                     "" if "train_r2_constrained" not in start.info
                     else f", scaled-orthogonal {start.info['train_r2_constrained']:.4f}")
        else:
            state["init"] = {"method": "random"}
        state["initialised"] = True
        if config.init == "lstsq":
            save_checkpoint()

    def record(epochs_trained: int, stats: CosineStats, snap: dict[str, torch.Tensor]) -> None:
        if stats.n == 0:
            raise InputError("no validation rows: use more data or a larger val_fraction")
        cos = stats.mean_cosine
        if not math.isfinite(cos):
            raise InputError(f"validation cosine is {cos} after {epochs_trained} epochs: non-finite components "
                             "or targets, or a learning rate that diverged")
        state["history"].append({"epochs_trained": epochs_trained, "val_cosine": cos, "val_rows": stats.n,
                                 "lsq_scale": stats.lsq_scale})
        if cos > state["best_cosine"] + config.min_delta:  # an improvement for early stopping
            state["improved_epoch"] = epochs_trained
        if cos > state["best_cosine"]:
            state.update(best=snap, best_cosine=cos, best_epoch=epochs_trained)

    def run_pass(train: bool) -> tuple[CosineStats, dict[str, torch.Tensor], float, int]:
        """One pass: evaluate the state at the start on validation rows; train on the others."""
        snap = params.snapshot()
        with torch.no_grad():
            snap_maps = params.maps(snap)
        stats = CosineStats()
        buf_x: list[torch.Tensor] = []
        buf_y: list[torch.Tensor] = []
        n_buf, loss_sum, steps = 0, 0.0, 0

        def step(x: torch.Tensor, y: torch.Tensor) -> float:
            opt.zero_grad(set_to_none=True)
            maps = params.maps()
            pred = torch.einsum("bgm,gkm->bk", x, maps)
            loss = (1.0 - torch.nn.functional.cosine_similarity(pred, y, dim=-1, eps=1e-8)).mean()
            if penalised:
                loss = loss + config.lam * params.penalty(maps)
            loss.backward()
            opt.step()
            return float(loss.detach())

        for values, targets, rows in checked_batches(batches, n_components, d_model, d_clip, dev):
            val = torch.as_tensor(validation_mask(rows, config.seed, config.val_fraction), device=dev)
            grouped = group_sum(values, index_t, n_maps, per_component)
            if bool(val.any()):
                with torch.no_grad():
                    stats.update(torch.einsum("bgm,gkm->bk", grouped[val], snap_maps), targets[val])
            if not train or bool(val.all()):
                continue
            buf_x.append(grouped[~val])
            buf_y.append(targets[~val])
            n_buf += int(buf_x[-1].shape[0])
            while n_buf >= config.batch_size:
                x, y = torch.cat(buf_x), torch.cat(buf_y)
                loss_sum += step(x[: config.batch_size], y[: config.batch_size])
                steps += 1
                buf_x, buf_y = [x[config.batch_size:]], [y[config.batch_size:]]
                n_buf -= config.batch_size
        if train and n_buf:
            loss_sum += step(torch.cat(buf_x), torch.cat(buf_y))
            steps += 1
        return stats, snap, loss_sum / max(steps, 1), steps

    for epoch in range(int(state["next_epoch"]), config.epochs):
        if state["stopped"]:
            break
        stats, snap, train_loss, steps = run_pass(train=True)
        if steps == 0:
            raise InputError("no training rows: every row fell into the validation split")
        record(epoch, stats, snap)
        state["train_loss"].append(train_loss)
        state["next_epoch"] = epoch + 1
        log.info("CompAlign epoch %d/%d: train loss %.5g (%d steps); val cosine after %d epochs %.6f",
                 epoch + 1, config.epochs, train_loss, steps, epoch, stats.mean_cosine)
        if config.patience is not None and epoch - state.get("improved_epoch", state["best_epoch"]) >= config.patience:
            state["stopped"] = True
            log.info("CompAlign: early stop, best val cosine %.6f after %d epochs",
                     state["best_cosine"], state["best_epoch"])
        save_checkpoint()
    if not state["stopped"]:  # evaluate the last state (no training)
        stats, snap, _, _ = run_pass(train=False)
        record(config.epochs, stats, snap)
        log.info("CompAlign: val cosine after %d epochs %.6f", config.epochs, stats.mean_cosine)

    best = state["best"]
    params.load(best)
    best_entry = next(h for h in state["history"] if h["epochs_trained"] == state["best_epoch"])
    calibration = 1.0
    if config.parametrisation == "orthogonal":
        alpha = best_entry["lsq_scale"]
        if alpha > 0 and math.isfinite(alpha):
            calibration = float(alpha)
            with torch.no_grad():
                params.tensors["log_scale"] += math.log(alpha)
        else:
            log.warning("CompAlign: least-squares scale %.3g is not positive; scales left uncalibrated", alpha)
    with torch.no_grad():
        group_maps = params.maps().detach().to("cpu", torch.float32).contiguous()
    converged, warnings = _convergence(state["history"], state["best_epoch"], bool(state["stopped"]), config)
    for warning in warnings:
        log.warning("CompAlign: %s", warning)
    meta = {
        "val_cosine": state["best_cosine"],
        "best_epoch": state["best_epoch"],
        "stopped_early": bool(state["stopped"]),
        "scale_calibration": calibration,
        "history": state["history"],
        "train_loss": state["train_loss"],
        "init": state.get("init") or {"method": config.init},
        "converged": converged,
        "warnings": warnings,
    }
    return CompAlign(group_maps=group_maps, map_index=tuple(map_index), config=config, constraint=side,
                     labels=tuple(str(s) for s in labels) if labels is not None else None, meta=meta)


def _convergence(history: Sequence[Mapping[str, Any]], best_epoch: int, stopped: bool,
                 config: AlignConfig) -> tuple[bool, list[str]]:
    """``(converged, warnings)`` of a fit's held-out record ``history`` (one entry per evaluated state).

    Not converged: the fit ran to ``config.epochs`` without stopping early, its last state is the best,
    and it beats every earlier state by more than :data:`CONVERGENCE_GAIN`. A best held-out
    cosine below :data:`LOW_COSINE` is a warning too.
    """
    warnings: list[str] = []
    cosines = [float(h["val_cosine"]) for h in history]
    best = max(cosines)
    gain = cosines[-1] - max(cosines[:-1]) if len(cosines) >= 2 else 0.0
    converged = stopped or best_epoch != history[-1]["epochs_trained"] or gain <= CONVERGENCE_GAIN
    if not converged:
        warnings.append(f"not converged: the held-out cosine still rose by {gain:.3g} in the last of {config.epochs} "
                        f"epochs (to {cosines[-1]:.4f}); train longer (--epochs) or with a larger --lr")
    if best < LOW_COSINE:
        warnings.append(f"low held-out cosine {best:.4f} < {LOW_COSINE}: the mapped components explain little of the "
                        "CLIP embedding, so text read through these maps says little about the model")
    return converged, warnings
