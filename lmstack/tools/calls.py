"""Tool calls in model output: lmstack's ``<|tool_call|>{json}`` and Hermes ``<tool_call>{json}</tool_call>``.

    from lmstack.tools.calls import parse_tool_calls
    content, calls = parse_tool_calls('Let me check.<|tool_call|>{"name": "calculator", '
                                      '"arguments": {"expression": "2+2"}}')
    content == "Let me check."; calls[0].name == "calculator"; calls[0].arguments == {"expression": "2+2"}

Two spellings, one result:

* lmstack's chat format (lmstack/tokenizer/chat.py) writes each call as ``<|tool_call|>`` followed by the
  JSON ``{"name": ..., "arguments": {...}}`` inside the assistant turn, which ``<|end|>`` closes.
* Imported chat templates in the Hermes / Qwen style wrap the same JSON in ``<tool_call>...</tool_call>``
  tags; a last call whose closing tag never came (the turn ended first) is still read.

The content is the text before the first call, stripped; :func:`first_call_start` says where that
is, for callers that keep the text as the model wrote it (the server streams it before the calls arrive). A call whose JSON does not parse, or that lacks a
string ``name``, comes back with ``error`` set rather than dropped, so the loop can tell the model what was
wrong with it. ``arguments`` may be a JSON object or a string holding one (OpenAI's wire form).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from lmstack.tokenizer.special import END, TOOL_CALL

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
_HERMES = re.compile(re.escape(HERMES_OPEN) + r"(.*?)(?:" + re.escape(HERMES_CLOSE) + r"|\Z)", re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: Any = field(default_factory=dict)
    error: str | None = None   # why the call could not be read (then name may be "")
    raw: str = ""              # the JSON text as the model wrote it

    def as_message_call(self, call_id: str) -> dict[str, Any]:
        """The call as an OpenAI-style ``tool_calls`` entry of an assistant message."""
        return {"id": call_id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(content before the first call, the calls in order) of one assistant turn's text."""
    if TOOL_CALL in text:
        content, *pieces = text.split(TOOL_CALL)
        return content.strip(), [_read_call(piece.split(END, 1)[0]) for piece in pieces]
    matches = list(_HERMES.finditer(text))
    if matches:
        return text[:matches[0].start()].strip(), [_read_call(m.group(1)) for m in matches]
    return text.strip(), []


def _read_call(raw: str) -> ToolCall:
    raw = raw.strip()
    try:
        payload = json.loads(raw)
    except json.JSONDecodeError as e:
        return ToolCall("", error=f"the tool call is not valid JSON ({e.msg} at character {e.pos})", raw=raw)
    if isinstance(payload, dict) and isinstance(payload.get("function"), dict):
        payload = payload["function"]  # an OpenAI-shaped call written out in full
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        return ToolCall("", error='a tool call must be {"name": ..., "arguments": {...}}', raw=raw)
    return ToolCall(payload["name"], payload.get("arguments", {}), raw=raw)


CALL_MARKERS = (TOOL_CALL, HERMES_OPEN)  # what opens a call in either spelling


def first_call_start(text: str) -> int | None:
    """Where the first call of TEXT begins (the character index of its marker), or None without calls.

    The same split :func:`parse_tool_calls` makes: lmstack's marker wins when both spellings occur."""
    if TOOL_CALL in text:
        return text.index(TOOL_CALL)
    match = _HERMES.search(text)
    return match.start() if match else None
