"""`lmstack grpo` against TRL's GRPOTrainer: GRPO samples per second, generation included, same model and work.

    python bench/bench_grpo_trl.py                      # defaults: 8 prompts x 8 samples, 32 new tokens (4-6 min)
    python bench/bench_grpo_trl.py --prompts 16 --group 8 --max-new-tokens 64 --steps 6

TRL runs from its own virtual environment (``--trl-python``, default runs/venv-trl/bin/python; see
bench/bench_dpo_trl.py for how it is made: ``--system-site-packages``-style, so both sides import the same torch
and transformers and only TRL is added). Each side runs in its own subprocess with ``--threads`` torch threads.

Same work on both sides:

* Model: an lmstack GPT (``--layers`` x ``--width``, Llama options: RMSNorm, SwiGLU, RoPE; lmstack's chat format
  and a byte-level BPE tokenizer trained on the prompts), randomly initialised with a fixed seed, saved as an
  lmstack checkpoint and exported with :func:`lmstack.interop.hf_export.export_hf` to a LlamaForCausalLM
  directory (fp32) for TRL: the same numbers on both sides. Random weights are fine for a speed test; both
  sides sample from the same distribution, so responses have the same expected length (reported per side).
* Prompts: 2-digit addition questions (lmstack/data/verifiable.py) as conversational prompts; both sides render
  them with the model's chat template. Reward: the share of digits in the completion (:func:`digit_share`, the
  same function on both sides; graded, so the random model's groups have spread and every update is real).
* GRPO: ``--prompts`` prompts x ``--group`` samples per step at temperature 1, at most ``--max-new-tokens``
  new tokens, one optimizer step per generation (lmstack ``grpo.minibatches=1``; TRL
  ``per_device_train_batch_size = prompts x group``, ``steps_per_generation=1``), token-level loss (lmstack
  ``grpo.loss_norm=token``; TRL ``loss_type=dapo``, its default), clip 0.2, no KL term (beta 0), AdamW at a
  constant lr, grad clip 1.0, fp32, no activation checkpointing on either side (TRL 1.16's configs default
  to ``bf16=True`` and ``gradient_checkpointing=True``; both are turned off here).
* Generation: lmstack's engine (continuous batching, slotted KV, one prefill per prompt forked ``n`` ways) on the
  live model; TRL: ``transformers`` ``generate`` (its default without vLLM).

Three runs alternate ``--rounds`` times, each a fresh subprocess: lmstack as it is; lmstack with the full-forward
log-prob pass (``lmstack-full``: :func:`lmstack.train.shared_prompt.supports_shared_prompt` answers False, so
every row runs prompt and response and the head forms every position's logits, as before the shared-prompt
path); and TRL. The first two give the shared-prompt path's effect, measured in the same run.

Measures: seconds per step over ``--steps`` steps after ``--warmup`` (lmstack: from its metrics log,
response tokens over tokens/s at ``train.log_every=1``, which spans the rollout, the behaviour log-probs, the
reward and the update; TRL: a TrainerCallback's wall time from step begin to step end, which spans its
generation, log-probs, reward and update), samples per second = prompts x group / seconds per step, the ratio,
the per-round ratios, the load average before every run, and the mean response length on each side. Then the
generation part alone, in one process: the engine against ``transformers`` ``generate`` on the same weights,
prompts, group and length, plus the engine with its former KV gather (advanced indexing instead of
``index_select``, patched in for the measurement) to show that change's effect. Writes OUT (default
bench/results/grpo/trl.json).
"""

from __future__ import annotations

import argparse
import dataclasses
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
SIDES = ("lmstack", "lmstack-full", "trl")  # lmstack-full: the log-prob passes without the shared-prompt path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--group", type=int, default=8, help="samples per prompt (GRPO group size)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per side")
    ap.add_argument("--rounds", type=int, default=3, help="times each side runs, alternating")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trl-python", default="runs/venv-trl/bin/python", help="python with trl")
    ap.add_argument("--work", default="runs/bench_grpo_trl")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "grpo" / "trl.json"))
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def prepare(args: argparse.Namespace, work: Path) -> None:
    """The lmstack checkpoint, its HF export and the prompt file (parent process)."""
    from lmstack.checkpoint import save_checkpoint
    from lmstack.data.verifiable import make_conversations, make_prompts, write_records
    from lmstack.interop.hf_export import export_hf
    from lmstack.models.gpt import GPT, GPTConfig
    from lmstack.tokenizer import Tokenizer

    work.mkdir(parents=True, exist_ok=True)
    texts = [m["content"] for c in make_conversations("arithmetic", 2000, seed=args.seed) for m in c["messages"]]
    tokenizer = Tokenizer.train(texts, vocab_size=300)
    torch.manual_seed(args.seed)
    cfg = GPTConfig(vocab_size=300, block_size=128, n_layer=args.layers, n_head=max(1, args.width // 64),
                    n_kv_head=max(1, args.width // 64), n_embd=args.width)
    save_checkpoint(work / "model", GPT(cfg), {"model": dataclasses.asdict(cfg)}, tokenizer=tokenizer)
    export_hf(work / "model", work / "hf", dtype="float32")
    write_records(work / "prompts.jsonl", make_prompts("arithmetic", 512, seed=args.seed))


def digit_share(prompts: list, completions: list[str]) -> list[float]:
    """The reward of both sides: the share of a completion's characters that are digits. Graded, so a random
    model's groups have spread and the update is a real one (an exact-answer reward is 0 everywhere there)."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def run_lmstack_side(args: argparse.Namespace, work: Path, full_forward: bool = False) -> dict[str, Any]:
    from lmstack.stages.grpo import grpo
    from lmstack.train import shared_prompt
    from lmstack.train.loop import read_metrics

    torch.set_num_threads(args.threads)
    if full_forward:  # the before of the before/after: every row runs in full, head on every position
        shared_prompt.supports_shared_prompt = lambda model: False
    run_dir = work / ("lmstack-full-run" if full_forward else "lmstack-run")
    grpo(work / "model", [str(work / "prompts.jsonl")], "bench_grpo_trl:digit_share", run_dir, overwrite=True,
         progress=False,
         overrides=[f"train.max_steps={args.warmup + args.steps}", f"grpo.group_size={args.group}",
                    f"grpo.prompts_per_rollout={args.prompts}", "grpo.minibatches=1",
                    f"grpo.max_tokens={args.max_new_tokens}", "grpo.loss_norm=token", "grpo.clip_low=0.2",
                    "grpo.clip_high=0.2", f"optim.lr={args.lr}", "optim.schedule=constant", "optim.weight_decay=0",
                    "optim.grad_clip=1.0", "train.eval_every=0", "train.log_every=1", "train.ckpt_every=0",
                    "train.dtype=fp32", f"train.seed={args.seed}", f"grpo.seed={args.seed}", "grpo.eval_prompts=1"])
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "tokens_per_second" in r]
    timed = records[args.warmup:]
    steps, lengths = [], []
    previous = records[args.warmup - 1]["tokens"] if args.warmup else 0
    for r in timed:
        steps.append((r["tokens"] - previous) / r["tokens_per_second"])
        previous = r["tokens"]
        lengths.append(r["response_length"])
    return {"step_seconds": steps, "response_length": statistics.fmean(lengths)}


def run_trl_side(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.start = 0.0

        def on_step_begin(self, *a, **k) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k) -> None:
            self.seconds.append(time.perf_counter() - self.start)

    lengths: list[float] = []

    def digit_reward(prompts, completions, **kwargs) -> list[float]:
        return digit_share(prompts, [c[-1]["content"] if isinstance(c, list) else c for c in completions])

    records = [json.loads(line) for line in (work / "prompts.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["prompt"]} for r in records])
    tokenizer = AutoTokenizer.from_pretrained(work / "hf")
    model = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32, attn_implementation="sdpa")
    batch = args.prompts * args.group
    config = GRPOConfig(output_dir=str(work / "trl-run"), per_device_train_batch_size=batch,
                        num_generations=args.group, steps_per_generation=1, num_iterations=1,
                        max_completion_length=args.max_new_tokens, temperature=1.0, beta=0.0, epsilon=0.2,
                        loss_type="dapo", max_steps=args.warmup + args.steps, learning_rate=args.lr,
                        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, logging_steps=1, save_strategy="no",
                        report_to=[], use_cpu=True, bf16=False, seed=args.seed, dataloader_num_workers=0,
                        gradient_checkpointing=False)  # TRL 1.16 defaults to bf16 and checkpointing: both off
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=digit_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    for r in trainer.state.log_history:
        for key in ("completions/mean_length", "completion_length"):
            if key in r:
                lengths.append(r[key])
                break
    return {"step_seconds": timer.seconds[args.warmup:],
            "response_length": statistics.fmean(lengths[args.warmup:]) if lengths[args.warmup:] else None}


def _advanced_index_gather(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SlotBatch.update as it was before it gathered with ``index_select``: the "before" of that change."""
    k_layer, v_layer = self.cache.k[layer_idx], self.cache.v[layer_idx]  # (N+1, H_kv, L+1, D)
    k_layer[self._rows, :, self._cols] = k.transpose(1, 2).to(k_layer.dtype)
    v_layer[self._rows, :, self._cols] = v.transpose(1, 2).to(v_layer.dtype)
    S = self.kv_len
    if self.consecutive_from is not None:
        start, B = self.consecutive_from, k.shape[0]
        return k_layer[start:start + B, :, :S], v_layer[start:start + B, :, :S]
    return k_layer[self.slot_ids, :, :S], v_layer[self.slot_ids, :, :S]  # (B, H_kv, S, D) gathered


def generation_only(args: argparse.Namespace, work: Path, repeats: int = 3) -> dict[str, Any]:
    """The generation part alone, in this process: lmstack's engine (``n`` samples per prompt from one prefill),
    the same engine with its former KV gather, and ``transformers`` ``generate`` (``num_return_sequences``,
    left-padded batch, no top-k / top-p), same weights, prompts, group and length, interleaved; median seconds
    over ``repeats`` after one warm-up each."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmstack.checkpoint import load_checkpoint
    from lmstack.engine import Engine, SamplingParams
    from lmstack.engine.kv_cache import SlotBatch
    from lmstack.train.rollout import render_prompt

    torch.set_num_threads(args.threads)
    records = [json.loads(line) for line in (work / "prompts.jsonl").read_text().splitlines()][:args.prompts]
    loaded = load_checkpoint(work / "model")
    engine = Engine(loaded.model, loaded.tokenizer, max_num_seqs=args.prompts * args.group, max_model_len=128)
    prompts = [render_prompt(loaded.tokenizer, r["prompt"]) for r in records]
    hf_tok = AutoTokenizer.from_pretrained(work / "hf")
    hf_tok.padding_side = "left"
    hf = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32, attn_implementation="sdpa").eval()
    texts = [hf_tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in records]
    batch = hf_tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    ends = set(hf.generation_config.eos_token_id if isinstance(hf.generation_config.eos_token_id, list)
               else [hf.generation_config.eos_token_id])
    current_update = SlotBatch.update

    def run_engine(repeat: int, update) -> int:
        SlotBatch.update = update
        try:
            outputs = engine.generate(prompts, [SamplingParams(n=args.group, max_tokens=args.max_new_tokens,
                                                               temperature=1.0, seed=repeat * 1000 + i)
                                                for i in range(len(prompts))])
        finally:
            SlotBatch.update = current_update
        return sum(len(o.token_ids) for r in outputs for o in r.outputs)

    def run_transformers(repeat: int) -> int:
        torch.manual_seed(repeat)
        with torch.no_grad():
            out = hf.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              max_new_tokens=args.max_new_tokens, num_return_sequences=args.group,
                              pad_token_id=hf_tok.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        return sum(next((i + 1 for i, t in enumerate(row.tolist()) if t in ends), len(row)) for row in new)

    variants = {"lmstack": lambda r: run_engine(r, current_update),
                "lmstack, former KV gather": lambda r: run_engine(r, _advanced_index_gather),
                "transformers": run_transformers}
    timings: dict[str, list[float]] = {name: [] for name in variants}
    tokens: dict[str, list[int]] = {name: [] for name in variants}
    for repeat in range(repeats + 1):
        for name, run in variants.items():
            started = time.perf_counter()
            count = run(repeat)
            if repeat:  # repeat 0 warms up
                timings[name].append(time.perf_counter() - started)
                tokens[name].append(count)
    return {name: {"median_seconds": round(statistics.median(t), 3),
                   "samples_per_second": round(args.prompts * args.group / statistics.median(t), 1),
                   "mean_response_tokens": statistics.fmean(tokens[name]) / (args.prompts * args.group)}
            for name, t in timings.items()}


def run_side(side: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    python = args.trl_python if side == "trl" else sys.executable
    cmd = [python, __file__, "--side", side, "--work", str(work), "--prompts", str(args.prompts), "--group",
           str(args.group), "--max-new-tokens", str(args.max_new_tokens), "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--lr", str(args.lr), "--threads", str(args.threads), "--seed", str(args.seed)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    load = os.getloadavg()[0]
    print(f"$ {side} side, load {load:.1f}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    return {**json.loads((work / f"{side}.json").read_text()), "load_before": load}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(args.work)
    if args.side:
        result = (run_trl_side(args, work) if args.side == "trl"
                  else run_lmstack_side(args, work, full_forward=args.side == "lmstack-full"))
        (work / f"{args.side}.json").write_text(json.dumps(result))
        return
    if not Path(args.trl_python).is_file():
        sys.exit(f"--trl-python {args.trl_python}: not found; make a venv with trl (see the module docstring)")
    started = time.perf_counter()
    prepare(args, work)
    samples = args.prompts * args.group
    rounds: list[dict[str, dict[str, Any]]] = []
    for _ in range(args.rounds):  # the sides alternate, so a slow spell of a shared machine hits all of them
        rounds.append({side: run_side(side, args, work) for side in SIDES})
    generation = generation_only(args, work)
    summary: dict[str, Any] = {}
    for side in SIDES:
        seconds = [s for run in rounds for s in run[side]["step_seconds"]]
        lengths = [run[side]["response_length"] for run in rounds if run[side]["response_length"] is not None]
        summary[side] = {"median_step_seconds": round(statistics.median(seconds), 3),
                         "samples_per_second": round(samples / statistics.median(seconds), 2),
                         "step_seconds": [round(s, 3) for s in seconds],
                         "mean_response_tokens": round(statistics.fmean(lengths), 2)}

    def per_round(numerator: str, denominator: str) -> list[float]:
        return [round(statistics.median(run[denominator]["step_seconds"])
                      / statistics.median(run[numerator]["step_seconds"]), 2) for run in rounds]

    loads = [run[side]["load_before"] for run in rounds for side in SIDES]
    ratio = summary["lmstack"]["samples_per_second"] / summary["trl"]["samples_per_second"]
    shared_effect = summary["lmstack"]["samples_per_second"] / summary["lmstack-full"]["samples_per_second"]
    command = (f"python bench/bench_grpo_trl.py --prompts {args.prompts} --group {args.group} --max-new-tokens "
               f"{args.max_new_tokens} --steps {args.steps} --warmup {args.warmup} --layers {args.layers} "
               f"--width {args.width} --threads {args.threads} --rounds {args.rounds}")
    results = {"command": command, "cpu_count": os.cpu_count(), "threads_per_side": args.threads,
               "model": f"lmstack GPT {args.layers} layers x {args.width} wide, vocab 300, random init (seed "
                        f"{args.seed}), exported to LlamaForCausalLM for TRL", "samples_per_step": samples,
               "load_average": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)},
               "sides": summary, "speedup_lmstack_over_trl": round(ratio, 2),
               "speedup_per_round": per_round("lmstack", "trl"),
               "shared_prompt_speedup": round(shared_effect, 2),
               "shared_prompt_speedup_per_round": per_round("lmstack", "lmstack-full"),
               "generation_only": generation,
               "generation_speedup_lmstack_over_transformers": round(
                   generation["lmstack"]["samples_per_second"] / generation["transformers"]["samples_per_second"], 2),
               "wall_minutes": round((time.perf_counter() - started) / 60, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print("\n| side | s/step (median) | samples/s | mean response tokens |\n|---|---|---|---|")
    for side, s in summary.items():
        print(f"| {side} | {s['median_step_seconds']:.3f} | {s['samples_per_second']:.1f} | "
              f"{s['mean_response_tokens']} |")
    print(f"\nlmstack / TRL samples per second: {ratio:.2f}x (per round {results['speedup_per_round']}); "
          f"shared-prompt path: {shared_effect:.2f}x; load {min(loads):.1f}-{max(loads):.1f}")
    for side, g in generation.items():
        print(f"generation only, {side}: {g['median_seconds']:.3f} s, {g['samples_per_second']:.1f} samples/s, "
              f"{g['mean_response_tokens']:.1f} tokens per sample")


if __name__ == "__main__":
    main()
