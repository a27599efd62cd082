"""TriviaQA (Joshi et al., 2017), closed book: answer a trivia question from memory (7,993 validation items).

``"Question: …?\\nAnswer:"``; greedy generation stops at a newline, period or comma; exact match and F1 after
SQuAD normalisation against every alias of the answer.
"""

from __future__ import annotations

from lmstack.data.benchmarks import benchmark_records
from lmstack.evals.task import Example, GenerativeTask


class TriviaQA(GenerativeTask):
    name = "triviaqa"
    stop = ["\n", ".", ","]
    max_tokens = 24

    def examples(self) -> list[Example]:
        out = []
        for r in benchmark_records("triviaqa"):
            answer = r["answer"]
            aliases = list(dict.fromkeys([answer["value"], *answer["aliases"], *answer["normalized_aliases"]]))
            q = r["question"].strip()
            out.append(Example(id=r["question_id"], context=f"Question: {q}{'' if q.endswith('?') else '?'}\nAnswer:",
                               answers=aliases))
        return out
