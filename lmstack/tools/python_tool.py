"""The python tool: run model-written code in the evaluation sandbox and return what it printed.

    from lmstack.tools.python_tool import python_tool
    python_tool().call({"code": "print(sum(range(10)))"})    # '45'

The code runs through :func:`lmstack.evals.sandbox.run_python`, the same contained subprocess that scores
benchmark code: a wall-clock and CPU limit (infinite loops), no process creation (fork bombs), an address
space limit (memory bombs), a read-only filesystem outside a private directory (file escapes), no sockets
(network). See that module for what each isolation mode guarantees; when no contained mode is available
and the user has not opted into the escapable one, the tool answers with the sandbox's refusal as an
``error:`` result instead of running the code.

The result is stdout, cut to about ``max_output_chars``, then, when the program failed, the exit status and
the last lines of its traceback (what a model needs to fix its code), which are never cut. A timeout or a non-zero exit is reported in the text rather
than as an error, so the model sees its output so far.
"""

from __future__ import annotations

from typing import Any

from lmstack.evals.sandbox import SandboxLimits, run_python
from lmstack.tools.base import Tool, truncate


def run_code(code: str, limits: SandboxLimits, max_output_chars: int) -> str:
    """What CODE printed, then a status note when it failed or timed out (the note is never cut)."""
    result = run_python(code, limits=limits)
    status = ""
    if result.status == "timeout":
        status = f"[timed out after {limits.timeout_s:g} s]"
    elif result.status == "failed":
        lines = [line for line in result.stderr.strip().splitlines() if 'File "<string>"' not in line]
        status = "\n".join([f"[exit status {result.returncode}]", *lines[-3:]])
    stdout = result.stdout.rstrip("\n")
    if not stdout and not status:
        return "[no output]"
    stdout = truncate(stdout, max(max_output_chars // 2, max_output_chars - len(status))) if stdout else ""
    return "\n".join(part for part in (stdout, status) if part)


def python_tool(timeout_s: float = 10.0, memory_mb: int = 512, max_output_chars: int = 2000,
                allow_unsafe: bool = False) -> Tool:
    """The sandboxed Python tool (argument ``code``); ``allow_unsafe`` accepts the escapable sandbox mode."""
    limits = SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb, allow_unsafe=allow_unsafe)

    def call(arguments: dict[str, Any]) -> str:
        return run_code(arguments["code"], limits, max_output_chars)

    # the tool's own deadline leaves the sandbox time to kill its process group and report
    return Tool(name="python", description="Run a Python 3 program in a sandbox and return what it prints "
                                           "(no network, no files outside its directory).",
                parameters={"type": "object", "additionalProperties": False, "required": ["code"],
                            "properties": {"code": {"type": "string", "maxLength": 20_000,
                                                    "description": "a complete program; print the answer"}}},
                function=call, timeout_s=timeout_s + 15, max_result_chars=max_output_chars + 1000)
