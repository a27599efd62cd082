"""PPO against a learned reward model, swept over the KL coefficient: reward-model score vs KL, and the true metric.

    .venv/bin/python bench/bench_ppo.py [--sft-steps 300] [--rm-steps 150] [--ppo-steps 160] [--betas 0,0.1,1,5]

What it does, all seeded:

1. The SFT model of bench/bench_grpo.py (a 2-layer GPT SFT'd on 1-digit addition).
2. A reward model trained with ``lmstack reward`` (Bradley-Terry, from the SFT model) on pairs labelled by the
   verifiable reward: for an addition problem, the chosen answer is the exact sum and the rejected one a near
   miss (the sum +-1..3). The reward model has never seen anything but one number per answer, so it is a proxy:
   right on the answers it was trained on, unconstrained elsewhere.
3. ``lmstack ppo`` from the SFT model with that reward model as ``--reward``, once per ``ppo.kl_coef`` in
   ``--betas`` (fixed coefficient, k1 per-token KL penalty in the reward).

Measured per policy (SFT and each PPO run) on 100 evaluation problems, 8 samples each at temperature 1: the
reward model's score (what PPO maximises), the KL to the SFT model (Monte-Carlo: mean over samples of the
summed ``log pi - log pi_sft`` over response tokens), the exact-answer accuracy of the samples and of greedy
answers (the held-out true metric, which the policy never saw), and the mean response length. Reward hacking
shows as a reward-model score that rises while the true metric does not.

Writes bench/results/ppo/results.json and ppo.png (left: reward-model score against KL, the frontier, one
point per beta plus the SFT start; right: true accuracy against KL). Caveat: one tiny model and task; the
reward model is deliberately narrow, which is what makes hacking possible at all at this scale.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from bench_grpo import rl_problems, train_sft_model

from lmstack.checkpoint import load_checkpoint
from lmstack.data.verifiable import make_prompts, score, write_records
from lmstack.engine import Engine, SamplingParams
from lmstack.stages.grpo import resolve_reward
from lmstack.stages.ppo import ppo
from lmstack.stages.reward import reward as train_reward_model
from lmstack.train.loop import read_metrics
from lmstack.train.rollout import pad_sequences, render_prompt, sequence_logprobs

ROOT = Path(__file__).resolve().parent


def verifiable_pairs(n: int, seed: int) -> list[dict]:
    """Preference pairs labelled by the exact reward: the sum (chosen) against a near miss (rejected)."""
    rng = random.Random(seed)
    pairs = []
    for record in make_prompts("arithmetic", n, seed=seed + 2000, digits=1, ops="+"):
        answer = int(record["answer"])
        wrong = answer + rng.choice([d for d in (-3, -2, -1, 1, 2, 3) if answer + d >= 0])
        pairs.append({"prompt": record["prompt"], "chosen": [{"role": "assistant", "content": str(answer)}],
                      "rejected": [{"role": "assistant", "content": str(wrong)}]})
    return pairs


@torch.no_grad()
def measure(policy_dir: Path, reference_dir: Path, rm_reward, problems: list[dict], k: int, seed: int) -> dict:
    """RM score, KL to the reference, exact accuracy (sampled and greedy) and length of the policy's answers."""
    policy = load_checkpoint(policy_dir)
    reference = load_checkpoint(reference_dir).model.eval()
    tok = policy.tokenizer
    engine = Engine(policy.model, tok, max_num_seqs=64, max_model_len=64, seed=seed)
    prompts = [render_prompt(tok, p["prompt"]) for p in problems]
    sampled = engine.generate(prompts, [SamplingParams(max_tokens=6, temperature=1.0, n=k, seed=seed + i)
                                        for i in range(len(prompts))])
    greedy = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0))
    records, texts, rows_prompt, rows_response = [], [], [], []
    for problem, prompt, out in zip(problems, prompts, sampled):
        for o in out.outputs:
            records.append(problem)
            texts.append(o.text)
            rows_prompt.append(prompt)
            rows_response.append(list(o.token_ids))
    input_ids, mask = pad_sequences(rows_prompt, rows_response, tok.pad_id)
    logp, _ = sequence_logprobs(policy.model, input_ids)
    logp_ref, _ = sequence_logprobs(reference, input_ids)
    kl = ((logp - logp_ref) * mask).sum(1)  # (N,) per-sequence log-ratio: its mean estimates KL(pi || ref)
    rm_scores = rm_reward(records, texts)
    right = [score(r["prompt"], t) for r, t in zip(records, texts)]
    return {"rm_score": statistics.fmean(rm_scores), "kl_to_sft": float(kl.mean()),
            "true_accuracy_sampled": statistics.fmean(right),
            "rm_score_of_right_answers": statistics.fmean([s for s, ok in zip(rm_scores, right) if ok] or [0.0]),
            "rm_score_of_wrong_answers": statistics.fmean([s for s, ok in zip(rm_scores, right) if not ok] or [0.0]),
            "true_pass@1_greedy": statistics.fmean(score(p["prompt"], o.outputs[0].text)
                                                   for p, o in zip(problems, greedy)),
            "response_tokens": statistics.fmean(len(r) for r in rows_response),
            "examples": [f"{r['prompt'][0]['content']} -> {t!r}" for r, t in list(zip(records, texts))[3:: 8 * 20]]}


def plot(points: dict[str, dict], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, m in points.items():
        left.scatter(m["kl_to_sft"], m["rm_score"], s=40)
        left.annotate(label, (m["kl_to_sft"], m["rm_score"]), textcoords="offset points", xytext=(5, 5))
        for key, marker in (("true_accuracy_sampled", "s"), ("true_pass@1_greedy", "^")):
            right.scatter(m["kl_to_sft"], m[key], s=40, marker=marker, color=left.collections[-1].get_facecolor())
            right.annotate(label, (m["kl_to_sft"], m[key]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    left.set_xlabel("KL(policy || SFT), nats per answer")
    left.set_ylabel("reward-model score (sampled answers)")
    left.set_title("what PPO optimises")
    right.set_xlabel("KL(policy || SFT), nats per answer")
    right.set_ylabel("exact-answer accuracy")
    right.set_ylim(0, 1)
    right.set_title("true metric: greedy (triangles), sampled (squares)")
    fig.suptitle("PPO with a learned reward model on 1-digit addition, swept over the KL coefficient")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--rm-pairs", type=int, default=2000)
    parser.add_argument("--rm-steps", type=int, default=150)
    parser.add_argument("--ppo-steps", type=int, default=160, help="minibatch updates per PPO run")
    parser.add_argument("--betas", default="0,0.1,1,5", help="ppo.kl_coef values")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default="runs/bench_ppo")
    parser.add_argument("--out", default=str(ROOT / "results" / "ppo"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work, out = Path(args.work), Path(args.out)
    seconds: dict[str, float] = {}
    started = time.time()
    sft_model = train_sft_model(work, args.sft_steps, seed=args.seed)
    seconds["sft"] = time.time() - started
    write_records(work / "pairs.jsonl", verifiable_pairs(args.rm_pairs, args.seed))
    started = time.time()
    rm_summary = train_reward_model(sft_model, [str(work / "pairs.jsonl")], work / "rm", overwrite=True,
                                    progress=False,
                                    overrides=[f"train.max_steps={args.rm_steps}", "train.batch_size=32",
                                               "train.seq_len=32", "optim.lr=1e-3", "optim.warmup_steps=10",
                                               "train.eval_every=0", "train.ckpt_every=0", f"train.seed={args.seed}"])
    seconds["reward_model"] = time.time() - started
    rm_reward = resolve_reward(str(work / "rm" / "model"))
    train_records, problems = rl_problems(args.seed)
    write_records(work / "prompts.jsonl", train_records)
    points = {"SFT": measure(sft_model, sft_model, rm_reward, problems, 8, args.seed)}
    print("SFT", {k: v for k, v in points["SFT"].items() if k != "examples"}, flush=True)
    curves = {}
    for beta in [float(b) for b in args.betas.split(",")]:
        run_dir = work / f"ppo-beta{beta:g}"
        started = time.time()
        ppo(sft_model, [str(work / "prompts.jsonl")], str(work / "rm" / "model"), run_dir, overwrite=True,
            progress=False,
            overrides=[f"train.max_steps={args.ppo_steps}", "ppo.prompts_per_rollout=64", "ppo.minibatches=2",
                       "ppo.epochs=2", "ppo.max_tokens=6", f"ppo.kl_coef={beta}", f"optim.lr={args.lr}",
                       "optim.schedule=constant", "train.eval_every=0", "train.log_every=1", "train.ckpt_every=0",
                       "ppo.eval_prompts=16", f"ppo.seed={args.seed}", f"train.seed={args.seed}"])
        seconds[f"ppo_beta{beta:g}"] = time.time() - started
        label = f"beta={beta:g}"
        points[label] = measure(run_dir / "model", sft_model, rm_reward, problems, 8, args.seed)
        curves[label] = [{"step": r["step"], "reward": r["reward"], "kl": r.get("kl")}
                         for r in read_metrics(run_dir / "metrics.jsonl") if "reward" in r][::4]
        print(label, {k: v for k, v in points[label].items() if k != "examples"}, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    plot(points, out / "ppo.png")
    results = {"command": f"python bench/bench_ppo.py --sft-steps {args.sft_steps} --rm-pairs {args.rm_pairs} "
                          f"--rm-steps {args.rm_steps} --ppo-steps {args.ppo_steps} --betas {args.betas} "
                          f"--lr {args.lr} --seed {args.seed} --threads {args.threads}",
               "task": "1-digit + 1-digit addition; reward model trained on exact-vs-near-miss pairs",
               "reward_model_heldout_pair_accuracy": rm_summary.get("heldout_accuracy"),
               "ppo": {"prompts_per_rollout": 64, "minibatches": 2, "epochs": 2, "kl_estimator": "k1",
                       "lr": args.lr, "updates": args.ppo_steps},
               "evaluation": "100 problems x 8 samples at T=1 (+ greedy)", "policies": points,
               "training_curves": curves, "seconds": {k: round(v, 1) for k, v in seconds.items()},
               "threads": torch.get_num_threads()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "training_curves"}, indent=2))


if __name__ == "__main__":
    main()
