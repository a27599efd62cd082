"""Typed configuration: dataclasses with defaults in one place, named presets, one override syntax.

A run is described by a :class:`RunConfig` with four parts: ``model`` (the family's own config
dataclass, e.g. :class:`lmstack.models.gpt.GPTConfig`), ``optim``, ``train`` and ``parallel`` (the
layout over torchrun's processes, :class:`ParallelConfig`), plus the section of the
stage that needs one (``sft``: :class:`SFTConfig`, and ``lora``: :class:`SFTLoRAConfig` in ``lmstack sft
--lora`` runs; absent, and refused as an unknown section, in runs of other stages). Every value can be changed the same way everywhere:

    lmstack pretrain --preset tiny model.n_layer=4 optim.lr=1e-3 train.max_steps=200
    lmstack pretrain --preset tiny --config my.yaml          # same dotted keys, nested in YAML/TOML

A config file holds nested mappings (``model: {n_layer: 4}``) or dotted keys (``model.n_layer: 4``);
both are flattened to the ``key=value`` form, so files and the command line share one code path
(:func:`apply_overrides`). Unknown keys and badly typed values raise :class:`ConfigError` naming the
key and listing what would have been valid, never a traceback from deep inside a dataclass.

Presets are plain functions returning a fresh :class:`RunConfig` (``PRESETS[name]()``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from lmstack.errors import ConfigError, require  # noqa: F401  (re-exported: config.ConfigError)

ModelConfig = Any  # any registered family's config dataclass (lmstack.models.MODEL_CONFIGS)


def _model_configs() -> dict[str, type]:
    """family -> config class. Imported on first use so that torch-free tools (the data pipeline and its
    worker processes) can use this module without paying for ``import torch``."""
    from lmstack.models import MODEL_CONFIGS

    return MODEL_CONFIGS


def check_range(key: str, value: Any, low: float = -math.inf, high: float = math.inf, *,
                low_open: bool = False, high_open: bool = False, integer: bool = False) -> None:
    """ConfigError unless ``value`` is a finite number (an integer when ``integer``) in the given range.

    The message names the key, the value and the valid range, e.g. ``optim.lr=nan must be a finite number
    in (0, inf)``: the one check behind every numeric field of the optimizer and training configs."""
    kind = "an integer" if integer else "a finite number"
    interval = (f"{'(' if low_open or low == -math.inf else '['}{low:g}, {high:g}"
                f"{')' if high_open or high == math.inf else ']'}")
    if integer:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    require(ok, f"{key}={value!r} must be {kind} in {interval}")


def check_choice(key: str, value: Any, choices: Sequence[str]) -> None:
    """ConfigError unless ``value`` is one of ``choices`` (the message lists them)."""
    require(isinstance(value, str) and value in choices, f"{key}={value!r}: choose one of {', '.join(choices)}")


def check_flag(key: str, value: Any) -> None:
    require(isinstance(value, bool), f"{key}={value!r} must be true or false")


@dataclass
class OptimConfig:
    """AdamW + learning-rate schedule."""

    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # final LR = lr * min_lr_ratio (cosine / linear / wsd floor)
    weight_decay: float = 0.1  # applied to matrices only; norms, biases and embeddings get 0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    schedule: str = "cosine"  # cosine | linear | wsd | constant
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd only: fraction of steps spent in the final decay

    def validate(self) -> None:
        check_choice("optim.schedule", self.schedule, SCHEDULES)
        check_range("optim.lr", self.lr, 0, low_open=True)
        check_range("optim.min_lr_ratio", self.min_lr_ratio, 0, 1)
        check_range("optim.weight_decay", self.weight_decay, 0)
        check_range("optim.beta1", self.beta1, 0, 1, high_open=True)
        check_range("optim.beta2", self.beta2, 0, 1, high_open=True)
        check_range("optim.eps", self.eps, 0, low_open=True)
        check_range("optim.grad_clip", self.grad_clip, 0)
        check_range("optim.warmup_steps", self.warmup_steps, 0, integer=True)
        check_range("optim.decay_fraction", self.decay_fraction, 0, 1, low_open=True)


SCHEDULES = ("cosine", "linear", "wsd", "constant")
DTYPES = ("auto", "bf16", "fp16", "fp32")
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass
class TrainConfig:
    """Everything about the training run that is not the model or the optimizer."""

    batch_size: int = 8  # sequences per micro-batch per process
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000  # optimizer steps
    max_minutes: float = 0.0  # stop early after this wall time (0 = no limit); the LR schedule follows the clock
    eval_every: int = 200  # steps between validation passes (0 = only at the end)
    eval_batches: int = 20  # micro-batches per validation pass
    log_every: int = 10
    ckpt_every: int = 500  # steps between checkpoints (0 = only at the end)
    keep_last: int = 2  # checkpoints kept in OUT/checkpoints
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    compile: bool = False  # torch.compile the model
    activation_checkpointing: str = "none"  # none | selective (every other block) | full (every block)
    spike_factor: float = 4.0  # loss > spike_factor * running mean (after warmup) = spike -> roll back ...
    spike_min_gap: float = 1.0  # ... when it is also at least this many nats above the running mean
    max_rollbacks: int = 10  # give up after this many rollbacks
    tensorboard: bool = True

    def validate(self) -> None:
        for name in ("batch_size", "seq_len", "grad_accum", "max_steps", "log_every", "eval_batches", "keep_last"):
            check_range(f"train.{name}", getattr(self, name), 1, integer=True)
        for name in ("eval_every", "ckpt_every", "max_rollbacks"):
            check_range(f"train.{name}", getattr(self, name), 0, integer=True)
        check_range("train.max_minutes", self.max_minutes, 0)
        check_range("train.seed", self.seed, 0, 2**63, high_open=True, integer=True)
        # a factor <= 1 would call every loss above the running mean a spike
        check_range("train.spike_factor", self.spike_factor, 1, low_open=True)
        check_range("train.spike_min_gap", self.spike_min_gap, 0)
        check_choice("train.dtype", self.dtype, DTYPES)
        require(isinstance(self.device, str) and _DEVICE.fullmatch(self.device) is not None,
                f"train.device={self.device!r}: choose auto, cpu, cuda, cuda:N or mps")
        check_flag("train.compile", self.compile)
        check_choice("train.activation_checkpointing", self.activation_checkpointing, ACTIVATION_CHECKPOINTING)
        check_flag("train.tensorboard", self.tensorboard)


ACTIVATION_CHECKPOINTING = ("none", "selective", "full")
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


@dataclass
class ParallelConfig:
    """How training spreads over the processes torchrun starts (lmstack/train/parallel/).

    The degrees multiply to the world size: ``dp_replicate x dp_shard x tp x pp``; -1 (the default of
    ``dp_replicate``) takes what the others leave. With only data parallelism the run uses DDP;
    ``dp_shard > 1`` shards parameters, gradients and optimizer state (FSDP2), and with
    ``dp_replicate > 1`` as well the shards are replicated across groups (HSDP). ``tp`` splits every
    attention and MLP matrix over that many processes, ``pp`` the layers into that many pipeline stages.
    The layout belongs to a launch, not to a run: a resumed run takes it from this launch's overrides."""

    dp_replicate: int = -1  # data-parallel replicas (DDP, or HSDP's replicate dimension); -1: the rest
    dp_shard: int = 1  # FSDP2 shard group size (1: parameters are not sharded)
    tp: int = 1  # tensor-parallel degree
    pp: int = 1  # pipeline-parallel stages (per process: 2 with interleaved_1f1b)
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b
    pp_microbatches: int = 0  # micro-batches per pipeline step (0: the number of stages); divides train.batch_size
    sequence_parallel: bool = True  # with tp > 1: norms and residuals split along the sequence
    cpu_offload: bool = False  # FSDP2 keeps parameters and optimizer state in CPU memory
    async_checkpoint: bool = False  # sharded checkpoints are written in the background while training goes on

    def validate(self) -> None:
        require(isinstance(self.dp_replicate, int) and not isinstance(self.dp_replicate, bool)
                and (self.dp_replicate == -1 or self.dp_replicate >= 1),
                f"parallel.dp_replicate={self.dp_replicate!r} must be -1 (the rest of the world) or an integer >= 1")
        for name in ("dp_shard", "tp", "pp"):
            check_range(f"parallel.{name}", getattr(self, name), 1, integer=True)
        check_range("parallel.pp_microbatches", self.pp_microbatches, 0, integer=True)
        check_choice("parallel.pp_schedule", self.pp_schedule, PP_SCHEDULES)
        for name in ("sequence_parallel", "cpu_offload", "async_checkpoint"):
            check_flag(f"parallel.{name}", getattr(self, name))


LOSS_ON = ("assistant", "all", "last_turn")
OVERLONG = ("truncate", "drop")


@dataclass
class SFTConfig:
    """Supervised fine-tuning on conversations (lmstack/stages/sft.py, lmstack/data/instruct.py).

    A conversation longer than ``train.seq_len + 1`` tokens is cut to that length (``truncate``) or left
    out (``drop``); both are counted in the run's summary."""

    data: list[str] = field(default_factory=list)  # JSONL (.gz/.zst) or parquet files of conversations
    weights: list[float] = field(default_factory=list)  # per file: copies per epoch (1.0 each when empty)
    loss_on: str = "assistant"  # assistant | all | last_turn
    overlong: str = "truncate"  # truncate | drop
    skip_bad_records: bool = False  # count and skip bad conversations instead of stopping at the first
    val_fraction: float = 0.05  # conversations held out for validation (at least one per file of two or more)
    seed: int = 0  # the held-out split and the subset drawn for fractional weights
    packing: bool = False  # pack conversations into train.seq_len windows (attention stays inside each one)
    padding_free: bool = False  # each batch's conversations in one row, no padding (attention stays inside each)

    def validate(self) -> None:
        check_choice("sft.loss_on", self.loss_on, LOSS_ON)
        check_choice("sft.overlong", self.overlong, OVERLONG)
        check_flag("sft.skip_bad_records", self.skip_bad_records)
        check_flag("sft.packing", self.packing)
        check_flag("sft.padding_free", self.padding_free)
        require(not (self.packing and self.padding_free),
                "sft.packing=true and sft.padding_free=true are two layouts of a batch; choose one")
        check_range("sft.val_fraction", self.val_fraction, 0, 1, low_open=True, high_open=True)
        check_range("sft.seed", self.seed, 0, 2**63, high_open=True, integer=True)
        require(bool(self.data), "sft.data is empty: name the conversation files (--data FILE ...)")
        require(not self.weights or len(self.weights) == len(self.data),
                f"sft.weights has {len(self.weights)} value(s) for {len(self.data)} data file(s); give one per file")
        for weight in self.weights:
            check_range("sft.weights", weight, 0, low_open=True)


@dataclass
class SFTLoRAConfig:
    """LoRA fine-tuning (``lmstack sft --lora``): the fields of lmstack.models.peft.LoRAConfig, torch-free here.

    ``target_modules`` lists module names or their last dotted parts (``q_proj`` is every layer's query
    projection); the regular-expression form of the library is not offered on the command line."""

    r: int = 8  # the adapter's rank
    alpha: float = 16.0  # the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = 0.0  # on the adapter's input only
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False
    quantize: str = "none"  # none | int8 | int4: the frozen base's linear layers (--quantize, QLoRA-style)

    def validate(self) -> None:
        check_choice("lora.quantize", self.quantize, ("none", "int8", "int4"))
        check_range("lora.r", self.r, 1, integer=True)
        check_range("lora.alpha", self.alpha, 0, low_open=True)
        check_range("lora.dropout", self.dropout, 0, 1, high_open=True)
        check_flag("lora.use_rslora", self.use_rslora)
        require(bool(self.target_modules) and all(isinstance(t, str) and t for t in self.target_modules),
                f"lora.target_modules={self.target_modules!r}: name the layers to adapt, e.g. q_proj,v_proj")


GRPO_ALGORITHMS = ("grpo", "reinforce")
RL_LOSS_NORMS = ("sequence", "token", "dr_grpo")  # lmstack.train.rl_losses.LOSS_NORMS
RL_KL_ESTIMATORS = ("k1", "k3")


def _check_sampling(section: str, cfg: Any) -> None:
    """The rollout fields the GRPO and PPO sections share."""
    require(bool(cfg.prompts) or cfg.reward.startswith("task:"),
            f"{section}.prompts is empty: name the prompt files (--prompts FILE ...)")
    require(bool(cfg.reward), f"{section}.reward is empty: give --reward task:NAME, a reward model directory "
                              "or module:function")
    check_range(f"{section}.prompts_per_rollout", cfg.prompts_per_rollout, 1, integer=True)
    check_range(f"{section}.minibatches", cfg.minibatches, 1, integer=True)
    check_range(f"{section}.max_tokens", cfg.max_tokens, 1, integer=True)
    check_range(f"{section}.temperature", cfg.temperature, 0, low_open=True)
    check_range(f"{section}.top_k", cfg.top_k, 0, integer=True)
    check_range(f"{section}.top_p", cfg.top_p, 0, 1, low_open=True)
    check_flag(f"{section}.keep_kv", cfg.keep_kv)
    check_range(f"{section}.eval_prompts", cfg.eval_prompts, 1, integer=True)
    check_range(f"{section}.seed", cfg.seed, 0, 2**63, high_open=True, integer=True)


@dataclass
class GRPOConfig:
    """Group-relative policy optimisation and REINFORCE (lmstack/stages/grpo.py).

    One rollout is ``prompts_per_rollout`` prompts x ``group_size`` samples; it is used for ``inner_steps``
    passes of ``minibatches`` updates each (one loop step per minibatch)."""

    prompts: list[str] = field(default_factory=list)  # prompt JSONL files ({"prompt": str | messages, ...})
    reward: str = ""  # task:NAME | reward model directory | module:function
    algorithm: str = "grpo"  # grpo (clipped ratio) | reinforce (group-mean baseline, no ratio)
    group_size: int = 8  # samples per prompt (G)
    prompts_per_rollout: int = 8
    minibatches: int = 2  # updates per pass over a rollout
    inner_steps: int = 1  # passes over each rollout
    max_tokens: int = 32  # response tokens sampled at most
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    scale_std: bool = True  # divide advantages by the group's std (false: Dr. GRPO)
    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2  # DAPO's clip-higher: e.g. 0.28
    beta: float = 0.0  # KL(policy || reference) coefficient, k3 estimator in the loss (0: off, no reference)
    loss_norm: str = "sequence"  # sequence (GRPO) | token (DAPO) | dr_grpo (sum / (N * max_tokens))
    keep_kv: bool = True  # keep the engine's KV pool between rollouts (false: free it while training)
    eval_prompts: int = 32  # held-out prompts answered greedily at each validation (val_reward)
    seed: int = 0  # prompt order, held-out split and sampling seeds

    def validate(self) -> None:
        _check_sampling("grpo", self)
        check_choice("grpo.algorithm", self.algorithm, GRPO_ALGORITHMS)
        check_range("grpo.group_size", self.group_size, 2, integer=True)
        check_range("grpo.inner_steps", self.inner_steps, 1, integer=True)
        check_flag("grpo.scale_std", self.scale_std)
        check_range("grpo.clip_low", self.clip_low, 0, 1, low_open=True, high_open=True)
        check_range("grpo.clip_high", self.clip_high, 0, low_open=True)
        check_range("grpo.beta", self.beta, 0)
        check_choice("grpo.loss_norm", self.loss_norm, RL_LOSS_NORMS)


@dataclass
class PPOConfig:
    """PPO with a value model and a per-token KL penalty (lmstack/stages/ppo.py).

    One rollout is ``prompts_per_rollout`` prompts x one sample, used for ``epochs`` passes of
    ``minibatches`` updates (one loop step per minibatch)."""

    prompts: list[str] = field(default_factory=list)
    reward: str = ""  # reward model directory | task:NAME | module:function
    prompts_per_rollout: int = 16
    minibatches: int = 4
    epochs: int = 2  # passes over each rollout
    max_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    kl_coef: float = 0.05  # beta of the per-token KL penalty in the reward (the start value when adaptive)
    kl_estimator: str = "k1"  # k1 (log ratio) | k3
    kl_target: float = 0.0  # > 0: adaptive controller toward this KL per sequence; 0: beta stays fixed
    kl_horizon: int = 10000  # adaptive controller's horizon in sequences
    gamma: float = 1.0
    lam: float = 0.95  # GAE lambda
    whiten_advantages: bool = True
    clip: float = 0.2  # policy ratio clip
    value_clip: float = 0.2  # value prediction clip around the rollout's values
    vf_coef: float = 0.1  # weight of the value loss
    keep_kv: bool = True
    eval_prompts: int = 32
    seed: int = 0

    def validate(self) -> None:
        _check_sampling("ppo", self)
        check_range("ppo.epochs", self.epochs, 1, integer=True)
        check_range("ppo.kl_coef", self.kl_coef, 0)
        check_choice("ppo.kl_estimator", self.kl_estimator, RL_KL_ESTIMATORS)
        check_range("ppo.kl_target", self.kl_target, 0)
        check_range("ppo.kl_horizon", self.kl_horizon, 1, integer=True)
        check_range("ppo.gamma", self.gamma, 0, 1)
        check_range("ppo.lam", self.lam, 0, 1)
        check_flag("ppo.whiten_advantages", self.whiten_advantages)
        check_range("ppo.clip", self.clip, 0, 1, low_open=True, high_open=True)
        check_range("ppo.value_clip", self.value_clip, 0, low_open=True)
        check_range("ppo.vf_coef", self.vf_coef, 0)


DPO_LOSSES = ("sigmoid", "ipo", "robust")
DPO_REFERENCES = ("copy", "precomputed")


@dataclass
class PreferenceDataConfig:
    """Preference pairs for ``lmstack reward`` and ``lmstack dpo`` (lmstack/data/preference.py). A pair longer
    than ``train.seq_len`` tokens has its prompt cut from the left (``truncate``) or is left out (``drop``)."""

    section = "preference"  # the config section's name in messages (a class attribute, not a field)
    data: list[str] = field(default_factory=list)  # JSONL (.gz/.zst) or parquet files of pairs (TRL formats)
    weights: list[float] = field(default_factory=list)  # per file: copies per epoch (1.0 each when empty)
    overlong: str = "truncate"  # truncate | drop
    skip_bad_records: bool = False  # count and skip bad pairs instead of stopping at the first
    val_fraction: float = 0.05  # pairs held out for validation and the held-out accuracy
    seed: int = 0  # the held-out split and the subset drawn for fractional weights

    def validate(self) -> None:
        section = self.section
        check_choice(f"{section}.overlong", self.overlong, OVERLONG)
        check_flag(f"{section}.skip_bad_records", self.skip_bad_records)
        check_range(f"{section}.val_fraction", self.val_fraction, 0, 1, low_open=True, high_open=True)
        check_range(f"{section}.seed", self.seed, 0, 2**63, high_open=True, integer=True)
        require(bool(self.data), f"{section}.data is empty: name the preference files (--data FILE ...)")
        require(not self.weights or len(self.weights) == len(self.data),
                f"{section}.weights has {len(self.weights)} value(s) for {len(self.data)} data file(s); give one "
                "per file")
        for weight in self.weights:
            check_range(f"{section}.weights", weight, 0, low_open=True)


@dataclass
class RewardConfig(PreferenceDataConfig):
    """Reward-model training (``lmstack reward``, lmstack/stages/reward.py): Bradley–Terry on pairs."""

    section = "reward"
    center_coef: float = 0.0  # weight of mean((r_chosen + r_rejected)^2), which keeps rewards near zero

    def validate(self) -> None:
        super().validate()
        check_range("reward.center_coef", self.center_coef, 0)


@dataclass
class DPOConfig(PreferenceDataConfig):
    """Direct preference optimisation (``lmstack dpo``, lmstack/stages/dpo.py, lmstack/train/preference_losses.py).

    ``reference``: ``copy`` keeps a frozen copy of the starting model (with ``--lora``: the model with its
    adapters switched off, no copy); ``precomputed`` scores every pair with it once before training and keeps
    only the numbers, which saves the memory and the forward pass of a second model. ``sft_weight`` defaults to 1
    (RPO's value): plain DPO (0) lowered the chosen completions with the rejected ones and halved rule-following
    in bench/bench_dpo.py, the NLL term kept them (BENCHMARKS.md)."""

    section = "dpo"
    beta: float = 0.1  # strength of the KL constraint to the reference
    loss: str = "sigmoid"  # sigmoid (the paper's) | ipo | robust
    label_smoothing: float = 0.0  # share of labels assumed flipped: conservative DPO (sigmoid), robust DPO
    reference: str = "precomputed"  # copy | precomputed
    sft_weight: float = 1.0  # weight of the chosen completion's per-token NLL added to the loss (RPO); 0 = plain DPO

    def validate(self) -> None:
        super().validate()
        check_range("dpo.beta", self.beta, 0, low_open=True)
        check_range("dpo.sft_weight", self.sft_weight, 0)
        check_choice("dpo.loss", self.loss, DPO_LOSSES)
        check_range("dpo.label_smoothing", self.label_smoothing, 0, 0.5, high_open=True)
        require(self.loss != "ipo" or self.label_smoothing == 0,
                "dpo.label_smoothing applies to the sigmoid and robust losses; set it to 0 with dpo.loss=ipo")
        check_choice("dpo.reference", self.reference, DPO_REFERENCES)


@dataclass
class SFTPromptTuningConfig:
    """Prompt tuning (``lmstack sft --prompt-tuning``): the fields of lmstack.models.peft.PromptTuningConfig.

    ``init``: random (normal, the embedding table's scale) | vocab (embeddings of random vocabulary ids) |
    text (the embeddings of ``init_text``'s tokens, repeated or cut to ``num_virtual_tokens``)."""

    num_virtual_tokens: int = 20  # trainable vectors before every conversation; they use up context
    init: str = "random"
    init_text: str = ""
    seed: int = 0  # of the random and vocab initialisations

    SECTION = "prompt_tuning"  # class constants (unannotated, so not fields)
    INITS = ("random", "vocab", "text")

    def validate(self) -> None:
        check_range(f"{self.SECTION}.num_virtual_tokens", self.num_virtual_tokens, 1, integer=True)
        check_choice(f"{self.SECTION}.init", self.init, self.INITS)
        require(self.init != "text" or bool(self.init_text),
                f"{self.SECTION}.init=text needs {self.SECTION}.init_text (e.g. 'Answer the question:')")
        check_range(f"{self.SECTION}.seed", self.seed, 0, 2**63, high_open=True, integer=True)


@dataclass
class SFTPrefixTuningConfig(SFTPromptTuningConfig):
    """Prefix tuning (``lmstack sft --prefix-tuning``): per-layer key / value prefixes that start as what the
    frozen model computes for ``init`` tokens (vocab: random vocabulary ids; text: ``init_text``)."""

    init: str = "vocab"

    SECTION = "prefix_tuning"
    INITS = ("vocab", "text")


@dataclass
class RunConfig:
    model: ModelConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sft: SFTConfig | None = None  # only in fine-tuning runs
    lora: SFTLoRAConfig | None = None  # only in LoRA fine-tuning runs (lmstack sft --lora)
    prompt_tuning: SFTPromptTuningConfig | None = None  # only in lmstack sft --prompt-tuning runs
    prefix_tuning: SFTPrefixTuningConfig | None = None  # only in lmstack sft --prefix-tuning runs
    grpo: GRPOConfig | None = None  # only in lmstack grpo runs
    ppo: PPOConfig | None = None  # only in lmstack ppo runs
    reward: RewardConfig | None = None  # only in reward-model runs (lmstack reward)
    dpo: DPOConfig | None = None  # only in DPO runs (lmstack dpo)

    def validate(self) -> None:
        self.model.validate()
        self.optim.validate()
        self.train.validate()
        self.parallel.validate()
        if self.sft is not None:
            self.sft.validate()
        if self.lora is not None:
            self.lora.validate()
        for rl in (self.grpo, self.ppo):
            if rl is not None:
                rl.validate()
        for section in (self.reward, self.dpo, self.prompt_tuning, self.prefix_tuning):
            if section is not None:
                section.validate()
        require(self.train.seq_len <= self.model.block_size,
                f"train.seq_len={self.train.seq_len} exceeds model.block_size={self.model.block_size}; "
                "lower train.seq_len or raise model.block_size")

    def to_dict(self) -> dict[str, Any]:
        sections = {"model": model_config_to_dict(self.model), "optim": dataclasses.asdict(self.optim),
                    "train": dataclasses.asdict(self.train), "parallel": dataclasses.asdict(self.parallel)}
        if self.sft is not None:
            sections["sft"] = dataclasses.asdict(self.sft)
        if self.lora is not None:
            sections["lora"] = dataclasses.asdict(self.lora)
        for name in ("grpo", "ppo", "reward", "dpo", "prompt_tuning", "prefix_tuning"):
            if getattr(self, name) is not None:
                sections[name] = dataclasses.asdict(getattr(self, name))
        return sections

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        if not isinstance(d, dict) or "model" not in d:
            raise ConfigError("a run config is a mapping with a model section (and optional optim, train, parallel)")
        return cls(model=model_config_from_dict(d["model"]),
                   optim=_from_fields(OptimConfig, d.get("optim", {}), "optim"),
                   train=_from_fields(TrainConfig, d.get("train", {}), "train"),
                   parallel=_from_fields(ParallelConfig, d.get("parallel", {}), "parallel"),
                   sft=_from_fields(SFTConfig, d["sft"], "sft") if d.get("sft") is not None else None,
                   lora=_from_fields(SFTLoRAConfig, d["lora"], "lora") if d.get("lora") is not None else None,
                   prompt_tuning=_from_fields(SFTPromptTuningConfig, d["prompt_tuning"], "prompt_tuning")
                   if d.get("prompt_tuning") is not None else None,
                   prefix_tuning=_from_fields(SFTPrefixTuningConfig, d["prefix_tuning"], "prefix_tuning")
                   if d.get("prefix_tuning") is not None else None,
                   grpo=_from_fields(GRPOConfig, d["grpo"], "grpo") if d.get("grpo") is not None else None,
                   ppo=_from_fields(PPOConfig, d["ppo"], "ppo") if d.get("ppo") is not None else None,
                   reward=_from_fields(RewardConfig, d["reward"], "reward") if d.get("reward") is not None else None,
                   dpo=_from_fields(DPOConfig, d["dpo"], "dpo") if d.get("dpo") is not None else None)


# ----------------------------------------------------------------------------- model configs <-> dicts

def model_config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"model must be a mapping of keys to values, not {d!r}")
    family, known = d.get("family", "gpt"), _model_configs()
    if not isinstance(family, str):
        raise ConfigError(f"model.family={family!r} must be a family name; choose one of {sorted(known)}")
    if family not in known:
        raise ConfigError(f"model.family={family!r} is not known; choose one of {sorted(known)}")
    return _from_fields(known[family], d, "model")


def _from_fields(cls: type, d: dict[str, Any], prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix} must be a mapping of keys to values, not {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(prefix + '.' + str(k) for k in unknown)}; "
                          f"valid keys: {', '.join(sorted(names))}")
    # values from a file (a checkpoint's config) get the same type conversion as command-line overrides
    return cls(**{name: _coerce(value, hints[name], f"{prefix}.{name}") for name, value in d.items()})


# ----------------------------------------------------------------------------- overrides

def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a string (from the CLI) or a parsed YAML/TOML value into the field's declared type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (str,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        return [_coerce(v, inner, key) for v in value]
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp in (int, float) and isinstance(value, bool):
            raise ValueError  # true/false in a file is not a number, although Python would say 1/0
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{key}={value!r}: expected a value of type {getattr(tp, '__name__', tp)}") from None
    return value


def _field_types(obj: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


_SHAPE_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")


def apply_overrides(cfg: RunConfig, overrides: list[str] | dict[str, Any]) -> RunConfig:
    """Apply ``section.key=value`` overrides (a list of strings or a flat dict) to ``cfg`` in place.

    ``model.family=bert`` switches the model config to that family's defaults first, keeping the
    shared shape fields (vocab_size, block_size, n_layer, n_head, n_embd) that both families have,
    and any other shared field only where the old config had moved it off its own family's default
    (a preset's choice): the old family's defaults (e.g. GPT's swiglu) are not the new family's.
    """
    items = _as_items(overrides)
    # family switches must happen before the other model keys are applied
    for key, value in items:
        if key == "model.family" and value != cfg.model.family:
            old = model_config_to_dict(cfg.model)
            new_cls = _model_configs().get(str(value))
            if new_cls is None:
                raise ConfigError(f"model.family={value!r} is not known; choose one of {sorted(_model_configs())}")
            old_defaults = model_config_to_dict(type(cfg.model)())
            keep = {f.name: old[f.name] for f in dataclasses.fields(new_cls)
                    if f.name in old and f.name != "family"
                    and (f.name in _SHAPE_FIELDS or old[f.name] != old_defaults.get(f.name))}
            cfg.model = new_cls(**keep)
    for key, value in items:
        if key != "model.family":
            optional = tuple(name for name in ("sft", "lora", "prompt_tuning", "prefix_tuning", "grpo", "ppo",
                                               "reward", "dpo")
                             if getattr(cfg, name) is not None)
            set_section_value(cfg, key, value, ("model", "optim", "train", "parallel") + optional)
    return cfg


def set_section_value(cfg: Any, key: str, value: Any, sections: Sequence[str]) -> None:
    """Set ``SECTION.NAME = value`` on a config made of dataclass sections, converted to the field's type.

    Shared by the run config and the data-cleaning config, so both take the same ``key=value`` syntax
    and give the same errors for unknown sections and keys."""
    section, _, name = key.partition(".")
    if section not in sections or not name:
        raise ConfigError(f"unknown config section {section!r} (in key {key!r}): keys look like SECTION.NAME; "
                          f"valid sections: {', '.join(sections)}")
    target = getattr(cfg, section)
    types_ = _field_types(target)
    if name not in types_:
        raise ConfigError(f"unknown key {key!r}; valid {section} keys: {', '.join(sorted(types_))}")
    setattr(target, name, _coerce(value, types_[name], key))


def _as_items(overrides: Sequence[str] | dict[str, Any], example: str = "model.n_layer=4") -> list[tuple[str, Any]]:
    """``key=value`` strings, or a nested/flat dict, as (dotted key, value) pairs."""
    if isinstance(overrides, dict):
        return list(_flatten(overrides).items())
    items = []
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not of the form section.key=value (e.g. {example})")
        k, v = o.split("=", 1)
        items.append((k.strip(), v.strip()))
    return items


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml), TOML (.toml) or JSON file into a flat ``{dotted.key: value}`` dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {path}: use a .yaml, .yml, .toml or .json file")
    except ConfigError:
        raise
    except Exception as e:  # parse errors from yaml / tomllib / json
        raise ConfigError(f"config file {path} could not be parsed: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return _flatten(data)


# ----------------------------------------------------------------------------- presets

def tiny() -> RunConfig:
    """A ~3.5M-parameter Llama-style model that trains on a 2-core CPU in minutes."""
    from lmstack.models.gpt import GPTConfig

    return RunConfig(
        model=GPTConfig(vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_kv_head=4, n_embd=256),
        optim=OptimConfig(lr=2e-3, warmup_steps=50, weight_decay=0.1),
        train=TrainConfig(batch_size=16, seq_len=256, max_steps=600, eval_every=200, eval_batches=10,
                          ckpt_every=200, log_every=10),
    )


def gpt2_124m() -> RunConfig:
    """GPT-2 small shapes (12 x 768, 12 heads, 1024 context, 50304 vocab) for one GPU, bf16 + compile."""
    from lmstack.models.gpt import GPTConfig

    return RunConfig(
        model=GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_kv_head=12, n_embd=768,
                        norm="layernorm", activation="gelu", position="learned", bias=True,
                        tie_embeddings=True),
        optim=OptimConfig(lr=6e-4, warmup_steps=700, min_lr_ratio=0.1),
        train=TrainConfig(batch_size=32, seq_len=1024, grad_accum=16, max_steps=19073, eval_every=250,
                          ckpt_every=1000, compile=True, dtype="bf16"),
    )


def tiny_t5() -> RunConfig:
    """The tiny run as a T5 encoder-decoder (3 + 3 layers, ~the tiny decoder's compute per token)
    pretrained with span corruption."""
    from lmstack.models.t5 import T5Config

    cfg = tiny()
    cfg.model = T5Config(vocab_size=4096, block_size=256, n_layer=3, n_decoder_layer=3, n_head=4, n_embd=256)
    return cfg


def tiny_moe() -> RunConfig:
    """The tiny run as a mixture-of-experts decoder: 8 experts, top-2 routing, every layer MoE."""
    from lmstack.models.moe import MoEConfig

    cfg = tiny()
    cfg.model = MoEConfig(vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_embd=256, n_expert=8, top_k=2)
    return cfg


def tiny_glm() -> RunConfig:
    """The tiny run as a GLM prefix decoder pretrained with autoregressive blank infilling."""
    from lmstack.models.gpt import GLMConfig

    cfg = tiny()
    cfg.model = GLMConfig(**{k: v for k, v in vars(cfg.model).items() if k != "family"})
    return cfg


def tiny_prefixlm() -> RunConfig:
    """The tiny run as a prefix LM (bidirectional over a random prefix, loss on the rest)."""
    from lmstack.models.gpt import PrefixLMConfig

    cfg = tiny()
    cfg.model = PrefixLMConfig(**{k: v for k, v in vars(cfg.model).items() if k != "family"})
    return cfg


PRESETS: dict[str, Callable[[], RunConfig]] = {"tiny": tiny, "gpt2-124m": gpt2_124m, "tiny-t5": tiny_t5,
                                               "tiny-moe": tiny_moe, "tiny-glm": tiny_glm,
                                               "tiny-prefixlm": tiny_prefixlm}


def get_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


def build_run_config(preset: str, config_file: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Preset, then config file, then command-line overrides (later wins); validated."""
    cfg = get_preset(preset)
    if config_file:
        apply_overrides(cfg, load_config_file(config_file))
    if overrides:
        apply_overrides(cfg, overrides)
    cfg.validate()
    return cfg
