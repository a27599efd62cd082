"""Run benchmarks on a checkpoint: ``lmstack eval --model DIR --tasks hellaswag,arc_easy --limit 200``.

``evaluate(lm, tasks, ...)`` is the library entry point (``evaluate_checkpoint`` loads a checkpoint first and
writes the JSON). For every task it

1. takes the first ``limit`` items (fixed order, so runs with the same limit see the same items),
2. builds each item's prompt: the task's description + ``num_fewshot`` seeded demonstrations + the item,
3. sends every request of the task to the model in one batched call (log-likelihoods for multiple choice /
   target / perplexity modes, generation for generative and code modes) with a progress bar,
4. scores items with ``task.score`` (code runs in the sandbox, ``workers`` programs at a time) and
   aggregates with ``task.aggregate``.

Progress goes through the one bar, :class:`lmstack.progress.Progress` (one task per benchmark, requests/s).

Code tasks run model-written programs in :mod:`lmstack.evals.sandbox`. When this machine offers no contained
sandbox mode they are refused before anything is generated, unless the caller opts in to the escapable mode
(``unsafe_sandbox=True``, ``lmstack eval --unsafe-sandbox`` or ``LMSTACK_SANDBOX=unsafe-fallback``). The
mode the programs ran in is recorded under ``"sandbox"`` and printed under the table.

Output (``--out FILE.json``): ``{"model", "config", "results": {task: {metric: value, "n", "num_fewshot",
"baseline"}}, "core": {...}, "sandbox": {code task: isolation mode}, "records": {task: [per-item prompt,
choices, log-likelihoods, prediction, generated text, metrics]}}``, plus a readable table on stdout. ``core``
is the CORE-style aggregate: each multiple-choice / target task's accuracy centered on its random baseline,
averaged (see metrics.py).

Few-shot defaults (``num_fewshot=None``): the task's ``default_fewshot`` (MMLU 5, GSM8K 8, otherwise 0).
"""

from __future__ import annotations

import platform
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from lmstack.atomic import write_json_atomic
from lmstack.errors import UserError
from lmstack.evals.lm import EvalLM
from lmstack.evals.metrics import core_score
from lmstack.evals.sandbox import choose_mode, describe_isolation
from lmstack.evals.task import (CodeTask, Example, GenerativeTask, MultipleChoiceTask, PerplexityTask, Response,
                                Task, TargetTask)
from lmstack.evals.tasks import get_task
from lmstack.progress import Progress

DEFAULT_FEWSHOT = {"mmlu": 5, "gsm8k": 8}


def _counter(progress: Progress, description: str, total: int | None, unit: str) -> Callable[[int], None]:
    """A progress task for ``description`` and the callback (n finished requests) that advances it."""
    task_id = progress.add(description, total, unit=unit)
    return lambda n: progress.advance(task_id, n)


def _clean_item_scores(scores: dict[str, Any]) -> dict[str, Any]:
    return {k.lstrip("_"): v for k, v in scores.items()}


def run_task(lm: EvalLM, task: Task, *, limit: int | None = None, num_fewshot: int | None = None,
             seed: int = 1234, num_samples: int = 1, temperature: float = 0.0, workers: int = 2,
             unsafe_sandbox: bool = False, progress: Progress | None = None,
             prefix_fn: Callable[[Example], str] | None = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Evaluate one task; returns (task metrics, per-item records).

    ``prefix_fn(example)`` replaces the task's seeded demonstrations (the prompting strategies choose their own).

    ``unsafe_sandbox``: code tasks may run in the escapable sandbox mode when no contained one is available
    (see evals/sandbox.py); without it they are refused there."""
    progress = progress or Progress(enabled=False)
    examples = task.examples()
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit {limit} must be >= 1")
        examples = examples[:limit]
    k = DEFAULT_FEWSHOT.get(task.name, 0) if num_fewshot is None else num_fewshot
    if k < 0:
        raise UserError(f"--num-fewshot {k} must be >= 0")
    prefixes = [prefix_fn(ex) if prefix_fn else task.fewshot_prefix(ex, k, seed) for ex in examples]
    truncated_before = getattr(lm, "truncated_requests", 0)
    records: list[dict[str, Any]] = []
    item_scores: list[dict[str, Any]] = []

    if isinstance(task, (MultipleChoiceTask, TargetTask)):
        per_item = [task.loglikelihood_requests(ex, p) for ex, p in zip(examples, prefixes)]
        flat = [(r.context, r.continuation) for reqs in per_item for r in reqs]
        results = lm.loglikelihood(flat, progress=_counter(progress, task.name, len(flat), "req"))
        pos = 0
        for ex, reqs in zip(examples, per_item):
            res = results[pos:pos + len(reqs)]
            pos += len(reqs)
            response = Response(loglikelihoods=[r.logprob for r in res], token_counts=[r.num_tokens for r in res],
                                is_greedy=[r.is_greedy for r in res])
            scores = task.score(ex, response)
            item_scores.append(scores)
            records.append({"id": ex.id, "prompt": reqs[0].context, "choices": [r.continuation for r in reqs],
                            "contexts": [r.context for r in reqs] if ex.choice_contexts else None,
                            "gold": ex.gold, "loglikelihoods": response.loglikelihoods,
                            "token_counts": response.token_counts, "is_greedy": response.is_greedy,
                            **_clean_item_scores(scores)})
    elif isinstance(task, PerplexityTask):
        texts = [ex.context for ex in examples]
        results = lm.loglikelihood_rolling(texts, progress=_counter(progress, task.name, None, "win"))
        for ex, r in zip(examples, results):
            scores = task.score(ex, Response(loglikelihoods=[r.logprob], token_counts=[r.num_tokens]))
            item_scores.append(scores)
            records.append({"id": ex.id, "chars": len(ex.context), **_clean_item_scores(scores)})
    elif isinstance(task, GenerativeTask):
        n = num_samples if isinstance(task, CodeTask) else 1
        temp = temperature if (n > 1 or temperature > 0) else 0.0
        requests = [task.generation_request(ex, p, n=n, temperature=temp) for ex, p in zip(examples, prefixes)]
        generations = lm.generate(requests, seed=seed, progress=_counter(progress, task.name, len(requests), "gen"))
        responses = [Response(text=g[0], samples=g) for g in generations]
        if isinstance(task, CodeTask):
            task.allow_unsafe_sandbox = unsafe_sandbox
            run_bar = _counter(progress, f"{task.name} (run)", len(examples), "prog")

            def score_one(pair: tuple[Example, Response]) -> dict[str, Any]:
                out = task.score(*pair)
                run_bar(1)
                return out

            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                item_scores = list(pool.map(score_one, zip(examples, responses)))
        else:
            item_scores = [task.score(ex, r) for ex, r in zip(examples, responses)]
        for ex, req, r, scores in zip(examples, requests, responses, item_scores):
            records.append({"id": ex.id, "prompt": req.prompt, "response": r.text,
                            "samples": r.samples if n > 1 else None, "answers": ex.answers[:10],
                            **_clean_item_scores(scores)})
    else:
        raise ValueError(f"task {task.name} has an unknown mode {task.mode!r}")

    metrics = task.aggregate(item_scores)
    metrics["n"] = len(examples)
    metrics["num_fewshot"] = k
    # requests longer than the model's context keep only their end (few-shot demonstrations go first)
    metrics["truncated"] = getattr(lm, "truncated_requests", 0) - truncated_before
    if task.mode in ("multiple_choice", "target", "generate", "code"):
        metrics["baseline"] = task.baseline(examples)
    return metrics, records


def evaluate(lm: EvalLM, tasks: Sequence[str | Task], *, limit: int | None = None, num_fewshot: int | None = None,
             seed: int = 1234, num_samples: int = 1, temperature: float = 0.0, workers: int = 2,
             unsafe_sandbox: bool = False, show_progress: bool = True, keep_records: bool = True,
             prefix_fn: Callable[[Task, Example], str] | None = None) -> dict[str, Any]:
    """Evaluate ``lm`` on each task; returns the results dictionary described in the module docstring.

    ``prefix_fn(task, example)``: each item's demonstrations, instead of the task's seeded ones."""
    task_objs = [get_task(t) if isinstance(t, str) else t for t in tasks]
    if not task_objs:
        raise UserError("no tasks given; pass e.g. --tasks hellaswag,arc_easy")
    if any(isinstance(t, CodeTask) for t in task_objs):
        choose_mode(allow_unsafe=unsafe_sandbox)  # refuse before any generation when the code cannot be contained
    results: dict[str, dict[str, float]] = {}
    records: dict[str, list] = {}
    timings: dict[str, float] = {}
    with Progress(enabled=show_progress) as progress:
        for task in task_objs:
            start = time.monotonic()
            metrics, items = run_task(lm, task, limit=limit, num_fewshot=num_fewshot, seed=seed,
                                      num_samples=num_samples, temperature=temperature, workers=workers,
                                      unsafe_sandbox=unsafe_sandbox, progress=progress,
                                      prefix_fn=(lambda ex, t=task: prefix_fn(t, ex)) if prefix_fn else None)
            timings[task.name] = time.monotonic() - start
            results[task.name] = metrics
            records[task.name] = items
    accuracies, baselines = {}, {}
    for task in task_objs:
        if task.mode in ("multiple_choice", "target"):
            metric = getattr(task, "core_metric", task.primary_metric)
            accuracies[task.name] = results[task.name][metric]
            baselines[task.name] = results[task.name]["baseline"]
    out: dict[str, Any] = {
        "model": lm.name,
        "config": {"tasks": [t.name for t in task_objs], "limit": limit, "num_fewshot": num_fewshot, "seed": seed,
                   "num_samples": num_samples, "temperature": temperature, "backend": lm.backend,
                   "batch_size": lm.batch_size, "device": str(lm.device), "max_length": lm.max_length,
                   "unsafe_sandbox": unsafe_sandbox},
        "results": results,
        "core": core_score(accuracies, baselines),
        "primary_metrics": {t.name: t.primary_metric for t in task_objs},
        "seconds": timings,
        "host": {"python": platform.python_version(), "machine": platform.machine()},
    }
    sandbox = {t.name: ",".join(sorted({mode for item in records[t.name] for mode in item["isolation"].split(",")}))
               for t in task_objs if isinstance(t, CodeTask) and records[t.name]}
    if sandbox:
        out["sandbox"] = sandbox  # task -> the isolation mode its programs ran in (evals/sandbox.py)
    if keep_records:
        out["records"] = records
    return out


def results_table(results: dict[str, Any]) -> str:
    """A fixed-width text table: one row per task and metric, with the CORE aggregate at the end."""
    lines = [f"{'task':<18} {'metric':<16} {'value':>9} {'n':>6} {'shots':>5} {'baseline':>8}", "-" * 67]
    for task, metrics in results["results"].items():
        first = True
        for metric, value in metrics.items():
            if metric in ("n", "num_fewshot", "baseline", "tokens", "bytes", "truncated"):
                continue
            shown = f"{value:>9.4f}" if abs(value) < 1e4 else f"{value:>9.3g}"
            lines.append(f"{task if first else '':<18} {metric:<16} {shown} "
                         f"{metrics['n'] if first else '':>6} {metrics['num_fewshot'] if first else '':>5} "
                         f"{metrics.get('baseline', float('nan')) if first and 'baseline' in metrics else '':>8}")
            first = False
    core = results.get("core") or {}
    if "core" in core:
        lines.append("-" * 67)
        lines.append(f"{'CORE (centered)':<18} {'mean':<16} {core['core']:>9.4f}")
    max_length = results.get("config", {}).get("max_length")
    for task, metrics in results["results"].items():
        if metrics.get("truncated"):
            lines.append(f"note: {task}: {metrics['truncated']} request(s) were longer than the model's "
                         f"{max_length}-token context and kept only their last {max_length} tokens "
                         "(fewer shots with --num-fewshot avoid this)")
    for task, mode in (results.get("sandbox") or {}).items():
        lines.append(f"sandbox: {task} ran in {mode} isolation ({describe_isolation(mode)})")
    return "\n".join(lines)


def evaluate_checkpoint(model: str, tasks: Sequence[str], *, limit: int | None = None,
                        num_fewshot: int | None = None, out: str | None = None, seed: int = 1234,
                        batch_size: int = 16, device: str = "auto", backend: str = "auto", num_samples: int = 1,
                        temperature: float = 0.0, workers: int = 2, unsafe_sandbox: bool = False,
                        keep_records: bool = True, show_progress: bool = True,
                        model_name: str | None = None) -> dict[str, Any]:
    """Load a checkpoint, evaluate it, print the table, write ``out`` (JSON) when given; ``model_name`` is
    what the results record as the model (default: the checkpoint path)."""
    task_objs = [get_task(name) for name in tasks]  # a typo or an empty text fails here, before the model loads
    if any(isinstance(t, CodeTask) for t in task_objs):
        choose_mode(allow_unsafe=unsafe_sandbox)
    lm = EvalLM.from_checkpoint(model, device=device, backend=backend, batch_size=batch_size)
    results = evaluate(lm, task_objs, limit=limit, num_fewshot=num_fewshot, seed=seed, num_samples=num_samples,
                       temperature=temperature, workers=workers, unsafe_sandbox=unsafe_sandbox,
                       show_progress=show_progress, keep_records=keep_records)
    results["model"] = model_name or str(model)
    print(results_table(results))
    if out:
        write_json_atomic(out, results, indent=1, default=float)
        print(f"wrote {out}")
    return results
