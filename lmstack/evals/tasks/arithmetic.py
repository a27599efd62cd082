"""Basic arithmetic (AllenAI's ``basic_arithmetic``): 3,000 sums and differences of one- and two-digit numbers.

Asked generatively, ``"Question: Calculate 5 + 91 =\\nAnswer:"``; the answer is the first number the model
writes (or the number after "The answer is", so chain-of-thought outputs are read the same way), compared
exactly with the option the dataset marks correct. Greedy, up to 16 new tokens. The prompting benchmarks use
it for self-consistency (maj@k) and chain-of-thought versus direct answers.
"""

from __future__ import annotations

import re

from lmstack.data.benchmarks import benchmark_records
from lmstack.evals.task import Example, GenerativeTask, Response, _as_response
from lmstack.evals.tasks.gsm8k import _canonical

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class Arithmetic(GenerativeTask):
    name = "arithmetic"
    stop = ["\n"]
    max_tokens = 16

    def examples(self) -> list[Example]:
        out = []
        for r in benchmark_records("basic_arithmetic"):
            answer = r["choices"]["text"][list(r["choices"]["label"]).index(r["answerKey"])]
            question = r["question"]
            out.append(Example(id=r["id"], context=f"Question: {question}\nAnswer:", answers=[_canonical(answer)],
                               meta={"question": question}))
        return out

    def extract_answer(self, text: str) -> str:
        match = re.search(r"[Tt]he answer is\s*(-?\d+(?:\.\d+)?)", text)
        if match:
            return _canonical(match.group(1))
        numbers = _NUMBER.findall(text)
        return _canonical(numbers[0]) if numbers else ""

    def score(self, ex: Example, response: Response | str) -> dict[str, float]:
        answer = self.extract_answer(_as_response(response).text or "")
        return {"exact_match": float(answer != "" and answer == ex.answers[0]), "_answer": answer}
