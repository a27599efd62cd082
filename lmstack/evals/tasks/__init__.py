"""Benchmark registry: one file per benchmark, each defining a Task subclass (see lmstack/evals/task.py).

``get_task("hellaswag")`` builds a task by name; ``ppl:PATH`` builds a perplexity / bits-per-byte task over
your own text files (txt / jsonl / directories). ``TASKS`` lists the built-in names; ``lmstack eval --help``
shows them too.
"""

from __future__ import annotations

import importlib
from typing import Callable

from lmstack.errors import UserError
from lmstack.evals.task import Task

# name -> "module:Class" (imported lazily so `lmstack --help` stays instant)
TASKS: dict[str, str] = {
    "hellaswag": "hellaswag:HellaSwag",
    "arc_easy": "arc:ARCEasy",
    "arc_challenge": "arc:ARCChallenge",
    "mmlu": "mmlu:MMLU",
    "piqa": "piqa:PIQA",
    "winogrande": "winogrande:Winogrande",
    "boolq": "boolq:BoolQ",
    "openbookqa": "openbookqa:OpenBookQA",
    "lambada": "lambada:Lambada",
    "triviaqa": "triviaqa:TriviaQA",
    "gsm8k": "gsm8k:GSM8K",
    "humaneval": "humaneval:HumanEval",
    "mbpp": "mbpp:MBPP",
    "hhh_alignment": "hhh_alignment:HHHAlignment",
    "arithmetic": "arithmetic:Arithmetic",
    "sst2": "sst2:SST2",
}

# the multiple-choice suite that the CORE-style aggregate is usually reported over
CORE_TASKS = ["hellaswag", "arc_easy", "arc_challenge", "mmlu", "piqa", "winogrande", "boolq", "openbookqa",
              "lambada"]


def get_task(name: str) -> Task:
    """A fresh task instance by name (``ppl:PATH`` for perplexity over your own files)."""
    key = name.strip()
    if key.startswith("ppl:"):
        from lmstack.evals.tasks.text import TextPerplexity

        return TextPerplexity(key[4:])
    key = key.lower().replace("-", "_")
    if key not in TASKS:
        raise UserError(f"unknown task '{name}'; choose from {', '.join(TASKS)} or ppl:PATH")
    module_name, cls_name = TASKS[key].split(":")
    module = importlib.import_module(f"lmstack.evals.tasks.{module_name}")
    factory: Callable[[], Task] = getattr(module, cls_name)
    return factory()
