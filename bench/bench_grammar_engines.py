"""Grammar engines side by side: llguidance, xgrammar and outlines-core on the same vocabularies and schemas.

    python -m venv --system-site-packages runs/grammar-venv     # then make .venv's packages visible to it
    runs/grammar-venv/bin/pip install xgrammar outlines-core
    runs/grammar-venv/bin/python bench/bench_grammar_engines.py --model runs/bench-sft-peft/smollm2

``--model`` is an imported SmolLM2-135M-Instruct checkpoint (``lmstack import smollm2-135m-instruct --out
DIR``; only its tokenizer is read): its 49,152-token byte-level vocabulary is the realistic case, and mask
cost grows with the vocabulary. The second vocabulary is the 384-token BPE of ``bench/bench_structured.py``.

For each (vocabulary, schema, engine) the script measures

* **compile**: from the JSON schema to a matcher ready for its first mask (llguidance: the product's own
  :class:`~lmstack.engine.constraints.GrammarCompiler` path, schema -> grammar -> validated -> matcher;
  xgrammar: ``compile_json_schema`` with its cache off, then a matcher; outlines-core: schema -> regex ->
  ``Index`` over the vocabulary -> guide), best of ``--repeats``;
* **mask**: one next-token bitmask per position while a fixed valid document (tokenized by our tokenizer)
  is fed token by token; mean and p99 over all positions of ``--repeats`` passes;
* **batch32**: one step's masks for 32 matchers at the same position through the engine's batch API
  (llguidance ``fill_next_token_bitmask_par``, xgrammar ``BatchGrammarMatcher``; outlines-core has none, so
  a Python loop), mean per step;
* whether the engine compiles the schema and accepts the document (each fed token must be in the mask).

The document is written without whitespace (``{"a":1,"b":[2]}``) and every engine is told so
(llguidance ``whitespace_flexible: false``, xgrammar ``any_whitespace=False, separators=(",", ":")``,
outlines-core an empty whitespace pattern). ``json_object`` is the schema ``{"type": "object"}`` for all.

Honest caveats: the machine is a shared 2-core CPU, so absolute times are noisy (the engines are timed
interleaved, per schema, in the same run); masks along one document are not every state a sampler visits;
xgrammar's default is 8 compile threads and ``hardware_concurrency / 2`` batch threads, which is 1 here.
Outputs: OUT/results.json (default bench/results/grammar_engines); the Markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from lmstack.atomic import write_text_atomic
from lmstack.engine.constraints import GrammarCompiler
from lmstack.tokenizer import Tokenizer

NESTED = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 40},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "role": {"enum": ["admin", "user", "guest"]},
                         "address": {"type": "object",
                                     "properties": {"city": {"type": "string"}, "zip": {"type": "string"},
                                                    "geo": {"type": "array", "items": {"type": "number"},
                                                            "minItems": 2, "maxItems": 2}},
                                     "required": ["city", "zip", "geo"], "additionalProperties": False},
                         "tags": {"type": "array", "items": {"enum": ["cat", "dog", "bird"]}, "maxItems": 4},
                         "active": {"type": "boolean"}},
          "required": ["name", "age", "role", "address", "tags", "active"], "additionalProperties": False}
NESTED_DOC = {"name": "Ada Lovelace", "age": 36, "role": "admin",
              "address": {"city": "London", "zip": "W1 2AB", "geo": [51.5, -0.12]},
              "tags": ["cat", "bird"], "active": True}
# a tool call: the shape server tool-calling constrains to (a name enum + arguments per tool)
TOOL_CALL = {"type": "object",
             "properties": {"name": {"enum": ["calculator", "search"]},
                            "arguments": {"type": "object",
                                          "properties": {"expression": {"type": "string"},
                                                         "query": {"type": "string"},
                                                         "top_k": {"type": "integer", "minimum": 1}},
                                          "additionalProperties": False}},
             "required": ["name", "arguments"], "additionalProperties": False}
TOOL_DOC = {"name": "search", "arguments": {"query": "grammar constrained decoding", "top_k": 3}}
OBJECT_DOC = {"title": "notes", "items": [{"id": 1, "done": False}, {"id": 2, "text": "ok"}], "score": 0.5}
SCHEMAS = {"nested": (NESTED, NESTED_DOC), "tool_call": (TOOL_CALL, TOOL_DOC),
           "json_object": ({"type": "object"}, OBJECT_DOC)}
WORDS = "the model reads a token and writes the next one while the server streams text about cats".split()


def tiny_tokenizer() -> Tokenizer:
    rng = random.Random(0)  # the same tokenizer bench/bench_structured.py trains
    return Tokenizer.train([" ".join(rng.choices(WORDS, k=12)) + " {\"a\": 1}" for _ in range(300)], vocab_size=384)


def stop_ids(tokenizer: Tokenizer) -> list[int]:
    from lmstack.engine.engine import tokenizer_stop_ids

    return tokenizer_stop_ids(tokenizer)


class Vocab:
    """The byte strings of one tokenizer, as every engine is given them (special tokens marked)."""

    def __init__(self, name: str, tokenizer: Tokenizer):
        self.name, self.tokenizer = name, tokenizer
        self.size = tokenizer.vocab_size
        self.stops = stop_ids(tokenizer)
        self.specials = {int(i) for i in tokenizer.special_tokens.values()}
        self.bytes = [tokenizer.token_bytes(i) or b"" for i in range(self.size)]
        self.words = (self.size + 31) // 32


# ----------------------------------------------------------------------------- engines
# each returns (compile() -> matcher factory, mask(matcher, bitmask, row), advance(matcher, token), batch fill)

class Llguidance:
    name = "llguidance"

    def __init__(self, vocab: Vocab):
        import llguidance
        import llguidance.torch

        self.llg, self.fill_par = llguidance, llguidance.torch.fill_next_token_bitmask_par
        self.compiler = GrammarCompiler(vocab.tokenizer, vocab.size, vocab.stops)  # the product's own path
        self.executor = llguidance.LLExecutor()

    def compile(self, schema: dict) -> Any:
        grammar = self.compiler.json_schema(schema)
        return grammar, grammar.start().matcher

    def matcher(self, compiled: Any) -> Any:
        return compiled[0].start().matcher

    def mask(self, matcher: Any, bitmask: torch.Tensor, row: int) -> None:
        matcher.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), bitmask.shape[1] * 4)

    def advance(self, matcher: Any, token: int) -> None:
        matcher.consume_token(token)

    def batch(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        self.fill_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)


class Xgrammar:
    name = "xgrammar"

    def __init__(self, vocab: Vocab):
        import xgrammar

        self.xgr = xgrammar
        # special tokens as empty strings: xgrammar never lets the grammar produce them as text
        encoded = [b"" if i in vocab.specials else data for i, data in enumerate(vocab.bytes)]
        self.info = xgrammar.TokenizerInfo(encoded, xgrammar.VocabType.RAW, vocab_size=vocab.size,
                                           stop_token_ids=vocab.stops)
        self.batcher = xgrammar.BatchGrammarMatcher()

    def compile(self, schema: dict) -> Any:
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)  # fresh: no cached compilation
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))
        return compiled, self.xgr.GrammarMatcher(compiled)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled[0])

    def mask(self, matcher: Any, bitmask: torch.Tensor, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def advance(self, matcher: Any, token: int) -> None:
        if not matcher.accept_token(token):
            raise ValueError(f"xgrammar rejected token {token}")

    def batch(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        self.batcher.batch_fill_next_token_bitmask(matchers, bitmask)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, vocab: Vocab):
        import outlines_core

        self.oc = outlines_core
        eos = vocab.stops[0]
        tokens: dict[bytes, list[int]] = {}
        for i, data in enumerate(vocab.bytes):  # special tokens and empty rows stay out: never allowed
            if data and i not in vocab.specials and i != eos:
                tokens.setdefault(data, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(eos, tokens)

    def compile(self, schema: dict) -> Any:
        from outlines_core.json_schema import build_regex_from_schema

        index = self.oc.Index(build_regex_from_schema(json.dumps(schema), ""), self.vocabulary)
        return index, self.oc.Guide(index)

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled[0])

    def mask(self, matcher: Any, bitmask: torch.Tensor, row: int) -> None:
        matcher.write_mask_into(bitmask[row].data_ptr(), bitmask.shape[1], 4)

    def advance(self, matcher: Any, token: int) -> None:
        matcher.advance(token, return_tokens=False)

    def batch(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        for i, m in enumerate(matchers):
            self.mask(m, bitmask, i)


ENGINES: dict[str, Callable[[Vocab], Any]] = {"llguidance": Llguidance, "xgrammar": Xgrammar,
                                               "outlines-core": OutlinesCore}


# ----------------------------------------------------------------------------- measurement

def allowed(bitmask: torch.Tensor, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)


def measure(engine: Any, vocab: Vocab, schema: dict, document: dict, repeats: int, batch: int) -> dict[str, Any]:
    text = json.dumps(document, separators=(",", ":"))
    tokens = vocab.tokenizer.encode(text)
    result: dict[str, Any] = {"doc_tokens": len(tokens)}
    compile_s = []
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            compiled = engine.compile(schema)
            compile_s.append(time.perf_counter() - start)
    except Exception as e:  # a schema the engine cannot compile is a result, not a crash
        return {**result, "compiles": False, "error": f"{type(e).__name__}: {str(e)[:160]}"}
    result.update(compiles=True, compile_ms=1e3 * min(compile_s))
    bitmask = torch.zeros(batch, vocab.words, dtype=torch.int32)
    mask_s: list[float] = []
    accepts = True
    for _ in range(repeats):
        matcher = engine.matcher(compiled)
        for token in tokens:
            bitmask[0].zero_()
            start = time.perf_counter()
            engine.mask(matcher, bitmask, 0)
            mask_s.append(time.perf_counter() - start)
            if not allowed(bitmask, 0, token):
                accepts = False
                break
            engine.advance(matcher, token)
        if not accepts:
            break
    result["accepts_doc"] = accepts
    result["mask_mean_ms"] = 1e3 * statistics.fmean(mask_s)
    result["mask_p99_ms"] = 1e3 * sorted(mask_s)[min(len(mask_s) - 1, int(0.99 * len(mask_s)))]
    if accepts:
        matchers = [engine.matcher(compiled) for _ in range(batch)]
        step_s = []
        for token in tokens:
            start = time.perf_counter()
            engine.batch(matchers, bitmask)
            step_s.append(time.perf_counter() - start)
            for m in matchers:
                engine.advance(m, token)
        result[f"batch{batch}_step_ms"] = 1e3 * statistics.fmean(step_s)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="an imported SmolLM2-135M-Instruct checkpoint (its tokenizer); omitted: tiny vocabulary only")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--schemas", nargs="+", default=list(SCHEMAS), choices=list(SCHEMAS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="matchers per step for the batch API")
    parser.add_argument("--out", default="bench/results/grammar_engines")
    args = parser.parse_args()
    vocabs = [Vocab("tiny-384", tiny_tokenizer())]
    if args.model:
        vocabs.append(Vocab("smollm2-49k", Tokenizer.load(args.model)))
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, " \
              f"python {platform.python_version()}, torch {torch.__version__}"
    print(f"machine: {machine}")
    versions = {}
    for name in args.engines:
        from importlib.metadata import version

        versions[name] = version(name)
    print("versions:", versions)
    rows = []
    print(f"| vocabulary | schema | engine | compiles | accepts doc | compile ms | mask mean ms | mask p99 ms "
          f"| batch {args.batch} step ms |")
    print("|---|---|---|---|---|---:|---:|---:|---:|")
    for vocab in vocabs:
        engines = {}
        for name in args.engines:
            start = time.perf_counter()
            engines[name] = ENGINES[name](vocab)
            print(f"  ({name}: vocabulary of {vocab.size} set up in {time.perf_counter() - start:.2f} s)", flush=True)
        for schema_name in args.schemas:
            schema, document = SCHEMAS[schema_name]
            for name, engine in engines.items():
                r = measure(engine, vocab, schema, document, args.repeats, args.batch)
                rows.append({"vocab": vocab.name, "schema": schema_name, "engine": name, **r})

                def cell(key: str) -> str:
                    return f"{r[key]:.3f}" if key in r else "-"
                print(f"| {vocab.name} | {schema_name} | {name} | {'yes' if r['compiles'] else 'no: ' + r['error']} "
                      f"| {'yes' if r.get('accepts_doc') else 'no' if r['compiles'] else '-'} | "
                      f"{cell('compile_ms')} | {cell('mask_mean_ms')} | {cell('mask_p99_ms')} | "
                      f"{cell(f'batch{args.batch}_step_ms')} |", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.json", json.dumps({"machine": machine, "versions": versions,
                                                        "repeats": args.repeats, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
