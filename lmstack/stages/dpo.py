"""`lmstack dpo`: direct preference optimisation of a decoder on preference pairs. Wiring over train/stage.py.

    python -m lmstack.data.preference --make-pairs pairs.jsonl --n 2000
    lmstack dpo --model runs/tiny-sft/model --data pairs.jsonl --out runs/tiny-dpo train.max_steps=200 dpo.beta=0.1
    lmstack dpo --model models/smollm2 --data pairs.jsonl --out runs/s-dpo --lora lora.r=16 dpo.loss=ipo
    lmstack dpo --model runs/tiny-sft/model --data pairs.jsonl --out runs/tiny-dpo --resume

The policy starts as MODEL (a decoder checkpoint with its tokenizer, usually the SFT model) and trains with
the DPO objective of lmstack/train/preference_losses.py (``dpo.loss`` sigmoid | ipo | robust, ``dpo.beta``,
``dpo.label_smoothing``, and ``dpo.sft_weight``, default 1: the chosen reply's per-token NLL added with that
weight, RPO, which keeps chosen replies likely when they share tokens with rejected ones; 0 is the paper's plain
DPO) against a frozen reference: MODEL
itself, or ``--reference CKPT`` (same vocabulary required). ``dpo.reference``:

- ``precomputed`` (default): before training the reference scores every pair once (its summed completion
  log-probabilities travel in the batches as ``ref_logps``), and only the policy stays in memory;
- ``copy``: a frozen copy scores each batch as it comes; with ``--lora`` and no ``--reference`` it is the
  policy itself with its adapters switched off, so there is no copy at all.

Both give the same numbers up to float rounding (the precomputed pass sees other batch shapes). The run
config is the model's own, the preset's ``optim`` and ``train`` sections and the ``dpo`` section
(lmstack.config.DPOConfig), then the config file and the ``key=value`` overrides. ``--lora`` adds the
``lora`` section and trains only adapters (lmstack.models.peft); at the end OUT/adapter is the adapter in
peft's layout and OUT/model the merged model, as in ``lmstack sft --lora``.

OUT/model is a normal checkpoint with the tokenizer. OUT/summary.json adds ``data`` (pairs read, used, skipped,
ratings skipped, truncated, dropped) and ``heldout``: on the held-out pairs after training, the implicit-reward
accuracy (the share of pairs whose chosen completion gained more log-probability over the reference than the
rejected one) and the mean chosen / rejected rewards and margin. Checkpoints, exact resume, metrics and
validation (``val_reward_accuracy`` and the rest, averaged over tokens) come from the one loop.
Caveat: a precomputed run computes the reference log-probabilities again when it resumes (one pass).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from lmstack.atomic import write_json_atomic
from lmstack.checkpoint import load_checkpoint, load_model_state, model_state, read_config
from lmstack.config import DPOConfig, RunConfig
from lmstack.data.preference import PreferenceLoader, PreferencePair
from lmstack.errors import ConfigError
from lmstack.models import build_model
from lmstack.models.peft import LoRAConfig, apply_lora, trainable_parameters
from lmstack.stages.preference import (batches_on, describe, load_source, prepare_preference_run, same_vocabulary,
                                      write_adapter_and_merged)
from lmstack.train.loop import autocast_context
from lmstack.train.parallel import holds_shards
from lmstack.train.preference_losses import (DPOLoss, ReferenceFn, adapters_off_reference, completion_logps,
                                             dpo_losses, dpo_objective, frozen_reference, precomputed_reference)
from lmstack.train.stage import StageParts, run_stage


def dpo(model: str | Path, data: list[str] | None, out_dir: str | Path, preset: str = "tiny",
        config_file: str | None = None, overrides: list[str] | None = None, resume: bool = False,
        overwrite: bool = False, progress: bool = True, lora: bool = False,
        reference: str | Path | None = None) -> dict[str, Any]:
    """DPO-train MODEL on the preference files ``data`` into OUT_DIR; returns the run summary dict.

    ``reference`` is the reference checkpoint (None: MODEL, or on resume the run's own reference)."""
    run = prepare_preference_run("dpo", DPOConfig, model, data, out_dir, preset, config_file, overrides, resume,
                                 lora=lora)
    cfg, tokenizer, stats = run.cfg, run.source.tokenizer, run.stats
    if reference is None and run.checkpoint is not None:
        reference = read_config(run.checkpoint).get("data", {}).get("reference_model")
    reference_model = _load_reference(reference, tokenizer) if reference is not None else None
    source_weights, source_path = model_state(run.source.model), run.source.path
    del run.source
    lora_cfg = _lora_config(cfg)
    dcfg = cfg.dpo
    loss = DPOLoss(beta=dcfg.beta, kind=dcfg.loss, label_smoothing=dcfg.label_smoothing, sft_weight=dcfg.sft_weight)
    trained: dict[str, Any] = {}

    def build(cfg: RunConfig, dist) -> StageParts:
        tcfg = cfg.train
        policy = build_model(cfg.model)
        load_model_state(policy, source_weights, source_path)
        source_weights.clear()
        ref_module = reference_model if reference_model is not None else policy
        if dcfg.reference == "precomputed":
            attach_reference_logps(ref_module, [*run.pairs.train, *run.pairs.val], tokenizer.pad_id,
                                   tcfg.batch_size, dist.device, tcfg.dtype)
            ref_fn: ReferenceFn = precomputed_reference
        elif reference_model is not None or lora_cfg is None:
            ref_fn = frozen_reference(reference_model if reference_model is not None else copy.deepcopy(policy))
        else:
            ref_fn = adapters_off_reference
        adapted = ""
        if lora_cfg is not None:  # before the loop restores a checkpoint: it holds the factors by these names
            modules = apply_lora(policy, lora_cfg)
            trainable, total = trainable_parameters(policy)
            trained["lora"] = {"trainable_params": trainable, "total_params": total, "modules": modules}
            adapted = f"; LoRA r={lora_cfg.r} on {len(modules)} layers: {trainable:,} of {total:,} parameters train"
        trained.update(model=policy, reference=ref_fn)
        return StageParts(model=policy, objective=dpo_objective(loss, ref_fn), tokenizer=tokenizer,
                          train_loader=PreferenceLoader(run.pairs.train, tcfg.batch_size, seed=tcfg.seed,
                                                        pad_id=tokenizer.pad_id, rank=dist.dp_rank,
                                                        world_size=dist.dp_size),
                          val_loader=PreferenceLoader(run.pairs.val, tcfg.batch_size, pad_id=tokenizer.pad_id,
                                                      shuffle=False, rank=dist.dp_rank, world_size=dist.dp_size),
                          description=f"{describe(stats)}; reference {dcfg.reference}{adapted}")

    extra = {"data": {"source_model": str(source_path),
                      **({"reference_model": str(reference)} if reference is not None else {})}}
    summary = run_stage(cfg, out_dir, build, resume=resume, overwrite=overwrite, resume_from=run.checkpoint,
                        progress=progress, extra_config=extra)
    summary["data"] = stats.to_dict()
    if lora_cfg is not None:
        summary["lora"] = trained["lora"]
    if int(os.environ.get("RANK", "0")) == 0:
        if holds_shards(trained["model"]):  # FSDP2 / TP pieces: score the consolidated weights the loop wrote
            trained["model"] = load_checkpoint(Path(out_dir) / "model").model
        summary["heldout"] = implicit_reward_metrics(trained["model"], trained["reference"], run.pairs.val,
                                                     tokenizer.pad_id, cfg.train.batch_size, loss.beta)
        if lora_cfg is not None:
            write_adapter_and_merged(trained["model"], lora_cfg, Path(out_dir), source_path, tokenizer)
        write_json_atomic(Path(out_dir) / "summary.json", summary)
    return summary


def _lora_config(cfg: RunConfig) -> LoRAConfig | None:
    """The adapter settings of a ``--lora`` run (None otherwise); a quantized base is an sft feature."""
    if cfg.lora is None:
        return None
    settings = dataclasses.asdict(cfg.lora)
    if settings.pop("quantize", "none") != "none":
        raise ConfigError("lora.quantize applies to lmstack sft; DPO trains adapters on an unquantized base "
                          "(set lora.quantize=none)")
    return LoRAConfig(**settings)


def _load_reference(path: str | Path, tokenizer: Any) -> nn.Module:
    """The reference checkpoint's model; ConfigError when its vocabulary is not the policy's."""
    ref = load_source(path, "a DPO reference")
    if not same_vocabulary(ref.tokenizer, tokenizer):
        raise ConfigError(f"the reference {path} has another tokenizer than the policy (vocabulary of "
                          f"{ref.tokenizer.vocab_size:,} vs {tokenizer.vocab_size:,} tokens, or different tokens); "
                          "DPO compares log-probabilities of the same token ids, so use a reference with the "
                          "policy's tokenizer")
    return ref.model


@torch.no_grad()
def attach_reference_logps(reference: nn.Module, pairs: Sequence[PreferencePair], pad_id: int, batch_size: int,
                           device: torch.device, dtype: str) -> None:
    """Score every distinct pair once with ``reference`` (eval mode, the training precision) and store the summed
    completion log-probabilities in ``pair.ref_logps``; the model goes back to the CPU afterwards."""
    distinct = list({id(p): p for p in pairs}.values())  # weighted files repeat the same pair objects
    reference.to(device).eval()
    loader = PreferenceLoader(distinct, batch_size, pad_id=pad_id, shuffle=False)
    done = 0
    for batch in batches_on(device, loader):
        with autocast_context(device, dtype):
            logps = completion_logps(reference, batch).float().cpu()
        half = logps.shape[0] // 2
        for i in range(half):
            distinct[done + i].ref_logps = (float(logps[i]), float(logps[half + i]))
        done += half
    reference.train().cpu()


@torch.no_grad()
def implicit_reward_metrics(policy: nn.Module, reference: ReferenceFn, pairs: Sequence[PreferencePair],
                            pad_id: int, batch_size: int, beta: float) -> dict[str, float]:
    """On ``pairs``: accuracy (chosen implicit reward above rejected), mean chosen / rejected reward and margin."""
    was_training = policy.training
    policy.eval()
    device = next(policy.parameters()).device
    chosen: list[float] = []
    rejected: list[float] = []
    for batch in batches_on(device, PreferenceLoader(pairs, batch_size, pad_id=pad_id, shuffle=False)):
        _, c, r = dpo_losses(completion_logps(policy, batch), reference(policy, batch).to(device),
                             DPOLoss(beta=beta))
        chosen += c.tolist()
        rejected += r.tolist()
    policy.train(was_training)
    n = max(len(chosen), 1)
    return {"pairs": len(chosen), "accuracy": sum(c > r for c, r in zip(chosen, rejected)) / n,
            "reward_chosen": sum(chosen) / n, "reward_rejected": sum(rejected) / n,
            "margin": sum(c - r for c, r in zip(chosen, rejected)) / n}
