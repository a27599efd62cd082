"""``lmstack eval --strategy ...``: evaluation with a prompting strategy instead of the task's own few-shot prompt.

    results = evaluate_strategy(lm, ["sst2"], StrategyOptions(strategy="fewshot", select="knn", k=4), limit=100)
    results = evaluate_strategy(lm, ["arithmetic"], StrategyOptions(strategy="self-consistency", samples=8))

``fewshot`` works on every task: demonstrations are chosen by :class:`lmstack.prompting.select.DemoSelector`
and the ordinary runner (:func:`lmstack.evals.run.evaluate`) scores them. The reasoning strategies (``cot``,
``zero-shot-cot``, ``self-consistency``, ``least-to-most``, ``auto-cot``) generate, so they need a generative task
(GSM8K, arithmetic, TriviaQA); the final text goes through the task's own ``score``. ``cot`` and
``self-consistency`` use the pool's worked rationales (GSM8K ships Wei et al.'s; a ``--demos`` file may carry
``"rationale"``); self-consistency over a pool without rationales votes over sampled direct answers. Results have the shape of
``evaluate``'s (so ``results_table`` prints them) plus ``"strategy"``; self-consistency adds
``samples_used`` and ``samples_saved`` (by the early stop) to the task's metrics.

A question's plain text is ``example.meta["question"]`` when the task sets it, otherwise the task's prompt with
its ``Question: … Answer:`` frame removed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from lmstack.atomic import write_json_atomic
from lmstack.errors import UserError
from lmstack.evals.task import Example, GenerationRequest, GenerativeTask, Task
from lmstack.evals.tasks import get_task
from lmstack.prompting import reasoning
from lmstack.prompting.select import (Demo, DemoSelector, Embedder, checkpoint_embedder, file_pool, model_embedder,
                                      task_pool)

STRATEGIES = ("fewshot", "cot", "zero-shot-cot", "self-consistency", "least-to-most", "auto-cot")


@dataclass
class StrategyOptions:
    strategy: str = "fewshot"
    k: int = 4                       # demonstrations (fewshot, cot) or Auto-CoT clusters
    select: str = "random"           # random | knn | mmr
    order: str = "as-selected"       # as-selected | similar-last | random
    fixed: bool = False              # one random demonstration set for every item
    demos: str | None = None         # a JSONL file of demonstrations instead of the task's pool
    embedder: str = "self"           # "self" (the evaluated model, mean pooling) or a checkpoint directory
    mmr_lambda: float = 0.5
    samples: int = 8                 # self-consistency budget per item
    round_size: int = 4              # self-consistency samples forked per round
    temperature: float = 0.7
    early_stop: bool = True
    max_tokens: int = 128            # reasoning tokens per generation


def question_text(task: Task, ex: Example) -> str:
    return str(ex.meta["question"]) if "question" in ex.meta else strip_frame(task.doc_to_text(ex))


def _embedder(lm: Any, spec: str) -> Embedder:
    return model_embedder(lm.model, lm.tokenizer) if spec == "self" else checkpoint_embedder(spec, str(lm.device))


def _pool(task: Task, options: StrategyOptions) -> list[Demo]:
    return file_pool(options.demos, task) if options.demos else task_pool(task)


def fewshot_selector(lm: Any, task: Task, options: StrategyOptions, seed: int) -> DemoSelector:
    embedder = _embedder(lm, options.embedder) if options.select != "random" else None
    return DemoSelector(_pool(task, options), method=options.select, k=options.k, seed=seed, embedder=embedder,
                        lam=options.mmr_lambda, order=options.order, fixed=options.fixed,
                        description=task.description, separator=task.fewshot_separator)


def _cot_prefix(task: Task, options: StrategyOptions, seed: int, direct_fallback: bool = False) -> str:
    """Rationale demonstrations: the pool's items that carry a worked solution, k of them (seeded).

    ``direct_fallback`` (self-consistency): a pool without rationales gives direct demonstrations ("The answer
    is X.") instead, so the vote runs over sampled direct answers."""
    pool = _pool(task, options)
    worked = [d for d in pool if d.rationale or reasoning.extract_final_answer(d.answer)]
    if not worked and direct_fallback:
        chosen = DemoSelector(pool, k=options.k, seed=seed, fixed=True).select("", "")
        return "".join(reasoning.direct_demonstration(strip_frame(d.query), d.answer) + "\n\n" for d in chosen)
    if not worked:
        raise UserError(f"{task.name}: its demonstrations carry no rationales; give --demos FILE with "
                        '"question", "rationale" and "answer" fields, or use --strategy zero-shot-cot or auto-cot')
    chosen = DemoSelector(worked, k=options.k, seed=seed, fixed=True).select("", "")
    return "".join(reasoning.cot_demonstration(strip_frame(d.query), d.rationale or d.answer,
                                               reasoning.extract_final_answer(d.answer) or d.answer) + "\n\n"
                   for d in chosen)


def strip_frame(text: str) -> str:
    """A task prompt without its ``Question: ... Answer:`` frame (the bare question demonstrations reuse)."""
    text = text.strip()
    text = text.removeprefix("Question:")
    return (text.removesuffix("Answer:")).strip()


def run_reasoning(lm: Any, task: Task, examples: Sequence[Example], options: StrategyOptions, seed: int
                  ) -> tuple[list[str], list[dict[str, Any]], dict[str, float]]:
    """The final text per item, per-item details, and strategy metrics."""
    questions = [question_text(task, ex) for ex in examples]
    numeric = any(ch.isdigit() for ex in examples for ch in (ex.answers or [""])[0])
    trigger = reasoning.NUMERIC_ANSWER_TRIGGER if numeric else reasoning.ANSWER_TRIGGER
    extras: dict[str, float] = {}
    if options.strategy == "zero-shot-cot":
        runs = reasoning.zero_shot_cot(lm, questions, trigger=trigger, max_reasoning_tokens=options.max_tokens,
                                       seed=seed)
        finals = [f"The answer is {r.answer}" for r in runs]
        details = [{"prompt": r.reasoning_prompt, "rationale": r.rationale, "answer_prompt": r.answer_prompt,
                    "answer": r.answer} for r in runs]
    elif options.strategy == "least-to-most":
        l2m = reasoning.least_to_most(lm, questions, seed=seed)
        finals = [r.final for r in l2m]
        details = [dataclasses.asdict(r) for r in l2m]
    else:
        if options.strategy == "auto-cot":
            embeddings = _embedder(lm, options.embedder)(questions)
            demos = reasoning.auto_cot_demos(lm, questions, embeddings, min(options.k, len(questions)),
                                             count_tokens=lambda q: len(lm.tokenizer.encode(q)), trigger=trigger,
                                             seed=seed)
            prefix = "".join(d.text + "\n\n" for d in demos)
            extras["demonstrations"] = float(len(demos))
            prompts = [f"{prefix}{reasoning.qa_prompt(q)} {reasoning.STEP_BY_STEP}" for q in questions]
        else:
            prefix = _cot_prefix(task, options, seed, direct_fallback=options.strategy == "self-consistency")
            prompts = [prefix + reasoning.qa_prompt(q) for q in questions]
        if options.strategy == "self-consistency":
            extract = lambda text: task.extract_answer(text)
            votes, texts = reasoning.self_consistency(lm, prompts, extract, samples=options.samples,
                                                      round_size=options.round_size, temperature=options.temperature,
                                                      max_tokens=options.max_tokens, seed=seed,
                                                      early_stop=options.early_stop)
            finals = [f"The answer is {v.answer}" for v in votes]
            details = [{"prompt": p, "samples": t, "votes": v.counts, "used": v.used} for p, t, v in
                       zip(prompts, texts, votes)]
            used = sum(v.used for v in votes)
            extras["samples_used"] = float(used)
            extras["samples_saved"] = float(sum(v.budget for v in votes) - used)
        else:
            requests = [GenerationRequest(p, ["\n\n", "\nQ:"], options.max_tokens) for p in prompts]
            finals = [t[0] for t in lm.generate(requests, seed=seed)]
            details = [{"prompt": p, "response": f} for p, f in zip(prompts, finals)]
    return finals, details, extras


def evaluate_strategy(lm: Any, tasks: Sequence[str | Task], options: StrategyOptions, *, limit: int | None = None,
                      seed: int = 1234, show_progress: bool = True, keep_records: bool = True) -> dict[str, Any]:
    """Evaluate ``lm`` on tasks with a prompting strategy; returns ``evaluate``'s result shape + ``strategy``."""
    from lmstack.evals.run import evaluate

    if options.strategy not in STRATEGIES:
        raise UserError(f"--strategy {options.strategy!r}: choose one of {', '.join(STRATEGIES)}")
    task_objs = [get_task(t) if isinstance(t, str) else t for t in tasks]
    if options.strategy == "fewshot":
        selectors: dict[str, DemoSelector] = {}

        def prefix_fn(task: Task, ex: Example) -> str:
            if task.name not in selectors:
                selectors[task.name] = fewshot_selector(lm, task, options, seed)
            return selectors[task.name].prefix(ex, task.doc_to_text(ex))

        results = evaluate(lm, task_objs, limit=limit, num_fewshot=options.k, seed=seed, show_progress=show_progress,
                           keep_records=keep_records, prefix_fn=prefix_fn)
    else:
        wrong = [t.name for t in task_objs if not isinstance(t, GenerativeTask)]
        if wrong:
            raise UserError(f"--strategy {options.strategy} generates an answer; {', '.join(wrong)} is not a "
                            "generative task (use gsm8k, arithmetic or triviaqa, or --strategy fewshot)")
        results = {"model": lm.name, "results": {}, "records": {}, "core": {},
                   "primary_metrics": {t.name: t.primary_metric for t in task_objs},
                   "config": {"tasks": [t.name for t in task_objs], "limit": limit, "seed": seed,
                              "backend": lm.backend, "max_length": lm.max_length}}
        for task in task_objs:
            examples = task.examples()[:limit] if limit else task.examples()
            finals, details, extras = run_reasoning(lm, task, examples, options, seed)
            scores = [task.score(ex, text) for ex, text in zip(examples, finals)]
            metrics = task.aggregate(scores)
            metrics.update(extras, n=len(examples), num_fewshot=options.k, baseline=task.baseline(examples))
            results["results"][task.name] = metrics
            if keep_records:
                results["records"][task.name] = [
                    {"id": ex.id, "answers": ex.answers[:10], **d, **{k.lstrip("_"): v for k, v in s.items()}}
                    for ex, d, s in zip(examples, details, scores)]
    results["strategy"] = dataclasses.asdict(options)
    return results


def evaluate_checkpoint_strategy(model: str, tasks: Sequence[str], options: StrategyOptions, *,
                                 limit: int | None = None, out: str | None = None, seed: int = 1234,
                                 batch_size: int = 16, device: str = "auto", backend: str = "auto",
                                 model_name: str | None = None) -> dict[str, Any]:
    """Load a checkpoint, evaluate it with a strategy, print the table, write ``out`` (JSON) when given;
    ``model_name`` is what the results record as the model (default: the checkpoint path)."""
    from lmstack.evals.lm import EvalLM
    from lmstack.evals.run import results_table

    for name in tasks:
        get_task(name)  # a typo fails before the model loads
    lm = EvalLM.from_checkpoint(model, device=device, backend=backend, batch_size=batch_size)
    results = evaluate_strategy(lm, tasks, options, limit=limit, seed=seed)
    results["model"] = model_name or str(model)
    print(results_table(results))
    if out:
        write_json_atomic(out, results, indent=1, default=float)
        print(f"wrote {out}")
    return results
