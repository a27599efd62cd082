"""Winogrande (Sakaguchi et al., 2019): fill the blank with one of two names (1,267 validation items, XL).

Partial scoring, as in the paper and lm-evaluation-harness: each option is substituted into the sentence up
to the blank (one *context* per option) and the model scores the shared rest of the sentence.
"""

from __future__ import annotations

from lmstack.data.benchmarks import benchmark_records
from lmstack.evals.task import Example, MultipleChoiceTask


class Winogrande(MultipleChoiceTask):
    name = "winogrande"

    def examples(self) -> list[Example]:
        out = []
        for i, r in enumerate(benchmark_records("winogrande")):
            blank = r["sentence"].index("_")
            before, after = r["sentence"][:blank], r["sentence"][blank + 1:].strip()
            out.append(Example(id=str(i), context=before, choices=[after],
                               choice_contexts=[before + r["option1"], before + r["option2"]],
                               gold=int(r["answer"]) - 1))
        return out

    def demonstration(self, ex: Example) -> str:
        assert ex.choice_contexts is not None and ex.gold is not None
        return ex.choice_contexts[ex.gold] + self.target_delimiter + ex.choices[0]

    def baseline(self, examples) -> float:
        return 0.5
