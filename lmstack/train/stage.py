"""The setup every training stage shares, so a stage is a dataset + an objective + wiring.

    cfg, checkpoint = stage_config(out_dir, preset, config_file, overrides, resume)
    ...stage-specific config changes (pretrain fits the vocabulary to the tokenizer)...
    summary = run_stage(cfg, out_dir, build, resume=resume, overwrite=overwrite, resume_from=checkpoint)

where ``build(cfg, dist) -> StageParts`` makes the model, the train and validation loaders, the
objective and the tokenizer for this process (``dist.rank`` of ``dist.world_size``). The rest is here:

- the config of a resumed run is the one it started with (from its newest intact checkpoint), with the
  config file and overrides given now applied on top, so ``--resume train.max_steps=2000`` extends a run;
  the ``parallel.*`` layout is not inherited: it belongs to this launch (a run saved at dp_shard=2 resumes
  in one process, or at tp=2, from the same checkpoint);
- the layout is checked against the world size and the model (lmstack/train/parallel/mesh.py) and the
  stage (:func:`check_stage_layout`), and a resumed checkpoint against the model config, before any
  process starts work (one line each);
- loaders shard by data-parallel replica: ``build`` gets ``dist.dp_rank`` of ``dist.dp_size`` (the
  processes of one tensor- or pipeline-parallel group read the same batches); a stage never shards by
  ``dist.rank``;
- the run directory is checked before anything is written (:func:`prepare_run_dir`): a directory
  holding a previous run is refused unless the user says ``--resume`` (continue it) or ``--overwrite``
  (replace its training outputs); a directory holding files lmstack did not write for a training run
  is refused unless ``--overwrite``, and even then only the training outputs are removed;
- the process group under torchrun (set up and torn down), seeding (the same seed on every rank, so
  DDP replicas start identical), a one-line model summary, the loop (train/loop.py), and
  RUN/summary.json (the TrainResult, FLOPs per token and the config).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from lmstack.atomic import write_json_atomic
from lmstack.checkpoint import latest_checkpoint, read_config, set_aside_newer
from lmstack.config import (ParallelConfig, RunConfig, apply_overrides, build_run_config, load_config_file,
                            model_config_to_dict)
from lmstack.errors import CheckpointError, ConfigError, UserError
from lmstack.train.dist import DistInfo, cleanup_distributed, init_distributed
from lmstack.train.losses import Objective
from lmstack.train.loop import seed_everything, train
from lmstack.train.parallel import Layout, data_parallel_rank, resolve_layout

# what a training run writes into its directory (adapter: `sft --lora`); nothing else there is touched
TRAINING_OUTPUTS = ("checkpoints", "model", "adapter", "metrics.jsonl", "summary.json", "loss.png", "tb")


@dataclass
class StageParts:
    """What a stage's ``build(cfg, dist)`` makes for one process."""

    model: nn.Module
    train_loader: Any  # iterable of batches (dicts of tensors) with state_dict() / load_state_dict()
    val_loader: Any  # one pass of batches per iter(); bytes_per_token enables bits-per-byte
    objective: Objective
    optimizer: Any = None  # a torch optimizer over the model's parameters (None: AdamW from cfg.optim)
    tokenizer: Any = None  # saved with every checkpoint
    description: str = ""  # what the data is, for the startup line ("1,234,567 training tokens")


def _is_main_process() -> bool:
    """Rank 0 (or no torchrun): known from the environment before the process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def _say(message: str) -> None:
    if _is_main_process():
        print(message, file=sys.stderr, flush=True)


def stage_config(out_dir: str | Path, preset: str, config_file: str | None, overrides: list[str] | None,
                 resume: bool, base: RunConfig | None = None) -> tuple[RunConfig, Path | None]:
    """The run config and, when resuming, the checkpoint to resume from (None: start from scratch).

    Resuming takes the config of the newest intact checkpoint (a damaged newer one is reported and
    passed over) and applies ``config_file`` and ``overrides`` on top. Otherwise, and when there is no
    intact checkpoint, the config is ``base`` or the preset with the file and overrides.
    """
    checkpoint = None
    if resume:
        skipped: list[str] = []
        checkpoint = latest_checkpoint(Path(out_dir) / "checkpoints", skipped)
        for problem in skipped:
            _say(f"checkpoint {problem}; falling back to an older one")
        if checkpoint is None:
            _say(f"no intact checkpoint in {Path(out_dir) / 'checkpoints'} to resume from; starting from scratch")
    if checkpoint is not None and base is None:
        cfg = RunConfig.from_dict(read_config(checkpoint))
        cfg.parallel = ParallelConfig()  # the layout is this launch's (its overrides below), not the saved run's
        if config_file:
            apply_overrides(cfg, load_config_file(config_file))
        apply_overrides(cfg, overrides or [])
        return cfg, checkpoint
    return base or build_run_config(preset, config_file, overrides), checkpoint


def prepare_run_dir(out_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """Refuse a run directory this run must not write into; with ``overwrite``, remove the old training outputs.

    Allowed: a missing or empty directory; with ``resume``, a previous run's directory; with
    ``overwrite``, anything (only :data:`TRAINING_OUTPUTS` are removed, other files stay).
    """
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it; pass one of them")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; name a directory for the run")
    entries = sorted(out_dir.iterdir())
    if overwrite:
        if _is_main_process():
            _remove_training_outputs(out_dir, entries)
        return
    foreign = [e.name for e in entries if not _is_training_output(e)]
    if foreign and not (resume and set(foreign).isdisjoint(TRAINING_OUTPUTS)):
        shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
        raise UserError(f"--out {out_dir} holds files that are not from an lmstack training run ({shown}); "
                        "choose a new or empty directory, or pass --overwrite to train into it anyway")
    if entries and not resume:
        raise UserError(f"--out {out_dir} already holds a training run; pass --resume to continue it or "
                        "--overwrite to replace it")


def _is_training_output(entry: Path) -> bool:
    """An entry a training run writes: a known name (``model`` only when it is an lmstack checkpoint),
    or the staging leftover of one (``.NAME.tmp-*`` / ``.NAME.old-*``, see lmstack.atomic)."""
    name = entry.name
    if name.startswith("."):
        return any(name.startswith(f".{output}.tmp-") or name.startswith(f".{output}.old-")
                   for output in TRAINING_OUTPUTS)
    if name == "model":
        return _is_lmstack_checkpoint(entry)
    return name in TRAINING_OUTPUTS


def _is_lmstack_checkpoint(path: Path) -> bool:
    try:
        return read_config(path).get("format") == "lmstack"
    except (OSError, ValueError):  # CheckpointError is a ValueError: not a checkpoint, or not ours
        return False


def _remove_training_outputs(out_dir: Path, entries: list[Path]) -> None:
    removed = [e for e in entries if e.name in TRAINING_OUTPUTS or (e.name.startswith(".") and _is_training_output(e))]
    for entry in removed:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    if removed:
        _say(f"--overwrite: removed the previous run's {', '.join(e.name for e in removed)} from {out_dir}")


def _check_same_model(checkpoint: Path, cfg: RunConfig) -> None:
    """CheckpointError when the checkpoint to resume was saved for another model (shapes or family)."""
    saved, wanted = read_config(checkpoint).get("model", {}), model_config_to_dict(cfg.model)
    differing = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if differing:
        shown = ", ".join(f"model.{k}={saved.get(k)!r} (now {wanted.get(k)!r})" for k in differing[:3])
        raise CheckpointError(f"checkpoint {checkpoint} was saved for another model: {shown}; resume without "
                              "model overrides, or start a new run in another --out")


def check_stage_layout(cfg: RunConfig, layout: Layout) -> None:
    """ConfigError (one line) for a stage a parallel layout does not serve; DDP serves every stage.

    Sharded layouts (FSDP2, TP, PP) train whole models: adapter runs (LoRA, prompt and prefix tuning) write
    their adapters from unsharded modules, and the RL stages generate rollouts with the policy outside the
    training step, where sharded processes would have to decode in lockstep. The reward model's scalar
    head has no tensor- or pipeline-parallel plan."""
    if not layout.sharded:
        return
    adapter = next((name for name in ("lora", "prompt_tuning", "prefix_tuning") if getattr(cfg, name) is not None), None)
    if adapter is not None:
        raise ConfigError(f"{adapter.replace('_', ' ')} runs train under data parallelism only (DDP, the default under "
                          f"torchrun), not {layout.describe()}; drop the parallel.* degrees or fine-tune fully")
    rl = next((name for name in ("grpo", "ppo") if getattr(cfg, name) is not None), None)
    if rl is not None:
        raise ConfigError(f"{rl} generates rollouts outside the training step and runs under data parallelism only "
                          f"(DDP, the default under torchrun), not {layout.describe()}; drop the parallel.* degrees")
    if cfg.reward is not None and (layout.tp > 1 or layout.pp > 1):
        raise ConfigError(f"the reward model's scalar head has no tensor or pipeline plan ({layout.describe()}); "
                          "use DDP or parallel.dp_shard (FSDP2)")


def run_stage(cfg: RunConfig, out_dir: str | Path, build: Callable[[RunConfig, DistInfo], StageParts], *,
              resume: bool = False, overwrite: bool = False, resume_from: Path | None = None,
              progress: bool = True, extra_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate, check the run directory, train under torchrun or in one process; returns the summary dict.

    ``resume_from`` is the checkpoint :func:`stage_config` chose (None starts from scratch); ``resume``
    and ``overwrite`` are the user's flags, checked against what OUT_DIR holds (:func:`prepare_run_dir`).
    """
    out_dir = Path(out_dir)
    cfg.validate()
    layout = resolve_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    check_stage_layout(cfg, layout)
    if resume_from is not None:
        _check_same_model(resume_from, cfg)
    prepare_run_dir(out_dir, resume, overwrite)
    if resume and _is_main_process():  # resume_from is the newest intact checkpoint: any newer one is damaged
        for path in set_aside_newer(out_dir / "checkpoints", resume_from):
            _say(f"set the damaged checkpoint aside as {path}")
    dist = init_distributed(cfg.train.device)
    # loaders shard batches by data-parallel replica: the processes of one TP / PP group share a batch
    dist.dp_rank, dist.dp_size = data_parallel_rank(layout, dist.rank), layout.dp
    try:
        seed_everything(cfg.train.seed)  # the same seed on every rank: DDP replicas start identical
        parts = build(cfg, dist)
        if dist.is_main and progress:
            model = parts.model
            params = model.num_params() if hasattr(model, "num_params") else sum(p.numel() for p in model.parameters())
            print(f"model: {cfg.model.family}, {params / 1e6:.2f}M parameters"
                  f"{'; ' + parts.description if parts.description else ''}; device {dist.device}",
                  file=sys.stderr)
        result = train(parts.model, cfg, parts.train_loader, parts.val_loader, parts.objective, out_dir,
                       tokenizer=parts.tokenizer, resume=resume_from or False, info=dist,
                       extra_config=extra_config, progress=progress, optimizer=parts.optimizer)
    finally:
        cleanup_distributed()
    flops_per_token = getattr(parts.model, "flops_per_token", None)
    summary = {**result.to_dict(), "flops_per_token": flops_per_token(cfg.train.seq_len) if flops_per_token else None,
               "config": cfg.to_dict()}
    if dist.is_main:
        write_json_atomic(out_dir / "summary.json", summary)
    return summary
