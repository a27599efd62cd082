"""OpenAI response bodies from engine outputs: completions and chat completions, plain and streamed.

``completion_result`` / ``chat_result`` wait for a :class:`~lmstack.serve.generation.Generation` to finish
and build one body; ``completion_stream`` / ``chat_stream`` yield server-sent events as outputs arrive,
with OpenAI's framing: a chat stream opens each choice with a role-only delta, ``include_usage`` adds a
final chunk with empty ``choices``, and the stream ends with ``data: [DONE]``. An error after the
response has begun is reported in-band as an error event followed by ``[DONE]``, as OpenAI does.

Tool calls (tool_protocol.py): a chat reply is read for calls when the request offered tools; a
streamed one sends its content as it comes and its calls at the end, first a delta with the call's
index, id, type and name, then argument fragments.

Choice indices: a completions request with P prompts and ``n`` samples has choices ``p * n + i``.
Logprobs come in two shapes: the legacy completions one (parallel lists with text offsets) and the chat
one (a list of tokens with their bytes and top alternatives). The engine's entries are raw-model
log-probabilities (see lmstack.engine.sampling).
"""

from __future__ import annotations

from typing import AsyncIterator

from lmstack.engine.engine import RequestOutput
from lmstack.serve.generation import Generation
from lmstack.serve.protocol import (APIError, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
                                    ChatCompletionRequest, ChatDelta, ChatMessageOut, ChoiceLogprobs, Completion,
                                    CompletionChoice, CompletionLogprobs, CompletionRequest, FunctionCallDelta,
                                    TokenLogprob, ToolCallDelta, TopLogprob, Usage, now)
from lmstack.serve.state import ServerState
from lmstack.serve.tool_protocol import ToolPlan, ToolStream, argument_fragments, read_reply
from lmstack.serve.transport import sse
from lmstack.tokenizer import Tokenizer

async def _collect(gen: Generation, n_prompts: int) -> list[RequestOutput]:
    """Final RequestOutput per prompt (outputs are cumulative, so the last one holds everything)."""
    await gen.start()
    last: list[RequestOutput | None] = [None] * n_prompts
    async for index, out in gen.events():
        last[index] = out
    return last


async def completion_result(state: ServerState, req: CompletionRequest, gen: Generation,
                             prompts: list[list[int]]) -> Completion:
    tok = state.tokenizer
    finals = await _collect(gen, len(prompts))
    choices, completion_tokens = [], 0
    for p_index, out in enumerate(finals):
        prompt_text = tok.decode(prompts[p_index]) if req.echo else ""
        for c in out.outputs:
            completion_tokens += len(c.token_ids)
            logprobs = None
            if req.logprobs is not None:
                entries, ids = list(c.logprobs or []), list(c.token_ids[:len(c.logprobs or [])])
                if req.echo:
                    entries = list(out.prompt_logprobs or [None] * len(prompts[p_index])) + entries
                    ids = list(prompts[p_index]) + ids
                logprobs = _completion_logprobs(tok, entries, ids, 0)
            choices.append(CompletionChoice(index=p_index * req.n + c.index, text=prompt_text + c.text,
                                            logprobs=logprobs, finish_reason=c.finish_reason))
    prompt_tokens = sum(len(p) for p in prompts)
    return Completion(id=gen.request_id, model=req.model, choices=choices,
                      usage=Usage.of(prompt_tokens, completion_tokens))


async def completion_stream(state: ServerState, req: CompletionRequest, gen: Generation,
                             prompts: list[list[int]]) -> AsyncIterator[str]:
    tok = state.tokenizer
    created, completion_tokens = now(), 0
    echoed: set[int] = set()
    finished: set[int] = set()
    text_len: dict[int, int] = {}
    base = {"id": gen.request_id, "object": "text_completion", "created": created, "model": req.model}
    try:
        async for p_index, out in gen.events():
            for c in out.outputs:
                index = p_index * req.n + c.index
                if index in finished:  # finished samples of an n > 1 request are repeated in later outputs
                    continue
                if c.finish_reason is not None:
                    finished.add(index)
                text = c.new_text
                logprobs = None
                new_ids = list(c.new_token_ids)
                entries: list[dict | None] = list((c.logprobs or [])[len(c.token_ids) - len(new_ids):]) \
                    if req.logprobs is not None else []
                if req.echo and index not in echoed:
                    echoed.add(index)
                    text = tok.decode(prompts[p_index]) + text
                    if req.logprobs is not None:
                        entries = list(out.prompt_logprobs or [None] * len(prompts[p_index])) + entries
                        new_ids = list(prompts[p_index]) + new_ids
                completion_tokens += len(c.new_token_ids)
                if req.logprobs is not None:
                    logprobs = _completion_logprobs(tok, entries, new_ids[:len(entries)], text_len.get(index, 0))
                text_len[index] = text_len.get(index, 0) + len(text)
                if not text and c.finish_reason is None and not new_ids:
                    continue
                choice = CompletionChoice(index=index, text=text, logprobs=logprobs,
                                          finish_reason=c.finish_reason)
                chunk = {**base, "choices": [choice.model_dump()]}
                if req.include_usage():
                    chunk["usage"] = None
                yield sse(chunk)
        if req.include_usage():
            prompt_tokens = sum(len(p) for p in prompts)
            yield sse({**base, "choices": [], "usage": Usage.of(prompt_tokens, completion_tokens).model_dump()})
        yield sse("[DONE]")
    except APIError as err:  # the response has begun: report in-band, as OpenAI does
        yield sse(err.body())
        yield sse("[DONE]")


async def chat_result(state: ServerState, req: ChatCompletionRequest, gen: Generation,
                       prompt_tokens: int, plan: ToolPlan) -> ChatCompletion:
    (out,) = await _collect(gen, 1)
    choices, completion_tokens = [], 0
    for c in out.outputs:
        completion_tokens += len(c.token_ids)
        logprobs = _chat_logprobs(state.tokenizer, list(c.logprobs or [])) if req.logprobs else None
        reply = read_reply(c.text, c.finish_reason, plan)
        state.counters["malformed_tool_calls"] += reply.malformed
        message = ChatMessageOut(content=reply.content, tool_calls=reply.tool_calls)
        choices.append(ChatChoice(index=c.index, message=message, logprobs=logprobs,
                                  finish_reason=reply.finish_reason))
    return ChatCompletion(id=gen.request_id, model=req.model, choices=choices,
                          usage=Usage.of(prompt_tokens, completion_tokens))


async def chat_stream(state: ServerState, req: ChatCompletionRequest, gen: Generation,
                       prompt_tokens: int, plan: ToolPlan) -> AsyncIterator[str]:
    created, completion_tokens = now(), 0
    include_usage = req.include_usage()

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        body = ChatCompletionChunk(id=gen.request_id, created=created, model=req.model, choices=choices,
                                   usage=usage).model_dump(exclude=None if include_usage else {"usage"})
        for choice in body["choices"]:  # tool-call fields only where they carry something, as OpenAI's deltas
            calls = choice["delta"].pop("tool_calls")
            if calls is not None:
                choice["delta"]["tool_calls"] = [
                    {**{k: v for k, v in call.items() if v is not None and k != "function"},
                     "function": {k: v for k, v in call["function"].items() if v is not None}} for call in calls]
        return sse(body)

    started: set[int] = set()
    finished: set[int] = set()
    streams: dict[int, ToolStream] = {}
    try:
        async for _, out in gen.events():
            for c in out.outputs:
                if c.index in finished:  # finished samples of an n > 1 request are repeated in later outputs
                    continue
                if c.finish_reason is not None:
                    finished.add(c.index)
                if c.index not in started:
                    started.add(c.index)
                    streams[c.index] = ToolStream(plan)
                    yield chunk([ChatChunkChoice(index=c.index, delta=ChatDelta(role="assistant", content=""))])
                completion_tokens += len(c.new_token_ids)
                if not c.new_text and c.finish_reason is None:
                    continue
                logprobs = None
                if req.logprobs and c.new_token_ids:
                    fresh = list((c.logprobs or [])[len(c.token_ids) - len(c.new_token_ids):])
                    logprobs = _chat_logprobs(state.tokenizer, fresh)
                text = streams[c.index].feed(c.new_text)
                if c.finish_reason is None:
                    if text or logprobs is not None:
                        yield chunk([ChatChunkChoice(index=c.index, delta=ChatDelta(content=text or None),
                                                     logprobs=logprobs)])
                    continue
                rest, reply = streams[c.index].finish(c.finish_reason)
                state.counters["malformed_tool_calls"] += reply.malformed
                text += rest
                if not reply.tool_calls:  # the last piece and the finish reason in one chunk
                    yield chunk([ChatChunkChoice(index=c.index, delta=ChatDelta(content=text or None),
                                                 logprobs=logprobs, finish_reason=reply.finish_reason)])
                    continue
                if text or logprobs is not None:
                    yield chunk([ChatChunkChoice(index=c.index, delta=ChatDelta(content=text or None),
                                                 logprobs=logprobs)])
                for k, call in enumerate(reply.tool_calls or []):
                    head = ToolCallDelta(index=k, id=call.id, type="function",
                                         function=FunctionCallDelta(name=call.function.name, arguments=""))
                    yield chunk([ChatChunkChoice(index=c.index, delta=ChatDelta(tool_calls=[head]))])
                    for piece in argument_fragments(state.tokenizer, call.function.arguments):
                        part = ToolCallDelta(index=k, function=FunctionCallDelta(arguments=piece))
                        yield chunk([ChatChunkChoice(index=c.index, delta=ChatDelta(tool_calls=[part]))])
                yield chunk([ChatChunkChoice(index=c.index, delta=ChatDelta(), finish_reason=reply.finish_reason)])
        if include_usage:
            yield chunk([], Usage.of(prompt_tokens, completion_tokens))
        yield sse("[DONE]")
    except APIError as err:
        yield sse(err.body())
        yield sse("[DONE]")


# ----------------------------------------------------------------------------- logprobs

def _token_strings(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([t]) for t in ids]


def _chat_logprobs(tokenizer: Tokenizer, entries: list[dict]) -> ChoiceLogprobs:
    def top(token_id: int, logprob: float) -> TopLogprob:
        return TopLogprob(token=tokenizer.decode([token_id]), logprob=logprob,
                          bytes=list(tokenizer.decode_bytes([token_id])))

    return ChoiceLogprobs(content=[
        TokenLogprob(**top(e["token_id"], e["logprob"]).model_dump(),
                     top_logprobs=[top(t["token_id"], t["logprob"]) for t in e.get("top", [])])
        for e in entries])


def _completion_logprobs(tokenizer: Tokenizer, entries: list[dict | None], token_ids: list[int],
                         start_offset: int) -> CompletionLogprobs:
    """Legacy format; ``entries[i]`` is None where no logprob exists (the first prompt token)."""
    tokens = _token_strings(tokenizer, token_ids)
    offsets, offset = [], start_offset
    for s in tokens:
        offsets.append(offset)
        offset += len(s)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[None if e is None else e["logprob"] for e in entries],
        top_logprobs=[None if e is None else {tokenizer.decode([t["token_id"]]): t["logprob"] for t in e.get("top", [])}
                      for e in entries],
        text_offset=offsets)
