"""Cost of grammar-constrained decoding: engine tokens/s with and without a JSON-schema constraint.

    .venv/bin/python bench/bench_structured.py                 # CPU, tiny random model, about a minute
    .venv/bin/python bench/bench_structured.py --device cuda --batches 1 32 128

A random-weight GPT with a BPE tokenizer (384 ids) is built in memory; for each batch size the same
prompts are decoded greedily for ``--tokens`` tokens, once free and once with every row under one JSON
schema (``ignore_eos`` on both, so both runs generate exactly the same number of tokens). The ratio
constrained / free tokens/s is measured in the same run; a warm-up pass precedes each timing.

Honest caveats: a tiny model makes the forward cheap, so the per-token mask (computed on the CPU, one
row at a time) weighs more here than it would beside a real model's forward; the vocabulary is tiny,
and mask cost grows with vocabulary size.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from lmstack.config import tiny
from lmstack.engine.constraints import GrammarCompiler
from lmstack.engine.engine import Engine
from lmstack.engine.sampling import SamplingParams
from lmstack.models import build_model
from lmstack.tokenizer import Tokenizer

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"]}
WORDS = "the model reads a token and writes the next one while the server streams text about cats".split()


def build_engine(device: str, max_num_seqs: int) -> Engine:
    rng = random.Random(0)
    tokenizer = Tokenizer.train([" ".join(rng.choices(WORDS, k=12)) + " {\"a\": 1}" for _ in range(300)],
                                vocab_size=384)
    cfg = tiny().model
    cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.n_embd = 384, 512, 2, 2, 2, 64
    torch.manual_seed(0)
    return Engine(build_model(cfg).eval().to(device), tokenizer, max_num_seqs=max_num_seqs, max_model_len=512)


def tokens_per_second(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> float:
    engine.generate(prompts, params)  # warm-up
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per row")
    args = parser.parse_args()
    engine = build_engine(args.device, max(args.batches))
    grammar = GrammarCompiler(engine.tokenizer, 384, engine.eos_token_ids).json_schema(SCHEMA)
    print(f"device={args.device} vocab=384 tokens/row={args.tokens} torch threads={torch.get_num_threads()}")
    print("| batch | free tok/s | constrained tok/s | constrained / free |")
    print("|---:|---:|---:|---:|")
    for batch in args.batches:
        prompts = [engine.tokenizer.encode(f"record {i}: ") for i in range(batch)]
        free = tokens_per_second(engine, prompts, SamplingParams(max_tokens=args.tokens, temperature=0,
                                                                 ignore_eos=True))
        constrained = tokens_per_second(engine, prompts, SamplingParams(
            max_tokens=args.tokens, temperature=0, ignore_eos=True, constraint=grammar))
        print(f"| {batch} | {free:.0f} | {constrained:.0f} | {constrained / free:.2f} |", flush=True)


if __name__ == "__main__":
    main()
