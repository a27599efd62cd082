"""Shared model primitives: norms, position encodings, MLP variants, attention masks and the attention call.

Only building blocks that more than one model family uses live here; each family's file
(gpt.py, bert.py, t5.py, moe.py) assembles them top to bottom.

Attention masks are built from *positions*, not from shapes. A query at position p may attend to a
key at position q when ``0 <= q <= p`` (and ``p - q < window`` for sliding-window attention). Keys
with position -1 are empty cache slots or padding and are never attended. Deriving masks from
positions lets one code path serve plain training (no cache), a contiguous KV cache, and the
engine's slotted cache shared by many sequences, with left padding or without.

The KV-cache protocol the models speak (duck-typed; implementations live in lmstack.engine):

    key_positions = cache.prepare(positions)       # positions: (B, T) of the new tokens -> (B, S)
    k_all, v_all = cache.update(layer_idx, k, v)     # k, v: (B, H_kv, T, D) -> (B, H_kv, S, D)

``prepare`` is called once per forward pass, before the first layer; ``update`` once per layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

NORMS = ("rmsnorm", "layernorm")
ACTIVATIONS = ("gelu", "swiglu", "geglu", "relu2", "relu", "gelu_exact")
POSITIONS = ("rope", "learned", "sinusoidal", "none")


# ----------------------------------------------------------------------------- norms

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 for stability under bf16 autocast, as Llama does
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


def make_norm(kind: str, dim: int, eps: float = 1e-5, bias: bool = True) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    raise ValueError(f"norm={kind!r}: choose one of {NORMS}")


# ----------------------------------------------------------------------------- positions

def rope_cache(head_dim: int, max_positions: int, theta: float = 10000.0,
               device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for rotary embeddings, each (max_positions, head_dim), in the "rotate half" layout.

    The layout (first half of the head dims paired with the second half) is the one Hugging Face's
    Llama uses, so imported Llama weights work without permuting q/k projections.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    t = torch.arange(max_positions, dtype=torch.float64, device=device)
    freqs = torch.outer(t, inv_freq)  # (P, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (P, head_dim)
    return emb.cos().float(), emb.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (B, 1, T, D) gathered at each token's position."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def sinusoidal_embedding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """The fixed sin/cos encoding of "Attention is all you need". positions (B, T) -> (B, T, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.clamp(min=0).float()[..., None] * freqs  # (B, T, half)
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


# ----------------------------------------------------------------------------- MLP

class MLP(nn.Module):
    """Feed-forward block. GLU variants (swiglu, geglu) have a gate projection; the others do not.

    relu2 is squared ReLU (Primer; used by nanochat / modded-nanogpt). ``gelu`` is the tanh
    approximation (GPT-2's "gelu_new"); ``gelu_exact`` is the erf form (BERT's "gelu").
    """

    def __init__(self, dim: int, hidden: int, activation: str, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r}: choose one of {ACTIVATIONS}")
        self.activation = activation
        self.glu = activation in ("swiglu", "geglu")
        if self.glu:
            self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.up_proj(x)
        if self.activation == "swiglu":
            h = F.silu(self.gate_proj(x)) * up
        elif self.activation == "geglu":
            h = F.gelu(self.gate_proj(x), approximate="tanh") * up
        elif self.activation == "gelu":
            h = F.gelu(up, approximate="tanh")
        elif self.activation == "gelu_exact":
            h = F.gelu(up)
        elif self.activation == "relu2":
            h = F.relu(up).square()
        else:
            h = F.relu(up)
        return self.dropout(self.down_proj(h))


def default_mlp_hidden(dim: int, activation: str, multiple_of: int = 64) -> int:
    """4*dim, or 8/3*dim for GLU variants (same parameter count), rounded up to a multiple."""
    hidden = 4 * dim if activation not in ("swiglu", "geglu") else int(8 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# ----------------------------------------------------------------------------- attention

def attention_mask(query_positions: torch.Tensor, key_positions: torch.Tensor,
                   window: int | None = None) -> torch.Tensor:
    """Boolean mask (B, 1, T, S): True where query t may attend to key s.

    query_positions (B, T), key_positions (B, S); -1 marks padding / empty slots. A padded query
    row is allowed to see every key so that softmax never sees an all-masked row (its output is
    discarded anyway).
    """
    q = query_positions[:, :, None]  # (B, T, 1)
    k = key_positions[:, None, :]  # (B, 1, S)
    allowed = (k <= q) & (k >= 0)
    if window is not None and window > 0:
        allowed &= (q - k) < window
    allowed |= (q < 0)
    return allowed[:, None]  # (B, 1, T, S)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask: torch.Tensor | None, dropout: float = 0.0,
                                 scale: float | None = None) -> torch.Tensor:
    """q (B, H, T, D); k, v (B, H_kv, S, D) with H a multiple of H_kv (grouped-query attention).

    ``mask is None`` means plain causal attention with T == S, which lets SDPA pick its flash kernel.
    """
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        # (B, H_kv, S, D) -> (B, H, S, D); explicit expansion works on every SDPA backend
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
