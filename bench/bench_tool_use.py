"""Teaching the calculator habit: a tiny model fine-tuned to call the calculator multiplies 4-6 digit numbers
far better with the tool than the same model trained to answer directly.

    .venv/bin/python bench/bench_tool_use.py [--steps 400] [--batch 16] [--train 3000] [--test 200] [--seed 0]

1. A tokenizer (BPE, 512 tokens, lmstack's chat format) is trained on generated multiplication conversations,
   and an untrained 2-layer GPT (n_embd 128) is saved as the base checkpoint.
2. Two SFT runs with ``lmstack.stages.sft.sft`` (the library call of ``lmstack sft``), same base, steps, batch
   and seed, on the *same* questions (factors of 2-6 digits; lmstack.tools.calculator.calculator_conversations):
   * ``tool``: the assistant calls ``calculator`` with ``A * B``, a tool turn carries the product, the
     assistant repeats it;
   * ``direct``: the assistant writes the product at once.
3. Held-out questions (a different seed; both factors of 4-6 digits, none seen in training) are answered
   greedily: the tool model through the tool loop (lmstack.tools.loop.run_many_with_tools, max 2 rounds),
   the direct model by plain generation; the tool model is also measured with the calculator withheld
   (its call then gets an ``error:`` result), which shows that the tool, not the training, does the work.
   Exact match of the final answer with the product.

Writes bench/results/tools/tool_use.{json,png}. Caveat: the task is synthetic and the model tiny; what it
shows is that a model can learn the habit of delegating arithmetic, and how much exactness that buys.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmstack.atomic import write_atomic, write_json_atomic
from lmstack.checkpoint import save_checkpoint
from lmstack.engine import Engine, SamplingParams
from lmstack.models.gpt import GPT, GPTConfig
from lmstack.stages.sft import sft
from lmstack.tokenizer import Tokenizer
from lmstack.tools.calculator import calculator_conversations, calculator_tool
from lmstack.tools.loop import run_many_with_tools


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in records))


def build_base(work: Path, train: list[dict], seed: int) -> Path:
    texts = []
    for record in train:
        for message in record["messages"]:
            texts.append(message["content"])
            for call in message.get("tool_calls", []):
                texts.append(json.dumps(call["function"]))
    tok = Tokenizer.train(texts, vocab_size=512)
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=512, block_size=128, n_layer=2, n_head=4, n_kv_head=4, n_embd=128)
    save_checkpoint(work / "base", GPT(cfg), {"model": dataclasses.asdict(cfg)}, tokenizer=tok)
    return work / "base"


def fine_tune(name: str, base: Path, data: Path, work: Path, a: argparse.Namespace) -> Path:
    out = work / name
    sft(str(base), [str(data)], out, overwrite=True, progress=False,
        overrides=[f"train.max_steps={a.steps}", f"train.batch_size={a.batch}", "train.seq_len=96", "optim.lr=3e-3",
                   "train.eval_every=0", "train.ckpt_every=0", "train.log_every=50", f"train.seed={a.seed}",
                   "train.device=cpu", "train.tensorboard=false", "optim.warmup_steps=30"])
    return out / "model"


def accuracy(answers: list[str], tests: list[dict]) -> float:
    return sum(a.strip() == t["answer"] for a, t in zip(answers, tests)) / len(tests)


def evaluate(tool_model: Path, direct_model: Path, tests: list[dict]) -> dict[str, float]:
    greedy = SamplingParams(max_tokens=64, temperature=0)
    questions = [[t["messages"][0]] for t in tests]
    engine = Engine.from_checkpoint(str(tool_model), device="cpu", max_num_seqs=64)
    start = time.perf_counter()
    with_tool = run_many_with_tools(engine, engine.tokenizer, questions, [calculator_tool()], max_rounds=2,
                                    params=greedy)
    tool_seconds = time.perf_counter() - start
    withheld = run_many_with_tools(engine, engine.tokenizer, questions, [], max_rounds=2, params=greedy)
    direct_engine = Engine.from_checkpoint(str(direct_model), device="cpu", max_num_seqs=64)
    tok = direct_engine.tokenizer
    prompts = [tok.render_chat(q, add_generation_prompt=True)[0] for q in questions]
    params = dataclasses.replace(greedy, stop_token_ids=list(tok.stop_token_ids))
    start = time.perf_counter()
    direct = [out.outputs[0].text for out in direct_engine.generate(prompts, params)]
    direct_seconds = time.perf_counter() - start
    return {"tool": accuracy([r.answer for r in with_tool], tests),
            "tool_withheld": accuracy([r.answer for r in withheld], tests),
            "direct": accuracy(direct, tests),
            "tool_called": sum(bool(r.tool_calls) for r in with_tool) / len(tests),
            "tool_seconds": tool_seconds, "direct_seconds": direct_seconds,
            "examples": [{"question": t["messages"][0]["content"], "answer": t["answer"], "tool": r.answer,
                          "direct": d} for t, r, d in list(zip(tests, with_tool, direct))[:5]]}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["SFT with calculator\n(tool loop)", "same model,\ncalculator withheld", "SFT direct answers\n(no tool)"]
    values = [results["accuracy"]["tool"], results["accuracy"]["tool_withheld"], results["accuracy"]["direct"]]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    bars = ax.bar(labels, [100 * v for v in values], color=["tab:green", "tab:gray", "tab:orange"])
    for bar, value in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, 100 * value + 1, f"{100 * value:.1f}%", ha="center")
    ax.set_ylim(0, 105)
    ax.set_ylabel("exact answers (%)")
    ax.set_title(f"held-out 4-6 digit multiplication, {results['test']} questions, {results['steps']} SFT steps")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110), suffix=".png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="SFT steps per model")
    parser.add_argument("--batch", type=int, default=16, help="conversations per SFT step")
    parser.add_argument("--train", type=int, default=3000, help="training conversations")
    parser.add_argument("--test", type=int, default=200, help="held-out questions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench_tool_use"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "tools"))
    a = parser.parse_args()
    torch.set_num_threads(2)
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    start, load_start = time.perf_counter(), os.getloadavg()
    train_tool = calculator_conversations(a.train, seed=a.seed, digits=(2, 6))
    train_direct = calculator_conversations(a.train, seed=a.seed, digits=(2, 6), use_tool=False)
    seen = {r["messages"][0]["content"] for r in train_tool}
    tests = [r for r in calculator_conversations(a.test * 2, seed=a.seed + 1000, digits=(4, 6), use_tool=False)
             if r["messages"][0]["content"] not in seen][:a.test]
    write_jsonl(work / "tool.jsonl", train_tool)
    write_jsonl(work / "direct.jsonl", train_direct)
    base = build_base(work, train_tool, a.seed)
    tool_model = fine_tune("sft-tool", base, work / "tool.jsonl", work, a)
    direct_model = fine_tune("sft-direct", base, work / "direct.jsonl", work, a)
    scores = evaluate(tool_model, direct_model, tests)
    results = {"command": " ".join(sys.argv), "steps": a.steps, "train": a.train, "test": len(tests), "seed": a.seed,
               "accuracy": {k: scores[k] for k in ("tool", "tool_withheld", "direct")},
               "tool_called": scores["tool_called"], "eval_seconds": {"tool_loop": scores["tool_seconds"],
                                                                       "direct": scores["direct_seconds"]},
               "examples": scores["examples"], "torch_threads": torch.get_num_threads(),
               "wall_minutes": (time.perf_counter() - start) / 60,
               # wall times mean little without the machine's other work: 1/5/15-minute load averages
               "machine": f"{os.cpu_count()} CPU cores", "load_average_start": load_start,
               "load_average_end": os.getloadavg()}
    write_json_atomic(out / "tool_use.json", results)
    plot(results, out / "tool_use.png")
    print(json.dumps({k: results[k] for k in ("accuracy", "tool_called", "eval_seconds", "wall_minutes")}, indent=1))


if __name__ == "__main__":
    main()
