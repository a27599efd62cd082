"""The one tool interface: a name, a description, a JSON schema for the arguments, a call, a timeout.

    from lmstack.tools.base import Tool
    tool = Tool("echo", "Repeat a text.", {"type": "object", "properties": {"text": {"type": "string"}},
                                           "required": ["text"]}, lambda args: args["text"], timeout_s=2)
    tool.call({"text": "hi"})        # -> "hi"
    tool.call({"txt": "hi"})         # -> "error: echo: missing required argument 'text'"

``Tool.call`` never raises into its caller: arguments that do not fit the schema, an exception inside the
tool and a call that outlives ``timeout_s`` all come back as one line of text starting with ``error:``,
which the generation loop hands to the model as the tool's result (so a model can read its mistake and
retry, as with OpenAI's function calling). ``Tool.spec()`` is the tool in OpenAI's ``tools`` wire format.

The schema check covers the subset of JSON Schema that tool definitions use (``type`` object / string /
integer / number / boolean / array, ``properties``, ``required``, ``additionalProperties: false``,
``enum``, ``minimum`` / ``maximum``, ``maxLength``, array ``items``); the ``jsonschema`` package is not a
dependency of lmstack, and this subset is what OpenAI's strict function schemas allow anyway.

Caveat on timeouts: a tool runs on a worker thread and the caller stops waiting after ``timeout_s``; a
Python thread cannot be killed, so a tool must bound its own work (the calculator limits number sizes,
the python tool runs in a subprocess that the sandbox kills). The timeout protects the conversation, not
the CPU.
"""

from __future__ import annotations

import concurrent.futures
import json
from dataclasses import dataclass, field
from typing import Any, Callable

ERROR_PREFIX = "error: "
MAX_RESULT_CHARS = 4000  # what a tool result may put into the context; longer results are cut with a note

_JSON_TYPES: dict[str, tuple[type, ...]] = {"object": (dict,), "string": (str,), "integer": (int,),
                                            "number": (int, float), "boolean": (bool,), "array": (list,)}

# Tool calls wait on their own small pool so that a stuck tool never blocks a caller's other work.
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="lmstack-tool")


class ToolError(Exception):
    """A tool's own report of a failure; its message becomes the tool result after ``error: ``."""


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]                 # JSON schema of the arguments object
    function: Callable[[dict[str, Any]], str]  # validated arguments -> result text
    timeout_s: float = 10.0
    max_result_chars: int = MAX_RESULT_CHARS
    metadata: dict[str, Any] = field(default_factory=dict)

    def spec(self) -> dict[str, Any]:
        """The tool in OpenAI's ``tools`` format: ``{"type": "function", "function": {...}}``."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    def call(self, arguments: Any) -> str:
        """The tool's result text, or ``error: ...`` for bad arguments, a failure or a timeout (never raises)."""
        if isinstance(arguments, str):  # OpenAI sends arguments as a JSON string
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                return f"{ERROR_PREFIX}{self.name}: the arguments are not valid JSON ({e.msg})"
        problem = schema_problem(arguments, self.parameters, "arguments")
        if problem is not None:
            return f"{ERROR_PREFIX}{self.name}: {problem}"
        future = _POOL.submit(self.function, arguments)
        try:
            result = future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            return f"{ERROR_PREFIX}{self.name} did not finish within {self.timeout_s:g} s"
        except ToolError as e:
            return f"{ERROR_PREFIX}{e}"
        except Exception as e:  # a failing tool is the model's problem to read about, not the caller's
            return f"{ERROR_PREFIX}{self.name} failed: {type(e).__name__}: {e}"
        return truncate(str(result), self.max_result_chars)


def truncate(text: str, limit: int) -> str:
    """TEXT, or its first LIMIT characters with a note saying how much was cut."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[... {len(text) - limit} more characters cut]"


def schema_problem(value: Any, schema: dict[str, Any], where: str) -> str | None:
    """What is wrong with VALUE under the JSON-schema subset of the module docstring, or None."""
    kind = schema.get("type")
    if kind is not None:
        types = _JSON_TYPES.get(kind)
        if types is None:
            return f"{where}: the schema names an unsupported type {kind!r}"
        if not isinstance(value, types) or (kind in ("integer", "number") and isinstance(value, bool)):
            return f"{where} must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got {_json_type(value)}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} must be one of {schema['enum']}, got {value!r:.60}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            return f"{where} must be >= {schema['minimum']}, got {value}"
        if "maximum" in schema and value > schema["maximum"]:
            return f"{where} must be <= {schema['maximum']}, got {value}"
    if isinstance(value, str) and "maxLength" in schema and len(value) > schema["maxLength"]:
        return f"{where} is {len(value)} characters; at most {schema['maxLength']} are allowed"
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            problem = schema_problem(item, schema["items"], f"{where}[{i}]")
            if problem:
                return problem
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                return f"missing required argument {name!r}"
        if schema.get("additionalProperties") is False:
            extra = sorted(set(value) - set(properties))
            if extra:
                return f"unknown argument {extra[0]!r}; expected {', '.join(properties) or 'none'}"
        for name, item in value.items():
            if name in properties:
                problem = schema_problem(item, properties[name], f"argument {name!r}")
                if problem:
                    return problem
    return None


def _json_type(value: Any) -> str:
    for name, types in _JSON_TYPES.items():
        if isinstance(value, types) and not (name in ("integer", "number") and isinstance(value, bool)):
            return "an integer" if name == "integer" else f"a{'n' if name[0] in 'aeiou' else ''} {name}"
    return "null" if value is None else type(value).__name__
