"""Preference objectives: DPO (and its IPO / robust / conservative variants) and the Bradley–Terry reward loss.

    objective = dpo_objective(DPOLoss(beta=0.1, kind="sigmoid"), precomputed_reference)
    loss, metrics = objective(policy, batch)          # batch from lmstack.data.preference.collate_pairs
    objective = reward_objective(center_coef=0.01)    # for a ScalarHeadModel (lmstack.models.heads)

Batches hold chosen rows then rejected rows, (2B, T) each (``input_ids``, ``attention_mask``,
``completion_mask``), so one forward pass scores both completions. :func:`completion_logps` is
log pi(y | x) summed over the completion's trained tokens only: the backbone runs once for its final hidden
states and the output head is applied only at the positions that predict a completion token (the prompt's
logits are never formed), which a test pins to the plain full-logits sum. A pair's two rows share their
prompt, so for an lmstack GPT (:func:`lmstack.train.shared_prompt.supports_shared_prompt`) the prompt runs
once per pair and both completions attend to its keys and values (lmstack.train.shared_prompt): the same
log-probabilities and gradients (tests pin both) for about half the prompt's work.

DPO (Rafailov et al., 2023), with h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)):

- ``sigmoid``: -(1 - e) log sigma(beta h) - e log sigma(-beta h); e = ``label_smoothing`` is the
  conservative DPO of Mitchell (2023) (labels flipped with probability e); e = 0 is the paper's loss;
- ``robust``: ((1 - e) (-log sigma(beta h)) - e (-log sigma(-beta h))) / (1 - 2e), the unbiased loss under
  label noise e of Chowdhury et al. (2024);
- ``ipo``: (h - 1 / (2 beta))^2 (Azar et al., 2023), on summed log-probabilities as the paper writes it
  (TRL averages them over tokens for IPO; the two differ by the completion lengths).

Chosen-likelihood term (``sft_weight`` = alpha > 0): each pair's loss adds alpha * (-log pi(y_w|x) / |y_w|),
the negative log-likelihood of the chosen completion per completion token: the RPO objective of Pang et al.
(2024) and TRL's ``rpo_alpha`` (both normalise the NLL by length; Pang et al. count the prompt's tokens too,
TRL and this module only the completion's). DPO alone only widens the *gap* h; when chosen and rejected share
tokens (a rambling rejected reply that contains the right answer) pushing the rejected one down drags the
chosen one with it, so both log-probabilities fall and greedy decoding gets worse while the preference accuracy
rises. The NLL term anchors the chosen completion. alpha = 0 is plain DPO; it applies to every ``kind``.

The implicit rewards are beta (log pi - log ref) per completion; the metrics are their batch means
(``reward_chosen``, ``reward_rejected``), ``reward_margin``, ``reward_accuracy`` (the share of pairs whose chosen
reward is higher) and the policy's mean summed log-probabilities. The reference log-probabilities come from a
:data:`ReferenceFn`: a frozen copy (:func:`frozen_reference`), the policy itself with its LoRA adapters
switched off (:func:`adapters_off_reference`, no copy), or the batch's ``ref_logps`` precomputed in one pass
(:func:`precomputed_reference`). ``tokens`` counts the real (unpadded) tokens of the batch. At step 0 the
policy is the reference, h = 0 and the sigmoid loss is ln 2 (plus the NLL term when ``sft_weight`` > 0).

Reward model (Bradley–Terry, as in InstructGPT): r = the scalar head's value at each row's last real token,
loss = -log sigma(r_w - r_l) + ``center_coef`` * mean((r_w + r_l)^2), the centring term of Eisenstein et al.
(2023) that keeps rewards near zero. Metrics: ``accuracy``, ``margin``, ``reward_chosen``, ``reward_rejected``.
Both objectives set ``judge_spikes=False``: their losses are not language-model losses.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmstack.devices import unwrap_model
from lmstack.errors import ConfigError
from lmstack.models.heads import score_at_last
from lmstack.models.peft import lora_modules
from lmstack.train.losses import Batch, Objective
from lmstack.train.parallel import holds_shards
from lmstack.train.shared_prompt import response_logprobs, supports_shared_prompt

DPO_LOSSES = ("sigmoid", "ipo", "robust")
ReferenceFn = Callable[[nn.Module, Batch], torch.Tensor]  # (policy, batch) -> reference log-probs (2B,)


@dataclass(frozen=True)
class DPOLoss:
    beta: float = 0.1
    kind: str = "sigmoid"  # sigmoid | ipo | robust
    label_smoothing: float = 0.0  # e: the share of labels assumed flipped (sigmoid, robust)
    sft_weight: float = 0.0  # alpha: weight of the chosen completion's per-token NLL (RPO); 0 = plain DPO


def completion_logps(model: nn.Module, batch: Batch, shared_prompt: bool = True) -> torch.Tensor:
    """Summed log-probabilities (2B,) of each row's completion tokens (``completion_mask``) under ``model``.

    The head is applied only where position t predicts a completion token t + 1; rows are right-padded, so
    the causal model's real tokens never see the padding. With ``shared_prompt`` (and a model that supports
    it) each distinct prompt runs once (module docstring); otherwise every row runs in full. A model sharded
    by FSDP2 or tensor parallelism (DTensor parameters) computes every position's logits in its own forward
    instead: outside that forward FSDP2 has resharded the head and TP hands back sharded hidden states."""
    input_ids, completion = batch["input_ids"], batch["completion_mask"]
    targets = completion[:, 1:].bool()  # (2B, T-1): position t predicts token t+1
    sharded = holds_shards(model)
    if shared_prompt and not sharded and supports_shared_prompt(model) and bool(targets.any(dim=1).all()):
        # the response: from the first completion token to the last real one (one run per row)
        T = input_ids.shape[1]
        first = targets.float().argmax(dim=1)  # (2B,) action column of the first completion token
        end = batch["attention_mask"].sum(dim=1) - 1  # (2B,) action columns stop before the last real token
        columns = torch.arange(T - 1, device=input_ids.device)[None, :]  # (1, T-1)
        response = ((columns >= first[:, None]) & (columns < end[:, None])).long()  # (2B, T-1)
        logprobs, _ = response_logprobs(model, input_ids, response, entropy=False)  # (2B, T-1)
        return (logprobs * targets).sum(dim=1)  # (2B,)
    if sharded:
        logits = model(input_ids)[0][:, :-1].float()  # (2B, T-1, V)
        token_logps = logits.log_softmax(dim=-1).gather(2, input_ids[:, 1:, None]).squeeze(2)  # (2B, T-1)
        return (token_logps * targets).sum(dim=1)  # (2B,)
    hidden, _ = model(input_ids, return_hidden=True)  # (2B, T, C)
    rows, cols = targets.nonzero(as_tuple=True)  # (N,) each: the positions that predict a completion token
    head = unwrap_model(model).lm_head
    logits = head(hidden[rows, cols]).float()  # (N, V)
    token_logps = logits.gather(1, input_ids[rows, cols + 1][:, None]).squeeze(1) - logits.logsumexp(dim=1)  # (N,)
    return torch.zeros(input_ids.shape[0], device=logits.device).index_add(0, rows, token_logps)  # (2B,)


def dpo_losses(policy: torch.Tensor, reference: torch.Tensor, loss: DPOLoss, lengths: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """policy, reference (2B,) summed log-probs, chosen rows first -> (losses (B,), chosen rewards (B,),
    rejected rewards (B,)); the rewards are beta (log pi - log ref), detached. ``lengths`` (2B,) are the
    completions' token counts, needed when ``loss.sft_weight`` > 0 (the chosen NLL is per token)."""
    B = policy.shape[0] // 2
    ratios = policy - reference  # (2B,)
    h = ratios[:B] - ratios[B:]  # (B,)
    beta, e = loss.beta, loss.label_smoothing
    if loss.kind == "sigmoid":
        losses = -(1 - e) * F.logsigmoid(beta * h) - e * F.logsigmoid(-beta * h)
    elif loss.kind == "robust":
        losses = ((1 - e) * -F.logsigmoid(beta * h) - e * -F.logsigmoid(-beta * h)) / (1 - 2 * e)
    elif loss.kind == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ConfigError(f"dpo.loss={loss.kind!r}: choose one of {', '.join(DPO_LOSSES)}")
    if loss.sft_weight:
        if lengths is None:
            raise ConfigError("dpo.sft_weight > 0 needs the completions' token counts (pass lengths)")
        losses = losses + loss.sft_weight * -policy[:B] / lengths[:B].clamp(min=1).to(policy.dtype)
    rewards = beta * ratios.detach()
    return losses, rewards[:B], rewards[B:]


def dpo_objective(loss: DPOLoss, reference: ReferenceFn) -> Objective:
    """The DPO objective (module docstring) with reference log-probs from ``reference``."""

    def objective(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        policy = completion_logps(model, batch)  # (2B,)
        ref = reference(model, batch).to(policy.device, policy.dtype)  # (2B,)
        lengths = batch["completion_mask"][:, 1:].sum(dim=1)  # (2B,) the tokens completion_logps sums over
        losses, chosen, rejected = dpo_losses(policy, ref, loss, lengths)
        B = chosen.shape[0]
        stats = torch.stack([chosen.mean(), rejected.mean(), (chosen - rejected).mean(),
                             (chosen > rejected).float().mean(), policy[:B].mean().detach(),
                             policy[B:].mean().detach()]).tolist()  # one device sync
        names = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "logps_chosen",
                 "logps_rejected")
        return losses.mean(), {**dict(zip(names, stats)), "tokens": int(batch["attention_mask"].sum())}

    return Objective(objective, judge_spikes=False)


def precomputed_reference(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The batch's ``ref_logps`` (2B,), written by one pass of the reference before training."""
    if "ref_logps" not in batch:
        raise ConfigError("dpo.reference=precomputed but the batch carries no ref_logps; compute them first "
                          "(lmstack.stages.dpo does) or use dpo.reference=copy")
    return batch["ref_logps"]


def frozen_reference(reference_model: nn.Module) -> ReferenceFn:
    """Reference log-probs from a frozen copy of the starting model (moved to the batch's device on first use)."""
    reference_model.eval().requires_grad_(False)

    @torch.no_grad()
    def reference(model: nn.Module, batch: Batch) -> torch.Tensor:
        device = batch["input_ids"].device
        if next(reference_model.parameters()).device != device:
            reference_model.to(device)
        return completion_logps(reference_model, batch)

    return reference


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """The LoRA adapters of ``model`` contribute nothing inside the block (scaling 0: the output is exactly the
    base layer's), and dropout is off; both come back afterwards."""
    layers = list(lora_modules(unwrap_model(model)).values())
    scalings = [layer.scaling for layer in layers]
    was_training = model.training
    try:
        for layer in layers:
            layer.scaling = 0.0
        model.eval()
        yield
    finally:
        for layer, scaling in zip(layers, scalings):
            layer.scaling = scaling
        model.train(was_training)


@torch.no_grad()
def adapters_off_reference(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Reference log-probs from the policy itself with its LoRA adapters switched off: the frozen base model."""
    if not lora_modules(unwrap_model(model)):
        raise ConfigError("the adapters-off reference needs a model with LoRA adapters (lmstack dpo --lora)")
    with adapters_off(model):
        return completion_logps(model, batch)


def reward_objective(center_coef: float = 0.0) -> Objective:
    """The Bradley–Terry objective for a scalar-head model (module docstring)."""

    def objective(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        mask = batch["attention_mask"]
        scores = score_at_last(model(batch["input_ids"], mask), mask)  # (2B,)
        B = scores.shape[0] // 2
        chosen, rejected = scores[:B], scores[B:]
        loss = -F.logsigmoid(chosen - rejected).mean()
        if center_coef:
            loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
        stats = torch.stack([(chosen > rejected).float().mean(), (chosen - rejected).mean(), chosen.mean(),
                             rejected.mean()]).detach().tolist()
        names = ("accuracy", "margin", "reward_chosen", "reward_rejected")
        return loss, {**dict(zip(names, stats)), "tokens": int(mask.sum())}

    return Objective(objective, judge_spikes=False)
