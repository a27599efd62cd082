"""SST-2 (GLUE, Socher et al., 2013): the sentiment of a movie-review sentence, 872 validation items.

``"Review: <sentence>\\nSentiment:"`` scored with `` negative`` / `` positive``. Short, topical inputs make it
the classic testbed for choosing demonstrations by similarity (k-nearest versus random, Liu et al., 2022).
"""

from __future__ import annotations

from lmstack.data.benchmarks import benchmark_records
from lmstack.evals.task import Example, MultipleChoiceTask


class SST2(MultipleChoiceTask):
    name = "sst2"
    random_baseline = 0.5

    def examples(self) -> list[Example]:
        return [Example(id=str(r["idx"]), context=f"Review: {r['sentence'].strip()}\nSentiment:",
                        choices=["negative", "positive"], gold=int(r["label"]),
                        meta={"question": r["sentence"].strip()})
                for r in benchmark_records("sst2")]
