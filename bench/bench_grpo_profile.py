"""Where one GRPO step's time goes: generation, the behaviour / reference log-prob pass, the update's forward and
backward, the optimizer; each log-prob part with the shared-prompt path and with the full forward, interleaved.

    python bench/bench_grpo_profile.py            # needs runs/bench_grpo_trl (python bench/bench_grpo_trl.py makes it)
    python bench/bench_grpo_profile.py --prompts 16 --group 8 --repeats 5

The model, prompts and sampling are bench_grpo_trl's (WORK/model, WORK/prompts.jsonl): ``--prompts`` prompts x
``--group`` samples, at most ``--max-new-tokens`` new tokens, temperature 1, fp32, ``--threads`` threads. Each
repeat draws a fresh rollout through :class:`lmstack.train.rollout.PolicySampler` (the live model, the engine
kept between rollouts), then times on the same rows (shuffled, as a minibatch is): the behaviour pass
(:func:`lmstack.train.rollout.sequence_logprobs`, no gradient; the reference pass is the same work on another
model) with and without ``response_mask`` (shared-prompt path vs full forward), the GRPO objective's forward and
its backward with the shared-prompt path on and off, and an AdamW step with grad clipping. The first repeat
warms up and is left out; medians over the rest. Caveat: one process on a shared machine; the parts alternate
so a slow spell hits them alike, but single numbers still move with the load (reported before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--work", default="runs/bench_grpo_trl", help="bench_grpo_trl's work directory")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per rollout")
    ap.add_argument("--group", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=4, help="rollouts timed (after one warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", default="bench/results/grpo/profile.json", help="results file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from lmstack.atomic import write_json_atomic
    from lmstack.checkpoint import load_checkpoint
    from lmstack.config import GRPOConfig
    from lmstack.engine import SamplingParams
    from lmstack.stages.grpo import grpo_objective
    from lmstack.train import shared_prompt
    from lmstack.train.rollout import PolicySampler, render_prompt, sequence_logprobs

    work = Path(args.work)
    loaded = load_checkpoint(work / "model")
    model, tokenizer = loaded.model.train(), loaded.tokenizer
    records = [json.loads(line) for line in (work / "prompts.jsonl").read_text().splitlines()][:args.prompts]
    prompts = [render_prompt(tokenizer, r["prompt"]) for r in records]
    sampler = PolicySampler(model, tokenizer, max_model_len=128, max_num_seqs=args.prompts * args.group)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95))
    objective = grpo_objective(GRPOConfig(loss_norm="token", clip_low=0.2, clip_high=0.2))
    supported = shared_prompt.supports_shared_prompt
    load_before = os.getloadavg()[0]
    seconds: dict[str, list[float]] = {}

    def clip_and_step() -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    shapes = {}

    def timed(name: str, fn, *args, **kwargs):
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds.setdefault(name, []).append(time.perf_counter() - started)
        return result

    for repeat in range(args.repeats + 1):
        params = SamplingParams(n=args.group, max_tokens=args.max_new_tokens, temperature=1.0)
        seeds = [repeat * 1000 + i for i in range(len(prompts))]
        rollout = timed("generation (engine)", sampler.rollout, prompts, params, seeds, tokenizer.pad_id,
                        behaviour_logprobs=False)
        order = torch.randperm(rollout.input_ids.shape[0], generator=torch.Generator().manual_seed(repeat))
        batch = {"input_ids": rollout.input_ids[order], "response_mask": rollout.response_mask[order],
                 "advantages": torch.randn(len(order), generator=torch.Generator().manual_seed(repeat))}
        shapes = {"rows x columns": list(batch["input_ids"].shape),
                  "prompt tokens": [len(p) for p in prompts],
                  "mean response tokens": float(rollout.response_mask.sum(1).mean())}
        for path in ("shared prompt", "full forward"):
            shared_prompt.supports_shared_prompt = supported if path == "shared prompt" else (lambda m: False)
            mask = batch["response_mask"] if path == "shared prompt" else None
            timed(f"behaviour pass, {path}", sequence_logprobs, model, batch["input_ids"], response_mask=mask)
            loss, _ = timed(f"update forward, {path}", objective.fn, model, batch)
            timed(f"update backward, {path}", loss.backward)
            shared_prompt.supports_shared_prompt = supported
            if path == "shared prompt":
                timed("optimizer (clip + AdamW)", clip_and_step)
            optimizer.zero_grad()
        if repeat == 0:
            seconds.clear()  # the warm-up
    medians = {name: round(statistics.median(values), 3) for name, values in seconds.items()}
    results = {"command": f"python bench/bench_grpo_profile.py --prompts {args.prompts} --group {args.group} "
                          f"--max-new-tokens {args.max_new_tokens} --repeats {args.repeats} --threads {args.threads}",
               "cpu_count": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg()[0],
               "batch": shapes, "median_seconds": medians,
               "seconds": {name: [round(v, 3) for v in values] for name, values in seconds.items()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, results, indent=1)
    print(f"{results['command']}; batch {shapes}; load {load_before:.1f} -> {results['load_after']:.1f}\n")
    print("| part | median s |\n|---|---|")
    for name, value in medians.items():
        print(f"| {name} | {value:.3f} |")


if __name__ == "__main__":
    main()
