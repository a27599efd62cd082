"""`lmstack dpo --lora` on SmolLM2-135M-Instruct: a short seeded run, before/after on held-out pairs, greedy refusals
and BIG-bench hhh_alignment.

    python bench/bench_dpo_smollm.py                                  # ~30 min on an idle 2-core CPU
    python bench/bench_dpo_smollm.py --model runs/bench-sft-peft/smollm2 --steps 60 --hhh-limit 100
    python bench/bench_dpo_smollm.py --replot          # redraw from OUT/smollm_results.json

1. Weights: ``lmstack import smollm2-135m-instruct`` into WORK/smollm2 (or ``--model``).
2. Pairs: ``--n-train`` rule-labelled pairs (lmstack.data.preference, seed 0) in TRL's standard format, rendered
   by the model's own chat template; ``--n-test`` held-out pairs of seed 1.
3. ``lmstack dpo --lora`` (r=16 on q/k/v/o, reference = the base with the adapters off, sigmoid loss, beta
   ``--beta``, ``dpo.sft_weight`` ``--sft-weight``: the chosen-NLL term that bench/bench_dpo.py measures),
   ``--steps`` steps of ``--batch-size`` pairs; WORK/dpo-lora/model is the merged model.

Measures, base and DPO model in the same run: the held-out likelihood preference accuracy (chosen has the higher
summed log-probability), the implicit-reward accuracy of the DPO model against the base, the mean chosen and
rejected log-probabilities per rule, greedy rule-following on the held-out prompts per rule (at most
``--max-tokens`` new tokens), and ``hhh_alignment`` (BIG-bench, 221 items, the first ``--hhh-limit`` of them:
the model prefers the more helpful, honest and harmless reply by log-likelihood; an evaluation task, never
trained on).

Outputs: OUT/smollm_results.json and OUT/smollm_dpo.png (default OUT: bench/results/dpo); Markdown to stdout.
Caveats: one seed and a short run on a CPU; the pairs are synthetic (made-up harmful requests, arithmetic, terse
answers), so hhh_alignment measures whether that narrow preference moves a broad one, and may not.
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

PACKAGE = "smollm2-135m-instruct"
RULES = ("arithmetic", "concise", "refusal")


@torch.no_grad()
def evaluate(model_dir: Path, test: list[dict], reference_dir: Path | None, max_tokens: int,
             hhh_limit: int | None) -> dict[str, Any]:
    from lmstack.checkpoint import load_checkpoint
    from lmstack.data.preference import (
        PreferenceLoader,
        follows_rule,
        record_pair,
        render_pair,
    )
    from lmstack.engine.engine import Engine
    from lmstack.engine.sampling import SamplingParams
    from lmstack.evals.run import evaluate_checkpoint
    from lmstack.train.preference_losses import completion_logps

    started = time.time()
    ckpt = load_checkpoint(model_dir)
    model, tok = ckpt.model.eval(), ckpt.tokenizer
    pairs = [render_pair(tok, *record_pair(p)) for p in test]
    reference = load_checkpoint(reference_dir).model.eval() if reference_dir else None
    chosen, rejected, implicit = [], [], []
    for batch in PreferenceLoader(pairs, 8, pad_id=tok.pad_id, shuffle=False):
        logps = completion_logps(model, batch)
        half = logps.shape[0] // 2
        chosen += logps[:half].tolist()
        rejected += logps[half:].tolist()
        if reference is not None:
            ratios = logps - completion_logps(reference, batch)
            implicit += (ratios[:half] > ratios[half:]).tolist()
    per_rule = {rule: {"chosen": statistics.fmean(c for c, p in zip(chosen, test) if p["rule"] == rule),
                       "rejected": statistics.fmean(r for r, p in zip(rejected, test) if p["rule"] == rule)}
                for rule in RULES if any(p["rule"] == rule for p in test)}
    print(f"  log-probs done ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    prompts = [tok.render_chat([{"role": "user", "content": p["prompt"]}], add_generation_prompt=True)[0] for p in test]
    engine = Engine(model, tok, max_num_seqs=32, device="cpu",  # the KV pool sized for these prompts, not 8k tokens
                    max_model_len=max(map(len, prompts)) + max_tokens)
    outputs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    follows: dict[str, list[bool]] = {rule: [] for rule in RULES}
    for pair, out in zip(test, outputs):
        follows[pair["rule"]].append(follows_rule(pair, out.outputs[0].text))
    del engine, reference
    print(f"  greedy samples done ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    hhh = evaluate_checkpoint(str(model_dir), ["hhh_alignment"], limit=hhh_limit, device="cpu", show_progress=False,
                              keep_records=False)
    print(f"  hhh_alignment done ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    return {"likelihood_accuracy": sum(c > r for c, r in zip(chosen, rejected)) / len(test),
            "implicit_accuracy": sum(implicit) / len(implicit) if implicit else None, "logps": per_rule,
            "rule_following": {rule: sum(v) / len(v) if v else None for rule, v in follows.items()},
            "hhh_alignment": hhh["results"]["hhh_alignment"], "seconds": time.time() - started,
            "examples": [{"prompt": p["prompt"], "output": o.outputs[0].text} for p, o in list(zip(test, outputs))[:8]]}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, tuned = results["base"], results["dpo"]
    names = ["likelihood pref. acc.", *[f"{r} rule" for r in RULES], "hhh_alignment acc", "hhh acc_norm"]
    before = [base["likelihood_accuracy"], *[base["rule_following"][r] or 0 for r in RULES],
              base["hhh_alignment"]["acc"], base["hhh_alignment"]["acc_norm"]]
    after = [tuned["likelihood_accuracy"], *[tuned["rule_following"][r] or 0 for r in RULES],
             tuned["hhh_alignment"]["acc"], tuned["hhh_alignment"]["acc_norm"]]
    fig, (ax, logp_axis) = plt.subplots(1, 2, figsize=(15, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], before, 0.4, label="SmolLM2-135M-Instruct", color="tab:gray")
    ax.bar([i + 0.2 for i in x], after, 0.4, label=f"+ DPO LoRA, {results['settings']['steps']} steps, "
           f"sft_weight {results['settings']['sft_weight']:g}", color="tab:blue")
    for i, (b, a) in enumerate(zip(before, after)):
        ax.text(i - 0.2, b, f"{b:.0%}", ha="center", va="bottom", fontsize=8)
        ax.text(i + 0.2, a, f"{a:.0%}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), names, fontsize=8)
    ax.set_ylim(0, 1.1)
    hhh_items = results["base"]["hhh_alignment"].get("n", "all")
    ax.set_title(f"held-out pairs (n={results['n_test']}) and hhh_alignment ({hhh_items} items), before / after")
    ax.legend(fontsize=8)
    rules = [r for r in RULES if r in base["logps"]]
    for k, (side, color) in enumerate((("chosen", "tab:green"), ("rejected", "tab:red"))):
        xs = [i + (k - 0.5) * 0.4 for i in range(len(rules))]
        logp_axis.scatter(xs, [base["logps"][r][side] for r in rules], color=color, marker="o", facecolors="none",
                          label=f"{side}, base")
        logp_axis.scatter(xs, [tuned["logps"][r][side] for r in rules], color=color, marker="o",
                          label=f"{side}, after DPO")
        for x, r in zip(xs, rules):
            logp_axis.annotate("", (x, tuned["logps"][r][side]), (x, base["logps"][r][side]),
                               arrowprops={"arrowstyle": "->", "color": color})
    logp_axis.set_xticks(range(len(rules)), rules)
    logp_axis.set_ylabel("mean summed log-prob of the completion")
    logp_axis.set_title("held-out completions, per rule: base -> after")
    logp_axis.grid(alpha=0.3)
    logp_axis.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def markdown(results: dict) -> str:
    lines = [f"Command: `{results['command']}` ({results['wall_minutes']:.1f} min, {results['cpu_count']} CPUs)", "",
             "| model | likelihood pref. acc. | implicit-reward acc. | " + " | ".join(RULES)
             + " | hhh_alignment acc | hhh acc_norm | " + " | ".join(f"log p chosen / rejected, {r}" for r in RULES)
             + " |", "|---|---|---|" + "---|" * (2 * len(RULES)) + "---|---|"]
    for name, e in (("SmolLM2-135M-Instruct", results["base"]), ("+ DPO (LoRA)", results["dpo"])):
        implicit = "-" if e["implicit_accuracy"] is None else f"{e['implicit_accuracy']:.1%}"
        rules = " | ".join("-" if e["rule_following"][r] is None else f"{e['rule_following'][r]:.0%}" for r in RULES)
        logps = " | ".join(f"{e['logps'][r]['chosen']:.1f} / {e['logps'][r]['rejected']:.1f}" if r in e["logps"]
                           else "-" for r in RULES)
        lines.append(f"| {name} | {e['likelihood_accuracy']:.1%} | {implicit} | {rules} | "
                     f"{e['hhh_alignment']['acc']:.1%} | {e['hhh_alignment'].get('acc_norm', float('nan')):.1%} | "
                     f"{logps} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/dpo", help="results directory (default: %(default)s)")
    ap.add_argument("--work", default="runs/bench_dpo_smollm", help="work directory (default: %(default)s)")
    ap.add_argument("--model", default=None, help="an imported SmolLM2 checkpoint (default: import into WORK)")
    ap.add_argument("--n-train", type=int, default=600, help="training pairs (default: %(default)s)")
    ap.add_argument("--n-test", type=int, default=60, help="held-out pairs (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=40, help="DPO steps (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per step (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=5e-4, help="LoRA learning rate (default: %(default)s)")
    ap.add_argument("--beta", type=float, default=0.1, help="dpo.beta (default: %(default)s)")
    ap.add_argument("--sft-weight", type=float, default=1.0, help="dpo.sft_weight, the chosen-NLL term; 0 is plain "
                                                                  "DPO (default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per prompt (default: %(default)s)")
    ap.add_argument("--hhh-limit", type=int, default=None, help="hhh_alignment items (default: all 221)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    ap.add_argument("--replot", action="store_true", help="only redraw the plot and the table from "
                                                           "OUT/smollm_results.json")
    a = ap.parse_args()
    if a.replot:
        results = json.loads((Path(a.out) / "smollm_results.json").read_text())
        plot(results, Path(a.out) / "smollm_dpo.png")
        return print(markdown(results))
    torch.set_num_threads(a.threads)
    from lmstack.atomic import write_json_atomic
    from lmstack.data.preference import make_preference_pairs, write_pairs

    t0 = time.time()
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if a.model is None:
        a.model = str(work / "smollm2")
        if not (Path(a.model) / "config.json").is_file():
            subprocess.run([sys.executable, "-m", "lmstack.cli", "import", PACKAGE, "--out", a.model], check=True)
    write_pairs(work / "pairs_train.jsonl", a.n_train, seed=0)
    test = make_preference_pairs(a.n_test, seed=1)
    results: dict[str, Any] = {"command": "python bench/bench_dpo_smollm.py " + " ".join(sys.argv[1:]),
                               "cpu_count": os.cpu_count(), "settings": vars(a), "n_test": a.n_test}
    print("evaluating the base model", file=sys.stderr, flush=True)
    results["base"] = evaluate(Path(a.model), test, None, a.max_tokens, a.hhh_limit)
    run = work / "dpo-lora"
    cmd = [sys.executable, "-m", "lmstack.cli", "dpo", "--model", a.model, "--data", str(work / "pairs_train.jsonl"),
           "--out", str(run), "--overwrite", "--lora", "dpo.reference=copy", f"dpo.beta={a.beta}",
           f"dpo.sft_weight={a.sft_weight}",
           "lora.r=16", "lora.alpha=32", "lora.target_modules=q_proj,k_proj,v_proj,o_proj",
           f"train.max_steps={a.steps}", f"train.batch_size={a.batch_size}", "train.seq_len=256",
           f"optim.lr={a.lr}", "optim.warmup_steps=4", "optim.schedule=cosine", "optim.weight_decay=0",
           "train.log_every=5", "train.eval_every=0", "train.eval_batches=2", f"train.ckpt_every={a.steps}",
           "train.tensorboard=false", "train.max_minutes=0", "train.seed=0", "train.device=cpu"]
    print("$ " + " ".join(cmd[2:]), file=sys.stderr, flush=True)
    trained = time.time()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
    results["train_seconds"] = time.time() - trained
    results["dpo"] = evaluate(run / "model", test, Path(a.model), a.max_tokens, a.hhh_limit)
    results["dpo"]["train_summary"] = json.loads((run / "summary.json").read_text())["heldout"]
    results["wall_minutes"] = (time.time() - t0) / 60
    write_json_atomic(out / "smollm_results.json", results, indent=1)
    plot(results, out / "smollm_dpo.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
