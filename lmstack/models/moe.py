"""Mixture-of-experts decoder (Switch Transformer / GShard / GLaM), one file top to bottom.

A pre-norm RoPE decoder like ``gpt.py``'s default, where the feed-forward block of every
``moe_every``-th layer is replaced by ``n_expert`` expert MLPs and a learned router:

    top_k = 1   Switch routing: each token goes to its highest-probability expert, scaled by that
                probability (Fedus et al., 2021).
    top_k = 2   GShard / GLaM routing: the two best experts, gates renormalised to sum to 1.

Capacity: expert e accepts at most ``ceil(capacity_factor * k * N / E)`` of the N tokens' k
assignments per forward pass; first choices are placed before second choices and, within a
choice, earlier tokens first. Assignments beyond capacity are dropped: the token's residual stream
passes through that layer's FFN unchanged (its output is zero for that choice). In eval mode
``eval_capacity_factor`` applies; its default 0 means "no limit", so inference never drops a token
and a sequence's output never depends on what else shares its batch.

Auxiliary losses, added to the language-model loss by the ``moe`` objective (train/losses.py):
    balance loss  E * sum_e f_e * P_e, f_e = share of tokens whose first choice is e, P_e = mean router
                  probability of e (Switch eq. 4); 1.0 when perfectly balanced.
    router z-loss mean over tokens of logsumexp(router logits)^2 (ST-MoE, Zoph et al., 2022); keeps
                  router logits small so the softmax stays in a well-conditioned range.

``forward(..., return_aux=True)`` returns ``(logits, lm_loss, aux)`` where ``aux["loss"]`` is the
weighted sum of the auxiliary losses and ``aux["stats"]`` one small tensor of routing statistics
(:func:`routing_metrics` turns it into the logged floats: losses, dropped-token count and
fraction, per-expert share of the kept assignments).

The pieces that are the same as in gpt.py come from models/layers.py, so they cannot drift apart: the
position-limit check (skipped while a CUDA graph is being captured), the loss, the embedding / tied head /
init prelude and the parameter count. The KV-cache protocol is the one in models/layers.py.
Packed training rows pass ``document_ids`` (B, T) to keep attention inside each sequence.

Caveats: experts run one after another on gathered tokens (index_select / index_add), which is
clear and cheap at toy scale but not the grouped-GEMM kernels large MoE systems use; there is no
expert parallelism. The boolean selection of each expert's tokens has a data-dependent size, which a
CUDA graph cannot capture, so (by reading; not measured here) the engine decodes an MoE model eagerly, with
a warning. Positions are RoPE only and attention is dense causal (the ALiBi / window / prefix variants
live in gpt.py).

    lmstack pretrain --data DATA --out runs/moe --preset tiny-moe
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmstack.errors import require
from lmstack.models.layers import (ACTIVATIONS, MLP, NORMS, DocumentSpans, SelfAttention, TransformerShape,
                                   attention_mask, check_document_ids, check_positions, count_params,
                                   default_positions, document_spans, init_weights, lm_loss, make_lm_head,
                                   make_norm, prefix_embedding_positions, rope_cache)


@dataclass
class MoEConfig(TransformerShape):
    family: str = "moe"
    vocab_size: int = 4096
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None = n_head (MHA)
    n_embd: int = 256
    head_dim: int | None = None  # None = n_embd // n_head
    mlp_hidden: int | None = None  # hidden size of each expert (and of dense FFNs); None = as in gpt.py
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    activation: str = "swiglu"
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    bias: bool = False
    dropout: float = 0.0
    init_std: float = 0.02
    n_expert: int = 8
    top_k: int = 2  # 1 = Switch, 2 = GShard / GLaM
    moe_every: int = 1  # layers N, 2N, ... are MoE, the others dense (GLaM and Switch use 2)
    capacity_factor: float = 1.25  # training; 0 = unlimited
    eval_capacity_factor: float = 0.0  # eval / inference; 0 = unlimited (no token is ever dropped)
    balance_loss_coef: float = 0.01
    z_loss_coef: float = 0.001

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (layer_idx + 1) % self.moe_every == 0

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layer))

    def validate(self) -> None:
        require(self.norm in NORMS, f"model.norm={self.norm!r}: choose one of {NORMS}")
        require(self.activation in ACTIVATIONS, f"model.activation={self.activation!r}: choose one of {ACTIVATIONS}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_expert", "moe_every"):
            require(getattr(self, name) >= 1, f"model.{name}={getattr(self, name)} must be >= 1")
        require(self.head_dim is not None or self.n_embd % self.n_head == 0,
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")
        require(self.n_head % self.kv_heads == 0,
                f"model.n_head={self.n_head} must be a multiple of model.n_kv_head={self.kv_heads}")
        require(self.dim_per_head % 2 == 0, "RoPE needs an even head dimension")
        require(self.top_k in (1, 2), f"model.top_k={self.top_k}: choose 1 (Switch) or 2 (GShard / GLaM)")
        require(self.top_k <= self.n_expert, f"model.top_k={self.top_k} needs at least that many experts "
                f"(model.n_expert={self.n_expert})")
        require(self.n_moe_layers >= 1, f"model.moe_every={self.moe_every} > model.n_layer={self.n_layer} "
                "leaves no MoE layer; lower model.moe_every")
        require(self.capacity_factor >= 0 and self.eval_capacity_factor >= 0,
                "model.capacity_factor and model.eval_capacity_factor must be >= 0 (0 = unlimited)")
        require(self.balance_loss_coef >= 0 and self.z_loss_coef >= 0, "MoE loss coefficients must be >= 0")
        require(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1)")


class MoEFeedForward(nn.Module):
    """Router + experts. forward(x (B, T, C)) -> (y (B, T, C), stats (4 + E,) float tensor).

    stats = [balance loss, z-loss, dropped assignments, total assignments, kept assignments per expert...]
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.n_expert, self.top_k = cfg.n_expert, cfg.top_k
        self.capacity_factor, self.eval_capacity_factor = cfg.capacity_factor, cfg.eval_capacity_factor
        self.router = nn.Linear(cfg.n_embd, cfg.n_expert, bias=False)
        self.experts = nn.ModuleList([MLP(cfg.n_embd, cfg.hidden_dim, cfg.activation, cfg.bias, cfg.dropout)
                                      for _ in range(cfg.n_expert)])

    def capacity(self, n_tokens: int) -> int:
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor <= 0:
            return n_tokens  # no limit: an expert can take every token
        return max(1, math.ceil(factor * self.top_k * n_tokens / self.n_expert))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        tokens = x.reshape(B * T, C)  # (N, C)
        N, E, K = B * T, self.n_expert, self.top_k
        # the router runs in fp32 even under autocast: its softmax decides discrete assignments
        logits = F.linear(tokens.float(), self.router.weight.float())  # (N, E)
        probs = logits.softmax(dim=-1)
        gates, experts = probs.topk(K, dim=-1)  # (N, K) each
        if K > 1:
            gates = gates / gates.sum(dim=-1, keepdim=True)

        # slot of each assignment in its expert's buffer, choice-major so first choices win
        expert_of = experts.t().reshape(K * N)  # (K*N,) [all first choices, then all second choices]
        one_hot = F.one_hot(expert_of, E)  # (K*N, E)
        slot = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1  # (K*N,)
        kept = slot < self.capacity(N)
        token_of = torch.arange(N, device=x.device).repeat(K)  # (K*N,)
        gate_of = gates.t().reshape(K * N)  # (K*N,)

        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            chosen = kept & (expert_of == e)
            idx = token_of[chosen]  # (n_e,)
            if idx.numel() == 0:
                continue
            y = expert(tokens.index_select(0, idx))  # (n_e, C)
            out.index_add_(0, idx, y * gate_of[chosen, None].to(y.dtype))

        first_choice_share = one_hot[:N].float().mean(dim=0)  # (E,) f_e
        balance = E * (first_choice_share * probs.mean(dim=0)).sum()
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        per_expert = (one_hot * kept[:, None]).sum(dim=0).float()  # (E,)
        dropped = (~kept).sum().float()
        stats = torch.cat([torch.stack([balance, z_loss, dropped, torch.tensor(float(K * N), device=x.device)]),
                           per_expert])  # (4 + E,)
        return out.view(B, T, C), stats


class Block(nn.Module):
    def __init__(self, cfg: MoEConfig, layer_idx: int):
        super().__init__()
        self.norm1 = make_norm(cfg.norm, cfg.n_embd, cfg.norm_eps, cfg.bias)
        self.attn = SelfAttention(cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.dim_per_head, layer_idx,
                                  cfg.bias, cfg.dropout)
        self.norm2 = make_norm(cfg.norm, cfg.n_embd, cfg.norm_eps, cfg.bias)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        if self.is_moe:
            self.moe = MoEFeedForward(cfg)
        else:
            self.mlp = MLP(cfg.n_embd, cfg.hidden_dim, cfg.activation, cfg.bias, cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | DocumentSpans | None, kv_cache=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.attn(self.norm1(x), rope, mask, kv_cache)
        if not self.is_moe:
            return x + self.mlp(self.norm2(x)), None
        y, stats = self.moe(self.norm2(x))
        return x + y, stats


class MoE(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.norm_f = make_norm(cfg.norm, cfg.n_embd, cfg.norm_eps, cfg.bias)
        self.lm_head = make_lm_head(self.tok_emb, tie=cfg.tie_embeddings)
        cos, sin = rope_cache(cfg.dim_per_head, cfg.block_size, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, head_dim)
        self.register_buffer("rope_sin", sin, persistent=False)
        # GPT-2 init as in gpt.py; every expert's down_proj counts as one residual sum of its layer
        init_weights(self, cfg.init_std, residual_sums=lambda name: 2 * cfg.n_layer)

    # ------------------------------------------------------------------ accounting
    def num_params(self, non_embedding: bool = False) -> int:
        """All parameters (every expert counts); see :meth:`num_active_params` for per-token compute."""
        return count_params(self, non_embedding)

    def num_active_params(self, non_embedding: bool = False) -> int:
        """Parameters one token passes through: the experts it is not routed to do not count."""
        cfg = self.config
        first_moe = next(b.moe for b in self.blocks if b.is_moe)
        expert_params = sum(p.numel() for p in first_moe.experts[0].parameters())
        idle = (cfg.n_expert - cfg.top_k) * expert_params * cfg.n_moe_layers
        return self.num_params(non_embedding) - idle

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token with *active* parameters: 6 * (active matmul params) + attention.

        Same accounting as GPT.flops_per_token; the router matmul is included, the experts a token
        is not routed to are not (capacity drops make the true figure slightly lower).
        """
        cfg = self.config
        matmul_params = self.num_active_params(non_embedding=True) + \
            (cfg.vocab_size * cfg.n_embd if cfg.tie_embeddings else 0)
        return 6 * matmul_params + 12 * cfg.n_layer * cfg.n_head * cfg.dim_per_head * seq_len

    # ------------------------------------------------------------------ forward
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, kv_cache=None, logits_to_keep: int = 0,
                return_hidden: bool = False, return_aux: bool = False, document_ids: torch.Tensor | None = None,
                prefix_embeddings: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None] | tuple[torch.Tensor, torch.Tensor | None, dict]:
        """idx (B, T) -> (logits (B, T', V), lm_loss | None), plus ``aux`` when return_aux.

        The returned loss is the plain cross-entropy (comparable with dense models); the
        auxiliary losses are in ``aux["loss"]`` and the objective adds them while training.
        document_ids (B, T) keep attention inside each sequence of a packed row (not with a KV cache).
        prefix_embeddings (1 or B, P, C) go before the tokens as in GPT.forward (prompt tuning); the router sees
        them too, and the logits and loss cover the T tokens only.
        """
        check_document_ids(document_ids, idx, kv_cache)
        if prefix_embeddings is not None:
            positions = prefix_embedding_positions(prefix_embeddings, idx, self.config.n_embd, positions=positions,
                                                   kv_cache=kv_cache, document_ids=document_ids)  # (B, P + T)
        elif positions is None:
            positions = default_positions(idx, kv_cache)  # (B, T)
        check_positions(positions, self.config.block_size)
        x = self.tok_emb(idx)  # (B, T, C)
        if prefix_embeddings is not None:
            x = torch.cat([prefix_embeddings.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)  # (B, P + T, C)
        x = self.drop(x)
        p = positions.clamp(min=0)
        rope = (self.rope_cos[p][:, None], self.rope_sin[p][:, None])  # (B, 1, T, D) each
        mask = None  # plain causal: SDPA's fused kernel
        if kv_cache is not None:
            mask = attention_mask(positions, kv_cache.prepare(positions))  # (B, 1, T, S)
        elif document_ids is not None:  # causal spans when the rows are plain concatenations, else a mask
            mask = document_spans(positions, document_ids)
            if mask is None:
                mask = attention_mask(positions, positions, document_ids=document_ids)  # (B, 1, T, T)
        layer_stats = []
        for block in self.blocks:
            x, stats = block(x, rope, mask, kv_cache)
            if stats is not None:
                layer_stats.append(stats)
        x = self.norm_f(x)
        if prefix_embeddings is not None:
            x = x[:, prefix_embeddings.shape[1]:]  # (B, T, C): the virtual positions predict nothing
        if return_hidden:
            return x, None
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)  # (B, T', V)
        loss = lm_loss(logits, targets) if targets is not None else None
        if not return_aux:
            return logits, loss
        stats = torch.stack(layer_stats).mean(dim=0)  # (4 + E,) averaged over MoE layers
        aux_loss = self.config.balance_loss_coef * stats[0] + self.config.z_loss_coef * stats[1]
        return logits, loss, {"loss": aux_loss, "stats": stats}


def routing_metrics(stats: torch.Tensor) -> dict[str, float]:
    """Loggable floats from ``aux["stats"]`` with one device sync; every figure is a per-MoE-layer average.

    moe_balance_loss (1.0 = perfectly balanced), moe_z_loss, moe_dropped_tokens (assignments over
    capacity), moe_dropped_frac, and moe_expert_<e>: expert e's share of the kept assignments
    (1/E each when utilisation is even).
    """
    balance, z_loss, dropped, assignments, *per_expert = stats.detach().float().tolist()
    kept = max(sum(per_expert), 1e-9)
    metrics = {"moe_balance_loss": balance, "moe_z_loss": z_loss, "moe_dropped_tokens": dropped,
               "moe_dropped_frac": dropped / max(assignments, 1e-9)}
    for e, count in enumerate(per_expert):
        metrics[f"moe_expert_{e}"] = count / kept
    return metrics
