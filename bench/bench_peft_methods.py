"""Parameter-efficient fine-tuning methods against full fine-tuning, at an equal budget, on bench_sft's setup.

    python bench/bench_peft_methods.py                      # ~5 min on an idle 2-core CPU (base reused if built)
    python bench/bench_peft_methods.py --steps 300 --n-test 300

The base model and the data are bench_sft.py's: its ``build_base`` (a 2-layer x 128 GPT pretrained on a
classics slice plus plain-text task lines; reused from ``--work`` when bench_sft.py or an earlier run built it
with the same settings) and ``lmstack.data.instruct.make_task_conversations`` (training seed 0, held-out seed
1). Every variant is one ``lmstack sft`` run from that base with the same training file, ``--steps``, batch,
sequence length, warmup/cosine schedule and ``train.seed``: ``full`` (every weight), ``lora`` (``--lora``,
r=8 on q_proj and v_proj, alpha 16), ``qlora-int8`` (the same over an int8 base, ``--quantize int8``),
``prompt`` (``--prompt-tuning``, 20 virtual tokens, init=vocab) and ``prefix`` (``--prefix-tuning``, 20
virtual tokens per layer). The learning rate differs by method, as it does in practice (``--lr-*``); that
is part of what is compared.

Measured per variant: held-out exact match (greedy decoding of the user turn rendered with the chat format,
at most 16 tokens, a hit needs the end-of-turn token and the answer's text, as bench_sft.py scores it;
prompt and prefix models decode without a KV cache through lmstack.engine.generate, the others with one),
the held-out assistant-token loss, trainable parameters, training tokens/s (the run's summary), and the
peak resident memory of the ``lmstack sft`` process (``ru_maxrss``; for a 1M-parameter model this is
mostly the Python and torch runtime, so it says little about the methods: the weight/optimizer bytes
column is the analytic part that scales). The base is measured in the same run as the reference.

Outputs: OUT/results.json and OUT/peft_methods.png (default OUT: bench/results/peft_methods); the Markdown
table goes to stdout. Caveats: one seed by default, a tiny model, synthetic tasks; CPU int8 kernels run
their matmuls in bf16, which is slower than fp32 at this size, so the QLoRA tokens/s says nothing about
large models, where the point of quantizing is the memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_sft  # noqa: E402  (the base model and the scoring rules are bench_sft.py's)

from lmstack.atomic import write_json_atomic, write_text_atomic  # noqa: E402

VARIANTS = ("full", "lora", "qlora-int8", "prompt", "prefix")


def run_variant(name: str, base: Path, train_file: Path, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    """One `lmstack sft` process; returns its summary and the process's peak RSS."""
    run = work / "peft_methods" / name
    common = [f"train.max_steps={a.steps}", f"train.batch_size={a.batch_size}", "train.seq_len=96",
              f"train.seed={a.seed}", f"sft.seed={a.seed}", "train.eval_every=0", "train.eval_batches=4",
              f"train.ckpt_every={a.steps}", "train.tensorboard=false", "train.max_minutes=0",
              f"optim.warmup_steps={max(1, a.steps // 10)}", "optim.schedule=cosine"]
    extra = {"full": [f"optim.lr={a.lr_full}"],
             "lora": ["--lora", f"optim.lr={a.lr_lora}"],
             "qlora-int8": ["--lora", "--quantize", "int8", f"optim.lr={a.lr_lora}"],
             "prompt": ["--prompt-tuning", f"optim.lr={a.lr_prompt}", "prompt_tuning.init=vocab",
                        f"prompt_tuning.num_virtual_tokens={a.virtual_tokens}"],
             "prefix": ["--prefix-tuning", f"optim.lr={a.lr_prompt}",
                        f"prefix_tuning.num_virtual_tokens={a.virtual_tokens}"]}[name]
    args = ["sft", "--model", str(base), "--data", str(train_file), "--out", str(run), "--overwrite", *extra, *common]
    print("$ lmstack " + " ".join(args), file=sys.stderr, flush=True)
    rss_file = work / "peft_methods" / f"{name}.maxrss"
    code = ("import resource, sys\nfrom lmstack.cli import main\nrc = main(sys.argv[2:])\n"
            "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))\nsys.exit(rc)")
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    rss_file.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", code, str(rss_file), *args], check=True, env=env)
    summary = json.loads((run / "summary.json").read_text())
    return {"run": str(run), "summary": summary, "peak_rss_mb": int(rss_file.read_text()) / 1024}


def load_variant(name: str, base: Path, run: Path) -> torch.nn.Module:
    from lmstack.checkpoint import load_checkpoint
    from lmstack.interop.peft_adapters import load_prompt_adapter

    if name in ("prompt", "prefix"):
        return load_prompt_adapter(load_checkpoint(base).model, run / "adapter").eval()
    return load_checkpoint(run / "model" if run != base else base).model.eval()


@torch.no_grad()
def evaluate(model: torch.nn.Module, tok: Any, test: list[dict], use_kv_cache: bool) -> dict[str, Any]:
    """Greedy exact match and held-out assistant-token loss, scored as bench_sft.evaluate scores them."""
    from lmstack.data.instruct import collate, render_example
    from lmstack.engine.generate import generate_tokens
    from lmstack.engine.sampling import SamplingParams

    end_id = tok.special_tokens["<|end|>"]
    hits = []
    for conv in test:
        prompt = tok.render_chat(bench_sft.user_turns(conv), add_generation_prompt=True)[0]
        out = list(generate_tokens(model, prompt, SamplingParams(max_tokens=16, temperature=0.0,
                                                                 stop_token_ids=[end_id]), use_kv_cache=use_kv_cache))
        ended = bool(out) and out[-1] == end_id
        hits.append(ended and tok.decode(out[:-1]).strip() == conv["messages"][-1]["content"])
    total, count = 0.0, 0
    for start in range(0, len(test), 64):
        batch = collate([render_example(tok, c["messages"], "assistant") for c in test[start:start + 64]], tok.pad_id)
        logits = model(batch["input_ids"])[0]  # (B, T, V): the real tokens only, for the wrappers too
        total += float(F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-1,
                                       reduction="sum"))
        count += int((batch["labels"] != -1).sum())
    return {"exact_match": sum(hits) / len(hits), "assistant_loss": total / count}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["variants"])
    v = results["variants"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax, key, label in ((axes[0], "exact_match", "held-out exact match (greedy)"),
                           (axes[1], "assistant_loss", "held-out assistant-token loss (nats)")):
        values = [v[n][key] for n in names]
        ax.bar(names, values, color="tab:blue")
        for i, value in enumerate(values):
            ax.text(i, value, f"{value:.1%}" if key == "exact_match" else f"{value:.3f}", ha="center", va="bottom",
                    fontsize=8)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=20)
    trained = [n for n in names if n != "base"]
    axes[2].scatter([max(v[n]["trainable_params"], 1) for n in trained], [v[n]["assistant_loss"] for n in trained])
    for n in trained:
        axes[2].annotate(n, (max(v[n]["trainable_params"], 1), v[n]["assistant_loss"]), fontsize=8)
    axes[2].axhline(v["base"]["assistant_loss"], color="gray", ls="--", label="base")
    axes[2].set_xscale("log")
    axes[2].set_xlabel("trainable parameters")
    axes[2].set_ylabel("held-out assistant-token loss")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"{results['steps']} steps x batch {results['batch_size']}, seed {results['seed']}, "
                 f"{results['n_test']} held-out tasks")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def markdown(results: dict) -> str:
    lines = [f"Command: `{results['command']}` ({results['wall_minutes']:.1f} min, {results['cpu_count']} CPUs)", "",
             "| variant | trainable params | lr | exact match | held-out assistant loss | train tokens/s (x full) "
             "| peak RSS MB | base weights MB (as stored) |", "|---|---|---|---|---|---|---|---|"]
    full_tps = results["variants"].get("full", {}).get("tokens_per_second")
    for name, r in results["variants"].items():
        tps = r.get("tokens_per_second")
        ratio = f" ({tps / full_tps:.2f}x)" if tps and full_tps else ""
        lines.append(f"| {name} | {r['trainable_params']:,} | {r.get('lr') or '-'} | {r['exact_match']:.1%} | "
                     f"{r['assistant_loss']:.3f} | {f'{tps:,.0f}' if tps else '-'}{ratio} | "
                     f"{r.get('peak_rss_mb', 0):.0f} | {r.get('base_weight_mb', 0):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/peft_methods", help="results.json and the plot (default: %(default)s)")
    ap.add_argument("--work", default="runs/bench_sft", help="bench_sft's work directory: base and runs (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=150, help="fine-tuning steps per variant (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=16, help="fine-tuning batch (default: %(default)s)")
    ap.add_argument("--n-train", type=int, default=2000, help="fine-tuning conversations (default: %(default)s)")
    ap.add_argument("--n-test", type=int, default=150, help="held-out conversations (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="training seed of every variant (default: %(default)s)")
    ap.add_argument("--lr-full", type=float, default=5e-4, help="full fine-tuning LR (default: %(default)s)")
    ap.add_argument("--lr-lora", type=float, default=3e-3, help="LoRA and QLoRA LR (default: %(default)s)")
    ap.add_argument("--lr-prompt", type=float, default=3e-2, help="prompt and prefix tuning LR (default: %(default)s)")
    ap.add_argument("--virtual-tokens", type=int, default=20, help="prompt / prefix length (default: %(default)s)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="subset to run (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (default: %(default)s)")
    bench_sft_defaults = {"pretrain_steps": 1000, "classics_bytes": 1_500_000, "task_docs": 1500, "vocab_size": 1024}
    a = ap.parse_args()
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    if set(variants) - set(VARIANTS):
        sys.exit(f"unknown variants {sorted(set(variants) - set(VARIANTS))}; choose from {VARIANTS}")
    torch.set_num_threads(a.threads)
    from lmstack.checkpoint import load_checkpoint
    from lmstack.data.instruct import make_task_conversations
    from lmstack.models.peft import trainable_parameters

    t0 = time.time()
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    base = bench_sft.build_base(work, argparse.Namespace(**bench_sft_defaults, threads=a.threads))
    train_file = work / "peft_methods_train.jsonl"
    write_text_atomic(train_file, "".join(json.dumps(c) + "\n" for c in make_task_conversations(a.n_train, seed=0)))
    test = make_task_conversations(a.n_test, seed=1)
    source = load_checkpoint(base)
    tok, total_params = source.tokenizer, trainable_parameters(source.model)[1]
    results: dict[str, Any] = {"command": "python bench/bench_peft_methods.py " + " ".join(sys.argv[1:]),
                               "cpu_count": os.cpu_count(), "base": str(base), "steps": a.steps,
                               "batch_size": a.batch_size, "seed": a.seed, "n_test": a.n_test, "settings": vars(a),
                               "variants": {"base": {"trainable_params": 0, **evaluate(source.model.eval(), tok, test,
                                                                                        True)}}}
    float_mb = sum(p.numel() * p.element_size() for p in source.model.parameters()) / 2**20
    results["variants"]["base"]["base_weight_mb"] = float_mb
    for name in variants:
        info = run_variant(name, base, train_file, work, a)
        summary = info["summary"]
        section = next((summary[k] for k in ("lora", "prompt_tuning", "prefix_tuning") if k in summary), None)
        model = load_variant(name, base, Path(info["run"]))
        scores = evaluate(model, tok, test, use_kv_cache=name not in ("prompt", "prefix"))
        lr = {"full": a.lr_full, "prompt": a.lr_prompt, "prefix": a.lr_prompt}.get(name, a.lr_lora)
        base_bytes = section.get("base_weight_bytes") if section else None
        results["variants"][name] = {
            "trainable_params": section["trainable_params"] if section else total_params, "lr": lr, **scores,
            "tokens_per_second": summary["tokens_per_second"], "wall_seconds": summary["wall_seconds"],
            "peak_rss_mb": info["peak_rss_mb"], "final_val_loss": summary["final_val_loss"],
            "base_weight_mb": base_bytes / 2**20 if base_bytes else float_mb}
        print(f"{name}: exact match {scores['exact_match']:.1%}, loss {scores['assistant_loss']:.3f}",
              file=sys.stderr, flush=True)
        results["wall_minutes"] = (time.time() - t0) / 60
        write_json_atomic(out / "results.json", results, indent=1)
    results["wall_minutes"] = (time.time() - t0) / 60
    write_json_atomic(out / "results.json", results, indent=1)
    plot(results, out / "peft_methods.png")
    print(markdown(results))
    print(f"bench wall time {results['wall_minutes']:.1f} min; plot {out / 'peft_methods.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
