"""GRPO on a verifiable task, from an SFT model: pass@1 and pass@k before and after, several seeds, with a plot.

    .venv/bin/python bench/bench_grpo.py [--sft-steps 200] [--grpo-steps 300] [--seeds 0,1,2] [--threads 1]

What it does: writes 1-digit + 1-digit addition problems (lmstack/data/verifiable.py), trains a byte-level BPE
tokenizer and a small GPT (2 layers, 64 wide) from scratch with ``lmstack sft`` on them (so the model lands part
way: pass@1 well above 0 and below 100 %), then runs ``lmstack grpo`` once per seed in ``--seeds`` from that one
SFT model, with the exact reward (``lmstack.data.verifiable:reward``). Each rollout is 16 prompts x 16 samples
at temperature 1, one update per rollout (on-policy: the ratio is 1 and the clip never binds), token-level loss
normalisation, no KL term, AdamW at a constant lr of 5e-4.

Measured on 100 problems that are not in the GRPO prompt file: greedy pass@1; sampled pass@1 (the share of
right answers among 8 samples at temperature 1 per problem, the unbiased pass@1 estimate); pass@8 (the share of
problems with at least one right answer among those 8). Caveat: 1-digit addition has only 100 distinct
problems, so the evaluation problems are held-out *records*, not problems the model never met in any form; the
numbers say what the stage does on a tiny model, not what it does at scale.

Writes bench/results/grpo/results.json and grpo.png (rollout reward against update per seed; before/after bars).
Reusable pieces (the SFT model, pass@k) are imported by bench/bench_ppo.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from lmstack.checkpoint import load_checkpoint, save_checkpoint
from lmstack.data.verifiable import (
    make_conversations,
    make_prompts,
    score,
    write_records,
)
from lmstack.engine import Engine, SamplingParams
from lmstack.models.gpt import GPT, GPTConfig
from lmstack.stages.grpo import grpo
from lmstack.stages.sft import sft
from lmstack.tokenizer import Tokenizer
from lmstack.train.loop import read_metrics
from lmstack.train.rollout import render_prompt

ROOT = Path(__file__).resolve().parent
TASK = {"digits": 1, "ops": "+"}


def train_sft_model(work: Path, steps: int, seed: int) -> Path:
    """A 2-layer GPT SFT'd from scratch on 1-digit addition; returns its model directory (seeded, deterministic)."""
    work.mkdir(parents=True, exist_ok=True)
    conversations = make_conversations("arithmetic", 2000, seed=seed, **TASK)
    write_records(work / "sft.jsonl", conversations)
    tok = Tokenizer.train([m["content"] for c in conversations for m in c["messages"]], vocab_size=300)
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_kv_head=4, n_embd=64)
    save_checkpoint(work / "base", GPT(cfg), {"model": dataclasses.asdict(cfg)}, tokenizer=tok)
    sft(work / "base", [str(work / "sft.jsonl")], work / "sft", overwrite=True, progress=False,
        overrides=[f"train.max_steps={steps}", "train.seq_len=32", "train.batch_size=32", "optim.lr=3e-3",
                   "optim.warmup_steps=10", "train.eval_every=0", "train.ckpt_every=0", f"train.seed={seed}"])
    return work / "sft" / "model"


def rl_problems(seed: int) -> tuple[list[dict], list[dict]]:
    """(500 RL training prompt records, 100 evaluation records), both drawn apart from the SFT data's seed."""
    records = make_prompts("arithmetic", 600, seed=seed + 1000, **TASK)
    return records[:500], records[500:]


def pass_at(checkpoint: Path, problems: list[dict], k: int, seed: int) -> dict[str, float]:
    """Greedy pass@1, sampled pass@1 (T=1, mean over k samples) and pass@k of the checkpoint on ``problems``."""
    loaded = load_checkpoint(checkpoint)
    engine = Engine(loaded.model, loaded.tokenizer, max_num_seqs=64, max_model_len=64, seed=seed)
    prompts = [render_prompt(loaded.tokenizer, p["prompt"]) for p in problems]
    greedy = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0))
    sampled = engine.generate(prompts, [SamplingParams(max_tokens=6, temperature=1.0, n=k, seed=seed + i)
                                        for i in range(len(prompts))])
    pass1 = sum(score(p["prompt"], out.outputs[0].text) for p, out in zip(problems, greedy)) / len(problems)
    sampled_pass1 = sum(sum(score(p["prompt"], o.text) for o in out.outputs) / k
                        for p, out in zip(problems, sampled)) / len(problems)
    any_right = sum(any(score(p["prompt"], o.text) for o in out.outputs) for p, out in zip(problems, sampled))
    return {"pass@1_greedy": pass1, "pass@1_sampled": sampled_pass1, f"pass@{k}": any_right / len(problems)}


def grpo_overrides(steps: int, seed: int, lr: float) -> list[str]:
    return [f"train.max_steps={steps}", "grpo.group_size=16", "grpo.prompts_per_rollout=16", "grpo.minibatches=1",
            "grpo.max_tokens=6", "grpo.loss_norm=token", f"optim.lr={lr}", "optim.schedule=constant",
            "train.eval_every=0", "train.log_every=1", "train.ckpt_every=0", "grpo.eval_prompts=16",
            f"grpo.seed={seed}", f"train.seed={seed}"]


def plot(runs: dict[int, dict], before: dict[str, float], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for seed, run in runs.items():
        rewards = run["rollout_reward"]
        window = 10
        smooth = [statistics.fmean(rewards[max(0, i - window + 1):i + 1]) for i in range(len(rewards))]
        left.plot(range(1, len(rewards) + 1), smooth, label=f"seed {seed}")
    left.set_xlabel("GRPO update (one rollout of 16 x 16 each)")
    left.set_ylabel("rollout reward (mean of last 10)")
    left.set_title("reward of the samples GRPO trains on")
    left.legend()
    metrics = list(before)
    width = 0.8 / (len(runs) + 1)
    right.bar([i for i in range(len(metrics))], [before[m] for m in metrics], width, label="SFT (before)")
    for j, (seed, run) in enumerate(runs.items(), 1):
        right.bar([i + j * width for i in range(len(metrics))], [run["after"][m] for m in metrics], width,
                  label=f"GRPO seed {seed}")
    right.set_xticks([i + width * len(runs) / 2 for i in range(len(metrics))], metrics)
    right.set_ylim(0, 1)
    right.set_title("100 evaluation problems")
    right.legend(fontsize=8)
    fig.suptitle("GRPO on 1-digit addition from a 2-layer SFT model")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sft-steps", type=int, default=200)
    parser.add_argument("--grpo-steps", type=int, default=300, help="GRPO updates (= rollouts) per seed")
    parser.add_argument("--seeds", default="0,1,2", help="GRPO seeds, each from the same SFT model")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    parser.add_argument("--work", default="runs/bench_grpo")
    parser.add_argument("--out", default=str(ROOT / "results" / "grpo"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work, out = Path(args.work), Path(args.out)
    started = time.time()
    sft_model = train_sft_model(work, args.sft_steps, seed=0)
    sft_seconds = time.time() - started
    train_records, held_out = rl_problems(seed=0)
    write_records(work / "prompts.jsonl", train_records)
    before = pass_at(sft_model, held_out, 8, seed=0)
    print("before GRPO", before, flush=True)
    runs: dict[int, dict] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        started = time.time()
        run_dir = work / f"grpo-seed{seed}"
        grpo(sft_model, [str(work / "prompts.jsonl")], "lmstack.data.verifiable:reward", run_dir, overwrite=True,
             progress=False, overrides=grpo_overrides(args.grpo_steps, seed, args.lr))
        seconds = time.time() - started
        rewards = [r["reward"] for r in read_metrics(run_dir / "metrics.jsonl") if "reward" in r]
        runs[seed] = {"after": pass_at(run_dir / "model", held_out, 8, seed=0), "grpo_seconds": round(seconds, 1),
                      "rollout_reward": rewards}
        print(f"seed {seed}", runs[seed]["after"], f"{seconds:.0f} s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    plot(runs, before, out / "grpo.png")
    mean_after = {m: statistics.fmean(r["after"][m] for r in runs.values()) for m in before}
    results = {"command": f"python bench/bench_grpo.py --sft-steps {args.sft_steps} --grpo-steps {args.grpo_steps} "
                          f"--seeds {args.seeds} --lr {args.lr} --threads {args.threads}",
               "task": "1-digit + 1-digit addition, exact answer", "evaluation_problems": len(held_out),
               "grpo": {"group_size": 16, "prompts_per_rollout": 16, "minibatches": 1, "loss_norm": "token",
                        "lr": args.lr, "beta": 0, "temperature": 1.0, "updates": args.grpo_steps},
               "before_grpo": before, "after_grpo_mean": mean_after,
               "after_grpo": {str(s): r["after"] for s, r in runs.items()},
               "rollout_reward_first10_last10": {str(s): [round(statistics.fmean(r["rollout_reward"][:10]), 4),
                                                          round(statistics.fmean(r["rollout_reward"][-10:]), 4)]
                                                 for s, r in runs.items()},
               "sft_seconds": round(sft_seconds, 1),
               "grpo_seconds": {str(s): r["grpo_seconds"] for s, r in runs.items()},
               "threads": torch.get_num_threads()}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
