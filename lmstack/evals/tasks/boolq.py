"""BoolQ (Clark et al., 2019): yes/no questions about a Wikipedia passage (3,270 validation items).

``"<passage>\\nQuestion: <question>?\\nAnswer:"`` scored with `` no`` / `` yes``. The majority answer (yes) is
right 62% of the time, which is the baseline the CORE-style aggregate centers on.
"""

from __future__ import annotations

from lmstack.data.benchmarks import benchmark_records
from lmstack.evals.task import Example, MultipleChoiceTask


def _truthy(value) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes")


class BoolQ(MultipleChoiceTask):
    name = "boolq"

    def examples(self) -> list[Example]:
        return [Example(id=str(i), context=f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:",
                        choices=["no", "yes"], gold=int(_truthy(r["answer"])))
                for i, r in enumerate(benchmark_records("boolq"))]

    def baseline(self, examples) -> float:
        golds = [e.gold for e in examples]
        return max(golds.count(0), golds.count(1)) / max(len(golds), 1)
