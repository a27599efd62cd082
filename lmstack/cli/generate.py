"""`lmstack generate`, `lmstack chat` and `lmstack embed`: the verbs that run a checkpoint on text.

    lmstack generate --model runs/speedrun/model --prompt "Once upon a time" --max-tokens 64 --seed 1
    lmstack chat --model models/smollm2 --system "You are terse."
    lmstack embed --model models/minilm --similarity "A man eats." "Someone is eating."

generate and chat run on the :class:`~lmstack.engine.engine.Engine` through
:func:`lmstack.engine.generate.stream_request` / :class:`~lmstack.engine.generate.ChatSession` and stream text
as it is decoded; ``--adapter DIR`` merges a LoRA adapter into the model first (lmstack.cli.adapter). In chat, ``/reset`` starts over, ``/exit`` or end-of-input (Ctrl-D) quits, and a message
the session refuses (too long for the context, empty) is reported in brackets without ending the chat.
``chat --tools calculator,python,search=IDX`` lets the model call tools (lmstack.tools.loop): each reply runs
through the tool loop, the calls and their results print in brackets, and the reply prints when complete.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

from lmstack.cli.adapter import checkpoint_with_adapter
from lmstack.cli.common import (device, finite_float, non_negative_float, non_negative_int, open_unit_interval,
                                positive_float, positive_int, unit_interval, verb_parser)
from lmstack.errors import LmstackError, UserError


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int = 128) -> None:
    """The sampling options shared by generate and chat (read back by :func:`params_from_args`)."""
    parser.add_argument("--max-tokens", type=positive_int, default=max_tokens, help="tokens to generate")
    parser.add_argument("--temperature", type=non_negative_float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=non_negative_int, default=0, help="keep the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=open_unit_interval, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--min-p", type=unit_interval, default=0.0,
                        help="drop tokens below min_p * top probability (0 = off)")
    parser.add_argument("--repetition-penalty", type=positive_float, default=1.0, help="CTRL-style penalty (1 = off)")
    parser.add_argument("--presence-penalty", type=finite_float, default=0.0,
                        help="OpenAI-style presence penalty (0 = off)")
    parser.add_argument("--frequency-penalty", type=finite_float, default=0.0,
                        help="OpenAI-style frequency penalty (0 = off)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--stop-token-id", type=non_negative_int, action="append", default=[],
                        help="stop token id (repeatable)")
    parser.add_argument("--seed", type=non_negative_int, default=None, help="random seed for reproducible sampling")
    parser.add_argument("--device", type=device, default="auto", help="auto | cpu | cuda")
    parser.add_argument("--quantize", default=None, choices=["int8", "int4"], help="weight-only quantization")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="a LoRA adapter (peft layout, e.g. RUN/adapter of `sft --lora`) merged into --model")


def params_from_args(args: argparse.Namespace, **extra: Any):
    """SamplingParams from the options of :func:`add_sampling_args` (validated: a UserError names the option)."""
    from lmstack.engine.sampling import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, stop=list(args.stop), stop_token_ids=list(args.stop_token_id),
        seed=args.seed, **extra)
    params.validate()
    return params


def load_engine(model_path: str, device: str = "auto", quantize: str | None = None, **engine_kw: Any):
    """Engine.from_checkpoint, refusing a missing directory or a checkpoint without a tokenizer up front."""
    from lmstack.engine.engine import Engine

    if not Path(model_path).exists():
        raise UserError(f"checkpoint {model_path} does not exist; pass a checkpoint directory or a run "
                        "directory made by `lmstack pretrain` (or `lmstack import`)")
    engine = Engine.from_checkpoint(model_path, device=device, quantize=quantize, **engine_kw)
    if engine.tokenizer is None:
        raise UserError(f"checkpoint {model_path} has no tokenizer.json, so text cannot be encoded; "
                        "copy the tokenizer used for training into it (`lmstack tokenizer` writes one)")
    return engine


# ----------------------------------------------------------------------------- generate

def run_generate(args: argparse.Namespace) -> None:
    """Continue a prompt, streaming the text to stdout and a speed line to stderr."""
    from lmstack.engine.generate import stream_request

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = params_from_args(args, n=args.num_samples)
    with checkpoint_with_adapter(args.model, args.adapter) as model_path:
        engine = load_engine(model_path, args.device, args.quantize, max_num_seqs=args.num_samples)
    tokenizer = engine.tokenizer
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:
        try:
            ids = [tokenizer.eot_id]  # an empty prompt starts a fresh document
        except ValueError:  # the tokenizer names no document boundary: only this command knows the way out
            raise UserError("empty prompt and the tokenizer has no document-boundary token to start from; "
                            "pass --prompt TEXT") from None
    if len(ids) >= engine.max_model_len:
        raise UserError(f"the prompt is {len(ids)} tokens; the model's context is {engine.max_model_len}. Shorten it")
    stream = args.num_samples == 1 and not args.no_stream
    start = time.perf_counter()
    final = None
    for _, delta, out in stream_request(engine, ids, params):
        if stream:
            sys.stdout.write(delta)
            sys.stdout.flush()
        final = out
    if stream:
        sys.stdout.write("\n")
    else:
        for completion in final.outputs:
            if args.num_samples > 1:
                sys.stdout.write(f"--- sample {completion.index + 1} ---\n")
            sys.stdout.write(completion.text + "\n")
    print(format_generation_stats(final, time.perf_counter() - start), file=sys.stderr)


def format_generation_stats(output: Any, seconds: float) -> str:
    """``[N tokens in S s, R tokens/s; finished: length]`` for a finished engine output."""
    generated = sum(len(completion.token_ids) for completion in output.outputs)
    reasons = ", ".join(sorted({completion.finish_reason for completion in output.outputs}))
    return (f"[{generated} tokens in {seconds:.2f}s, {generated / max(seconds, 1e-9):.1f} tokens/s; "
            f"finished: {reasons}]")


def add_generate(sub: argparse._SubParsersAction) -> None:
    parser = verb_parser(sub, "generate", "sample text from a checkpoint")
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--prompt", default="",
                        help="text to continue ('' = start of a document, '-' = read stdin)")
    add_sampling_args(parser)
    parser.add_argument("--num-samples", type=positive_int, default=1, help="independent samples")
    parser.add_argument("--no-stream", action="store_true", help="print each sample when it is complete")
    parser.set_defaults(func=run_generate)


# ----------------------------------------------------------------------------- chat

def run_chat(args: argparse.Namespace, input_fn: Callable[[str], str] = input) -> None:
    """An interactive conversation read from ``input_fn``; /reset starts over, /exit or end-of-input quits."""
    from lmstack.engine.generate import ChatSession

    params = params_from_args(args)
    with checkpoint_with_adapter(args.model, getattr(args, "adapter", None)) as model_path:
        engine = load_engine(model_path, args.device, args.quantize, max_num_seqs=1)
    if getattr(args, "tools", None):
        return run_tool_chat(args, engine, params, input_fn)
    session = ChatSession(engine, params, system=args.system)
    session.prompt_ids()  # a system prompt the template refuses fails here, before the first turn
    print(f"[chatting with {args.model}; context {engine.max_model_len} tokens. /reset to start over, "
          "/exit or Ctrl-D to quit]", file=sys.stderr)
    while True:
        try:
            line = input_fn("you> ")
        except EOFError:
            print(file=sys.stderr)
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            print("[history cleared]", file=sys.stderr)
            continue
        sys.stdout.write("assistant> ")
        try:
            for delta in session.send(line):
                sys.stdout.write(delta)
                sys.stdout.flush()
        except LmstackError as error:  # this message is refused; the conversation goes on
            print(f"\n[{error}]", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()


def run_tool_chat(args: argparse.Namespace, engine: Any, params: Any, input_fn: Callable[[str], str]) -> None:
    """Chat with tools (lmstack.tools.loop): each reply may call tools; calls and results print in brackets."""
    from lmstack.tools import build_tools
    from lmstack.tools.loop import run_with_tools, tools_system_prompt

    tools = build_tools(args.tools, allow_unsafe_sandbox=args.unsafe_sandbox)
    system = tools_system_prompt(tools, engine.tokenizer.chat_format)
    start = [{"role": "system", "content": f"{args.system}\n\n{system}" if args.system else system}]
    messages = list(start)
    print(f"[chatting with {args.model} and tools {', '.join(t.name for t in tools)}; /reset to start over, "
          "/exit or Ctrl-D to quit]", file=sys.stderr)
    while True:
        try:
            text = input_fn("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/reset" or not text:
            messages = list(start) if text else messages
            continue
        try:
            result = run_with_tools(engine, engine.tokenizer, [*messages, {"role": "user", "content": text}], tools,
                                    max_rounds=args.max_tool_rounds, params=params)
        except LmstackError as error:  # this message is refused; the conversation goes on
            print(f"[{error}]", file=sys.stderr)
            continue
        for call in result.tool_calls:
            print(f"[tool {call['name']}({call['arguments']}) -> {call['result']}]", file=sys.stderr)
        print(f"assistant> {result.answer}" + (f" [{result.finish_reason}]" if result.finish_reason != "stop" else ""))
        messages = result.messages


def tool_spec(value: str) -> str:
    """--tools: checked while parsing, so a misspelt tool fails before the model loads."""
    from lmstack.tools import check_tool_spec

    try:
        check_tool_spec(value)
    except UserError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def add_chat(sub: argparse._SubParsersAction) -> None:
    parser = verb_parser(sub, "chat", "interactive multi-turn chat with a checkpoint")
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(parser, max_tokens=256)
    parser.add_argument("--tools", type=tool_spec, default=None, metavar="LIST",
                        help="tools the model may call: calculator, python, search=IDX (comma-separated)")
    parser.add_argument("--max-tool-rounds", type=non_negative_int, default=4, help="tool rounds per reply")
    parser.add_argument("--unsafe-sandbox", action="store_true",
                        help="let the python tool run in the escapable sandbox when no contained one exists")
    parser.set_defaults(func=run_chat)


# ----------------------------------------------------------------------------- embed

def format_similarity(matrix: list[list[float]], texts: list[str]) -> str:
    """One row of the cosine-similarity matrix per text, followed by the text's first 60 characters."""
    return "\n".join(" ".join(f"{value:6.3f}" for value in row) + "   " + text[:60] for row, text in zip(matrix, texts))


def run_embed(args: argparse.Namespace) -> None:
    import json

    from lmstack.checkpoint import load_checkpoint
    from lmstack.engine.embed import cosine_similarity, embed

    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise UserError("no texts: pass them as arguments or one per line on stdin")
    checkpoint = load_checkpoint(args.model)
    if checkpoint.tokenizer is None:
        raise UserError(f"{args.model} has no tokenizer.json, so texts cannot be encoded")
    vectors = embed(checkpoint.model, checkpoint.tokenizer, texts, pooling=args.pooling,
                    normalize=not args.no_normalize)  # (N, C)
    if args.similarity:
        print(format_similarity(cosine_similarity(vectors).tolist(), texts))
        return
    for text, vector in zip(texts, vectors.tolist()):
        print(json.dumps({"text": text, "embedding": [round(value, 6) for value in vector]}))


def add_embed(sub: argparse._SubParsersAction) -> None:
    parser = verb_parser(sub, "embed", "sentence embeddings from a checkpoint (e.g. an imported BERT encoder)",
                         "Embed texts with a checkpoint's final hidden states (lmstack.engine.embed): one JSON line\n"
                         "{\"text\", \"embedding\"} per text, or with --similarity the cosine-similarity matrix.\n"
                         "Example: lmstack import all-minilm-l6-v2 --out models/minilm &&\n"
                         "         lmstack embed --model models/minilm --similarity \"A man eats.\" \"Someone is eating.\"")
    parser.add_argument("texts", nargs="*", help="texts to embed (none: one text per line on stdin)")
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--pooling", default="mean", choices=["mean", "first", "last"],
                        help="mean over tokens (sentence-transformers), first ([CLS]) or last token")
    parser.add_argument("--no-normalize", action="store_true",
                        help="keep the raw pooled vectors (default: unit length)")
    parser.add_argument("--similarity", action="store_true", help="print the cosine-similarity matrix instead")
    parser.set_defaults(func=run_embed)
