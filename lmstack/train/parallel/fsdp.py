"""FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients and optimizer state sharded over
the ``dp_shard`` processes, and replicated over ``dp_replicate`` groups (HSDP) when both are > 1.

    apply_fsdp(model, blocks, dp_mesh, device, param_dtype=torch.bfloat16, cpu_offload=False)

Each block is its own FSDP unit (all-gathered just before its forward, freed after it, reduce-scattered
after its backward), then the root takes what is left (embeddings, final norm, head). On CUDA with a bf16
or fp16 run the mixed-precision policy computes in that dtype and reduces gradients in fp32; the sharded
parameters and the optimizer stay fp32. ``cpu_offload`` keeps the shards and the optimizer step in host
memory; pinned memory only with a GPU (pinning needs one: without it ``pin_memory=True`` fails).
Pipeline stages are separate roots, kept gathered between micro-batches (``reshard_after_forward=False``)
so that a pipeline step does not all-gather once per micro-batch.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard


def apply_fsdp(root: nn.Module, blocks: Iterable[nn.Module], dp_mesh, device: torch.device,
               param_dtype: torch.dtype = torch.float32, cpu_offload: bool = False,
               reshard_after_forward: bool = True) -> None:
    """Shard ``blocks`` one unit each, then ``root`` (in place: the modules become FSDPModules)."""
    if device.type == "cuda" and param_dtype != torch.float32:
        mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    else:
        mp_policy = MixedPrecisionPolicy()
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
    options = dict(mesh=dp_mesh, mp_policy=mp_policy, offload_policy=offload)
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **options)
    fully_shard(root, reshard_after_forward=reshard_after_forward, **options)
