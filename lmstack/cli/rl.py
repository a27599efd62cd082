"""`lmstack grpo` and `lmstack ppo`: online RL on a trained decoder with rollouts from lmstack's engine
(lmstack/stages/grpo.py, lmstack/stages/ppo.py)."""

from __future__ import annotations

import argparse

from lmstack.cli.common import add_run_config_args, verb_parser

_REWARD_HELP = ("task:NAME (an evaluation task's score), a reward model directory (lmstack reward), or "
                "module:function taking (prompts, completions) -> list of floats, e.g. "
                "lmstack.data.verifiable:reward")


def _add_common(parser: argparse.ArgumentParser, stage: str) -> None:
    parser.add_argument("--model", required=True, help="checkpoint to start from (with its tokenizer)")
    parser.add_argument("--prompts", action="append", default=None, metavar="FILE",
                        help=f"prompt JSONL ({{\"prompt\": text or chat messages, ...}}); repeat for several "
                             f"(when omitted: {stage}.prompts from --config, or the task's examples with --reward task:NAME)")
    parser.add_argument("--reward", default=None, help=f"{_REWARD_HELP} (when omitted: {stage}.reward from --config)")
    parser.add_argument("--out", required=True, help="run directory: checkpoints, model, metrics.jsonl, rl.png, "
                                                     "summary.json")
    parser.add_argument("--resume", action="store_true", help="resume from the newest checkpoint in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous run's outputs in --out")
    parser.add_argument("--lora", action="store_true",
                        help="train LoRA adapters instead of every weight (lora.*); writes OUT/adapter and the "
                             "merged OUT/model")
    add_run_config_args(parser)


def add_grpo(sub: argparse._SubParsersAction) -> None:
    parser = verb_parser(sub, "grpo", "GRPO / REINFORCE on prompts with a reward (online RL)",
                         "Group-relative policy optimisation: per rollout grpo.prompts_per_rollout prompts x\n"
                         "grpo.group_size samples from the current weights (lmstack's engine), group-normalised\n"
                         "advantages, clipped ratio, grpo.inner_steps passes of grpo.minibatches updates.\n"
                         "Settings: grpo.algorithm=grpo|reinforce, grpo.loss_norm=sequence|token|dr_grpo,\n"
                         "grpo.scale_std, grpo.clip_low/clip_high, grpo.beta (k3 KL to the start, 0 = off),\n"
                         "grpo.max_tokens, grpo.temperature/top_k/top_p, grpo.keep_kv. train.max_steps counts\n"
                         "minibatch updates.")
    _add_common(parser, "grpo")

    def run(args: argparse.Namespace) -> None:
        from lmstack.stages.grpo import grpo

        grpo(model=args.model, prompts=args.prompts, reward=args.reward, out_dir=args.out, preset=args.preset,
             config_file=args.config, overrides=args.overrides, resume=args.resume, overwrite=args.overwrite,
             lora=args.lora)

    parser.set_defaults(func=run)


def add_ppo(sub: argparse._SubParsersAction) -> None:
    parser = verb_parser(sub, "ppo", "PPO-RLHF: policy + value model against a reward, KL to the start",
                         "PPO with a separate value model, a per-token KL penalty to the starting model\n"
                         "(ppo.kl_coef, ppo.kl_estimator=k1|k3, adaptive with ppo.kl_target > 0), the reward on\n"
                         "the last token, GAE (ppo.gamma, ppo.lam), whitened advantages, clipped policy and\n"
                         "value losses (ppo.clip, ppo.value_clip, ppo.vf_coef), ppo.epochs x ppo.minibatches\n"
                         "updates per rollout of ppo.prompts_per_rollout prompts.")
    _add_common(parser, "ppo")

    def run(args: argparse.Namespace) -> None:
        from lmstack.stages.ppo import ppo

        ppo(model=args.model, prompts=args.prompts, reward=args.reward, out_dir=args.out, preset=args.preset,
            config_file=args.config, overrides=args.overrides, resume=args.resume, overwrite=args.overwrite,
            lora=args.lora)

    parser.set_defaults(func=run)
