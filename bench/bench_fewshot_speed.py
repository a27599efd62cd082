"""Few-shot scoring speed: the shared-context scorer against the plain and engine scorers, in one process.

    lmstack import smollm2-135m-instruct --out runs/prompting/smollm2
    python bench/bench_fewshot_speed.py --model runs/prompting/smollm2 --tasks arc_easy,boolq \
        --limit 200 --limit-fewshot 40 --shots 0,5

For every task and shot count the requests (context + choice, as token ids, exactly as ``lmstack eval``
builds them) are built once and scored by each backend on the same loaded weights: ``plain`` (right-padded
batches, every context recomputed for every choice), ``engine`` (the inference engine's prompt log-probs) and
``shared`` (each distinct context once, then only the continuations; ``evals/lm.py``). Demonstrations are the
eval's default, sampled per item (``per-item``), and with a ``fixed`` set (the same k demonstrations for every
item, what ``--strategy random --fixed-demos`` gives), where the shared scorer also runs the demonstrations
once per batch. Every backend's log-probs are compared with plain's (largest difference, and whether every
item's argmax choice agrees); the times are wall-clock seconds in one process, so the ratios are the result
(the machine may be shared with other work). Writes a JSON file and a bar chart of speed-ups.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmstack.atomic import write_json_atomic
from lmstack.evals.lm import EvalLM
from lmstack.evals.tasks import get_task


def build_requests(lm: EvalLM, task_name: str, limit: int, shots: int, fixed: bool, seed: int
                   ) -> tuple[list[tuple[list[int], list[int]]], list[int], list[int]]:
    """Token requests of the first ``limit`` items, the number of choices per item, and the gold indices."""
    task = get_task(task_name)
    examples = task.examples()[:limit]
    # the fixed set is drawn for an item outside the evaluated ones, so it never contains one of them
    fixed_prefix = task.fewshot_prefix(task.examples()[limit], shots, seed) if fixed else None
    requests, sizes, golds = [], [], []
    for ex in examples:
        prefix = fixed_prefix if fixed else task.fewshot_prefix(ex, shots, seed)
        reqs = task.loglikelihood_requests(ex, prefix)
        requests += [lm.encode_pair(r.context, r.continuation) for r in reqs]
        sizes.append(len(reqs))
        golds.append(ex.gold)
    return requests, sizes, golds


def decisions(logprobs: list[float], sizes: list[int]) -> list[int]:
    out, start = [], 0
    for n in sizes:
        out.append(max(range(n), key=lambda j: logprobs[start + j]))
        start += n
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/prompting/smollm2", help="checkpoint directory")
    parser.add_argument("--tasks", default="arc_easy,boolq")
    parser.add_argument("--limit", type=int, default=200, help="items per task at 0 shots")
    parser.add_argument("--limit-fewshot", type=int, default=40, help="items per task with demonstrations")
    parser.add_argument("--shots", default="0,5")
    parser.add_argument("--backends", default="shared,plain,engine")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/results/prompting/fewshot_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = EvalLM.from_checkpoint(args.model, device="cpu", backend="plain", batch_size=args.batch_size)
    backends = {name: EvalLM(lm.model, lm.tokenizer, backend=name, batch_size=args.batch_size)
                for name in args.backends.split(",")}
    rows = []
    for task_name in args.tasks.split(","):
        for shots in (int(s) for s in args.shots.split(",")):
            for fixed in ([False, True] if shots > 0 else [False]):
                limit = args.limit if shots == 0 else args.limit_fewshot
                requests, sizes, golds = build_requests(lm, task_name, limit, shots, fixed, args.seed)
                row = {"task": task_name, "shots": shots, "demos": "fixed" if fixed else "per-item", "items": limit,
                       "requests": len(requests), "tokens": sum(len(c) + len(x) for c, x in requests), "seconds": {},
                       "acc": {}}
                scores = {}
                for name, backend in backends.items():
                    start = time.perf_counter()
                    scores[name] = [r.logprob for r in backend.loglikelihood_tokens(requests)]
                    row["seconds"][name] = time.perf_counter() - start
                    picked = decisions(scores[name], sizes)
                    row["acc"][name] = sum(p == g for p, g in zip(picked, golds)) / len(golds)
                if "plain" in scores:
                    reference = decisions(scores["plain"], sizes)
                    row["max_abs_diff_vs_plain"] = {n: max(abs(a - b) for a, b in zip(s, scores["plain"]))
                                                    for n, s in scores.items()}
                    row["same_decisions_as_plain"] = {n: decisions(s, sizes) == reference for n, s in scores.items()}
                    row["speedup_vs_plain"] = {n: row["seconds"]["plain"] / t for n, t in row["seconds"].items()}
                print(json.dumps(row), flush=True)
                rows.append(row)
    result = {"model": args.model, "threads": args.threads, "batch_size": args.batch_size, "rows": rows,
              "host": {"python": platform.python_version(), "machine": platform.machine(), "torch": torch.__version__},
              "command": " ".join(sys.argv)}
    out = Path(args.out)
    write_json_atomic(out, result, indent=1)
    plot(rows, out.with_suffix(".png"))
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    names = list(rows[0]["seconds"])
    print(f"{'task':<10} {'shots':>5} {'demos':<9} {'items':>5} " + " ".join(f"{n + ' s':>10}" for n in names)
          + " " + " ".join(f"{n + ' x':>9}" for n in names if n != "plain") + "  same argmax")
    for r in rows:
        speed = r.get("speedup_vs_plain", {})
        print(f"{r['task']:<10} {r['shots']:>5} {r['demos']:<9} {r['items']:>5} "
              + " ".join(f"{r['seconds'][n]:>10.1f}" for n in names) + " "
              + " ".join(f"{speed.get(n, float('nan')):>9.2f}" for n in names if n != "plain")
              + f"  {all(r.get('same_decisions_as_plain', {}).values())}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in rows[0]["seconds"] if n != "plain"]
    labels = [f"{r['task']}\n{r['shots']}-shot {r['demos']}" for r in rows]
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 4))
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        ax.bar([i + j * width for i in range(len(rows))], [r["speedup_vs_plain"][name] for r in rows], width,
               label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(rows))], labels, fontsize=8)
    ax.set_ylabel("speed-up over the plain scorer (x)")
    ax.set_title("log-likelihood scoring, SmolLM2-135M-Instruct, CPU")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
