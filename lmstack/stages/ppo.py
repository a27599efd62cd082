"""`lmstack ppo`: PPO-RLHF (Ziegler et al. 2019; Ouyang et al. 2022) with rollouts from lmstack's own engine.

    lmstack reward --model runs/sft/model --data pairs.jsonl --out runs/rm
    lmstack ppo --model runs/sft/model --reward runs/rm --prompts prompts.jsonl --out runs/ppo train.max_steps=200
    lmstack ppo --model runs/sft/model --reward module:lmstack.data.verifiable:reward --prompts p.jsonl --out runs/p \\
        ppo.kl_coef=0.1 ppo.kl_target=6 ppo.kl_estimator=k3

What is done, exactly:

* **Policy and value model.** The policy starts from MODEL. The value model is a *separate* backbone, a copy
  of MODEL's weights with a zero-initialised scalar head (lmstack.models.heads.ScalarHeadModel): one value per
  token. Separate, so the value loss does not pull on the policy's features (it costs a second model's
  memory and compute). Both train together in one optimizer, one loop step per minibatch. A frozen copy of
  MODEL is the reference for the KL penalty. With ``--lora`` both backbones get LoRA adapters (the value head
  trains fully); OUT/adapter and OUT/model are the policy's, as in ``lmstack sft --lora``.
* **Rollout** (lmstack/train/rollout.py): ``ppo.prompts_per_rollout`` prompts, one sample each, from the
  *current* policy weights through the engine; behaviour log-probs, reference log-probs and values from
  one batched forward each (unfiltered distribution at ``ppo.temperature``).
* **Reward per token**: ``-beta * KL_t`` on every response token, with KL_t the k1 (``logp - logp_ref``,
  default) or k3 estimate (``ppo.kl_estimator``), plus the sequence's reward (reward model, task or
  function, as in ``lmstack grpo``) on its last token. ``beta`` is fixed (``ppo.kl_coef``) or adaptive toward
  ``ppo.kl_target`` nats per sequence (Ziegler et al.'s proportional controller, ``ppo.kl_horizon``); its
  state is saved with every checkpoint.
* **Advantages**: GAE (``ppo.gamma``, ``ppo.lam``) over each response with the rollout's values and 0 after
  the last token; returns = advantages + values; advantages whitened over the rollout's response tokens
  (``ppo.whiten_advantages``).
* **Losses** (lmstack/train/rl_losses.py): clipped policy ratio (``ppo.clip``), averaged over response
  tokens, plus ``ppo.vf_coef`` x the clipped value loss (``ppo.value_clip`` around the rollout's values).
  ``ppo.epochs`` passes of ``ppo.minibatches`` minibatches per rollout (one loop step each).
* **Metrics**: ``reward`` (the sequence reward), ``kl`` (mean per-sequence KL to the reference, the chosen
  estimator), ``beta``, ``response_length``, and per minibatch ``entropy``, ``clip_fraction``, ``value_loss``,
  ``value_clip_fraction``, ``kl_old``; validation answers held-out prompts greedily (``val_reward``).
  OUT/rl.png plots them. Resume after a kill is exact (buffer, position, KL controller, optimizer, RNG).

Not done: no entropy bonus, no reward whitening or clipping, no early stop on a KL threshold per minibatch,
no value model initialised from the reward model (it starts from the policy), no shared-backbone variant,
and rollouts alternate with training in one process (no separate generation server).
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmstack.checkpoint import model_state, read_config, save_checkpoint
from lmstack.config import PPOConfig, RunConfig
from lmstack.engine import SamplingParams
from lmstack.stages.grpo import (
    PromptSource,
    RewardFn,
    build_policy,
    carried_stats,
    finish_rl_run,
    load_prompts,
    lora_config,
    resolve_reward,
    rl_run_config,
    rollout_stats,
    sampling_params,
    score_samples,
    scorer_device,
    task_prompts,
)


class PolicyAndValue(nn.Module):
    """The trained module: ``policy`` (the decoder) and ``value`` (a ScalarHeadModel on its own backbone).

    ``forward(input_ids)`` returns (policy logits (N, T, V), values (N, T)), so DDP sees one forward."""

    def __init__(self, policy: nn.Module, value: nn.Module):
        super().__init__()
        self.policy, self.value = policy, value
        self.config = policy.config

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, _ = self.policy(input_ids)
        return logits, self.value(input_ids)  # right padding: a causal model's real tokens never see it


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """mask (N, T-1) of contiguous ones per row -> (N,) the column of each row's last one."""
    columns = torch.arange(mask.shape[1]).expand_as(mask)
    return torch.where(mask.bool(), columns, -1).max(dim=1).values


class PPOCollector:
    """Makes PPO rollouts (lmstack.train.rollout.Collector) and greedy validation batches."""

    def __init__(self, sampler: Any, model: PolicyAndValue, tokenizer: Any, prompts: PromptSource, reward: RewardFn,
                 cfg: PPOConfig, reference: nn.Module):
        from lmstack.train.rl_losses import KLController

        self.sampler, self.model, self.tokenizer, self.prompts = sampler, model, tokenizer, prompts
        self.reward, self.cfg, self.reference = reward, cfg, reference
        self.kl = KLController(cfg.kl_coef, cfg.kl_target or None, cfg.kl_horizon)

    def _encode(self, records: list[dict[str, Any]]) -> list[list[int]]:
        from lmstack.train.rollout import render_prompt

        return [render_prompt(self.tokenizer, r["prompt"]) for r in records]

    @torch.no_grad()
    def _values(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The value model's values (N, T-1) in action space, eval mode (restored)."""
        value = self.model.value
        training = value.training
        value.eval()
        try:
            return value(input_ids.to(scorer_device(value)))[:, :-1].float().cpu()
        finally:
            value.train(training)

    def collect(self, index: int) -> dict[str, torch.Tensor]:
        from lmstack.train.rl_losses import gae, kl_estimate, whiten
        from lmstack.train.rollout import rollout_seed, sequence_logprobs

        cfg = self.cfg
        records = self.prompts.block(index, cfg.prompts_per_rollout)
        seeds = [rollout_seed(cfg.seed, index, i) + self.prompts.rank * 7919 for i in range(len(records))]
        rollout = self.sampler.rollout(self._encode(records), sampling_params(cfg, 1), seeds, self.tokenizer.pad_id)
        scores = score_samples(self.reward, records, rollout.completions)  # (N,)
        mask = rollout.response_mask  # (N, T-1)
        self.reference.to(scorer_device(self.model))
        ref_logprobs, _ = sequence_logprobs(self.reference, rollout.input_ids, cfg.temperature)
        kl = kl_estimate(rollout.old_logprobs, ref_logprobs, cfg.kl_estimator) * mask  # (N, T-1)
        token_rewards = -self.kl.beta * kl
        last = last_token_index(mask)
        token_rewards[torch.arange(len(last)), last] += scores
        values = self._values(rollout.input_ids) * mask
        advantages, returns = gae(token_rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)
        sequence_kl = kl.sum(1)  # (N,)
        beta = self.kl.beta
        self.kl.update(float(sequence_kl.mean()), len(records))
        return {"input_ids": rollout.input_ids, "response_mask": mask, "old_logprobs": rollout.old_logprobs,
                "old_values": values, "advantages": advantages, "returns": returns,
                **rollout_stats(scores, rollout.response_lengths, rollout.truncated),
                "stat_kl": sequence_kl.mean(), "stat_beta": torch.tensor(beta),
                "stat_non_score_reward": (token_rewards.sum(1) - scores).mean()}

    def evaluate(self) -> Iterator[dict[str, torch.Tensor]]:
        """One batch: greedy answers to the held-out prompts (val_reward); advantages and value targets are
        the values themselves, so the loss is about 0."""
        records = self.prompts.eval
        greedy = SamplingParams(n=1, max_tokens=self.cfg.max_tokens, temperature=0)
        rollout = self.sampler.rollout(self._encode(records), greedy, [0] * len(records), self.tokenizer.pad_id)
        scores = score_samples(self.reward, records, rollout.completions)
        values = self._values(rollout.input_ids) * rollout.response_mask
        yield {"input_ids": rollout.input_ids, "response_mask": rollout.response_mask,
               "old_logprobs": rollout.old_logprobs, "old_values": values, "returns": values,
               "advantages": torch.zeros_like(values),
               **rollout_stats(scores, rollout.response_lengths, rollout.truncated)}

    def state_dict(self) -> dict[str, Any]:
        return {"kl_controller": self.kl.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl.load_state_dict(state["kl_controller"])


def ppo_objective(cfg: PPOConfig):
    """Clipped policy loss + vf_coef x clipped value loss on a minibatch of rollout rows."""
    from lmstack.train.losses import Objective
    from lmstack.train.rl_losses import (
        clipped_policy_loss,
        clipped_value_loss,
        kl_estimate,
        token_logprobs,
    )

    def objective(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        input_ids, mask = batch["input_ids"], batch["response_mask"]
        logits, values = model(input_ids)  # (N, T, V), (N, T)
        logprobs, entropy = token_logprobs(logits, input_ids, cfg.temperature)  # (N, T-1) each
        policy_loss, stats = clipped_policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], mask,
                                                 cfg.clip, cfg.clip, "token")
        value_loss, value_clipped = clipped_value_loss(values[:, :-1], batch["old_values"], batch["returns"], mask,
                                                       cfg.value_clip)
        tokens = float(mask.sum())
        with torch.no_grad():
            metrics = {"tokens": tokens, "policy_loss": float(policy_loss), "value_loss": float(value_loss),
                       "entropy": float((entropy * mask).sum()) / max(tokens, 1),
                       "clip_fraction": stats.clip_fraction, "value_clip_fraction": value_clipped,
                       "ratio": stats.ratio_mean,
                       "kl_old": float((kl_estimate(logprobs, batch["old_logprobs"], "k3") * mask).sum()) / max(tokens, 1),
                       **carried_stats(batch)}
        return policy_loss + cfg.vf_coef * value_loss, metrics

    return Objective(objective, judge_spikes=False)


def ppo(model: str | Path, prompts: list[str] | None, reward: str | None, out_dir: str | Path, preset: str = "tiny",
        config_file: str | None = None, overrides: list[str] | None = None, resume: bool = False,
        overwrite: bool = False, progress: bool = True, lora: bool = False) -> dict[str, Any]:
    """Train MODEL with PPO against ``reward`` on ``prompts`` into OUT_DIR; returns the summary dict.

    ``prompts`` / ``reward`` set ``ppo.prompts`` / ``ppo.reward`` (None keeps the config's)."""
    from lmstack.models.heads import ScalarHeadModel
    from lmstack.models.peft import apply_lora
    from lmstack.train.rollout import EvaluationLoader, PolicySampler, RolloutLoader
    from lmstack.train.stage import StageParts, run_stage

    cfg, checkpoint, source = rl_run_config("ppo", model, prompts, reward, out_dir, preset, config_file,
                                            overrides, resume, lora, PPOConfig)
    pcfg, tokenizer = cfg.ppo, source.tokenizer
    records = load_prompts(pcfg.prompts) if pcfg.prompts else task_prompts(pcfg.reward[5:])
    reward_fn = resolve_reward(pcfg.reward, cfg.train.device if cfg.train.device != "auto" else "cpu")
    weights, source_path = model_state(source.model), source.path
    del source
    made: dict[str, Any] = {}

    def build(cfg: RunConfig, dist) -> StageParts:
        policy, reference, made["lora"] = build_policy(cfg, weights, source_path, keep_reference=True)
        weights.clear()
        backbone = copy.deepcopy(reference)
        backbone.requires_grad_(True)
        if cfg.lora is not None:
            apply_lora(backbone, lora_config(cfg))
        trained = PolicyAndValue(policy, ScalarHeadModel(backbone))
        source = PromptSource(records, pcfg.eval_prompts, pcfg.seed, dist.dp_rank, dist.dp_size)
        longest = max(len(tokenizer.render_chat(r["prompt"], add_generation_prompt=True)[0])
                      if isinstance(r["prompt"], list) else len(tokenizer.encode(r["prompt"])) + 1
                      for r in source.train + source.eval)
        sampler = PolicySampler(policy, tokenizer, max_model_len=min(cfg.model.block_size, longest + pcfg.max_tokens),
                                max_num_seqs=min(256, pcfg.prompts_per_rollout), keep_kv=pcfg.keep_kv)
        collector = PPOCollector(sampler, trained, tokenizer, source, reward_fn, pcfg, reference)
        made["model"] = trained
        return StageParts(model=trained, train_loader=RolloutLoader(collector, pcfg.minibatches, pcfg.epochs, pcfg.seed),
                          val_loader=EvaluationLoader(collector), objective=ppo_objective(pcfg), tokenizer=tokenizer,
                          description=f"{len(source.train):,} training prompts, {len(source.eval)} held out; "
                                      f"{pcfg.prompts_per_rollout} samples per rollout; separate value model")

    if int(os.environ.get("RANK", "0")) == 0 and progress:
        print(f"ppo: reward {pcfg.reward}, kl_coef {pcfg.kl_coef} ({pcfg.kl_estimator}"
              f"{', adaptive to ' + str(pcfg.kl_target) if pcfg.kl_target else ', fixed'})", file=sys.stderr)
    summary = run_stage(cfg, out_dir, build, resume=resume, overwrite=overwrite, resume_from=checkpoint,
                        progress=progress, extra_config={"data": {"source_model": str(source_path)}})
    out = Path(out_dir)
    policy = made["model"].policy
    if int(os.environ.get("RANK", "0")) == 0 and cfg.lora is None:
        # the loop saved policy and value together; OUT/model is the policy alone, a normal checkpoint
        save_checkpoint(out / "model", policy, read_config(out / "model"), tokenizer)
    finish_rl_run(out, policy, cfg, source_path, tokenizer, summary, made["lora"],
                  ("reward", "val_reward", "kl", "entropy", "clip_fraction", "value_loss", "response_length"))
    return summary
