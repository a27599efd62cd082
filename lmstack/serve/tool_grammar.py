"""The grammar that forces a tool call: ``tool_choice: "required"`` or a named function, enforced while decoding.

    from lmstack.serve.tool_grammar import tool_call_grammar
    grammar = tool_call_grammar(compiler, tokenizer, [("get_weather", schema)], parallel=False)
    SamplingParams(max_tokens=128, constraint=grammar)    # the reply is exactly one schema-valid call

The reply is made of calls only, in the envelope of the model's chat format, each one naming a tool of
the request and carrying arguments valid under that tool's JSON schema:

* lmstack's format: ``<|tool_call|>{"name": NAME, "arguments": {...}}``, one after another; the turn's
  ``<|end|>`` follows because a finished grammar allows only stop tokens;
* an imported (Jinja) template: Hermes tags, ``<tool_call>\\n{"name": NAME, "arguments": {...}}\\n</tool_call>``,
  separated by a newline (a tag that is one special token of the vocabulary is matched as that token).

``parallel=False`` allows exactly one call; otherwise one or more. The grammar is written in llguidance's
Lark dialect: special tokens by id (``<[358]>``), the arguments by an inline JSON schema (``%json``) with
compact whitespace, as the ``response_format`` grammars of lmstack.engine.constraints use.

Each schema is first compiled on its own through :meth:`GrammarCompiler.json_schema`, so a schema the
grammar engine cannot handle is reported as ``tools[i] (NAME) parameters: ...`` rather than as a line
of the combined grammar. Errors are :class:`~lmstack.errors.UserError`; the server turns them into 400s.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from lmstack.engine.constraints import Grammar, GrammarCompiler
from lmstack.errors import UserError
from lmstack.tools.calls import HERMES_CLOSE, HERMES_OPEN
from lmstack.tokenizer.special import TOOL_CALL


def tool_call_grammar(compiler: GrammarCompiler, tokenizer: Any, functions: Sequence[tuple[str, dict[str, Any]]],
                      parallel: bool, where: Sequence[str] | None = None) -> Grammar:
    """A grammar for one (or, with ``parallel``, several) calls of FUNCTIONS: (name, arguments schema) pairs.

    ``where`` names each function in error messages (default ``tools[i] (NAME)``)."""
    if not functions:
        raise UserError("a forced tool call needs at least one tool")
    labels = list(where) if where is not None else [f"tools[{i}] ({name})" for i, (name, _) in enumerate(functions)]
    for (name, schema), label in zip(functions, labels):
        compiler.json_schema(schema, f"{label} parameters")  # the schema alone: errors name the tool
    lmstack_format = getattr(tokenizer, "chat_format", None) == "lmstack"
    if lmstack_format:
        open_tag, close_tag, separator = _token_or_text(tokenizer, TOOL_CALL), "", ""
    else:
        open_tag = _token_or_text(tokenizer, HERMES_OPEN) + ' "\\n"'
        close_tag = '"\\n" ' + _token_or_text(tokenizer, HERMES_CLOSE)
        separator = '"\\n"'
    rules = []
    for i, (name, schema) in enumerate(functions):
        head = json.dumps(f'{{"name": "{name}", "arguments": ')
        rules.append(f"call_{i}: {open_tag} {head} args_{i} \"}}\" {close_tag}".rstrip())
        rules.append(f"args_{i}: %json {json.dumps(_compact(schema), ensure_ascii=False)}")
    calls = " | ".join(f"call_{i}" for i in range(len(functions)))
    start = f"start: call\ncall: {calls}\n"
    if parallel:
        start = f"start: call ({separator} call)*\ncall: {calls}\n" if separator else f"start: call+\ncall: {calls}\n"
    lark = start + "\n".join(rules) + "\n"
    llg = _llguidance()
    try:
        grammar = llg.LLMatcher.grammar_from_lark(lark)
    except ValueError as e:
        raise UserError(f"the tool-call grammar does not compile: {e}") from None
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, compiler.ll_tokenizer)
    if is_error:
        raise UserError(f"the tool-call grammar cannot be enforced: {messages[0]}")
    return Grammar(compiler, grammar)


def _token_or_text(tokenizer: Any, text: str) -> str:
    """A Lark item matching TEXT: the special token by id when the vocabulary has it as one, else the string."""
    token_id = getattr(tokenizer, "special_tokens", {}).get(text)
    return f"<[{token_id}]>" if token_id is not None else json.dumps(text)


def _compact(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with llguidance's option for compact JSON (no free whitespace between tokens)."""
    options = dict(schema.get("x-guidance") or {})
    options.setdefault("whitespace_flexible", False)
    return {**schema, "x-guidance": options}


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as e:  # the same optional dependency as structured output
        raise UserError("enforcing tool calls needs the grammar engine llguidance: pip install llguidance") from e
    return llguidance
