"""Process-group setup for data-parallel training under `torchrun`.

`torchrun --nproc_per_node N -m lmstack.cli pretrain ...` sets RANK / LOCAL_RANK / WORLD_SIZE; this
module turns them into a process group (NCCL on CUDA, gloo on CPU) and a device. Without those
variables everything runs in one process. The parallel layout (DDP, FSDP2, tensor and pipeline
parallelism: lmstack/train/parallel/) records in :class:`DistInfo` which *data-parallel* replica this
process belongs to: ``dp_rank`` of ``dp_size``. Loaders shard batches by those, so the processes of one
tensor- or pipeline-parallel group see the same batch; token counts and losses are summed over
``dp_group`` (each batch once), not over every process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lmstack.devices import resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    # the data-parallel replica this process belongs to (set by lmstack.train.parallel; by default every
    # process is its own replica) and the process group that sums over replicas (None: all processes)
    dp_rank: int | None = None
    dp_size: int | None = None
    dp_group: Any = None

    def __post_init__(self) -> None:
        if self.dp_rank is None:
            self.dp_rank, self.dp_size = self.rank, self.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """The process group (when torchrun started several processes) and this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def all_reduce_mean(value: float, info: DistInfo) -> float:
    """The mean of ``value`` over all ranks (the value itself in one process)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def dp_sum(value: float, info: DistInfo) -> float:
    """The sum of ``value`` over the data-parallel replicas (each batch counted once under TP and PP)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t, group=info.dp_group)
    return float(t.item())


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is true on any rank: ranks must agree before skipping a step,
    or DDP's next all-reduce would deadlock."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return bool(t.item() > 0)


def from_rank0(value: int, info: DistInfo) -> int:
    """Rank 0's ``value`` on every rank: for decisions each rank could make a little differently (a plan
    from wall-clock timings), which must still be the same everywhere."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=info.device if info.device.type == "cuda" else "cpu")
    dist.broadcast(t, src=0)
    return int(t.item())


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
