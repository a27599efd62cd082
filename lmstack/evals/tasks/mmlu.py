"""MMLU (Hendrycks et al., 2021): 57 subjects of four-option questions; the classic 5-shot letter format.

14,042 test items; demonstrations come from each subject's 5-item ``dev`` split (as in the original paper),
so ``--num-fewshot`` above 5 is capped at 5. The prompt lists the options as ``A. …`` lines and the model
scores the letters `` A`` … `` D`` after ``Answer:``. Items are ordered by subject, so ``--limit`` takes the
first subjects; use no limit for the real number.
"""

from __future__ import annotations

from functools import lru_cache

from lmstack.data.benchmarks import benchmark_records
from lmstack.evals.task import Example, MultipleChoiceTask

LETTERS = ["A", "B", "C", "D"]


def _example(r: dict, i: int, split: str) -> Example:
    options = "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, r["choices"]))
    return Example(id=f"{split}/{r['subject']}/{i}", context=f"{r['question'].strip()}{options}\nAnswer:",
                   choices=LETTERS[:len(r["choices"])], gold=int(r["answer"]), meta={"subject": r["subject"]})


class MMLU(MultipleChoiceTask):
    name = "mmlu"
    random_baseline = 0.25

    def examples(self) -> list[Example]:
        counts: dict[str, int] = {}
        out = []
        for r in benchmark_records("mmlu", split="test"):
            i = counts[r["subject"]] = counts.get(r["subject"], -1) + 1
            out.append(_example(r, i, "test"))
        return out

    @lru_cache(maxsize=1)
    def _dev(self) -> dict[str, list[Example]]:
        by_subject: dict[str, list[Example]] = {}
        for r in benchmark_records("mmlu", split="dev"):
            items = by_subject.setdefault(r["subject"], [])
            items.append(_example(r, len(items), "dev"))
        return by_subject

    def sample_fewshot(self, ex: Example, k: int, seed: int = 1234) -> list[Example]:
        return self._dev().get(ex.meta["subject"], [])[:max(k, 0)]  # the fixed dev demonstrations, in order

    def fewshot_prefix(self, ex: Example, k: int, seed: int = 1234) -> str:
        subject = ex.meta["subject"].replace("_", " ")
        header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        demos = self.sample_fewshot(ex, k, seed)
        return header + "".join(self.demonstration(d) + self.fewshot_separator for d in demos)
