"""Grammar-constrained decoding in the engine (lmstack.engine.constraints) on a random-weight model.

An untrained model emits noise, so every well-formed JSON answer here is the grammar's doing. Checks:
every constrained answer parses and validates against its schema (greedy and sampled, n > 1, batched
with unconstrained requests); unconstrained rows give exactly the tokens they give without any
constrained neighbour (seeded parity); schemas the grammar engine cannot compile raise UserError naming
the offending part.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from lmstack.engine.constraints import GrammarCompiler
from lmstack.engine.engine import Engine
from lmstack.engine.sampling import SamplingParams
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
