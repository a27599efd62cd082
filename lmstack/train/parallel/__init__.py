"""Training parallelism composed over one DeviceMesh, kept apart from the model files (torchtitan's way).

    layout = resolve_layout(cfg, world_size)            # mesh.py: checked before any process does work
    plan = parallelize(model, layout, dist, cfg)         # PP split -> TP -> activation ckpt -> compile -> FSDP2 / DDP
    optimizer = build_optimizer(plan.state_model, ...)   # over this process's (possibly sharded) parameters
    ... loss, metrics = objective(plan.model, batch)     # or plan.pipeline.forward_backward(batch, scale)
    grad_norm = plan.clip_grad_norm(max_norm)

The order matters and follows torchtitan: the pipeline split first (each process keeps its stages'
modules), tensor parallelism on those modules (parameters become DTensors on the "tp" dimension),
activation checkpointing and per-block torch.compile, and FSDP2 last (sharding the TP-sharded
parameters again over the "dp_shard" dimension, a 2-D DTensor). Only data parallelism without sharding
is DDP, the default under torchrun. The pieces: mesh.py (layout, checks, DeviceMesh), pp.py, tp.py,
ac.py, fsdp.py, checkpoint.py (DCP save / load / resharding and the consolidated final weights).

The model files know none of this: the TP plan adjusts the attention modules' head counts, the pipeline
stages re-use the model's own submodules under their original names, and activation checkpointing swaps
block forwards on the instance. Which families each plan serves: mesh.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from lmstack.config import RunConfig
from lmstack.train.dist import DistInfo
from lmstack.train.optim import fused_applies
from lmstack.train.parallel.ac import apply_activation_checkpointing
from lmstack.train.parallel.mesh import Layout, build_mesh, data_parallel_rank, resolve_layout
from lmstack.train.parallel.pp import PipelineRunner

__all__ = ["Layout", "Parallelized", "data_parallel_rank", "holds_shards", "parallelize", "rebind_optimizer", "resolve_layout"]


@dataclass
class Parallelized:
    """A model laid out over the mesh, and what the loop needs to train and checkpoint it."""

    model: nn.Module  # what the objective is called with (DDP/FSDP/TP-wrapped); the stage holder under PP
    state_model: nn.Module  # this process's parameters under the model's own names (optimizer, checkpoints)
    layout: Layout
    mesh: Any = None  # the DeviceMesh (None in one process)
    dp_mesh: Any = None  # its flattened data-parallel dimension
    pipeline: PipelineRunner | None = None
    tied: dict[str, str] = field(default_factory=dict)  # {duplicate name: name stored} of tied parameters
    pp_group: Any = None  # the pipeline's process group (None without PP)
    params: int = 0  # parameters of the whole model (counted before any split)
    flops_per_token: Callable[[int], float] | None = None  # the whole model's training FLOPs per token
    param_order: list[str] = field(default_factory=list)  # the unsplit optimizer's parameters (set by the loop)

    @property
    def sharded(self) -> bool:
        """Checkpoints go through DCP (each process writes its own pieces)."""
        return self.layout.sharded

    def gradient_sync(self, enabled: bool):
        """A context in which backward does (or, for all but the last micro-batch, does not) reduce gradients."""
        import contextlib

        if enabled or self.layout.world_size == 1:
            return contextlib.nullcontext()
        if self.layout.uses_ddp:
            return self.model.no_sync()
        return _fsdp_sync_off(self.model)

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip the gradients of all processes' parameters together to ``max_norm``; returns the total norm."""
        params = [p for p in self.state_model.parameters() if p.grad is not None]
        if not self.sharded:  # one process or DDP: every gradient is whole and the same everywhere
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        total = global_grad_norm(params, self.pp_group)
        for group in _by_mesh(params).values():  # one foreach call cannot mix plain tensors and DTensors
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
        return float(total)

    def full_weights(self) -> dict[str, torch.Tensor] | None:
        """The consolidated weights of a sharded model on rank 0 (None elsewhere); every process calls it."""
        from lmstack.train.parallel.checkpoint import full_weights

        gather = self.pp_group is None or (self.dp_mesh.get_local_rank() == 0
                                           and self.mesh["tp"].get_local_rank() == 0)
        return full_weights(self.state_model, self.tied, self.pp_group, gather)


def _fsdp_sync_off(model: nn.Module):
    import contextlib

    from torch.distributed.fsdp import FSDPModule

    @contextlib.contextmanager
    def off():
        roots = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for m in roots:
            m.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for m in roots:
                m.set_requires_gradient_sync(True, recurse=False)

    return off()


def _by_mesh(params: list[torch.Tensor]) -> dict[Any, list[torch.Tensor]]:
    """Parameters grouped by their gradient's DeviceMesh (None: plain tensors), in parameter order."""
    groups: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    return groups


def global_grad_norm(params: list[torch.Tensor], pp_group=None) -> torch.Tensor:
    """The 2-norm of all gradients over every process: DTensor gradients are grouped by mesh (each group's
    norm is reduced by DTensor over its mesh), plain ones are replicated (DDP, or a TP-replicated norm),
    and under PP the stages' squared norms are summed over the pipeline group."""
    groups = {mesh: [p.grad for p in group] for mesh, group in _by_mesh(params).items()}
    device = params[0].grad.device if params else torch.device("cpu")
    squared = torch.zeros((), dtype=torch.float32, device=device if device.type != "meta" else "cpu")
    for grads in groups.values():  # parameter order: the same on every process of a group
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squared = squared + norm.float().to(squared.device) ** 2
    if pp_group is not None:
        dist.all_reduce(squared, group=pp_group)
    return squared.sqrt()


def holds_shards(model: nn.Module) -> bool:
    """Whether a plan laid ``model`` out in pieces (FSDP2 or TP: DTensor parameters). Such a model runs only
    inside a forward every process joins; after training, use the consolidated weights in RUN/model."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """{name: first name} for every name under which an already-listed parameter appears again (a tied head)."""
    first = {id(p): name for name, p in model.named_parameters()}
    return {name: first[id(p)] for name, p in model.named_parameters(remove_duplicate=False) if first[id(p)] != name}


def parallelize(model: nn.Module, layout: Layout, info: DistInfo, cfg: RunConfig) -> Parallelized:
    """Lay ``model`` out over the processes (in place where a plan rewrites modules); sets ``info``'s
    data-parallel rank, size and group. In one process: activation checkpointing and compile only."""
    from lmstack.devices import resolve_dtype

    device, tcfg = info.device, cfg.train
    flops = getattr(model, "flops_per_token", None)
    params = model.num_params() if hasattr(model, "num_params") else sum(p.numel() for p in model.parameters())
    common = dict(layout=layout, tied=tied_parameters(model), params=params, flops_per_token=flops)
    if layout.world_size == 1:
        model.to(device)
        apply_activation_checkpointing(model_blocks(model), tcfg.activation_checkpointing)
        return Parallelized(model=torch.compile(model) if tcfg.compile else model, state_model=model, **common)
    mesh, dp_mesh = build_mesh(layout, device)
    info.dp_rank, info.dp_size, info.dp_group = dp_mesh.get_local_rank(), dp_mesh.size(), dp_mesh.get_group()
    assert info.dp_rank == data_parallel_rank(layout, info.rank)  # what the stage's loaders were built with
    if layout.uses_ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model.to(device)
        apply_activation_checkpointing(model_blocks(model), tcfg.activation_checkpointing)
        compiled = torch.compile(model) if tcfg.compile else model
        wrapped = DDP(compiled, device_ids=[device.index] if device.type == "cuda" else None)
        return Parallelized(model=wrapped, state_model=model, mesh=mesh, dp_mesh=dp_mesh, **common)
    pipeline, pp_group = None, None
    if layout.pp > 1:
        from lmstack.train.parallel.pp import split_gpt

        stages, stage_ids, holder = split_gpt(model, layout, mesh["pp"].get_local_rank())
        pp_group = mesh["pp"].get_group()
    else:
        stages, stage_ids, holder = [model], [], model
    holder.to(device)
    if layout.tp > 1:
        from lmstack.train.parallel.tp import apply_tp

        for stage in stages:
            if apply_tp(stage, mesh["tp"], cfg.parallel.sequence_parallel) and hasattr(stage, "sequence_shards"):
                stage.sequence_shards = layout.tp
    for stage in stages:
        blocks = model_blocks(stage)
        apply_activation_checkpointing(blocks, tcfg.activation_checkpointing)
        if tcfg.compile:
            for block in blocks:
                block.compile()
    if layout.uses_fsdp:
        from lmstack.train.parallel.fsdp import apply_fsdp

        fsdp_mesh = mesh["dp_replicate", "dp_shard"] if layout.dp_replicate > 1 else mesh["dp_shard"]
        for stage in stages:
            apply_fsdp(stage, model_blocks(stage), fsdp_mesh, device, resolve_dtype(tcfg.dtype, device),
                       cfg.parallel.cpu_offload, reshard_after_forward=layout.pp == 1)
    if layout.pp > 1:
        pipeline = PipelineRunner(stages, stage_ids, layout, pp_group, device)
    return Parallelized(model=holder, state_model=holder, mesh=mesh, dp_mesh=dp_mesh, pipeline=pipeline, pp_group=pp_group, **common)


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model: the members of the root's ModuleLists / ModuleDicts (``blocks``, an
    encoder's and a decoder's layers)."""
    blocks: list[nn.Module] = []
    for child in model.children():
        if isinstance(child, nn.ModuleList):
            blocks.extend(child)
        elif isinstance(child, nn.ModuleDict):
            blocks.extend(child.values())
    return blocks


def rebind_optimizer(optimizer: torch.optim.Optimizer, names: dict[int, str], model: nn.Module) -> torch.optim.Optimizer:
    """The same optimizer (class, groups, hyperparameters) over ``model``'s parameters after a plan replaced
    them (TP and FSDP make new DTensor parameters; PP keeps a part): ``names`` maps the old parameters'
    ids to their names. Parameters this process no longer holds are dropped from their group."""
    current = dict(model.named_parameters())
    groups = []
    for group in optimizer.param_groups:
        params = [current[names[id(p)]] for p in group["params"] if names.get(id(p)) in current]
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
        if group.get("fused") and params and not fused_applies(params, params[0].device.type):
            groups[-1]["fused"] = None  # the CPU fused kernel takes no DTensor: the per-tensor path instead
    return type(optimizer)(groups)  # every group carries all of its hyperparameters

