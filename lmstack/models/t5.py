"""Encoder-decoder transformer (T5), one file top to bottom.

    encoder   token embedding -> n_layer x [RMSNorm -> bidirectional self-attention,
              RMSNorm -> MLP] -> RMSNorm
    decoder   token embedding -> n_decoder_layer x [RMSNorm -> causal self-attention,
              RMSNorm -> cross-attention over the encoder output, RMSNorm -> MLP] -> RMSNorm -> LM head

Positions are T5's relative position buckets: each attention score gets a learned per-head bias
indexed by the bucket of (key position - query position). Buckets are exact for small distances and
logarithmically wider up to ``rel_max_distance``, beyond which all distances share the last bucket.
The encoder's buckets are bidirectional (half the buckets for keys before the query, half for keys
after); the decoder's are causal. As in T5, the bias is computed once per stack and shared by its
layers, and cross-attention has none. With no absolute positions the model runs on inputs longer than
``block_size`` (which only bounds the training windows).

Pretraining is span corruption (train/losses.py ``span_corruption``): ``noise_density`` of each
window's tokens, in spans of mean length ``mean_span``, are replaced by sentinel tokens
``<|sentinel_i|>`` in the encoder input; the decoder produces ``<|sentinel_0|> span_0
<|sentinel_1|> span_1 ... <|endoftext|>``, starting from ``<|endoftext|>``.

Differences from the released T5 (v1.1 flavour: gated-GELU, no biases, untied or tied head):
attention scores are scaled by 1/sqrt(head_dim) and weights use the same N(0, init_std) init as
gpt.py (T5 folds the scale into its init); the tied LM head is not rescaled by 1/sqrt(n_embd).

    model(input_ids (B, S), decoder_input_ids (B, T), targets (B, T), encoder_mask=(B, S) bool)
        -> (logits (B, T, V), loss)
    model(input_ids, return_hidden=True) -> (encoder hidden states (B, S, C), None)
    model.encode(...), model.decoder_cache(encoder_hidden), model.decode(..., cache=cache): the pieces of
        conditional generation; the loop itself (with the engine's sampler) is
        ``lmstack.engine.seq2seq.generate_seq2seq``, because models sit below the engine

    lmstack pretrain --data DATA --out runs/t5 --preset tiny-t5
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from lmstack.errors import require
from lmstack.models.layers import (ACTIVATIONS, MLP, RMSNorm, TransformerShape, count_params, init_weights, lm_loss,
                                   make_lm_head, scaled_dot_product_attention)


@dataclass
class T5Config(TransformerShape):
    family: str = "t5"
    vocab_size: int = 4096
    block_size: int = 256  # training window length; relative positions do not limit inference
    n_layer: int = 4  # encoder layers
    n_decoder_layer: int | None = None  # None = n_layer
    n_head: int = 4
    n_embd: int = 256
    head_dim: int | None = None  # None = n_embd // n_head
    mlp_hidden: int | None = None  # None = 4*n_embd (8/3*n_embd for GLU), rounded to 64
    activation: str = "geglu"  # T5 v1.1's gated GELU
    norm_eps: float = 1e-6
    rel_buckets: int = 32
    rel_max_distance: int = 128
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    noise_density: float = 0.15  # span corruption: fraction of tokens masked
    mean_span: float = 3.0  # span corruption: mean masked span length

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layer or self.n_layer

    def validate(self) -> None:
        require(self.activation in ACTIVATIONS, f"model.activation={self.activation!r}: choose one of {ACTIVATIONS}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            require(getattr(self, name) >= 1, f"model.{name}={getattr(self, name)} must be >= 1")
        require(self.n_decoder_layer is None or self.n_decoder_layer >= 1,
                f"model.n_decoder_layer={self.n_decoder_layer} must be >= 1 (or none = n_layer)")
        require(self.head_dim is not None or self.n_embd % self.n_head == 0,
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")
        require(self.rel_buckets >= 4, f"model.rel_buckets={self.rel_buckets} must be >= 4")
        require(self.rel_max_distance > self.rel_buckets // 2,
                f"model.rel_max_distance={self.rel_max_distance} must exceed rel_buckets/2 = {self.rel_buckets // 2}")
        require(0.0 < self.noise_density < 1.0, f"model.noise_density={self.noise_density} must be in (0, 1)")
        require(self.mean_span >= 1.0, f"model.mean_span={self.mean_span} must be >= 1")
        require(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1)")


# ----------------------------------------------------------------------------- relative positions

def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Bucket ids in [0, num_buckets) for relative_position = key position - query position (ints).

    Bidirectional: keys at or before the query use buckets [0, num_buckets/2), keys after it the
    upper half. Causal: future keys (masked anyway) share bucket 0 with distance 0. Within a half,
    the first half of the buckets are distances 0, 1, 2, ...; the rest cover distances up to
    max_distance on a log scale; anything farther lands in the last bucket.
    """
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    exact = num_buckets // 2
    log_scale = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    far = (exact + (log_scale * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """Learned per-head bias per relative-position bucket: (T,) x (S,) positions -> (1, H, T, S)."""

    def __init__(self, n_head: int, bidirectional: bool, num_buckets: int, max_distance: int):
        super().__init__()
        self.bidirectional, self.num_buckets, self.max_distance = bidirectional, num_buckets, max_distance
        self.table = nn.Embedding(num_buckets, n_head)

    def forward(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        relative = key_positions[None, :] - query_positions[:, None]  # (T, S)
        buckets = relative_position_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)
        return self.table(buckets).permute(2, 0, 1)[None]  # (T, S, H) -> (1, H, T, S)


# ----------------------------------------------------------------------------- blocks

class T5Attention(nn.Module):
    """Self- or cross-attention. ``kv`` (precomputed keys/values) makes it cross-attention; ``past``
    holds a self-attention layer's cached keys/values. Returns the output and the (k, v) it used."""

    def __init__(self, dim: int, n_head: int, head_dim: int, dropout: float):
        super().__init__()
        self.n_head, self.head_dim = n_head, head_dim
        self.q_proj = nn.Linear(dim, n_head * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_head * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_head * head_dim, bias=False)
        self.o_proj = nn.Linear(n_head * head_dim, dim, bias=False)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def project_kv(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, _ = source.shape
        k = self.k_proj(source).view(B, S, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, S, D)
        v = self.v_proj(source).view(B, S, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, S, D)
        return k, v

    def forward(self, x: torch.Tensor, mask: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                past: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        if kv is None:
            k, v = self.project_kv(x)
            if past is not None:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, H, S, D)
        else:
            k, v = kv
        y = scaled_dot_product_attention(q, k, v, mask, dropout=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H*D)
        return self.resid_dropout(self.o_proj(y)), (k, v)


class EncoderBlock(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.norm1 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = T5Attention(cfg.n_embd, cfg.n_head, cfg.dim_per_head, cfg.dropout)
        self.norm2 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg.n_embd, cfg.hidden_dim, cfg.activation, False, cfg.dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), bias)[0]
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.norm1 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = T5Attention(cfg.n_embd, cfg.n_head, cfg.dim_per_head, cfg.dropout)
        self.norm2 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.cross_attn = T5Attention(cfg.n_embd, cfg.n_head, cfg.dim_per_head, cfg.dropout)
        self.norm3 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg.n_embd, cfg.hidden_dim, cfg.activation, False, cfg.dropout)

    def forward(self, x: torch.Tensor, self_bias: torch.Tensor, cross_kv: tuple[torch.Tensor, torch.Tensor],
                cross_mask: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        h, present = self.self_attn(self.norm1(x), self_bias, past=past)
        x = x + h
        x = x + self.cross_attn(self.norm2(x), cross_mask, kv=cross_kv)[0]
        return x + self.mlp(self.norm3(x)), present


class DecoderCache:
    """Per-layer self-attention keys/values plus the cross-attention keys/values of one encoder output."""

    def __init__(self, cross_kv: list[tuple[torch.Tensor, torch.Tensor]]):
        self.cross_kv = cross_kv
        self.self_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(cross_kv)
        self.length = 0  # decoder tokens processed so far


# ----------------------------------------------------------------------------- model

class T5(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # shared by encoder and decoder
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder_bias = RelativePositionBias(cfg.n_head, True, cfg.rel_buckets, cfg.rel_max_distance)
        self.encoder_blocks = nn.ModuleList([EncoderBlock(cfg) for _ in range(cfg.n_layer)])
        self.encoder_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.decoder_bias = RelativePositionBias(cfg.n_head, False, cfg.rel_buckets, cfg.rel_max_distance)
        self.decoder_blocks = nn.ModuleList([DecoderBlock(cfg) for _ in range(cfg.decoder_layers)])
        self.decoder_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = make_lm_head(self.tok_emb, tie=cfg.tie_embeddings)
        # residual-branch outputs scaled by the number of residual sums in their stack (GPT-2 style)
        init_weights(self, cfg.init_std, residual_sums=lambda name: 2 * cfg.n_layer if name.startswith("encoder")
                     else 3 * cfg.decoder_layers)

    # ------------------------------------------------------------------ accounting
    def num_params(self, non_embedding: bool = False) -> int:
        """All parameters, or without the token table (the relative-position biases count: they are not
        input lookups)."""
        return count_params(self, non_embedding)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of a span-corruption window of ``seq_len`` tokens.

        A window of L tokens becomes ~L*(1 - d + d/m) encoder tokens and ~L*(d + d/m) decoder tokens
        (d = noise_density, m = mean_span). Each token costs 6 * (matmul params it passes) plus
        12 * layers * H * D * (keys it attends to); the cross-attention key/value projections run on
        encoder tokens, everything else in the decoder (and the LM head) on decoder tokens.
        """
        cfg = self.config
        enc_frac = 1 - cfg.noise_density + cfg.noise_density / cfg.mean_span
        dec_frac = cfg.noise_density + cfg.noise_density / cfg.mean_span
        enc_len, dec_len = enc_frac * seq_len, dec_frac * seq_len

        def matmuls(modules) -> int:
            return sum(p.numel() for m in modules for n, p in m.named_parameters() if p.dim() == 2)

        encoder_params = matmuls(self.encoder_blocks)
        cross_kv_params = sum(b.cross_attn.k_proj.weight.numel() + b.cross_attn.v_proj.weight.numel()
                              for b in self.decoder_blocks)
        decoder_params = matmuls(self.decoder_blocks) - cross_kv_params + cfg.vocab_size * cfg.n_embd
        heads = cfg.n_head * cfg.dim_per_head
        flops = enc_frac * (6 * (encoder_params + cross_kv_params) + 12 * cfg.n_layer * heads * enc_len)
        flops += dec_frac * (6 * decoder_params + 12 * cfg.decoder_layers * heads * (dec_len + enc_len))
        return flops

    # ------------------------------------------------------------------ encoder / decoder
    def encode(self, input_ids: torch.Tensor, encoder_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, S) -> hidden states (B, S, C). encoder_mask (B, S): True for real tokens."""
        B, S = input_ids.shape
        positions = torch.arange(S, device=input_ids.device)
        bias = self.encoder_bias(positions, positions)  # (1, H, S, S)
        if encoder_mask is not None:
            bias = bias.masked_fill(~encoder_mask[:, None, None, :], float("-inf"))  # (B, H, S, S)
        x = self.drop(self.tok_emb(input_ids))  # (B, S, C)
        for block in self.encoder_blocks:
            x = block(x, bias)
        return self.encoder_norm(x)

    def decoder_cache(self, encoder_hidden: torch.Tensor) -> DecoderCache:
        """An empty decoder cache holding every layer's cross-attention keys/values of ``encoder_hidden``
        (B, S, C), computed once for the whole generation."""
        return DecoderCache([block.cross_attn.project_kv(encoder_hidden) for block in self.decoder_blocks])

    def decode(self, decoder_input_ids: torch.Tensor, encoder_hidden: torch.Tensor | None,
               encoder_mask: torch.Tensor | None = None, cache: DecoderCache | None = None) -> torch.Tensor:
        """decoder_input_ids (B, T) -> hidden states (B, T, C), attending to ``encoder_hidden`` (B, S, C).

        With a cache the tokens continue the cached ones and ``encoder_hidden`` may be None (the
        cache holds the cross-attention keys/values).
        """
        B, T = decoder_input_ids.shape
        device = decoder_input_ids.device
        past = cache.length if cache is not None else 0
        key_positions = torch.arange(past + T, device=device)
        query_positions = key_positions[past:]
        causal = key_positions[None, :] <= query_positions[:, None]  # (T, S)
        self_bias = self.decoder_bias(query_positions, key_positions).masked_fill(~causal, float("-inf"))
        if cache is not None and cache.cross_kv:
            cross_kv = cache.cross_kv
        else:
            cross_kv = [block.cross_attn.project_kv(encoder_hidden) for block in self.decoder_blocks]
        S = cross_kv[0][0].shape[2]
        cross_mask = encoder_mask[:, None, None, :] if encoder_mask is not None else \
            torch.ones(B, 1, 1, S, dtype=torch.bool, device=device)  # (B, 1, 1, S)
        x = self.drop(self.tok_emb(decoder_input_ids))  # (B, T, C)
        for i, block in enumerate(self.decoder_blocks):
            x, present = block(x, self_bias, cross_kv[i], cross_mask, past=cache.self_kv[i] if cache else None)
            if cache is not None:
                cache.self_kv[i] = present
        if cache is not None:
            cache.length += T
        return self.decoder_norm(x)

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, *, encoder_mask: torch.Tensor | None = None,
                return_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits (B, T, V), mean cross-entropy over targets != -1 or None).

        ``return_hidden=True`` (or no decoder input) returns the encoder's hidden states instead:
        (B, S, C), for embeddings.
        """
        encoder_hidden = self.encode(input_ids, encoder_mask)
        if return_hidden or decoder_input_ids is None:
            return encoder_hidden, None
        logits = self.lm_head(self.decode(decoder_input_ids, encoder_hidden, encoder_mask))  # (B, T, V)
        return logits, (lm_loss(logits, targets) if targets is not None else None)
