"""`lmstack dpo` against TRL's DPOTrainer: optimizer steps per second on the same model, pairs, order and batch,
measured in alternating rounds so both sides see the same machine load.

    python bench/bench_dpo_trl.py                       # 10-15 min on a busy 2-core CPU (load ~16), defaults
    python bench/bench_dpo_trl.py --rounds 5 --steps 4 --references copy
    python bench/bench_dpo_trl.py --layers 0 --steps 1   # the whole SmolLM2-135M-Instruct (~10 s a step on 2 cores)

TRL runs from its own virtual environment (``--trl-python``, default runs/venv-trl/bin/python): a venv made with
``python -m venv runs/venv-trl``, a ``.pth`` file in its site-packages naming this project's site-packages, and
``pip install trl`` into it, so both sides import the same torch and transformers and only TRL is added.

Same work on both sides:

1. Weights: by default a SmolLM2-shaped Llama reduced to ``--layers`` x ``--width`` (GQA, SwiGLU, RoPE, tied
   embeddings) with SmolLM2-135M-Instruct's own tokenizer and chat template (49,152 tokens: the output head is a
   real model's), randomly initialised with ``--seed``; ``--layers 0`` takes the whole imported SmolLM2-135M-Instruct
   instead (``--base``, imported with ``lmstack import smollm2-135m-instruct`` when missing). The lmstack checkpoint
   is exported with :func:`lmstack.interop.hf_export.export_hf` to a LlamaForCausalLM directory (fp32) for TRL, so
   both start from the same numbers.
2. Pairs: ``--n`` rule-labelled pairs (:func:`lmstack.data.preference.make_preference_pairs`) in TRL's
   conversational format, rendered by each side with the model's chat template; pairs longer than
   ``--max-length`` tokens are left out of the file both sides read.
3. Order: TRL gets the pairs in exactly the order lmstack's loader draws them (its held-out split and its seeded
   shuffle, read off lmstack's own loader and checked batch by batch) with a sequential sampler, so step k is the
   same batch on both sides and the per-step losses are paired: step 1 is ln 2 on both (policy = reference), and
   the later steps agree to the extent the two implementations compute the same update.
4. Training: full fine-tuning, sigmoid loss, beta 0.1, batch ``--batch-size`` pairs, AdamW (0.9, 0.95, eps 1e-8,
   no weight decay) at a constant LR, grad clip 1.0, fp32 with ``--threads`` torch threads on both sides, no
   activation checkpointing (TRL 1.16's DPOConfig defaults to ``bf16=True`` and ``gradient_checkpointing=True``;
   both are turned off here, as on the lmstack side).
   Reference modes (``--references``): ``copy`` (a frozen second model scores every batch: TRL's default, lmstack
   ``dpo.reference=copy``) and ``precomputed`` (the reference scores every pair once before training: TRL
   ``precompute_ref_log_probs=True``, lmstack's default; that pass is outside the timed steps on both sides).

Rounds: ``--rounds`` times, for each reference mode, an lmstack run then a TRL run, each a fresh subprocess of
``--warmup`` + ``--steps`` optimizer steps; only the ``--steps`` after the warm-up are timed. Alternating keeps a
shared machine's changing load on both sides; the load average is recorded before every run.

Measures: seconds per optimizer step (lmstack: the loop's own log interval at ``train.log_every=1``, tokens over
tokens/s, which spans loading the batch, the reference, forward, backward and the optimizer; TRL: a TrainerCallback
from step begin to step end, which leaves out fetching the batch, a small favour to TRL), the median over every
timed step of every round per side, steps per second, the ratio (lmstack steps/s over TRL steps/s), the
per-round ratios, and the losses of the first round's steps on both sides. Writes OUT (default
bench/results/dpo_trl/results.json) and prints a Markdown table.

Caveats: TRL 1.16 forms the logits of every position (it has no option to keep only the completion's); lmstack
applies the output head at completion positions only. Chat rendering may differ in a token around the turn
ends (each side's own template code); the paired losses show how much that matters.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="bench/results/dpo_trl/results.json", help="results file")
    ap.add_argument("--work", default="runs/bench_dpo_trl", help="work directory")
    ap.add_argument("--base", default=None, help="an imported SmolLM2-135M-Instruct checkpoint "
                                                 "(default: WORK/smollm2, imported when missing)")
    ap.add_argument("--layers", type=int, default=4, help="layers of the reduced model (0: the whole base model)")
    ap.add_argument("--width", type=int, default=256, help="width of the reduced model")
    ap.add_argument("--trl-python", default="runs/venv-trl/bin/python", help="python with trl")
    ap.add_argument("--n", type=int, default=48, help="pairs generated (both sides precompute references over all)")
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    ap.add_argument("--max-length", type=int, default=128, help="longest pair in tokens")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps per run")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (lmstack run, TRL run) per reference")
    ap.add_argument("--lr", type=float, default=1e-4, help="learning rate (large enough that step 2 moves)")
    ap.add_argument("--references", default="copy,precomputed", help="reference modes, comma-separated")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per side")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights, pairs and data order")
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)  # internal: run one side in this process
    ap.add_argument("--reference", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tag", default="", help=argparse.SUPPRESS)
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
                 "optim.beta1=0.9", "optim.beta2=0.95", "optim.eps=1e-8", "dpo.beta=0.1", "dpo.loss=sigmoid",
                 "dpo.sft_weight=0",  # plain DPO, as TRL's DPOTrainer without rpo_alpha
                 f"dpo.reference={args.reference}", "dpo.overlong=drop", f"dpo.val_fraction={VAL_FRACTION}",
                 f"dpo.seed={args.seed}"]
    dpo(work / "model", [str(work / "pairs.jsonl")], run, overrides=overrides, overwrite=True, progress=False)
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r and "event" not in r and "val_loss" not in r]
    seconds, tokens, losses, previous = [], [], [], 0
    for row in rows:  # tokens is the running total: a step's tokens over its tokens/s is its seconds
        tokens.append(row["tokens"] - previous)
        seconds.append((row["tokens"] - previous) / row["tokens_per_second"])
        losses.append(row["loss"])
        previous = row["tokens"]
    return {"step_seconds": seconds, "tokens": tokens, "losses": losses}


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

    records = [json.loads(line) for line in (work / "pairs.jsonl").read_text().splitlines()]
    order = json.loads((work / "order.json").read_text())  # lmstack's loader order (prepare)
    dataset = Dataset.from_list([records[i] for i in order])
    tokenizer = AutoTokenizer.from_pretrained(work / "hf")
    model = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32, attn_implementation="sdpa")
    config = DPOConfig(output_dir=str(work / f"trl-{args.reference}"), per_device_train_batch_size=args.batch_size,
                       max_steps=args.warmup + args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
                       warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                       report_to=[], use_cpu=True, seed=args.seed, beta=0.1, loss_type=["sigmoid"],
                       max_length=None, precompute_ref_log_probs=args.reference == "precomputed",
                       train_sampling_strategy="sequential", dataloader_num_workers=0, adam_beta1=0.9,
                       adam_beta2=0.95, adam_epsilon=1e-8,
                       bf16=False, gradient_checkpointing=False)  # TRL 1.16's defaults are True: fp32, no recompute
    timer = StepTimer()
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[timer])
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"step_seconds": timer.seconds, "losses": losses}


# ----------------------------------------------------------------------------- preparation (parent process)

VAL_FRACTION = 0.01  # lmstack's dpo holds out at least one pair; TRL gets only the training pairs


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Weights (lmstack checkpoint + HF export), the pairs that fit, and lmstack's loader order for TRL."""
    from lmstack.checkpoint import load_checkpoint, save_checkpoint
    from lmstack.config import model_config_from_dict
    from lmstack.data.preference import (
        PreferenceLoader,
        load_preference,
        make_preference_pairs,
    )
    from lmstack.interop.hf_export import export_hf
    from lmstack.models import build_model

    work.mkdir(parents=True, exist_ok=True)
    base = Path(args.base) if args.base else work / "smollm2"
    if not (base / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "lmstack.cli", "import", PACKAGE, "--out", str(base)], check=True)
    source = load_checkpoint(base)
    if args.layers:
        heads = max(1, args.width // 64)
        config = {**source.config["model"], "n_layer": args.layers, "n_embd": args.width, "n_head": heads,
                  "n_kv_head": max(1, heads // 2), "head_dim": None, "block_size": 512,
                  "mlp_hidden": 64 * round(args.width * 8 / 3 / 64)}
        torch.manual_seed(args.seed)
        model = build_model(model_config_from_dict(config))
        save_checkpoint(work / "model", model, {"model": dataclasses.asdict(model.config)}, tokenizer=source.tokenizer)
    else:
        save_checkpoint(work / "model", source.model, {"model": source.config["model"]}, tokenizer=source.tokenizer)
    export_hf(work / "model", work / "hf", dtype="float32")
    tokenizer = source.tokenizer
    records = [{"prompt": [{"role": "user", "content": p["prompt"]}],
                "chosen": [{"role": "assistant", "content": p["chosen"]}],
                "rejected": [{"role": "assistant", "content": p["rejected"]}]}
               for p in make_preference_pairs(args.n, seed=args.seed)]
    kept, keys = [], []
    for record in records:  # rendered one by one exactly as the stage does; over-long pairs are left out
        pair = load_preference_one(record, tokenizer, args.max_length, work)
        if pair is not None:
            kept.append(record)
            keys.append(_key(pair))
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    # lmstack's training pairs and the order its loader draws them in, mapped back to records for TRL
    data = load_preference([work / "pairs.jsonl"], tokenizer, args.max_length, overlong="drop",
                           val_fraction=VAL_FRACTION, seed=args.seed)
    index_of = {key: i for i, key in enumerate(keys)}  # duplicates render identically: any copy will do
    shuffled = list(range(len(data.train)))
    random.Random(args.seed).shuffle(shuffled)  # PreferenceLoader's first epoch (seed + epoch 0)
    order = [index_of[_key(data.train[i])] for i in shuffled]
    needed = (args.warmup + args.steps) * args.batch_size
    if needed > len(order):
        raise SystemExit(f"{needed} pairs needed for {args.warmup + args.steps} steps, {len(order)} fit: raise --n")
    loader = iter(PreferenceLoader(data.train, args.batch_size, seed=args.seed, pad_id=tokenizer.pad_id))
    for step in range(args.warmup + args.steps):  # the claim above, checked batch by batch
        batch = next(loader)
        lengths = batch["attention_mask"][:args.batch_size].sum(1).tolist()  # the chosen rows come first
        got = [row[:n] for row, n in zip(batch["input_ids"][:args.batch_size].tolist(), lengths)]
        expected = [data.train[i].prompt + data.train[i].chosen
                    for i in shuffled[step * args.batch_size:(step + 1) * args.batch_size]]
        if got != expected:
            raise SystemExit(f"lmstack's loader order is not the one replayed for TRL (step {step + 1}); "
                             "update prepare()")
    (work / "order.json").write_text(json.dumps(order))
    return {"pairs": len(records), "kept": len(kept), "train_pairs": len(data.train)}


def _key(pair: Any) -> tuple:
    return tuple(pair.prompt), tuple(pair.chosen), tuple(pair.rejected)


def load_preference_one(record: dict[str, Any], tokenizer: Any, max_length: int, work: Path) -> Any:
    """The one pair ``record`` renders to (None when it is over ``max_length``), through the stage's reader."""
    from lmstack.data.preference import load_preference
    from lmstack.errors import DataError

    one = work / "one.jsonl"
    one.write_text(json.dumps(record) + "\n")
    try:
        return load_preference([one], tokenizer, max_length, overlong="drop", val_fraction=0).train[0]
    except DataError:  # "no usable preference pair": the one pair was over-long
        return None


def run_side(side: str, reference: str, args: argparse.Namespace, work: Path, tag: str) -> dict[str, Any]:
    python = sys.executable if side == "lmstack" else args.trl_python
    cmd = [python, __file__, "--side", side, "--reference", reference, "--work", str(work), "--tag", tag,
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--lr", str(args.lr), "--seed", str(args.seed),
           "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    load = os.getloadavg()[0]
    print(f"$ {side} side, reference {reference}, {tag}, load {load:.1f}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    result = json.loads((work / f"{side}-{reference}-{tag}.json").read_text())
    return {**result, "load_before": load}


def summarize(results: dict[str, Any]) -> str:
    s = results["settings"]
    header = (f"Command: `{results['command']}`; {results['cpu_count']} CPUs, {s['threads']} torch thread(s) per "
              f"side, fp32; {results['model']}; batch {s['batch_size']} pairs ({results['data']['kept']} of "
              f"{results['data']['pairs']} pairs fit in {s['max_length']} tokens); {s['rounds']} alternating rounds "
              f"of {s['steps']} timed steps after {s['warmup']}; load average {results['load']['min']:.1f}-"
              f"{results['load']['max']:.1f} (median {results['load']['median']:.1f}).")
    columns = ("| reference | lmstack s/step | TRL s/step | lmstack steps/s | TRL steps/s | lmstack / TRL | "
               "per-round ratios | max loss difference, round 1 |")
    lines = [header, "", columns, "|---|---|---|---|---|---|---|---|"]
    for reference, r in results["runs"].items():
        lines.append(f"| {reference} | {r['lmstack_median_s']:.3f} | {r['trl_median_s']:.3f} | "
                     f"{1 / r['lmstack_median_s']:.3f} | {1 / r['trl_median_s']:.3f} | **{r['speedup']:.2f}x** | "
                     f"{', '.join(f'{x:.2f}' for x in r['round_speedups'])} | {r['max_loss_diff']:.2e} |")
    for reference, r in results["runs"].items():
        lines.append(f"\n{reference}, round 1 losses per step: lmstack "
                     f"{', '.join(f'{x:.5f}' for x in r['losses_round1']['lmstack'])}; TRL "
                     f"{', '.join(f'{x:.5f}' for x in r['losses_round1']['trl'])}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(args.work)
    torch.set_num_threads(args.threads)
    if args.side is not None:
        result = run_lmstack_side(args, work) if args.side == "lmstack" else run_trl_side(args, work)
        (work / f"{args.side}-{args.reference}-{args.tag}.json").write_text(json.dumps(result))
        return
    if not Path(args.trl_python).is_file():
        sys.exit(f"--trl-python {args.trl_python}: not found; make a venv with trl (see the module docstring)")
    started = time.perf_counter()
    data = prepare(args, work)
    references = [r.strip() for r in args.references.split(",") if r.strip()]
    rounds: dict[str, list[dict[str, Any]]] = {reference: [] for reference in references}
    for number in range(1, args.rounds + 1):
        for reference in references:
            rounds[reference].append({side: run_side(side, reference, args, work, f"r{number}")
                                      for side in ("lmstack", "trl")})
    loads = [run[side]["load_before"] for runs in rounds.values() for run in runs for side in run]
    model = (f"SmolLM2-135M-Instruct's tokenizer and chat template (vocab 49,152) on a Llama reduced to "
             f"{args.layers} layers x {args.width} wide, random init (seed {args.seed})" if args.layers
             else "SmolLM2-135M-Instruct (all 30 layers)")
    results: dict[str, Any] = {
        "command": "python bench/bench_dpo_trl.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "cpu_count": os.cpu_count(), "model": model, "data": data,
        "settings": {k: v for k, v in vars(args).items() if k not in ("side", "reference", "tag")},
        "load": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)}, "runs": {}}
    for reference, runs in rounds.items():
        timed = {side: [s for run in runs for s in run[side]["step_seconds"][args.warmup:]] for side in ("lmstack", "trl")}
        ours, theirs = statistics.median(timed["lmstack"]), statistics.median(timed["trl"])
        first = {side: runs[0][side]["losses"] for side in ("lmstack", "trl")}
        results["runs"][reference] = {
            "lmstack_median_s": ours, "trl_median_s": theirs, "speedup": theirs / ours,
            "round_speedups": [statistics.median(run["trl"]["step_seconds"][args.warmup:])
                               / statistics.median(run["lmstack"]["step_seconds"][args.warmup:]) for run in runs],
            "lmstack_tokens_per_step": statistics.fmean(runs[0]["lmstack"]["tokens"]),
            "losses_round1": first, "step1_is_ln2": {side: abs(v[0] - math.log(2)) < 1e-5 for side, v in first.items()},
            "max_loss_diff": max(abs(a - b) for a, b in zip(first["lmstack"], first["trl"])), "rounds": runs}
    results["wall_minutes"] = (time.perf_counter() - started) / 60
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from lmstack.atomic import write_json_atomic

    write_json_atomic(out, results, indent=1)
    print(summarize(results))


if __name__ == "__main__":
    main()
