"""What the selected demonstrations' labels alone would score: the reference for ``bench_prompting --section select``.

    python bench/select_label_baseline.py --task wiki_topic --limit 50 --k 4 --pool 200

For every evaluation item it builds the very demonstrations ``bench_prompting.py --section select`` shows
(same task, items, pool, seed, embedder, selector and ``similar-last`` order) and, without running the language
model, scores three label-only classifiers per selection method:

* ``gold_share``: the fraction of the k demonstrations whose label is the item's gold label;
* ``majority``: the most common demonstration label (ties go to the label of the demonstration nearest the
  question, i.e. the last one shown);
* ``last``: the label of the last demonstration shown (for knn / mmr, the most similar one).

If the model's few-shot accuracy with k-nearest demonstrations is no higher than ``majority``, the gain over
random demonstrations is the neighbours' labels (an embedding k-NN classifier), not the model reading the text.
Writes ``bench/results/prompting/select_<task>_labels.json``. Seconds on a CPU (only the sentence encoder runs).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_prompting import OUT, interval, make_task

from lmstack.atomic import write_json_atomic
from lmstack.prompting.select import (
    METHODS,
    DemoSelector,
    checkpoint_embedder,
    task_pool,
)


def label_scores(selector: DemoSelector, task, examples) -> dict[str, float]:
    """Label-only accuracies of one selector over the items (see the module docstring)."""
    share = majority = last = 0.0
    for ex in examples:
        gold = ex.choices[ex.gold].strip()
        labels = [d.answer.strip() for d in selector.select(ex.id, task.doc_to_text(ex))]  # prompt order
        counts = Counter(labels)
        top = max(counts.values())
        # ties: the tied label shown closest to the question (similar-last order puts the nearest last)
        vote = next(label for label in reversed(labels) if counts[label] == top)
        share += sum(label == gold for label in labels) / len(labels)
        majority += vote == gold
        last += labels[-1] == gold
    n = len(examples)
    return {"gold_share": share / n, "majority": majority / n, "majority_ci95": interval(majority / n, n),
            "last": last / n, "n": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="wiki_topic", choices=["wiki_topic"])
    parser.add_argument("--embedder", default="runs/prompting/minilm")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--pool", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    task = make_task(args)
    examples = task.examples()[:args.limit]
    embedder = checkpoint_embedder(args.embedder)
    rows = []
    for method in METHODS:
        selector = DemoSelector(task_pool(task), method=method, k=args.k, seed=args.seed,
                                embedder=embedder if method != "random" else None, order="similar-last")
        selector.embed_queries([task.doc_to_text(ex) for ex in examples])
        rows.append({"select": method, **label_scores(selector, task, examples)})
        print(rows[-1], flush=True)
    result = {"task": args.task, "k": args.k, "pool": args.pool, "seed": args.seed, "embedder": args.embedder,
              "command": " ".join(sys.argv), "rows": rows}
    write_json_atomic(OUT / f"select_{args.task}_labels.json", result, indent=1)


if __name__ == "__main__":
    main()
