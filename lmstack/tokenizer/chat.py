"""Chat rendering: a conversation becomes token ids plus a loss mask that is 1 on what the assistant says.

    ids, loss_mask = tok.render_chat([{"role": "user", "content": "Hi"},
                                      {"role": "assistant", "content": "Hello!"}])   # calls render_chat here

Two chat formats:

- ``"lmstack"``, our own, for every vocabulary we train::

      <|endoftext|><|system|>…<|end|><|user|>…<|end|><|assistant|>…<|tool_call|>{json}<|end|><|tool_result|>…<|end|>

  The loss mask is 1 exactly on assistant content, its tool calls and its closing ``<|end|>``.
  :data:`LMSTACK_CHAT_TEMPLATE` writes the same format as a Jinja template for exported checkpoints
  (``transformers``' ``apply_chat_template`` then renders the same tokens; tool calls are not rendered).
- ``"jinja"``: an imported tokenizer's ``chat_template``, rendered in jinja2's sandbox. Its loss mask comes
  from rendering the conversation incrementally, one message more each time; a template whose prefixes do
  not render to prefixes of the text is refused.

Messages are ``{"role": "system"|"user"|"assistant"|"tool", "content": str}`` (OpenAI text content parts
are accepted); an assistant message may carry OpenAI-style ``tool_calls``. Malformed messages raise
:class:`lmstack.errors.DataError` naming the message.

``tools`` (OpenAI function definitions) reach a Jinja template as its ``tools`` variable, as
``transformers`` passes them; the lmstack format has no slot for them (callers describe the tools in a
system message, lmstack.tools.loop.tools_system_prompt), so it refuses them rather than drop them.

Caveat: a Jinja template sees message text as plain strings, so, as in ``transformers``, special-token text
inside a message is parsed as the special token when the template output is tokenized. The lmstack
format never does that (message text is encoded as plain text).
"""

from __future__ import annotations

import datetime
import json
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

from lmstack.errors import ConfigError, DataError
from lmstack.tokenizer.special import ASSISTANT, END, SYSTEM, TOOL_CALL, TOOL_RESULT, USER

if TYPE_CHECKING:
    from lmstack.tokenizer import Tokenizer

ChatFormat = Literal["lmstack", "jinja"]
CHAT_ROLES = ("system", "user", "assistant", "tool")
_ROLE_HEADER = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT, "tool": TOOL_RESULT}

# The lmstack format as a Jinja chat template (what an exported checkpoint's tokenizer_config.json carries).
# tests/test_tokenizer.py pins it to render_chat token for token.
LMSTACK_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{% elif message['role'] == 'user' %}<|user|>"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{% else %}<|tool_result|>{% endif %}"
    "{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

RenderTemplate = Callable[[list[dict[str, Any]], bool], str]  # (messages, add_generation_prompt) -> text


def render_chat(tok: Tokenizer, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                tools: list[dict[str, Any]] | None = None) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a conversation in ``tok``'s chat format (see the module docstring)."""
    checked = [_check_message(m, i) for i, m in enumerate(_as_list(messages))]
    if tok.chat_format == "jinja":
        return _render_template(tok, checked, add_generation_prompt, tools)
    if tok.chat_format != "lmstack":
        raise ConfigError("this tokenizer has no chat format: it lacks <|user|>/<|assistant|>/<|end|> tokens "
                          "and carries no chat template; use a tokenizer trained by lmstack or one with a "
                          "chat_template")
    if tools:
        raise DataError("the lmstack chat format has no place for tool definitions; describe the tools in a "
                        "system message (lmstack.tools.loop.tools_system_prompt)")
    return _render_lmstack(tok, checked, add_generation_prompt)


def _render_lmstack(tok: Tokenizer, messages: list[dict[str, Any]],
                    add_generation_prompt: bool) -> tuple[list[int], list[int]]:
    special = tok.special_tokens
    ids, mask = [tok.bos_id], [0]
    for message in messages:
        role = message["role"]
        trained = 1 if role == "assistant" else 0
        ids.append(special[_ROLE_HEADER[role]])
        mask.append(0)
        body = tok.encode(message["content"])
        for call in message.get("tool_calls") or ():
            body += [special[TOOL_CALL], *tok.encode(tool_call_json(call))]
        body.append(special[END])
        ids += body
        mask += [trained] * len(body)
    if add_generation_prompt:
        ids.append(special[ASSISTANT])
        mask.append(0)
    return ids, mask


def _render_template(tok: Tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool,
                     tools: list[dict[str, Any]] | None = None) -> tuple[list[int], list[int]]:
    meta = tok.meta
    eos = meta.stop_tokens[0] if meta.stop_tokens else meta.eot_token
    variables = {"bos_token": meta.bos_token or "", "eos_token": eos or ""}
    if tools:
        variables["tools"] = tools
    render = compile_template(tok.chat_template or "", variables)
    full = render(messages, add_generation_prompt)
    spans: list[tuple[int, int]] = []  # character spans of assistant turns in `full`
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], True) if i else ""
        through = render(messages[:i + 1], False)
        if not (full.startswith(through) and through.startswith(before)):
            raise DataError("this chat template does not render conversations incrementally (a prefix of "
                            "the conversation does not render to a prefix of the text), so the loss mask "
                            "cannot be computed; fix chat_template in the tokenizer's files")
        spans.append((len(before), len(through)))
    ids: list[int] = []
    mask: list[int] = []
    cursor = 0
    for start, stop in [*spans, (len(full), len(full))]:
        for piece, trained in ((full[cursor:start], 0), (full[start:stop], 1)):
            if piece:
                piece_ids = tok.encode(piece, allowed_special="all")
                ids += piece_ids
                mask += [trained] * len(piece_ids)
        cursor = stop
    return ids, mask


def compile_template(template: str, variables: dict[str, Any]) -> RenderTemplate:
    """render(messages, add_generation_prompt) -> str for a Jinja chat template, in jinja2's sandbox."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        compiled = env.from_string(template)
    except TemplateError as e:
        raise DataError(f"the chat template does not parse: {e}") from None

    def render(messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        try:
            return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except TemplateError as e:
            raise DataError(f"the chat template rejected the conversation: {e}") from None

    return render


# ----------------------------------------------------------------------------- message checks


def _as_list(messages: Any) -> list:
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Sequence):
        raise DataError("messages must be a list of {'role': ..., 'content': ...} dicts")
    return list(messages)


def _message_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: only text parts carry meaning for a text model
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise DataError(f"{where}: content parts must be {{'type': 'text', 'text': str}}, got {part!r:.80}")
            texts.append(part["text"])
        return "".join(texts)
    raise DataError(f"{where}: content must be a string, got {type(content).__name__}")


def _check_message(message: Any, index: int) -> dict[str, Any]:
    where = f"message {index}"
    if not isinstance(message, dict):
        raise DataError(f"{where} must be a dict with 'role' and 'content', got {type(message).__name__}")
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise DataError(f"{where}: unknown role {role!r}; expected one of {', '.join(CHAT_ROLES)}")
    tool_calls = message.get("tool_calls")
    if tool_calls and role != "assistant":
        raise DataError(f"{where}: only assistant messages may carry tool_calls")
    if "content" not in message and not tool_calls:
        raise DataError(f"{where} ({role}) has no 'content'")
    if message.get("content") is None and not tool_calls:
        raise DataError(f"{where} ({role}): content is None")
    checked = {**message, "content": _message_text(message.get("content"), where)}
    if tool_calls:
        if not isinstance(tool_calls, list):
            raise DataError(f"{where}: tool_calls must be a list")
        for call in tool_calls:
            tool_call_json(call, where)
    return checked


def tool_call_json(call: Any, where: str = "tool call") -> str:
    """One tool call as the JSON the model writes: {"name": ..., "arguments": {...}}."""
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise DataError(f"{where}: a tool call needs a name: {{'function': {{'name', 'arguments'}}}} or "
                        f"{{'name', 'arguments'}}, got {call!r:.80}")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):  # OpenAI sends arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            pass  # keep the string: the model should learn exactly what was sent
    return json.dumps({"name": function["name"], "arguments": arguments}, ensure_ascii=False)
