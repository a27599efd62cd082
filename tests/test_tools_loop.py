"""Tool calls in generation: parsing both spellings, and the tool loop on a real engine with a tiny model that
has memorised tool-using conversations (tests/tools_helpers.py): results are injected and marked, the
token stream equals the rendered conversation, the cached prefix is reused, the round cap holds, and a
slow tool in one conversation does not stall another."""

from __future__ import annotations

import time

import pytest

from lmstack.engine import Engine
from lmstack.tools.base import Tool
from lmstack.tools.calculator import calculator_tool
from lmstack.tools.calls import parse_tool_calls
from lmstack.tools.loop import run_many_with_tools, run_with_tools, tools_system_prompt
from tools_helpers import build_tool_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    return build_tool_model(tmp_path_factory.mktemp("tools"))


def test_parse_lmstack_and_hermes_calls():
    content, calls = parse_tool_calls('Checking.<|tool_call|>{"name": "calculator", "arguments": {"expression": '
                                      '"2+2"}}<|tool_call|>{"name": "search", "arguments": "{\\"query\\": \\"x\\"}"}')
    assert content == "Checking." and [c.name for c in calls] == ["calculator", "search"]
    assert calls[0].arguments == {"expression": "2+2"} and calls[1].arguments == '{"query": "x"}'
    content, calls = parse_tool_calls('Sure.\n<tool_call>\n{"name": "python", "arguments": {"code": "print(1)"}}\n'
                                      '</tool_call>\n<tool_call>{"name": "calculator", "arguments": {}}')
    assert content == "Sure." and [c.name for c in calls] == ["python", "calculator"]  # last tag never closed
    assert calls[0].arguments == {"code": "print(1)"}
    _, [broken] = parse_tool_calls("<|tool_call|>{'name': 1}")
    assert broken.error.startswith("the tool call is not valid JSON")
    _, [nameless] = parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>')
    assert nameless.error == 'a tool call must be {"name": ..., "arguments": {...}}'
    assert parse_tool_calls("  just text  ") == ("just text", [])


def test_tool_results_are_injected_marked_and_reuse_the_prefix(tool_model):
    engine = Engine.from_checkpoint(str(tool_model), device="cpu")
    tok = engine.tokenizer
    result = run_with_tools(engine, tok, [{"role": "user", "content": "add two and three"}], [calculator_tool()])
    assert result.finish_reason == "stop" and result.rounds == 1
    assert result.tool_calls == [{"name": "calculator", "arguments": {"expression": "2 + 3"}, "result": "5"}]
    assert [m["role"] for m in result.messages] == ["user", "assistant", "tool", "assistant"]
    assert result.answer == "the sum is 5"
    # the token stream is exactly the rendered conversation; the masks split it into its three sources
    assert result.token_ids == tok.render_chat(result.messages)[0]
    injected = [t for t, m in zip(result.token_ids, result.tool_mask) if m]
    assert tok.decode(injected) == "<|tool_result|>5<|end|><|assistant|>"
    assert not any(g and t for g, t in zip(result.generated_mask, result.tool_mask))
    generated = tok.decode([t for t, g in zip(result.token_ids, result.generated_mask) if g])
    assert generated == '<|tool_call|>{"name": "calculator", "arguments": {"expression": "2 + 3"}}<|end|>' \
                        "the sum is 5<|end|>"
    # the second request's prompt starts with the first request's prompt + output: its KV is reused
    first_prompt = len(tok.render_chat(result.messages[:1], add_generation_prompt=True)[0])
    assert engine.stats()["prefix_reused_tokens"] >= first_prompt


def test_round_cap_and_unknown_tools(tool_model):
    engine = Engine.from_checkpoint(str(tool_model), device="cpu")
    conversation = [{"role": "user", "content": "keep going"}]
    capped = run_with_tools(engine, engine.tokenizer, conversation, [calculator_tool()], max_rounds=2)
    assert capped.finish_reason == "max_rounds" and capped.rounds == 2 and len(capped.tool_calls) == 2
    assert capped.messages[-1]["tool_calls"]  # the third call is kept but was not run
    none = run_with_tools(engine, engine.tokenizer, conversation, [calculator_tool()], max_rounds=0)
    assert none.finish_reason == "max_rounds" and none.rounds == 0 and none.tool_calls == []
    unknown = run_with_tools(engine, engine.tokenizer, [{"role": "user", "content": "add two and three"}], [],
                             max_rounds=1)
    assert unknown.tool_calls[0]["result"] == "error: there is no tool 'calculator'; the tools are none"


def test_a_slow_tool_does_not_stall_other_conversations(tool_model):
    engine = Engine.from_checkpoint(str(tool_model), device="cpu")
    timeline: dict[str, float] = {}
    fast = calculator_tool()

    def calculator(arguments):  # "2 + 3" (the add conversation) takes 2 s; the other conversation's calls are fast
        if arguments["expression"] != "2 + 3":
            return fast.function(arguments)
        timeline["tool_start"] = time.perf_counter()
        time.sleep(2.0)
        timeline["tool_done"] = time.perf_counter()
        return "5"

    slow = Tool("calculator", "sometimes slow", fast.parameters, calculator, timeout_s=10)
    output_times: list[float] = []
    original_step = engine.step

    def step():
        outputs = original_step()
        if outputs:
            output_times.append(time.perf_counter())
        return outputs

    engine.step = step
    add, going = run_many_with_tools(engine, engine.tokenizer, [[{"role": "user", "content": "add two and three"}],
                                                                [{"role": "user", "content": "keep going"}]],
                                     [slow], max_rounds=3)
    assert add.answer == "the sum is 5"
    assert going.finish_reason == "max_rounds" and [c["result"] for c in going.tool_calls] == ["2", "2", "2"]
    # while the add conversation waited for its tool, the engine kept producing the other one's tokens
    during = [t for t in output_times if timeline["tool_start"] < t < timeline["tool_done"]]
    assert len(during) >= 10


def test_system_prompt_lists_tools():
    text = tools_system_prompt([calculator_tool()], "lmstack")
    assert '"name": "calculator"' in text and "<|tool_call|>" in text
    assert "<tool_call>" in tools_system_prompt([calculator_tool()], "jinja")
