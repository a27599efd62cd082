"""A scalar head on any decoder: per-token values for a reward model (``lmstack reward``) or a PPO value model.

    backbone = load_checkpoint("runs/tiny-sft/model").model
    rm = ScalarHeadModel(backbone)                       # the head starts at zero: every value is 0
    values = rm(input_ids, attention_mask)               # (B, T) float32, one scalar per token
    rewards = score_at_last(values, attention_mask)      # (B,) the value at each row's last real token

The head is one ``nn.Linear(n_embd, 1)`` (named ``score``, as in Hugging Face's sequence-classification
models) on the backbone's final hidden states, i.e. the input of its ``lm_head``; gpt and moe give them with
``forward(..., return_hidden=True)`` (docs/CONTRACTS.md), so every decoder family works without a change.
The head's weight and bias start at zero, so a fresh reward model scores everything 0 and the first
Bradley–Terry loss is exactly ln 2.

Padding: ``attention_mask`` (B, T) is 1 on real tokens. With any 0 in it, positions are counted over the
real tokens only (padding gets position -1) and the attention mask keeps padding out of every real
token's view, so left- and right-padded rows give the values of the unpadded sequence (a test holds this).
Without padding the backbone runs its fast causal path. :func:`score_at_last` reads the last real token
from the mask, never from a token id, so it is right when the pad id equals the end-of-text id.
Caveat: in a mixture-of-experts backbone padded tokens still take expert capacity, so with a capacity
factor that drops tokens a padded row can differ slightly from the unpadded one.

Checkpoints: a model with a head is saved as any other (``backbone.*`` and ``score.*`` tensors) with
``"head": "scalar"`` at the top of config.json (:data:`HEAD_CONFIG_KEY`); ``lmstack.checkpoint.load_checkpoint``
reads that field and rebuilds the head through :func:`attach_head`. :func:`require_head` turns a checkpoint
without a head (or with a head of another kind) into one CheckpointError line.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from lmstack.errors import CheckpointError

HEAD_CONFIG_KEY = "head"  # config.json field naming the head a checkpoint carries
HEADS = ("scalar",)


class ScalarHeadModel(nn.Module):
    """``backbone`` (a decoder: gpt, moe, or one wrapped by lmstack.models.peft) plus a linear scalar head."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config  # family, block_size, n_embd: what callers read from a model
        self.score = nn.Linear(backbone.config.n_embd, 1, bias=True)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T), attention_mask (B, T) 1 = real -> the backbone's final hidden states (B, T, C)."""
        kwargs: dict[str, Any] = {}
        real = attention_mask.bool() if attention_mask is not None else None
        if real is not None and bool((real[:, 1:] & ~real[:, :-1]).any()):  # a real token after padding
            # right padding alone needs nothing: a causal model's real tokens never see what comes after them
            kwargs["positions"] = (real.long().cumsum(dim=1) - 1).masked_fill(~real, -1)  # (B, T), -1 on padding
            # one document per row: this makes the model build an explicit mask from the positions, which
            # keeps padding out of view (the fast causal path would let a left-padded row attend to it)
            kwargs["document_ids"] = torch.zeros_like(input_ids)
        hidden, _ = self.backbone(input_ids, return_hidden=True, **kwargs)
        return hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T), attention_mask (B, T) -> values (B, T), float32 (also under autocast)."""
        hidden = self.hidden_states(input_ids, attention_mask)  # (B, T, C)
        return self.score(hidden.to(self.score.weight.dtype)).squeeze(-1).float()  # (B, T)

    def num_params(self, non_embedding: bool = False) -> int:
        count = getattr(self.backbone, "num_params", None)
        base = count(non_embedding) if count else sum(p.numel() for p in self.backbone.parameters())
        return base + sum(p.numel() for p in self.score.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """The backbone's training FLOPs minus its LM head (not run), plus the scalar head."""
        cfg = self.config
        return self.backbone.flops_per_token(seq_len) - 6 * cfg.vocab_size * cfg.n_embd + 6 * cfg.n_embd


def score_at_last(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """values (B, T), attention_mask (B, T) 1 = real -> (B,): each row's value at its last real token.

    Works for left and right padding alike; a row without a real token is an error (it has no score)."""
    real = attention_mask.bool()
    if not bool(real.any(dim=1).all()):
        raise ValueError("a row of attention_mask has no real token; every scored sequence needs one")
    index = torch.arange(values.shape[1], device=values.device).expand_as(real)  # (B, T)
    last = torch.where(real, index, -1).max(dim=1).values  # (B,)
    return values.gather(1, last[:, None]).squeeze(1)


def attach_head(kind: str, backbone: nn.Module, tensors: dict[str, torch.Tensor] | None = None,
                path: Any = "") -> nn.Module:
    """The model with the head named ``kind`` (a config.json ``head`` value) on ``backbone``.

    ``tensors`` (the checkpoint's weights, when given) must hold the head: a checkpoint whose config names a
    head its weights lack is one CheckpointError line."""
    if kind not in HEADS:
        raise CheckpointError(f"{path}: config.json names the head {kind!r}, which this version does not know; "
                              f"known heads: {', '.join(HEADS)}")
    if tensors is not None and not {"score.weight", "score.bias"} <= tensors.keys():
        raise CheckpointError(f"{path}: config.json names a {kind} head but the weights have none (no score.weight "
                              "/ score.bias); the checkpoint is not a reward or value model: re-create it with "
                              "`lmstack reward`, or remove \"head\" from config.json to load the language model")
    return ScalarHeadModel(backbone)


def require_head(model: nn.Module, path: Any, purpose: str = "a reward model") -> ScalarHeadModel:
    """``model`` when it carries a scalar head; otherwise one CheckpointError line saying how to make one."""
    if not isinstance(model, ScalarHeadModel):
        raise CheckpointError(f"{path} has no scalar head (config.json has no \"head\": \"scalar\"), so it is not "
                              f"{purpose}; train one with `lmstack reward --model CKPT --data pairs.jsonl --out RM` "
                              "and pass RM")
    return model
