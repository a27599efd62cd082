"""MBPP (Austin et al., 2021): 500 short Python tasks, each with three assert tests (the test split).

The prompt states the task and shows the tests, then opens a code block; generation stops at the block's end.
The program run in the sandbox is the generated code + the task's setup code + its asserts. Demonstrations
(``--num-fewshot``) are other test items with their reference code, sampled with the seed.
"""

from __future__ import annotations

from lmstack.data.benchmarks import benchmark_records
from lmstack.evals.task import CodeTask, Example


class MBPP(CodeTask):
    name = "mbpp"
    stop = ["\n```", "\nassert", "\nif __name__"]
    max_tokens = 384
    target_delimiter = ""

    def examples(self) -> list[Example]:
        out = []
        for r in benchmark_records("mbpp"):
            tests = "\n".join(r["test_list"])
            context = (f"You are an expert Python programmer, and here is your task: {r['text']} "
                       f"Your code should pass these tests:\n\n{tests}\n```python\n")
            out.append(Example(id=str(r["task_id"]), context=context, answers=[r["code"].replace("\r\n", "\n")],
                               test=(r.get("test_setup_code") or "") + "\n" + tests))
        return out

    def demonstration(self, ex: Example) -> str:
        return ex.context + ex.answers[0] + "\n```"

    def program(self, ex: Example, completion: str) -> str:
        return f"{completion}\n\n{ex.test}\n"
