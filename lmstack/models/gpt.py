"""Decoder-only transformer (GPT / Llama family), one file top to bottom.

The options cover the design space of the LLM survey (Zhao et al., 2023, section 4.2):

    norm            rmsnorm | layernorm          placement  pre | post
    activation      swiglu | geglu | gelu | relu2 | relu
    position        rope | learned | sinusoidal | alibi | none
    attention       multi-head (n_kv_head == n_head), grouped-query (1 < n_kv_head < n_head)
                    or multi-query (n_kv_head == 1), always through F.scaled_dot_product_attention
    embeddings      tied or untied input / output
    bias, dropout
    sparsity        attn_window > 0: sliding-window (locally banded) attention, in every layer or, with
                    sparse_every = N, only in every N-th layer (GPT-3's alternating dense / sparse: N = 2)
    deepnorm        DeepNet post-LN: x = LN(alpha * x + f(x)), alpha = (2N)^(1/4), and the value, output
                    and FFN matrices initialised Xavier-normal with gain beta = (8N)^(-1/4) (Wang et al., 2022)
    prefix LM       ``forward(..., prefix_len=(B,))``: the first prefix_len positions attend to each other
                    bidirectionally, the rest causally (U-PaLM / GLM); the families ``prefix_lm`` and
                    ``glm`` are this architecture trained with those objectives (train/losses.py)

The defaults are Llama-like (pre-RMSNorm, SwiGLU, RoPE, no bias). ``gpt2-124m`` flips them to
GPT-2 (LayerNorm, GELU, learned positions, bias, tied embeddings).

Initialisation: N(0, 0.02) for every matrix and embedding, residual output projections scaled by
1/sqrt(2 * n_layer) (GPT-2), zero biases.

``forward(idx, targets=None, positions=None, kv_cache=None, logits_to_keep=0, prefix_len=None,
document_ids=None)``; with
a KV cache the model speaks the protocol documented in models/layers.py, so the same module runs
training, the simple ``generate`` loop and the batched engine. Every mask (window, prefix, ALiBi
bias) is derived from query and key positions, so all variants work with any cache; the default
config without cache or prefix keeps the mask-free causal SDPA fast path. With a cache, a
bidirectional prefix must arrive in one forward call (its later tokens do not exist yet otherwise).
Packed training rows (several sequences in one row, each with positions from 0) pass ``document_ids``
(B, T) as well, so no token attends across a sequence boundary; that costs the fast path (an explicit
mask) and is not available with a cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lmstack.errors import require
from lmstack.models.layers import (ACTIVATIONS, MLP, NORMS, POSITIONS, DocumentSpans, SelfAttention,
                                   TransformerShape, alibi_slopes, attention_bias, check_document_ids,
                                   check_positions, count_params, default_positions, document_spans, init_weights,
                                   lm_loss, make_lm_head, make_norm, prefix_embedding_positions, rope_cache,
                                   sinusoidal_embedding)

GPT_POSITIONS = POSITIONS + ("alibi",)


@dataclass
class GPTConfig(TransformerShape):
    family: str = "gpt"
    vocab_size: int = 4096
    block_size: int = 256  # longest sequence the position tables cover
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None = n_head (MHA); 1 = MQA; in between = GQA
    n_embd: int = 256
    head_dim: int | None = None  # None = n_embd // n_head
    mlp_hidden: int | None = None  # None = 4*n_embd (8/3*n_embd for GLU), rounded to 64
    norm: str = "rmsnorm"
    norm_placement: str = "pre"
    norm_eps: float = 1e-5
    activation: str = "swiglu"
    position: str = "rope"
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    bias: bool = False
    dropout: float = 0.0
    init_std: float = 0.02
    attn_window: int = 0  # sliding-window attention span in tokens (itself included); 0 = dense
    sparse_every: int = 0  # 0: every layer uses attn_window; N: only layers N, 2N, ... do (GPT-3: 2)
    deepnorm: bool = False  # DeepNet residual scaling + init; needs norm_placement=post

    def layer_window(self, layer_idx: int) -> int:
        """Attention window of one layer: 0 (dense) or attn_window (locally banded)."""
        if self.attn_window <= 0 or (self.sparse_every > 0 and (layer_idx + 1) % self.sparse_every != 0):
            return 0
        return self.attn_window

    @property
    def deepnorm_alpha(self) -> float:
        """Residual up-weighting of DeepNorm for a decoder-only stack; 1 when DeepNorm is off."""
        return (2 * self.n_layer) ** 0.25 if self.deepnorm else 1.0

    def validate(self) -> None:
        require(self.norm in NORMS, f"model.norm={self.norm!r}: choose one of {NORMS}")
        require(self.norm_placement in ("pre", "post"), f"model.norm_placement={self.norm_placement!r}: pre or post")
        require(self.activation in ACTIVATIONS, f"model.activation={self.activation!r}: choose one of {ACTIVATIONS}")
        require(self.position in GPT_POSITIONS, f"model.position={self.position!r}: choose one of {GPT_POSITIONS}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            require(getattr(self, name) >= 1, f"model.{name}={getattr(self, name)} must be >= 1")
        require(self.head_dim is not None or self.n_embd % self.n_head == 0,
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")
        require(self.n_head % self.kv_heads == 0,
                f"model.n_head={self.n_head} must be a multiple of model.n_kv_head={self.kv_heads}")
        require(self.position != "rope" or self.dim_per_head % 2 == 0, "RoPE needs an even head dimension")
        require(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1)")
        require(self.attn_window >= 0, f"model.attn_window={self.attn_window} must be >= 0 (0 = dense attention)")
        require(self.sparse_every >= 0, f"model.sparse_every={self.sparse_every} must be >= 0")
        require(self.sparse_every == 0 or self.attn_window > 0,
                f"model.sparse_every={self.sparse_every} alternates dense and windowed layers; "
                "also set model.attn_window (e.g. model.attn_window=64)")
        require(not self.deepnorm or self.norm_placement == "post",
                "model.deepnorm=true is a post-norm scheme; also set model.norm_placement=post")


@dataclass
class PrefixLMConfig(GPTConfig):
    """This architecture pretrained as a prefix LM: a random split point per sequence, bidirectional
    attention before it and next-token loss after it (train/losses.py ``prefix_lm``)."""

    family: str = "prefix_lm"


@dataclass
class GLMConfig(GPTConfig):
    """This architecture pretrained with GLM's autoregressive blank infilling (train/losses.py
    ``blank_infilling``): spans become ``<|mask|>`` in a bidirectional part A and are generated
    causally in part B."""

    family: str = "glm"


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.pre_norm = cfg.norm_placement == "pre"
        self.alpha = cfg.deepnorm_alpha
        self.norm1 = make_norm(cfg.norm, cfg.n_embd, cfg.norm_eps, cfg.bias)
        self.attn = SelfAttention(cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.dim_per_head, layer_idx,
                                  cfg.bias, cfg.dropout)
        self.norm2 = make_norm(cfg.norm, cfg.n_embd, cfg.norm_eps, cfg.bias)
        self.mlp = MLP(cfg.n_embd, cfg.hidden_dim, cfg.activation, cfg.bias, cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | DocumentSpans | None, kv_cache=None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), rope, mask, kv_cache)
            return x + self.mlp(self.norm2(x))
        # post-norm (original Transformer / BERT): normalise after each residual sum; DeepNorm
        # up-weights the residual stream by alpha > 1 so that deep post-LN stacks train stably
        x = self.norm1(self.alpha * x + self.attn(x, rope, mask, kv_cache))
        return self.norm2(self.alpha * x + self.mlp(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.position == "learned":
            self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        # post-norm blocks already end in a norm; pre-norm stacks need a final one
        self.norm_f = make_norm(cfg.norm, cfg.n_embd, cfg.norm_eps, cfg.bias) if cfg.norm_placement == "pre" \
            else nn.Identity()
        self.lm_head = make_lm_head(self.tok_emb, tie=cfg.tie_embeddings)
        if cfg.position == "rope":
            cos, sin = rope_cache(cfg.dim_per_head, cfg.block_size, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, head_dim)
            self.register_buffer("rope_sin", sin, persistent=False)
        if cfg.position == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(cfg.n_head), persistent=False)  # (n_head,)
        self.layer_windows = [cfg.layer_window(i) for i in range(cfg.n_layer)]
        if cfg.deepnorm:
            self._init_deepnorm()
        else:
            self._init_gpt2()

    def _init_gpt2(self) -> None:
        """GPT-2: N(0, init_std), the residual output projections scaled by 1/sqrt(2 * n_layer)."""
        init_weights(self, self.config.init_std, residual_sums=lambda name: 2 * self.config.n_layer)

    def _init_deepnorm(self) -> None:
        """DeepNet: Xavier-normal everywhere in the blocks, down-scaled by beta = (8N)^(-1/4) for the value,
        output and FFN matrices (q/k keep gain 1: they do not feed the residual stream)."""
        init_weights(self, self.config.init_std)
        beta = (8 * self.config.n_layer) ** -0.25
        for name, p in self.named_parameters():
            if name.startswith("blocks.") and name.endswith("_proj.weight"):
                gain = 1.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else beta
                nn.init.xavier_normal_(p, gain=gain)

    # ------------------------------------------------------------------ accounting
    def num_params(self, non_embedding: bool = False) -> int:
        """All parameters, or without the token / learned-position tables (layers.count_params)."""
        return count_params(self, non_embedding)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * (matmul params) + attention scores (PaLM appendix B).

        Matmul params exclude the input embedding (a lookup) but include the output head.
        Attention adds 12 * n_layer * n_head * head_dim * seq_len (forward QK^T and AV, times 3
        for backward). Divide by 3 for inference-only FLOPs.
        """
        cfg = self.config
        # parameters() counts a tied matrix once; removing tok_emb then drops the head, so add it back
        matmul_params = self.num_params(non_embedding=True) + (cfg.vocab_size * cfg.n_embd if cfg.tie_embeddings else 0)
        # a windowed layer scores at most `window` keys per query
        attended = sum(min(w, seq_len) if w > 0 else seq_len for w in self.layer_windows)
        return 6 * matmul_params + 12 * cfg.n_head * cfg.dim_per_head * attended

    # ------------------------------------------------------------------ forward
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, kv_cache=None, logits_to_keep: int = 0,
                return_hidden: bool = False, prefix_len: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, prefix_embeddings: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T', V), and the mean cross-entropy when targets are given.

        targets (B, T) use -1 for positions that do not count. positions (B, T) default to
        0..T-1 (or continue the cache). logits_to_keep > 0 computes the head for the last N
        positions only (prefill in generation needs just the last). prefix_len (B,) makes the
        positions below it a bidirectional prefix (prefix LM); the rest stay causal. document_ids (B, T)
        keep attention inside each packed sequence (training only: not with a KV cache).
        prefix_embeddings (1 or B, P, C) are input vectors placed before the tokens (prompt tuning): they take
        positions 0..P-1 and the tokens P..P+T-1, and the logits, hidden states and loss cover the T tokens only.
        """
        check_document_ids(document_ids, idx, kv_cache)
        if prefix_embeddings is not None:
            positions = prefix_embedding_positions(prefix_embeddings, idx, self.config.n_embd, positions=positions,
                                                   kv_cache=kv_cache, document_ids=document_ids,
                                                   prefix_len=prefix_len)  # (B, P + T)
        elif positions is None:
            positions = default_positions(idx, kv_cache)  # (B, T)
        if self.config.position in ("rope", "learned"):  # the other encodings have no table to run past
            check_positions(positions, self.config.block_size)
        x = self.tok_emb(idx)  # (B, T, C)
        if prefix_embeddings is not None:
            x = torch.cat([prefix_embeddings.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)  # (B, P + T, C)
        if self.config.position == "learned":
            x = x + self.pos_emb(positions.clamp(min=0))
        elif self.config.position == "sinusoidal":
            # sin/cos have RMS 1/sqrt(2); scale them to the token embeddings' init std so positions do
            # not drown the tokens at the start of training (the 2017 paper scaled tokens up instead)
            pe = sinusoidal_embedding(positions, self.config.n_embd) * (self.config.init_std * 2 ** 0.5)
            x = x + pe.to(x.dtype)
        x = self.drop(x)
        rope = None
        if self.config.position == "rope":
            p = positions.clamp(min=0)
            rope = (self.rope_cos[p][:, None], self.rope_sin[p][:, None])  # (B, 1, T, D) each
        key_positions = kv_cache.prepare(positions) if kv_cache is not None else None  # (B, S)
        masks = self._layer_masks(positions, key_positions, prefix_len, document_ids)
        for block, mask in zip(self.blocks, masks):
            x = block(x, rope, mask, kv_cache)
        x = self.norm_f(x)
        if prefix_embeddings is not None:
            x = x[:, prefix_embeddings.shape[1]:]  # (B, T, C): the virtual positions predict nothing
        if return_hidden:
            return x, None
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)  # (B, T', V)
        return logits, (lm_loss(logits, targets) if targets is not None else None)

    def _layer_masks(self, positions: torch.Tensor, key_positions: torch.Tensor | None,
                     prefix_len: torch.Tensor | None, document_ids: torch.Tensor | None
                     ) -> list[torch.Tensor | None]:
        """One attention mask per layer; layers with the same window share it. None = plain causal
        attention over the T new tokens (no cache, no prefix, no bias, no packing), SDPA's fused kernel;
        DocumentSpans = the same kernel per document of rows packed as plain concatenations."""
        slopes = getattr(self, "alibi_slopes", None)
        by_window: dict[int, torch.Tensor | DocumentSpans | None] = {}
        plain = key_positions is None and prefix_len is None and slopes is None
        spans = document_spans(positions, document_ids) \
            if plain and document_ids is not None and 0 in self.layer_windows else None
        for window in set(self.layer_windows):
            if plain and window == 0 and (document_ids is None or spans is not None):
                by_window[window] = spans
            else:
                keys = positions if key_positions is None else key_positions
                by_window[window] = attention_bias(positions, keys, window=window, prefix_len=prefix_len,
                                                   slopes=slopes, document_ids=document_ids)
        return [by_window[w] for w in self.layer_windows]
