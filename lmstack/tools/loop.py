"""The tool-use loop: generate, run the tools a reply calls, inject their results, generate again.

    from lmstack.tools import build_tools
    from lmstack.tools.loop import run_with_tools, run_many_with_tools
    tools = build_tools("calculator,python")
    result = run_with_tools(engine, engine.tokenizer, [{"role": "user", "content": "What is 4821 * 9377?"}],
                            tools, max_rounds=4)
    result.messages[-1]["content"]; result.rounds
    results = run_many_with_tools(engine, engine.tokenizer, conversations, tools)   # one batch, many chats

How it runs. Every conversation is its own request stream on :class:`lmstack.engine.async_engine.AsyncEngine`
(a plain :class:`~lmstack.engine.engine.Engine` is wrapped in one for the call), so the engine keeps
decoding every other conversation of the batch while one waits for a tool. When a reply ends (its stop
token) after writing tool calls (:mod:`lmstack.tools.calls`), the calls run on a thread pool, never on the
engine's thread or the event loop; their results become ``tool`` turns; and the conversation continues as a
*new request* whose prompt is the whole conversation so far: the earlier prompt, the tokens the model
generated, then the injected tool turns and the next assistant header. Because the new prompt starts with
exactly the tokens the engine just computed, the engine's prefix reuse (a freed slot keeps its KV; see
engine.py) skips recomputing them, so a tool round costs the injected tokens, not the conversation.

The injected tokens are what the chat template adds between the assistant turn that called and the next
assistant header, found by rendering the conversation with and without the tool turns; if a template does
not render those incrementally, the conversation is re-rendered in full instead (no token is then the
model's own). :class:`ToolConversation` returns the token ids with two masks: ``generated_mask`` (1 on
tokens the model sampled) and ``tool_mask`` (1 on injected tool-result tokens), so a trainer can learn
from the conversation without learning to predict tool output.

A conversation stops when a reply makes no tool call, when ``max_rounds`` tool rounds have run and the
model asks for another (finish_reason ``max_rounds``; that last call is kept in the message but not run), or when the context is
full (``length``). A tool that fails, times out or is unknown answers ``error: ...`` as its result
(:class:`lmstack.tools.base.Tool`); the loop never raises for what a tool or the model did.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

from lmstack.engine.async_engine import AsyncEngine
from lmstack.engine.sampling import SamplingParams
from lmstack.errors import UserError
from lmstack.tools.base import ERROR_PREFIX, Tool
from lmstack.tools.calls import HERMES_CLOSE, HERMES_OPEN, ToolCall, parse_tool_calls
from lmstack.tokenizer.special import TOOL_CALL

Messages = list[dict[str, Any]]


@dataclass
class ToolConversation:
    messages: Messages             # the conversation, with assistant tool_calls and tool turns
    token_ids: list[int]           # everything the model read or wrote, in order
    generated_mask: list[int]      # 1 on tokens the model sampled
    tool_mask: list[int]           # 1 on injected tool-result tokens (mask these out of training)
    rounds: int                    # tool rounds that ran
    finish_reason: str             # stop | length | max_rounds | abort | error
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # {"name", "arguments", "result"} in order

    @property
    def answer(self) -> str:
        """The text of the last assistant message."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "assistant"), "")


def tools_system_prompt(tools: Sequence[Tool], chat_format: str | None) -> str:
    """A system message that lists the tools (OpenAI specs) and says how to call one in this chat format."""
    specs = "\n".join(json.dumps(tool.spec()["function"], ensure_ascii=False) for tool in tools)
    if chat_format == "lmstack":
        how = f'To call a tool, write {TOOL_CALL}{{"name": NAME, "arguments": {{...}}}} and end your turn.'
    else:
        how = (f'To call a tool, write {HERMES_OPEN}{{"name": NAME, "arguments": {{...}}}}{HERMES_CLOSE} and end '
               "your turn.")
    return f"You can use these tools:\n{specs}\n{how} The result comes back in the next turn."


def run_with_tools(engine: Any, tokenizer: Any, messages: Messages, tools: Sequence[Tool], max_rounds: int = 4,
                   params: SamplingParams | None = None, max_workers: int = 4) -> ToolConversation:
    """One conversation through the tool loop (see the module docstring)."""
    return run_many_with_tools(engine, tokenizer, [messages], tools, max_rounds, params, max_workers)[0]


def run_many_with_tools(engine: Any, tokenizer: Any, conversations: Sequence[Messages], tools: Sequence[Tool],
                        max_rounds: int = 4, params: SamplingParams | None = None,
                        max_workers: int = 4) -> list[ToolConversation]:
    """Many conversations at once on ENGINE (an Engine or an AsyncEngine); results in input order."""
    if max_rounds < 0:
        raise UserError(f"max_rounds={max_rounds} must be >= 0")
    owned = not isinstance(engine, AsyncEngine)
    async_engine = AsyncEngine(engine, max_waiting=max(256, len(conversations))) if owned else engine
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="lmstack-tools")
    try:
        async def run_all() -> list[ToolConversation]:
            return await asyncio.gather(*(converse(async_engine, tokenizer, list(m), tools, max_rounds,
                                                   params or SamplingParams(max_tokens=256, temperature=0), pool)
                                          for m in conversations))
        return asyncio.run(run_all())
    finally:
        pool.shutdown(wait=False)
        if owned:
            async_engine.shutdown()


async def converse(engine: AsyncEngine, tokenizer: Any, messages: Messages, tools: Sequence[Tool], max_rounds: int,
                   params: SamplingParams, pool: concurrent.futures.Executor) -> ToolConversation:
    """One conversation's tool loop on an AsyncEngine (a coroutine, so a server can await it)."""
    by_name = {tool.name: tool for tool in tools}
    context = engine.engine.max_model_len
    stop_ids = set(tokenizer.stop_token_ids) | {tokenizer.eot_id}
    ids, _ = tokenizer.render_chat(messages, add_generation_prompt=True)
    generated, injected = [0] * len(ids), [0] * len(ids)
    result = ToolConversation(messages, ids, generated, injected, 0, "stop")
    while True:
        budget = min(params.max_tokens, context - len(ids))
        if budget < 1:
            result.finish_reason = "length"
            return result
        round_params = dataclasses.replace(params, max_tokens=budget, n=1,
                                           stop_token_ids=sorted(set(params.stop_token_ids) | stop_ids))
        final = None
        async for out in engine.generate(ids, round_params):
            final = out
        completion = final.outputs[0]
        new = list(completion.token_ids)
        ids += new
        generated += [1] * len(new)
        injected += [0] * len(new)
        body = new[:-1] if new and new[-1] in stop_ids else new
        text = tokenizer.decode(body)
        content, calls = parse_tool_calls(text)
        if completion.finish_reason != "stop" or not calls:
            messages.append({"role": "assistant", "content": text.strip()})
            result.finish_reason = completion.finish_reason or "stop"
            return result
        if result.rounds >= max_rounds:  # the calls stay in the message, unanswered: they were not run
            messages.append({"role": "assistant", "content": content,
                             "tool_calls": [_message_call(call, f"call_{result.rounds}_{i}")
                                            for i, call in enumerate(calls)]})
            result.finish_reason = "max_rounds"
            return result
        loop = asyncio.get_running_loop()
        outputs = await asyncio.gather(*(loop.run_in_executor(pool, _run_call, call, by_name) for call in calls))
        round_id = result.rounds
        assistant = {"role": "assistant", "content": content,
                     "tool_calls": [_message_call(call, f"call_{round_id}_{i}") for i, call in enumerate(calls)]}
        tool_turns = [{"role": "tool", "tool_call_id": f"call_{round_id}_{i}", "name": call.name or "unknown",
                       "content": output} for i, (call, output) in enumerate(zip(calls, outputs))]
        result.tool_calls += [{"name": call.name, "arguments": call.arguments, "result": output}
                              for call, output in zip(calls, outputs)]
        ids, generated, injected = _inject(tokenizer, messages, assistant, tool_turns, ids, generated, injected)
        messages += [assistant, *tool_turns]
        result.token_ids, result.generated_mask, result.tool_mask = ids, generated, injected
        result.rounds += 1


def _message_call(call: ToolCall, call_id: str) -> dict[str, Any]:
    if call.error is None:
        return call.as_message_call(call_id)
    return {"id": call_id, "type": "function", "function": {"name": call.name or "unknown", "arguments": call.raw}}


def _run_call(call: ToolCall, tools: dict[str, Tool]) -> str:
    if call.error is not None:
        return f"{ERROR_PREFIX}{call.error}"
    tool = tools.get(call.name)
    if tool is None:
        return f"{ERROR_PREFIX}there is no tool {call.name!r}; the tools are {', '.join(tools) or 'none'}"
    return tool.call(call.arguments)


def _inject(tokenizer: Any, messages: Messages, assistant: dict[str, Any], tool_turns: Messages, ids: list[int],
            generated: list[int], injected: list[int]) -> tuple[list[int], list[int], list[int]]:
    """The running ids continued by the tool turns and the next assistant header, with both masks."""
    before, _ = tokenizer.render_chat([*messages, assistant], add_generation_prompt=False)
    after, _ = tokenizer.render_chat([*messages, assistant, *tool_turns], add_generation_prompt=True)
    if after[:len(before)] == before:  # the template renders incrementally: keep the model's own tokens
        added = after[len(before):]
        return ids + added, generated + [0] * len(added), injected + [1] * len(added)
    shared = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after)))
    return list(after), [0] * len(after), [0] * shared + [1] * (len(after) - shared)
