"""Structured output over HTTP: ``response_format`` json_object / json_schema through the official client.

A random-weight model is served; it writes noise unless constrained, so a parsed, schema-valid answer
is the grammar's doing. Checks: json_schema answers validate (sampled, n > 1, several concurrent
requests mixed with free ones), a free request answers the same tokens as the engine run directly,
streaming delivers the same valid JSON, a schema the grammar engine cannot compile is a 400 that names
the problem and leaves the server healthy.
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest

from lmstack.engine.engine import Engine
from lmstack.engine.sampling import SamplingParams
from lmstack.serve.app import create_app, default_model_name
from lmstack.serve.run import serve_in_thread
from serve_helpers import API_KEY, health, wait_idle

MESSAGES = [{"role": "user", "content": "Describe a cat as JSON."}]
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 10},
                         "legs": {"type": "integer", "minimum": 0, "maximum": 8},
                         "color": {"enum": ["black", "white", "orange"]}},
          "required": ["name", "legs", "color"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "cat", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    app = create_app(tiny_checkpoint, api_keys=[API_KEY], max_num_seqs=8, device="cpu")
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def model_name(tiny_checkpoint) -> str:
    return default_model_name(tiny_checkpoint)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_json_schema_answers_validate(client, model_name):
    res = client.chat.completions.create(model=model_name, messages=MESSAGES, response_format=FORMAT,
                                         temperature=1.0, seed=5, n=3, max_tokens=200)
    texts = [c.message.content for c in res.choices]
    assert len(set(texts)) > 1  # sampled, yet every sample is valid
    for choice in res.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_streamed_json_schema_is_the_same_valid_answer(client, model_name):
    args = dict(model=model_name, messages=MESSAGES, response_format=FORMAT, temperature=0, max_tokens=200)
    plain = client.chat.completions.create(**args).choices[0].message.content
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        stream=True, **args) if chunk.choices)
    assert streamed == plain
    jsonschema.validate(json.loads(plain), SCHEMA)


def test_concurrent_mixed_requests_free_rows_unchanged(server, model_name, tiny_checkpoint):
    reference = Engine.from_checkpoint(str(tiny_checkpoint), device="cpu", max_num_seqs=2)
    free_prompt, _ = reference.tokenizer.render_chat(MESSAGES, add_generation_prompt=True)
    [expected] = reference.generate([list(free_prompt)], SamplingParams(max_tokens=24, temperature=0.8, seed=11,
                                                                        ignore_eos=True))

    async def main():
        aclient = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        constrained = [aclient.chat.completions.create(
            model=model_name, messages=MESSAGES, response_format=FORMAT if i % 2 else {"type": "json_object"},
            temperature=0.7, seed=i, max_tokens=150) for i in range(5)]
        free = aclient.chat.completions.create(model=model_name, messages=MESSAGES, temperature=0.8, seed=11,
                                               max_tokens=24, extra_body={"ignore_eos": True})
        return await asyncio.gather(free, *constrained)

    free, *constrained = asyncio.run(main())
    assert free.choices[0].message.content == expected.outputs[0].text
    for i, res in enumerate(constrained):
        choice = res.choices[0]
        if i % 2:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        elif choice.finish_reason == "stop":  # any object: unbounded strings may run to max_tokens
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert choice.message.content.startswith("{")


@pytest.mark.parametrize("fmt, words", [
    ({"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "strin"}}}, "strin"),
    ({"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "string", "pattern": "(?=a)"}}},
     "look-around"),
])
def test_uncompilable_schema_is_400_naming_the_problem(server, client, model_name, fmt, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_name, messages=MESSAGES, response_format=fmt, max_tokens=8)
    error = e.value.body if "message" in e.value.body else e.value.body["error"]
    assert error["param"] == "response_format" and words in error["message"]
    assert health(server)["status"] == "ok"
    wait_idle(server)
    res = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=4)
    assert res.choices[0].message.content is not None


def test_json_schema_without_schema_object_is_400(client, model_name):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=4,
                                       response_format={"type": "json_schema"})
