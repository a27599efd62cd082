"""Runs of the one training loop under parallel layouts, for tests/test_train_parallel*.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/parallel_helpers.py OUT PLAN [PLAN ...]

Each PLAN is ``name:key=value,key=value`` (``parallel.*`` / ``train.*`` overrides, e.g.
``fsdp:parallel.dp_shard=2``); every plan trains the same tiny model from the same seed on
:class:`loop_helpers.PatternLoader` batches into OUT/name (metrics.jsonl with the loss and gradient norm
of every step, RUN/model consolidated), all in one torchrun launch so the processes start once.
:func:`reference_run` is the same training in one process with the global batch (``batch_size x dp``),
which every layout must reproduce.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/parallel_helpers.py --cli VERB ARGS...

runs one ``lmstack`` command (:func:`run_cli` launches each command on its own). Several stage runs in one
launch, each setting a process group up and tearing it down, are not reliable on gloo: the second group's
rendezvous can race with the first one's leftover keys in the launch's store (seen under TP: one rank
waited in ``init_process_group`` while the other had passed it), and after an FSDP2 run the device-mesh state
outlives the group.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # loop_helpers, when run as a script

from loop_helpers import PatternLoader  # noqa: E402

from lmstack.config import OptimConfig, RunConfig, TrainConfig, apply_overrides  # noqa: E402
from lmstack.models.gpt import GPTConfig  # noqa: E402

BATCH, SEQ, STEPS = 4, 16, 4  # per data-parallel replica


def tiny_config(steps: int = STEPS, overrides: list[str] | None = None) -> RunConfig:
    """A 4-layer Llama-style model (GQA: 4 heads, 2 KV heads) with untied embeddings, fp32 on CPU."""
    cfg = RunConfig(model=GPTConfig(vocab_size=128, block_size=SEQ, n_layer=4, n_head=4, n_kv_head=2, n_embd=32,
                                    tie_embeddings=False),
                    optim=OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"),
                    train=TrainConfig(batch_size=BATCH, seq_len=SEQ, max_steps=steps, eval_every=0, eval_batches=1,
                                      log_every=1, ckpt_every=2, keep_last=4, device="cpu", dtype="fp32",
                                      tensorboard=False, seed=7))
    return apply_overrides(cfg, overrides or [])


def train_once(cfg: RunConfig, out_dir: Path, rank: int = 0, dp_rank: int = 0, dp_size: int = 1,
               resume: bool | str = False, info=None) -> dict:
    """Train from the seed model (the same on every process) with PatternLoader batches; returns the summary."""
    import torch

    from lmstack.models import build_model
    from lmstack.train.loop import train
    from lmstack.train.losses import causal_lm

    torch.manual_seed(0)
    model = build_model(cfg.model)
    loaders = [PatternLoader(cfg.train.batch_size, cfg.train.seq_len, vocab=cfg.model.vocab_size, seed=3,
                             rank=dp_rank, world_size=dp_size, split=split) for split in ("train", "val")]
    result = train(model, cfg, loaders[0], loaders[1], causal_lm, out_dir, resume=resume, info=info, progress=False)
    return result.to_dict()


def reference_run(out_dir: Path, dp: int = 1, steps: int = STEPS, overrides: list[str] | None = None) -> dict:
    """One process, the global batch of ``dp`` replicas."""
    cfg = tiny_config(steps, overrides)
    cfg.train.batch_size *= dp
    return train_once(cfg, out_dir)


def run_plans(plans: list[str], out_root: Path, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run PLANs under torchrun (gloo, CPU); raises with the processes' output when it fails."""
    return _torchrun([str(out_root), *plans], nproc, timeout)


def run_cli(commands: list[list[str]], nproc: int = 2, timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Run ``lmstack`` COMMANDS (argument lists without ``lmstack``) in order, one torchrun launch each
    (``timeout`` seconds per launch)."""
    return [_torchrun(["--cli", *command], nproc, timeout) for command in commands]


def _torchrun(args: list[str], nproc: int, timeout: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           __file__, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            workers = _descendants(popen.pid)  # torchrun starts each worker in a session of its own
            os.killpg(popen.pid, signal.SIGKILL)
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            stdout, stderr = popen.communicate()
            raise AssertionError(f"torchrun timed out after {timeout} s:\n{stderr[-4000:]}") from None
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _descendants(pid: int) -> list[int]:
    """The processes below PID (Linux /proc), children first."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        children = parents.get(queue.pop(0), [])
        found += children
        queue += children
    return found


def step_rows(run_dir: Path) -> list[dict]:
    """The per-step rows (loss, grad_norm) of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r and "grad_norm" in r]


def _main(out_root: str, plans: list[str]) -> None:
    from lmstack.train.dist import DistInfo, cleanup_distributed, init_distributed
    from lmstack.train.parallel import data_parallel_rank, resolve_layout

    base = init_distributed("cpu")
    try:
        for plan in plans:
            name, _, spec = plan.partition(":")
            overrides = [o for o in spec.split(",") if o]
            resume = any(o == "resume=true" for o in overrides)
            cfg = tiny_config(overrides=[o for o in overrides if not o.startswith("resume=")])
            layout = resolve_layout(cfg, base.world_size)
            info = DistInfo(rank=base.rank, local_rank=base.local_rank, world_size=base.world_size, device=base.device)
            train_once(cfg, Path(out_root) / name, base.rank, data_parallel_rank(layout, base.rank), layout.dp,
                       resume=resume, info=info)
    finally:
        cleanup_distributed()


def _cli_main(args: list[str]) -> None:
    from lmstack.cli import main

    sys.exit(main(args))


if __name__ == "__main__":
    if sys.argv[1] == "--cli":
        _cli_main(sys.argv[2:])
    else:
        _main(sys.argv[1], sys.argv[2:])
