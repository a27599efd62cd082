"""The parallel layout: degrees from ``parallel.*`` checked against the world size and the model, and
the DeviceMesh they span.

    layout = resolve_layout(cfg, world_size)     # ConfigError (one line) before any process does work
    mesh = build_mesh(layout, device)            # dims ("pp", "dp_replicate", "dp_shard", "tp")

The mesh always has the four named dimensions (a degree of 1 is a dimension of size 1), tensor parallel
innermost: the processes of one TP group are neighbours (on one node, over NVLink), pipeline stages
outermost (the cheapest traffic, point-to-point activations, crosses nodes). ``dp`` is the flattened
``dp_replicate x dp_shard`` dimension: the data-parallel replica index that shards the batches.

Which plan serves which model family (anything else is refused with one line naming the family):
DDP, FSDP2 / HSDP and activation checkpointing: every family (their blocks are the root's ModuleLists);
tensor parallel and pipeline parallel: the decoder families built on ``models/gpt.py`` (gpt, prefix_lm,
glm: Llama-style and GPT-2-style configs); pipeline parallel also needs the plain next-token objective
(family gpt), untied embeddings and no ALiBi.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lmstack.config import RunConfig
from lmstack.errors import ConfigError

TP_FAMILIES = ("gpt", "prefix_lm", "glm")
PP_FAMILIES = ("gpt",)
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class Layout:
    """Resolved degrees; their product is the world size."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    pp_schedule: str = "1f1b"
    pp_microbatches: int = 1
    stages_per_rank: int = 1  # 2 with interleaved_1f1b

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def sharded(self) -> bool:
        """Parameters live in pieces across processes (checkpoints go through DCP)."""
        return self.world_size > 1 and not self.uses_ddp

    @property
    def uses_ddp(self) -> bool:
        """Only data parallelism without sharding: DDP, the plain and fastest choice for small models."""
        return self.dp_replicate > 1 and self.dp_shard == 1 and self.tp == 1 and self.pp == 1

    @property
    def uses_fsdp(self) -> bool:
        return self.dp_shard > 1 or (self.dp_replicate > 1 and not self.uses_ddp)

    def describe(self) -> str:
        parts = [f"{name}={getattr(self, name)}" for name in ("dp_replicate", "dp_shard", "tp", "pp")
                 if getattr(self, name) > 1]
        if self.pp > 1:
            parts.append(f"{self.pp_schedule} x{self.pp_microbatches} micro-batches")
        return ", ".join(parts) or "one process"


def resolve_layout(cfg: RunConfig, world_size: int) -> Layout:
    """The layout ``cfg.parallel`` asks for at ``world_size`` processes; ConfigError when it cannot run.

    Checks, each a one-line ConfigError naming the keys: the degrees multiply to the world size; TP divides
    the heads, the KV heads and the MLP width (and, with sequence parallelism, the block size); PP has at least one layer per stage and its micro-batches
    divide the batch; each plan supports the model family.
    """
    p, model = cfg.parallel, cfg.model
    fixed = p.dp_shard * p.tp * p.pp
    if p.dp_replicate == -1:
        if world_size % fixed:
            raise ConfigError(f"parallel.dp_shard={p.dp_shard} x parallel.tp={p.tp} x parallel.pp={p.pp} = {fixed} "
                              f"does not divide the {world_size} process(es) torchrun started; start a multiple "
                              f"of {fixed} processes or lower the degrees")
        dp_replicate = world_size // fixed
    else:
        dp_replicate = p.dp_replicate
        if dp_replicate * fixed != world_size:
            raise ConfigError(f"parallel.dp_replicate={dp_replicate} x dp_shard={p.dp_shard} x tp={p.tp} x pp={p.pp} "
                              f"= {dp_replicate * fixed} processes, but torchrun started {world_size}; make the "
                              "product equal the world size (or set parallel.dp_replicate=-1)")
    family = getattr(model, "family", "?")
    if p.tp > 1:
        _check_tp(model, family, p.tp, p.sequence_parallel)
    stages_per_rank = 2 if p.pp_schedule == "interleaved_1f1b" and p.pp > 1 else 1
    microbatches = p.pp_microbatches or p.pp
    if p.pp > 1:
        _check_pp(cfg, family, p.pp * stages_per_rank, microbatches)
    return Layout(dp_replicate=dp_replicate, dp_shard=p.dp_shard, tp=p.tp, pp=p.pp, pp_schedule=p.pp_schedule,
                  pp_microbatches=microbatches if p.pp > 1 else 1, stages_per_rank=stages_per_rank)


def _check_tp(model: Any, family: str, tp: int, sequence_parallel: bool) -> None:
    if family not in TP_FAMILIES:
        raise ConfigError(f"parallel.tp={tp}: tensor parallelism has a plan for the families {', '.join(TP_FAMILIES)}, "
                          f"not {family!r}; use parallel.dp_shard (FSDP2) for this model")
    kv_heads = getattr(model, "n_kv_head", 0) or model.n_head
    for key, value in (("model.n_head", model.n_head), ("model.n_kv_head", kv_heads),
                       ("the MLP width (model.hidden_dim)", model.hidden_dim)):
        if value % tp:
            raise ConfigError(f"parallel.tp={tp} does not divide {key}={value}; choose a tp that divides "
                              "the heads, the KV heads and the MLP width")
    if getattr(model, "norm_placement", "pre") == "pre" and sequence_parallel and model.block_size % tp:
        raise ConfigError(f"parallel.tp={tp} with sequence parallelism pads sequences to a multiple of {tp}, which "
                          f"model.block_size={model.block_size} is not; use a block size divisible by {tp} or "
                          "parallel.sequence_parallel=false")
    if model.position == "alibi":
        raise ConfigError(f"parallel.tp={tp}: ALiBi's per-head slopes are not split by the TP plan; "
                          "use model.position=rope or learned")


def _check_pp(cfg: RunConfig, family: str, stages: int, microbatches: int) -> None:
    model, p = cfg.model, cfg.parallel
    if family not in PP_FAMILIES:
        raise ConfigError(f"parallel.pp={p.pp}: pipeline parallelism has a plan for the family gpt (next-token "
                          f"loss), not {family!r}; use parallel.dp_shard (FSDP2) for this model")
    if stages > model.n_layer:
        raise ConfigError(f"parallel.pp={p.pp} ({p.pp_schedule}) needs {stages} pipeline stages but the model has "
                          f"model.n_layer={model.n_layer}; every stage needs a layer: lower parallel.pp or add layers")
    if model.tie_embeddings:
        raise ConfigError(f"parallel.pp={p.pp}: the first stage holds the embedding and the last the output head, "
                          "so they cannot share one matrix; set model.tie_embeddings=false")
    if model.position not in ("rope", "learned", "none"):
        raise ConfigError(f"parallel.pp={p.pp}: model.position={model.position} is not supported by the pipeline "
                          "plan; use rope, learned or none")
    if cfg.train.batch_size % microbatches:
        raise ConfigError(f"parallel.pp_microbatches={microbatches} does not divide train.batch_size="
                          f"{cfg.train.batch_size}; pick a divisor")
    if p.pp_schedule == "interleaved_1f1b" and microbatches % p.pp:
        raise ConfigError(f"parallel.pp_schedule=interleaved_1f1b needs parallel.pp_microbatches ({microbatches}) "
                          f"to be a multiple of parallel.pp={p.pp}")


def data_parallel_rank(layout: Layout, rank: int) -> int:
    """The data-parallel replica of process ``rank``: the mesh is row-major over (pp, dp_replicate, dp_shard,
    tp), so the tp processes next to each other share a replica. Known before the mesh exists (loaders)."""
    return (rank // layout.tp) % layout.dp


def build_mesh(layout: Layout, device: torch.device):
    """The 4-D DeviceMesh ("pp", "dp_replicate", "dp_shard", "tp") over every process, and its flattened
    "dp" dimension (the replica index and the group that sums over replicas)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (layout.pp, layout.dp_replicate, layout.dp_shard, layout.tp),
                            mesh_dim_names=MESH_DIMS)
    return mesh, mesh["dp_replicate", "dp_shard"]._flatten("dp")
