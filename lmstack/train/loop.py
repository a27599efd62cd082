"""The one training loop. Every stage (pretrain, and later fine-tuning stages) is wiring around it.

    result = train(model, cfg, train_loader, val_loader, objective, out_dir, tokenizer=tok)

Per optimizer step: set the LR from the schedule, run ``grad_accum`` micro-batches through
``objective(model, x, y) -> (loss, metrics)`` under autocast, check the loss, clip, step.

What it takes care of so stages do not have to:
- devices and precision: bf16 autocast on CUDA by default, fp16 + GradScaler on request, fp32 on CPU;
  optional torch.compile; DDP under torchrun (gloo on CPU, NCCL on GPU);
- metrics: JSONL (RUN/metrics.jsonl) and TensorBoard (RUN/tb), a progress bar with loss, tokens/s,
  MFU on GPU and ETA, periodic validation loss and bits-per-byte, a PNG loss curve at the end;
- checkpoints: RUN/checkpoints/step_NNNNNNN with optimizer, RNG and loader state (keep-last-N,
  atomic), the final weights in RUN/model. ``resume=True`` continues from the newest checkpoint and
  reproduces the uninterrupted run bit for bit (same batches, same RNG, same optimizer state);
- loss spikes and NaN/Inf: a micro-batch whose loss is not finite, or above ``spike_factor`` times
  the running mean, or whose gradient norm is not finite, is skipped before it touches the weights
  (the weights stay at the last good state). If the weights themselves ever turn non-finite, they
  are restored from the newest checkpoint. Every event is logged; after ``max_rollbacks`` the run stops.
- a wall-clock budget (``train.max_minutes``): the step count (capped by ``train.max_steps``) is
  estimated from the measured speed after 10 steps and re-estimated (when it moves by over 2%) until
  the run is half-way, so the LR schedule still ends on time when the machine gets busier or quieter; from then
  on it is fixed. The current step count is saved with every checkpoint, so a resumed run keeps the
  schedule it had (and goes on re-estimating only if it is still in the first half).

The budget is a step count rather than a check of the clock at every step so that the schedule's
decay phase is planned, not cut off, and a run with ``max_minutes=0`` is bit-for-bit reproducible.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn

from lmstack.atomic import write_atomic
from lmstack.config import RunConfig
from lmstack import checkpoint as ckpt
from lmstack.train.dist import DistInfo, all_reduce_mean, init_distributed
from lmstack.train.losses import Objective
from lmstack.train.optim import build_optimizer, lr_multiplier

# Peak dense bf16 tensor FLOP/s for MFU, by substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                   "RTX 4090": 165e12, "L4": 121e12}


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


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def autocast_context(device: torch.device, dtype: str):
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    if dtype == "fp32":
        return contextlib.nullcontext()
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float16
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
        if resume_step is None and self.path.exists():
            self.path.unlink()
        elif resume_step is not None and self.path.exists():
            # drop lines logged after the checkpoint we resume from (they will be logged again)
            lines = [ln for ln in self.path.read_text().splitlines()
                     if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in lines))
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


class Progress:
    """A rich progress bar on a terminal; plain periodic lines otherwise (CI logs, pipes)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.enabled = enabled
        self.live = enabled and sys.stderr.isatty()
        self.total = total
        self.bar = None
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                TimeElapsedColumn, TimeRemainingColumn

            self.bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                                    TimeRemainingColumn(), transient=False)
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, info: str, force_print: bool = False) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif force_print:
            print(f"step {step}/{self.total} {info}", file=sys.stderr, flush=True)

    def set_total(self, total: int) -> None:
        self.total = total
        if self.bar is not None:
            self.bar.update(self.task, total=total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: nn.Module, val_loader, objective: Objective, device: torch.device, dtype: str,
             max_batches: int, info: DistInfo) -> float:
    model.eval()
    total, count = 0.0, 0
    for i, (x, y) in enumerate(val_loader):
        if i >= max_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast_context(device, dtype):
            loss, _ = objective(model, x, y)
        total += float(loss)
        count += 1
    model.train()
    if count == 0:
        raise ValueError("the validation split produced no batches; lower train.seq_len or add data")
    return all_reduce_mean(total / count, info)


# ----------------------------------------------------------------------------- plot

def plot_loss_curve(metrics_path: Path, out_png: Path, title: str = "") -> Path | None:
    """Train loss (and val loss / bits-per-byte when present) against step, saved as PNG."""
    if not metrics_path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    bpb = [(r["step"], r["val_bpb"]) for r in rows if r.get("val_bpb") is not None]
    if not train and not val:
        return None
    fig, axes = plt.subplots(1, 2 if bpb else 1, figsize=(11 if bpb else 6.5, 4))
    ax = axes[0] if bpb else axes
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "loss")
    if bpb:
        axes[1].plot(*zip(*bpb), "o-", color="C2", ms=4)
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("val bits per byte")
        axes[1].grid(alpha=0.3)
        axes[1].set_title("validation bits-per-byte")
    fig.tight_layout()
    write_atomic(out_png, lambda tmp: fig.savefig(tmp, dpi=110), suffix=".png")
    plt.close(fig)
    return out_png


# ----------------------------------------------------------------------------- the loop

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
            raise ValueError("the training split produced no batches; lower train.seq_len or add data")


def train(model: nn.Module, cfg: RunConfig, train_loader, val_loader, objective: Objective,
          out_dir: str | Path, tokenizer: Any = None, resume: bool = False, info: DistInfo | None = None,
          extra_config: dict[str, Any] | None = None, progress: bool = True) -> TrainResult:
    out_dir = Path(out_dir)
    info = info or init_distributed(cfg.train.device)
    device, tcfg = info.device, cfg.train
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_root = out_dir / "checkpoints"
    config_dict = {**cfg.to_dict(), **(extra_config or {})}

    seed_everything(tcfg.seed + info.rank)
    model.to(device)
    model.train()
    optimizer = build_optimizer(model, cfg.optim, device.type)
    dtype = tcfg.dtype if tcfg.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == "fp16"))

    # --- resume
    start_step, max_steps = 0, tcfg.max_steps
    loss_ema, rollbacks, tokens_seen, elapsed_before = None, 0, 0, 0.0
    resume_from = ckpt.latest_checkpoint(ckpt_root) if resume else None
    if resume and resume_from is None and info.is_main:
        print(f"no checkpoint in {ckpt_root}; starting from scratch", file=sys.stderr)
    if resume_from is not None:
        state = _restore(resume_from, model, optimizer, train_loader, device)
        start_step = state["step"]
        # a wall-clock budget was converted into a step count once: keep it; otherwise the config rules
        max_steps = state["max_steps"] if tcfg.max_minutes > 0 else tcfg.max_steps
        loss_ema, rollbacks = state.get("loss_ema"), state.get("rollbacks", 0)
        tokens_seen, elapsed_before = state.get("tokens", 0), state.get("elapsed", 0.0)
        if info.is_main:
            print(f"resumed from {resume_from} at step {start_step}", file=sys.stderr)

    raw_model = model
    if tcfg.compile:
        model = torch.compile(model)
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    logger = MetricsLogger(out_dir, info.is_main, tcfg.tensorboard, start_step if resume_from else None)
    bar = Progress(max_steps, start_step, progress and info.is_main)
    tokens_per_step = tcfg.batch_size * tcfg.seq_len * tcfg.grad_accum * info.world_size
    flops_per_token = raw_model.flops_per_token(tcfg.seq_len) if hasattr(raw_model, "flops_per_token") else None
    peak = peak_flops(device)
    bytes_per_token = getattr(val_loader, "bytes_per_token", None)
    budgeted = tcfg.max_minutes > 0

    def save(step: int) -> None:
        if not info.is_main:
            return
        trainer_state = {"optimizer": optimizer.state_dict(), "rng": rng_state(),
                         "state": {"step": step, "max_steps": max_steps, "loss_ema": loss_ema,
                                   "rollbacks": rollbacks, "tokens": tokens_seen,
                                   "elapsed": elapsed_before + (time.time() - t_start),
                                   "loader": train_loader.state_dict()}}
        ckpt.save_checkpoint(ckpt_root / f"step_{step:07d}", raw_model, config_dict, tokenizer, trainer_state)
        ckpt.prune_checkpoints(ckpt_root, tcfg.keep_last)

    batches = _infinite(train_loader)
    t_start = time.time()
    t_log, tokens_at_log, loss_acc, loss_n = time.time(), tokens_seen, 0.0, 0
    last_loss, val_loss, val_bpb = float("nan"), None, None
    step = start_step
    while step < max_steps:
        lr = cfg.optim.lr * lr_multiplier(step, max_steps, cfg.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss, bad, metrics = 0.0, None, {}
        for micro in range(tcfg.grad_accum):
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sync = micro == tcfg.grad_accum - 1
            ctx = model.no_sync() if (info.enabled and not sync) else contextlib.nullcontext()
            with ctx, autocast_context(device, dtype):
                loss, metrics = objective(model, x, y)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                bad = f"non-finite loss {loss_value}"
            elif (loss_ema is not None and step >= min(cfg.optim.warmup_steps, max_steps // 5)
                  and loss_value > tcfg.spike_factor * loss_ema):
                bad = f"loss spike {loss_value:.3f} > {tcfg.spike_factor} x running mean {loss_ema:.3f}"
            if bad:
                break
            scaler.scale(loss / tcfg.grad_accum).backward()
            step_loss += loss_value / tcfg.grad_accum
        grad_norm = None
        if not bad:
            scaler.unscale_(optimizer)
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(raw_model.parameters(), clip))
            if not math.isfinite(grad_norm) and dtype != "fp16":  # fp16: the scaler handles inf grads
                bad = f"non-finite gradient norm {grad_norm}"
        if info.enabled:  # all ranks must agree to skip, or DDP would deadlock
            flag = torch.tensor([1.0 if bad else 0.0], device=device if device.type == "cuda" else "cpu")
            torch.distributed.all_reduce(flag)
            if flag.item() > 0 and not bad:
                bad = "another rank saw a bad batch"
        if bad:
            optimizer.zero_grad(set_to_none=True)
            rollbacks += 1
            logger.log({"step": step, "event": "skipped_batch", "reason": bad, "rollbacks": rollbacks})
            if info.is_main:
                print(f"step {step}: {bad}; batch skipped, weights kept at the last good state",
                      file=sys.stderr)
            if rollbacks > tcfg.max_rollbacks:
                raise RuntimeError(f"gave up after {rollbacks} bad batches (train.max_rollbacks="
                                   f"{tcfg.max_rollbacks}); lower optim.lr or check the data")
            continue  # the same step is retried with the next batch
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        loss_ema = step_loss if loss_ema is None else 0.95 * loss_ema + 0.05 * step_loss
        loss_acc, loss_n, last_loss = loss_acc + step_loss, loss_n + 1, step_loss

        if budgeted and step - start_step >= 10 and step <= max_steps // 2:
            # (re-)convert the wall-clock budget into a step count from the average speed so far
            per_step = (time.time() - t_start) / (step - start_step)
            left = tcfg.max_minutes * 60 * 0.92 - elapsed_before - (time.time() - t_start)  # 8%: evals, save
            planned = max(step + 1, min(tcfg.max_steps, step + int(left / per_step)))
            if step - start_step == 10 or abs(planned - max_steps) > max(1, 0.02 * max_steps):
                max_steps = planned
                bar.set_total(max_steps)
                logger.log({"step": step, "event": "budget", "max_steps": max_steps,
                            "seconds_per_step": round(per_step, 4)})

        if step % tcfg.log_every == 0 or step == max_steps:
            if step % tcfg.log_every == 0 and not _weights_finite(raw_model):
                rollbacks += 1
                restored = ckpt.latest_checkpoint(ckpt_root)
                if restored is None:
                    raise RuntimeError("weights became non-finite and there is no checkpoint to roll back to; "
                                       "lower optim.lr or set train.ckpt_every")
                state = _restore(restored, raw_model, optimizer, None, device)
                step = state["step"]
                logger.log({"step": step, "event": "rollback", "from": str(restored), "rollbacks": rollbacks})
                continue
            now = time.time()
            tps = (tokens_seen - tokens_at_log) / max(now - t_log, 1e-9)
            record = {"step": step, "loss": loss_acc / max(loss_n, 1), "lr": lr, "tokens": tokens_seen,
                      "tokens_per_second": tps, "grad_norm": grad_norm, **metrics}
            if flops_per_token and peak:
                record["mfu"] = tps * flops_per_token / (peak * info.world_size)
            logger.log(record)
            info_str = f"loss {record['loss']:.3f} | {tps:,.0f} tok/s" + \
                (f" | MFU {record['mfu']:.1%}" if "mfu" in record else "")
            bar.update(step, info_str, force_print=(step % (tcfg.log_every * 10) == 0))
            t_log, tokens_at_log, loss_acc, loss_n = now, tokens_seen, 0.0, 0

        if (tcfg.eval_every and step % tcfg.eval_every == 0) or step == max_steps:
            val_loss = evaluate(model, val_loader, objective, device, dtype, tcfg.eval_batches, info)
            val_bpb = val_loss / math.log(2) / bytes_per_token if bytes_per_token else None
            logger.log({"step": step, "val_loss": val_loss, "val_bpb": val_bpb})
            bar.update(step, f"val loss {val_loss:.3f}" + (f" | val bpb {val_bpb:.3f}" if val_bpb else ""),
                       force_print=True)
        if (tcfg.ckpt_every and step % tcfg.ckpt_every == 0) or step == max_steps:
            save(step)

    wall = elapsed_before + (time.time() - t_start)
    bar.close()
    if info.is_main:
        ckpt.save_checkpoint(out_dir / "model", raw_model, config_dict, tokenizer)
        plot_loss_curve(out_dir / "metrics.jsonl", out_dir / "loss.png")
    logger.close()
    return TrainResult(steps=step, tokens=tokens_seen, wall_seconds=wall, final_train_loss=last_loss,
                       final_val_loss=val_loss, final_val_bpb=val_bpb,
                       params=raw_model.num_params() if hasattr(raw_model, "num_params") else
                       sum(p.numel() for p in raw_model.parameters()),
                       rollbacks=rollbacks, tokens_per_second=tokens_seen / max(wall, 1e-9), out_dir=str(out_dir))


def _weights_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, loader, device) -> dict[str, Any]:
    from safetensors.torch import load_file

    ckpt.load_model_state(model, load_file(str(path / "model.safetensors")), path)
    model.to(device)
    ts = ckpt.load_trainer_state(path)
    optimizer.load_state_dict(ts["optimizer"])
    set_rng_state(ts["rng"])
    state = ts["state"]
    if loader is not None and "loader" in state:
        loader.load_state_dict(state["loader"])
    return state
