"""`lmstack speedrun`, `lmstack pretrain`, `lmstack sft` and `lmstack self-instruct` (which writes sft data):
the verbs that train a model (lmstack.stages)."""

from __future__ import annotations

import argparse

from lmstack.cli.common import (
    add_run_config_args,
    device,
    non_negative_float,
    non_negative_int,
    open_unit_interval,
    positive_float,
    positive_int,
    unit_interval,
    verb_parser,
)


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
                         "Supervised fine-tuning (all weights; a LoRA adapter with --lora, over an int8/int4 base with\n"
                         "--quantize; or virtual tokens with --prompt-tuning / --prefix-tuning) of a trained or imported decoder on chat data:\n"
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
    parser.add_argument("--quantize", default=None, metavar="int8|int4",
                        help="with --lora: quantize the frozen base's linear layers (QLoRA-style; lora.quantize); "
                             "OUT/model is the adapter merged into the dequantized base (default: float base)")
    parser.add_argument("--prompt-tuning", action="store_true",
                        help="train virtual input tokens instead (prompt_tuning.num_virtual_tokens=20, "
                             "prompt_tuning.init=random|vocab|text, prompt_tuning.init_text); writes OUT/adapter "
                             "in peft's PROMPT_TUNING layout and no OUT/model")
    parser.add_argument("--prefix-tuning", action="store_true",
                        help="train per-layer key/value prefixes instead (prefix_tuning.num_virtual_tokens=20, "
                             "prefix_tuning.init=vocab|text, prefix_tuning.init_text); writes OUT/adapter in "
                             "peft's PREFIX_TUNING layout and no OUT/model")
    add_run_config_args(parser)

    def run(args: argparse.Namespace) -> None:
        from lmstack.stages.sft import sft

        sft(model=args.model, data=args.data, out_dir=args.out, preset=args.preset, config_file=args.config,
            overrides=args.overrides, resume=args.resume, overwrite=args.overwrite, lora=args.lora,
            quantize=args.quantize, prompt_tuning=args.prompt_tuning, prefix_tuning=args.prefix_tuning)

    parser.set_defaults(func=run)


def add_self_instruct(sub: argparse._SubParsersAction) -> None:
    parser = verb_parser(sub, "self-instruct", "a model writes its own instruction data (for sft)",
                         "Self-Instruct: prompt the model with tasks drawn from the seed set and the tasks kept so far to\n"
                         "write new instructions, then their answers; keep those that pass the filters (empty, length,\n"
                         "repetition, exact duplicate, ROUGE-L similarity to every kept instruction). Writes\n"
                         "{messages, provenance} JSONL that `lmstack sft --data` reads, and prints a summary.")
    parser.add_argument("--model", required=True, help="checkpoint that writes the tasks (with its tokenizer)")
    parser.add_argument("--seed-tasks", default=None, metavar="FILE",
                        help="JSONL of {instruction, input, output} demonstrations (default: the shipped set)")
    parser.add_argument("--out", required=True, help="JSONL file to write")
    parser.add_argument("--n", type=positive_int, required=True, help="tasks to keep")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of demonstrations and sampling")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="prompts per generation round")
    parser.add_argument("--max-tokens", type=positive_int, default=128, help="tokens per generated instruction or answer")
    parser.add_argument("--temperature", type=non_negative_float, default=1.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-p", type=open_unit_interval, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--num-demos", type=positive_int, default=8, help="demonstrations per prompt")
    parser.add_argument("--max-rouge", type=unit_interval, default=0.7,
                        help="reject an instruction whose ROUGE-L to a kept one is at least this")
    parser.add_argument("--max-rounds", type=positive_int, default=None,
                        help="stop after this many rounds even if fewer than --n were kept (default: 10x the rounds "
                             "--n needs)")
    parser.add_argument("--device", type=device, default="auto", help="cpu, cuda, cuda:N or auto")

    def run(args: argparse.Namespace) -> None:
        import json

        from lmstack.stages.self_instruct import Limits, self_instruct

        summary = self_instruct(args.model, args.out, args.n, seed_tasks=args.seed_tasks, seed=args.seed,
                                batch_size=args.batch_size, max_tokens=args.max_tokens,
                                temperature=args.temperature, top_p=args.top_p, num_demos=args.num_demos,
                                max_rounds=args.max_rounds, limits=Limits(max_rouge=args.max_rouge),
                                device=args.device)
        print(json.dumps(summary, indent=2))

    parser.set_defaults(func=run)


def add_speedrun(sub: argparse._SubParsersAction) -> None:
    from lmstack.stages.speedrun import CHAT_SFT_DEFAULTS, DEFAULT_MINUTES, ChatSettings

    chat = ChatSettings()
    parser = verb_parser(sub, "speedrun", "the main job: corpus -> tokenizer -> shards -> pretrain -> chat SFT -> report",
                         "Download the default corpus, clean it, train a tokenizer, tokenize, pretrain, sample, fine-tune\n"
                         "the model into a chat model (OUT/chat/model, for `lmstack chat --model OUT/chat`), and\n"
                         "write OUT/report.md, OUT/report.json and OUT/loss.png.")
    parser.add_argument("--out", default="runs/speedrun", help="output directory")
    parser.add_argument("--corpus", default="classics",
                        help="corpus name for `data download`, or a path to your own text")
    parser.add_argument("--vocab-size", type=positive_int, default=None,
                        help="tokenizer vocabulary (default: the preset's)")
    parser.add_argument("--minutes", type=positive_float, default=DEFAULT_MINUTES,
                        help="wall-time budget for pretraining; the steps follow the measured speed, capped by "
                             "train.max_steps (a train.max_minutes=... override wins)")
    parser.add_argument("--no-clean", action="store_true", help="skip the data-cleaning pipeline")
    parser.add_argument("--workers", type=positive_int, default=2,
                        help="worker processes for cleaning and tokenizing")
    parser.add_argument("--skip-chat", action="store_true", help="stop after pretraining: no chat SFT stage")
    parser.add_argument("--chat-minutes", type=positive_float, default=chat.minutes,
                        help="wall-time budget for the chat SFT stage")
    parser.add_argument("--chat-tasks", type=non_negative_int, default=chat.tasks,
                        help="generated task conversations (exact answers) to fine-tune on")
    parser.add_argument("--chitchat", type=non_negative_int, default=chat.chitchat,
                        help="Chit-Chat conversations (real multi-turn chat, a seeded sample) to fine-tune on")
    parser.add_argument("--chitchat-messages", type=positive_int, default=chat.chitchat_messages,
                        help="messages kept from the start of each Chit-Chat conversation (even: it ends on a reply)")
    parser.add_argument("--chat-held-out", type=positive_int, default=chat.held_out,
                        help="conversations of each source held out for the report's before/after loss")
    parser.add_argument("--chat-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting of the chat SFT run (train.*, optim.*, sft.*), after its defaults "
                             f"({' '.join(CHAT_SFT_DEFAULTS)}); repeat for several. Plain KEY=VALUE arguments "
                             "set pretraining")
    add_run_config_args(parser)

    def run(args: argparse.Namespace) -> None:
        from lmstack.stages.speedrun import ChatSettings, speedrun

        chat = None if args.skip_chat else ChatSettings(
            minutes=args.chat_minutes, tasks=args.chat_tasks, chitchat=args.chitchat,
            chitchat_messages=args.chitchat_messages, held_out=args.chat_held_out, overrides=tuple(args.chat_set))
        speedrun(out_dir=args.out, corpus=args.corpus, preset=args.preset, config_file=args.config,
                 overrides=args.overrides, vocab_size=args.vocab_size, minutes=args.minutes,
                 clean=not args.no_clean, workers=args.workers, chat=chat)

    parser.set_defaults(func=run)
