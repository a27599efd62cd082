"""`lmstack dpo` against TRL's DPOTrainer: optimizer steps per second on the same model, pairs, batch and length.

    python bench/bench_dpo_trl.py                     # ~4 min on an idle 2-core CPU, defaults
    python bench/bench_dpo_trl.py --steps 10 --batch-size 4 --references copy

TRL runs from its own virtual environment (``--trl-python``, default runs/venv-trl/bin/python): a venv made with
``python -m venv`` whose site-packages has a ``.pth`` line naming this project's site-packages, and ``pip install
trl`` into it, so both sides import the same torch and transformers and only TRL itself is added.

Same work on both sides:

1. Weights: SmolLM2-135M-Instruct, ``lmstack import smollm2-135m-instruct`` (or ``--model``), exported with
   :func:`lmstack.interop.hf_export.export_hf` to a LlamaForCausalLM directory (fp32) for TRL, so both start
   from the same numbers.
2. Pairs: ``--n`` rule-labelled pairs (:func:`lmstack.data.preference.make_preference_pairs`) in TRL's
   conversational format (prompt messages, one assistant message per completion), which both render with the
   model's own chat template; pairs longer than ``--max-length`` tokens are left out on both sides (lmstack
   ``dpo.overlong=drop``; TRL ``max_length``, which then never truncates).
3. Training: full fine-tuning, sigmoid loss, beta 0.1, batch ``--batch-size`` pairs, AdamW at a constant LR,
   grad clip 1.0, fp32 on the CPU with ``--threads`` torch threads, one subprocess per run. Reference modes
   (``--references``): ``copy`` (a frozen second model scores every batch: TRL's default, lmstack
   ``dpo.reference=copy``) and ``precomputed`` (the reference scores the whole set once before training: TRL
   ``precompute_ref_log_probs=True``, lmstack's default). ``--warmup`` steps are run first and left out.

Measures: seconds per optimizer step over the timed steps (lmstack: from its metrics log, the loop's own tokens
over tokens/s at ``train.log_every=1``; TRL: a TrainerCallback's wall time from step begin to step end), the
ratio, the real (unpadded) tokens per step, and the mean loss of the timed steps on each side.

Caveats: the data order differs (each side shuffles with its own sampler), so the per-step losses are not
paired; the step times cover the same amount of work only on average (lengths vary per batch), so the bench
reports the tokens per step too. TRL's precompute pass and lmstack's are outside the timed steps on both sides.
Outputs: OUT/results.json (default bench/results/dpo); the Markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "smollm2-135m-instruct"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/dpo", help="results directory (default: %(default)s)")
    ap.add_argument("--work", default="runs/bench_dpo_trl", help="work directory (default: %(default)s)")
    ap.add_argument("--model", default=None, help="an imported SmolLM2 checkpoint (default: import it into WORK)")
    ap.add_argument("--trl-python", default="runs/venv-trl/bin/python", help="python with trl (default: %(default)s)")
    ap.add_argument("--n", type=int, default=400, help="pairs (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per step (default: %(default)s)")
    ap.add_argument("--max-length", type=int, default=128, help="longest pair in tokens (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=1e-6, help="learning rate (default: %(default)s)")
    ap.add_argument("--references", default="copy,precomputed", help="reference modes (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per side (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)  # internal: run one side in this process
    ap.add_argument("--reference", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- the two sides (subprocesses)

def run_lmstack_side(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from lmstack.stages.dpo import dpo
    from lmstack.train.loop import read_metrics

    run = work / f"lmstack-{args.reference}"
    overrides = [f"train.batch_size={args.batch_size}", f"train.seq_len={args.max_length}",
                 f"train.max_steps={args.warmup + args.steps}", "train.log_every=1", "train.eval_every=0",
                 "train.eval_batches=1", "train.ckpt_every=0", "train.keep_last=1", f"train.seed={args.seed}",
                 "train.device=cpu", "train.dtype=fp32", "train.tensorboard=false", f"optim.lr={args.lr}",
                 "optim.schedule=constant", "optim.warmup_steps=0", "optim.weight_decay=0", "optim.grad_clip=1.0",
                 "dpo.beta=0.1", "dpo.loss=sigmoid", f"dpo.reference={args.reference}", "dpo.overlong=drop",
                 "dpo.val_fraction=0.01"]
    started = time.perf_counter()
    summary = dpo(args.model, [str(work / "pairs.jsonl")], run, overrides=overrides, overwrite=True, progress=False)
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r and "event" not in r and "val_loss" not in r]
    seconds, tokens, losses, previous = [], [], [], 0
    for row in rows:  # tokens is the running total: a step's tokens over its tokens/s is its seconds
        tokens.append(row["tokens"] - previous)
        seconds.append((row["tokens"] - previous) / row["tokens_per_second"])
        losses.append(row["loss"])
        previous = row["tokens"]
    return {"step_seconds": seconds, "tokens": tokens, "losses": losses, "pairs": summary["data"]["used"],
            "wall_seconds": time.perf_counter() - started}


def run_trl_side(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.start = 0.0

        def on_step_begin(self, *a, **k) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k) -> None:
            self.seconds.append(time.perf_counter() - self.start)

    started = time.perf_counter()
    records = [json.loads(line) for line in (work / "pairs.jsonl").read_text().splitlines()]
    keep = json.loads((work / "kept.json").read_text())  # the pairs lmstack keeps at --max-length
    dataset = Dataset.from_list([records[i] for i in keep])
    tokenizer = AutoTokenizer.from_pretrained(work / "hf")
    model = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32, attn_implementation="sdpa")
    config = DPOConfig(output_dir=str(work / f"trl-{args.reference}"), per_device_train_batch_size=args.batch_size,
                       max_steps=args.warmup + args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
                       warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                       report_to=[], use_cpu=True, seed=args.seed, beta=0.1, loss_type=["sigmoid"],
                       max_length=None, precompute_ref_log_probs=args.reference == "precomputed",
                       dataloader_num_workers=0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8)
    timer = StepTimer()
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[timer])
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"step_seconds": timer.seconds, "losses": losses, "pairs": len(dataset),
            "wall_seconds": time.perf_counter() - started}


# ----------------------------------------------------------------------------- preparation (parent process)

def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Weights (import + HF export), the pairs in TRL's conversational format, and which pairs fit."""
    from lmstack.checkpoint import load_checkpoint
    from lmstack.data.preference import make_preference_pairs
    from lmstack.interop.hf_export import export_hf

    if args.model is None:
        args.model = str(work / "smollm2")
        if not (Path(args.model) / "config.json").is_file():
            subprocess.run([sys.executable, "-m", "lmstack.cli", "import", PACKAGE, "--out", args.model], check=True)
    if not (work / "hf" / "config.json").is_file():
        export_hf(args.model, work / "hf", dtype="float32")
    records = [{"prompt": [{"role": "user", "content": p["prompt"]}],
                "chosen": [{"role": "assistant", "content": p["chosen"]}],
                "rejected": [{"role": "assistant", "content": p["rejected"]}]}
               for p in make_preference_pairs(args.n, seed=args.seed)]
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenizer = load_checkpoint(args.model).tokenizer
    kept = []
    for i, record in enumerate(records):
        one = work / "one.jsonl"
        one.write_text(json.dumps(record) + "\n")
        if _fits(one, tokenizer, args.max_length):
            kept.append(i)
    (work / "kept.json").write_text(json.dumps(kept))
    return {"pairs": len(records), "kept": len(kept)}


def _fits(path: Path, tokenizer: Any, max_length: int) -> bool:
    from lmstack.data.preference import PreferenceStats, load_preference
    from lmstack.errors import DataError

    stats = PreferenceStats()
    try:
        load_preference([path], tokenizer, max_length, overlong="drop", val_fraction=0, stats=stats)
    except DataError:
        return False
    return stats.dropped == 0


def run_side(side: str, reference: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    python = sys.executable if side == "lmstack" else args.trl_python
    cmd = [python, __file__, "--side", side, "--reference", reference, "--work", str(work), "--model", args.model,
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--lr", str(args.lr), "--seed", str(args.seed)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    print(f"$ {side} side, reference {reference}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    return json.loads((work / f"{side}-{reference}.json").read_text())


def summarize(args: argparse.Namespace, results: dict[str, Any]) -> str:
    lines = [f"Command: `{results['command']}`; {results['cpu_count']} CPUs, {args.threads} torch threads per side, "
             f"fp32; SmolLM2-135M-Instruct, batch {args.batch_size} pairs, pairs up to {args.max_length} tokens "
             f"({results['data']['kept']} of {results['data']['pairs']}), {args.steps} timed steps after "
             f"{args.warmup}.", "",
             "| reference | lmstack s/step | TRL s/step | speed-up (TRL s / lmstack s) | lmstack tokens/step | "
             "lmstack mean loss | TRL mean loss |", "|---|---|---|---|---|---|---|"]
    for reference, r in results["runs"].items():
        lines.append(f"| {reference} | {r['lmstack_s_per_step']:.3f} | {r['trl_s_per_step']:.3f} | "
                     f"{r['speedup']:.2f}x | {r['lmstack_tokens_per_step']:.0f} | {r['lmstack_mean_loss']:.4f} | "
                     f"{r['trl_mean_loss']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(args.work)
    torch.set_num_threads(args.threads)
    if args.side is not None:
        result = run_lmstack_side(args, work) if args.side == "lmstack" else run_trl_side(args, work)
        (work / f"{args.side}-{args.reference}.json").write_text(json.dumps(result))
        return
    started = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    data = prepare(args, work)
    results: dict[str, Any] = {"command": "python bench/bench_dpo_trl.py " + " ".join(sys.argv[1:] if argv is None
                                                                                      else argv),
                               "cpu_count": os.cpu_count(), "settings": {k: v for k, v in vars(args).items()
                                                                         if k not in ("side", "reference")},
                               "data": data, "runs": {}}
    for reference in [r.strip() for r in args.references.split(",") if r.strip()]:
        sides = {side: run_side(side, reference, args, work) for side in ("lmstack", "trl")}
        timed = {side: s["step_seconds"][args.warmup:args.warmup + args.steps] for side, s in sides.items()}
        ours, theirs = statistics.fmean(timed["lmstack"]), statistics.fmean(timed["trl"])
        results["runs"][reference] = {
            "lmstack_s_per_step": ours, "trl_s_per_step": theirs, "speedup": theirs / ours,
            "lmstack_tokens_per_step": statistics.fmean(sides["lmstack"]["tokens"][args.warmup:]),
            "lmstack_mean_loss": statistics.fmean(sides["lmstack"]["losses"][args.warmup:]),
            "trl_mean_loss": statistics.fmean(sides["trl"]["losses"][args.warmup:]), "sides": sides}
    results["wall_minutes"] = (time.perf_counter() - started) / 60
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from lmstack.atomic import write_json_atomic

    write_json_atomic(out / "trl_speed.json", results, indent=1)
    print(summarize(args, results))


if __name__ == "__main__":
    main()
