"""Policy-gradient losses for RL on language models: GRPO, REINFORCE and PPO, as pure tensor functions.

    advantages = group_advantages(rewards, group_size=8, scale_std=True)          # GRPO, (N,)
    loss, stats = clipped_policy_loss(logprobs, old_logprobs, advantages[:, None], mask,
                                      clip_low=0.2, clip_high=0.28, loss_norm="token")
    advantages, returns = gae(token_rewards, values, mask, gamma=1.0, lam=0.95)   # PPO, (N, T)

Every per-token tensor here is laid out in *action space*: ``(N, T-1)`` where column ``t`` scores the
token at position ``t + 1`` of the sequence (the one predicted from the prefix up to ``t``), and ``mask``
is 1 on response tokens. :func:`token_logprobs` produces that layout from a model's logits.

Choices, with their sources:

* group advantages (GRPO, Shao et al. 2024): ``(r - mean_group) / (std_group + eps)``; ``scale_std=False``
  drops the division (Dr. GRPO, Liu et al. 2025, argues the std scaling biases toward easy and hard
  groups). REINFORCE with a group-mean baseline is ``r - mean_group`` with no ratio and no clipping.
* the clipped surrogate (PPO, Schulman et al. 2017) with separate low/high clip ranges (DAPO's
  "clip-higher", Yu et al. 2025): per token ``-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)``.
* loss normalisations (:data:`LOSS_NORMS`): ``sequence`` averages each sequence's tokens then the
  sequences (GRPO as published), ``token`` averages all response tokens of the batch at once (DAPO),
  ``dr_grpo`` sums the tokens and divides by ``N * max_tokens``, a constant (Dr. GRPO), so a sequence's
  weight does not depend on its length.
* KL estimators between the policy and the reference (Schulman, "Approximating KL divergence"):
  k1 = ``logp - logp_ref`` (unbiased, can be negative) and k3 = ``exp(logp_ref - logp) - (logp_ref - logp) - 1``
  (unbiased, always >= 0; GRPO's choice, in the loss). PPO-RLHF puts the KL into the per-token reward.
* GAE (Schulman et al. 2016) over each response; whitening with the batch mean and std of response tokens.
* the adaptive KL controller of Ziegler et al. 2019: ``beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon``.

The clip fraction is the share of response tokens whose clipped term was the minimum and differs from
the unclipped one (their gradient is zero): ``A > 0 and ratio > 1 + eps_high`` or ``A < 0 and ratio < 1 - eps_low``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_NORMS = ("sequence", "token", "dr_grpo")
KL_ESTIMATORS = ("k1", "k3")


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, T, V), input_ids (N, T) -> (log p(token t+1 | prefix), entropy without gradient), each (N, T-1).

    The distribution is ``softmax(logits / temperature)`` over the whole vocabulary: never the top-k /
    top-p filtered one a sampler draws from, so the ratio of two policies is defined on every token."""
    logits = logits[:, :-1].float() / temperature  # (N, T-1, V)
    log_probs = F.log_softmax(logits, dim=-1)
    chosen = log_probs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (N, T-1)
    with torch.no_grad():  # logged, not trained on
        entropy = -(log_probs.exp() * log_probs).sum(-1)  # (N, T-1)
    return chosen, entropy


def group_advantages(rewards: torch.Tensor, group_size: int, scale_std: bool = True, eps: float = 1e-6
                     ) -> torch.Tensor:
    """rewards (N,) in groups of ``group_size`` consecutive samples of one prompt -> advantages (N,)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.view(-1, group_size).float()  # (P, G)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_std:
        # the unbiased std (torch's default), as GRPO's reference implementations use
        centred = centred / (groups.std(dim=1, keepdim=True) + eps) if group_size > 1 else centred * 0
    return centred.reshape(-1)


def normalise(per_token: torch.Tensor, mask: torch.Tensor, loss_norm: str, max_tokens: int | None = None
              ) -> torch.Tensor:
    """Reduce a per-token loss (N, T-1) over the response tokens (``mask``) as ``loss_norm`` says."""
    mask = mask.to(per_token.dtype)
    if loss_norm == "sequence":
        per_sequence = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)  # (N,)
        return per_sequence.mean()
    if loss_norm == "token":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    if loss_norm == "dr_grpo":
        if not max_tokens:
            raise ValueError("loss_norm='dr_grpo' needs max_tokens, the constant it divides by")
        return (per_token * mask).sum() / (per_token.shape[0] * max_tokens)
    raise ValueError(f"loss_norm={loss_norm!r}: choose one of {', '.join(LOSS_NORMS)}")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs, (N, T-1)."""
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        log_ratio = ref_logprobs - logprobs
        return log_ratio.exp() - log_ratio - 1
    raise ValueError(f"kl estimator {estimator!r}: choose one of {', '.join(KL_ESTIMATORS)}")


@dataclass
class PolicyLossStats:
    clip_fraction: float  # share of response tokens with a zero (clipped) gradient
    ratio_mean: float  # mean probability ratio over response tokens (1 on the first pass over a rollout)


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip_low: float, clip_high: float, loss_norm: str,
                        max_tokens: int | None = None, extra_per_token: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, PolicyLossStats]:
    """The clipped surrogate, per token, reduced by ``loss_norm``; ``advantages`` (N, T-1) or (N, 1).

    ``extra_per_token`` (e.g. ``beta * k3``) is added to each token's loss before the reduction."""
    ratio = torch.exp(logprobs - old_logprobs)  # (N, T-1)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    if extra_per_token is not None:
        per_token = per_token + extra_per_token
    loss = normalise(per_token, mask, loss_norm, max_tokens)
    with torch.no_grad():
        active = mask.bool()
        was_clipped = ((advantages > 0) & (ratio > 1 + clip_high)) | ((advantages < 0) & (ratio < 1 - clip_low))
        count = max(int(active.sum()), 1)
        stats = PolicyLossStats(clip_fraction=float((was_clipped & active).sum()) / count,
                                ratio_mean=float(ratio[active].sum()) / count)
    return loss, stats


def reinforce_loss(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, loss_norm: str,
                   max_tokens: int | None = None, extra_per_token: torch.Tensor | None = None) -> torch.Tensor:
    """REINFORCE: ``-A * log p`` per token (no ratio, no clipping), reduced by ``loss_norm``."""
    per_token = -advantages * logprobs
    if extra_per_token is not None:
        per_token = per_token + extra_per_token
    return normalise(per_token, mask, loss_norm, max_tokens)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's response tokens -> (advantages, returns), (N, T-1).

    rewards, values, mask (N, T-1) in action space; a row's response is one contiguous run of ones in
    ``mask``. The value after the last response token is 0 (the episode ends there)."""
    N, T = rewards.shape
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    running = torch.zeros(N, dtype=values.dtype, device=values.device)
    next_value = torch.zeros(N, dtype=values.dtype, device=values.device)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        running = running * mask[:, t]  # outside the response: nothing carries back into the prompt
        advantages[:, t] = running
        next_value = values[:, t] * mask[:, t]
    returns = advantages + values * mask
    return advantages, returns


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise to unit variance (and zero mean when ``shift_mean``) over the masked entries; 0 elsewhere."""
    mask = mask.to(values.dtype)
    count = mask.sum().clamp(min=1)
    mean = (values * mask).sum() / count
    variance = (((values - mean) * mask) ** 2).sum() / (count - 1).clamp(min=1)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: float) -> tuple[torch.Tensor, float]:
    """PPO's value loss ``0.5 * max((v - R)^2, (clip(v, v_old +- clip) - R)^2)`` averaged over response
    tokens -> (loss, share of tokens where the clipped error was the larger)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    error, error_clipped = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * normalise(torch.maximum(error, error_clipped), mask, "token")
    active = mask.bool()
    fraction = float(((error_clipped > error) & active).sum()) / max(int(active.sum()), 1)
    return loss, fraction


class KLController:
    """The KL coefficient beta: fixed, or adaptive toward ``target`` (Ziegler et al. 2019).

    ``update(kl, n)`` after each rollout of ``n`` sequences whose mean per-sequence KL was ``kl``."""

    def __init__(self, beta: float, target: float | None = None, horizon: int = 10000):
        self.beta, self.target, self.horizon = float(beta), target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None or not math.isfinite(kl):
            return
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.beta *= 1 + error * n / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.beta = float(state["beta"])
