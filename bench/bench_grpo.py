"""GRPO on a verifiable task, from an SFT model: pass@1 and pass@k before and after, seeded, with a plot.

    .venv/bin/python bench/bench_grpo.py [--sft-steps 300] [--grpo-steps 60] [--seed 0]

What it does: writes 1-digit + 1-digit addition problems (lmstack/data/verifiable.py), trains a byte-level BPE
tokenizer and a small GPT (2 layers, 64 wide) from scratch with ``lmstack sft`` on a share of the problems
(so the model lands part way: pass@1 well above 0 and below 100 %), then runs ``lmstack grpo`` with the
exact reward (``lmstack.data.verifiable:reward``) on prompts the SFT run did not see. pass@1 is greedy
accuracy on 100 held-out problems; pass@8 is the share of problems with at least one right answer among 8 samples at
temperature 1, and sampled pass@1 the share of right samples. Writes bench/results/grpo/results.json and grpo.png (reward and held-out greedy reward against
step). Caveat: one tiny model and one seed per call; the numbers say what the stage does, not what it would
do at scale.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
from lmstack.plots import plot_training_curves
from lmstack.stages.grpo import grpo
from lmstack.stages.sft import sft
from lmstack.tokenizer import Tokenizer
from lmstack.train.loop import read_metrics
from lmstack.train.rollout import render_prompt

ROOT = Path(__file__).resolve().parent


def pass_at(checkpoint: Path, problems: list[dict], k: int, seed: int) -> dict[str, float]:
    loaded = load_checkpoint(checkpoint)
    engine = Engine(loaded.model, loaded.tokenizer, max_num_seqs=64, max_model_len=64, seed=seed)
    prompts = [render_prompt(loaded.tokenizer, p["prompt"]) for p in problems]
    greedy = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0))
    sampled = engine.generate(prompts, [SamplingParams(max_tokens=6, temperature=1.0, n=k, seed=seed + i)
                                        for i in range(len(prompts))])
    pass1 = sum(score(p["prompt"], out.outputs[0].text) for p, out in zip(problems, greedy)) / len(problems)
    # pass@1 at temperature 1: the share of right samples (the unbiased estimator with k = 1)
    sampled_pass1 = sum(sum(score(p["prompt"], o.text) for o in out.outputs) / k
                        for p, out in zip(problems, sampled)) / len(problems)
    any_right = sum(any(score(p["prompt"], o.text) for o in out.outputs) for p, out in zip(problems, sampled))
    return {"pass@1_greedy": pass1, "pass@1_sampled": sampled_pass1, f"pass@{k}": any_right / len(problems)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sft-steps", type=int, default=150)
    parser.add_argument("--grpo-steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="runs/bench_grpo")
    args = parser.parse_args()
    torch.set_num_threads(2)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    options = {"digits": 1, "ops": "+"}
    conversations = make_conversations("arithmetic", 2000, seed=args.seed, **options)
    write_records(work / "sft.jsonl", conversations)
    tok = Tokenizer.train([m["content"] for c in conversations for m in c["messages"]], vocab_size=300)
    torch.manual_seed(args.seed)
    cfg = GPTConfig(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_kv_head=4, n_embd=64)
    save_checkpoint(work / "base", GPT(cfg), {"model": dataclasses.asdict(cfg)}, tokenizer=tok)
    started = time.time()
    sft(work / "base", [str(work / "sft.jsonl")], work / "sft", overwrite=True, progress=False,
        overrides=[f"train.max_steps={args.sft_steps}", "train.seq_len=32", "train.batch_size=32", "optim.lr=3e-3",
                   "optim.warmup_steps=10", "train.eval_every=0", "train.ckpt_every=0", f"train.seed={args.seed}"])
    sft_seconds = time.time() - started
    rl_prompts = make_prompts("arithmetic", 600, seed=args.seed + 1000, **options)
    write_records(work / "prompts.jsonl", rl_prompts[:500])
    held_out = rl_prompts[500:]
    before = pass_at(work / "sft" / "model", held_out, 8, args.seed)
    started = time.time()
    grpo(work / "sft" / "model", [str(work / "prompts.jsonl")], "lmstack.data.verifiable:reward", work / "grpo",
         overwrite=True, progress=False,
         overrides=[f"train.max_steps={args.grpo_steps}", "grpo.group_size=8", "grpo.prompts_per_rollout=8",
                    "grpo.max_tokens=6", "grpo.minibatches=2", "optim.lr=1e-3", "optim.schedule=constant",
                    "train.eval_every=10", "train.log_every=1", "train.ckpt_every=0", "grpo.eval_prompts=50",
                    f"grpo.seed={args.seed}", f"train.seed={args.seed}"])
    grpo_seconds = time.time() - started
    after = pass_at(work / "grpo" / "model", held_out, 8, args.seed)
    out = ROOT / "results" / "grpo"
    out.mkdir(parents=True, exist_ok=True)
    plot_training_curves(read_metrics(work / "grpo" / "metrics.jsonl"), out / "grpo.png",
                         panels=("reward", "val_reward", "kl_old", "entropy"),
                         title="GRPO on 1-digit addition from an SFT model")
    results = {"command": f"python bench/bench_grpo.py --sft-steps {args.sft_steps} --grpo-steps {args.grpo_steps} "
                          f"--seed {args.seed}",
               "task": "1-digit + 1-digit addition, exact answer", "held_out_problems": len(held_out),
               "before_grpo": before, "after_grpo": after, "sft_seconds": round(sft_seconds, 1),
               "grpo_seconds": round(grpo_seconds, 1), "grpo_steps": args.grpo_steps,
               "threads": torch.get_num_threads()}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
