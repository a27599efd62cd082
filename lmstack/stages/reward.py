"""`lmstack reward`: train a reward model on preference pairs; `lmstack reward-score`: score with one.

    python -m lmstack.data.preference --make-pairs pairs.jsonl --n 2000
    lmstack reward --model runs/tiny-sft/model --data pairs.jsonl --out runs/rm train.max_steps=200
    lmstack reward --model runs/tiny-sft/model --data pairs.jsonl --out runs/rm reward.center_coef=0.01
    lmstack reward-score --model runs/rm --data pairs.jsonl            # held-out style accuracy on pairs
    lmstack reward-score --model runs/rm --data answers.jsonl --out scored.jsonl   # {prompt, completion} records

    from lmstack.stages.reward import score
    rewards = score(rm, tokenizer, ["What is 2 + 2?"], ["4"])      # one float per (prompt, completion)

The reward model is the starting model (a decoder checkpoint with its tokenizer, usually the SFT model) with a
scalar head on its final hidden states (lmstack.models.heads.ScalarHeadModel; the head starts at zero). It is
trained with the Bradley–Terry loss on the reward of each completion, read at its last token
(lmstack.train.preference_losses.reward_objective; ``reward.center_coef`` adds the centring term). Every
weight trains; the run config is the model's own, the preset's ``optim`` and ``train`` sections, and the
``reward`` section (lmstack.config.RewardConfig) with the config file and ``key=value`` overrides on top.

OUT/model is a checkpoint with ``"head": "scalar"`` in config.json, which ``load_checkpoint`` rebuilds as the
backbone plus head (PPO's value model starts from it too). OUT/summary.json adds ``data`` (pairs read, used,
skipped, ratings skipped, truncated, dropped) and ``heldout_accuracy``: the share of held-out pairs whose
chosen completion the final model scores higher. Resume, checkpoints, metrics and validation (``val_accuracy``,
averaged over tokens) come from the one training loop.

Scoring renders each (prompt, completion) with the model's chat format exactly as training did (user prompt,
assistant completion) and reads the value at the last token of the completion.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from lmstack.atomic import write_json_atomic, write_text_atomic
from lmstack.checkpoint import load_checkpoint, load_model_state, model_state
from lmstack.config import RewardConfig, RunConfig
from lmstack.data.instruct import iter_records
from lmstack.data.preference import (PreferenceLoader, PreferencePair, fit_context, record_pair, render_completion,
                                     render_pair)
from lmstack.errors import DataError
from lmstack.models import build_model
from lmstack.models.heads import ScalarHeadModel, require_head, score_at_last
from lmstack.stages.preference import describe, prepare_preference_run
from lmstack.train.preference_losses import reward_objective
from lmstack.train.stage import StageParts, run_stage


def reward(model: str | Path, data: list[str] | None, out_dir: str | Path, preset: str = "tiny",
           config_file: str | None = None, overrides: list[str] | None = None, resume: bool = False,
           overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train a reward model from MODEL on the preference files ``data`` into OUT_DIR; returns the summary dict."""
    run = prepare_preference_run("reward", RewardConfig, model, data, out_dir, preset, config_file, overrides,
                                 resume)
    cfg, tokenizer, stats = run.cfg, run.source.tokenizer, run.stats
    source_weights, source_path = model_state(run.source.model), run.source.path
    del run.source  # the weights stay (in source_weights) until build() has loaded them
    trained: dict[str, nn.Module] = {}

    def build(cfg: RunConfig, dist) -> StageParts:
        tcfg = cfg.train
        backbone = build_model(cfg.model)
        load_model_state(backbone, source_weights, source_path)
        source_weights.clear()
        trained["model"] = model = ScalarHeadModel(backbone)
        return StageParts(model=model, objective=reward_objective(cfg.reward.center_coef), tokenizer=tokenizer,
                          train_loader=PreferenceLoader(run.pairs.train, tcfg.batch_size, seed=tcfg.seed,
                                                        pad_id=tokenizer.pad_id, rank=dist.dp_rank,
                                                        world_size=dist.dp_size),
                          val_loader=PreferenceLoader(run.pairs.val, tcfg.batch_size, pad_id=tokenizer.pad_id,
                                                      shuffle=False, rank=dist.dp_rank, world_size=dist.dp_size),
                          description=describe(stats))

    summary = run_stage(cfg, out_dir, build, resume=resume, overwrite=overwrite, resume_from=run.checkpoint,
                        progress=progress, extra_config={"head": "scalar", "data": {"source_model": str(source_path)}})
    summary["data"] = stats.to_dict()
    if int(os.environ.get("RANK", "0")) == 0:
        summary["heldout_accuracy"] = pair_accuracy(trained["model"], run.pairs.val, tokenizer.pad_id,
                                                    cfg.train.batch_size)
        write_json_atomic(Path(out_dir) / "summary.json", summary)
    return summary


@torch.no_grad()
def sequence_scores(rm: ScalarHeadModel, sequences: Sequence[list[int]], pad_id: int, batch_size: int = 8
                    ) -> list[float]:
    """The reward model's value at the last token of each token sequence (right-padded batches)."""
    was_training = rm.training
    rm.eval()
    device = next(rm.parameters()).device
    scores: list[float] = []
    for start in range(0, len(sequences), batch_size):
        rows = sequences[start:start + batch_size]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
        mask = mask.to(device)
        scores += score_at_last(rm(ids.to(device), mask), mask).tolist()
    rm.train(was_training)
    return scores


def pair_scores(rm: ScalarHeadModel, pairs: Sequence[PreferencePair], pad_id: int, batch_size: int = 8
                ) -> tuple[list[float], list[float]]:
    """(chosen scores, rejected scores) of ``pairs`` under the reward model."""
    return (sequence_scores(rm, [p.prompt + p.chosen for p in pairs], pad_id, batch_size),
            sequence_scores(rm, [p.prompt + p.rejected for p in pairs], pad_id, batch_size))


def pair_accuracy(rm: ScalarHeadModel, pairs: Sequence[PreferencePair], pad_id: int, batch_size: int = 8) -> float:
    """The share of ``pairs`` whose chosen completion scores higher than the rejected one."""
    chosen, rejected = pair_scores(rm, pairs, pad_id, batch_size)
    return sum(c > r for c, r in zip(chosen, rejected)) / max(len(chosen), 1)


@torch.no_grad()
def score(rm: ScalarHeadModel, tokenizer: Any, prompts: Sequence[str | list[dict[str, Any]]],
          completions: Sequence[str | list[dict[str, Any]]], batch_size: int = 8) -> list[float]:
    """One reward per (prompt, completion): each pair rendered in the chat format, scored at its last token.

    Prompts and completions are strings (a user message, an assistant reply) or message lists."""
    if len(prompts) != len(completions):
        raise DataError(f"{len(prompts)} prompts for {len(completions)} completions; give one prompt per completion")
    sequences = []
    for prompt, completion in zip(prompts, completions):
        prompt_messages, completion_messages, _ = record_pair({"prompt": prompt, "chosen": completion, "rejected": ""})
        prompt_ids, ids, _ = render_completion(tokenizer, prompt_messages, completion_messages, "completion")
        room = rm.config.block_size - len(ids)  # prompt tokens that fit: the prompt is cut from the left
        if room < 1:
            raise DataError(f"a completion of {len(ids)} tokens does not fit the reward model's context of "
                            f"{rm.config.block_size} tokens; shorten it")
        sequences.append(prompt_ids[-room:] + ids)
    return sequence_scores(rm, sequences, tokenizer.pad_id, batch_size)


def score_file(model: str | Path, data: str | Path, out: str | Path | None = None, batch_size: int = 8
               ) -> dict[str, Any]:
    """Score every record of DATA with the reward model MODEL; returns a summary.

    Pair records (``chosen`` and ``rejected``) give ``accuracy`` (the share scored in the right order) and the
    mean margin; ``{"prompt", "completion"}`` records give the mean score. With ``out``, every record is written
    back as JSONL with ``score`` (or ``score_chosen`` / ``score_rejected``) added."""
    ckpt = load_checkpoint(model)
    rm = require_head(ckpt.model, ckpt.path)
    tokenizer = ckpt.tokenizer
    records, lines = [], {}
    for line, record in iter_records(Path(data)):
        if isinstance(record, DataError):
            raise DataError(f"{data}:{line}: {record}")
        if not isinstance(record, dict) or record.get("kind") == "rating" or not (
                {"chosen", "rejected"} <= record.keys() or {"prompt", "completion"} <= record.keys()):
            raise DataError(f"{data}:{line}: score records are pairs {{prompt, chosen, rejected}} or "
                            "{prompt, completion}")
        records.append(record)
        lines[id(record)] = line
    pairs = [r for r in records if "chosen" in r]
    singles = [r for r in records if "chosen" not in r]
    summary: dict[str, Any] = {"model": str(ckpt.path), "data": str(data), "records": len(records)}
    if pairs:
        rendered = []
        for record in pairs:
            try:
                pair = fit_context(render_pair(tokenizer, *record_pair(record)), rm.config.block_size, "truncate")
                if pair is None:
                    raise DataError(f"a completion does not fit the reward model's context of "
                                    f"{rm.config.block_size} tokens")
            except DataError as e:
                raise DataError(f"{data}:{lines[id(record)]}: {e}") from None
            rendered.append(pair)
        chosen, rejected = pair_scores(rm, rendered, tokenizer.pad_id, batch_size)
        for record, c, r in zip(pairs, chosen, rejected):
            record["score_chosen"], record["score_rejected"] = c, r
        summary.update(pairs=len(pairs), accuracy=sum(c > r for c, r in zip(chosen, rejected)) / len(pairs),
                       mean_margin=sum(c - r for c, r in zip(chosen, rejected)) / len(pairs))
    if singles:
        scores = score(rm, tokenizer, [r["prompt"] for r in singles], [r["completion"] for r in singles], batch_size)
        for record, value in zip(singles, scores):
            record["score"] = value
        summary.update(completions=len(singles), mean_score=sum(scores) / len(scores))
    if out is not None:
        write_text_atomic(Path(out), "".join(json.dumps(r) + "\n" for r in records))
        summary["out"] = str(out)
    return summary
