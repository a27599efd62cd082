"""The one training loop. Every stage (pretrain, and later fine-tuning stages) is wiring around it.

    result = train(model, cfg, train_loader, val_loader, objective, out_dir, tokenizer=tok)

:func:`train` reads like a table of contents: per optimizer step it sets the LR from the schedule, runs
:func:`train_step` (``grad_accum`` micro-batches through ``objective(model, batch) -> (loss, metrics)``
under autocast, the loss checks, backward, clipping, the optimizer step), then re-plans a wall-clock
budget, rolls back non-finite weights, logs, validates and checkpoints, each in a helper of its own.

Batches are dicts of tensors (train/losses.py ``Batch``); every tensor is moved to the device, so a
stage may add any field its objective reads. The loop counts the real tokens the objective reports
(``metrics["tokens"]``, summed over micro-batches and ranks) for the token total, tokens/s and MFU;
validation (:func:`evaluate`) averages every metric weighted by those tokens. ``optimizer`` may be
given (a stage that wants its own parameter groups, e.g. a higher LR for a new head); the schedule
then scales each group's own starting LR.

What it takes care of so stages do not have to:
- devices and precision (lmstack.devices): bf16 autocast on CUDA by default, fp16 + GradScaler on
  request, fp32 on CPU; optional torch.compile; under torchrun the ``parallel.*`` layout
  (lmstack/train/parallel/): DDP by default, FSDP2 / HSDP, tensor and sequence parallel, pipeline
  schedules, activation checkpointing (gloo on CPU, NCCL on GPU);
- metrics: JSONL (RUN/metrics.jsonl) and TensorBoard (RUN/tb), a progress bar with loss, tokens/s,
  MFU on GPU and ETA, periodic validation loss and bits-per-byte, a PNG loss curve at the end
  (lmstack.plots);
- checkpoints (lmstack.checkpoint): RUN/checkpoints/step_NNNNNNN with optimizer, RNG, loader and run
  state (keep-last-N, atomic and fsync'ed, with a manifest of sizes and hashes), the final weights in
  RUN/model. ``resume=True`` continues from the newest *intact* checkpoint (a damaged newer one is
  passed over, and the run says so) and reproduces the uninterrupted run bit for bit: same batches,
  same RNG, same optimizer state, and the same logged averages (the partial log window is saved too).
  Sharded runs write their weights and optimizer state with torch.distributed.checkpoint (CKPT/dcp/, every
  process its pieces, optionally in the background), which resumes in any other layout; RUN/model is
  always one consolidated model.safetensors.
  What a killed writer left behind (staging directories) is cleaned up at the next start;
- loss spikes and NaN/Inf: a micro-batch whose loss is not finite, or (for objectives that declare
  ``judge_spikes``, the LM losses) above ``spike_factor`` times the running mean and at least
  ``spike_min_gap`` nats above it (so a loss near zero is not judged by its ratio alone), or whose gradient
  norm is not finite, is skipped before it touches the weights
  (the weights stay at the last good state). If the weights themselves ever turn non-finite, they
  are restored from the newest checkpoint. Every event is logged; after ``max_rollbacks`` the run stops.
- a wall-clock budget (``train.max_minutes``, train/budget.py): the step count (capped by
  ``train.max_steps``) is planned from the measured cost of steps, validation passes and checkpoints,
  so that the whole run, final validation and weights included, ends within the budget. The plan is
  saved with every checkpoint, so a resumed run keeps its schedule.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn

from lmstack import checkpoint as ckpt
from lmstack.atomic import clean_staging, write_text_atomic
from lmstack.config import RunConfig
from lmstack.devices import resolve_dtype
from lmstack.errors import CheckpointError, DataError, LmstackError, UserError
from lmstack.plots import plot_training_curves
from lmstack.progress import Progress
from lmstack.train.budget import WallClockBudget
from lmstack.train.dist import DistInfo, any_rank, dp_sum, from_rank0, init_distributed
from lmstack.train.losses import Batch, Objective
from lmstack.train.optim import build_optimizer, lr_multiplier
from lmstack.train.parallel import Parallelized, parallelize, rebind_optimizer, resolve_layout

# Peak dense bf16 tensor FLOP/s for MFU, by substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                   "RTX 4090": 165e12, "L4": 121e12}


class TrainingDiverged(LmstackError, RuntimeError):
    """The run kept producing bad batches or non-finite weights; the message says what to change."""


@dataclass
class TrainResult:
    steps: int
    tokens: int
    wall_seconds: float
    final_train_loss: float
    final_val_loss: float | None
    final_val_bpb: float | None
    params: int
    rollbacks: int
    tokens_per_second: float
    out_dir: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RunState:
    """What a checkpoint records besides weights, optimizer, RNG and loader (trainer_state/state.json)."""

    step: int = 0
    max_steps: int = 0  # the planned step count (a wall-clock budget may have changed it)
    loss_ema: float | None = None  # running mean of the train loss, for the spike check
    rollbacks: int = 0
    tokens: int = 0
    elapsed: float = 0.0  # wall seconds of the run so far, earlier sessions included
    log_loss_sum: float = 0.0  # train losses since the last logged line: a resumed run logs the same averages
    log_loss_count: int = 0
    last_loss: float = float("nan")
    val_loss: float | None = None
    val_bpb: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunState":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})  # older checkpoints lack the newer fields


@dataclass
class StepResult:
    loss: float  # mean over the micro-batches
    metrics: dict[str, float]  # the objective's metrics of the last micro-batch
    tokens: int  # real tokens of the step: all micro-batches, all ranks
    grad_norm: float | None  # before clipping; None when the step was skipped before it was computed
    skipped: str | None  # why the batch was skipped (the weights did not change); None when it stepped


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def autocast_context(device: torch.device, dtype: str | torch.dtype):
    """Autocast to ``dtype`` (``auto``: bf16 on CUDA, fp32 elsewhere); fp32 is no autocast at all."""
    torch_dtype = resolve_dtype(dtype, device)
    if torch_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch_dtype)


# ----------------------------------------------------------------------------- RNG state

def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state(),
             "python": torch.tensor(list(np.frombuffer(json.dumps(random.getstate()).encode(), dtype=np.uint8)),
                                    dtype=torch.uint8),
             "numpy": torch.from_numpy(np.frombuffer(json.dumps(_np_state()).encode(), dtype=np.uint8).copy())}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            state[f"torch_cuda_{i}"] = torch.cuda.get_rng_state(i)
    return state


def _np_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    py = json.loads(bytes(state["python"].tolist()).decode())
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = json.loads(bytes(state["numpy"].tolist()).decode())
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    for key, value in state.items():
        if key.startswith("torch_cuda_") and torch.cuda.is_available():
            idx = int(key.rsplit("_", 1)[1])
            if idx < torch.cuda.device_count():
                torch.cuda.set_rng_state(value, idx)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- logging

class MetricsLogger:
    """JSONL + TensorBoard on rank 0. Appends, so a resumed run continues the same file."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            # drop lines logged after the checkpoint we resume from (they will be logged again), and a
            # last line cut short by the kill
            kept = [line for line in self.path.read_text().splitlines()
                    if (row := _parse_json_line(line)) is not None and row.get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except Exception:  # tensorboard missing or broken: JSONL is the record of truth
                self.tb = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _parse_json_line(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl (a line cut short by a crash is left out)."""
    if not path.is_file():
        return []
    return [row for line in path.read_text().splitlines() if (row := _parse_json_line(line)) is not None]


def plot_loss_curve(metrics_path: Path, out_png: Path, title: str = "") -> Path | None:
    """Train loss and validation loss (and bits-per-byte when logged) against step, as a PNG."""
    records = read_metrics(metrics_path)
    panels = ("loss", "val_bpb") if any(r.get("val_bpb") is not None for r in records) else ("loss",)
    return out_png if plot_training_curves(records, out_png, panels=panels, title=title) else None


# ----------------------------------------------------------------------------- evaluation

def to_device(batch: Batch, device: torch.device) -> Batch:
    """Every tensor of the batch on ``device`` (other values pass through)."""
    if not isinstance(batch, dict):
        raise TypeError(f"a loader yielded a {type(batch).__name__}; batches are dicts of tensors, e.g. "
                        "{'input_ids': (B, T), 'labels': (B, T)}")
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _batch_tokens(metrics: dict[str, float]) -> int:
    if "tokens" not in metrics:
        raise ValueError("an objective's metrics must hold 'tokens', the count of real tokens in the batch "
                         "(train.losses.real_tokens)")
    return int(metrics["tokens"])


@torch.no_grad()
def evaluate(model: nn.Module, val_loader, objective: Objective, device: torch.device, dtype: str | torch.dtype,
             max_batches: int, dist: DistInfo) -> dict[str, float]:
    """Validation metrics over at most ``max_batches`` batches, on all ranks together.

    Returns ``{"loss": ..., "tokens": ..., **the objective's other metrics}``: every metric is the
    mean over batches weighted by each batch's real tokens (so a per-token mean stays one over
    padded batches); ``tokens`` is the total.
    """
    model.eval()
    sums: dict[str, float] = {}
    tokens, seen = 0, 0
    for batch in val_loader:
        if seen >= max_batches:
            break
        seen += 1
        with autocast_context(device, dtype):
            loss, metrics = objective(model, to_device(batch, device))
        weight = _batch_tokens(metrics)
        tokens += weight
        for key, value in {"loss": float(loss), **metrics}.items():
            if key != "tokens":
                sums[key] = sums.get(key, 0.0) + float(value) * weight
    model.train()
    if seen == 0:
        raise DataError("the validation split produced no batches; lower train.seq_len or add data")
    total_tokens = dp_sum(float(tokens), dist)  # over data-parallel replicas: each batch counted once
    if total_tokens == 0:
        raise DataError("the validation batches hold no real tokens (every label is -1); check the data")
    averaged = {key: dp_sum(sums[key], dist) / total_tokens for key in sorted(sums)}
    return {**averaged, "tokens": round(total_tokens)}


# ----------------------------------------------------------------------------- one step

def train_step(run: "_Run", batches: Iterator, spike_limit: float) -> StepResult:
    """One optimizer step over ``train.grad_accum`` micro-batches, or none at all: a micro-batch whose
    loss is non-finite or above ``spike_limit``, or a non-finite gradient norm (on any rank), skips the
    step before the weights change."""
    model, optimizer, scaler, accum, dist = run.model, run.optimizer, run.scaler, run.cfg.train.grad_accum, run.dist
    pipeline = run.plan.pipeline  # under PP the schedule runs forward and backward of all micro-batches itself
    loss_sum, metrics, problem, grad_norm, tokens = 0.0, {}, None, None, 0
    for micro in range(accum):
        batch = to_device(next(batches), run.device)
        # DDP / FSDP reduce gradients on the last micro-batch only
        with run.plan.gradient_sync(micro == accum - 1):
            with autocast_context(run.device, run.dtype):
                loss, metrics = pipeline.forward_backward(batch, 1 / accum) if pipeline else run.objective(model, batch)
            tokens += _batch_tokens(metrics)
            loss_value = float(loss.detach())
            problem = problem or _loss_problem(loss_value, spike_limit, run.state.loss_ema)
            if problem and not dist.enabled:
                break  # with several processes every one still runs its backward, or the gradient reduction would hang
            if pipeline is None:
                scaler.scale(loss / accum).backward()
        loss_sum += loss_value / accum
    if problem is None:
        scaler.unscale_(optimizer)
        clip = run.cfg.optim.grad_clip if run.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = run.plan.clip_grad_norm(clip)
        if not math.isfinite(grad_norm) and run.dtype != torch.float16:  # fp16: the scaler handles inf grads
            problem = f"non-finite gradient norm {grad_norm}"
    if any_rank(problem is not None, dist) and problem is None:
        problem = "another rank saw a bad batch"
    if problem is None:
        scaler.step(optimizer)
        if dist.enabled:  # tokens summed and the loss averaged over data-parallel replicas (float64: exact counts)
            tokens = round(dp_sum(float(tokens), dist))
            loss_sum = dp_sum(loss_sum, dist) / dist.dp_size
    if grad_norm is not None:
        scaler.update()  # after any unscale_, stepped or not: the next unscale_ would refuse otherwise
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss_sum, metrics=metrics, tokens=tokens, grad_norm=grad_norm, skipped=problem)


def _loss_problem(loss: float, spike_limit: float, running_mean: float | None) -> str | None:
    if not math.isfinite(loss):
        return f"non-finite loss {loss}"
    if loss > spike_limit:
        return f"loss spike {loss:.3f} > limit {spike_limit:.3f} (running mean {running_mean:.3f})"
    return None


# ----------------------------------------------------------------------------- the loop

def train(model: nn.Module, cfg: RunConfig, train_loader, val_loader, objective: Objective,
          out_dir: str | Path, tokenizer: Any = None, resume: bool | str | Path = False,
          info: DistInfo | None = None, extra_config: dict[str, Any] | None = None,
          progress: bool = True, optimizer: torch.optim.Optimizer | None = None) -> TrainResult:
    """Train ``model`` on ``train_loader`` batches with ``objective``; write the run into ``out_dir``.

    ``objective``: an :class:`~lmstack.train.losses.Objective`; a plain function
    ``(model, batch) -> (loss, metrics)`` is taken as an LM loss (its spikes are judged).
    ``resume``: True continues from the newest intact checkpoint in OUT/checkpoints (from scratch when
    there is none), a path continues from that checkpoint. ``info``: the process group
    (train.dist.init_distributed); by default one is made from ``cfg.train.device``. ``optimizer``:
    one over ``model``'s parameters with the groups and LRs the stage wants (None: AdamW from
    ``cfg.optim``); the schedule multiplies each group's starting LR.
    """
    if not isinstance(objective, Objective):
        objective = Objective(objective)
    run = _start(model, cfg, train_loader, val_loader, objective, Path(out_dir), tokenizer, resume,
                 info or init_distributed(cfg.train.device), extra_config or {}, progress, optimizer)
    batches = _infinite(train_loader)
    try:
        with run.bar:
            while run.state.step < run.state.max_steps:
                lr = _set_lr(run)
                result = train_step(run, batches, _spike_limit(run))
                if result.skipped:
                    _skip_batch(run, result.skipped)
                    continue  # the same step is retried with the next batch
                _advance(run.state, result)
                _replan_budget(run)
                if _maybe_rollback(run):
                    continue
                _log(run, result, lr)
                _maybe_eval(run)
                _maybe_save(run)
        return _finish(run)
    finally:
        run.logger.close()


@dataclass
class _Run:
    """Everything one call of :func:`train` works with; the helpers below take it as their first argument."""

    cfg: RunConfig
    dist: DistInfo
    device: torch.device
    dtype: torch.dtype
    model: nn.Module  # possibly compiled and DDP / FSDP / TP-wrapped (the stage holder under PP)
    raw_model: nn.Module  # this process's parameters under the model's own names
    optimizer: torch.optim.Optimizer
    base_lrs: list[float]  # each parameter group's LR before the schedule scales it
    scaler: torch.amp.GradScaler
    objective: Objective
    train_loader: Any
    val_loader: Any
    out_dir: Path
    config_dict: dict[str, Any]
    tokenizer: Any
    state: RunState
    elapsed_before: float  # wall seconds of earlier sessions of this run (resume)
    logger: MetricsLogger
    bar: Progress
    bar_task: int
    budget: WallClockBudget | None
    started: float  # time.time() when this session started
    log_time: float  # time.time() and state.tokens at the last logged line (for tokens/s)
    log_tokens: int
    plan: Parallelized  # the parallel layout (lmstack/train/parallel); raw_model is its state_model
    pending_save: Any = None  # a sharded checkpoint still being written (async): (future, staging, path, state)

    @property
    def ckpt_root(self) -> Path:
        return self.out_dir / "checkpoints"

    def session_seconds(self) -> float:
        return time.time() - self.started

    def elapsed(self) -> float:
        """Wall seconds of the whole run: earlier sessions and this one."""
        return self.elapsed_before + self.session_seconds()

    def say(self, message: str) -> None:
        if self.dist.is_main:
            print(message, file=sys.stderr, flush=True)


def _start(model, cfg, train_loader, val_loader, objective, out_dir, tokenizer, resume, dist, extra_config,
           progress, optimizer) -> _Run:
    """Set up the run: device, precision, optimizer, resume, wrappers, logger, progress bar, budget."""
    started = time.time()
    device, tcfg = dist.device, cfg.train
    if not all(callable(getattr(train_loader, name, None)) for name in ("state_dict", "load_state_dict")):
        raise TypeError(f"the train loader ({type(train_loader).__name__}) needs state_dict() and load_state_dict(): "
                        "its position is saved with every checkpoint so a resumed run sees the same batches")
    dtype = resolve_dtype(tcfg.dtype, device)
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"train.dtype=bf16 but {torch.cuda.get_device_name(device)} has no bf16 support; "
                        "use train.dtype=fp16 (with loss scaling) or fp32")
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for folder in (out_dir, out_dir / "checkpoints"):
            clean_staging(folder)  # what a process killed mid-write left behind
    if dist.enabled:
        torch.distributed.barrier()  # no rank looks for checkpoints while rank 0 is cleaning up
    seed_everything(tcfg.seed + dist.rank)
    layout = resolve_layout(cfg, dist.world_size)
    if layout.pp == 1:
        model.to(device)  # under PP each process moves only its stages
    model.train()
    optimizer = optimizer or build_optimizer(model, cfg.optim, device.type)
    names = {id(p): name for name, p in model.named_parameters()}
    param_order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    plan = parallelize(model, layout, dist, cfg)
    plan.param_order = param_order
    if plan.sharded:  # the plan made new (DTensor) parameters or kept a part: the same optimizer over those
        optimizer = rebind_optimizer(optimizer, names, plan.state_model)
    base_lrs = [group["lr"] for group in optimizer.param_groups]  # before a resume loads scheduled LRs
    state, resumed_from = _resume(plan, optimizer, train_loader, device, out_dir, resume, tcfg, dist)
    if resume is True and dist.is_main:  # resumed from the newest intact checkpoint: any newer one is damaged
        for path in ckpt.set_aside_newer(out_dir / "checkpoints", resumed_from):
            print(f"set the damaged checkpoint aside as {path}", file=sys.stderr)
    model, raw_model = plan.model, plan.state_model
    bar = Progress(enabled=progress and dist.is_main)
    bar_task = bar.add("train", total=state.max_steps, unit="steps")
    bar.update(bar_task, completed=state.step)
    budget = WallClockBudget(tcfg, state.elapsed, state.step) if tcfg.max_minutes > 0 else None
    return _Run(cfg=cfg, dist=dist, device=device, dtype=dtype, model=model, raw_model=raw_model,
                optimizer=optimizer, base_lrs=base_lrs, scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
                objective=objective, train_loader=train_loader, val_loader=val_loader, out_dir=out_dir,
                config_dict={**cfg.to_dict(), **extra_config}, tokenizer=tokenizer, state=state,
                elapsed_before=state.elapsed,
                logger=MetricsLogger(out_dir, dist.is_main, tcfg.tensorboard,
                                     state.step if resumed_from is not None else None),
                bar=bar, bar_task=bar_task, budget=budget, started=started, log_time=time.time(), log_tokens=state.tokens,
                plan=plan)


def _resume(plan: Parallelized, optimizer, loader, device, out_dir: Path, resume: bool | str | Path, tcfg,
            dist: DistInfo) -> tuple[RunState, Path | None]:
    """The run state to start from and the checkpoint it came from: (a fresh state, None) when not resuming."""
    fresh = RunState(max_steps=tcfg.max_steps)
    if resume is False or resume is None:
        return fresh, None
    say = print if dist.is_main else (lambda *a, **k: None)
    if resume is True:
        skipped: list[str] = []
        path = ckpt.latest_checkpoint(out_dir / "checkpoints", skipped)
        for problem in skipped:
            say(f"checkpoint {problem}; falling back to an older one", file=sys.stderr)
        if path is None:
            say(f"no intact checkpoint in {out_dir / 'checkpoints'}; starting from scratch", file=sys.stderr)
            return fresh, None
    else:
        path = Path(resume)
    state = RunState.from_dict(_restore(path, plan, optimizer, loader, device))
    if tcfg.max_minutes <= 0:
        state.max_steps = tcfg.max_steps  # no budget: the config rules (it may have been raised to train longer)
    say(f"resumed from {path} at step {state.step}", file=sys.stderr)
    return state, path


def _restore(path: Path, plan: Parallelized, optimizer: torch.optim.Optimizer, loader, device) -> dict[str, Any]:
    """Load weights, optimizer, RNG and (when ``loader`` is given) loader position; returns the run state.

    A sharded checkpoint (CKPT/dcp) loads into any layout; a one-process one into a sharded run too."""
    from lmstack.train.parallel.checkpoint import load_full, load_sharded

    trainer_state = ckpt.load_trainer_state(path)
    try:
        if (path / ckpt.SHARDED).is_dir():
            load_sharded(plan.state_model, optimizer, path / ckpt.SHARDED)
        elif plan.sharded:
            load_full(plan.state_model, optimizer, ckpt.read_tensors(path / ckpt.WEIGHTS), trainer_state["optimizer"],
                      plan.param_order, plan.tied)
        else:
            ckpt.load_model_state(plan.state_model, ckpt.read_tensors(path / ckpt.WEIGHTS), path)
            plan.state_model.to(device)
            optimizer.load_state_dict(trainer_state["optimizer"])
    except (ValueError, KeyError, RuntimeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: the optimizer state does not fit this model and optimizer ({e}); "
                              "resume with the config the run started with") from None
    set_rng_state(trainer_state["rng"])
    state = trainer_state["state"]
    if loader is not None and "loader" in state:
        loader.load_state_dict(state["loader"])
    return state


def _infinite(loader) -> Iterator:
    """Batches forever. A loader may end at an epoch boundary; two empty passes in a row mean no data."""
    empty_passes = 0
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        empty_passes = 0 if yielded else empty_passes + 1
        if empty_passes >= 2:
            raise DataError("the training split produced no batches; lower train.seq_len or add data")


def _set_lr(run: _Run) -> float:
    """Scale every parameter group's starting LR by the schedule; returns the LR of ``optim.lr`` (logged)."""
    multiplier = lr_multiplier(run.state.step, run.state.max_steps, run.cfg.optim)
    for group, base_lr in zip(run.optimizer.param_groups, run.base_lrs):
        group["lr"] = base_lr * multiplier
    return run.cfg.optim.lr * multiplier


def _spike_limit(run: _Run) -> float:
    """Losses above this are spikes: ``spike_factor`` x the running mean and at least ``spike_min_gap`` nats
    above it, once warmup is over; never for an objective that does not let the loop judge its spikes. The gap
    matters near zero: a fine-tune that has memorised its data (running mean 0.003) sees batches at 0.03,
    ten times the mean and no sign of divergence, and a ratio alone stopped such runs."""
    state, tcfg = run.state, run.cfg.train
    if not run.objective.judge_spikes or state.loss_ema is None or state.step < min(run.cfg.optim.warmup_steps, state.max_steps // 5):
        return float("inf")
    return max(tcfg.spike_factor * state.loss_ema, state.loss_ema + tcfg.spike_min_gap)


def _skip_batch(run: _Run, reason: str) -> None:
    state = run.state
    state.rollbacks += 1
    run.logger.log({"step": state.step, "event": "skipped_batch", "reason": reason, "rollbacks": state.rollbacks})
    run.say(f"step {state.step}: {reason}; batch skipped, weights kept at the last good state")
    if state.rollbacks > run.cfg.train.max_rollbacks:
        raise TrainingDiverged(f"gave up after {state.rollbacks} bad batches (train.max_rollbacks="
                               f"{run.cfg.train.max_rollbacks}); lower optim.lr or check the data")


def _advance(state: RunState, result: StepResult) -> None:
    state.step += 1
    state.tokens += result.tokens
    state.loss_ema = result.loss if state.loss_ema is None else 0.95 * state.loss_ema + 0.05 * result.loss
    state.log_loss_sum += result.loss
    state.log_loss_count += 1
    state.last_loss = result.loss


def _replan_budget(run: _Run) -> None:
    """Under a wall-clock budget, re-plan the step count from the measured costs (train/budget.py)."""
    if run.budget is None:
        return
    state = run.state
    planned = run.budget.replan(state.step, state.max_steps, run.session_seconds())
    planned = from_rank0(planned or 0, run.dist)  # ranks time things differently (rank 0 saves) but must agree
    if not planned:
        return
    state.max_steps = planned
    run.bar.update(run.bar_task, total=planned)
    run.logger.log({"step": state.step, "event": "budget", "max_steps": planned,
                    "seconds_per_step": round(run.budget.step_seconds(state.step, run.session_seconds()), 4)})


def _maybe_rollback(run: _Run) -> bool:
    """At log steps: if the weights turned non-finite, restore the newest checkpoint; True when it did."""
    state = run.state
    if state.step % run.cfg.train.log_every or _weights_finite(run):
        return False
    state.rollbacks += 1
    restored = ckpt.latest_checkpoint(run.ckpt_root)
    if restored is None:
        raise TrainingDiverged("weights became non-finite and there is no checkpoint to roll back to; "
                               "lower optim.lr or set train.ckpt_every")
    # the checkpoint's state, except the rollback count and the current plan; the loader is not rewound
    # (the batches that led here are not replayed)
    checkpoint_state = RunState.from_dict(_restore(restored, run.plan, run.optimizer, None, run.device))
    run.state = replace(checkpoint_state, rollbacks=state.rollbacks, max_steps=state.max_steps)
    run.log_time, run.log_tokens = time.time(), run.state.tokens
    run.logger.log({"step": run.state.step, "event": "rollback", "from": str(restored),
                    "rollbacks": state.rollbacks})
    return True


def _weights_finite(run: _Run) -> bool:
    """Every process's trained parameters (its pieces of sharded ones) finite; the same answer on every process.
    Frozen ones (a LoRA run's base) are not scanned: no update touches them, and they are most of the model."""
    local = all(bool(torch.isfinite(getattr(p, "_local_tensor", p)).all())
                for p in run.raw_model.parameters() if p.requires_grad)
    return not any_rank(not local, run.dist)


def _log(run: _Run, result: StepResult, lr: float) -> None:
    state, tcfg = run.state, run.cfg.train
    if state.step % tcfg.log_every and state.step != state.max_steps:
        return
    now = time.time()
    tokens_per_second = (state.tokens - run.log_tokens) / max(now - run.log_time, 1e-9)
    record = {"step": state.step, "loss": state.log_loss_sum / max(state.log_loss_count, 1), "lr": lr,
              "tokens": state.tokens, "tokens_per_second": tokens_per_second, "grad_norm": result.grad_norm,
              **{k: v for k, v in result.metrics.items() if k != "tokens"}}  # "tokens" is the run's total
    flops_per_token = run.plan.flops_per_token  # the whole model's, whatever part this process holds
    peak = peak_flops(run.device)
    if flops_per_token and peak:
        record["mfu"] = tokens_per_second * flops_per_token(tcfg.seq_len) / (peak * run.dist.world_size)
    run.logger.log(record)
    status = f"loss {record['loss']:.3f} | {tokens_per_second:,.0f} tok/s" + \
        (f" | MFU {record['mfu']:.1%}" if "mfu" in record else "")
    run.bar.update(run.bar_task, completed=state.step, status=status)
    if run.dist.is_main and not sys.stderr.isatty() and state.step % (tcfg.log_every * 10) == 0:
        run.bar.log(f"step {state.step}/{state.max_steps} {status}")  # a plain record for CI logs and pipes
    run.log_time, run.log_tokens = now, state.tokens
    state.log_loss_sum, state.log_loss_count = 0.0, 0


def _maybe_eval(run: _Run) -> None:
    state, tcfg = run.state, run.cfg.train
    if not ((tcfg.eval_every and state.step % tcfg.eval_every == 0) or state.step == state.max_steps):
        return
    began = time.time()
    objective = run.plan.pipeline.eval_objective if run.plan.pipeline else run.objective  # PP: forward-only schedule
    metrics = evaluate(run.model, run.val_loader, objective, run.device, run.dtype, tcfg.eval_batches, run.dist)
    state.val_loss = metrics.pop("loss")
    bytes_per_token = getattr(run.val_loader, "bytes_per_token", None)
    state.val_bpb = state.val_loss / math.log(2) / bytes_per_token if bytes_per_token else None
    run.logger.log({"step": state.step, "val_loss": state.val_loss, "val_bpb": state.val_bpb,
                    **{f"val_{key}": value for key, value in metrics.items()}})
    run.bar.log(f"step {state.step}: val loss {state.val_loss:.3f}" +
                (f" | val bpb {state.val_bpb:.3f}" if state.val_bpb else ""))
    if run.budget is not None:
        run.budget.record("eval", time.time() - began)


def _maybe_save(run: _Run) -> None:
    state, tcfg = run.state, run.cfg.train
    if not ((tcfg.ckpt_every and state.step % tcfg.ckpt_every == 0) or state.step == state.max_steps):
        return
    began = time.time()
    if run.plan.sharded:
        _save_sharded(run)
    elif run.dist.is_main:
        state.elapsed = run.elapsed()
        trainer_state = {"optimizer": run.optimizer.state_dict(), "rng": rng_state(),
                         "state": {**asdict(state), "loader": run.train_loader.state_dict()}}
        ckpt.save_checkpoint(run.ckpt_root / f"step_{state.step:07d}", run.raw_model, run.config_dict,
                             run.tokenizer, trainer_state)
        ckpt.prune_checkpoints(run.ckpt_root, tcfg.keep_last)
    if run.budget is not None:
        run.budget.record("save", time.time() - began)


def _save_sharded(run: _Run) -> None:
    """A DCP checkpoint: every process writes its pieces into a staging directory; once all have finished
    (at once, or with ``parallel.async_checkpoint`` at the next save or the end) rank 0 adds the config,
    tokenizer, RNG and run state and publishes it with its manifest (:func:`_publish_sharded`)."""
    from lmstack.train.parallel.checkpoint import save_sharded

    _publish_sharded(run)  # the previous background save, if any
    state = run.state
    staging = run.ckpt_root / f".step_{state.step:07d}.tmp-dcp"  # a staging name: cleaned up after a crash
    if run.dist.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    torch.distributed.barrier()
    state.elapsed = run.elapsed()
    trainer_state = {"optimizer": None, "rng": rng_state(),
                     "state": {**asdict(state), "loader": run.train_loader.state_dict()}}
    future = save_sharded(run.raw_model, run.optimizer, staging / ckpt.SHARDED, run.cfg.parallel.async_checkpoint)
    run.pending_save = (future, staging, run.ckpt_root / f"step_{state.step:07d}", trainer_state)
    if future is None:
        _publish_sharded(run)


def _publish_sharded(run: _Run) -> None:
    """Wait for the pending sharded save on every process, then rank 0 publishes it and prunes old ones."""
    if run.pending_save is None:
        return
    future, staging, final, trainer_state = run.pending_save
    run.pending_save = None
    if future is not None:
        future.result()
    torch.distributed.barrier()
    if run.dist.is_main:
        ckpt.save_checkpoint(final, None, run.config_dict, run.tokenizer, trainer_state, sharded=staging / ckpt.SHARDED)
        shutil.rmtree(staging, ignore_errors=True)
        ckpt.prune_checkpoints(run.ckpt_root, run.cfg.train.keep_last)
    torch.distributed.barrier()  # no process looks for checkpoints (rollback, the end) before it exists


def _finish(run: _Run) -> TrainResult:
    """The final weights (RUN/model, consolidated), the loss curve, and the result."""
    state = run.state
    weights = run.raw_model
    if run.plan.sharded:
        _publish_sharded(run)
        weights = run.plan.full_weights()  # every process takes part; rank 0 gets the whole model
    if run.dist.is_main:
        ckpt.save_checkpoint(run.out_dir / "model", weights, run.config_dict, run.tokenizer)
        plot_loss_curve(run.out_dir / "metrics.jsonl", run.out_dir / "loss.png")
    wall = run.elapsed()
    params = run.plan.params
    return TrainResult(steps=state.step, tokens=state.tokens, wall_seconds=wall, final_train_loss=state.last_loss,
                       final_val_loss=state.val_loss, final_val_bpb=state.val_bpb, params=params,
                       rollbacks=state.rollbacks, tokens_per_second=state.tokens / max(wall, 1e-9),
                       out_dir=str(run.out_dir))
