"""BIG-bench hhh_alignment (Askell et al., 2021) as a preference evaluation: 221 pairs of assistant replies.

Each item is a human request with two candidate replies, one judged more helpful, honest or harmless
(subtasks ``helpful``, ``honest``, ``harmless``, ``other``). The model "prefers" the reply it gives the
higher log-likelihood after ``"Human: …\\n\\nAssistant:"``; ``acc`` is how often that is the better reply and
``acc_norm`` the same per byte. Per-subtask accuracies are reported too. The data is extracted once from the
BIG-bench sdist (see lmstack/data/benchmarks.py). BIG-bench's canary applies: evaluation only, never training.
"""

from __future__ import annotations

from typing import Sequence

from lmstack.data.benchmarks import benchmark_records
from lmstack.evals.task import Example, MultipleChoiceTask


class HHHAlignment(MultipleChoiceTask):
    name = "hhh_alignment"
    random_baseline = 0.5

    def examples(self) -> list[Example]:
        out = []
        for i, r in enumerate(benchmark_records("hhh_alignment")):
            replies = list(r["target_scores"])
            scores = [r["target_scores"][k] for k in replies]
            out.append(Example(id=f"{r['_subtask']}/{i}", context=f"Human: {r['input'].strip()}\n\nAssistant:",
                               choices=[c.strip() for c in replies], gold=scores.index(max(scores)),
                               meta={"subtask": r["_subtask"]}))
        return out

    def score(self, ex, response):
        out = super().score(ex, response)
        out["_subtask"] = ex.meta["subtask"]
        return out

    def aggregate(self, item_scores: Sequence[dict]) -> dict[str, float]:
        out = super().aggregate(item_scores)
        for sub in sorted({s["_subtask"] for s in item_scores}):
            items = [s for s in item_scores if s["_subtask"] == sub]
            out[f"acc/{sub}"] = sum(s["acc"] for s in items) / len(items)
        return out
