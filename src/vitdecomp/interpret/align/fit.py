"""Fitting CompAlign (docs/method.md §3): the parametrised maps, the streaming training loop, checkpoints.

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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import InputError
from .config import AlignConfig, Side, map_assignment, resolve_constraint
from .data import BatchSource, checked_batches, validation_mask
from .maps import CompAlign, CosineStats, group_sum

if TYPE_CHECKING:
    import torch

__all__ = ["CHECKPOINT_FORMAT", "fit_compalign"]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "vitdecomp.CompAlign.checkpoint/1"


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

    Returns:
        The best (highest mean validation cosine) maps, with the training record in ``meta``.

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
                             "best_epoch": -1, "history": [], "train_loss": []}
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

    def record(epochs_trained: int, stats: CosineStats, snap: dict[str, torch.Tensor]) -> None:
        if stats.n == 0:
            raise InputError("no validation rows: use more data or a larger val_fraction")
        cos = stats.mean_cosine
        if not math.isfinite(cos):
            raise InputError(f"validation cosine is {cos} after {epochs_trained} epochs: non-finite components "
                             "or targets, or a learning rate that diverged")
        state["history"].append({"epochs_trained": epochs_trained, "val_cosine": cos, "val_rows": stats.n,
                                 "lsq_scale": stats.lsq_scale})
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
        if config.patience is not None and epoch - state["best_epoch"] >= config.patience:
            state["stopped"] = True
            log.info("CompAlign: early stop, best val cosine %.6f after %d epochs",
                     state["best_cosine"], state["best_epoch"])
        if ckpt_path is not None:
            _atomic_torch_save({"format": CHECKPOINT_FORMAT, "key": identity_key, "params": params.snapshot(),
                                "optimizer": opt.state_dict(), "state": state}, ckpt_path)
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
    meta = {
        "val_cosine": state["best_cosine"],
        "best_epoch": state["best_epoch"],
        "stopped_early": bool(state["stopped"]),
        "scale_calibration": calibration,
        "history": state["history"],
        "train_loss": state["train_loss"],
    }
    return CompAlign(group_maps=group_maps, map_index=tuple(map_index), config=config, constraint=side,
                     labels=tuple(str(s) for s in labels) if labels is not None else None, meta=meta)
