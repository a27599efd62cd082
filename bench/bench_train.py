"""Training throughput: lmstack's loop against a bare PyTorch loop on the same model, same run.

    python bench/bench_train.py --preset tiny --steps 30                 # CPU
    python bench/bench_train.py --preset gpt2-124m --steps 50            # one GPU: bf16, compiled, MFU

The reference is the smallest honest training loop (forward, backward, AdamW step; same model,
same batch shape, same precision and compile setting) so the ratio shows what lmstack's loop costs
(LR schedule, clipping, bad-batch checks, logging). On CUDA both report MFU: achieved model FLOP/s
(6N + attention, see GPT.flops_per_token) over the GPU's peak dense bf16 FLOP/s.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch

from lmstack.config import build_run_config
from lmstack.devices import resolve_device
from lmstack.models import build_model
from lmstack.train.loop import autocast_context, peak_flops, read_metrics, train
from lmstack.train.losses import causal_lm


class RandomLoader:
    """Uniform random tokens, infinite: throughput does not depend on what the tokens are."""

    def __init__(self, B: int, T: int, vocab: int, device: str = "cpu"):
        self.B, self.T, self.vocab = B, T, vocab
        self.bytes_per_token = 4.0
        self.g = torch.Generator().manual_seed(0)

    def __iter__(self):
        while True:
            seq = torch.randint(0, self.vocab, (self.B, self.T + 1), generator=self.g)
            yield {"input_ids": seq[:, :-1], "labels": seq[:, 1:]}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def bare_loop(cfg, steps: int, device: torch.device) -> float:
    """tokens/s of forward + backward + AdamW on the same model and batch shape."""
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_model = torch.compile(model) if cfg.train.compile else model
    B, T, A = cfg.train.batch_size, cfg.train.seq_len, cfg.train.grad_accum
    x = torch.randint(0, cfg.model.vocab_size, (B, T + 1), device=device)
    warm = 3
    for i in range(steps + warm):
        if i == warm:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        for _ in range(A):
            with autocast_context(device, cfg.train.dtype):
                _, loss = step_model(x[:, :-1], x[:, 1:])
            (loss / A).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * B * T * A / (time.perf_counter() - t0)


def lmstack_loop(cfg, steps: int) -> float:
    """tokens/s of lmstack's train() over the same number of steps (first steps excluded via metrics)."""
    cfg.train.max_steps = steps + 3
    cfg.train.log_every = 1
    cfg.train.eval_every = 0
    cfg.train.ckpt_every = 0
    cfg.train.eval_batches = 1
    cfg.train.tensorboard = False
    cfg.optim.warmup_steps = 1
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with tempfile.TemporaryDirectory() as out:
        train(model, cfg, RandomLoader(cfg.train.batch_size, cfg.train.seq_len, cfg.model.vocab_size),
              RandomLoader(cfg.train.batch_size, cfg.train.seq_len, cfg.model.vocab_size), causal_lm, out,
              progress=False)
        rows = [r for r in read_metrics(Path(out) / "metrics.jsonl") if "tokens_per_second" in r]
    rates = [r["tokens_per_second"] for r in rows[3:]]  # skip warmup / compile steps
    return len(rates) / sum(1 / r for r in rates)  # harmonic mean = total tokens / total time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    cfg = build_run_config(a.preset, overrides=a.overrides)
    device = resolve_device("auto")
    cfg.train.device = device.type
    if device.type == "cpu":
        cfg.train.compile = False  # compile on CPU adds minutes of build time for little gain here
    model = build_model(cfg.model)
    flops_per_token = model.flops_per_token(cfg.train.seq_len)
    params = model.num_params()
    del model
    ref = bare_loop(cfg, a.steps, device)
    ours = lmstack_loop(cfg, a.steps)
    peak = peak_flops(device)
    print(f"preset {a.preset}: {params / 1e6:.1f}M params, B={cfg.train.batch_size} T={cfg.train.seq_len} "
          f"accum={cfg.train.grad_accum} dtype={cfg.train.dtype} compile={cfg.train.compile} on {device}")
    for name, tokens_per_second in (("bare PyTorch loop", ref), ("lmstack train()", ours)):
        mfu = f"  MFU {tokens_per_second * flops_per_token / peak:.1%}" if peak else ""
        print(f"  {name:18s} {tokens_per_second:12,.0f} tokens/s{mfu}")
    print(f"  ratio lmstack / bare: {ours / ref:.2f}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
