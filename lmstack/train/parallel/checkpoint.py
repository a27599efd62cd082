"""Checkpoints of sharded runs through ``torch.distributed.checkpoint`` (DCP), and consolidated weights.

    pending = save_sharded(plan, optimizer, staging / "dcp", async_save=False)  # every process writes its pieces
    load_sharded(plan, optimizer, checkpoint / "dcp")       # into this run's layout, whatever the saved one was
    load_full(plan, optimizer, weights, optimizer_state)    # a one-process checkpoint into a sharded run
    weights = full_weights(plan)                            # the whole model on rank 0 (None elsewhere)

DCP stores every tensor under its name in the unsplit model (``blocks.3.mlp.up_proj.weight``,
``optim.state.blocks.3.mlp.up_proj.weight.exp_avg``) with the pieces each process holds; loading plans the
reads for the current layout, so a checkpoint saved at ``dp_shard=2`` resumes at ``tp=2``, in one process,
or under a pipeline. When the layout is unchanged, every process reads back exactly what it wrote, and
a resumed run reproduces the uninterrupted one. ``async_save`` copies the state to host memory and
writes it from a background thread while training continues; the loop waits for it before the next save
and at the end (lmstack/train/loop.py), so a checkpoint is published (renamed into place, with its
manifest) only once every process has finished writing.

The final RUN/model is one consolidated model.safetensors: FSDP and TP pieces are gathered
(``full_state_dict``) and, under PP, each stage's weights are sent to rank 0.
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from lmstack.errors import CheckpointError

_ASYNC_GROUP = None  # a gloo process group of its own for background saves (made on first use)


def save_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path,
                 async_save: bool = False) -> Future | None:
    """Write this process's pieces of weights and optimizer state into DCP ``directory`` (every process
    calls this with the same directory). Returns the future of an async save (None when done)."""
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    if async_save:
        global _ASYNC_GROUP
        if _ASYNC_GROUP is None:  # the background writer's collectives must not interleave with training's
            _ASYNC_GROUP = dist.new_group(backend="gloo")
        response = dcp.async_save(state, checkpoint_id=str(directory), process_group=_ASYNC_GROUP)
        return getattr(response, "upload_completion", response)
    dcp.save(state, checkpoint_id=str(directory))
    return None


def load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, directory: Path) -> None:
    """Load a DCP checkpoint into ``model`` (and ``optimizer``) in this run's layout: DCP reshards."""
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)  # initialises empty AdamW moments first
    try:
        dcp.load(state, checkpoint_id=str(directory), no_dist=not dist.is_initialized())
    except Exception as e:  # missing keys, shape mismatches: DCP raises them deep inside its planner
        raise CheckpointError(f"checkpoint {directory.parent}: its weights do not fit this model "
                              f"({_short(e)}); resume with the model config the run was saved with") from None
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])


def load_full(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, weights: dict[str, torch.Tensor],
              optimizer_state: dict[str, Any] | None, param_order: list[str], tied: dict[str, str]) -> None:
    """Load a one-process checkpoint (whole tensors; the optimizer state keyed by parameter index) into a
    sharded ``model``. ``param_order``: the parameter names in the order of the unsplit run's optimizer
    groups (the saved state's indices); ``tied``: {duplicate name: name stored}."""
    weights = {**weights, **{dup: weights[src] for dup, src in tied.items() if src in weights}}
    own = set(get_model_state_dict(model))
    missing = sorted(own - set(weights))
    if missing:
        raise CheckpointError(f"the checkpoint's weights do not fit this model (missing {missing[:3]}); "
                              "resume with the model config the run was saved with")
    full = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, {k: v for k, v in weights.items() if k in own}, options=full)
    if optimizer is None or optimizer_state is None:
        return
    held = {name for name, _ in model.named_parameters()}
    state = {param_order[int(i)]: s for i, s in optimizer_state["state"].items() if param_order[int(i)] in held}
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [param_order[int(i)] for i in g["params"] if param_order[int(i)] in held]}
              for g in optimizer_state["param_groups"]]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups}, options=full)


def full_weights(model: torch.nn.Module, tied: dict[str, str], pp_group=None, gather: bool = True
                 ) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on global rank 0 (CPU, tied duplicates left out); None on other ranks.

    ``pp_group``: under pipeline parallelism, the pipeline group of this process (each stage holds its
    layers); ``gather``: whether this process takes part in the gather to rank 0 (under PP: the processes
    with data- and tensor-parallel index 0, one per stage)."""
    if pp_group is None:
        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return _drop_tied(weights, tied) if dist.get_rank() == 0 else None
    # every process of a stage gathers that stage's full tensors; one per stage sends them to rank 0
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    if not gather:
        return None
    local = {k: v.detach().cpu() for k, v in weights.items()}
    parts: list[Any] | None = [None] * dist.get_world_size(pp_group) if dist.get_rank() == 0 else None
    dist.gather_object(local, parts, group=pp_group, group_dst=0)
    if parts is None:
        return None
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        merged.update(part)
    return _drop_tied(merged, tied)


def _drop_tied(weights: dict[str, torch.Tensor], tied: dict[str, str]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in weights.items() if k not in tied}


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return (text[:240] + "...") if len(text) > 240 else text or type(error).__name__
