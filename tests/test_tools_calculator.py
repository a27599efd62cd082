"""The calculator tool: exact results checked against Python's Fraction arithmetic on random expressions,
refusals of everything outside the whitelist, and size limits that refuse before computing."""

from __future__ import annotations

import random
import time
from fractions import Fraction

import pytest

from lmstack.tools.calculator import (CalculatorError, calculate, calculator_conversations, calculator_tool,
                                      format_number)


def _random_expression(rng: random.Random, depth: int = 3) -> tuple[str, Fraction]:
    if depth == 0 or rng.random() < 0.3:
        if rng.random() < 0.5:
            value = rng.randint(0, 10 ** rng.randint(1, 25))
            return str(value), Fraction(value)
        whole, frac = rng.randint(0, 999), rng.randint(0, 999)
        return f"{whole}.{frac:03d}", Fraction(whole * 1000 + frac, 1000)
    (left, a), (right, b) = _random_expression(rng, depth - 1), _random_expression(rng, depth - 1)
    op = rng.choice("+-*/")
    if op == "/" and b == 0:
        op = "+"
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if op == "/" else None}[op]
    return f"({left} {op} {right})", value


def test_random_expressions_are_exact():
    rng = random.Random(0)
    for _ in range(300):
        text, value = _random_expression(rng)
        assert calculate(text) == format_number(value), text


def test_big_integers_and_decimals_are_exact():
    a, b = 987654321987654321987654321, 123456789123456789
    assert calculate(f"{a} * {b}") == str(a * b)
    assert calculate("0.1 + 0.2") == "0.3"          # no binary floating point anywhere
    assert calculate("1.10 * 3") == "3.3"
    assert calculate("2 ** -3") == "0.125"
    assert calculate("-7 // 2") == "-4" and calculate("-7 % 3") == "2"
    assert calculate("abs(-2.5) - 5/2") == "0"
    assert calculate("1/3").startswith("1/3 (≈ 0.3333333333")
    assert calculate("-1/8") == "-0.125"
    assert calculate("1e3 + 1") == "1001"


@pytest.mark.parametrize("expression,fragment", [
    ("1/0", "division by zero"), ("5 % 0", "division by zero"), ("0 ** -1", "division by zero"),
    ("2 ** 0.5", "whole numbers"), ("2 ^ 3", "write a ** b"), ("x + 1", "'x' is not allowed"),
    ("__import__('os').system('true')", "is not allowed"), ("open('f')", "is not allowed"),
    ("(1).__class__", "is not allowed"), ("[1, 2]", "is not allowed"), ("'a' * 3", "is not a number"),
    ("1 < 2", "is not allowed"), ("", "empty"), ("1 +", "cannot parse"), ("True + 1", "is not a number"),
])
def test_refusals_name_the_problem(expression, fragment):
    with pytest.raises(CalculatorError, match="calculator") as info:
        calculate(expression)
    assert fragment in str(info.value)


def test_huge_results_are_refused_before_they_are_computed():
    for expression in ["9 ** 9 ** 9", "10 ** 9999", "(10 ** 3000) * (10 ** 3000)", "7 ** 10001", "(1/3) ** 9000"]:
        start = time.perf_counter()
        with pytest.raises(CalculatorError, match="too large|digits"):
            calculate(expression)
        assert time.perf_counter() - start < 0.5, expression
    assert calculate("2 ** 10000") == str(2 ** 10000)  # a big result inside the limit is computed exactly


def test_the_tool_reports_errors_as_results():
    tool = calculator_tool()
    assert tool.call({"expression": "48213 * 90517"}) == str(48213 * 90517)
    assert tool.call('{"expression": "6 * 7"}') == "42"  # OpenAI's JSON-string arguments
    assert tool.call({"expression": "1/0"}) == "error: calculator: division by zero"
    assert tool.call({"expr": "1"}) == "error: calculator: missing required argument 'expression'"
    assert tool.call({"expression": "1", "x": 2}).startswith("error: calculator: unknown argument 'x'")
    assert tool.call({"expression": 12}) == "error: calculator: argument 'expression' must be a string, got an integer"
    assert tool.call("{not json").startswith("error: calculator: the arguments are not valid JSON")
    assert tool.spec()["function"]["parameters"]["required"] == ["expression"]


def test_conversations_carry_a_call_and_its_result():
    with_tool = calculator_conversations(20, seed=3, digits=(4, 6))
    without = calculator_conversations(20, seed=3, digits=(4, 6), use_tool=False)
    for a, b in zip(with_tool, without):
        assert a["answer"] == b["answer"]
        user, call, result, answer = a["messages"]
        expression = call["tool_calls"][0]["function"]["arguments"]["expression"]
        assert result["role"] == "tool" and result["content"] == calculate(expression) == answer["content"]
        x, y = map(int, expression.split(" * "))
        assert 1000 <= x < 10 ** 6 and 1000 <= y < 10 ** 6 and str(x) in user["content"]
        assert [m["role"] for m in b["messages"]] == ["user", "assistant"]
