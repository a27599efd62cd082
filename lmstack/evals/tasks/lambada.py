"""LAMBADA (Paperno et al., 2016; OpenAI's detokenised test set, 5,153 items): predict a passage's last word.

Accuracy counts an item when the target word is exactly the model's greedy continuation (every token argmax);
perplexity is lm-eval's per-item ``exp(-mean log p(target))``; bits_per_byte is over the target bytes.
"""

from __future__ import annotations

from lmstack.data.benchmarks import benchmark_records
from lmstack.evals.task import Example, TargetTask


class Lambada(TargetTask):
    name = "lambada"
    fewshot_separator = "\n\n"

    def examples(self) -> list[Example]:
        return [Example(id=str(r["id"]), context=r["query"], answers=[r["answers_text"][0]])
                for r in benchmark_records("lambada")]
