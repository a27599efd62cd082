"""`lmstack speedrun`, `lmstack pretrain` and `lmstack sft`: the verbs that train a model (lmstack.stages)."""

from __future__ import annotations

import argparse

from lmstack.cli.common import add_run_config_args, positive_float, positive_int, verb_parser


def add_pretrain(sub: argparse._SubParsersAction) -> None:
    parser = verb_parser(sub, "pretrain", "pretrain a model on token shards",
                         "Pretrain a model from scratch (or resume) on shards written by `lmstack data tokenize`.")
    parser.add_argument("--data", required=True, help="token shard directory (holds meta.json)")
    parser.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, loss.png")
    parser.add_argument("--resume", action="store_true", help="resume from the newest checkpoint in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous run's outputs in --out")
    add_run_config_args(parser)

    def run(args: argparse.Namespace) -> None:
        from lmstack.stages.pretrain import pretrain

        pretrain(data_dir=args.data, out_dir=args.out, preset=args.preset, config_file=args.config,
                 overrides=args.overrides, resume=args.resume, overwrite=args.overwrite)

    parser.set_defaults(func=run)


def add_sft(sub: argparse._SubParsersAction) -> None:
    parser = verb_parser(sub, "sft", "fine-tune a model on conversations (supervised)",
                         "Supervised fine-tuning (all weights, or a LoRA adapter with --lora) of a trained or imported decoder on chat data:\n"
                         "JSONL (.gz/.zst) or parquet records of {messages}, {prompt, completion} or Alpaca\n"
                         "{instruction, input, output}, rendered in the model's chat format. Settings of\n"
                         "its own take sft.KEY=VALUE: sft.loss_on=assistant|all|last_turn, sft.weights=1,0.5,\n"
                         "sft.overlong=truncate|drop, sft.skip_bad_records=true, sft.val_fraction, sft.seed.")
    parser.add_argument("--model", required=True, help="checkpoint to start from (with its tokenizer)")
    parser.add_argument("--data", action="append", default=None, metavar="FILE",
                        help="a conversation file; repeat for several (default: sft.data from --config)")
    parser.add_argument("--out", required=True, help="run directory: checkpoints, model, metrics.jsonl, summary.json")
    parser.add_argument("--resume", action="store_true", help="resume from the newest checkpoint in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous run's outputs in --out")
    parser.add_argument("--lora", action="store_true",
                        help="train a LoRA adapter instead of every weight (lora.r, lora.alpha, lora.dropout, "
                             "lora.target_modules, lora.use_rslora); writes OUT/adapter and the merged OUT/model")
    add_run_config_args(parser)

    def run(args: argparse.Namespace) -> None:
        from lmstack.stages.sft import sft

        sft(model=args.model, data=args.data, out_dir=args.out, preset=args.preset, config_file=args.config,
            overrides=args.overrides, resume=args.resume, overwrite=args.overwrite, lora=args.lora)

    parser.set_defaults(func=run)


def add_speedrun(sub: argparse._SubParsersAction) -> None:
    parser = verb_parser(sub, "speedrun", "the main job: corpus -> tokenizer -> shards -> pretrain -> samples -> report",
                         "Download the default corpus, clean it, train a tokenizer, tokenize, pretrain, sample, and\n"
                         "write OUT/report.md, OUT/report.json and OUT/loss.png.")
    parser.add_argument("--out", default="runs/speedrun", help="output directory")
    parser.add_argument("--corpus", default="classics",
                        help="corpus name for `data download`, or a path to your own text")
    parser.add_argument("--vocab-size", type=positive_int, default=None,
                        help="tokenizer vocabulary (default: the preset's)")
    parser.add_argument("--minutes", type=positive_float, default=6.0,
                        help="wall-time budget for pretraining; the steps follow the measured speed, capped by "
                             "train.max_steps (a train.max_minutes=... override wins)")
    parser.add_argument("--no-clean", action="store_true", help="skip the data-cleaning pipeline")
    parser.add_argument("--workers", type=positive_int, default=2,
                        help="worker processes for cleaning and tokenizing")
    add_run_config_args(parser)

    def run(args: argparse.Namespace) -> None:
        from lmstack.stages.speedrun import speedrun

        speedrun(out_dir=args.out, corpus=args.corpus, preset=args.preset, config_file=args.config,
                 overrides=args.overrides, vocab_size=args.vocab_size, minutes=args.minutes,
                 clean=not args.no_clean, workers=args.workers)

    parser.set_defaults(func=run)
