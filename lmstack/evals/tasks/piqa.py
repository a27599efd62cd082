"""PIQA (Bisk et al., 2020): physical commonsense, pick the better of two solutions for a goal.

1,838 validation items; ``"Question: <goal>\\nAnswer:"`` with each solution scored as the continuation.
"""

from __future__ import annotations

from lmstack.data.benchmarks import benchmark_records
from lmstack.evals.task import Example, MultipleChoiceTask


class PIQA(MultipleChoiceTask):
    name = "piqa"

    def examples(self) -> list[Example]:
        return [Example(id=str(i), context=f"Question: {r['goal']}\nAnswer:", choices=[r["sol1"], r["sol2"]],
                        gold=int(r["label"])) for i, r in enumerate(benchmark_records("piqa"))]
