"""torch.distributed set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from imagen_ops.device import resolve_device

__all__ = ["DistInfo", "check_same", "cleanup", "setup"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA).

    Without torchrun's variables this is a single process. Multi-node runs use torchrun's
    usual flags (--nnodes, --node-rank, --rdzv-endpoint); nothing here changes.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        log.info("rank %d of %d on %s", rank, world, dev)
    return DistInfo(rank, world, local, dev)


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


SHARED_CHECKPOINTS = (
    "every node must see the same checkpoint folder (train --checkpoints on a shared filesystem)"
)


def check_same(info: DistInfo, value: object, what: str, hint: str = SHARED_CHECKPOINTS) -> None:
    """Raise on every rank unless all ranks hold the same `value`: ranks that disagree on,
    say, the resume step (nodes without a shared checkpoint folder) or the run's
    fingerprint (another commit or data on one node) would deadlock or mix two trainings
    in the gradient all-reduce."""
    if not info.enabled:
        return
    values = [None] * info.world_size
    dist.all_gather_object(values, value)
    if len(set(values)) > 1:
        raise RuntimeError(f"ranks disagree on {what}: {values} (rank order); {hint}")
