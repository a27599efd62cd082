"""Held-out task families: does instruction tuning on some task families help a tiny model on a family it never saw?

    python bench/bench_sft_heldout.py                       # ~6 min on an idle 2-core CPU, defaults
    python bench/bench_sft_heldout.py --seeds 0 --sft-steps 150 --families arithmetic,strings,formatting,lists

The claim under test is the one instruction-tuning papers make at scale (FLAN, T0): fine-tuning on a
mixture of task families lets a model follow instructions of an unseen family zero-shot. Here at toy scale:

1. Base model: a tiny GPT (2 x 128) pretrained on a classics slice plus plain-text "Question: ... /
   Answer: ..." lines of every family (drawn with a seed disjoint from the fine-tuning data), so the base
   has seen each kind of task as text, but never the chat format. Built with the real command line
   (``lmstack tokenizer train``, ``lmstack data tokenize``, ``lmstack pretrain``), as bench_sft.py does.
2. Task data: :func:`lmstack.data.instruct.make_family_conversations`, four families of four kinds each
   (arithmetic, strings, formatting, lists; instructions worded differently across families).
   ``--n-test`` test conversations per family (their own seed) are never trained on.
3. Per seed and per family F: ``lmstack sft`` on the other families only (``--n-train`` conversations),
   evaluated zero-shot on F; and one ``lmstack sft`` on every family (the same ``--n-train``), the
   ceiling: the model trained on F directly. Same steps, batch, learning rate and seed everywhere.

Measures on each family's test conversations (greedy decoding through :class:`lmstack.engine.Engine`
until ``<|end|>``, at most 24 tokens): exact match (the answer and the end-of-turn token); format
compliance, the softer one: the reply ends its turn and has the answer's shape
(:func:`lmstack.data.instruct.answer_shape`: digits -> 9, letter runs -> a/A, punctuation kept, so
"Pepper, Tiger" needs a reply shaped "Aa, Aa"); and the turn-end rate alone.

Outputs: OUT/results.json and OUT/heldout.png (default OUT: bench/results/sft_heldout), runs under
``--work``; the Markdown table goes to stdout. Caveats: a ~1M-parameter model, minutes of training,
synthetic families, few seeds; what transfers here is mostly the chat format (ending the turn, short
answers), and a null result on exact match is the expected outcome at this scale, not evidence about
large models.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sft import lmstack

from lmstack.atomic import write_json_atomic, write_text_atomic

SHAPE = ["model.n_layer=2", "model.n_embd=128", "model.n_head=4", "model.block_size=128"]
CONDITIONS = ("base", "held-out", "trained-on")  # zero-shot before SFT, zero-shot after SFT without F, SFT with F


def pretrain_corpus(path: Path, classics_bytes: int, task_docs: int, families: list[str]) -> None:
    """Plain text for the base: a classics slice and plain-text task lines of every family (no chat tokens)."""
    from lmstack.data.corpora import resolve_inputs
    from lmstack.data.instruct import make_family_conversations
    from lmstack.data.readers import iter_documents

    docs, total = [], 0
    for doc in iter_documents(resolve_inputs(["classics"])):
        docs.append({"id": f"classics-{len(docs)}", "text": doc.text})
        total += len(doc.text.encode())
        if total >= classics_bytes:
            break
    tasks = make_family_conversations(task_docs * 8, seed=1_000_003, families=families)
    for i in range(task_docs):
        lines = [f"Question: {c['messages'][0]['content']}\nAnswer: {c['messages'][1]['content']}\n"
                 for c in tasks[8 * i:8 * i + 8]]
        docs.append({"id": f"tasks-{i}", "text": "\n".join(lines)})
    random.Random(0).shuffle(docs)
    write_text_atomic(path, "".join(json.dumps(d) + "\n" for d in docs))


def build_base(work: Path, a: argparse.Namespace, families: list[str]) -> Path:
    corpus, tok, data, run = work / "corpus.jsonl", work / "tokenizer", work / "shards", work / "base"
    settings = {k: getattr(a, k) for k in ("pretrain_steps", "classics_bytes", "task_docs", "vocab_size")} | \
        {"families": families}
    if (run / "model").is_dir() and (work / "base.json").is_file() \
            and json.loads((work / "base.json").read_text()) == settings:
        return run / "model"  # reuse a finished base built with the same settings
    pretrain_corpus(corpus, a.classics_bytes, a.task_docs, families)
    lmstack("tokenizer", "train", "--input", str(corpus), "--vocab-size", str(a.vocab_size), "--out", str(tok),
            "--no-progress", threads=a.threads)
    lmstack("data", "tokenize", str(corpus), "--tokenizer", str(tok), "--out", str(data), "--overwrite",
            threads=a.threads)
    lmstack("pretrain", "--data", str(data), "--out", str(run), "--preset", "tiny", "--overwrite", *SHAPE,
            f"train.max_steps={a.pretrain_steps}", "train.batch_size=16", "train.seq_len=128", "optim.lr=2e-3",
            f"optim.warmup_steps={a.pretrain_steps // 10}", "train.eval_every=0", "train.eval_batches=4",
            f"train.ckpt_every={a.pretrain_steps}", "train.tensorboard=false", "train.max_minutes=0",
            "train.seed=0", threads=a.threads)
    write_json_atomic(work / "base.json", settings, indent=1)
    return run / "model"


@torch.no_grad()
def evaluate(model_dir: Path, tests: dict[str, list[dict]], end_token: str = "<|end|>") -> dict[str, dict[str, Any]]:
    """Per family: exact match, format compliance and turn-end rate of greedy replies (see the docstring),
    and the first two replies; END_TOKEN is the chat format's end of turn."""
    from lmstack.checkpoint import load_checkpoint
    from lmstack.data.instruct import answer_shape
    from lmstack.engine.engine import Engine
    from lmstack.engine.sampling import SamplingParams

    ckpt = load_checkpoint(model_dir)
    tok = ckpt.tokenizer
    end_id = tok.token_to_id(end_token)
    engine = Engine(ckpt.model.eval(), tok, max_num_seqs=64, max_model_len=256, device="cpu")  # short prompts
    scores = {}
    for family, test in tests.items():
        prompts = [tok.render_chat(c["messages"][:1], add_generation_prompt=True)[0] for c in test]
        outputs = engine.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[end_id]))
        exact = shaped = ended = 0
        replies = []
        for conv, out in zip(test, outputs):
            sample = out.outputs[0]
            answer, text = conv["messages"][1]["content"], sample.text.strip()
            turn_ended = bool(sample.token_ids) and sample.token_ids[-1] == end_id
            ended += turn_ended
            exact += turn_ended and text == answer
            shaped += turn_ended and answer_shape(text) == answer_shape(answer)
            replies.append({"prompt": conv["messages"][0]["content"], "answer": answer, "reply": sample.text})
        scores[family] = {"exact_match": exact / len(test), "format_compliance": shaped / len(test),
                          "ended_turn": ended / len(test), "examples": replies[:2]}
    return scores


def fine_tune(name: str, seed: int, base: Path, train: list[dict], work: Path, a: argparse.Namespace) -> Path:
    """``lmstack sft`` of BASE on TRAIN into WORK/sft/NAME-seedSEED; returns the model directory."""
    data = work / "data" / f"{name}-seed{seed}.jsonl"
    write_text_atomic(data, "".join(json.dumps({"messages": c["messages"]}) + "\n" for c in train))
    run = work / "sft" / f"{name}-seed{seed}"
    lmstack("sft", "--model", str(base), "--data", str(data), "--out", str(run), "--overwrite",
            f"train.max_steps={a.sft_steps}", f"train.batch_size={a.batch_size}", "train.seq_len=64",
            f"train.seed={seed}", f"sft.seed={seed}", "sft.packing=true", "train.eval_every=0",
            "train.eval_batches=2", f"train.ckpt_every={a.sft_steps}", "train.tensorboard=false",
            "train.max_minutes=0", f"optim.warmup_steps={max(1, a.sft_steps // 10)}", "optim.schedule=cosine",
            f"optim.lr={a.lr}", threads=a.threads)
    return run / "model"


def summarize(results: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean over seeds per family, condition and metric."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for family in results["families"]:
        table[family] = {}
        for condition in CONDITIONS:
            per_seed = [s[condition][family] for s in results["seeds"].values()]
            table[family][condition] = {metric: statistics.fmean(p[metric] for p in per_seed)
                                        for metric in ("exact_match", "format_compliance", "ended_turn")}
    return table


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families, table = results["families"], results["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
    width = 0.27
    colors = {"base": "tab:gray", "held-out": "tab:orange", "trained-on": "tab:blue"}
    labels = {"base": "base, no SFT", "held-out": "SFT on the other families (zero-shot)",
              "trained-on": "SFT on all families (ceiling)"}
    for ax, metric in zip(axes, ("exact_match", "format_compliance")):
        for j, condition in enumerate(CONDITIONS):
            xs = [i + (j - 1) * width for i in range(len(families))]
            ax.bar(xs, [table[f][condition][metric] for f in families], width, color=colors[condition],
                   label=labels[condition])
            for seed in results["seeds"].values():  # one dot per seed
                ax.scatter(xs, [seed[condition][f][metric] for f in families], color="black", s=8, zorder=3)
        ax.set_xticks(range(len(families)), families)
        ax.set_title(metric.replace("_", " ") + " on the family's test tasks")
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("fraction of test tasks (greedy)")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"held-out task families: {len(results['seeds'])} seed(s), dots = seeds", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Command: `{results['command']}` ({results['wall_minutes']:.1f} min, {results['cpu_count']} CPUs)", "",
             ("| test family | base: exact / format / turn end | SFT without the family (zero-shot) | "
              "SFT with it (ceiling) |"), "|---|---|---|---|"]
    for family, row in results["summary"].items():
        cells = [f"{row[c]['exact_match']:.0%} / {row[c]['format_compliance']:.0%} / {row[c]['ended_turn']:.0%}"
                 for c in CONDITIONS]
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/sft_heldout", help="results.json and heldout.png (default: %(default)s)")
    ap.add_argument("--work", default="runs/bench_sft_heldout", help="runs and data (default: %(default)s)")
    ap.add_argument("--families", default="arithmetic,strings,formatting,lists",
                    help="families; each is held out in turn (default: %(default)s)")
    ap.add_argument("--seeds", default="0,1", help="comma-separated fine-tuning seeds (default: %(default)s)")
    ap.add_argument("--pretrain-steps", type=int, default=600, help="base pretraining steps (default: %(default)s)")
    ap.add_argument("--classics-bytes", type=int, default=1_000_000, help="classics text in the base corpus (default: %(default)s)")
    ap.add_argument("--task-docs", type=int, default=1000, help="plain-text task documents (8 lines each) (default: %(default)s)")
    ap.add_argument("--vocab-size", type=int, default=1024, help="tokenizer vocabulary (default: %(default)s)")
    ap.add_argument("--n-train", type=int, default=3000, help="fine-tuning conversations per run (default: %(default)s)")
    ap.add_argument("--n-test", type=int, default=100, help="test conversations per family (default: %(default)s)")
    ap.add_argument("--sft-steps", type=int, default=150, help="fine-tuning steps per run (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=16, help="packed 64-token windows per step (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (default: %(default)s)")
    a = ap.parse_args()
    from lmstack.data.instruct import make_family_conversations

    families = [f.strip() for f in a.families.split(",") if f.strip()]
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    if len(families) < 2 or not seeds:
        sys.exit("need at least two families (one is held out) and one seed")
    torch.set_num_threads(a.threads)
    t0 = time.time()
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    base = build_base(work, a, families)
    tests = {f: make_family_conversations(a.n_test, seed=10_000 + i, families=[f]) for i, f in enumerate(families)}
    test_prompts = {c["messages"][0]["content"] for t in tests.values() for c in t}
    results: dict[str, Any] = {"command": "python bench/bench_sft_heldout.py " + " ".join(sys.argv[1:]),
                               "cpu_count": os.cpu_count(), "families": families, "settings": vars(a), "seeds": {}}
    print("evaluating the base", file=sys.stderr, flush=True)
    base_scores = evaluate(base, tests)
    for seed in seeds:
        scores: dict[str, Any] = {"base": base_scores, "held-out": {}}
        # training data never contains a test prompt (the task space is small: some prompts recur)
        everything = [c for c in make_family_conversations(a.n_train * 2, seed=seed, families=families)
                      if c["messages"][0]["content"] not in test_prompts][:a.n_train]
        scores["trained-on"] = evaluate(fine_tune("all", seed, base, everything, work, a), tests)
        for family in families:
            others = [f for f in families if f != family]
            train = [c for c in make_family_conversations(a.n_train * 2, seed=seed, families=others)
                     if c["messages"][0]["content"] not in test_prompts][:a.n_train]
            scores["held-out"][family] = evaluate(fine_tune(f"without-{family}", seed, base, train, work, a),
                                                  {family: tests[family]})[family]
            print(f"seed {seed}, {family} held out: {scores['held-out'][family]}", file=sys.stderr, flush=True)
        results["seeds"][str(seed)] = scores
    results["summary"] = summarize(results)
    results["wall_minutes"] = (time.time() - t0) / 60
    write_json_atomic(out / "results.json", results, indent=1)
    plot(results, out / "heldout.png")
    print(markdown(results))
    print(f"bench wall time {results['wall_minutes']:.1f} min; plot {out / 'heldout.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
