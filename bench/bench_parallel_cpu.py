"""A per-plan table of the training parallel layouts on CPU (gloo): tokens/s relative to one process, measured
in the same run, and peak memory per rank.

    python bench/bench_parallel_cpu.py                       # results in bench/results/parallel_cpu.{json,md}
    python bench/bench_parallel_cpu.py --steps 12 --n-layer 4 --n-embd 128

Each plan trains the same small Llama-style GPT (untied embeddings, GQA) from the same seed on the same
synthetic token batches for ``--steps`` steps, one torchrun launch per plan (``--nproc_per_node 2``):
one process (the reference), DDP, FSDP2 (``parallel.dp_shard=2``), FSDP2 with full activation
checkpointing, TP (``parallel.tp=2``, sequence parallel), PP GPipe and PP 1F1B (``parallel.pp=2``, 4
micro-batches). The global batch is the same for every plan (``--batch`` sequences of ``--seq-len``
tokens; data-parallel plans take half of it per replica), so each plan's tokens/s is directly comparable
with the reference's. Tokens/s is the median of the loop's per-step figures after ``--warmup`` steps; peak
memory is each rank's maximum resident set size (ru_maxrss). The loop's MFU needs a peak FLOP/s figure,
which it has for GPUs only: on CPU the column says so.

What this is: a correctness-and-overhead table. The final loss of every plan is printed next to the
reference's (the parallel tests pin them within 1e-5; here they show the runs trained the same thing).
What it is not: a speed claim. Two processes on a 2-core CPU share the cores with each other (and with
whatever else the machine runs), gloo moves tensors through the kernel's TCP stack, and a model this small
is all communication and Python overhead; on GPUs with NCCL the ratios are different in kind.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLANS = {  # name: (overrides, processes)
    "1 process": ([], 1),
    "DDP 2": ([], 2),
    "FSDP2 2": (["parallel.dp_shard=2"], 2),
    "FSDP2 2 + AC full": (["parallel.dp_shard=2", "train.activation_checkpointing=full"], 2),
    "TP 2 (+SP)": (["parallel.tp=2"], 2),
    "PP 2 GPipe": (["parallel.pp=2", "parallel.pp_schedule=gpipe", "parallel.pp_microbatches=4"], 2),
    "PP 2 1F1B": (["parallel.pp=2", "parallel.pp_schedule=1f1b", "parallel.pp_microbatches=4"], 2),
}


class SyntheticTokens:
    """Endless uniformly random token batches: step k's global batch is seeded by k and replica r of w takes
    its r-th slice, so every plan trains on the same tokens."""

    def __init__(self, batch_size: int, seq_len: int, vocab: int, rank: int, world_size: int):
        self.batch_size, self.seq_len, self.vocab = batch_size, seq_len, vocab
        self.rank, self.world_size, self.position = rank, world_size, 0

    def __iter__(self):
        import torch

        while True:
            g = torch.Generator().manual_seed(self.position)
            B = self.batch_size
            batch = torch.randint(0, self.vocab, (B * self.world_size, self.seq_len + 1), generator=g)
            window = batch[self.rank * B:(self.rank + 1) * B]  # (B, T + 1)
            self.position += 1
            yield {"input_ids": window[:, :-1], "labels": window[:, 1:]}

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


def worker(out_dir: Path, args: argparse.Namespace, overrides: list[str]) -> None:
    """One plan, in each process torchrun started (or alone): train, then write this rank's peak memory."""
    import torch

    from lmstack.config import OptimConfig, RunConfig, TrainConfig, apply_overrides
    from lmstack.models import build_model
    from lmstack.models.gpt import GPTConfig
    from lmstack.train.dist import DistInfo, cleanup_distributed, init_distributed
    from lmstack.train.loop import train
    from lmstack.train.losses import causal_lm
    from lmstack.train.parallel import data_parallel_rank, resolve_layout

    torch.set_num_threads(1)
    base = init_distributed("cpu")
    try:
        cfg = RunConfig(model=GPTConfig(vocab_size=args.vocab, block_size=args.seq_len, n_layer=args.n_layer,
                                        n_head=4, n_kv_head=2, n_embd=args.n_embd, tie_embeddings=False),
                        optim=OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"),
                        train=TrainConfig(batch_size=args.batch, seq_len=args.seq_len, max_steps=args.steps,
                                          eval_every=0, eval_batches=1, log_every=1, ckpt_every=0, device="cpu",
                                          dtype="fp32", tensorboard=False, seed=0))
        apply_overrides(cfg, overrides)
        layout = resolve_layout(cfg, base.world_size)
        cfg.train.batch_size = args.batch // layout.dp  # the same global batch for every plan
        dp_rank = data_parallel_rank(layout, base.rank)
        info = DistInfo(rank=base.rank, local_rank=base.local_rank, world_size=base.world_size, device=base.device)
        torch.manual_seed(0)
        model = build_model(cfg.model)
        loaders = [SyntheticTokens(cfg.train.batch_size, args.seq_len, args.vocab, dp_rank, layout.dp) for _ in "tv"]
        train(model, cfg, loaders[0], loaders[1], causal_lm, out_dir, info=info, progress=False)
    finally:
        cleanup_distributed()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    (out_dir / f"memory_rank{base.rank}.json").write_text(json.dumps({"peak_rss_mb": peak_mb}))


def run_plan(name: str, overrides: list[str], nproc: int, out_dir: Path, args: argparse.Namespace) -> dict:
    """Launch one plan; returns its row (tokens/s, loss, MFU, memory per rank, wall seconds, the command)."""
    sizes = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("steps", "batch", "seq_len", "n_layer", "n_embd",
                                                                       "vocab")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           __file__, "--worker", str(out_dir), *sizes, *overrides]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        return {"plan": name, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tokens_per_second" in r and r["step"] > args.warmup]
    memory = [json.loads((out_dir / f"memory_rank{rank}.json").read_text())["peak_rss_mb"] for rank in range(nproc)]
    mfu = [r["mfu"] for r in steps if "mfu" in r]
    return {"plan": name, "processes": nproc, "overrides": overrides,
            "tokens_per_second": statistics.median(r["tokens_per_second"] for r in steps),
            "final_loss": [r for r in rows if "loss" in r][-1]["loss"],
            "mfu": statistics.median(mfu) if mfu else None, "peak_rss_mb_per_rank": memory,
            "wall_seconds": round(time.time() - started, 1),
            "command": "python -m torch.distributed.run --standalone --nproc_per_node="
                       f"{nproc} bench/bench_parallel_cpu.py --worker OUT {' '.join(sizes + overrides)}"}


def markdown(results: dict) -> str:
    ref = next(r for r in results["plans"] if r["plan"] == "1 process")
    lines = ["| plan | processes | tokens/s vs 1 process | final loss (1 process: "
             f"{ref['final_loss']:.4f}) | MFU | peak RSS per rank (MB) |", "|---|---|---|---|---|---|"]
    for r in results["plans"]:
        if "error" in r:
            lines.append(f"| {r['plan']} | - | failed: {r['error']} | | | |")
            continue
        ratio = r["tokens_per_second"] / ref["tokens_per_second"]
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no CPU peak FLOP/s)"
        memory = " / ".join(f"{m:.0f}" for m in r["peak_rss_mb_per_rank"])
        lines.append(f"| {r['plan']} | {r['processes']} | {ratio:.2f}x | {r['final_loss']:.4f} | {mfu} | {memory} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="training steps per plan")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the tokens/s median")
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per plan launch")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where parallel_cpu.{json,md} go")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench_parallel_cpu"), help="run directories")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a plan's process (torchrun runs it)
    args, overrides = parser.parse_known_args()
    if args.worker:
        worker(Path(args.worker), args, overrides)
        return
    import shutil

    import torch

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    plans = []
    for i, (name, (plan_overrides, nproc)) in enumerate(PLANS.items()):
        row = run_plan(name, plan_overrides, nproc, work / f"plan{i}", args)
        print(json.dumps(row), flush=True)
        plans.append(row)
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                           "load_average_after": os.getloadavg()},
               "settings": {k: getattr(args, k) for k in ("steps", "warmup", "batch", "seq_len", "n_layer", "n_embd",
                                                          "vocab")},
               "plans": plans}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "parallel_cpu.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "parallel_cpu.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
