"""`lmstack sft --lora` against transformers + peft: the same LoRA fine-tune of SmolLM2-135M-Instruct, side by side.

    python bench/bench_sft_peft.py                        # 3 rounds; ~20 min on a busy 2-core CPU after the one-time import
    python bench/bench_sft_peft.py --model DIR            # reuse an imported checkpoint
    python bench/bench_sft_peft.py --data tasks --rounds 5 --targets q_proj,k_proj,v_proj,o_proj

Both sides start from the same weights and the same adapter, see the same conversations and take the same
optimizer steps:

1. Weights: ``lmstack import smollm2-135m-instruct`` (the packaged GGUF, dequantized) into WORK/smollm2
   unless ``--model``, then :func:`lmstack.interop.hf_export.export_hf` to a LlamaForCausalLM directory
   (fp32). The HF model is that export, so any difference is the frameworks', not the weights'.
2. Data: ``--data chitchat`` (default): ``--n`` real human conversations of Chit-Chat
   (:mod:`lmstack.data.chitchat`), each cut to its first ``--chitchat-messages`` messages, so their lengths
   vary as real chats do; or ``--data tasks``: generated task conversations. Rendered with the model's own
   chat template, loss on the assistant turns. ``sft.val_fraction=0.01`` holds one conversation out, so
   the default ``--n`` (a multiple of ``--batch-size``, plus one) leaves training conversations that fill
   whole padded batches: the timed runs are one epoch, every training conversation exactly once, on every
   side. This script builds the padded batches with the loader ``lmstack sft`` uses (same split, seed,
   batch size and padding) and hands them to the peft side, which gets exactly lmstack's token ids and labels.
3. Adapter: LoRA on ``--targets`` (r, alpha, dropout 0). lmstack draws the A factors from the run seed
   right after building the model; this script repeats that draw and writes it as a peft adapter
   (:func:`lmstack.interop.peft_adapters.save_adapter`) that the peft side loads trainable, so both
   start from the same A (B is zero on both).
4. Sides, each a subprocess (so VmHWM is its own peak resident memory), fp32 on the CPU with ``--threads``
   torch threads, run in alternating rounds (lmstack, peft, lmstack packed, lmstack padding-free, profile, steps;
   ``--rounds`` times) so
   that every side sees the same background load; the table gives each side's median over the rounds:
   - ``lmstack``: :func:`lmstack.stages.sft.sft` with ``lora=True``, padded batches (constant LR, no weight
     decay, clip 1.0, the loss logged every step);
   - ``peft``: a plain PyTorch loop, not the HF Trainer: ``PeftModel(LlamaForCausalLM)`` forward, the mean
     cross-entropy over the trained labels, backward, clip 1.0, AdamW with the same LR, betas and eps, on
     the same padded batches;
   - ``lmstack-packed``: the same ``sft`` run with ``sft.packing=true``: the same training conversations
     packed best-fit into ``--packed-batch-size`` windows of ``--seq-len`` tokens per step (its own steps);
   - ``lmstack-padding-free``: the same ``sft`` run with ``sft.padding_free=true``: the padded run's steps
     (the same conversations per step, in the same order), each batch one row of its conversations back to
     back, with no padding;
   - ``profile``: one step's parts on the first padded batch, in process, the two lmstack objectives
     alternated: the decoder forward, the head + cross-entropy forward, and the backward, with logits at
     every position (``causal_lm``, as peft computes them) and only at the labelled positions
     (``causal_lm_at_labels``, what ``sft`` uses);
   - ``steps``: whole training steps (forward, backward, clip, AdamW; no loop bookkeeping) in one process,
     five variants interleaved step by step over the epoch so that they share the load exactly: peft on the
     padded batch, lmstack on it with logits everywhere and at the labels only, and lmstack on the same
     batch's conversations packed into windows of ``--seq-len`` and laid out padding-free (logits at the
     labels). On a shared machine
     this is the steadiest comparison; the loop runs above include the loop's per-step work.
   The first step of every run is a warm-up, left out of the speed.

Measures: trained tokens/s (labels, the loop's own count) on each side; for the two padded sides also
input tokens/s without padding; the equal-shape ratio lmstack / peft (same batches, per token) and the
end-to-end ratios lmstack packed / peft padded and lmstack padding-free / peft padded in trained tokens/s
(the same conversations, so the inverse ratio of the time an epoch takes); the per-step losses of lmstack and peft side by side; the padding
fraction of the padded batches; VmHWM; the 1-minute load average when each run started.

Caveats: the lmstack step times come from its metrics log, which also covers the loop's per-log-step
work (a finite-weights check and a JSONL line, a few ms); the peft loop has no such work. The packed run's
first window differs from the padded runs' first batch, so the timed steps cover the epoch minus a
different first step. VmHWM includes the imports (transformers is the larger) and, on the lmstack side,
the source checkpoint that ``sft`` loads before it builds the trained model, and the final checkpoint and
merged-model writes. A 2-core measurement of a 135M model; the ranking may differ on a GPU.
Outputs: OUT/results.json (default bench/results/sft_peft) and OUT/table.md (also printed).
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
SIDES = ("lmstack", "peft", "lmstack-packed", "lmstack-padding-free", "profile", "steps")  # one round, in this order
LOOP_SIDES = ("lmstack", "peft", "lmstack-packed", "lmstack-padding-free")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="an imported lmstack checkpoint (default: import the package)")
    p.add_argument("--work", default="runs/bench-sft-peft", help="work directory (the imported model is reused from here)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "sft_peft"), help="results directory")
    p.add_argument("--data", choices=["chitchat", "tasks"], default="chitchat", help="conversations trained on")
    p.add_argument("--n", type=int, default=17, help="conversations (one is held out; the rest fill the epoch)")
    p.add_argument("--chitchat-messages", type=int, default=4, help="each Chit-Chat conversation cut to this many messages")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the sides")
    p.add_argument("--batch-size", type=int, default=4, help="conversations per padded step")
    p.add_argument("--packed-batch-size", type=int, default=3, help="packed windows of --seq-len tokens per step")
    p.add_argument("--seq-len", type=int, default=128, help="longest conversation trained on (train.seq_len)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="q_proj,v_proj", help="LoRA target modules, comma-separated")
    p.add_argument("--threads", type=int, default=2, help="torch threads on every side")
    p.add_argument("--profile-repeats", type=int, default=2, help="timed passes of each objective in the profile side")
    p.add_argument("--seed", type=int, default=1337, help="train.seed (adapter init and batch order)")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: run one side
    return p.parse_args(argv)


def vm_hwm_mib() -> float:
    """This process's peak resident memory (VmHWM) in MiB; Linux only (nan elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def lmstack_overrides(args: argparse.Namespace, steps: int, packed: bool, padding_free: bool = False) -> list[str]:
    return [f"train.batch_size={args.packed_batch_size if packed else args.batch_size}",
            f"train.seq_len={args.seq_len}", f"sft.packing={str(packed).lower()}",
            f"sft.padding_free={str(padding_free).lower()}", "sft.val_fraction=0.01",
            f"train.max_steps={steps}", "train.log_every=1", "train.eval_every=0",
            "train.eval_batches=1", "train.ckpt_every=0", "train.keep_last=1", f"train.seed={args.seed}",
            "train.device=cpu", "train.dtype=fp32", "train.tensorboard=false", "train.max_minutes=0",
            f"optim.lr={args.lr}", "optim.schedule=constant", "optim.warmup_steps=0", "optim.weight_decay=0",
            "optim.grad_clip=1.0", f"lora.r={args.r}", f"lora.alpha={args.alpha}", "lora.dropout=0",
            f"lora.target_modules={args.targets}"]


# ----------------------------------------------------------------------------- the sides (subprocesses)

def run_lmstack_side(args: argparse.Namespace, work: Path, plan: dict[str, Any], side: str) -> dict[str, Any]:
    """``sft(..., lora=True)`` (padded, with ``sft.packing=true`` or with ``sft.padding_free=true``) over one
    epoch; the per-step losses, trained tokens and step seconds from its metrics.jsonl."""
    from lmstack.stages.sft import sft
    from lmstack.train.loop import read_metrics

    packed, padding_free = side == "lmstack-packed", side == "lmstack-padding-free"
    run_dir = work / f"{side}-run"
    steps = plan["packed_steps"] if packed else plan["padded_steps"]
    sft(args.model, [str(work / "data.jsonl")], run_dir,
        overrides=lmstack_overrides(args, steps, packed, padding_free), overwrite=True, progress=False, lora=True)
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r and "event" not in r]
    losses, seconds, tokens, previous = [], [], [], 0
    for row in rows:  # tokens is the running total: a step's tokens over its tokens/s is its seconds
        losses.append(row["loss"])
        tokens.append(row["tokens"] - previous)
        seconds.append((row["tokens"] - previous) / row["tokens_per_second"])
        previous = row["tokens"]
    return {"losses": losses, "step_seconds": seconds, "trained_tokens": tokens}


def run_peft_side(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """PeftModel(LlamaForCausalLM) in a plain loop over the saved padded batches."""
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    batches = torch.load(work / "batches.pt")
    torch.manual_seed(args.seed)
    base = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32, attn_implementation="sdpa")
    model = PeftModel.from_pretrained(base, work / "init-adapter", is_trainable=True)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    losses, seconds = [], []
    for batch in batches:
        step_start = time.perf_counter()
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        seconds.append(time.perf_counter() - step_start)
    return {"losses": losses, "step_seconds": seconds,
            "trained_tokens": [int((b["labels"] != -1).sum()) for b in batches]}


def run_profile_side(args: argparse.Namespace, work: Path, repeats: int = 3) -> dict[str, Any]:
    """Milliseconds of one step's parts on the first padded batch, for the full-logits objective and the
    labelled-positions one, alternated ``repeats`` times (medians): decoder forward, head + CE forward,
    backward."""
    from lmstack.checkpoint import load_checkpoint
    from lmstack.models.peft import LoRAConfig, apply_lora
    from lmstack.train.losses import output_head

    batch = torch.load(work / "batches.pt")[0]
    model = load_checkpoint(args.model).model.float()
    apply_lora(model, LoRAConfig(r=args.r, alpha=args.alpha, dropout=0.0, target_modules=args.targets.split(",")))
    model.train()
    head, labels = output_head(model), batch["labels"]
    parts: dict[str, dict[str, list[float]]] = {"full": {}, "at_labels": {}}
    for _ in range(repeats + 1):  # the first pass warms up
        for name, timings in parts.items():
            t0 = time.perf_counter()
            hidden, _ = model(batch["input_ids"], return_hidden=True)  # (B, T, C)
            t1 = time.perf_counter()
            if name == "full":
                logits = head(hidden).float()  # (B, T, V)
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-1)
            else:
                trained = labels != -1
                loss = torch.nn.functional.cross_entropy(head(hidden[trained]).float(), labels[trained])  # (N, V)
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            for part, value in (("decoder_forward", t1 - t0), ("head_ce_forward", t2 - t1), ("backward", t3 - t2)):
                timings.setdefault(part, []).append(1000 * value)
    return {name: {part: statistics.median(values[1:]) for part, values in by_part.items()}
            for name, by_part in parts.items()}


def run_steps_side(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Whole training steps in one process, the variants interleaved step by step so they share the load:
    for each padded batch of the epoch, a peft step on it, lmstack steps on it with the full-logits and the
    labelled-positions objective, and lmstack steps on the same conversations packed and padding-free
    (labelled positions). A step is forward, backward, clip 1.0 and AdamW, without the loop's bookkeeping.
    Seconds per variant."""
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lmstack.checkpoint import load_checkpoint
    from lmstack.models.peft import LoRAConfig, apply_lora
    from lmstack.train.losses import causal_lm, causal_lm_at_labels

    padded, packed = torch.load(work / "batches.pt"), torch.load(work / "packed_per_step.pt")
    flat = torch.load(work / "padding_free_per_step.pt")
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32,
                                                                        attn_implementation="sdpa"),
                                   work / "init-adapter", is_trainable=True).train()
    ours = load_checkpoint(args.model).model.float()
    apply_lora(ours, LoRAConfig(r=args.r, alpha=args.alpha, dropout=0.0, target_modules=args.targets.split(",")))
    ours.train()

    def peft_loss(batch):
        logits = hf(input_ids=batch["input_ids"], use_cache=False).logits  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-1)

    variants = {"peft_padded": (hf, peft_loss),
                "lmstack_padded_full_logits": (ours, lambda b: causal_lm(ours, b)[0]),
                "lmstack_padded": (ours, lambda b: causal_lm_at_labels(ours, b)[0]),
                "lmstack_packed": (ours, lambda b: causal_lm_at_labels(ours, b)[0]),
                "lmstack_padding_free": (ours, lambda b: causal_lm_at_labels(ours, b)[0])}
    optimizers = {name: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                          betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
                  for name, (model, _) in variants.items()}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for step in range(len(padded)):
        for name, (model, loss_fn) in variants.items():
            batch = {"lmstack_packed": packed, "lmstack_padding_free": flat}.get(name, padded)[step]
            started = time.perf_counter()
            loss_fn(batch).backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            seconds[name].append(time.perf_counter() - started)
    return {"step_seconds": seconds, "trained_tokens": [int((b["labels"] != -1).sum()) for b in padded],
            "packed_rows": [int(b["input_ids"].shape[0]) for b in packed]}


# ----------------------------------------------------------------------------- preparation (parent process)

def write_data(args: argparse.Namespace, path: Path) -> None:
    """``--n`` conversations as messages JSONL: Chit-Chat (a seeded sample, each cut short) or generated tasks."""
    from lmstack.atomic import write_text_atomic
    from lmstack.data.instruct import write_tasks

    if args.data == "tasks":
        write_tasks(path, args.n, seed=0)
        return
    import random

    from lmstack.data.chitchat import chitchat_conversations

    conversations = list(chitchat_conversations(progress=False))
    random.Random(0).shuffle(conversations)
    keep = max(2, args.chitchat_messages - args.chitchat_messages % 2)  # end on an assistant turn
    write_text_atomic(path, "".join(json.dumps({"messages": m[:keep]}) + "\n" for m in conversations[:args.n]))


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Weights (import + HF export), data, the padded batches of one epoch and the initial adapter; returns the
    step counts and token counts."""
    from lmstack.checkpoint import load_checkpoint
    from lmstack.config import SFTConfig
    from lmstack.data.instruct import InstructLoader, load_instruct, pack_best_fit
    from lmstack.interop.hf_export import export_hf
    from lmstack.interop.peft_adapters import save_adapter
    from lmstack.models import build_model
    from lmstack.models.peft import LoRAConfig, apply_lora
    from lmstack.train.loop import seed_everything

    if args.model is None:
        args.model = str(work / "smollm2")
        if not (Path(args.model) / "config.json").is_file():
            subprocess.run([sys.executable, "-m", "lmstack.cli", "import", PACKAGE, "--out", args.model], check=True)
    if not (work / "hf" / "config.json").is_file():
        export_hf(args.model, work / "hf", dtype="float32")
    write_data(args, work / "data.jsonl")

    source = load_checkpoint(args.model)
    tokenizer, model_cfg = source.tokenizer, source.model.config
    del source
    sft_cfg = SFTConfig()  # the rendering sft uses with its defaults, and the bench's split
    data = load_instruct([str(work / "data.jsonl")], tokenizer, args.seq_len + 1, loss_on=sft_cfg.loss_on,
                         overlong=sft_cfg.overlong, val_fraction=0.01, seed=sft_cfg.seed)
    loader = InstructLoader(data.train, args.batch_size, seed=args.seed, pad_id=tokenizer.pad_id)
    padded_steps = len(data.train) // args.batch_size
    if padded_steps < 2:
        raise SystemExit(f"--n {args.n} gives {len(data.train)} training conversations; raise --n")
    order = [unit[0] for unit in loader._units(0)]  # the epoch's draw order, as the loader yields it
    batches = [batch for _, batch in zip(range(padded_steps), loader)]
    torch.save(batches, work / "batches.pt")
    from lmstack.data.instruct import collate_packed

    packed_per_step = []  # each padded batch's conversations packed into windows of --seq-len, one batch
    for step in range(padded_steps):
        examples = [data.train[i] for i in order[step * args.batch_size:(step + 1) * args.batch_size]]
        windows_of_step = pack_best_fit([len(e.ids) - 1 for e in examples], args.seq_len)
        packed_per_step.append(collate_packed([[examples[i] for i in w] for w in windows_of_step], tokenizer.pad_id))
    torch.save(packed_per_step, work / "packed_per_step.pt")
    flat_loader = InstructLoader(data.train, args.batch_size, seed=args.seed, pad_id=tokenizer.pad_id,
                                 padding_free=True)  # what sft.padding_free=true draws: the padded steps, flat
    torch.save([batch for _, batch in zip(range(padded_steps), flat_loader)], work / "padding_free_per_step.pt")
    input_tokens = [sum(len(data.train[i].ids) - 1 for i in order[s * args.batch_size:(s + 1) * args.batch_size])
                    for s in range(padded_steps)]
    windows = pack_best_fit([len(e.ids) - 1 for e in data.train], args.seq_len)
    packed_steps = len(windows) // args.packed_batch_size

    seed_everything(args.seed)  # sft's order: seed, build the model, wrap it (the A draw), then train
    model = build_model(model_cfg)
    lora_cfg = LoRAConfig(r=args.r, alpha=args.alpha, dropout=0.0, target_modules=args.targets.split(","))
    apply_lora(model, lora_cfg)
    save_adapter(model, lora_cfg, work / "init-adapter")
    return {"padded_steps": padded_steps, "packed_steps": packed_steps, "train_conversations": len(data.train),
            "left_out_conversations": len(data.train) - padded_steps * args.batch_size,
            "left_out_windows": len(windows) - packed_steps * args.packed_batch_size,
            "trained_tokens": [int((b["labels"] != -1).sum()) for b in batches], "input_tokens": input_tokens,
            "padded_tokens": [b["input_ids"].numel() for b in batches]}


def run_side(side: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One side in a fresh subprocess; its result with the load average at its start and its VmHWM."""
    cmd = [sys.executable, __file__, "--side", side, "--work", str(work), "--model", args.model,
           *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("side", "work", "model", "out")]]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    result = json.loads((work / f"{side}.json").read_text())
    return {**result, "load_1min": load, "wall_seconds": time.perf_counter() - started}


# ----------------------------------------------------------------------------- summary

def speeds(run: dict[str, Any]) -> dict[str, float]:
    """A run's trained tokens/s and ms/step over its steps after the first (the warm-up)."""
    secs = sum(run["step_seconds"][1:])
    return {"trained": sum(run["trained_tokens"][1:]) / secs, "ms_per_step": 1000 * secs / (len(run["step_seconds"]) - 1)}


def summarize(args: argparse.Namespace, plan: dict[str, Any], rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per-round speeds and ratios, their medians over the rounds, the loss agreement and the padding."""
    per_round = []
    for sides in rounds:
        row = {name: speeds(sides[name]) for name in LOOP_SIDES}
        input_timed = sum(plan["input_tokens"][1:])
        for name in ("lmstack", "peft"):
            row[name]["input"] = input_timed / (sum(sides[name]["step_seconds"][1:]))
        row["equal_shapes"] = row["lmstack"]["input"] / row["peft"]["input"]
        row["end_to_end"] = row["lmstack-packed"]["trained"] / row["peft"]["trained"]
        row["end_to_end_padding_free"] = row["lmstack-padding-free"]["trained"] / row["peft"]["trained"]
        per_round.append(row)

    def median(get) -> float:
        return statistics.median(get(r) for r in per_round)

    lm, pf = rounds[0]["lmstack"], rounds[0]["peft"]
    profiles = [r["profile"] for r in rounds]
    return {
        "per_round": per_round,
        "median": {name: {key: median(lambda r, n=name, k=key: r[n][k]) for key in per_round[0][name]}
                   for name in LOOP_SIDES}
        | {key: median(lambda r, k=key: r[k]) for key in ("equal_shapes", "end_to_end", "end_to_end_padding_free")},
        "max_abs_loss_diff": max(abs(a - b) for a, b in zip(lm["losses"], pf["losses"])),
        "max_abs_loss_diff_padding_free": max(abs(a - b) for a, b in zip(rounds[0]["lmstack-padding-free"]["losses"],
                                                                          pf["losses"])),
        "padding_fraction": 1 - sum(plan["input_tokens"]) / sum(plan["padded_tokens"]),
        "profile_ms": {obj: {part: statistics.median(p[obj][part] for p in profiles) for part in profiles[0][obj]}
                       for obj in ("full", "at_labels")},
        "interleaved_seconds": {name: statistics.median(sum(r["steps"]["step_seconds"][name][1:]) for r in rounds)
                                for name in rounds[0]["steps"]["step_seconds"]},
        "load_1min": {name: [r[name]["load_1min"] for r in rounds] for name in SIDES},
        "vm_hwm_mib": {name: statistics.median(r[name]["vm_hwm_mib"] for r in rounds) for name in SIDES},
    }


def table(args: argparse.Namespace, plan: dict[str, Any], summary: dict[str, Any], rounds: list[dict]) -> str:
    m, hwm = summary["median"], summary["vm_hwm_mib"]
    loads = [x for values in summary["load_1min"].values() for x in values]
    lines = [(f"{len(rounds)} of {args.rounds} alternating rounds, medians; {plan['train_conversations']} training conversations "
              f"({args.data}), one epoch per run: {plan['padded_steps']} padded steps of {args.batch_size}, "
              f"{plan['packed_steps']} packed steps of {args.packed_batch_size} x {args.seq_len}; first step of each "
              f"run untimed; padding {summary['padding_fraction']:.0%} of the padded batches' positions; "
              f"1-min load average at the runs' starts {min(loads):.1f}-{max(loads):.1f}"), "",
             "| side | trained tok/s | input tok/s (no padding) | ms/step | peak RSS (VmHWM) |",
             "|---|---:|---:|---:|---:|"]
    for name, label in (("lmstack", "lmstack sft --lora, padded"), ("peft", "transformers + peft, padded"),
                        ("lmstack-packed", "lmstack sft --lora sft.packing=true"),
                        ("lmstack-padding-free", "lmstack sft --lora sft.padding_free=true")):
        s = m[name]
        input_speed = f"{s['input']:,.0f}" if "input" in s else "-"
        lines.append(f"| {label} | {s['trained']:,.1f} | {input_speed} | {s['ms_per_step']:,.0f} | {hwm[name]:,.0f} MiB |")
    lines.append(f"| **lmstack / peft, equal shapes (same batches)** | | **{m['equal_shapes']:.2f}x** | | |")
    lines.append(f"| **lmstack packed / peft padded, end to end (same conversations)** | "
                 f"**{m['end_to_end']:.2f}x** | | | |")
    lines.append(f"| **lmstack padding-free / peft padded, end to end (same batches)** | "
                 f"**{m['end_to_end_padding_free']:.2f}x** | | | |")
    per_round = summary["per_round"]
    lines += ["", "per round: equal shapes " + ", ".join(f"{r['equal_shapes']:.2f}x" for r in per_round)
              + "; end to end packed " + ", ".join(f"{r['end_to_end']:.2f}x" for r in per_round)
              + "; end to end padding-free " + ", ".join(f"{r['end_to_end_padding_free']:.2f}x" for r in per_round),
              "",
              "one step's parts on the first padded batch (lmstack decoder with LoRA, ms, medians):", "",
              "| logits | decoder forward | head + CE forward | backward | total |", "|---|---:|---:|---:|---:|"]
    for obj, label in (("full", "every position (causal_lm)"), ("at_labels", "labelled positions only (causal_lm_at_labels)")):
        p = summary["profile_ms"][obj]
        lines.append(f"| {label} | {p['decoder_forward']:,.0f} | {p['head_ce_forward']:,.0f} | {p['backward']:,.0f} | "
                     f"{sum(p.values()):,.0f} |")
    inter = summary["interleaved_seconds"]
    lines += ["", ("whole steps in one process, interleaved step by step over the epoch (first step untimed; seconds, "
                   "median over rounds; speed-up = peft padded seconds / variant seconds for the same conversations):"), "",
              "| variant | seconds | speed-up vs peft padded |", "|---|---:|---:|"]
    for name, label in (("peft_padded", "transformers + peft, padded"),
                        ("lmstack_padded_full_logits", "lmstack, padded, logits everywhere"),
                        ("lmstack_padded", "lmstack, padded, logits at labels"),
                        ("lmstack_packed", "lmstack, packed, logits at labels"),
                        ("lmstack_padding_free", "lmstack, padding-free, logits at labels")):
        lines.append(f"| {label} | {inter[name]:,.1f} | {inter['peft_padded'] / inter[name]:.2f}x |")
    lm, pf = rounds[0]["lmstack"], rounds[0]["peft"]
    lines += ["", "| step | lmstack loss | peft loss | abs diff |", "|---:|---:|---:|---:|"]
    for i, (a, b) in enumerate(zip(lm["losses"], pf["losses"]), start=1):
        lines.append(f"| {i}{' (warm-up)' if i == 1 else ''} | {a:.5f} | {b:.5f} | {abs(a - b):.2e} |")
    lines.append(f"\nmax abs loss difference over {len(lm['losses'])} steps: {summary['max_abs_loss_diff']:.2e} "
                 f"(lmstack padded vs peft), {summary['max_abs_loss_diff_padding_free']:.2e} (lmstack padding-free "
                 "vs peft)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(args.work)
    torch.set_num_threads(args.threads)
    if args.side:  # one side, in its own process
        plan = json.loads((work / "plan.json").read_text())
        if args.side == "peft":
            result = run_peft_side(args, work)
        elif args.side == "steps":
            result = run_steps_side(args, work)
        elif args.side == "profile":
            result = run_profile_side(args, work, args.profile_repeats)
        else:
            result = run_lmstack_side(args, work, plan, args.side)
        (work / f"{args.side}.json").write_text(json.dumps({**result, "vm_hwm_mib": vm_hwm_mib()}))
        return
    from lmstack.atomic import write_json_atomic, write_text_atomic

    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    plan = prepare(args, work)
    (work / "plan.json").write_text(json.dumps(plan))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rounds = []
    for i in range(args.rounds):  # the results so far are written after every round: a cut-short run keeps them
        rounds.append({side: run_side(side, args, work) for side in SIDES})
        summary = summarize(args, plan, rounds)
        text = table(args, plan, summary, rounds)
        settings = {k: os.path.relpath(v, REPO) if k in ("out", "work", "model") and v else v  # no machine paths
                    for k, v in vars(args).items()}
        write_json_atomic(out / "results.json", {"args": settings, "plan": plan, "summary": summary,
                                                 "rounds": rounds, "rounds_done": len(rounds),
                                                 "total_wall_seconds": time.perf_counter() - started})
        write_text_atomic(out / "table.md", text + "\n")
        print(f"round {i + 1}/{args.rounds} done", file=sys.stderr)
    print(text)
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
