"""Model families at equal training compute on the default corpus: validation loss against FLOPs.

    python bench/bench_families.py --out runs/bench_families            # ~20 min on a busy 2-core CPU
    python bench/bench_families.py --out /tmp/bf --gpt-steps 20         # quick look, every family
    python bench/bench_families.py --out /tmp/bf --gpt-steps 40 --families gpt,t5,moe-top1

Pipeline, all through the real command line: ``lmstack tokenizer train`` (BPE on a slice of the
classics corpus, the default corpus), ``lmstack data tokenize classics``, then one ``lmstack pretrain``
per family with the same small shapes (4 layers x 128, 4 heads, window 128, batch 16). The decoder
baseline (``gpt``) runs ``--gpt-steps`` steps; every other family runs as many steps as buy the same
training FLOPs by its own ``flops_per_token`` (active parameters for MoE; encoder + decoder tokens
of a span-corruption window for T5; windowed layers score fewer keys). Equal FLOPs is not equal wall
time: the tokens/s columns say what each family costs on this CPU.

Families: gpt (Llama-style pre-RMSNorm, SwiGLU, RoPE), gpt+window (GPT-3's alternating dense /
32-token sliding-window layers), gpt+alibi, gpt+deepnorm (post-LN with DeepNet scaling), prefix_lm,
glm (blank infilling), t5 (3 + 3 layers, span corruption), moe-top1 / moe-top2 (4 experts, every
layer) and bert (masked LM).

Two numbers per family, because the objectives differ:
  * ``val loss`` - the validation loss of the family's own objective (what ``lmstack pretrain``
    logs): next-token loss for decoders, suffix loss for the prefix LM, masked-span loss for T5 and
    GLM, masked-token loss for BERT. Comparable within a task, not across tasks.
  * ``continuation loss`` - one yardstick for the generative families: the mean next-token loss of
    the 63 tokens that follow the first 64 tokens of a validation window, the same tokens and the
    same context for every family (decoders: causal; prefix LM: the 64 context tokens as a
    bidirectional prefix; GLM: context + ``<|mask|>`` as part A, the continuation as the blank
    after its start token; T5: context + ``<|sentinel_0|>`` into the encoder, the continuation as
    the span). It favours the causal decoders: a 63-token blank at the end is far from the ~3-token
    spans T5 and GLM train on. BERT has no left-to-right distribution, so it gets none.

MoE rows also report routing during training (from the logged metrics): the share of expert
assignments dropped for exceeding capacity (capacity factor 1.25; validation runs without a limit)
and the busiest / idlest expert's share of kept assignments, averaged over MoE layers.

Throughput: ``tokens/s (interleaved)`` is measured after training, in this process, round-robin over
the families (``--speed-rounds`` rounds of ``--speed-steps`` training steps each, best round), so
every family sees the same machine load; ``tokens/s (logged in its run)`` is the median rate the
run logged, which on a shared machine swings with whatever else ran at the time.

Threads: each run uses ``--threads`` intra-op threads (default 1). On a shared 2-core machine two
spinning OpenMP threads per process made a training step ~4x slower than one thread.

Outputs: OUT/families.png (val loss vs FLOPs, continuation loss per family), OUT/results.json,
OUT/results.md (the table pasted into BENCHMARKS.md), one run directory per family under OUT/runs.
Finished runs are reused when their settings match, so an interrupted bench resumes family by family.
Caveats: one seed, minutes of CPU training, a 1M-parameter scale; see BENCHMARKS.md for the reading.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lmstack.atomic import write_atomic, write_json_atomic, write_text_atomic
from lmstack.train.loop import read_metrics

SEQ_LEN, BATCH = 128, 16
SHAPE = ["model.n_layer=4", "model.n_embd=128", "model.n_head=4", f"model.block_size={SEQ_LEN}"]
TRAIN = [f"train.batch_size={BATCH}", f"train.seq_len={SEQ_LEN}", "train.eval_batches=8", "train.tensorboard=false",
         "train.max_minutes=0", "train.log_every=5", "optim.lr=2e-3"]
# name -> (preset, overrides applied after SHAPE + TRAIN)
FAMILIES: dict[str, tuple[str, list[str]]] = {
    "gpt": ("tiny", []),
    "gpt+window": ("tiny", ["model.attn_window=32", "model.sparse_every=2"]),
    "gpt+alibi": ("tiny", ["model.position=alibi"]),
    "gpt+deepnorm": ("tiny", ["model.deepnorm=true", "model.norm_placement=post", "model.norm=layernorm"]),
    "prefix_lm": ("tiny-prefixlm", []),
    "glm": ("tiny-glm", []),
    "t5": ("tiny-t5", ["model.n_layer=3", "model.n_decoder_layer=3"]),
    "moe-top1": ("tiny-moe", ["model.n_expert=4", "model.top_k=1"]),
    "moe-top2": ("tiny-moe", ["model.n_expert=4", "model.top_k=2"]),
    "bert": ("tiny", ["model.family=bert"]),
}
GENERATIVE = {"gpt", "prefix_lm", "glm", "t5", "moe"}  # families with a next-token continuation loss


def lmstack(*args: str, threads: int) -> None:
    cmd = [sys.executable, "-m", "lmstack.cli", *args]
    print("$ lmstack " + " ".join(args), file=sys.stderr, flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, env=env)


def prepare_data(out: Path, vocab: int, tokenizer_bytes: int, threads: int) -> Path:
    tok_dir, data_dir = out / "tokenizer", out / "data"
    if not (tok_dir / "tokenizer.json").is_file():
        lmstack("tokenizer", "train", "--input", "classics", "--vocab-size", str(vocab),
                "--max-bytes", str(tokenizer_bytes), "--out", str(tok_dir), "--no-progress", threads=threads)
    if not (data_dir / "meta.json").is_file():
        lmstack("data", "tokenize", "classics", "--tokenizer", str(tok_dir), "--out", str(data_dir), threads=threads)
    return data_dir


def family_overrides(name: str, vocab: int) -> list[str]:
    return SHAPE + TRAIN + [f"model.vocab_size={vocab}"] + FAMILIES[name][1]


def family_config(name: str, vocab: int):
    from lmstack.config import build_run_config

    return build_run_config(FAMILIES[name][0], overrides=family_overrides(name, vocab))


# ----------------------------------------------------------------------------- continuation loss

def continuation_split(seq_len: int) -> tuple[int, int]:
    """(context, continuation) token counts that every family can score inside ``seq_len`` positions.

    GLM needs context + <|mask|> + start token + continuation - 1 <= seq_len, the tightest layout,
    so the continuation is one token shorter than the second half of the window.
    """
    context = seq_len // 2
    return context, seq_len - context - 1


def continuation_batch(family: str, x: torch.Tensor, tokenizer: Any) -> dict[str, Any]:
    """The model inputs that score x[:, C:C+N] given x[:, :C] (C, N from :func:`continuation_split`).

    Returns keyword pieces for :func:`continuation_loss`: ``args`` (positional model inputs),
    ``kwargs`` and ``targets`` (-1 where nothing is scored); exactly N targets per row are scored.
    """
    B, T = x.shape
    C, N = continuation_split(T)
    context, cont = x[:, :C], x[:, C:C + N]  # (B, C), (B, N)

    def fill(value: int, width: int) -> torch.Tensor:
        return torch.full((B, width), value, dtype=x.dtype)

    if family == "t5":
        sentinel = tokenizer.special_tokens["<|sentinel_0|>"]
        encoder_input = torch.cat([context, fill(sentinel, 1)], dim=1)  # (B, C + 1)
        decoder_input = torch.cat([fill(tokenizer.eot_id, 1), fill(sentinel, 1), cont[:, :-1]], dim=1)  # (B, N + 1)
        targets = torch.cat([fill(-1, 1), cont], dim=1)  # the sentinel after the start token is not scored
        return {"args": (encoder_input, decoder_input), "kwargs": {}, "targets": targets}
    if family == "glm":
        mask_id = tokenizer.special_tokens["<|mask|>"]
        start = tokenizer.special_tokens["<|sentinel_0|>"]
        part_a = torch.cat([context, fill(mask_id, 1)], dim=1)  # (B, C + 1), bidirectional
        inputs = torch.cat([part_a, fill(start, 1), cont[:, :-1]], dim=1)  # (B, C + 1 + N) = (B, T)
        targets = torch.cat([fill(-1, C + 1), cont], dim=1)  # the start token predicts cont[0]
        return {"args": (inputs,), "kwargs": {"prefix_len": torch.full((B,), C + 1)}, "targets": targets}
    if family not in ("gpt", "prefix_lm", "moe"):
        raise ValueError(f"no continuation loss for family {family!r}")
    inputs = x[:, :C + N]  # (B, C + N); position t predicts token t + 1
    targets = torch.cat([fill(-1, C - 1), cont, fill(-1, 1)], dim=1)
    kwargs = {"prefix_len": torch.full((B,), C)} if family == "prefix_lm" else {}
    return {"args": (inputs,), "kwargs": kwargs, "targets": targets}


@torch.no_grad()
def continuation_loss(model: torch.nn.Module, family: str, x: torch.Tensor, tokenizer: Any) -> float:
    """Mean next-token loss (nats) of the continuation tokens of the windows x (B, T)."""
    import torch.nn.functional as F

    batch = continuation_batch(family, x, tokenizer)
    logits = model(*batch["args"], **batch["kwargs"])[0]  # (B, T', V)
    return float(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch["targets"].reshape(-1),
                                 ignore_index=-1))


def validation_windows(data_dir: Path, batches: int) -> list[torch.Tensor]:
    """The first ``batches`` validation batches (B, T) in loader order, the same for every family."""
    from lmstack.data.loader import TokenLoader

    loader = TokenLoader(data_dir, "val", BATCH, SEQ_LEN, seed=0)
    windows = [batch["input_ids"] for _, batch in zip(range(batches), loader)]
    if not windows:
        raise ValueError(f"{data_dir} has no validation windows of {SEQ_LEN} tokens")
    return windows


# ----------------------------------------------------------------------------- run records

def moe_routing(rows: list[dict[str, Any]], model: torch.nn.Module, x: torch.Tensor) -> dict[str, float] | None:
    """Routing statistics of an MoE run, or None for other families.

    From the training log (each row the last micro-batch of its step, averaged over MoE layers by
    the objective): the dropped share of expert assignments over the whole run and its second half.
    Per layer, on the validation windows x with the trained router and the *training* capacity
    (``model.train()`` under no_grad; validation itself runs without a limit): dropped share and the
    busiest / idlest expert's share of kept assignments. The per-layer figures matter because the
    logged per-expert shares are averaged over layers, which hides a layer whose router collapsed
    onto one or two experts when other layers favour different ones.
    """
    logged = [r for r in rows if "moe_dropped_frac" in r]
    if not logged or not hasattr(model, "blocks"):
        return None
    late = logged[len(logged) // 2:]
    layers = [block.moe for block in model.blocks if getattr(block, "is_moe", False)]
    captured: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: captured.append(out[1])) for layer in layers]
    model.train()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.eval()
    per_layer = []
    for stats in captured:  # (4 + E,) = [balance, z, dropped, assignments, kept per expert...]
        kept = stats[4:]
        share = kept / kept.sum().clamp(min=1)
        per_layer.append({"dropped": float(stats[2] / stats[3]), "max": float(share.max()), "min": float(share.min())})
    return {"dropped_frac_mean": statistics.fmean(r["moe_dropped_frac"] for r in logged),
            "dropped_frac_late": statistics.fmean(r["moe_dropped_frac"] for r in late),
            "balance_loss_late": statistics.fmean(r["moe_balance_loss"] for r in late),
            "final_layers": per_layer}


def run_family(name: str, out: Path, data_dir: Path, vocab: int, budget: float, a: argparse.Namespace) -> dict:
    """Train one family for its share of the FLOP budget (or reuse the finished run) and measure it."""
    from lmstack.models import build_model
    from lmstack.checkpoint import load_checkpoint

    cfg = family_config(name, vocab)
    model = build_model(cfg.model)
    flops_per_step = model.flops_per_token(SEQ_LEN) * BATCH * SEQ_LEN
    steps = max(1, round(budget / flops_per_step))
    every = max(1, steps // a.eval_points)
    overrides = family_overrides(name, vocab) + [f"train.max_steps={steps}", f"train.eval_every={every}",
                                                 f"train.ckpt_every={steps}", f"optim.warmup_steps={max(1, steps // 10)}"]
    run_dir = out / "runs" / name
    settings = {"preset": FAMILIES[name][0], "overrides": overrides, "threads": a.threads}
    done = (run_dir / "summary.json").is_file() and (run_dir / "bench.json").is_file() \
        and json.loads((run_dir / "bench.json").read_text()) == settings
    if not done:
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a stale or interrupted run of this bench: start it over
        lmstack("pretrain", "--data", str(data_dir), "--out", str(run_dir), "--preset", FAMILIES[name][0],
                *overrides, threads=a.threads)
        write_json_atomic(run_dir / "bench.json", settings, indent=1)
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_metrics(run_dir / "metrics.jsonl")
    curve = [(r["step"] * flops_per_step, r["val_loss"]) for r in rows if "val_loss" in r]
    speeds = [r["tokens_per_second"] for r in rows if "tokens_per_second" in r]
    family = cfg.model.family
    trained = load_checkpoint(run_dir / "model")
    trained_model = trained.model.eval()
    windows = validation_windows(data_dir, a.continuation_batches)
    cont = statistics.fmean(continuation_loss(trained_model, family, x, trained.tokenizer) for x in windows) \
        if family in GENERATIVE else None
    active = model.num_active_params() if hasattr(model, "num_active_params") else model.num_params()
    return {"family": family, "params": model.num_params(), "active_params": active,
            "flops_per_token": model.flops_per_token(SEQ_LEN), "steps": steps, "train_flops": steps * flops_per_step,
            "val_curve": curve, "final_val_loss": curve[-1][1], "continuation_loss": cont,
            # the median logged rate leaves out the intervals that include a validation pass
            "logged_tokens_per_second": statistics.median(speeds) if speeds else summary["tokens_per_second"],
            "train_seconds": summary["wall_seconds"], "moe_routing": moe_routing(rows, trained_model, windows[0])}


def interleaved_throughput(names: list[str], data_dir: Path, vocab: int, rounds: int, steps: int) -> dict[str, float]:
    """Training tokens/s per family, measured round-robin in this process so every family sees the
    same machine load: ``rounds`` times, each family runs ``steps`` full training steps (objective,
    backward, AdamW) on real batches; the best round counts (the least disturbed by other work)."""
    from lmstack.data.loader import TokenLoader
    from lmstack.models import build_model
    from lmstack.tokenizer import Tokenizer
    from lmstack.train.losses import objective_for
    from lmstack.train.optim import build_optimizer

    tokenizer = Tokenizer.load(data_dir)
    batches = iter(TokenLoader(data_dir, "train", BATCH, SEQ_LEN, seed=1))
    batch = next(batches)
    setups = {}
    for name in names:
        cfg = family_config(name, vocab)
        torch.manual_seed(0)
        model = build_model(cfg.model).train()
        setups[name] = (model, build_optimizer(model, cfg.optim, "cpu"), objective_for(cfg.model, tokenizer))
    best = {name: float("inf") for name in names}
    for round_index in range(rounds + 1):  # round 0 warms up allocators and kernels; not counted
        for name, (model, optimizer, objective) in setups.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                loss, _metrics = objective(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if round_index > 0:
                best[name] = min(best[name], (time.perf_counter() - t0) / steps)
    return {name: BATCH * SEQ_LEN / seconds for name, seconds in best.items()}


# ----------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_families", help="output directory (default: %(default)s)")
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset (default: all)")
    ap.add_argument("--gpt-steps", type=int, default=200,
                    help="steps of the gpt baseline; sets the FLOP budget (default: %(default)s)")
    ap.add_argument("--vocab-size", type=int, default=2048, help="tokenizer vocabulary (default: %(default)s)")
    ap.add_argument("--tokenizer-bytes", type=int, default=3_000_000,
                    help="text the tokenizer trains on (default: %(default)s)")
    ap.add_argument("--eval-points", type=int, default=5, help="validation passes per run (default: %(default)s)")
    ap.add_argument("--continuation-batches", type=int, default=8,
                    help="val batches (of 16 windows) for the continuation loss (default: %(default)s)")
    ap.add_argument("--speed-rounds", type=int, default=5,
                    help="interleaved throughput rounds after training; the best counts (default: %(default)s)")
    ap.add_argument("--speed-steps", type=int, default=4, help="training steps per family per round (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per run (default: %(default)s)")
    a = ap.parse_args()
    names = [n.strip() for n in a.families.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        sys.exit(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    for flag in ("gpt_steps", "eval_points", "continuation_batches", "threads", "speed_rounds", "speed_steps"):
        if getattr(a, flag) < 1:
            sys.exit(f"--{flag.replace('_', '-')} must be >= 1")
    torch.set_num_threads(a.threads)

    from lmstack.models import build_model
    from lmstack.tokenizer import Tokenizer

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data_dir = prepare_data(out, a.vocab_size, a.tokenizer_bytes, a.threads)
    vocab = 64 * math.ceil(Tokenizer.load(data_dir).vocab_size / 64)
    budget = build_model(family_config("gpt", vocab).model).flops_per_token(SEQ_LEN) * BATCH * SEQ_LEN * a.gpt_steps

    results: dict[str, dict] = {}
    for name in names:
        r = results[name] = run_family(name, out, data_dir, vocab, budget, a)
        cont = "n/a" if r["continuation_loss"] is None else f"{r['continuation_loss']:.3f}"
        print(f"{name:>13}: {r['steps']} steps, val loss {r['final_val_loss']:.3f}, continuation {cont}, "
              f"{r['logged_tokens_per_second']:,.0f} tok/s while training", file=sys.stderr, flush=True)
        write_json_atomic(out / "results.json", {"gpt_steps": a.gpt_steps, "budget_flops": budget, "families": results})

    print(f"throughput: {a.speed_rounds} interleaved rounds of {a.speed_steps} steps per family", file=sys.stderr)
    speeds = interleaved_throughput(names, data_dir, vocab, a.speed_rounds, a.speed_steps)
    for name, tokens_per_second in speeds.items():
        results[name]["tokens_per_second"] = tokens_per_second
    write_json_atomic(out / "results.json", {"gpt_steps": a.gpt_steps, "budget_flops": budget, "families": results})
    plot(results, out / "families.png", budget)
    table = markdown_table(results)
    write_text_atomic(out / "results.md", table)
    print(table)
    print(f"bench wall time {(time.time() - t0) / 60:.1f} min; plot {out / 'families.png'}", file=sys.stderr)


def markdown_table(results: dict) -> str:
    lines = ["| family | objective | params | active params | steps | training FLOPs | val loss (own objective) "
             "| continuation loss | tokens/s (interleaved) | tokens/s (logged in its run) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    objective = {"gpt": "next token", "moe": "next token + router aux", "prefix_lm": "prefix LM",
                 "glm": "blank infilling", "t5": "span corruption", "bert": "masked LM"}
    for name, r in results.items():
        cont = "n/a" if r["continuation_loss"] is None else f"{r['continuation_loss']:.3f}"
        lines.append(f"| {name} | {objective.get(r['family'], r['family'])} | {r['params'] / 1e6:.2f}M | "
                     f"{r['active_params'] / 1e6:.2f}M | {r['steps']} | {r['train_flops']:.2e} | "
                     f"{r['final_val_loss']:.3f} | {cont} | {r['tokens_per_second']:,.0f} | "
                     f"{r['logged_tokens_per_second']:,.0f} |")
    routed = {n: r["moe_routing"] for n, r in results.items() if r.get("moe_routing")}
    if routed:
        lines += ["", "| MoE run | dropped assignments, training (whole run / 2nd half) | balance loss, 2nd half "
                  "(1 = even) | per layer after training: dropped | per layer: busiest / idlest expert share "
                  "of kept assignments (even = 1/E) |", "|---|---|---|---|---|"]
        for n, m in routed.items():
            dropped = ", ".join(f"{layer['dropped']:.0%}" for layer in m["final_layers"])
            shares = ", ".join(f"{layer['max']:.2f} / {layer['min']:.2f}" for layer in m["final_layers"])
            lines.append(f"| {n} | {m['dropped_frac_mean']:.1%} / {m['dropped_frac_late']:.1%} | "
                         f"{m['balance_loss_late']:.3f} | {dropped} | {shares} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path, budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name, r in results.items():
        flops, losses = zip(*r["val_curve"])
        style = "o-" if r["family"] in ("gpt", "moe") else "s--"
        left.plot([f / 1e12 for f in flops], losses, style, ms=3, label=f"{name} ({r['family']})")
    left.set_xlabel("training compute (TFLOPs)")
    left.set_ylabel("validation loss, family's own objective (nats)")
    left.set_title(f"equal budget: {budget / 1e12:.2f} TFLOPs each")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    names = [n for n, r in results.items() if r["continuation_loss"] is not None]
    values = [results[n]["continuation_loss"] for n in names]
    right.barh(names, values, color="tab:blue")
    for i, v in enumerate(values):
        right.text(v, i, f" {v:.3f}", va="center", fontsize=8)
    if values:
        right.set_xlim(min(values) - 0.3, max(values) + 0.3)
    right.set_xlabel("loss of 63 val tokens after 64 tokens of context (nats / token)")
    right.set_title("one yardstick for the generative families (lower is better)")
    right.invert_yaxis()
    right.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=90), suffix=".png")
    plt.close(fig)


if __name__ == "__main__":
    main()
