"""`lmstack grpo`: group-relative policy optimisation (and REINFORCE) with rollouts from lmstack's own engine.

    python -m lmstack.data.verifiable --kind arithmetic --n 2000 --out prompts.jsonl
    lmstack grpo --model runs/sft/model --prompts prompts.jsonl --reward module:lmstack.data.verifiable:reward \\
        --out runs/grpo train.max_steps=200 grpo.group_size=8 grpo.loss_norm=token grpo.clip_high=0.28
    lmstack grpo --model runs/sft/model --prompts p.jsonl --reward task:gsm8k --out runs/g --lora grpo.beta=0.04
    lmstack grpo ... --resume

What one RL step is: ``grpo.prompts_per_rollout`` prompts, ``grpo.group_size`` samples each (one engine
request with ``n`` samples: one prefill, forked KV), sampled from the *current* weights of the model being
trained (lmstack/train/rollout.py); each sample is scored by the reward; advantages are group-normalised
(``(r - mean) / std`` per prompt; ``grpo.scale_std=false`` keeps only ``r - mean``); then ``grpo.inner_steps``
passes of ``grpo.minibatches`` updates each (with one update per rollout the behaviour log-prob pass is skipped:
the loss's own log-probs, detached, are the same numbers). Every update is one step of the one training loop
(train/loop.py), so ``train.max_steps`` counts minibatch updates and ``train.batch_size`` is not used.

The loss per response token (lmstack/train/rl_losses.py): the clipped ratio ``-min(r A, clip(r, 1-clip_low,
1+clip_high) A)`` against the behaviour log-probs (``grpo.algorithm=reinforce``: ``-A log p``, no ratio, with
the group-mean baseline and no std scaling), plus ``grpo.beta * k3`` to a frozen reference (the starting
model; default off, and then no reference is kept), reduced by ``grpo.loss_norm``: ``sequence`` (GRPO),
``token`` (DAPO) or ``dr_grpo`` (sum over tokens / (N x grpo.max_tokens)). Log-probs are those of
``softmax(logits / grpo.temperature)`` over the whole vocabulary, whatever top-k / top-p the sampler uses;
every log-prob pass (update, behaviour, reference) runs each distinct prompt of its rows once and the
output head at response positions only (lmstack/train/shared_prompt.py; equal to the full forward).

Rewards (``--reward``): ``task:NAME`` scores each completion with the evaluation task's reward
(lmstack/evals: ``Task.reward(example, text)``; a prompt record's ``answer``/``answers`` become the example's
answers; without ``--prompts`` the task's own examples are the prompts); a directory is a reward model
(lmstack.models.heads) scoring prompt + completion; ``module:function`` is a Python function
``(prompts, completions) -> list[float]`` (TRL's reward-function shape: prompts as in the file, completions
as text). A reward that raises, returns the wrong count, or a non-finite value stops the run with an error
naming the sample.

Prompt files are JSONL with ``prompt``: a string (encoded after BOS) or chat messages (rendered with the
model's chat format and the assistant header); other fields travel with it to the reward. A few prompts
(``grpo.eval_prompts``, at most a quarter) are held out; each validation answers them greedily and logs
``val_reward`` (greedy pass@1 for a 0/1 reward).

Metrics (metrics.jsonl, TensorBoard): ``reward``, ``reward_std``, ``response_length``, ``truncated`` (share
cut by max_tokens) of the rollout a minibatch came from; the minibatch's ``entropy``, ``clip_fraction``,
``ratio``, ``kl_old`` (k3 to the behaviour policy) and ``kl_ref`` (k3 to the reference, when beta > 0).
OUT/rl.png plots reward, KL and entropy against step. Resume is exact (``--resume``): the rollout buffer,
its position and the sampling seeds are part of the checkpoint. ``--lora`` trains LoRA adapters as in
``lmstack sft --lora`` (OUT/adapter and the merged OUT/model).

Not done: no rollouts on a separate inference server or in parallel with training (generation and training
alternate in one process), no dynamic sampling / overlong filtering (DAPO's other pieces), no
sequence-packing of rollouts.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import math
import os
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmstack.checkpoint import (
    load_checkpoint,
    load_model_state,
    model_state,
    read_config,
)
from lmstack.config import (
    GRPOConfig,
    PPOConfig,
    RunConfig,
    SFTLoRAConfig,
    apply_overrides,
    get_preset,
    load_config_file,
    model_config_from_dict,
)
from lmstack.engine import SamplingParams
from lmstack.errors import ConfigError, DataError, UserError
from lmstack.models import build_model, family_of, is_decoder

RewardFn = Callable[[Sequence[dict[str, Any]], Sequence[str]], list[float]]


# ----------------------------------------------------------------------------- prompts and rewards


def load_prompts(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Prompt records from JSONL files: each a dict with ``prompt`` (a string or a list of chat messages)."""
    records: list[dict[str, Any]] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise UserError(f"--prompts {path}: no such file")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not JSON ({e.msg})") from None
            prompt = record.get("prompt") if isinstance(record, dict) else None
            if not (isinstance(prompt, str) and prompt) and not (isinstance(prompt, list) and prompt):
                raise DataError(f"{path}:{number}: a prompt record needs \"prompt\": a string or a list of "
                                "chat messages, e.g. {\"prompt\": [{\"role\": \"user\", \"content\": \"...\"}]}")
            records.append(record)
    if not records:
        raise DataError(f"no prompts in {', '.join(map(str, paths))}")
    return records


def _prompt_text(prompt: str | list[dict[str, Any]]) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(m.get("content", "")) for m in prompt if isinstance(m, dict))


def task_prompts(name: str) -> list[dict[str, Any]]:
    """A generative evaluation task's examples as prompt records (the user turn is the task's prompt)."""
    from lmstack.evals.tasks import get_task

    task = get_task(name)
    return [{"prompt": [{"role": "user", "content": task.doc_to_text(ex)}], "answers": list(ex.answers), "id": ex.id}
            for ex in task.examples()]


def resolve_reward(spec: str, device: torch.device | str = "cpu") -> RewardFn:
    """The reward of ``--reward``: ``task:NAME``, a reward model directory, or ``module:function``."""
    if spec.startswith("task:"):
        return _task_reward(spec[5:])
    if Path(spec).is_dir():
        return _reward_model(Path(spec), device)
    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name:
        raise UserError(f"--reward {spec}: give task:NAME, a reward model directory, or module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"--reward {spec}: cannot import {module_name} ({e})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(f"--reward {spec}: {module_name} has no function {function_name}")
    return lambda records, completions: function([r["prompt"] for r in records], list(completions))


def _task_reward(name: str) -> RewardFn:
    from lmstack.evals.task import Example
    from lmstack.evals.tasks import get_task

    task = get_task(name)

    def score(records: Sequence[dict[str, Any]], completions: Sequence[str]) -> list[float]:
        rewards = []
        for i, (record, completion) in enumerate(zip(records, completions)):
            answers = record.get("answers", [record["answer"]] if "answer" in record else [])
            example = Example(id=str(record.get("id", i)), context=_prompt_text(record["prompt"]),
                              answers=[str(a) for a in answers])
            rewards.append(task.reward(example, completion))
        return rewards

    return score


def _reward_model(path: Path, device: torch.device | str) -> RewardFn:
    """A reward model directory (lmstack.models.heads, ``lmstack reward``): its score at the last token of the
    conversation prompt + completion, rendered with the reward model's own tokenizer and chat format."""
    from lmstack.models.heads import require_head, score_at_last

    loaded = load_checkpoint(path, device=device)
    scorer = require_head(loaded.model, path).eval()
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise ConfigError(f"--reward {path}: the reward model has no tokenizer; save it with one")

    @torch.no_grad()
    def score(records: Sequence[dict[str, Any]], completions: Sequence[str]) -> list[float]:
        rows = []
        for record, completion in zip(records, completions):
            prompt = record["prompt"]
            if isinstance(prompt, str):
                rows.append([tokenizer.bos_id, *tokenizer.encode(prompt + completion)])
            else:
                rows.append(tokenizer.render_chat([*prompt, {"role": "assistant", "content": completion}])[0])
        rows = [row[-scorer.config.block_size:] for row in rows]  # keep the end, where the score is read
        T = max(map(len, rows))
        input_ids = torch.full((len(rows), T), tokenizer.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, :len(row)], attention_mask[i, :len(row)] = torch.tensor(row), 1
        where = scorer_device(scorer)
        values = scorer(input_ids.to(where), attention_mask.to(where))  # (N, T)
        return score_at_last(values, attention_mask.to(where)).float().cpu().tolist()

    return score


def scorer_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def score_samples(reward: RewardFn, records: Sequence[dict[str, Any]], completions: Sequence[str]) -> torch.Tensor:
    """Rewards (N,) float32; a reward that raises, miscounts or is not finite is an error naming the sample."""
    try:
        rewards = list(reward(records, completions))
    except Exception as e:  # noqa: BLE001 -- any error of the user's function: find the sample, report it
        for i, (record, completion) in enumerate(zip(records, completions)):
            try:
                reward([record], [completion])
            except Exception as single:  # noqa: BLE001 -- the same, one sample at a time
                raise DataError(f"the reward raised on sample {i} (prompt {_prompt_text(record['prompt'])[:60]!r}, "
                                f"completion {completion[:60]!r}): {type(single).__name__}: {single}") from None
        raise DataError(f"the reward raised on a batch of {len(completions)} samples: {type(e).__name__}: {e}") from None
    if len(rewards) != len(completions):
        raise DataError(f"the reward returned {len(rewards)} values for {len(completions)} samples; return one per sample")
    for i, value in enumerate(rewards):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(f"the reward of sample {i} is {value!r} (prompt {_prompt_text(records[i]['prompt'])[:60]!r}, "
                            f"completion {completions[i][:60]!r}); rewards must be finite numbers")
    return torch.tensor([float(v) for v in rewards], dtype=torch.float32)


# ----------------------------------------------------------------------------- shared RL wiring


class PromptSource:
    """The training prompts in a seeded order, reshuffled every pass; rollout k on rank r of w takes the
    (k * w + r)-th block of ``per_rollout`` prompts of that endless sequence. Holds out a few for validation."""

    def __init__(self, records: list[dict[str, Any]], eval_prompts: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        order = random.Random(f"{seed}:heldout").sample(range(len(records)), len(records))
        held = min(eval_prompts, len(records) // 4)
        self.eval = [records[i] for i in order[:held]] or [records[order[0]]]
        self.train = [records[i] for i in order[held:]]
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def block(self, rollout: int, per_rollout: int) -> list[dict[str, Any]]:
        start = (rollout * self.world_size + self.rank) * per_rollout
        out = []
        for position in range(start, start + per_rollout):
            epoch, index = divmod(position, len(self.train))
            order = random.Random(f"{self.seed}:epoch:{epoch}").sample(range(len(self.train)), len(self.train))
            out.append(self.train[order[index]])
        return out


def rl_run_config(stage: str, model: str | Path, prompts: list[str] | None, reward: str | None, out_dir: str | Path,
                  preset: str, config_file: str | None, overrides: list[str] | None, resume: bool, lora: bool,
                  section: type) -> tuple[RunConfig, Path | None, Any]:
    """(run config, checkpoint to resume from, the loaded source checkpoint) of an RL stage, as sft does it:
    the model's config, the preset's optim/train, the stage section, then the file and overrides; a resumed
    run keeps its own config with the file and overrides on top."""
    from lmstack.train.stage import stage_config

    source = load_checkpoint(model)
    if source.tokenizer is None:
        raise ConfigError(f"{model} has no tokenizer; {stage} needs a checkpoint saved with its tokenizer")
    if not is_decoder(source.model.config):
        raise ConfigError(f"{model} is a {family_of(source.model.config).name} model; {stage} trains decoders")
    extra = [f"{stage}.prompts={','.join(map(str, prompts))}"] if prompts else []
    extra += [f"{stage}.reward={reward}"] if reward else []
    overrides = [*extra, *(overrides or [])]
    file_overrides = load_config_file(config_file) if config_file else {}
    defaults = get_preset(preset)

    def configure(cfg: RunConfig) -> None:
        keys = [str(k) for k in file_overrides] + [item.partition("=")[0].strip() for item in overrides]
        if cfg.lora is None and any(k == "lora" or k.startswith("lora.") for k in keys):
            raise ConfigError("lora.* settings apply to LoRA runs only: pass --lora")
        apply_overrides(cfg, file_overrides)
        apply_overrides(cfg, overrides)

    base = RunConfig(model=model_config_from_dict(source.config["model"]), optim=defaults.optim,
                     train=defaults.train, lora=SFTLoRAConfig() if lora else None, **{stage: section()})
    base.train.seq_len = min(base.train.seq_len, base.model.block_size)
    base.optim.lr, base.optim.warmup_steps = 1e-5, 0  # RL moves a trained model: small steps, no warmup
    configure(base)
    _, checkpoint = stage_config(out_dir, preset, config_file, overrides, resume, base=base)
    cfg = base
    if checkpoint is not None:
        cfg = RunConfig.from_dict(read_config(checkpoint))
        if lora and cfg.lora is None:
            raise UserError(f"the run in {out_dir} trains every weight; --lora cannot be added when resuming it")
        configure(cfg)
    if getattr(cfg, stage) is None:
        raise UserError(f"the run in {out_dir} is not a {stage} run; choose another --out")
    cfg.validate()
    return cfg, checkpoint, source


def lora_config(cfg: RunConfig):
    """lmstack.models.peft.LoRAConfig from the run's ``lora`` section (a quantized base is not offered here)."""
    from lmstack.models.peft import LoRAConfig

    if getattr(cfg.lora, "quantize", "none") != "none":
        raise ConfigError("lora.quantize applies to lmstack sft; RL stages train LoRA over a float base")
    names = {f.name for f in dataclasses.fields(LoRAConfig)}
    return LoRAConfig(**{k: v for k, v in dataclasses.asdict(cfg.lora).items() if k in names})


def build_policy(cfg: RunConfig, weights: dict[str, torch.Tensor], source_path: Path, keep_reference: bool
                 ) -> tuple[nn.Module, nn.Module | None, dict[str, Any]]:
    """(policy, frozen reference or None, LoRA summary) from the source weights; LoRA when cfg.lora is set."""
    from lmstack.models.peft import apply_lora, trainable_parameters

    policy = build_model(cfg.model)
    load_model_state(policy, weights, source_path)
    reference = None
    if keep_reference:
        reference = copy.deepcopy(policy).eval()
        reference.requires_grad_(False)
    info: dict[str, Any] = {}
    if cfg.lora is not None:
        modules = apply_lora(policy, lora_config(cfg))
        trainable, total = trainable_parameters(policy)
        info = {"trainable_params": trainable, "total_params": total, "modules": modules}
    return policy, reference, info


def sampling_params(section: GRPOConfig | PPOConfig, n: int) -> SamplingParams:
    return SamplingParams(n=n, max_tokens=section.max_tokens, temperature=section.temperature,
                          top_k=section.top_k, top_p=section.top_p)


def rollout_stats(rewards: torch.Tensor, lengths: Sequence[int], truncated: Sequence[bool]) -> dict[str, torch.Tensor]:
    """The 0-d ``stat_*`` tensors a rollout's minibatches carry into the logged metrics."""
    return {"stat_reward": rewards.mean(), "stat_reward_std": rewards.std() if rewards.numel() > 1 else rewards.sum() * 0,
            "stat_response_length": torch.tensor(float(sum(lengths)) / len(lengths)),
            "stat_truncated": torch.tensor(float(sum(truncated)) / len(truncated))}


def carried_stats(batch: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k.removeprefix("stat_"): float(v) for k, v in batch.items() if k.startswith("stat_")}


def finish_rl_run(out_dir: Path, policy: nn.Module, cfg: RunConfig, source_path: Path, tokenizer: Any,
                  summary: dict[str, Any], lora_info: dict[str, Any], curves: Sequence[str]) -> None:
    """On rank 0: the adapter and merged model (LoRA), the RL curves plot, and summary.json."""
    from lmstack.atomic import write_json_atomic
    from lmstack.plots import plot_training_curves
    from lmstack.stages.sft import _write_adapter_and_merged
    from lmstack.train.loop import read_metrics

    if int(os.environ.get("RANK", "0")) != 0:
        return
    if cfg.lora is not None:
        summary["lora"] = lora_info
        _write_adapter_and_merged(policy, lora_config(cfg), out_dir, source_path, tokenizer)
    records = read_metrics(out_dir / "metrics.jsonl")
    panels = tuple(name for name in curves if any(r.get(name) is not None for r in records))
    if panels:
        plot_training_curves(records, out_dir / "rl.png", panels=panels, title=f"{out_dir.name}")
    write_json_atomic(out_dir / "summary.json", summary)


# ----------------------------------------------------------------------------- GRPO


class GRPOCollector:
    """Makes GRPO rollouts (the train loader's collector, lmstack.train.rollout.Collector) and the greedy
    validation batches."""

    def __init__(self, sampler: Any, tokenizer: Any, prompts: PromptSource, reward: RewardFn, cfg: GRPOConfig,
                 reference: nn.Module | None):
        self.sampler, self.tokenizer, self.prompts, self.reward, self.cfg = sampler, tokenizer, prompts, reward, cfg
        self.reference = reference

    def _encode(self, records: Sequence[dict[str, Any]]) -> list[list[int]]:
        from lmstack.train.rollout import render_prompt

        return [render_prompt(self.tokenizer, r["prompt"]) for r in records]

    def collect(self, index: int) -> dict[str, torch.Tensor]:
        from lmstack.train.rl_losses import group_advantages
        from lmstack.train.rollout import rollout_seed, sequence_logprobs

        cfg = self.cfg
        records = self.prompts.block(index, cfg.prompts_per_rollout)
        seeds = [rollout_seed(cfg.seed, index, i) + self.prompts.rank * 7919 for i in range(len(records))]
        on_policy = cfg.minibatches * cfg.inner_steps == 1  # one update: the loss's detached log-probs serve
        rollout = self.sampler.rollout(self._encode(records), sampling_params(cfg, cfg.group_size), seeds,
                                       self.tokenizer.pad_id, behaviour_logprobs=not on_policy)
        rewards = score_samples(self.reward, [records[i] for i in rollout.prompt_index.tolist()], rollout.completions)
        reinforce = cfg.algorithm == "reinforce"
        advantages = group_advantages(rewards, cfg.group_size, scale_std=cfg.scale_std and not reinforce)
        batch = {"input_ids": rollout.input_ids, "response_mask": rollout.response_mask, "advantages": advantages,
                 **rollout_stats(rewards, rollout.response_lengths, rollout.truncated)}
        if rollout.old_logprobs is not None:
            batch["old_logprobs"] = rollout.old_logprobs
        if self.reference is not None:
            self.reference.to(scorer_device(self.sampler.model))
            ref, _ = sequence_logprobs(self.reference, rollout.input_ids, cfg.temperature,
                                       response_mask=rollout.response_mask)
            batch["ref_logprobs"] = ref * rollout.response_mask
        return batch

    def evaluate(self) -> Iterator[dict[str, torch.Tensor]]:
        """One batch: greedy answers to the held-out prompts, advantages 0 (the loss is 0; val_reward counts)."""
        records = self.prompts.eval
        greedy = SamplingParams(n=1, max_tokens=self.cfg.max_tokens, temperature=0)
        rollout = self.sampler.rollout(self._encode(records), greedy, [0] * len(records), self.tokenizer.pad_id)
        rewards = score_samples(self.reward, records, rollout.completions)
        batch = {"input_ids": rollout.input_ids, "response_mask": rollout.response_mask,
                 "old_logprobs": rollout.old_logprobs, "advantages": torch.zeros(len(records)),
                 **rollout_stats(rewards, rollout.response_lengths, rollout.truncated)}
        if self.reference is not None:
            batch["ref_logprobs"] = rollout.old_logprobs
        yield batch

    def state_dict(self) -> dict[str, Any]:
        return {}  # a rollout depends only on its index, the weights and the seeds

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def grpo_objective(cfg: GRPOConfig):
    """The GRPO / REINFORCE loss on a minibatch of rollout rows (module docstring)."""
    from lmstack.train.losses import Objective
    from lmstack.train.rl_losses import clipped_policy_loss, kl_estimate, reinforce_loss
    from lmstack.train.shared_prompt import rollout_logprobs

    def objective(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        input_ids, mask = batch["input_ids"], batch["response_mask"]
        # each distinct prompt once, the head at response positions only (equal to the full forward's numbers)
        logprobs, entropy = rollout_logprobs(model, input_ids, mask, cfg.temperature)  # (N, T-1) each
        advantages = batch["advantages"][:, None]  # (N, 1): one advantage for every token of a sequence
        # no behaviour log-probs in the batch: one update per rollout, so the weights that sampled are these
        old_logprobs = batch["old_logprobs"] if "old_logprobs" in batch else logprobs.detach()
        kl_ref = kl_estimate(logprobs, batch["ref_logprobs"], "k3") if cfg.beta > 0 else None
        extra = cfg.beta * kl_ref if kl_ref is not None else None
        if cfg.algorithm == "reinforce":
            loss = reinforce_loss(logprobs, advantages, mask, cfg.loss_norm, cfg.max_tokens, extra)
            clip_fraction, ratio = 0.0, 1.0
        else:
            loss, stats = clipped_policy_loss(logprobs, old_logprobs, advantages, mask, cfg.clip_low,
                                              cfg.clip_high, cfg.loss_norm, cfg.max_tokens, extra)
            clip_fraction, ratio = stats.clip_fraction, stats.ratio_mean
        tokens = float(mask.sum())
        with torch.no_grad():
            metrics = {"tokens": tokens, "entropy": float((entropy * mask).sum()) / max(tokens, 1),
                       "clip_fraction": clip_fraction, "ratio": ratio,
                       "kl_old": float((kl_estimate(logprobs, old_logprobs, "k3") * mask).sum()) / max(tokens, 1),
                       **carried_stats(batch)}
            if kl_ref is not None:
                metrics["kl_ref"] = float((kl_ref * mask).sum()) / max(tokens, 1)
        return loss, metrics

    return Objective(objective, judge_spikes=False)


def grpo(model: str | Path, prompts: list[str] | None, reward: str | None, out_dir: str | Path, preset: str = "tiny",
         config_file: str | None = None, overrides: list[str] | None = None, resume: bool = False,
         overwrite: bool = False, progress: bool = True, lora: bool = False) -> dict[str, Any]:
    """Train MODEL with GRPO (or REINFORCE) on the prompts of ``prompts`` into OUT_DIR; returns the summary dict.

    ``prompts`` / ``reward`` set ``grpo.prompts`` / ``grpo.reward`` (None keeps the config's)."""
    from lmstack.train.rollout import EvaluationLoader, PolicySampler, RolloutLoader
    from lmstack.train.stage import StageParts, run_stage

    cfg, checkpoint, source = rl_run_config("grpo", model, prompts, reward, out_dir, preset, config_file,
                                            overrides, resume, lora, GRPOConfig)
    gcfg, tokenizer = cfg.grpo, source.tokenizer
    records = load_prompts(gcfg.prompts) if gcfg.prompts else task_prompts(gcfg.reward[5:])
    reward_fn = resolve_reward(gcfg.reward, cfg.train.device if cfg.train.device != "auto" else "cpu")
    weights, source_path = model_state(source.model), source.path
    del source
    made: dict[str, Any] = {}

    def build(cfg: RunConfig, dist) -> StageParts:
        policy, reference, made["lora"] = build_policy(cfg, weights, source_path, keep_reference=gcfg.beta > 0)
        weights.clear()
        source = PromptSource(records, gcfg.eval_prompts, gcfg.seed, dist.dp_rank, dist.dp_size)
        longest = max(len(p) for p in GRPOCollector(None, tokenizer, source, reward_fn, gcfg, None)
                      ._encode(source.train + source.eval))
        sampler = PolicySampler(policy, tokenizer, max_model_len=min(cfg.model.block_size, longest + gcfg.max_tokens),
                                max_num_seqs=min(256, gcfg.prompts_per_rollout * gcfg.group_size), keep_kv=gcfg.keep_kv)
        collector = GRPOCollector(sampler, tokenizer, source, reward_fn, gcfg, reference)
        made["policy"] = policy
        return StageParts(model=policy, train_loader=RolloutLoader(collector, gcfg.minibatches, gcfg.inner_steps,
                                                                   gcfg.seed),
                          val_loader=EvaluationLoader(collector), objective=grpo_objective(gcfg), tokenizer=tokenizer,
                          description=f"{len(source.train):,} training prompts, {len(source.eval)} held out; "
                                      f"{gcfg.prompts_per_rollout} x {gcfg.group_size} samples per rollout")

    if int(os.environ.get("RANK", "0")) == 0 and progress:
        print(f"grpo: {gcfg.algorithm}, reward {gcfg.reward}, loss_norm {gcfg.loss_norm}", file=sys.stderr)
    summary = run_stage(cfg, out_dir, build, resume=resume, overwrite=overwrite, resume_from=checkpoint,
                        progress=progress, extra_config={"data": {"source_model": str(source_path)}})
    finish_rl_run(Path(out_dir), made["policy"], cfg, source_path, tokenizer, summary, made["lora"],
                  ("reward", "val_reward", "kl_old", "kl_ref", "entropy", "clip_fraction", "response_length"))
    return summary
