"""Rank and world size of a run, from PyTorch's own launcher (``torchrun``).

``torchrun --nproc-per-node N -m vitdecomp decompose MODEL DATA --out STORE`` starts N
processes with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set
(also across nodes with ``--nnodes``/``--rdzv-endpoint``). A dataset run splits its chunks by
rank (chunk ``i`` belongs to rank ``i % world_size``), so ranks never write the same file; the
process group (gloo on CPU, NCCL on GPUs) is only used for a barrier before rank 0 writes the
manifest and the merged statistics.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

__all__ = ["DistInfo", "dist_info", "init_process_group", "barrier", "shutdown", "rank_device"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """From an initialised process group, else the launcher's environment, else a single process."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    except ImportError:  # pragma: no cover - torch always has torch.distributed on supported platforms
        pass
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if not 0 <= rank < world:
        from ..errors import InputError

        raise InputError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return DistInfo(rank, world, local)


def rank_device(device: str, info: DistInfo) -> str:
    """``"cuda"`` -> ``"cuda:LOCAL_RANK"`` in a multi-process run; anything else unchanged."""
    if info.distributed and device == "cuda":
        return f"cuda:{info.local_rank}"
    return device


def init_process_group(device: str, timeout_s: float = 3600.0) -> bool:
    """Join the launcher's process group (NCCL for CUDA, else gloo); False when not launched."""
    import torch.distributed as dist

    info = dist_info()
    if not info.distributed or not dist.is_available() or dist.is_initialized():
        return False
    if "MASTER_ADDR" not in os.environ:
        log.warning("WORLD_SIZE=%d but no MASTER_ADDR: running without a process group", info.world_size)
        return False
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    log.info("rank %d/%d joined the %s process group", info.rank, info.world_size, backend)
    return True


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
