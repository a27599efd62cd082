"""Cost of grammar-constrained decoding: engine tokens/s with and without a JSON-schema constraint.

    .venv/bin/python bench/bench_structured.py                                   # tiny model only, ~1 min
    .venv/bin/python bench/bench_structured.py --model runs/bench-sft-peft/smollm2 --repeats 3
    .venv/bin/python bench/bench_structured.py --device cuda --batches 1 32 128

Models: a random-weight 2-layer GPT with a 384-token BPE vocabulary built in memory ("tiny"), and, with
``--model``, an imported SmolLM2-135M-Instruct checkpoint (``lmstack import smollm2-135m-instruct --out
DIR``; 49,152-token vocabulary, the realistic case: mask cost grows with the vocabulary).

For each model and batch size the same prompts are decoded greedily for ``--tokens`` tokens three ways:
free (no constraint), **plain** (every row under one JSON schema, masks computed row by row after the
forward: ``Engine(parallel_masks=False)``) and **fast** (the same masks filled by llguidance's parallel
executor on a worker thread during the forward, the engine's default). ``ignore_eos`` is on for all three,
so each generates exactly the same number of tokens. Each configuration is warmed up once, then the three
are timed interleaved ``--repeats`` times; each repeat gives the ratios plain / free and fast / free from
the same minute, and the table reports the medians.

Honest caveats: once a row's JSON is complete only the stop token is allowed, and with ``ignore_eos`` the
row goes on emitting it; those masks are cheap, so the column "in grammar" reports the share of generated
tokens produced before the document was complete (the rest are stop tokens). A tiny model's forward is
so cheap that the mask weighs far more there than beside a real model's forward. ``--threads`` defaults
to 1: on an oversubscribed CPU, two torch threads spin-waiting for each other made the forward of
SmolLM2 ~10x slower in some configurations and not in others (the free and plain runs, but not the fast
one), which no ratio survives; with one thread the three runs behave alike.
Outputs: OUT/results.json (default bench/results/structured); the Markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from lmstack.atomic import write_text_atomic
from lmstack.config import tiny
from lmstack.engine.constraints import ConstraintMasks, Grammar, GrammarCompiler
from lmstack.engine.engine import Engine
from lmstack.engine.sampling import SamplingParams
from lmstack.models import build_model
from lmstack.tokenizer import Tokenizer

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "role": {"enum": ["admin", "user", "guest"]},
                         "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "role", "tags"]}
WORDS = "the model reads a token and writes the next one while the server streams text about cats".split()


def tiny_engine(device: str, max_num_seqs: int) -> Engine:
    rng = random.Random(0)
    tokenizer = Tokenizer.train([" ".join(rng.choices(WORDS, k=12)) + " {\"a\": 1}" for _ in range(300)],
                                vocab_size=384)
    cfg = tiny().model
    cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.n_embd = 384, 512, 2, 2, 2, 64
    torch.manual_seed(0)
    return Engine(build_model(cfg).eval().to(device), tokenizer, max_num_seqs=max_num_seqs, max_model_len=512)


def prompts_for(engine: Engine, batch: int) -> list[list[int]]:
    tokenizer = engine.tokenizer
    if tokenizer.chat_format is not None:  # an instruct model: ask for the record in its own chat format
        return [tokenizer.render_chat([{"role": "user", "content": f"Write person record {i} as JSON with "
                                        "name, age, role and tags."}], add_generation_prompt=True)[0]
                for i in range(batch)]
    return [tokenizer.encode(f"record {i}: ") for i in range(batch)]


def timed(engine: Engine, prompts: list[list[int]], params: SamplingParams, fast: bool) -> tuple[float, float]:
    """(tokens/s, share of tokens generated before the grammar completed) of one generate call."""
    engine.constraint_masks = ConstraintMasks() if fast else None
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    tokens = [o.outputs[0].token_ids for o in outs]
    inside = sum(next((i for i, t in enumerate(ids) if t in engine.eos_token_ids), len(ids)) for ids in tokens)
    return sum(map(len, tokens)) / elapsed, inside / max(sum(map(len, tokens)), 1)


def run_model(name: str, engine: Engine, grammar: Grammar, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for batch in args.batches:
        prompts = prompts_for(engine, batch)
        free = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
        constrained = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True, constraint=grammar)
        configs = {"free": (free, True), "plain": (constrained, False), "fast": (constrained, True)}
        for params, fast in configs.values():  # warm-up
            timed(engine, prompts, params, fast)
        runs: dict[str, list[float]] = {k: [] for k in configs}
        inside = []
        for _ in range(args.repeats):
            for key, (params, fast) in configs.items():
                speed, share = timed(engine, prompts, params, fast)
                runs[key].append(speed)
                if key == "fast":
                    inside.append(share)
        plain_ratio = [p / f for p, f in zip(runs["plain"], runs["free"])]
        fast_ratio = [p / f for p, f in zip(runs["fast"], runs["free"])]
        row = {"model": name, "batch": batch, "free_tok_s": statistics.median(runs["free"]),
               "plain_tok_s": statistics.median(runs["plain"]), "fast_tok_s": statistics.median(runs["fast"]),
               "plain_over_free": statistics.median(plain_ratio), "fast_over_free": statistics.median(fast_ratio),
               "plain_over_free_runs": plain_ratio, "fast_over_free_runs": fast_ratio,
               "in_grammar_share": statistics.median(inside), "runs": runs}
        rows.append(row)
        print(f"| {name} | {batch} | {row['free_tok_s']:.0f} | {row['plain_tok_s']:.0f} | {row['fast_tok_s']:.0f} "
              f"| {row['plain_over_free']:.2f} ({', '.join(f'{r:.2f}' for r in plain_ratio)}) "
              f"| {row['fast_over_free']:.2f} ({', '.join(f'{r:.2f}' for r in fast_ratio)}) "
              f"| {100 * row['in_grammar_share']:.0f} % |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="an imported SmolLM2-135M-Instruct checkpoint (also measured)")
    parser.add_argument("--skip-tiny", action="store_true", help="measure only --model")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per row")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per configuration (median reported)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (on a shared CPU, 2 spinning threads distort the forward many times over)")
    parser.add_argument("--out", default="bench/results/structured")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = f"{platform.processor() or platform.machine()}, device {args.device}, {torch.get_num_threads()} " \
              f"torch threads, torch {torch.__version__}"
    print(f"machine: {machine}; tokens/row={args.tokens}, greedy, ignore_eos, repeats={args.repeats}")
    print("| model | batch | free tok/s | plain tok/s | fast tok/s | plain / free (runs) | fast / free (runs) "
          "| in grammar |")
    print("|---|---:|---:|---:|---:|---|---|---:|")
    models = []
    if not args.skip_tiny:
        models.append(("tiny-384", lambda: tiny_engine(args.device, max(args.batches))))
    if args.model:
        models.append(("smollm2-135m", lambda: Engine.from_checkpoint(
            args.model, device=args.device, max_num_seqs=max(args.batches), max_model_len=256)))
    rows = []
    for name, build in models:
        engine = build()
        grammar = GrammarCompiler(engine.tokenizer, engine.vocab_size, engine.eos_token_ids).json_schema(SCHEMA)
        rows += run_model(name, engine, grammar, args)
        del engine
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.json", json.dumps({"machine": machine, "args": vars(args), "rows": rows},
                                                       indent=2) + "\n")


if __name__ == "__main__":
    main()
