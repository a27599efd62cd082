"""Tensor parallelism (Megatron-style) for the decoders of ``models/gpt.py``, with sequence parallelism.

    apply_tp(model, tp_mesh, sequence_parallel=True)

The plan, per block: q/k/v and the MLP's gate/up projections split column-wise (each process holds
n_head / tp heads and hidden / tp MLP columns), the attention output and MLP down projections row-wise
(their partial sums are reduced once per sub-layer). The token (and learned-position) embeddings split
their rows (the vocabulary), the output head its columns, gathered to full logits for the loss.

With ``sequence_parallel`` the residual stream between those regions is split along the sequence: the
norms run on T / tp positions each, the row-wise outputs are reduce-scattered instead of all-reduced and
the column-wise inputs all-gathered, the same traffic as plain TP with less activation memory. That needs
pre-norm blocks (a post-norm block feeds the residual to both branches at once); post-norm models run
plain TP. Splitting the sequence needs T to be a multiple of tp, which padded fine-tuning batches (padded to
their longest row) are not: the whole model's forward pads its inputs at the end to the next multiple
(tokens with the pad id, targets with -1 so the mean loss is unchanged, positions counting on, packed
document ids with a fresh id) and cuts the logits back to T. Under causal attention no real token sees a
padded one, so the result is the unpadded forward's; ``model.block_size`` must be a multiple of tp so the
padded positions stay inside the position tables (checked with the layout).

The attention module computes with its *local* head counts: the plan sets ``n_head`` and ``n_kv_head``
of every attention module to the per-process numbers (the module reshapes with them), so the model file
needs no TP awareness. Tied embeddings stay tied: both sides are split along the vocabulary (Shard(0)), and
the head is re-pointed to the embedding's sharded matrix after the plan is applied.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


def apply_tp(model: nn.Module, tp_mesh, sequence_parallel: bool = True) -> bool:
    """Apply the plan to a GPT-family model in place; returns whether sequence parallelism is on."""
    cfg = model.config
    sp = sequence_parallel and cfg.norm_placement == "pre"
    tp = tp_mesh.size()
    residual = Shard(1) if sp else Replicate()  # the residual stream's layout between the TP regions
    top_plan = {"tok_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=residual),
                "pos_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=residual),
                "lm_head": ColwiseParallel(input_layouts=residual, output_layouts=Replicate(), use_local_output=True)}
    if sp:
        top_plan["norm_f"] = SequenceParallel()
    # a pipeline stage holds only some of these modules
    top_plan = {name: style for name, style in top_plan.items() if getattr(model, name, None) is not None}
    parallelize_module(model, tp_mesh, top_plan)
    for block in model.blocks.values() if isinstance(model.blocks, nn.ModuleDict) else model.blocks:
        plan = {"attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(), "attn.v_proj": ColwiseParallel(),
                "attn.o_proj": RowwiseParallel(output_layouts=residual),
                "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel(output_layouts=residual)}
        if block.mlp.glu:
            plan["mlp.gate_proj"] = ColwiseParallel()
        if sp:
            plan.update({"norm1": SequenceParallel(), "norm2": SequenceParallel(),
                         # attn(x, rope, mask, kv_cache): gather the sequence of x, leave the rest alone
                         "attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                                    desired_input_layouts=(Replicate(), None, None, None),
                                                    use_local_output=True),
                         "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                                   use_local_output=True)})
        parallelize_module(block, tp_mesh, plan)
        block.attn.n_head //= tp  # the module reshapes q/k/v with these: the local head counts
        block.attn.n_kv_head //= tp
    if cfg.tie_embeddings and getattr(model, "lm_head", None) is not None and getattr(model, "tok_emb", None) is not None:
        model.lm_head.weight = model.tok_emb.weight  # both Shard(0) over the vocabulary
    if sp and getattr(model, "tok_emb", None) is not None and getattr(model, "lm_head", None) is not None:
        _pad_sequence_to_multiple(model, tp)  # a pipeline stage gets fixed-length micro-batches instead
    return sp


def _pad_sequence_to_multiple(model: nn.Module, multiple: int) -> None:
    """Forward hooks: pad (B, T) inputs at the end to a multiple of ``multiple``, cut (B, T_pad, ...) outputs
    back to T (module docstring). A call with a KV cache (generation) is left alone."""
    lengths: list[int] = []  # T of the calls in flight (a stack: activation checkpointing may re-enter)

    def pad(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        idx = args[0]
        T = idx.shape[1]
        extra = -T % multiple
        lengths.append(T if extra and kwargs.get("kv_cache") is None else 0)
        if not lengths[-1]:
            return args, kwargs
        idx = F.pad(idx, (0, extra), value=0)  # (B, T_pad)
        targets = args[1] if len(args) > 1 else kwargs.pop("targets", None)
        if targets is not None:
            targets = F.pad(targets, (0, extra), value=-1)  # padded positions do not count
        positions = kwargs.get("positions")
        if positions is not None:  # counting on from each row's last position
            steps = torch.arange(1, extra + 1, device=positions.device)
            kwargs["positions"] = torch.cat([positions, positions[:, -1:] + steps], dim=1)  # (B, T_pad)
        documents = kwargs.get("document_ids")
        if documents is not None:  # a document of their own: no packed sequence attends to them
            kwargs["document_ids"] = F.pad(documents, (0, extra), value=int(documents.max()) + 1)
        return (idx, targets, *args[2:]), kwargs

    def cut(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        T = lengths.pop()
        if not T or not isinstance(output, tuple) or not isinstance(output[0], torch.Tensor):
            return output
        return (output[0][:, :T], *output[1:])  # logits or hidden states (B, T, ...)

    model.register_forward_pre_hook(pad, with_kwargs=True)
    model.register_forward_hook(cut, with_kwargs=True)
