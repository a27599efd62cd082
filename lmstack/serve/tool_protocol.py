"""OpenAI's tool protocol on the chat route: offering tools, forcing a call, reading calls back, streaming them.

    plan = tool_plan(req)                                       # tool_choice against tools (400s)
    messages, template_tools = chat_messages(req, plan, tokenizer)   # tool turns checked and rendered
    constraint = plan.forced and tool_constraint(compiler, tokenizer, plan)
    reply = read_reply(text, finish_reason, plan)                # content, tool_calls, finish_reason

What each ``tool_choice`` does:

* ``"none"`` (or no tools): the tools are not shown to the model and its output is never read for calls.
* ``"auto"`` (the default with tools): the tools are shown and the model decides. A reply that holds a
  call (lmstack's ``<|tool_call|>{json}``, or Hermes ``<tool_call>`` tags; lmstack.tools.calls) ending the
  turn becomes ``tool_calls`` with ``finish_reason: "tool_calls"``. A call that does not read (bad JSON,
  no name, a tool the request did not offer, arguments that are not an object) turns the whole reply
  into plain content, as the model wrote it, and is counted (``malformed_tool_calls`` in /health): a
  half-right set of calls is not something a client can act on.
* ``"required"`` / ``{"type": "function", "function": {"name": ...}}``: the call is forced by
  grammar-constrained decoding (tool_grammar.py): the reply is one call (``parallel_tool_calls: false``)
  or one or more, of any offered tool or of the named one, with arguments valid under its schema. Even a
  random model answers a parseable, schema-valid call; only ``max_tokens`` can cut one short (then the
  text comes back as content with ``finish_reason: "length"``).

How tools are shown: a Jinja chat template that mentions ``tools`` gets them as its ``tools`` variable
(as ``transformers`` passes them); otherwise, and always in lmstack's own format, a system message lists
them in the words of lmstack.tools.loop.tools_system_prompt (so a model tuned on those conversations
sees the same prompt), appended to the request's own system message when there is one.

Conversations carry calls back: assistant messages with ``tool_calls`` and ``tool`` messages whose
``tool_call_id`` names one of them (anything else is a 400 naming the id); the tool turn is rendered as
the chat format's tool turn, with the function's name for templates that show it.

Content and streaming. With calls, ``content`` is the text before the first call with trailing
whitespace removed (None when empty); without calls it is the text as generated. :class:`ToolStream`
streams that content as it arrives, holding back only trailing whitespace and a possible start of a
call marker, and sends the calls when the reply ends: a call is only known to be well formed (and the
reply to have calls at all) at the end of the turn, so argument fragments arrive together at the end,
not as they are decoded. They are the tokenizer's pieces of the final arguments string, so they
concatenate to exactly the non-streamed ``arguments``.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from lmstack.engine.constraints import Grammar, GrammarCompiler
from lmstack.serve.protocol import (APIError, ChatCompletionRequest, FunctionCallOut, ToolCallOut,
                                    ToolDefinition)
from lmstack.serve.tool_grammar import tool_call_grammar
from lmstack.tools.base import Tool
from lmstack.tools.calls import CALL_MARKERS, first_call_start, parse_tool_calls
from lmstack.tools.loop import tools_system_prompt


@dataclass
class ToolPlan:
    """What a request's tools, tool_choice and parallel_tool_calls amount to."""

    tools: list[ToolDefinition] = field(default_factory=list)  # offered to the model (empty: none)
    forced_name: str | None = None  # a named tool_choice
    required: bool = False  # "required" or a named function: enforced by the grammar
    parallel: bool = True

    @property
    def offered(self) -> bool:
        return bool(self.tools)

    @property
    def names(self) -> set[str]:
        return {t.function.name for t in self.tools}


def tool_plan(req: ChatCompletionRequest) -> ToolPlan:
    """The request's tool settings, checked against each other (400 naming the field)."""
    choice = req.tool_choice
    tools = list(req.tools or [])
    if choice is not None and choice != "none" and not tools:
        shown = choice if isinstance(choice, str) else f"function {choice.function.name!r}"
        raise APIError(400, f"tool_choice {shown!r} needs tools; send the functions in 'tools' or drop "
                            "tool_choice.", param="tool_choice", code="invalid_value")
    if choice == "none" or not tools:
        return ToolPlan()
    if req.response_format is not None and req.response_format.type != "text":
        raise APIError(400, "response_format and tools cannot be combined here: a reply is either JSON content or "
                            "tool calls. Send tool_choice 'none' with response_format, or drop response_format.",
                       param="response_format", code="invalid_value")
    plan = ToolPlan(tools=tools, parallel=req.parallel_tool_calls is not False)
    if choice == "required":
        plan.required = True
    elif choice is not None and choice != "auto":
        name = choice.function.name
        if name not in plan.names:
            raise APIError(400, f"tool_choice names the function {name!r}, which is not among the tools "
                                f"({', '.join(sorted(plan.names))}).", param="tool_choice", code="invalid_value")
        plan.required, plan.forced_name = True, name
    return plan


# ----------------------------------------------------------------------------- the prompt


def chat_messages(req: ChatCompletionRequest, plan: ToolPlan, tokenizer: Any
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages for render_chat, tools for a Jinja template or None); 400 for a tool turn with an unknown id."""
    messages: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}  # tool_call_id -> function name, from earlier assistant turns
    for i, m in enumerate(req.messages):
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.role == "assistant" and m.tool_calls:
            message["tool_calls"] = []
            for call in m.tool_calls:
                call_names[call.id] = call.function.name
                message["tool_calls"].append({"id": call.id, "type": "function", "function": {
                    "name": call.function.name, "arguments": _arguments_value(call.function.arguments)}})
        elif m.tool_calls:
            raise APIError(400, f"messages[{i}] ({m.role}) carries tool_calls; only assistant messages may.",
                           param=f"messages[{i}].tool_calls", code="invalid_value")
        if m.role == "tool":
            if not m.tool_call_id:
                raise APIError(400, f"messages[{i}] is a tool result without tool_call_id; give the id of the "
                                    "assistant tool call it answers.", param=f"messages[{i}].tool_call_id",
                               code="missing_required_parameter")
            if m.tool_call_id not in call_names:
                known = ", ".join(repr(k) for k in call_names) or "none"
                raise APIError(400, f"messages[{i}].tool_call_id {m.tool_call_id!r} matches no tool call of an "
                                    f"earlier assistant message (known ids: {known}).",
                               param=f"messages[{i}].tool_call_id", code="invalid_value")
            message["tool_call_id"] = m.tool_call_id
            message["name"] = call_names[m.tool_call_id]
        messages.append(message)
    if not plan.offered:
        return messages, None
    specs = [t.model_dump(exclude_none=True) for t in plan.tools]
    template = getattr(tokenizer, "chat_template", None) or ""
    if getattr(tokenizer, "chat_format", None) == "jinja" and "tools" in template:
        return messages, specs
    text = tools_system_prompt([_described(t) for t in plan.tools], getattr(tokenizer, "chat_format", None))
    if messages and messages[0]["role"] == "system":
        messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}
    else:
        messages.insert(0, {"role": "system", "content": text})
    return messages, None


def _arguments_value(arguments: str) -> Any:
    """Arguments as a chat template shows them: the parsed object, or the string when it does not parse."""
    try:
        return json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return arguments


def _described(tool: ToolDefinition) -> Tool:
    """A request's function as a Tool for the prompt text only (the server never runs a client's function)."""
    function = tool.function

    def not_run(arguments: dict[str, Any]) -> str:
        raise RuntimeError(f"{function.name} is the client's function; the client runs it")

    return Tool(function.name, function.description or "", function.schema(), not_run)


def tool_constraint(compiler: GrammarCompiler, tokenizer: Any, plan: ToolPlan) -> Grammar:
    """The grammar of a forced call (tool_grammar.py); UserError naming the tool whose schema cannot compile."""
    chosen = [(i, t) for i, t in enumerate(plan.tools) if plan.forced_name in (None, t.function.name)]
    return tool_call_grammar(compiler, tokenizer, [(t.function.name, t.function.schema()) for _, t in chosen],
                             parallel=plan.parallel and plan.forced_name is None,
                             where=[f"tools[{i}] ({t.function.name})" for i, t in chosen])


# ----------------------------------------------------------------------------- reading replies


@dataclass
class Reply:
    content: str | None
    tool_calls: list[ToolCallOut] | None
    finish_reason: str | None
    malformed: bool = False  # a call was attempted but did not read: the reply is plain content


def read_reply(text: str, finish_reason: str | None, plan: ToolPlan) -> Reply:
    """A finished reply as OpenAI answers it (see the module docstring for the rules)."""
    start = first_call_start(text) if plan.offered else None
    if start is None or finish_reason != "stop":  # no call, or one cut short by max_tokens / the context
        return Reply(text, None, finish_reason)
    _, calls = parse_tool_calls(text)
    out: list[ToolCallOut] = []
    for call in calls:
        arguments = call.arguments
        if isinstance(arguments, str):
            arguments = _arguments_value(arguments)
        if call.error is not None or call.name not in plan.names or not isinstance(arguments, dict):
            return Reply(text, None, finish_reason, malformed=True)
        out.append(ToolCallOut(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCallOut(
            name=call.name, arguments=json.dumps(arguments, ensure_ascii=False))))
    return Reply(text[:start].rstrip() or None, out, "tool_calls")


class ToolStream:
    """One streamed choice: the content to send now for each piece of text, and the reply at the end."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.text = ""
        self.sent = 0  # characters of text already sent as content
        self.in_call = False

    def feed(self, piece: str) -> str:
        """Content to send for the newly generated PIECE (may be empty while a possible call is held back)."""
        self.text += piece
        if not self.plan.offered:
            upto = len(self.text)
        elif self.in_call:
            return ""
        else:
            start = first_call_start(self.text)
            if start is not None:
                self.in_call = True
                upto = len(self.text[:start].rstrip())
            else:
                upto = len(self.text[:_marker_free_end(self.text)].rstrip())
        out, self.sent = self.text[self.sent:upto], max(self.sent, upto)
        return out

    def finish(self, finish_reason: str | None) -> tuple[str, Reply]:
        """(content still to send, the reply) once the choice has ended."""
        reply = read_reply(self.text, finish_reason, self.plan)
        rest = "" if reply.tool_calls else self.text[self.sent:]
        self.sent = len(self.text)
        return rest, reply


def _marker_free_end(text: str) -> int:
    """TEXT's length minus a tail that could be the start of a call marker still arriving."""
    end = len(text)
    for marker in CALL_MARKERS:
        for k in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:k]):
                end = min(end, len(text) - k)
                break
    return end


def argument_fragments(tokenizer: Any, arguments: str) -> list[str]:
    """ARGUMENTS cut where the tokenizer cuts it (how a model streams it); pieces join back exactly."""
    pieces = [tokenizer.decode([t]) for t in tokenizer.encode(arguments)]
    if "".join(pieces) != arguments:  # a character split across tokens: cut by characters instead
        pieces = [arguments[i:i + 8] for i in range(0, len(arguments), 8)]
    return [p for p in pieces if p]
