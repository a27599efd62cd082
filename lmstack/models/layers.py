"""Shared model primitives: norms, position encodings, MLP variants, attention masks and the attention call.

Only building blocks that more than one model family uses live here; each family's file
(gpt.py, bert.py, t5.py, moe.py) assembles them top to bottom. Besides the layers, the families share
their prelude and accounting from here, so the copies cannot drift: ``TransformerShape`` (resolved head,
KV-head and MLP sizes), ``init_weights``, ``make_lm_head``, ``count_params``, ``default_positions``,
``check_positions`` (with its CUDA-graph capture guard), ``check_document_ids`` and ``lm_loss``.

Attention masks are built from *positions*, not from shapes. A query at position p may attend to a
key at position q when ``0 <= q <= p`` (and ``p - q < window`` for sliding-window attention). Keys
with position -1 are empty cache slots or padding and are never attended. Deriving masks from
positions lets one code path serve plain training (no cache), a contiguous KV cache, and the
engine's slotted cache shared by many sequences, with left padding or without. Training rows that pack
several sequences add ``document_ids`` (B, T): attention then also stays inside each sequence. When such a
row is a plain concatenation (each document contiguous, positions 0, 1, ... inside it, padding only at the
end) :func:`document_spans` turns it into :class:`DocumentSpans`, and the attention call runs SDPA's causal
kernel on each document instead of one masked call over the whole row.

The KV-cache protocol the models speak (duck-typed; implementations live in lmstack.engine):

    key_positions = cache.prepare(positions)       # positions: (B, T) of the new tokens -> (B, S)
    k_all, v_all = cache.update(layer_idx, k, v)     # k, v: (B, H_kv, T, D) -> (B, H_kv, S, D)

``prepare`` is called once per forward pass, before the first layer; ``update`` once per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmstack.errors import ConfigError, UserError

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
    raise ConfigError(f"model.norm={kind!r}: choose one of {NORMS}")


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
            raise ConfigError(f"model.activation={activation!r}: choose one of {ACTIVATIONS}")
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


class TransformerShape:
    """Mixin for the model config dataclasses: the sizes every family derives the same way.

    Expects ``n_embd``, ``n_head``, ``head_dim`` (None = n_embd // n_head), ``mlp_hidden`` (None = the
    activation's default width) and ``activation``; ``n_kv_head`` (0/None = n_head) where the family has
    grouped-query attention. In every family ``head_dim`` is the optional override field and
    :attr:`dim_per_head` the resolved value; read the latter.

    ``mlp_multiple_of`` (a class constant, not a config field) rounds the default MLP width up; a family
    whose published checkpoints use exactly 4 * n_embd (BERT) sets it to 1."""

    mlp_multiple_of: ClassVar[int] = 64

    @property
    def kv_heads(self) -> int:
        return getattr(self, "n_kv_head", 0) or self.n_head

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def hidden_dim(self) -> int:
        return self.mlp_hidden or default_mlp_hidden(self.n_embd, self.activation, self.mlp_multiple_of)


# ----------------------------------------------------------------------------- the prelude and the loss every family shares

def init_weights(model: nn.Module, std: float, residual_sums: Callable[[str], int] | None = None) -> None:
    """N(0, std) for every Linear and Embedding weight, zero Linear biases.

    With ``residual_sums``, the projections that write into a residual stream (``o_proj``, ``down_proj``)
    are drawn again with std / sqrt(residual_sums(parameter name)): GPT-2's scaling by the number of
    residual sums in the stack, so the stream's variance does not grow with depth. Weights are drawn in
    module order, a tied matrix once per module that holds it, so a seed gives the same model as before.
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    if residual_sums is None:
        return
    for name, p in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            nn.init.normal_(p, mean=0.0, std=std / math.sqrt(residual_sums(name)))


def make_lm_head(embedding: nn.Embedding, tie: bool = True, bias: bool = False) -> nn.Linear:
    """The output projection (C -> V); ``tie`` shares its matrix with the token embedding."""
    head = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=bias)
    if tie:
        head.weight = embedding.weight
    return head


# input lookup tables; T5's relative-position bias is an attention bias, not one of these
EMBEDDING_TABLES = ("tok_emb", "pos_emb", "type_emb")


def count_params(model: nn.Module, non_embedding: bool = False) -> int:
    """Parameters of ``model`` (a tied matrix counts once); ``non_embedding`` leaves out the input lookup
    tables (token, absolute position, segment) that a forward pass reads but does not multiply with."""
    n = sum(p.numel() for p in model.parameters())
    if non_embedding:
        n -= sum(getattr(model, name).weight.numel() for name in EMBEDDING_TABLES if hasattr(model, name))
    return n


def default_positions(idx: torch.Tensor, kv_cache=None) -> torch.Tensor:
    """Positions (B, T) of the tokens idx (B, T): 0..T-1, or continuing what the KV cache holds."""
    B, T = idx.shape
    start = kv_cache.next_position() if kv_cache is not None else 0
    return torch.arange(start, start + T, device=idx.device).expand(B, T)


def capturing_cuda_graph() -> bool:
    """True while the current CUDA stream is being captured into a CUDA graph (never on a CPU-only run)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_document_ids(document_ids: torch.Tensor | None, idx: torch.Tensor, kv_cache) -> None:
    """UserError when packed ``document_ids`` come with a KV cache (generation runs one sequence per row)
    or do not match the tokens idx (B, T)."""
    if document_ids is None:
        return
    if kv_cache is not None:
        raise UserError("document_ids separate packed training sequences; they cannot be combined with a KV "
                        "cache (generate with one sequence per row and no document_ids)")
    if document_ids.shape != idx.shape:
        raise UserError(f"document_ids has shape {tuple(document_ids.shape)}, the tokens {tuple(idx.shape)}; "
                        "give one document id per token")


def prefix_embedding_positions(prefix_embeddings: torch.Tensor, idx: torch.Tensor, n_embd: int, *,
                               positions: torch.Tensor | None, kv_cache, document_ids: torch.Tensor | None,
                               prefix_len: torch.Tensor | None = None) -> torch.Tensor:
    """Positions (B, P + T), 0..P+T-1, for P input vectors (B or 1, P, C) placed before the tokens idx (B, T).

    Prompt tuning (models/peft.py) feeds its trainable virtual tokens this way. It is a whole-sequence forward,
    so a KV cache, explicit positions, a prefix_len or document_ids are refused (ConfigError)."""
    B, T = idx.shape
    if prefix_embeddings.dim() != 3 or prefix_embeddings.shape[0] not in (1, B) or prefix_embeddings.shape[2] != n_embd:
        raise ConfigError(f"prefix_embeddings of shape {tuple(prefix_embeddings.shape)} do not fit a batch of {B} "
                          f"and width {n_embd}: expected (1 or {B}, P, {n_embd})")
    if positions is not None or kv_cache is not None or prefix_len is not None or document_ids is not None:
        raise ConfigError("prefix_embeddings run a whole sequence at once: they cannot be combined with positions, "
                          "a KV cache, prefix_len or document_ids")
    return torch.arange(prefix_embeddings.shape[1] + T, device=idx.device).expand(B, -1)


def check_positions(positions: torch.Tensor, block_size: int) -> None:
    """UserError when a position is past the model's position table (``block_size`` entries).

    The check reads a value back from the device, which a CUDA graph capture forbids; during a capture
    it is skipped (the engine checks every request's length against its context before it decodes).
    """
    if capturing_cuda_graph():
        return
    longest = int(positions.max())
    if longest >= block_size:
        raise UserError(f"token position {longest} is beyond the model's context of {block_size} tokens "
                        f"(an input of {longest + 1} tokens); shorten or truncate the input")


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (B, T, V) against targets (B, T); -1 marks positions that do not count.

    Computed in fp32 whatever the logits' dtype: a bf16 log-softmax over a large vocabulary loses digits.
    """
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


# ----------------------------------------------------------------------------- attention

def attention_mask(query_positions: torch.Tensor, key_positions: torch.Tensor,
                   window: int | None = None, prefix_len: torch.Tensor | None = None,
                   document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask (B, 1, T, S): True where query t may attend to key s.

    query_positions (B, T), key_positions (B, S); -1 marks padding / empty slots. A padded query
    row is allowed to see every key so that softmax never sees an all-masked row (its output is
    discarded anyway). ``window`` > 0 bands the causal part (a query sees the last ``window``
    positions, itself included). ``prefix_len`` (B,) makes positions < prefix_len attend to each
    other in both directions (prefix LM, U-PaLM / GLM); the prefix ignores the window.
    ``document_ids`` (B, T) separates sequences packed into one row (queries and keys are then the
    same T tokens, no cache): a query attends only to keys of its own document. Positions alone
    cannot do this, as every packed document restarts at position 0.
    """
    q = query_positions[:, :, None]  # (B, T, 1)
    k = key_positions[:, None, :]  # (B, 1, S)
    allowed = k <= q
    if window is not None and window > 0:
        allowed &= (q - k) < window
    if prefix_len is not None:
        bound = prefix_len.to(q.device).view(-1, 1, 1)  # (B, 1, 1)
        allowed |= (q < bound) & (k < bound)
    if document_ids is not None:
        if document_ids.shape != query_positions.shape or query_positions.shape != key_positions.shape:
            raise ValueError(f"document_ids {tuple(document_ids.shape)} must match the query and key positions "
                             f"{tuple(query_positions.shape)}, {tuple(key_positions.shape)} (no KV cache)")
        allowed &= document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
    allowed &= k >= 0
    allowed |= (q < 0)
    return allowed[:, None]  # (B, 1, T, S)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Per-head ALiBi slopes (Press et al., 2022), shape (n_head,).

    For a power of two n the slopes are the geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8).
    Otherwise the paper takes the slopes of the nearest smaller power of two and fills the rest
    with every other slope of the next power of two.
    """
    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    base = 2 ** int(math.floor(math.log2(n_head)))
    slopes = geometric(base)
    if base < n_head:
        slopes += geometric(2 * base)[0::2][: n_head - base]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(query_positions: torch.Tensor, key_positions: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """Additive attention bias -slope * |query position - key position|, shape (B, H, T, S).

    Derived from positions only, so it is the same with or without a KV cache. The distance is
    symmetric so keys after the query (a bidirectional prefix) are penalised the same way.
    """
    distance = (query_positions[:, :, None] - key_positions[:, None, :]).abs().float()  # (B, T, S)
    return -slopes.view(1, -1, 1, 1) * distance[:, None]  # (B, H, T, S)


def attention_bias(query_positions: torch.Tensor, key_positions: torch.Tensor, *, window: int = 0,
                   prefix_len: torch.Tensor | None = None, slopes: torch.Tensor | None = None,
                   document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The mask for one attention call: boolean (B, 1, T, S), or with ALiBi ``slopes`` a float
    bias (B, H, T, S) that is -inf where attention is not allowed."""
    allowed = attention_mask(query_positions, key_positions, window, prefix_len, document_ids)
    if slopes is None:
        return allowed
    return alibi_bias(query_positions, key_positions, slopes).masked_fill(~allowed, float("-inf"))


@dataclass(frozen=True)
class DocumentSpans:
    """Packed rows as causal spans: ``rows[b]`` lists (start, end) token ranges that tile row b in order,
    one per document plus one for the trailing padding. Attention runs causally inside each span, which is
    what :func:`attention_mask` allows for the real tokens of such a row (see :func:`document_spans`)."""

    rows: tuple[tuple[tuple[int, int], ...], ...]


def document_spans(positions: torch.Tensor, document_ids: torch.Tensor) -> DocumentSpans | None:
    """The spans of packed rows, or None when the rows are not plain concatenations.

    positions, document_ids (B, T). A row qualifies when its real tokens (document id >= 0) come first,
    each document is one contiguous run with positions 0, 1, 2, ... and the ids increase along the row, and
    its padding (id -1, position -1) fills the rest. For such a row causal attention inside each span
    gives every real query exactly the keys the explicit mask gives it; padding queries, whose outputs
    the mask path discards, attend causally inside the padding instead of to every key. One host sync.
    Under torch.compile it returns None: the spans are Python integers, which the compiler would specialise
    on and recompile for every new layout; the mask is a tensor it traces once."""
    if torch.compiler.is_compiling():
        return None
    real = document_ids >= 0  # (B, T)
    previous_real = F.pad(real[:, :-1], (1, 0), value=True)
    previous_doc = F.pad(document_ids[:, :-1], (1, 0), value=-1)
    previous_pos = F.pad(positions[:, :-1], (1, 0), value=-1)
    starts = real & (document_ids != previous_doc)  # the first token of each document
    expected = torch.where(starts, torch.zeros_like(positions), previous_pos + 1)
    plain = (~real | previous_real).all() & (~real | (positions == expected)).all() \
        & (~starts | (document_ids > previous_doc)).all() & (real | (positions == -1)).all()
    if not bool(plain):
        return None
    bounds = starts | (~real & previous_real)  # a document's first token, or the first padding token
    bounds[:, 0] = True
    T = document_ids.shape[1]
    rows = []
    for marks in bounds.tolist():
        cuts = [t for t, mark in enumerate(marks) if mark] + [T]
        rows.append(tuple(zip(cuts[:-1], cuts[1:])))
    return DocumentSpans(tuple(rows))


def _span_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: DocumentSpans, dropout: float,
                    scale: float | None) -> torch.Tensor:
    """Causal SDPA inside each span of each row; q, k, v (B, H, T, D) -> (B, H, T, D)."""
    rows = []
    for b, row in enumerate(spans.rows):
        pieces = [F.scaled_dot_product_attention(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e],
                                                 is_causal=True, dropout_p=dropout, scale=scale)
                  for s, e in row]  # (1, H, e - s, D) each
        rows.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask: torch.Tensor | DocumentSpans | None, dropout: float = 0.0,
                                 scale: float | None = None) -> torch.Tensor:
    """q (B, H, T, D); k, v (B, H_kv, S, D) with H a multiple of H_kv (grouped-query attention).

    ``mask is None`` means plain causal attention with T == S, which lets SDPA pick its flash kernel;
    :class:`DocumentSpans` (T == S) the same kernel inside each packed document.
    """
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        # (B, H_kv, S, D) -> (B, H, S, D); explicit expansion works on every SDPA backend
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scale)
    if isinstance(mask, DocumentSpans):
        return _span_attention(q, k, v, mask, dropout, scale)
    if mask.dtype != torch.bool:
        mask = mask.to(q.dtype)  # additive biases (ALiBi, T5) must match the query dtype under autocast
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)


class SelfAttention(nn.Module):
    """Multi-head, grouped-query (1 < n_kv_head < n_head) or multi-query (n_kv_head == 1) self-attention.

    Speaks the KV-cache protocol above: with a cache the new keys/values are appended and the
    attention runs over everything cached; ``mask`` (from :func:`attention_bias`) decides what each
    query sees. ``rope`` is the (cos, sin) pair gathered at the tokens' positions, or None.
    """

    def __init__(self, dim: int, n_head: int, n_kv_head: int, head_dim: int, layer_idx: int,
                 bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.q_proj = nn.Linear(dim, n_head * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, n_kv_head * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, n_kv_head * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_head * head_dim, dim, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | DocumentSpans | None, kv_cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, H_kv, S, D)
        y = scaled_dot_product_attention(q, k, v, mask, dropout=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H*D)
        return self.resid_dropout(self.o_proj(y))
