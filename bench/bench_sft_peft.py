"""`lmstack sft --lora` against transformers + peft: the same LoRA fine-tune of SmolLM2-135M-Instruct, side by side.

    python bench/bench_sft_peft.py                            # ~1.5 min on an idle 2-core CPU, defaults
    python bench/bench_sft_peft.py --model DIR                # reuse an imported checkpoint
    python bench/bench_sft_peft.py --steps 20 --batch-size 4 --targets q_proj,k_proj,v_proj,o_proj

Both sides start from the same weights and the same adapter, see the same batches and take the same
optimizer steps:

1. Weights: ``lmstack import smollm2-135m-instruct`` (the packaged GGUF, dequantized) into WORK/smollm2
   unless ``--model``, then :func:`lmstack.interop.hf_export.export_hf` to a LlamaForCausalLM directory
   (fp32). The HF model is that export, so any difference is the frameworks', not the weights'.
2. Data: ``--n`` task conversations (:func:`lmstack.data.instruct.make_task_conversations`), rendered by
   the model's own chat template, loss on the assistant turns. This script builds the batches with the
   loader ``lmstack sft`` uses (same split, seed, batch size and padding) and hands them to the peft side,
   which therefore gets exactly the token ids and labels lmstack trains on.
3. Adapter: LoRA on ``--targets`` (r, alpha, dropout 0). lmstack draws the A factors from the run seed
   right after building the model; this script repeats that draw and writes it as a peft adapter
   (:func:`lmstack.interop.peft_adapters.save_adapter`) that the peft side loads trainable, so both
   start from the same A (B is zero on both).
4. Training, one subprocess per side (so VmHWM is each side's own peak resident memory), fp32 on the CPU
   with ``--threads`` torch threads: the lmstack side is :func:`lmstack.stages.sft.sft` with ``lora=True``
   (constant LR, no weight decay, grad clip 1.0, the loss logged every step); the peft side is a plain
   PyTorch loop, not the HF Trainer: ``PeftModel(LlamaForCausalLM)`` forward, the mean cross-entropy over
   the trained labels, backward, clip 1.0, AdamW with the same LR, betas and eps. ``--warmup`` steps
   are run first and left out of the speed.

Measures: tokens/s over the timed steps, two ways: trained tokens (labels, the loop's own count) and
input tokens without padding; the ratio lmstack / peft; the per-step losses side by side and their
largest absolute difference; VmHWM of each subprocess.

Caveats: the lmstack step times come from its metrics log, which also covers the loop's per-log-step
work (a finite-weights check and a JSONL line, a few ms); the peft loop has no such work. VmHWM includes
the imports (transformers is the larger) and, on the lmstack side, the source checkpoint that ``sft``
loads before it builds the trained model, and the final checkpoint and merged-model writes. The speed is
a 2-core measurement of a 135M model on short conversations; the ranking may differ on a GPU.
Outputs: OUT/results.json (default bench/results/sft_peft); the Markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "smollm2-135m-instruct"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="an imported lmstack checkpoint (default: import the package)")
    p.add_argument("--work", default="runs/bench-sft-peft", help="work directory (the imported model is reused from here)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "sft_peft"), help="results directory")
    p.add_argument("--n", type=int, default=256, help="task conversations generated")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256, help="longest conversation trained on (train.seq_len)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="q_proj,v_proj", help="LoRA target modules, comma-separated")
    p.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    p.add_argument("--seed", type=int, default=1337, help="train.seed (adapter init and batch order)")
    p.add_argument("--packed-steps", type=int, default=6, help="timed steps of the packed lmstack run")
    p.add_argument("--packed-batch-size", type=int, default=2, help="packed windows of --seq-len tokens per step")
    p.add_argument("--side", choices=["lmstack", "lmstack-packed", "peft"], help=argparse.SUPPRESS)  # internal
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


def lmstack_overrides(args: argparse.Namespace, packed: bool = False) -> list[str]:
    batch, steps = (args.packed_batch_size, args.packed_steps) if packed else (args.batch_size, args.steps)
    return [f"train.batch_size={batch}", f"train.seq_len={args.seq_len}", f"sft.packing={str(packed).lower()}",
            f"train.max_steps={args.warmup + steps}", "train.log_every=1", "train.eval_every=0",
            "train.eval_batches=1", "train.ckpt_every=0", "train.keep_last=1", f"train.seed={args.seed}",
            "train.device=cpu", "train.dtype=fp32", "train.tensorboard=false",
            f"optim.lr={args.lr}", "optim.schedule=constant", "optim.warmup_steps=0", "optim.weight_decay=0",
            "optim.grad_clip=1.0", f"lora.r={args.r}", f"lora.alpha={args.alpha}", "lora.dropout=0",
            f"lora.target_modules={args.targets}"]


# ----------------------------------------------------------------------------- the two sides (subprocesses)

def run_lmstack_side(args: argparse.Namespace, work: Path, packed: bool = False) -> dict[str, Any]:
    """``sft(..., lora=True)`` (padded, or with ``sft.packing=true``); the per-step losses, trained tokens
    and step seconds from its metrics.jsonl."""
    from lmstack.stages.sft import sft
    from lmstack.train.loop import read_metrics

    run_dir = work / ("lmstack-packed-run" if packed else "lmstack-run")
    started = time.perf_counter()
    sft(args.model, [str(work / "tasks.jsonl")], run_dir, overrides=lmstack_overrides(args, packed),
        overwrite=True, progress=False, lora=True)
    wall = time.perf_counter() - started
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r and "event" not in r]
    losses, seconds, tokens, previous = [], [], [], 0
    for row in rows:  # tokens is the running total: a step's tokens over its tokens/s is its seconds
        losses.append(row["loss"])
        tokens.append(row["tokens"] - previous)
        seconds.append((row["tokens"] - previous) / row["tokens_per_second"])
        previous = row["tokens"]
    return {"losses": losses, "step_seconds": seconds, "trained_tokens": tokens, "wall_seconds": wall,
            "vm_hwm_mib": vm_hwm_mib()}


def run_peft_side(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """PeftModel(LlamaForCausalLM) in a plain loop over the saved batches."""
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
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
    return {"losses": losses, "step_seconds": seconds, "wall_seconds": time.perf_counter() - started,
            "vm_hwm_mib": vm_hwm_mib()}


# ----------------------------------------------------------------------------- preparation (parent process)

def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Weights (import + HF export), task data, the batches and the initial adapter; returns token counts."""
    from lmstack.checkpoint import load_checkpoint
    from lmstack.config import SFTConfig
    from lmstack.data.instruct import InstructLoader, load_instruct, write_tasks
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
    write_tasks(work / "tasks.jsonl", args.n, seed=0)

    source = load_checkpoint(args.model)
    tokenizer, model_cfg = source.tokenizer, source.model.config
    del source
    sft_cfg = SFTConfig()  # the split and rendering sft uses with its defaults
    data = load_instruct([str(work / "tasks.jsonl")], tokenizer, args.seq_len + 1, loss_on=sft_cfg.loss_on,
                         overlong=sft_cfg.overlong, val_fraction=sft_cfg.val_fraction, seed=sft_cfg.seed)
    loader = InstructLoader(data.train, args.batch_size, seed=args.seed, pad_id=tokenizer.pad_id)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == args.warmup + args.steps:
            break
    if len(batches) < args.warmup + args.steps:
        raise SystemExit(f"--n {args.n} gives {len(batches)} batches; raise --n")
    torch.save(batches, work / "batches.pt")
    input_lengths = {}  # a padded row -> its length without padding (rows are matched whole, pads included)
    for batch in batches:
        width = batch["input_ids"].shape[1]
        for e in data.train:
            if len(e.ids) - 1 <= width:
                input_lengths[(width, tuple(e.ids[:-1]))] = len(e.ids) - 1
    input_tokens = []
    for batch in batches:
        width, total = batch["input_ids"].shape[1], 0
        for row in batch["input_ids"].tolist():
            total += next(n for n in range(width, 0, -1) if (width, tuple(row[:n])) in input_lengths
                          and all(t == tokenizer.pad_id for t in row[n:]))
        input_tokens.append(total)

    seed_everything(args.seed)  # sft's order: seed, build the model, wrap it (the A draw), then train
    model = build_model(model_cfg)
    lora_cfg = LoRAConfig(r=args.r, alpha=args.alpha, dropout=0.0, target_modules=args.targets.split(","))
    apply_lora(model, lora_cfg)
    save_adapter(model, lora_cfg, work / "init-adapter")
    return {"trained_tokens": [int((b["labels"] != -1).sum()) for b in batches], "input_tokens": input_tokens,
            "padded_tokens": [b["input_ids"].numel() for b in batches]}


def run_side(side: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--side", side, "--work", str(work), "--model", args.model,
           *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("side", "work", "model", "out")]]
    subprocess.run(cmd, check=True, cwd=REPO)
    return json.loads((work / f"{side}.json").read_text())


def summarize(args: argparse.Namespace, tokens: dict[str, Any], sides: dict[str, dict[str, Any]]) -> str:
    timed = slice(args.warmup, args.warmup + args.steps)
    speed = {}
    for name in ("lmstack", "peft"):
        secs = sum(sides[name]["step_seconds"][timed])
        speed[name] = {"trained": sum(tokens["trained_tokens"][timed]) / secs,
                       "input": sum(tokens["input_tokens"][timed]) / secs, "step_ms": 1000 * secs / args.steps}
    packed = sides["lmstack-packed"]
    packed_timed = slice(args.warmup, args.warmup + args.packed_steps)
    secs = sum(packed["step_seconds"][packed_timed])
    speed["lmstack-packed"] = {"trained": sum(packed["trained_tokens"][packed_timed]) / secs, "input": None,
                               "step_ms": 1000 * secs / args.packed_steps}
    lm, pf = sides["lmstack"], sides["peft"]
    diffs = [abs(a - b) for a, b in zip(lm["losses"], pf["losses"])]
    lines = ["| side | batch | trained tok/s | input tok/s (no padding) | ms/step | peak RSS (VmHWM) | wall |",
             "|---|---|---:|---:|---:|---:|---:|"]
    rows = (("lmstack", "lmstack sft --lora", f"{args.batch_size} conversations, padded"),
            ("lmstack-packed", "lmstack sft --lora sft.packing=true", f"{args.packed_batch_size} x {args.seq_len}-token windows"),
            ("peft", "transformers + peft (plain loop)", f"{args.batch_size} conversations, padded"))
    for name, label, batch in rows:
        s, side = speed[name], sides[name]
        input_speed = f"{s['input']:,.0f}" if s["input"] is not None else "-"
        lines.append(f"| {label} | {batch} | {s['trained']:,.0f} | {input_speed} | {s['step_ms']:,.0f} | "
                     f"{side['vm_hwm_mib']:,.0f} MiB | {side['wall_seconds']:.0f} s |")
    lines.append(f"| ratio lmstack / peft, equal shapes | | {speed['lmstack']['trained'] / speed['peft']['trained']:.2f}x | "
                 f"{speed['lmstack']['input'] / speed['peft']['input']:.2f}x | | "
                 f"{lm['vm_hwm_mib'] / pf['vm_hwm_mib']:.2f}x | |")
    lines.append(f"| ratio lmstack packed / peft padded, end to end | | "
                 f"{speed['lmstack-packed']['trained'] / speed['peft']['trained']:.2f}x | | | | |")
    lines += ["", "| step | lmstack loss | peft loss | abs diff |", "|---:|---:|---:|---:|"]
    for i, (a, b) in enumerate(zip(lm["losses"], pf["losses"]), start=1):
        lines.append(f"| {i}{' (warm-up)' if i <= args.warmup else ''} | {a:.5f} | {b:.5f} | {abs(a - b):.2e} |")
    lines.append(f"\nmax abs loss difference over {len(diffs)} steps: {max(diffs):.2e}; "
                 f"padding: {1 - sum(tokens['input_tokens']) / sum(tokens['padded_tokens']):.0%} of the padded "
                 "batches' input positions")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(args.work)
    if args.side:  # one side, in its own process
        torch.set_num_threads(args.threads)
        result = run_peft_side(args, work) if args.side == "peft" else \
            run_lmstack_side(args, work, packed=args.side == "lmstack-packed")
        (work / f"{args.side}.json").write_text(json.dumps(result))
        return
    from lmstack.atomic import write_json_atomic, write_text_atomic

    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    tokens = prepare(args, work)
    sides = {side: run_side(side, args, work) for side in ("lmstack", "lmstack-packed", "peft")}
    table = summarize(args, tokens, sides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", {"args": vars(args), "tokens": tokens, "sides": sides,
                                             "total_wall_seconds": time.perf_counter() - started})
    write_text_atomic(out / "table.md", table + "\n")
    print(table)
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
