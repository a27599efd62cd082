"""Response log-probs of RL rollouts with each distinct prompt run once: the GRPO update's fast path (and
DPO's: a pair's chosen and rejected completions share their prompt, lmstack.train.preference_losses).

    logprobs, entropy = response_logprobs(model, input_ids, response_mask, temperature)   # each (N, T-1)

A GRPO rollout holds ``group_size`` samples of every prompt, and the plain update runs every row in full:
the prompt's tokens go through the model once per sample, and the output head forms the logits of every
position, prompt and padding included. Here the rows are split at their first response token, each
*distinct* prompt (found by its tokens, so a shuffled minibatch still shares) runs once, with gradients,
and its keys and values per layer are handed to the responses through the models' KV-cache protocol
(lmstack/models/layers.py), the way the engine forks one prefill ``n`` ways. The output head and the
log-softmax then run at response positions only. The result is the plain path's
(:func:`lmstack.train.rl_losses.token_logprobs` over ``model(input_ids)``) on every response position, and 0
elsewhere, where every loss masks it away: gradients reach the shared prompt from all its samples (autograd
sums them over the expanded keys and values), so the loss and its gradients equal the plain path's up to
float rounding (tests/test_stages_grpo.py pins both).

Work saved per distinct prompt of length ``P`` with ``G`` samples: ``(G - 1) * P`` token positions of the
forward and backward, and the head on every non-response position. Prompts are left-padded to the longest
prompt (padding has position -1, as in the engine) and responses right-padded to the longest response.

Used when the model allows it (:func:`supports_shared_prompt`: an lmstack ``GPT``, directly or under
DDP / torch.compile / LoRA, whose head can run outside its forward); anything else (MoE, prompt/prefix
tuning, FSDP2 or tensor-parallel shards) takes the plain path. Caveat: with dropout > 0 the prompt's
dropout mask is shared by its samples here, drawn per row on the plain path (same distribution per row).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.devices import unwrap_model
from lmstack.models.gpt import GPT
from lmstack.train.losses import output_head
from lmstack.train.rl_losses import token_logprobs


def supports_shared_prompt(model: nn.Module) -> bool:
    """True when :func:`response_logprobs` can run ``model``: an lmstack GPT whose head is reachable."""
    return isinstance(unwrap_model(model), GPT) and output_head(model) is not None


class _RecordingCache:
    """The KV-cache protocol over one whole forward: hands each layer its own keys and values back and keeps
    them (with their autograd history) for the responses."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def prepare(self, positions: torch.Tensor) -> torch.Tensor:
        return positions  # (B, T): the keys are this pass's tokens

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys.append(k)
        self.values.append(v)
        return k, v


class _PromptPrefix:
    """The KV-cache protocol for the response pass: row i attends to its prompt's recorded keys and values
    (prompt ``group[i]``) before its own."""

    def __init__(self, recorded: _RecordingCache, prompt_positions: torch.Tensor, group: torch.Tensor):
        self.recorded, self.group = recorded, group
        self.prompt_positions = prompt_positions.index_select(0, group)  # (N, Lp)

    def prepare(self, positions: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.prompt_positions, positions], dim=1)  # (N, Lp + Lr)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prompt_k = self.recorded.keys[layer_idx].index_select(0, self.group)  # (N, H_kv, Lp, D)
        prompt_v = self.recorded.values[layer_idx].index_select(0, self.group)
        return torch.cat([prompt_k, k], dim=2), torch.cat([prompt_v, v], dim=2)  # (N, H_kv, Lp + Lr, D)


def response_logprobs(model: nn.Module, input_ids: torch.Tensor, response_mask: torch.Tensor,
                      temperature: float = 1.0, *, entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """input_ids (N, T) right-padded prompt + response rows, response_mask (N, T-1) in action space (one
    contiguous run of ones per row, at least one) -> (log p(token t+1 | prefix) with gradient, entropy without),
    each (N, T-1), of ``softmax(logits / temperature)``; 0 outside the response (module docstring). With
    ``entropy=False`` the entropy is not computed (None)."""
    N, T = input_ids.shape
    device = input_ids.device
    lengths = response_mask.sum(1).long()  # (N,) response tokens per row
    if int(lengths.min()) < 1:
        raise ValueError("every row needs at least one response token")
    starts = response_mask.argmax(1) + 1  # (N,) index of each row's first response token
    # distinct prompts by their tokens; group[i] is row i's
    distinct: dict[tuple[int, ...], int] = {}
    rows_ids = input_ids.tolist()
    group_list = [distinct.setdefault(tuple(row[:start]), len(distinct))
                  for row, start in zip(rows_ids, starts.tolist())]
    group = torch.tensor(group_list, device=device)
    Lp = max(map(len, distinct))
    prompt_ids = torch.zeros(len(distinct), Lp, dtype=torch.long, device=device)
    prompt_positions = torch.full((len(distinct), Lp), -1, dtype=torch.long, device=device)
    for prompt, p in distinct.items():  # left-padded: the last column is every prompt's last token
        prompt_ids[p, Lp - len(prompt):] = torch.tensor(prompt, device=device)
        prompt_positions[p, Lp - len(prompt):] = torch.arange(len(prompt), device=device)
    recorded = _RecordingCache()
    prompt_hidden, _ = model(prompt_ids, positions=prompt_positions, kv_cache=recorded, return_hidden=True)
    # the responses, right-padded, continuing their prompt's positions (padding at -1)
    Lr = int(lengths.max())
    offsets = torch.arange(Lr, device=device)  # (Lr,)
    real = offsets[None, :] < lengths[:, None]  # (N, Lr)
    columns = (starts[:, None] + offsets[None, :]).clamp(max=T - 1)  # (N, Lr) token index in input_ids
    response_ids = torch.where(real, input_ids.gather(1, columns), 0)  # (N, Lr)
    response_positions = torch.where(real, columns, -1)  # (N, Lr): a token's position is its index
    response_hidden, _ = model(response_ids, positions=response_positions,
                               kv_cache=_PromptPrefix(recorded, prompt_positions, group), return_hidden=True)
    # response token j is predicted by the prompt's last position (j = 0) or by response position j - 1
    predicting = torch.cat([prompt_hidden[:, -1].index_select(0, group)[:, None], response_hidden[:, :-1]],
                           dim=1)  # (N, Lr, C)
    rows, js = real.nonzero(as_tuple=True)  # (M,) each: the response tokens
    logits = output_head(model)(predicting[rows, js]).float() / temperature  # (M, V)
    log_probs = F.log_softmax(logits, dim=-1)
    chosen = log_probs.gather(1, response_ids[rows, js][:, None]).squeeze(1)  # (M,)
    action_columns = starts[rows] - 1 + js  # column t scores token t + 1
    logprobs = torch.zeros(N, T - 1, device=device, dtype=chosen.dtype).index_put((rows, action_columns), chosen)
    if not entropy:
        return logprobs, None
    with torch.no_grad():  # logged, not trained on
        entropies = torch.zeros(N, T - 1, device=device, dtype=chosen.dtype)
        entropies[rows, action_columns] = -(log_probs.exp() * log_probs).sum(-1)
    return logprobs, entropies


def rollout_logprobs(model: nn.Module, input_ids: torch.Tensor, response_mask: torch.Tensor,
                     temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`response_logprobs` where the model allows it, else the plain full forward
    (:func:`~lmstack.train.rl_losses.token_logprobs`); the same numbers on response positions either way."""
    if supports_shared_prompt(model):
        return response_logprobs(model, input_ids, response_mask, temperature)
    return token_logprobs(model(input_ids)[0], input_ids, temperature)
