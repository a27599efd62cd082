"""The Tool interface: schema checks name the bad argument, and a failing, slow or misused tool answers with
an error text instead of raising into the caller; tool specs and `build_tools` specs."""

from __future__ import annotations

import time

import pytest

from lmstack.errors import LmstackError, UserError
from lmstack.tools import build_tools
from lmstack.tools.base import Tool, ToolError, schema_problem

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["text"],
          "properties": {"text": {"type": "string", "maxLength": 5},
                         "times": {"type": "integer", "minimum": 1, "maximum": 3},
                         "mode": {"enum": ["upper", "lower"]},
                         "tags": {"type": "array", "items": {"type": "string"}},
                         "loud": {"type": "boolean"}, "scale": {"type": "number"}}}


@pytest.mark.parametrize("arguments,problem", [
    ({"text": "hi"}, None),
    ({"text": "hi", "times": 2, "mode": "upper", "tags": ["a"], "loud": True, "scale": 1.5}, None),
    ({}, "missing required argument 'text'"),
    ({"text": "toolong"}, "argument 'text' is 7 characters; at most 5 are allowed"),
    ({"text": "a", "times": 0}, "argument 'times' must be >= 1, got 0"),
    ({"text": "a", "times": True}, "argument 'times' must be an integer, got a boolean"),
    ({"text": "a", "times": 1.5}, "argument 'times' must be an integer, got a number"),
    ({"text": "a", "mode": "shout"}, "argument 'mode' must be one of ['upper', 'lower'], got 'shout'"),
    ({"text": "a", "tags": ["x", 3]}, "argument 'tags'[1] must be a string, got an integer"),
    ({"text": "a", "color": "red"}, "unknown argument 'color'; expected text, times, mode, tags, loud, scale"),
    (["text"], "arguments must be an object, got an array"),
])
def test_schema_problems_name_the_argument(arguments, problem):
    assert schema_problem(arguments, SCHEMA, "arguments") == problem


def _tool(function, timeout_s: float = 5.0) -> Tool:
    return Tool("echo", "Repeat a text.", SCHEMA, function, timeout_s=timeout_s, max_result_chars=20)


def test_failures_and_timeouts_come_back_as_text():
    assert _tool(lambda a: a["text"] * a.get("times", 1)).call({"text": "ab", "times": 2}) == "abab"
    assert _tool(lambda a: 1 / 0).call({"text": "a"}) == "error: echo failed: ZeroDivisionError: division by zero"

    def refuse(arguments):
        raise ToolError("echo: nothing to say")
    assert _tool(refuse).call({"text": "a"}) == "error: echo: nothing to say"
    start = time.perf_counter()
    assert _tool(lambda a: time.sleep(3), timeout_s=0.3).call({"text": "a"}) == "error: echo did not finish within 0.3 s"
    assert time.perf_counter() - start < 2
    long = _tool(lambda a: "x" * 50).call({"text": "a"})
    assert long == "x" * 20 + "\n[... 30 more characters cut]"


def test_specs_are_openai_function_tools():
    spec = _tool(str).spec()
    assert spec == {"type": "function", "function": {"name": "echo", "description": "Repeat a text.",
                                                     "parameters": SCHEMA}}


def test_build_tools_reads_the_cli_spec(tmp_path):
    assert [t.name for t in build_tools("calculator, python")] == ["calculator", "python"]
    for bad, message in [("calcu", "unknown tool 'calcu'"), ("search", "unknown tool 'search'"),
                         ("calculator,calculator", "named twice"), (" , ", "no tools named")]:
        with pytest.raises(UserError, match=message):
            build_tools(bad)
    with pytest.raises(LmstackError, match="not an index"):
        build_tools(f"search={tmp_path}")
