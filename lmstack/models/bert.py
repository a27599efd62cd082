"""Encoder-only transformer (BERT family), one file top to bottom.

Layout (Devlin et al., 2019), the same as Hugging Face's ``BertModel`` so imported weights
(all-MiniLM-L6-v2, bert-base, ...) map one to one:

    embeddings   token + learned absolute position + token type, then LayerNorm
    blocks       post-norm: x = LN(x + Attention(x)); x = LN(x + MLP(x)); bidirectional attention
    MLM head     dense -> GELU -> LayerNorm -> decoder tied to the token embedding (+ its own bias)

``forward(idx, targets=None, *, attention_mask=None, positions=None, token_type_ids=None,
return_hidden=False, logits_to_keep=0, kv_cache=None)``:

* padding: ``attention_mask`` (B, T) with 1 for real tokens and 0 for padding, or the lmstack
  convention of ``positions`` with -1 at padded slots (models/layers.py); padded keys are never
  attended. Positions default to 0..T-1 as in BERT.
* ``return_hidden=True`` returns ``(hidden (B, T, C), None)``: the final encoder states, which
  ``lmstack.engine.embed`` pools (mean or CLS) into sentence embeddings.
* ``targets`` (B, T) hold the original token at masked positions and -1 elsewhere; the loss is the
  mean masked-LM cross-entropy. The masking itself (15%, 80/10/10) lives in train/losses.py so the
  model stays a pure function of its inputs.
* ``logits_to_keep`` > 0 computes the MLM head for the last N positions only, as in the decoders;
  ``kv_cache`` is accepted only as None (an encoder has no cache: passing one is a UserError).

Non-obvious choices: the activation defaults to the exact (erf) GELU that BERT uses, not the tanh
approximation; LayerNorm eps defaults to BERT's 1e-12; dropout defaults to 0 like the rest of lmstack
(BERT trained with 0.1; set ``model.dropout=0.1`` to match). BERT's pooler (dense + tanh on [CLS],
trained for next-sentence prediction) is left out: sentence-embedding models do not use it, and CLS
pooling here means the raw [CLS] hidden state, as sentence-transformers does it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmstack.errors import UserError, require
from lmstack.models.layers import (MLP, SelfAttention, TransformerShape, check_positions, count_params, init_weights,
                                   lm_loss, make_lm_head)


# the MLM head's transform uses the same activation as the blocks (HF: config.hidden_act)
HEAD_ACTIVATIONS = {
    "gelu_exact": F.gelu,
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
}


@dataclass
class BertConfig(TransformerShape):
    family: str = "bert"
    vocab_size: int = 4096
    block_size: int = 256  # max_position_embeddings: longest input the position table covers
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    head_dim: int | None = None  # None = n_embd // n_head (the resolved value is dim_per_head)
    mlp_hidden: int | None = None  # None = 4 * n_embd (BERT's intermediate_size)
    type_vocab_size: int = 2  # segment (sentence A / B) embeddings; 0 = none
    norm_eps: float = 1e-12
    activation: str = "gelu_exact"
    dropout: float = 0.0
    init_std: float = 0.02

    mlp_multiple_of: ClassVar[int] = 1  # the default MLP width is exactly 4 * n_embd, not rounded up

    def validate(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            require(getattr(self, name) >= 1, f"model.{name}={getattr(self, name)} must be >= 1")
        require(self.head_dim is not None or self.n_embd % self.n_head == 0,
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")
        require(self.activation in HEAD_ACTIVATIONS,
                f"model.activation={self.activation!r}: BERT blocks use a plain (non-gated) MLP; choose one of "
                f"{tuple(HEAD_ACTIVATIONS)}")
        require(self.type_vocab_size >= 0, f"model.type_vocab_size={self.type_vocab_size} must be >= 0")
        require(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1)")


class Block(nn.Module):
    """Post-norm encoder layer: normalise after each residual sum (BERT / original Transformer)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attn = SelfAttention(cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.dim_per_head, layer_idx=0, bias=True,
                                  dropout=cfg.dropout)
        self.norm1 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.n_embd, cfg.hidden_dim, cfg.activation, bias=True, dropout=cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, None, key_mask))
        return self.norm2(x + self.mlp(x))


class Bert(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        if cfg.type_vocab_size > 0:
            self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.n_embd)
        self.emb_norm = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        # masked-LM head; the decoder matrix is the token embedding, only its bias is separate
        self.mlm_dense = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.mlm_norm = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.lm_head = make_lm_head(self.tok_emb, tie=True, bias=True)
        init_weights(self, cfg.init_std)  # BERT's N(0, init_std) without residual scaling

    # ------------------------------------------------------------------ accounting
    def num_params(self, non_embedding: bool = False) -> int:
        """All parameters, or without the token, position and segment tables (layers.count_params)."""
        return count_params(self, non_embedding)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * matmul params (head included) + bidirectional attention.

        Every query attends to all ``seq_len`` keys (twice the causal average):
        12 * n_layer * n_head * head_dim * T.
        """
        cfg = self.config
        matmul_params = self.num_params(non_embedding=True) + cfg.vocab_size * cfg.n_embd
        return 6 * matmul_params + 12 * cfg.n_layer * cfg.n_head * cfg.dim_per_head * seq_len

    # ------------------------------------------------------------------ forward
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, return_hidden: bool = False, logits_to_keep: int = 0,
                kv_cache=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> MLM logits (B, T', V) and loss, or (hidden (B, T, C), None) with return_hidden.

        ``logits_to_keep`` > 0 keeps the last N positions' logits (targets, when given, must cover the
        same N positions). ``kv_cache`` exists so that a decoder-shaped call fails with a clear message.
        """
        if kv_cache is not None:
            raise UserError("BERT is an encoder: it has no KV cache and cannot generate text; use it for "
                            "embeddings (`return_hidden=True`) or masked-LM training")
        B, T = idx.shape
        pad = None  # (B, T) True at padded slots
        if attention_mask is not None:
            pad = attention_mask == 0
        if positions is not None:
            pad = positions < 0 if pad is None else pad | (positions < 0)
        else:
            positions = torch.arange(T, device=idx.device).expand(B, T)
        check_positions(positions, self.config.block_size)
        x = self.tok_emb(idx) + self.pos_emb(positions.clamp(min=0))  # (B, T, C)
        if hasattr(self, "type_emb"):
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(idx)
            x = x + self.type_emb(types)
        x = self.drop(self.emb_norm(x))
        # (B, 1, 1, T) boolean: every query sees every real key. Always a mask, never None: the shared
        # attention reads a missing mask as causal
        real = torch.ones_like(idx, dtype=torch.bool) if pad is None else ~pad
        key_mask = real[:, None, None, :]
        for block in self.blocks:
            x = block(x, key_mask)
        if return_hidden:
            return x, None
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]  # (B, T', C)
        h = self.mlm_norm(HEAD_ACTIVATIONS[self.config.activation](self.mlm_dense(x)))  # (B, T', C)
        logits = self.lm_head(h)  # (B, T', V)
        return logits, (lm_loss(logits, targets) if targets is not None else None)
