"""Activation checkpointing (``train.activation_checkpointing``): trade recomputation for activation memory.

    apply_activation_checkpointing(blocks, "full")      # every block recomputes its forward in backward
    apply_activation_checkpointing(blocks, "selective") # keep matmul / attention outputs, recompute the rest

``full`` keeps only each block's input and recomputes the whole block during backward (the most memory
saved, about one extra forward of compute). ``selective`` is op-level selective checkpointing
(torch.utils.checkpoint's policy contexts): the outputs of matrix multiplies and attention, the expensive
ops, are saved, and the cheap element-wise ops between them (norms, activations, residual adds, RoPE) are
recomputed, which saves their activations for a few percent of compute.

The block's ``forward`` is replaced on the instance, not wrapped in another module, so parameter names
(and so checkpoints) are the same with and without it; FSDP2's hooks, which sit on the module's call,
stay outside the checkpointed region, and its pre-backward all-gather serves the recomputation too.
Recomputation replays dropout with the saved RNG state, so results do not change (the parity tests pin
that in fp32).
"""

from __future__ import annotations

import functools
from typing import Iterable

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_aten = torch.ops.aten
# ops whose outputs the selective policy saves: the matmuls and the attention kernels
_SAVED_OPS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.linear.default,
              _aten._scaled_dot_product_flash_attention.default,
              _aten._scaled_dot_product_efficient_attention.default,
              _aten._scaled_dot_product_cudnn_attention.default,
              _aten._scaled_dot_product_flash_attention_for_cpu.default}


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(blocks: Iterable[nn.Module], mode: str) -> int:
    """Checkpoint every module of ``blocks`` in ``mode`` (none | selective | full); returns how many."""
    if mode == "none":
        return 0
    context_fn = functools.partial(create_selective_checkpoint_contexts, _selective_policy) \
        if mode == "selective" else None
    count = 0
    for block in blocks:
        block.forward = _checkpointed(block.forward, context_fn)
        count += 1
    return count


def _checkpointed(forward, context_fn):
    extra = {"context_fn": context_fn} if context_fn is not None else {}

    @functools.wraps(forward)
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)

    return run
