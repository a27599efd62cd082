"""Grammar-constrained decoding in the engine (lmstack.engine.constraints) on a random-weight model.

An untrained model emits noise, so every well-formed JSON answer here is the grammar's doing. Checks:
every constrained answer parses and validates against its schema (greedy and sampled, n > 1, batched
with unconstrained requests); unconstrained rows give exactly the tokens they give without any
constrained neighbour (seeded parity); the engine's fast mask path (masks filled in parallel during the
forward) gives exactly the tokens of the plain row-by-row path, in the engine and in ``sample``; the plain
``generate`` loop honours the constraint and matches the engine's greedy tokens; schemas the grammar
engine cannot compile, and a grammar built for another vocabulary, raise UserError naming the problem.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from lmstack.engine.constraints import ConstraintMasks, GrammarCompiler
from lmstack.engine.engine import Engine
from lmstack.engine.generate import generate
from lmstack.engine.sampling import SamplingParams, SamplingRow, make_generator, sample
from lmstack.errors import UserError

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
                         "ok": {"type": "boolean"}},
          "required": ["name", "age", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> Engine:
    return Engine.from_checkpoint(str(tiny_checkpoint), device="cpu", max_num_seqs=8, max_model_len=512)


@pytest.fixture(scope="module")
def grammars(engine) -> GrammarCompiler:
    return GrammarCompiler(engine.tokenizer, engine.model.config.vocab_size, engine.eos_token_ids)


def _prompt(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer.encode(text)


def test_constrained_outputs_validate_and_free_rows_keep_their_tokens(engine, grammars, one_thread):
    prompts = [_prompt(engine, t) for t in ("the model reads", "cats and dogs", "a river of code", "time")]
    free = [SamplingParams(max_tokens=24, temperature=0.0),
            SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=7)]
    alone = engine.generate(prompts[:2], free)
    schema = grammars.json_schema(SCHEMA)
    constrained = [SamplingParams(max_tokens=200, temperature=1.0, seed=3, n=2, constraint=schema),
                   SamplingParams(max_tokens=120, temperature=1.0, seed=0, n=4,
                                  constraint=grammars.json_object())]
    mixed = engine.generate(prompts, free + constrained)
    for a, b in zip(alone, mixed[:2]):  # the free rows are untouched by their constrained neighbours
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert len(mixed[2].outputs) == 2 and mixed[2].outputs[0].text != mixed[2].outputs[1].text
    for out in mixed[2].outputs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
    # any object: nothing bounds a string or a number, so noise may run to max_tokens; what ends is an object
    ended = [out for out in mixed[3].outputs if out.finish_reason == "stop"]
    assert ended and all(isinstance(json.loads(out.text), dict) for out in ended)
    assert all(out.text.startswith("{") for out in mixed[3].outputs)


def test_without_the_constraint_the_model_does_not_write_json(engine, grammars, one_thread):
    """The control: the same greedy request without a grammar is not JSON, so the grammar did the work."""
    [out] = engine.generate([_prompt(engine, "the model reads")], SamplingParams(max_tokens=40, temperature=0.0))
    with pytest.raises(ValueError):
        json.loads(out.outputs[0].text)


@pytest.mark.parametrize("schema, words", [
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, "strin"),
    ({"type": "string", "pattern": "(?<=x)a"}, "look-around"),
])
def test_schemas_that_cannot_compile_name_the_problem(grammars, schema, words):
    with pytest.raises(UserError, match=words):
        grammars.json_schema(schema)


def _mixed_batch(grammars: GrammarCompiler) -> list[SamplingParams]:
    schema = grammars.json_schema(SCHEMA)
    return [SamplingParams(max_tokens=60, temperature=0.0, constraint=schema),
            SamplingParams(max_tokens=60, temperature=0.9, top_k=50, top_p=0.95, seed=11, n=3, constraint=schema),
            SamplingParams(max_tokens=24, temperature=0.0),
            SamplingParams(max_tokens=60, temperature=1.0, seed=5, repetition_penalty=1.3,
                           constraint=grammars.json_object()),
            SamplingParams(max_tokens=24, temperature=1.0, seed=2)]


def test_fast_mask_path_gives_the_plain_paths_tokens(tiny_checkpoint, engine, grammars, one_thread):
    """The same mixed batch (greedy and seeded, constrained and free, n > 1) on the fast path and the plain one."""
    plain = Engine.from_checkpoint(str(tiny_checkpoint), device="cpu", max_num_seqs=8, max_model_len=512,
                                   parallel_masks=False)
    prompts = [_prompt(engine, t) for t in ("the model reads", "cats and dogs", "a river", "time", "code")]
    fast_out = engine.generate(prompts, _mixed_batch(grammars))
    assert engine.constraint_masks is not None and engine.constraint_masks._last is not None  # the fast path ran
    plain_out = plain.generate(prompts, _mixed_batch(grammars))
    assert plain.constraint_masks is None
    for fast, slow in zip(fast_out, plain_out):
        assert [o.token_ids for o in fast.outputs] == [o.token_ids for o in slow.outputs]
    for out in fast_out[0].outputs + fast_out[1].outputs:  # and the grammar held on the fast path
        if out.finish_reason == "stop":
            jsonschema.validate(json.loads(out.text), SCHEMA)
        assert out.text.startswith("{")


def test_a_lone_constrained_row_is_masked_inline(tiny_checkpoint, grammars, one_thread):
    """One constrained row skips the worker thread (it costs more than the mask), and the grammar still holds."""
    single = Engine.from_checkpoint(str(tiny_checkpoint), device="cpu", max_num_seqs=8, max_model_len=512)
    [out] = single.generate([_prompt(single, "a river")],
                            [SamplingParams(max_tokens=40, temperature=0.0, constraint=grammars.json_object())])
    assert single.constraint_masks is not None and single.constraint_masks._last is None  # never handed over
    assert out.outputs[0].text.startswith("{")


def test_sample_with_parallel_masks_equals_row_by_row(engine, grammars, one_thread):
    """sample() on one batch of matchers in different states: the prefetched bitmask and allowed() agree."""
    schema, any_object = grammars.json_schema(SCHEMA), grammars.json_object()
    V = engine.vocab_size
    torch.manual_seed(0)
    constraints = [schema.start(), None, any_object.start(), schema.start(), None, schema.start()]
    for steps, c in zip([0, 0, 3, 5, 0, 9], constraints):  # walk each matcher a few allowed tokens in
        for _ in range(steps):
            allowed = c.allowed().nonzero()[:, 0]
            c.advance(int(allowed[torch.randint(len(allowed), ())]))
    logits = torch.randn(len(constraints), V) * 4
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=1),
              SamplingParams(temperature=0.8, top_p=0.9, seed=2), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.0, presence_penalty=0.5), SamplingParams(temperature=1.3, top_k=5, seed=3)]

    def rows() -> list[SamplingRow]:
        return [SamplingRow(p, None if p.greedy else make_generator(p.seed, "cpu"), [1, 2], [3], c)
                for p, c in zip(params, constraints)]

    masks = ConstraintMasks()
    for _ in range(3):  # the fill is reused across steps; each draw must agree
        expected = sample(logits, rows())
        pending = masks.start(constraints)
        assert pending is not None and pending.rows == [0, 2, 3, 5]
        assert torch.equal(sample(logits, rows(), pending), expected)
        for i in pending.rows:  # every constrained pick is allowed
            assert constraints[i].allowed()[expected[i]]
        for i in pending.rows:
            constraints[i].advance(int(expected[i]))
    assert masks.start([None, None]) is None


def test_generate_honours_the_constraint_and_matches_the_engine(engine, grammars, one_thread):
    schema = grammars.json_schema(SCHEMA)
    prompt = _prompt(engine, "cats and dogs")
    greedy = SamplingParams(max_tokens=80, temperature=0.0, constraint=schema)
    ids = generate(engine.model, prompt, greedy, eos_token_ids=engine.eos_token_ids)
    [out] = engine.generate([prompt], greedy)
    assert ids == out.outputs[0].token_ids
    sampled = generate(engine.model, prompt, SamplingParams(max_tokens=200, temperature=1.0, seed=4, constraint=schema),
                       eos_token_ids=engine.eos_token_ids)
    assert sampled[-1] in engine.eos_token_ids  # the grammar completed and handed over to the stop token
    jsonschema.validate(json.loads(engine.tokenizer.decode(sampled[:-1])), SCHEMA)


def test_a_grammar_for_another_vocabulary_is_refused(engine, one_thread):
    other = GrammarCompiler(engine.tokenizer, engine.vocab_size + 64, engine.eos_token_ids).json_object()
    params = SamplingParams(max_tokens=8, constraint=other)
    with pytest.raises(UserError, match=f"vocab_size={engine.vocab_size}"):
        engine.generate([_prompt(engine, "time")], params)
    with pytest.raises(UserError, match=f"vocab_size={engine.vocab_size}"):
        generate(engine.model, _prompt(engine, "time"), params)
