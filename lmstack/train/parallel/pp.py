"""Pipeline parallelism (``torch.distributed.pipelining``) for the decoders of ``models/gpt.py``.

    stages, holder = split_gpt(model, layout, pp_rank)            # this process's stage modules
    runner = PipelineRunner(stages, stage_ids, layout, pp_group, device)
    loss, metrics = runner.forward_backward(batch, scale=1 / grad_accum)   # inside the loop's train_step

The layers are cut into ``pp`` contiguous stages (``2 x pp`` with interleaved 1F1B, two per process, looped:
process r holds stages r and r + pp), as even as the layer count allows. The first stage also embeds the
tokens, the last applies the final norm and the head; the schedule feeds the batch to the first stage in
``pp_microbatches`` micro-batches and the labels to the last, which computes the next-token loss
(``models.layers.lm_loss``) per micro-batch; gradients are the mean over micro-batches (``scale_grads``), so
a step equals the unsplit batch's step. Schedules: GPipe (all forwards, then all backwards), 1F1B
(one forward, one backward in steady state: fewer activations alive) and interleaved 1F1B (smaller
bubbles at the price of more point-to-point messages).

A stage module (:class:`GPTStage`) holds the model's own submodules under their original names
(``blocks.5.attn.q_proj.weight``), so optimizer state and checkpoints use the same keys as the unsplit
model; :func:`split_gpt` also returns one holder module per process over all of its stages, whose
``state_dict`` / ``named_parameters`` are that process's part of the model. The stage forward mirrors the
plain path of ``GPT.forward`` (default positions, causal or windowed attention): packed batches,
prefix-LM masks, prompt tuning and ALiBi are not pipelined (refused in mesh.py before any work).
Validation runs the schedule's forward-only ``eval``; the loss is broadcast from the last stage.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from lmstack.models.layers import attention_bias, lm_loss
from lmstack.train.losses import Objective, real_tokens
from lmstack.train.parallel.mesh import Layout


class GPTStage(nn.Module):
    """A run of a GPT model's blocks; the first stage embeds, the last normalises and projects to logits."""

    def __init__(self, model: nn.Module, layer_ids: list[int], first: bool, last: bool):
        super().__init__()
        self.config = model.config
        self.tok_emb = model.tok_emb if first else None
        self.pos_emb = getattr(model, "pos_emb", None) if first else None
        self.drop = model.drop if first else None
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layer_ids})  # names as in the model
        self.norm_f = model.norm_f if last else None
        self.lm_head = model.lm_head if last else None
        self.windows = [model.layer_windows[i] for i in layer_ids]
        self.sequence_shards = 1  # tensor parallel with sequence parallelism: hidden states hold T / tp positions
        if self.config.position == "rope":
            self.register_buffer("rope_cos", model.rope_cos, persistent=False)  # (block_size, head_dim)
            self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """First stage: token ids (B, T); later stages: hidden states (B, T, C). Returns hidden states,
        or logits (B, T, V) on the last stage."""
        # the full sequence length (under sequence parallelism a hidden state holds T / tp positions)
        B, T = x.shape[0], x.shape[1] * (1 if self.tok_emb is not None else self.sequence_shards)
        positions = torch.arange(T, device=x.device).expand(B, T)  # (B, T)
        if self.tok_emb is not None:
            x = self.tok_emb(x)  # (B, T, C)
            if self.pos_emb is not None:
                x = x + self.pos_emb(positions)
            x = self.drop(x)
        rope = None
        if self.config.position == "rope":
            rope = (self.rope_cos[positions][:, None], self.rope_sin[positions][:, None])  # (B, 1, T, D) each
        masks = {w: attention_bias(positions, positions, window=w) if w > 0 else None for w in set(self.windows)}
        for block, window in zip(self.blocks.values(), self.windows):
            x = block(x, rope, masks[window])
        if self.lm_head is not None:
            x = self.lm_head(self.norm_f(x))  # (B, T, V)
        return x


def stage_layers(n_layer: int, stages: int) -> list[list[int]]:
    """Contiguous layer ranges, as even as possible (the first stages take one more when it does not divide)."""
    sizes = [n_layer // stages + (1 if s < n_layer % stages else 0) for s in range(stages)]
    starts = [sum(sizes[:s]) for s in range(stages)]
    return [list(range(start, start + size)) for start, size in zip(starts, sizes)]


class _StageHolder(nn.Module):
    """This process's stages under the model's names, for the optimizer and checkpoints (never called)."""

    def __init__(self, stages: list[GPTStage]):
        super().__init__()
        self.config = stages[0].config
        for name in ("tok_emb", "pos_emb", "norm_f", "lm_head"):
            module = next((getattr(s, name) for s in stages if getattr(s, name) is not None), None)
            setattr(self, name, module)
        self.blocks = nn.ModuleDict({key: block for s in stages for key, block in s.blocks.items()})


def split_gpt(model: nn.Module, layout: Layout, pp_rank: int) -> tuple[list[GPTStage], list[int], nn.Module]:
    """This process's stage modules, their stage indices, and the holder over them."""
    n_stages = layout.pp * layout.stages_per_rank
    ranges = stage_layers(model.config.n_layer, n_stages)
    stage_ids = [pp_rank + k * layout.pp for k in range(layout.stages_per_rank)]  # looped: r, r + pp
    stages = [GPTStage(model, ranges[s], first=s == 0, last=s == n_stages - 1) for s in stage_ids]
    return stages, stage_ids, _StageHolder(stages)


class PipelineRunner:
    """The schedule over this process's stages; one call runs a whole batch's micro-batches."""

    def __init__(self, stages: list[nn.Module], stage_ids: list[int], layout: Layout, pp_group, device: torch.device):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

        n_stages = layout.pp * layout.stages_per_rank
        self.pp_group, self.pp = pp_group, layout.pp
        self.first, self.last = 0 in stage_ids, n_stages - 1 in stage_ids
        self.scale = 1.0  # the loss of each micro-batch is scaled by this (1 / grad_accum)
        pipeline_stages = [PipelineStage(module, s, n_stages, device, group=pp_group)
                           for module, s in zip(stages, stage_ids)]
        if layout.pp_schedule == "interleaved_1f1b":
            self.schedule = ScheduleInterleaved1F1B(pipeline_stages, layout.pp_microbatches, loss_fn=self._loss)
        else:
            cls = ScheduleGPipe if layout.pp_schedule == "gpipe" else Schedule1F1B
            self.schedule = cls(pipeline_stages[0], layout.pp_microbatches, loss_fn=self._loss)
        self.eval_objective = Objective(self._eval, judge_spikes=False)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lm_loss(logits, targets) * self.scale

    def _run(self, batch: dict[str, torch.Tensor], train: bool) -> torch.Tensor:
        losses: list[torch.Tensor] = []
        args = (batch["input_ids"],) if self.first else ()
        kwargs = {"target": batch["labels"], "losses": losses} if self.last else {}
        (self.schedule.step if train else self.schedule.eval)(*args, **kwargs)
        device = batch["labels"].device
        loss = torch.stack([l.detach().float() for l in losses]).mean().reshape(1) / self.scale if self.last \
            else torch.zeros(1, device=device)
        dist.broadcast(loss, group=self.pp_group, group_src=self.pp - 1)  # the last stage's loss, everywhere
        return loss[0]

    def forward_backward(self, batch: dict[str, torch.Tensor], scale: float) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward and backward of ``batch`` through the pipeline; gradients of ``scale`` x the mean loss."""
        self.scale = scale
        loss = self._run(batch, train=True)
        self.scale = 1.0
        return loss, {"tokens": real_tokens(batch)}

    def _eval(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return self._run(batch, train=False), {"tokens": real_tokens(batch)}
