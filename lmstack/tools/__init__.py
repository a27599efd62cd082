"""Tools a model can call while it generates: one interface, three tools, a document index, the loop.

    from lmstack.tools import build_tools
    tools = build_tools("calculator,python,search=runs/idx")     # what `lmstack chat --tools` takes
    from lmstack.tools.loop import run_with_tools
    result = run_with_tools(engine, engine.tokenizer, messages, tools, max_rounds=4)

* :mod:`lmstack.tools.base`: :class:`~lmstack.tools.base.Tool` (name, description, JSON-schema parameters,
  call -> str, timeout); a failing, timed-out or misused tool answers ``error: ...``, never raises.
* :mod:`lmstack.tools.calculator`: exact arithmetic over a whitelisted expression tree (no ``eval``),
  and the SFT conversations that teach a model to call it.
* :mod:`lmstack.tools.python_tool`: Python in the evaluation sandbox (lmstack/evals/sandbox.py).
* :mod:`lmstack.tools.index`: passages, BM25 (bm25s), dense vectors, hybrid ranking; the search tool.
* :mod:`lmstack.tools.calls` / :mod:`lmstack.tools.loop`: reading tool calls from model output and the
  generation loop that runs them.

Layer: tools sits at layer 5 beside serve and stages, since it uses the sandbox of ``evals`` (layer 4)
and the engine (layer 3); the server and the CLI build on it. Submodules import lazily here, so
``import lmstack.tools`` is cheap.
"""

from __future__ import annotations

from lmstack.errors import UserError

TOOL_NAMES = ("calculator", "python", "search")


def check_tool_spec(spec: str) -> list[tuple[str, str]]:
    """(name, value) pairs of a comma-separated SPEC, checked without building anything (UserError if bad)."""
    items = [item.strip() for item in spec.split(",") if item.strip()]
    pairs = [(name, value) for name, _, value in (item.partition("=") for item in items)]
    for (name, value), item in zip(pairs, items):
        if not ((name in ("calculator", "python") and not value) or (name == "search" and value)):
            raise UserError(f"unknown tool {item!r}; choose from calculator, python, search=INDEX_DIR "
                            "(comma-separated, e.g. calculator,search=runs/idx)")
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise UserError(f"a tool is named twice in {spec!r}")
    if not pairs:
        raise UserError("no tools named; pass e.g. --tools calculator,python,search=IDX")
    return pairs


def build_tools(spec: str, allow_unsafe_sandbox: bool = False) -> list:
    """Tools from a comma-separated SPEC: ``calculator``, ``python``, ``search=INDEX_DIR``."""
    tools = []
    for name, value in check_tool_spec(spec):
        if name == "calculator":
            from lmstack.tools.calculator import calculator_tool
            tools.append(calculator_tool())
        elif name == "python":
            from lmstack.tools.python_tool import python_tool
            tools.append(python_tool(allow_unsafe=allow_unsafe_sandbox))
        else:
            from lmstack.tools.index import search_tool
            tools.append(search_tool(value))
    return tools
