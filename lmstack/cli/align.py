"""`lmstack reward`, `lmstack reward-score` and `lmstack dpo`: learning from preference pairs (lmstack.stages.reward,
lmstack.stages.dpo)."""

from __future__ import annotations

import argparse
import json

from lmstack.cli.common import add_run_config_args, positive_int, verb_parser

_DATA_HELP = ("JSONL (.gz/.zst) or parquet pairs in TRL's formats: {prompt, chosen, rejected} as strings or message\n"
              "lists, or two whole conversations in chosen/rejected (implicit prompt); kind=rating lines are skipped\n"
              "and counted. `python -m lmstack.data.preference --make-pairs FILE --n N` writes rule-labelled pairs.")


def _add_training_args(parser: argparse.ArgumentParser, section: str) -> None:
    parser.add_argument("--model", required=True, help="checkpoint to start from (with its tokenizer)")
    parser.add_argument("--data", action="append", default=None, metavar="FILE",
                        help=f"a preference file; repeat for several (otherwise {section}.data from --config)")
    parser.add_argument("--out", required=True, help="run directory: checkpoints, model, metrics.jsonl, summary.json")
    parser.add_argument("--resume", action="store_true", help="resume from the newest checkpoint in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous run's outputs in --out")


def add_reward(sub: argparse._SubParsersAction) -> None:
    parser = verb_parser(sub, "reward", "train a reward model on preference pairs",
                         "Train a reward model: the starting model plus a scalar head, Bradley-Terry loss on\n"
                         "the reward of the chosen vs the rejected completion. " + _DATA_HELP + "\n"
                         "Settings of its own take reward.KEY=VALUE: reward.center_coef (centring term),\n"
                         "reward.weights=1,0.5, reward.overlong=truncate|drop, reward.skip_bad_records=true,\n"
                         "reward.val_fraction, reward.seed. OUT/model carries \"head\": \"scalar\".")
    _add_training_args(parser, "reward")
    add_run_config_args(parser)

    def run(args: argparse.Namespace) -> None:
        from lmstack.stages.reward import reward

        reward(model=args.model, data=args.data, out_dir=args.out, preset=args.preset, config_file=args.config,
               overrides=args.overrides, resume=args.resume, overwrite=args.overwrite)

    parser.set_defaults(func=run)


def add_reward_score(sub: argparse._SubParsersAction) -> None:
    parser = verb_parser(sub, "reward-score", "score completions or pairs with a reward model",
                         "Score every record of --data with a reward model (`lmstack reward`'s OUT or OUT/model):\n"
                         "pairs {prompt, chosen, rejected} give the accuracy and mean margin, {prompt, completion}\n"
                         "records the mean score. Prints a JSON summary; --out writes the records with their scores.")
    parser.add_argument("--model", required=True, help="reward model checkpoint (a run directory or its model)")
    parser.add_argument("--data", required=True, metavar="FILE", help="JSONL (.gz/.zst) or parquet records to score")
    parser.add_argument("--out", default=None, metavar="FILE", help="JSONL file for the scored records (default: none)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward pass")

    def run(args: argparse.Namespace) -> None:
        from lmstack.stages.reward import score_file

        print(json.dumps(score_file(args.model, args.data, args.out, args.batch_size), indent=2))

    parser.set_defaults(func=run)


def add_dpo(sub: argparse._SubParsersAction) -> None:
    parser = verb_parser(sub, "dpo", "direct preference optimisation on preference pairs",
                         "DPO (all weights, or a LoRA adapter with --lora) of a decoder against a frozen\n"
                         "reference. " + _DATA_HELP + "\nSettings of its own take dpo.KEY=VALUE: dpo.beta,\n"
                         "dpo.loss=sigmoid|ipo|robust, dpo.label_smoothing, dpo.reference=precomputed|copy,\n"
                         "dpo.sft_weight (default 1: adds that weight times the chosen reply's per-token NLL,\n"
                         "RPO, which keeps chosen replies likely; 0 is plain DPO), dpo.weights,\n"
                         "dpo.overlong=truncate|drop,\n"
                         "dpo.skip_bad_records=true, dpo.val_fraction, dpo.seed.")
    _add_training_args(parser, "dpo")
    parser.add_argument("--lora", action="store_true",
                        help="train a LoRA adapter (lora.r, lora.alpha, ...); the reference is the base with the "
                             "adapters off; writes OUT/adapter and the merged OUT/model")
    parser.add_argument("--reference", default=None, metavar="CKPT",
                        help="reference model with the same tokenizer (default: --model itself)")
    add_run_config_args(parser)

    def run(args: argparse.Namespace) -> None:
        from lmstack.stages.dpo import dpo

        dpo(model=args.model, data=args.data, out_dir=args.out, preset=args.preset, config_file=args.config,
            overrides=args.overrides, resume=args.resume, overwrite=args.overwrite, lora=args.lora,
            reference=args.reference)

    parser.set_defaults(func=run)
