"""The calculator tool: exact arithmetic on a whitelisted expression tree, never ``eval``.

    from lmstack.tools.calculator import calculate, calculator_tool
    calculate("48213 * 90517")         # '4364096121'
    calculate("1/3 + 0.5")             # '5/6 (≈ 0.8333333333333333333)'
    calculate("2 ** 0.5")              # CalculatorError: exponents must be whole numbers
    calculator_tool().call({"expression": "1/0"})   # 'error: calculator: division by zero'

The expression is parsed with ``ast.parse(mode="eval")`` and walked node by node; only number literals,
``+ - * / // % **``, unary ``+ -``, parentheses and ``abs(x)`` are accepted, anything else (names,
attributes, calls, comparisons, strings, ``^``) is refused with a message naming it. Numbers are exact:
integers stay Python integers (any size), a decimal literal such as ``0.1`` is read from its source text
as a ``Decimal`` and held as the ``Fraction`` it denotes, and ``/`` gives a ``Fraction``. So
``0.1 + 0.2`` is exactly ``0.3``. A result prints as an integer, as a finite decimal when its denominator
has only factors 2 and 5, else as ``p/q`` with a 20-digit approximation.

Limits keep one call cheap: an exponent above 10,000 in size, and any intermediate number above
``MAX_BITS`` (about 3,900 decimal digits) is refused *before* it is computed (the size of a power or a
product is estimated from its operands' bit lengths), so ``9**9**9`` costs microseconds, not minutes.

:func:`calculator_conversations` writes the SFT data that teaches a model to call this tool for
multi-digit arithmetic (bench/bench_tool_use.py).
"""

from __future__ import annotations

import ast
import json
import math
import random
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Any, Union

from lmstack.tools.base import Tool, ToolError

MAX_BITS = 13_000           # largest numerator / denominator of any value (~3,900 digits: under Python's
                            # 4,300-digit limit on converting integers to text)
MAX_EXPONENT = 10_000
MAX_EXPRESSION_CHARS = 1000

Number = Union[int, Fraction]

_BINARY = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%",
           ast.Pow: "**"}


class CalculatorError(ToolError):
    """An expression the calculator refuses or cannot evaluate."""


def calculate(expression: str) -> str:
    """The exact value of EXPRESSION as text (see the module docstring); CalculatorError when refused."""
    if not isinstance(expression, str) or not expression.strip():
        raise CalculatorError("calculator: the expression is empty")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"calculator: the expression is {len(expression)} characters; "
                              f"at most {MAX_EXPRESSION_CHARS}")
    source = expression.strip()
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as e:
        raise CalculatorError(f"calculator: cannot parse {source!r:.80} ({e.msg})") from None
    return format_number(_evaluate(tree.body, source))


def format_number(value: Number) -> str:
    """An integer, a finite decimal, or ``p/q (≈ decimal)``."""
    if isinstance(value, int) or value.denominator == 1:
        return str(int(value))
    denominator = value.denominator
    for factor in (2, 5):
        while denominator % factor == 0:
            denominator //= factor
    if denominator == 1:  # terminates: print every digit
        digits = 0
        while (value * 10 ** digits).denominator != 1:
            digits += 1
        scaled = value.numerator * 10 ** digits // value.denominator
        sign, magnitude = ("-" if scaled < 0 else ""), str(abs(scaled)).rjust(digits + 1, "0")
        return f"{sign}{magnitude[:-digits]}.{magnitude[-digits:]}"
    approx = Decimal(value.numerator) / Decimal(value.denominator)
    return f"{value.numerator}/{value.denominator} (≈ {approx:.20g})"


def _evaluate(node: ast.AST, source: str) -> Number:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise CalculatorError(f"calculator: {node.value!r:.40} is not a number")
        if isinstance(node.value, int):
            return node.value
        literal = ast.get_source_segment(source, node) or repr(node.value)
        try:
            return _normalise(Fraction(Decimal(literal.replace("_", ""))))
        except (InvalidOperation, ValueError):
            raise CalculatorError(f"calculator: {literal!r} is not a finite number") from None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        operand = _evaluate(node.operand, source)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _binary(type(node.op), _evaluate(node.left, source), _evaluate(node.right, source))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
        raise CalculatorError("calculator: '^' is not a power here; write a ** b")
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "abs" \
            and len(node.args) == 1 and not node.keywords:
        return abs(_evaluate(node.args[0], source))
    shown = ast.get_source_segment(source, node) or type(node).__name__
    raise CalculatorError(f"calculator: {shown!r:.60} is not allowed; use numbers, + - * / // % **, "
                          "parentheses and abs()")


def _binary(op: type, left: Number, right: Number) -> Number:
    if op is ast.Pow:
        return _power(left, right)
    if op in (ast.Div, ast.FloorDiv, ast.Mod) and right == 0:
        raise CalculatorError("calculator: division by zero")
    if op is ast.Mult:
        _check_size(_bits(left) + _bits(right))
    result = {ast.Add: lambda: left + right, ast.Sub: lambda: left - right, ast.Mult: lambda: left * right,
              ast.Div: lambda: Fraction(left) / Fraction(right), ast.FloorDiv: lambda: left // right,
              ast.Mod: lambda: left % right}[op]()
    return _normalise(result)


def _power(base: Number, exponent: Number) -> Number:
    if isinstance(exponent, Fraction) and exponent.denominator != 1:
        raise CalculatorError("calculator: exponents must be whole numbers (roots are not exact)")
    exponent = int(exponent)
    if abs(exponent) > MAX_EXPONENT:
        raise CalculatorError(f"calculator: the exponent {exponent} is too large (at most {MAX_EXPONENT})")
    if base == 0 and exponent < 0:
        raise CalculatorError("calculator: division by zero (0 to a negative power)")
    base = Fraction(base)
    if base != 0:  # the result's size from the base's: log2 of its larger part times the exponent
        _check_size(math.ceil(abs(exponent) * max(math.log2(abs(base.numerator)), math.log2(base.denominator))))
    return _normalise(base ** exponent)


def _bits(value: Number) -> int:
    value = Fraction(value)
    return max(abs(value.numerator).bit_length(), value.denominator.bit_length())


def _check_size(bits: int) -> None:
    if bits > MAX_BITS:
        raise CalculatorError(f"calculator: the result would have about {int(bits * 0.30103):,} digits "
                              f"(at most {int(MAX_BITS * 0.30103):,})")


def _normalise(value: Number) -> Number:
    value = Fraction(value) if not isinstance(value, int) else value
    if isinstance(value, Fraction) and value.denominator == 1:
        return int(value)
    if isinstance(value, Fraction):
        _check_size(_bits(value))
    return value


def calculator_tool(timeout_s: float = 5.0) -> Tool:
    """The calculator as a :class:`~lmstack.tools.base.Tool` (argument ``expression``)."""
    return Tool(name="calculator",
                description="Exact arithmetic: + - * / // % ** and parentheses on integers and decimals.",
                parameters={"type": "object", "additionalProperties": False, "required": ["expression"],
                            "properties": {"expression": {"type": "string", "maxLength": MAX_EXPRESSION_CHARS,
                                                          "description": "e.g. 48213 * 90517"}}},
                function=lambda arguments: calculate(arguments["expression"]), timeout_s=timeout_s)


# ----------------------------------------------------------------------------- teaching the habit

def calculator_conversations(n: int, seed: int = 0, digits: tuple[int, int] = (2, 6),
                             use_tool: bool = True) -> list[dict[str, Any]]:
    """N multiplication conversations ``{"messages": [...]}`` with factors of DIGITS[0]..DIGITS[1] digits.

    With ``use_tool`` the assistant calls the calculator, a tool turn carries its result and the assistant
    answers with it; without, the assistant answers at once (the same questions and answers, the reference
    that shows what the tool adds)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b = (rng.randint(10 ** (d - 1), 10 ** d - 1) for d in (rng.randint(*digits), rng.randint(*digits)))
        question = rng.choice(["What is {a} * {b}?", "Compute {a} times {b}.", "{a} x {b} = ?",
                               "Multiply {a} by {b}."]).format(a=a, b=b)
        answer = str(a * b)
        messages: list[dict[str, Any]] = [{"role": "user", "content": question}]
        if use_tool:
            call = {"name": "calculator", "arguments": {"expression": f"{a} * {b}"}}
            messages += [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
                         {"role": "tool", "name": "calculator", "content": calculate(f"{a} * {b}")}]
        messages.append({"role": "assistant", "content": answer})
        records.append({"messages": messages, "answer": answer})
    return records


def write_calculator_conversations(path: str | Path, n: int, seed: int = 0, digits: tuple[int, int] = (2, 6),
                                   use_tool: bool = True) -> Path:
    """Messages JSONL for ``lmstack sft --data PATH`` (written atomically)."""
    from lmstack.atomic import write_text_atomic

    lines = [json.dumps(record, ensure_ascii=False) for record in calculator_conversations(n, seed, digits, use_tool)]
    return write_text_atomic(path, "\n".join(lines) + "\n")
