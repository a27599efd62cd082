"""OpenAI's tool protocol over HTTP, through the official ``openai`` client, on a real server.

The served model has random weights, so what it writes is noise: a parsed, schema-valid call under
``tool_choice: "required"`` or a named function is the grammar's doing, and its ``auto`` replies give the
malformed calls (a ``<|tool_call|>`` token followed by noise) that must come back as content and be
counted. Checks: forced calls parse and validate (sampled, n > 1, one call without parallel calls);
streamed deltas are OpenAI's shape, the stream helper reassembles them and they equal the non-streamed
reply for the same seed; the prompt holds the tool descriptions only when tools are offered, and tool
turns are rendered back; bad input is one clear 400 and the server stays healthy; the built-in tools of
``serve --tools`` answer at /v1/tools. The reading of well-formed ``auto`` calls (which a random model
never writes) is checked on the reply reader itself, fed piece by piece as a stream is.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from lmstack.engine.engine import Engine
from lmstack.engine.constraints import GrammarCompiler
from lmstack.serve.app import create_app, default_model_name
from lmstack.serve.protocol import ChatCompletionRequest
from lmstack.serve.run import serve_in_thread
from lmstack.serve.tool_grammar import tool_call_grammar
from lmstack.serve.tool_protocol import ToolStream, argument_fragments, chat_messages, read_reply, tool_plan
from lmstack.tokenizer import Tokenizer
from lmstack.tools.loop import tools_system_prompt
from serve_helpers import API_KEY, health, wait_idle

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
       "required": ["a", "b"], "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}}]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    app = create_app(tiny_checkpoint, api_keys=[API_KEY], max_num_seqs=16, device="cpu", tools="calculator")
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def model_name(tiny_checkpoint) -> str:
    return default_model_name(tiny_checkpoint)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _check_call(call) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return arguments


# ----------------------------------------------------------------------------- forced calls


def test_named_tool_choice_forces_one_schema_valid_call(client, model_name):
    res = client.chat.completions.create(
        model=model_name, messages=MESSAGES, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
        temperature=1.0, seed=3, n=4, max_tokens=150)
    ids = []
    for choice in res.choices:
        assert choice.finish_reason == "tool_calls", choice.message.content
        assert choice.message.content is None and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        assert call.function.name == "add"
        _check_call(call)
        ids.append(call.id)
    assert len(set(ids)) == len(ids)  # unique call ids
    assert len({c.message.tool_calls[0].function.arguments for c in res.choices}) > 1  # sampled, yet all valid


def test_required_picks_among_the_tools_one_call_without_parallel(client, model_name):
    res = client.chat.completions.create(model=model_name, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                         parallel_tool_calls=False, temperature=1.0, seed=11, n=8, max_tokens=150)
    names = set()
    for choice in res.choices:
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        _check_call(choice.message.tool_calls[0])
        names.add(choice.message.tool_calls[0].function.name)
    assert names == {"get_weather", "add"}  # the grammar leaves the choice of tool to the model


def test_parallel_grammar_accepts_several_calls_and_single_grammar_only_one(tiny_checkpoint):
    engine = Engine.from_checkpoint(str(tiny_checkpoint), device="cpu", max_num_seqs=1)
    tok = engine.tokenizer
    compiler = GrammarCompiler(tok, engine.model.config.vocab_size, sorted(engine.eos_token_ids))
    functions = [("get_weather", WEATHER), ("add", ADD)]
    one = '<|tool_call|>{"name": "add", "arguments": {"a":1,"b":2}}'
    two = one + '<|tool_call|>{"name": "get_weather", "arguments": {"city":"Paris","days":2}}'

    def accepts(grammar, text: str) -> bool:
        constraint = grammar.start()
        for token in tok.encode(text, allowed_special="all"):
            if not bool(constraint.allowed()[token]):
                return False
            constraint.advance(token)
        return bool(constraint.allowed()[sorted(engine.eos_token_ids)].any())  # complete: may stop here

    parallel = tool_call_grammar(compiler, tok, functions, parallel=True)
    single = tool_call_grammar(compiler, tok, functions, parallel=False)
    assert accepts(parallel, one) and accepts(parallel, two)
    assert accepts(single, one) and not accepts(single, two)
    assert not accepts(single, '<|tool_call|>{"name": "add", "arguments": {"a":"1","b":2}}')  # schema-invalid
    assert not accepts(single, '<|tool_call|>{"name": "sub", "arguments": {"a":1,"b":2}}')  # unknown tool


def test_streamed_call_deltas_reassemble_to_the_plain_reply(client, model_name):
    args = dict(model=model_name, messages=MESSAGES, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                temperature=1.0, seed=5, max_tokens=150)
    plain = client.chat.completions.create(**args).choices[0]
    chunks = [c for c in client.chat.completions.create(stream=True, **args) if c.choices]
    deltas = [c.choices[0].delta for c in chunks]
    calls = [d.tool_calls[0] for d in deltas if d.tool_calls]
    head, pieces = calls[0], calls[1:]
    assert head.index == 0 and head.id.startswith("call_") and head.type == "function"
    assert head.function.name == plain.message.tool_calls[0].function.name and head.function.arguments == ""
    assert len(pieces) > 1 and all(p.id is None and p.function.name is None and p.index == 0 for p in pieces)
    assert "".join(p.function.arguments for p in pieces) == plain.message.tool_calls[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    # the client's own stream helper puts the call back together
    with client.chat.completions.stream(**args) as stream:
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in final.message.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in plain.message.tool_calls]


# ----------------------------------------------------------------------------- auto, none, the prompt


def test_auto_malformed_calls_come_back_as_content_and_are_counted(client, model_name, server):
    # a random model sometimes samples <|tool_call|> and then noise: never a 500, never a tool call
    args = dict(model=model_name, messages=[{"role": "user", "content": "add 2 and 3"}], tools=TOOLS,
                temperature=1.5, seed=0, n=16, max_tokens=400)
    before = health(server)["counters"]["malformed_tool_calls"]
    res = client.chat.completions.create(**args)
    attempted = [c for c in res.choices if "<|tool_call|>" in (c.message.content or "") and c.finish_reason == "stop"]
    assert attempted, "seed 0 should make the random model attempt a call; pick another seed if the model changed"
    assert all(c.message.tool_calls is None for c in res.choices)
    assert health(server)["counters"]["malformed_tool_calls"] - before == len(attempted)
    streamed = [""] * 16
    for chunk in client.chat.completions.create(stream=True, **args):
        for choice in chunk.choices:
            assert not choice.delta.tool_calls
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == [c.message.content for c in res.choices]


def test_tools_are_described_in_the_prompt_only_when_offered(client, model_name, tiny_checkpoint):
    tok = Tokenizer.load(tiny_checkpoint)
    system = {"role": "system", "content": "Be brief."}
    plain = client.chat.completions.create(model=model_name, messages=[system, *MESSAGES], max_tokens=1)
    none = client.chat.completions.create(model=model_name, messages=[system, *MESSAGES], tools=TOOLS,
                                          tool_choice="none", max_tokens=1)
    auto = client.chat.completions.create(model=model_name, messages=[system, *MESSAGES], tools=TOOLS, max_tokens=1)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens == len(tok.render_chat([system, *MESSAGES], True)[0])
    described = tools_system_prompt([_tool(t) for t in TOOLS], "lmstack")
    expected = tok.render_chat([{"role": "system", "content": f"Be brief.\n\n{described}"}, *MESSAGES], True)[0]
    assert auto.usage.prompt_tokens == len(expected)


def _tool(spec: dict):
    from lmstack.tools.base import Tool

    f = spec["function"]
    return Tool(f["name"], f.get("description", ""), f["parameters"], lambda arguments: "")


def test_tool_turns_are_accepted_back_and_rendered(client, model_name, tiny_checkpoint):
    first = client.chat.completions.create(model=model_name, messages=MESSAGES, tools=TOOLS,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           parallel_tool_calls=False, temperature=0, max_tokens=150)
    call = first.choices[0].message.tool_calls[0]
    conversation = [*MESSAGES, first.choices[0].message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C"}]
    second = client.chat.completions.create(model=model_name, messages=conversation, tools=TOOLS, max_tokens=5,
                                            temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    tok = Tokenizer.load(tiny_checkpoint)
    described = tools_system_prompt([_tool(t) for t in TOOLS], "lmstack")
    rendered = tok.render_chat([{"role": "system", "content": described}, *MESSAGES,
                                {"role": "assistant", "content": "", "tool_calls": [
                                    {"function": {"name": call.function.name,
                                                  "arguments": json.loads(call.function.arguments)}}]},
                                {"role": "tool", "content": "Sunny, 24 C"}], True)[0]
    assert second.usage.prompt_tokens == len(rendered)
    assert "<|tool_result|>Sunny, 24 C<|end|>" in tok.decode(rendered)


# ----------------------------------------------------------------------------- bad input


def _tool_def(**function) -> dict:
    return {"type": "function", "function": function}


@pytest.mark.parametrize("kwargs, words", [
    ({"tools": [_tool_def(description="no name", parameters=ADD)]}, "tools[0].function.name"),
    ({"tools": [_tool_def(name="f", parameters={"type": "string"})]}, "type 'string'"),
    ({"tools": [_tool_def(name="f", parameters=["a"])]}, "tools[0].function.parameters"),
    ({"tools": [_tool_def(name="f", parameters=ADD), _tool_def(name="f", parameters=WEATHER)]}, "named 'f'"),
    ({"tools": [_tool_def(name="bad name!", parameters=ADD)]}, "tools[0].function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "mul"}}}, "'mul'"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": [_tool_def(name="f", parameters={"type": "object", "properties": {
        "s": {"type": "string", "pattern": "(?=a)"}}})], "tool_choice": "required"}, "tools[0] (f) parameters"),
    ({"tools": TOOLS, "tool_choice": "maybe"}, "tool_choice"),
    ({"messages": [*MESSAGES, {"role": "tool", "tool_call_id": "call_nope", "content": "42"}], "tools": TOOLS},
     "'call_nope'"),
    ({"messages": [*MESSAGES, {"role": "tool", "content": "42"}]}, "tool_call_id"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_tool_input_is_one_clear_400_and_the_server_stays_healthy(client, model_name, server, kwargs, words):
    args = {"model": model_name, "messages": MESSAGES, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**args)
    message = e.value.body["message"] if "message" in (e.value.body or {}) else e.value.body["error"]["message"]
    assert words in message, message
    good = client.chat.completions.create(model=model_name, messages=MESSAGES, tools=TOOLS, max_tokens=150,
                                          tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                          temperature=0)  # bounded arguments: greedy decoding ends the call
    assert good.choices[0].finish_reason == "tool_calls"
    assert health(server)["status"] == "ok"
    wait_idle(server)


# ----------------------------------------------------------------------------- built-in tools


def test_builtin_tools_are_listed_and_run(server):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    listed = httpx.get(f"{server}/v1/tools", headers=auth).json()["data"]
    assert [t["function"]["name"] for t in listed] == ["calculator"] and listed[0]["type"] == "function"
    assert listed[0]["function"]["parameters"]["required"] == ["expression"]
    run = httpx.post(f"{server}/v1/tools/calculator", headers=auth, json={"expression": "2**100 + 1"})
    assert run.status_code == 200 and run.json()["content"] == str(2 ** 100 + 1)
    bad = httpx.post(f"{server}/v1/tools/calculator", headers=auth, json={"expr": "1"}).json()["content"]
    assert bad.startswith("error: ") and "expression" in bad  # the tool's own error text, for the model
    assert httpx.post(f"{server}/v1/tools/shell", headers=auth, json={}).status_code == 404
    not_object = httpx.post(f"{server}/v1/tools/calculator", headers=auth, json=[1])
    assert not_object.status_code == 400 and "JSON object" in not_object.json()["error"]["message"]
    assert httpx.get(f"{server}/v1/tools").status_code == 401  # the key guards the tools like every /v1 route


def test_builtin_tool_timeouts_are_enforced_off_the_event_loop(tiny_checkpoint):
    import time

    from lmstack.tools.base import Tool

    slow = Tool("sleepy", "Sleeps.", {"type": "object", "properties": {}},
                lambda arguments: time.sleep(5) or "woke", timeout_s=0.3)
    app = create_app(tiny_checkpoint, device="cpu", tools=[slow])
    with serve_in_thread(app) as url:
        started = time.monotonic()
        with httpx.Client(timeout=30) as http:
            pending = http.post(f"{url}/v1/tools/sleepy", json={})
            assert http.get(f"{url}/health").status_code == 200
        assert pending.json()["content"] == "error: sleepy did not finish within 0.3 s"
        assert time.monotonic() - started < 4


# ----------------------------------------------------------------------------- reading auto replies


PLAN = tool_plan(ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, "tools": TOOLS}))


@pytest.mark.parametrize("text, content, names", [
    ('Let me add. <|tool_call|>{"name": "add", "arguments": {"a": 1, "b": 2}}', "Let me add.", ["add"]),
    ('<|tool_call|>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}'
     '<|tool_call|>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}', None, ["add", "get_weather"]),
    ('Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>', "Sure.", ["add"]),
])
def test_auto_replies_with_calls_are_read_alike_plain_and_streamed(tiny_checkpoint, text, content, names):
    tok = Tokenizer.load(tiny_checkpoint)
    reply = read_reply(text, "stop", PLAN)
    assert reply.content == content and reply.finish_reason == "tool_calls" and not reply.malformed
    assert [c.function.name for c in reply.tool_calls] == names
    assert json.loads(reply.tool_calls[0].function.arguments) == {"a": 1, "b": 2}
    stream = ToolStream(PLAN)
    ids = tok.encode(text, allowed_special="all")
    sent = "".join(stream.feed(tok.decode([t])) for t in ids)
    rest, streamed = stream.finish("stop")
    assert sent + rest == (content or "")
    assert [(c.function.name, c.function.arguments) for c in streamed.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in reply.tool_calls]
    for call in reply.tool_calls:
        assert "".join(argument_fragments(tok, call.function.arguments)) == call.function.arguments


@pytest.mark.parametrize("text", [
    'x <|tool_call|>{"name": "add", "arguments": {"a": 1,',        # bad JSON
    '<|tool_call|>{"name": "mul", "arguments": {"a": 1, "b": 2}}',   # a tool the request did not offer
    '<|tool_call|>{"name": "add", "arguments": [1, 2]}',             # arguments not an object
    '<|tool_call|>{"arguments": {}}',                                # no name
])
def test_malformed_auto_calls_are_plain_content(text):
    reply = read_reply(text, "stop", PLAN)
    assert reply.malformed and reply.tool_calls is None and reply.content == text and reply.finish_reason == "stop"
    stream = ToolStream(PLAN)
    sent = "".join(stream.feed(ch) for ch in text)
    rest, _ = stream.finish("stop")
    assert sent + rest == text


def test_tool_messages_need_a_matching_earlier_call():
    base = {"model": "m", "tools": TOOLS}
    ok = ChatCompletionRequest.model_validate({**base, "messages": [
        *MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"}]})
    messages, template_tools = chat_messages(ok, tool_plan(ok), tokenizer=None)
    assert template_tools is None and messages[0]["role"] == "system"  # the tools, described
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == {"a": 1, "b": 2}
    assert messages[3] == {"role": "tool", "content": "3", "tool_call_id": "call_1", "name": "add"}


def test_jinja_template_gets_the_tools(tiny_checkpoint):
    tok = Tokenizer.load(tiny_checkpoint)
    tok.meta.chat_format = "jinja"
    tok.meta.chat_template = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}"
                              "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, "tools": TOOLS})
    messages, template_tools = chat_messages(req, tool_plan(req), tok)
    assert [t["function"]["name"] for t in template_tools] == ["get_weather", "add"] and len(messages) == 1
    ids, _ = tok.render_chat(messages, add_generation_prompt=True, tools=template_tools)
    assert tok.decode(ids).startswith("[get_weather][add]user: What is the weather")
