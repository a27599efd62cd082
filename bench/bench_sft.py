"""What supervised fine-tuning does to a tiny pretrained model, measured on task data with exact answers.

    python bench/bench_sft.py                                   # ~4 min on an idle 2-core CPU, defaults
    python bench/bench_sft.py --base runs/tiny/model            # skip pretraining, fine-tune this checkpoint
    python bench/bench_sft.py --seeds 0,1,2 --sft-steps 400     # more seeds, longer fine-tuning

Pipeline, through the real command line where one exists:

1. Base model (unless ``--base``): a pretraining corpus of plain text, a slice of the classics corpus
   plus plain-text task lines ("Question: ... / Answer: ...", generated with a seed disjoint from the
   fine-tuning data), so the base has seen the kind of task but never the chat format. Then
   ``lmstack tokenizer train`` (BPE with lmstack's chat tokens), ``lmstack data tokenize`` and
   ``lmstack pretrain`` of a 2-layer x 128 GPT.
2. Task conversations (``make_task_conversations``): ``--n-train`` for fine-tuning (seed 0) and
   ``--n-test`` held out (seed 1), never given to ``lmstack sft``. The task space is small (reversing
   one of 16 words has 16 prompts), so many held-out prompts also occur in the training file; the
   table reports exact match on all held-out prompts and on the subset whose prompt is unseen.
3. Variants, each ``lmstack sft`` from the same base, the same training file, the same
   ``--sft-steps``, batch and ``train.seed`` per seed: ``full`` (assistant-only loss, the default),
   ``full-all-tokens`` (``sft.loss_on=all``) and ``lora`` (``--lora``, r=8 on the default layers). The
   learning rate differs by method as it does in practice (``--lr-full``, ``--lr-lora``); that is
   part of what is compared.

Measures, the base measured in the same run:

* exact match: the user turn (and system message) rendered with the chat format plus the
  assistant header, greedy decoding on :class:`lmstack.engine.Engine` until the end-of-turn token
  (at most 16 tokens); a hit needs the end-of-turn token and the text equal to the answer after
  stripping surrounding whitespace;
* held-out assistant-token loss: mean next-token loss of the assistant tokens (with their
  end-of-turn token) of the held-out conversations;
* trainable parameters and fine-tuning wall time (from each run's summary.json); the run's own
  validation curve (``sft.val_fraction`` of the training file; for ``full-all-tokens`` the curve is
  the loss on all tokens, so it is not comparable with the others and is drawn dashed).

Prompt and prefix tuning (``lmstack sft --prompt-tuning`` / ``--prefix-tuning``) are measured in bench/bench_peft_methods.py.

Outputs: OUT/results.json and OUT/sft_effects.png (default OUT: bench/results/sft), runs under
``--work``; the Markdown table goes to stdout. Caveats: a ~1M-parameter model trained for minutes;
few seeds; the tasks are synthetic; the numbers say what changes, not how a large model behaves.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmstack.atomic import write_json_atomic, write_text_atomic

SHAPE = ["model.n_layer=2", "model.n_embd=128", "model.n_head=4", "model.block_size=128"]
KINDS = [("What is", "+", "add"), ("What is", "*", "multiply"), ("Reverse", "", "reverse"),
         ("Write in capital", "", "upper"), ("Format as", "", "name")]


def lmstack(*args: str, threads: int) -> None:
    """Run one lmstack command (its own process, ``threads`` intra-op threads), stopping on failure."""
    print("$ lmstack " + " ".join(args), file=sys.stderr, flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, "-m", "lmstack.cli", *args], check=True, env=env)


def task_kind(prompt: str) -> str:
    for prefix, symbol, name in KINDS:
        if prompt.startswith(prefix) and symbol in prompt:
            return name
    return "other"


def pretrain_corpus(path: Path, classics_bytes: int, task_docs: int) -> None:
    """Plain text for the base: a classics slice and plain-text task lines (no chat tokens), one JSONL."""
    from lmstack.data.instruct import make_task_conversations
    from lmstack.data.corpora import resolve_inputs
    from lmstack.data.readers import iter_documents

    docs, total = [], 0
    for doc in iter_documents(resolve_inputs(["classics"])):  # builds the corpus first if it is missing
        docs.append({"id": f"classics-{len(docs)}", "text": doc.text})
        total += len(doc.text.encode())
        if total >= classics_bytes:
            break
    tasks = make_task_conversations(task_docs * 8, seed=1_000_003)  # a seed far from the SFT data's
    for i in range(task_docs):
        lines = []
        for conv in tasks[8 * i:8 * i + 8]:
            user = next(m["content"] for m in conv["messages"] if m["role"] == "user")
            lines.append(f"Question: {user}\nAnswer: {conv['messages'][-1]['content']}\n")
        docs.append({"id": f"tasks-{i}", "text": "\n".join(lines)})
    random.Random(0).shuffle(docs)
    write_text_atomic(path, "".join(json.dumps(d) + "\n" for d in docs))


def build_base(work: Path, a: argparse.Namespace) -> Path:
    corpus, tok, data, run = work / "corpus.jsonl", work / "tokenizer", work / "shards", work / "base"
    settings = {k: getattr(a, k) for k in ("pretrain_steps", "classics_bytes", "task_docs", "vocab_size")}
    if (run / "model").is_dir() and (work / "base.json").is_file() \
            and json.loads((work / "base.json").read_text()) == settings:
        return run / "model"  # reuse a finished base built with the same settings
    pretrain_corpus(corpus, a.classics_bytes, a.task_docs)
    lmstack("tokenizer", "train", "--input", str(corpus), "--vocab-size", str(a.vocab_size), "--out", str(tok),
            "--no-progress", threads=a.threads)
    lmstack("data", "tokenize", str(corpus), "--tokenizer", str(tok), "--out", str(data), "--overwrite",
            threads=a.threads)
    lmstack("pretrain", "--data", str(data), "--out", str(run), "--preset", "tiny", "--overwrite", *SHAPE,
            f"train.max_steps={a.pretrain_steps}", "train.batch_size=16", "train.seq_len=128", "optim.lr=2e-3",
            f"optim.warmup_steps={a.pretrain_steps // 10}", "train.eval_every=100", "train.eval_batches=4",
            f"train.ckpt_every={a.pretrain_steps}", "train.tensorboard=false", "train.max_minutes=0",
            "train.seed=0", threads=a.threads)
    write_json_atomic(work / "base.json", settings, indent=1)
    return run / "model"


def user_turns(conv: dict) -> list[dict]:
    return [m for m in conv["messages"] if m["role"] != "assistant"]


@torch.no_grad()
def evaluate(model_dir: Path, test: list[dict], train_prompts: set[str]) -> dict[str, Any]:
    """Greedy exact match (all / unseen prompts / per kind) and held-out assistant-token loss of a checkpoint."""
    from lmstack.checkpoint import load_checkpoint
    from lmstack.data.instruct import collate, render_example
    from lmstack.engine.engine import Engine
    from lmstack.engine.sampling import SamplingParams

    ckpt = load_checkpoint(model_dir)
    model, tok = ckpt.model.eval(), ckpt.tokenizer
    end_id = tok.special_tokens["<|end|>"]
    engine = Engine(model, tok, max_num_seqs=64, device="cpu")
    prompts = [tok.render_chat(user_turns(c), add_generation_prompt=True)[0] for c in test]
    params = SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=[end_id])
    outputs = engine.generate(prompts, params)
    hits: list[bool] = []
    for conv, out in zip(test, outputs):
        sample = out.outputs[0]
        ended = bool(sample.token_ids) and sample.token_ids[-1] == end_id
        hits.append(ended and sample.text.strip() == conv["messages"][-1]["content"])
    users = [user_turns(c)[-1]["content"] for c in test]
    unseen = [h for h, u in zip(hits, users) if u not in train_prompts]
    per_kind: dict[str, list[bool]] = {}
    for h, u in zip(hits, users):
        per_kind.setdefault(task_kind(u), []).append(h)
    losses, counts = [], []
    for start in range(0, len(test), 64):  # assistant tokens + their end-of-turn token, as sft trains them
        batch = collate([render_example(tok, c["messages"], "assistant") for c in test[start:start + 64]], tok.pad_id)
        logits = model(batch["input_ids"])[0]  # (B, T, V)
        n = int((batch["labels"] != -1).sum())
        losses.append(float(F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(),
                                            ignore_index=-1, reduction="sum")))
        counts.append(n)
    examples = [{"prompt": u, "answer": c["messages"][-1]["content"], "output": o.outputs[0].text}
                for u, c, o in list(zip(users, test, outputs))[:5]]
    return {"exact_match": sum(hits) / len(hits), "exact_match_unseen": sum(unseen) / len(unseen) if unseen else None,
            "n_unseen": len(unseen), "per_kind": {k: sum(v) / len(v) for k, v in sorted(per_kind.items())},
            "assistant_loss": sum(losses) / sum(counts), "examples": examples}


def run_variant(name: str, seed: int, base: Path, train_file: Path, work: Path, a: argparse.Namespace) -> dict:
    run = work / "sft" / f"{name}-seed{seed}"
    common = [f"train.max_steps={a.sft_steps}", f"train.batch_size={a.batch_size}", "train.seq_len=96",
              f"train.seed={seed}", f"sft.seed={seed}", f"train.eval_every={max(1, a.sft_steps // 6)}",
              "train.eval_batches=4", f"train.ckpt_every={a.sft_steps}", "train.tensorboard=false",
              "train.max_minutes=0", f"optim.warmup_steps={max(1, a.sft_steps // 10)}", "optim.schedule=cosine"]
    extra = {"full": [f"optim.lr={a.lr_full}"],
             "full-all-tokens": [f"optim.lr={a.lr_full}", "sft.loss_on=all"],
             "lora": ["--lora", f"optim.lr={a.lr_lora}", f"lora.r={a.lora_r}", f"lora.alpha={2 * a.lora_r}"]}[name]
    lmstack("sft", "--model", str(base), "--data", str(train_file), "--out", str(run), "--overwrite",
            *extra, *common, threads=a.threads)
    summary = json.loads((run / "summary.json").read_text())
    from lmstack.train.loop import read_metrics

    curve = [(r["step"], r["val_loss"]) for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
    trainable = summary["lora"]["trainable_params"] if "lora" in summary else None
    return {"run": str(run), "wall_seconds": summary["wall_seconds"], "trainable_params": trainable,
            "val_curve": curve}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    names = list(results["variants"])
    means = [results["variants"][n]["exact_match_mean"] for n in names]
    left.bar(names, means, color=["tab:gray", "tab:blue", "tab:orange", "tab:green"][:len(names)])
    for i, n in enumerate(names):
        per_seed = [s["exact_match"] for s in results["variants"][n]["seeds"].values()]
        left.scatter([i] * len(per_seed), per_seed, color="black", s=12, zorder=3)
        left.text(i, means[i], f"{means[i]:.1%}", ha="center", va="bottom", fontsize=9)
    left.set_ylabel("held-out exact match (greedy)")
    left.set_title(f"{results['n_test']} held-out tasks; dots = seeds")
    for n in names:
        for seed, s in results["variants"][n]["seeds"].items():
            if s.get("val_curve"):
                steps, losses = zip(*s["val_curve"])
                right.plot(steps, losses, "--" if n == "full-all-tokens" else "-", marker="o", ms=3,
                           label=f"{n} seed {seed}" + (" (all tokens)" if n == "full-all-tokens" else ""))
    right.set_xlabel("fine-tuning step")
    right.set_ylabel("validation loss of the run's own objective (nats)")
    right.set_title("sft validation curves")
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def markdown(results: dict) -> str:
    lines = [f"Command: `{results['command']}` ({results['wall_minutes']:.1f} min)", "",
             "| variant | trainable params | lr | exact match (all held-out) | exact match (unseen prompts, "
             f"n={results['n_unseen']}) | held-out assistant loss | fine-tune wall s |",
             "|---|---|---|---|---|---|---|"]
    for name, v in results["variants"].items():
        seeds = v["seeds"].values()
        em = ", ".join(f"{s['exact_match']:.1%}" for s in seeds)
        unseen = ", ".join("n/a" if s["exact_match_unseen"] is None else f"{s['exact_match_unseen']:.1%}" for s in seeds)
        loss = ", ".join(f"{s['assistant_loss']:.3f}" for s in seeds)
        wall = ", ".join(f"{s['wall_seconds']:.0f}" for s in seeds if "wall_seconds" in s) or "-"
        lines.append(f"| {name} | {v['trainable_params']:,} | {v['lr'] or '-'} | {em} | {unseen} | {loss} | {wall} |")
    kinds = sorted({k for v in results["variants"].values() for s in v["seeds"].values() for k in s["per_kind"]})
    lines += ["", "Exact match per task kind (first seed):", "",
              "| variant | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for name, v in results["variants"].items():
        first = next(iter(v["seeds"].values()))["per_kind"]
        lines.append(f"| {name} | " + " | ".join(f"{first.get(k, 0):.0%}" for k in kinds) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/sft", help="results.json and sft_effects.png (default: %(default)s)")
    ap.add_argument("--work", default="runs/bench_sft", help="runs and data (default: %(default)s)")
    ap.add_argument("--base", default=None, help="fine-tune this checkpoint instead of pretraining one (default: none)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated fine-tuning seeds (default: %(default)s)")
    ap.add_argument("--pretrain-steps", type=int, default=1000, help="base pretraining steps (default: %(default)s)")
    ap.add_argument("--classics-bytes", type=int, default=1_500_000, help="classics text in the base corpus (default: %(default)s)")
    ap.add_argument("--task-docs", type=int, default=1500, help="plain-text task documents (8 lines each) in the base corpus (default: %(default)s)")
    ap.add_argument("--vocab-size", type=int, default=1024, help="tokenizer vocabulary (default: %(default)s)")
    ap.add_argument("--n-train", type=int, default=2000, help="fine-tuning conversations (default: %(default)s)")
    ap.add_argument("--n-test", type=int, default=300, help="held-out conversations (default: %(default)s)")
    ap.add_argument("--sft-steps", type=int, default=500, help="fine-tuning steps per variant (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=32, help="fine-tuning batch (default: %(default)s)")
    ap.add_argument("--lr-full", type=float, default=5e-4, help="full fine-tuning learning rate (default: %(default)s)")
    ap.add_argument("--lr-lora", type=float, default=3e-3, help="LoRA learning rate (default: %(default)s)")
    ap.add_argument("--lora-r", type=int, default=8, help="LoRA rank; alpha = 2r (default: %(default)s)")
    ap.add_argument("--variants", default="full,full-all-tokens,lora", help="subset to run (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (default: %(default)s)")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = set(variants) - {"full", "full-all-tokens", "lora"}
    if unknown or not seeds:
        sys.exit(f"unknown variants {sorted(unknown)} or no seeds")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from lmstack.data.instruct import make_task_conversations
    from lmstack.models.peft import trainable_parameters
    from lmstack.checkpoint import load_checkpoint

    t0 = time.time()
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    base = Path(a.base) if a.base else build_base(work, a)
    train = make_task_conversations(a.n_train, seed=0)
    test = make_task_conversations(a.n_test, seed=1)
    train_file = work / "tasks_train.jsonl"
    write_text_atomic(train_file, "".join(json.dumps(c) + "\n" for c in train))
    train_prompts = {user_turns(c)[-1]["content"] for c in train}
    total_params = trainable_parameters(load_checkpoint(base).model)[1]

    results: dict[str, Any] = {"command": "python bench/bench_sft.py " + " ".join(sys.argv[1:]), "cpu_count": os.cpu_count(),
                               "base": str(base), "n_train": a.n_train, "n_test": a.n_test, "sft_steps": a.sft_steps,
                               "batch_size": a.batch_size, "seeds": seeds, "settings": vars(a), "variants": {}}
    print("evaluating the base", file=sys.stderr, flush=True)
    base_eval = evaluate(base, test, train_prompts)
    results["n_unseen"] = base_eval["n_unseen"]
    results["variants"]["base"] = {"trainable_params": 0, "lr": None, "seeds": {"-": base_eval},
                                   "exact_match_mean": base_eval["exact_match"]}
    for name in variants:
        per_seed = {}
        for seed in seeds:
            info = run_variant(name, seed, base, train_file, work, a)
            per_seed[str(seed)] = info | evaluate(Path(info["run"]) / "model", test, train_prompts)
            print(f"{name} seed {seed}: exact match {per_seed[str(seed)]['exact_match']:.1%}, "
                  f"assistant loss {per_seed[str(seed)]['assistant_loss']:.3f}", file=sys.stderr, flush=True)
        trainable = next(iter(per_seed.values()))["trainable_params"] or total_params
        results["variants"][name] = {"trainable_params": trainable,
                                     "lr": a.lr_lora if name == "lora" else a.lr_full, "seeds": per_seed,
                                     "exact_match_mean": statistics.fmean(s["exact_match"] for s in per_seed.values())}
        results["wall_minutes"] = (time.time() - t0) / 60
        write_json_atomic(out / "results.json", results, indent=1)
    results["wall_minutes"] = (time.time() - t0) / 60
    write_json_atomic(out / "results.json", results, indent=1)
    plot(results, out / "sft_effects.png")
    print(markdown(results))
    print(f"bench wall time {results['wall_minutes']:.1f} min; plot {out / 'sft_effects.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
