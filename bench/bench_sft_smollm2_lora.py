"""A small, repeatable LoRA fine-tune of SmolLM2-135M-Instruct on generated tasks, in its own chat template.

    python bench/bench_sft_smollm2_lora.py                 # a few minutes on an idle 2-core CPU
    python bench/bench_sft_smollm2_lora.py --model DIR --steps 80

1. Weights: ``lmstack import smollm2-135m-instruct`` into WORK/smollm2 unless ``--model`` (the packaged
   GGUF, dequantized; its tokenizer carries the model's Jinja chat template, so ``lmstack sft`` renders
   every conversation the way ``transformers``' ``apply_chat_template`` does: tests/test_sft_chat_template.py).
2. Data: :func:`lmstack.data.instruct.make_family_conversations`, every family; ``--n-train`` conversations
   (seed 0) for training and ``--n-test`` per family (their own seeds) held out, with no test prompt in
   the training file.
3. ``lmstack sft --model WORK/smollm2 --data WORK/train.jsonl --out WORK/run --lora`` (packed windows,
   r=8 on q_proj,v_proj, the exact command is printed and recorded), then the same evaluation of the
   model before and of OUT/model (the merged model) after: greedy decoding through the engine until
   ``<|im_end|>``, exact match of the reply (stripped) with the answer, and format compliance
   (:func:`lmstack.data.instruct.answer_shape`), per family.

What the effect is: SmolLM2 answers these questions in sentences ("The answer is 42."), so its exact
match starts low; a few dozen LoRA steps teach the answer-only format of the data. It is a format effect
on synthetic tasks, measured once with one seed; the weights are the Q4_1 package's, dequantized.
Outputs: OUT/results.json (default bench/results/sft_smollm2_lora); the Markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sft import lmstack
from bench_sft_heldout import evaluate

from lmstack.atomic import write_json_atomic, write_text_atomic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="an imported SmolLM2 checkpoint (default: import into --work)")
    ap.add_argument("--work", default="runs/bench_sft_smollm2_lora", help="data, runs (default: %(default)s)")
    ap.add_argument("--out", default="bench/results/sft_smollm2_lora", help="results.json (default: %(default)s)")
    ap.add_argument("--n-train", type=int, default=1500, help="training conversations (default: %(default)s)")
    ap.add_argument("--n-test", type=int, default=20, help="held-out conversations per family (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=40, help="LoRA steps (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=4, help="packed windows per step (default: %(default)s)")
    ap.add_argument("--seq-len", type=int, default=128, help="window length (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=1e-3, help="LoRA learning rate (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (default: %(default)s)")
    a = ap.parse_args()
    from lmstack.data.instruct import TASK_FAMILIES, make_family_conversations

    torch.set_num_threads(a.threads)
    started = time.time()
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(a.model) if a.model else work / "smollm2"
    if not (model / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "lmstack.cli", "import", "smollm2-135m-instruct", "--out", str(model)],
                       check=True)
    families = list(TASK_FAMILIES)
    tests = {f: make_family_conversations(a.n_test, seed=20_000 + i, families=[f]) for i, f in enumerate(families)}
    test_prompts = {c["messages"][0]["content"] for t in tests.values() for c in t}
    train = [c for c in make_family_conversations(2 * a.n_train, seed=0) if c["messages"][0]["content"]
             not in test_prompts][:a.n_train]
    data = work / "train.jsonl"
    write_text_atomic(data, "".join(json.dumps({"messages": c["messages"]}) + "\n" for c in train))
    run = work / "run"
    command = ["sft", "--model", str(model), "--data", str(data), "--out", str(run), "--overwrite", "--lora",
               f"train.max_steps={a.steps}", f"train.batch_size={a.batch_size}", f"train.seq_len={a.seq_len}",
               "sft.packing=true", "train.eval_every=0", "train.eval_batches=2", "train.ckpt_every=0",
               "train.tensorboard=false", "train.max_minutes=0", "train.seed=0", f"optim.lr={a.lr}",
               f"optim.warmup_steps={max(1, a.steps // 10)}", "optim.weight_decay=0", "lora.r=8", "lora.alpha=16",
               "lora.dropout=0", "lora.target_modules=q_proj,v_proj"]
    print("evaluating the model before fine-tuning", file=sys.stderr, flush=True)
    before = evaluate(model, tests, end_token="<|im_end|>")
    sft_began = time.time()
    lmstack(*command, threads=a.threads)
    sft_seconds = time.time() - sft_began
    after = evaluate(run / "model", tests, end_token="<|im_end|>")
    results = {"command": "lmstack " + " ".join(command), "bench": "python bench/bench_sft_smollm2_lora.py "
               + " ".join(sys.argv[1:]), "cpu_count": os.cpu_count(), "before": before, "after": after,
               "sft_seconds": sft_seconds, "wall_seconds": time.time() - started, "settings": vars(a)}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", results, indent=1)
    lines = ["| family | exact match before | after | format compliance before | after |", "|---|---:|---:|---:|---:|"]
    for f in families:
        lines.append(f"| {f} | {before[f]['exact_match']:.0%} | {after[f]['exact_match']:.0%} | "
                     f"{before[f]['format_compliance']:.0%} | {after[f]['format_compliance']:.0%} |")
    print("\n".join(lines))
    print(f"sft {sft_seconds:.0f} s, wall {results['wall_seconds']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
