"""OpenBookQA (Mihaylov et al., 2018): elementary science questions, four options (500 validation items).

The question stem is the context and each option's text the continuation (lm-evaluation-harness format).
"""

from __future__ import annotations

from lmstack.data.benchmarks import benchmark_records
from lmstack.evals.task import Example, MultipleChoiceTask


class OpenBookQA(MultipleChoiceTask):
    name = "openbookqa"
    core_metric = "acc_norm"

    def examples(self) -> list[Example]:
        out = []
        for r in benchmark_records("openbookqa"):
            labels = list(r["choices"]["label"])
            out.append(Example(id=r["id"], context=r["question_stem"], choices=list(r["choices"]["text"]),
                               gold=labels.index(r["answerKey"].strip())))
        return out
