"""Generated tasks with verifiable answers, for RL with exact rewards (``lmstack grpo``, ``lmstack ppo``).

    python -m lmstack.data.verifiable --kind arithmetic --n 2000 --out prompts.jsonl            # RL prompts
    python -m lmstack.data.verifiable --kind arithmetic --n 2000 --out sft.jsonl --sft          # SFT conversations
    lmstack grpo --model runs/sft/model --prompts prompts.jsonl --reward module:lmstack.data.verifiable:reward ...

Two kinds, both seeded:

* ``arithmetic``: ``What is 47 + 385?``: ``digits``-digit operands, with ``+``, ``-`` or ``*`` (``ops``).
  The answer is the exact integer.
* ``countdown`` (after the Countdown game used in RL-for-reasoning studies): ``Use 3, 5, 7 to make 22.``:
  combine every given number exactly once with ``+``, ``-``, ``*`` (and parentheses) to reach the target.
  The target is made from a random expression over the numbers, so every puzzle has a solution; any
  expression that reaches it scores (there may be several).

A prompt record is TRL's conversational prompt-only format plus the answer: ``{"prompt": [{"role": "user",
"content": ...}], "answer": ...}``; ``--sft`` writes ``{"messages": [user, assistant]}`` conversations for
``lmstack sft`` instead. :func:`reward` is a ``module:function`` reward ``(prompts, completions) -> floats``:
it recomputes the answer from the prompt text, so it needs no other column. An arithmetic completion scores
1.0 when, stripped (and without a final period), it is the exact integer; a countdown completion when it is
an expression of the given numbers, each used once, that evaluates to the target (read with ``ast``, never
``eval``). Everything else scores 0.0.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmstack.atomic import write_text_atomic
from lmstack.errors import UserError

KINDS = ("arithmetic", "countdown")
_ARITHMETIC = re.compile(r"What is (-?\d+) ([+\-*]) (-?\d+)\?")
_COUNTDOWN = re.compile(r"Use ([\d, ]+) to make (-?\d+)\.")


def arithmetic_problem(rng: random.Random, digits: int = 2, ops: str = "+") -> tuple[str, str]:
    """One ``(question, answer)``: two ``digits``-digit operands and an operator drawn from ``ops``."""
    low, high = 10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1
    a, b, op = rng.randint(low, high), rng.randint(low, high), rng.choice(ops)
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return f"What is {a} {op} {b}?", str(value)


def countdown_problem(rng: random.Random, count: int = 3, max_number: int = 9) -> tuple[str, str]:
    """One ``(question, a solution)``: ``count`` numbers in 1..max_number and a target one expression reaches."""
    numbers = [rng.randint(1, max_number) for _ in range(count)]
    order = rng.sample(numbers, count)
    expression = str(order[0])
    for number in order[1:]:
        op = rng.choice("+-*")
        expression = f"({expression}) {op} {number}" if op == "*" and any(c in expression for c in "+-") \
            else f"{expression} {op} {number}"
    target = _evaluate(ast.parse(expression, mode="eval").body)
    return f"Use {', '.join(map(str, numbers))} to make {target}.", expression


def make_prompts(kind: str, n: int, seed: int = 0, **options: Any) -> list[dict[str, Any]]:
    """``n`` prompt records of ``kind`` (module docstring); options go to the problem generator."""
    if kind not in KINDS:
        raise UserError(f"--kind {kind}: choose one of {', '.join(KINDS)}")
    rng = random.Random(f"{kind}:{seed}")
    make = arithmetic_problem if kind == "arithmetic" else countdown_problem
    records = []
    for _ in range(n):
        question, answer = make(rng, **options)
        records.append({"prompt": [{"role": "user", "content": question}], "answer": answer})
    return records


def make_conversations(kind: str, n: int, seed: int = 0, **options: Any) -> list[dict[str, Any]]:
    """The same problems as SFT conversations: the user's question and the assistant's answer."""
    return [{"messages": [*record["prompt"], {"role": "assistant", "content": record["answer"]}]}
            for record in make_prompts(kind, n, seed, **options)]


# ----------------------------------------------------------------------------- rewards


def _prompt_text(prompt: str | Sequence[dict[str, Any]]) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    return str(users[-1]) if users else ""


def _evaluate(node: ast.AST, used: list[int] | None = None) -> int:
    """An integer expression of + - * and parentheses; ``used`` collects its literals. ValueError otherwise."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        if used is not None:
            used.append(node.value)
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
        left, right = _evaluate(node.left, used), _evaluate(node.right, used)
        if abs(left) > 10**9 or abs(right) > 10**9:
            raise ValueError("number too large")
        return left + right if isinstance(node.op, ast.Add) else left - right if isinstance(node.op, ast.Sub) \
            else left * right
    raise ValueError(f"not allowed in an answer: {type(node).__name__}")


def score(prompt: str | Sequence[dict[str, Any]], completion: str) -> float:
    """1.0 when ``completion`` answers the arithmetic or countdown ``prompt`` exactly, else 0.0."""
    text, answer = _prompt_text(prompt), completion.strip().removesuffix(".").strip()
    if match := _ARITHMETIC.search(text):
        a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
        value = a + b if op == "+" else a - b if op == "-" else a * b
        return float(answer == str(value))
    if match := _COUNTDOWN.search(text):
        numbers, target = sorted(int(x) for x in match.group(1).split(",")), int(match.group(2))
        used: list[int] = []
        try:
            value = _evaluate(ast.parse(answer, mode="eval").body, used)
        except (SyntaxError, ValueError, RecursionError):
            return 0.0
        return float(value == target and sorted(used) == numbers)
    raise UserError(f"not an arithmetic or countdown prompt: {text[:80]!r}")


def reward(prompts: Sequence[Any], completions: Sequence[str]) -> list[float]:
    """The ``module:function`` reward: :func:`score` of each (prompt, completion) pair."""
    return [score(p, c) for p, c in zip(prompts, completions)]


def write_records(out: str | Path, records: Sequence[dict[str, Any]]) -> Path:
    write_text_atomic(Path(out), "".join(json.dumps(r) + "\n" for r in records))
    return Path(out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lmstack.data.verifiable",
                                     description="Write verifiable task prompts (or SFT conversations) as JSONL.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--kind", choices=KINDS, default="arithmetic", help="which task")
    parser.add_argument("--n", type=int, default=1000, help="number of problems")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--digits", type=int, default=2, help="arithmetic: digits per operand")
    parser.add_argument("--ops", default="+", help="arithmetic: operators to draw from, e.g. '+-*'")
    parser.add_argument("--out", required=True, help="JSONL file to write")
    parser.add_argument("--sft", action="store_true", help="write {messages} conversations with the answers")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n {args.n}: write at least one problem")
    options = {"digits": args.digits, "ops": args.ops} if args.kind == "arithmetic" else {}
    make = make_conversations if args.sft else make_prompts
    print(write_records(args.out, make(args.kind, args.n, args.seed, **options)))


if __name__ == "__main__":
    main()
