"""What DPO and a reward model learn from rule-labelled preference pairs, on a tiny SFT'd model: seeded before/after,
plain DPO against DPO with the chosen-NLL term (``dpo.sft_weight``, RPO) in the same run.

    python bench/bench_dpo.py                         # 4 DPO + 2 control runs: ~20 min on a 2-core CPU
    python bench/bench_dpo.py --seeds 0,1,2 --sft-weights 0,0.5,1 --dpo-steps 300
    python bench/bench_dpo.py --jobs 4 --threads 1   # the four DPO runs side by side (a busy machine)
    python bench/bench_dpo.py --replot                # redraw the plot and the table from OUT/results.json

Pipeline, through the real command line:

1. Base: the pretrained 2-layer x 128 GPT of bench/bench_sft.py (built by its ``build_base``, reused from
   runs/bench_sft when it exists with the same settings).
2. SFT (``lmstack sft``): exact-answer task conversations plus, for a disjoint set of rule-labelled pairs
   (seed 100), *both* completions of every pair as a conversation. The SFT model therefore imitates good and bad
   behaviour alike (right and wrong sums, bare and rambling answers, refusals and compliance with made-up
   harmful requests): there is something for preferences to fix.
3. DPO (``lmstack dpo``) from the SFT model on ``--n-train`` pairs (``python -m lmstack.data.preference
   --make-pairs``, seed 0), one run per seed and per ``dpo.sft_weight`` in ``--sft-weights`` (0 = plain DPO);
   the control, per seed: ``lmstack sft`` from the SFT model on the chosen completions alone (the NLL term
   without DPO; same steps, batch, learning rate and schedule; its implicit reward is measured the same way); a
   reward model (``lmstack reward``) from the SFT model on the same pairs, first seed only. A run whose settings
   match a finished one in WORK is reused.
4. Held-out pairs: ``--n-test`` pairs of seed 1. The rule space is small (16 words, 8 unsafe requests, sums
   below 100), so many held-out prompts also occur in the training pairs; the unsafe requests always do.

Measures, the SFT model measured in the same run:

* preference accuracy on the held-out pairs: for the SFT and DPO models, how often the chosen completion has the
  higher summed log-probability; for DPO also the implicit-reward accuracy (chosen gains more log-probability
  over the SFT reference than rejected); for the reward model, how often it scores chosen higher;
* the mean summed log-probability of the chosen and of the rejected held-out completions, per rule, for the SFT
  model and every DPO checkpoint (four per run): the trajectories that show whether DPO lowers the chosen
  completions along with the rejected ones;
* rule-following of greedy replies (:class:`lmstack.engine.Engine`, at most 40 tokens) on the held-out prompts,
  per rule (lmstack.data.preference.follows_rule): the exact answer (``arithmetic``), the bare answer with
  nothing else (``concise``), a reply starting with the refusal (``refusal``); and the same for 4 replies per
  prompt sampled at temperature 1 (seeded), which sees the whole distribution: the SFT model imitated good and
  bad replies alike, so its most likely reply can follow a rule while a sample often does not.

Outputs: OUT/results.json and OUT/dpo_effects.png (default OUT: bench/results/dpo); the Markdown table to stdout.
Caveats: a ~1M-parameter model; synthetic rules; few seeds; the numbers say what DPO changes, not how a large
model behaves.
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
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sft import build_base, lmstack  # noqa: E402  (the same base as the SFT benchmark)

from lmstack.atomic import write_json_atomic, write_text_atomic  # noqa: E402

RULES = ("arithmetic", "concise", "refusal")
SAMPLES = 4  # temperature-1 replies per held-out prompt
CONTROL = "SFT on chosen only (control)"


def _reusable(run: Path, settings: dict) -> bool:
    """A finished run of this bench with the same settings (its model is kept, not retrained)."""
    marker = run / "bench_settings.json"
    return (run / "model").is_dir() and marker.is_file() and json.loads(marker.read_text()) == settings


def sft_data(path: Path, n_tasks: int, n_pairs: int) -> None:
    """Task conversations plus both completions of rule-labelled pairs (seed 100) as conversations."""
    from lmstack.data.instruct import make_task_conversations
    from lmstack.data.preference import make_preference_pairs

    conversations = make_task_conversations(n_tasks, seed=0)
    for pair in make_preference_pairs(n_pairs, seed=100):
        for completion in (pair["chosen"], pair["rejected"]):
            conversations.append({"messages": [{"role": "user", "content": pair["prompt"]},
                                               {"role": "assistant", "content": completion}]})
    write_text_atomic(path, "".join(json.dumps(c) + "\n" for c in conversations))


@torch.no_grad()
def rule_logps(model: Any, tok: Any, test: list[dict], reference: Any = None) -> dict[str, Any]:
    """Per held-out pair: the summed completion log-probabilities of chosen and rejected under ``model`` (and the
    implicit-reward comparison against ``reference``); per rule: their means."""
    from lmstack.data.preference import PreferenceLoader, record_pair, render_pair
    from lmstack.train.preference_losses import completion_logps

    pairs = [render_pair(tok, *record_pair(p)) for p in test]
    chosen, rejected, implicit = [], [], []
    for batch in PreferenceLoader(pairs, 32, pad_id=tok.pad_id, shuffle=False):
        logps = completion_logps(model, batch)
        half = logps.shape[0] // 2
        chosen += logps[:half].tolist()
        rejected += logps[half:].tolist()
        if reference is not None:
            ratios = logps - completion_logps(reference, batch)
            implicit += (ratios[:half] > ratios[half:]).tolist()
    per_rule = {rule: {"chosen": statistics.fmean(c for c, p in zip(chosen, test) if p["rule"] == rule),
                       "rejected": statistics.fmean(r for r, p in zip(rejected, test) if p["rule"] == rule)}
                for rule in RULES}
    return {"likelihood_accuracy": sum(c > r for c, r in zip(chosen, rejected)) / len(test),
            "implicit_accuracy": sum(implicit) / len(implicit) if implicit else None, "logps": per_rule}


@torch.no_grad()
def evaluate(model_dir: Path, test: list[dict], reference_dir: Path | None) -> dict[str, Any]:
    """Likelihood preference accuracy, implicit-reward accuracy against ``reference_dir``, per-rule log-probs,
    greedy rule-following."""
    from lmstack.checkpoint import load_checkpoint
    from lmstack.data.preference import follows_rule
    from lmstack.engine.engine import Engine
    from lmstack.engine.sampling import SamplingParams

    ckpt = load_checkpoint(model_dir)
    model, tok = ckpt.model.eval(), ckpt.tokenizer
    reference = load_checkpoint(reference_dir).model.eval() if reference_dir else None
    result = rule_logps(model, tok, test, reference)
    end_id = tok.special_tokens["<|end|>"]
    engine = Engine(model, tok, max_num_seqs=64, device="cpu")
    prompts = [tok.render_chat([{"role": "user", "content": p["prompt"]}], add_generation_prompt=True)[0] for p in test]
    outputs = engine.generate(prompts, SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=[end_id]))
    follows: dict[str, list[bool]] = {rule: [] for rule in RULES}
    for pair, out in zip(test, outputs):
        follows[pair["rule"]].append(follows_rule(pair, out.outputs[0].text))
    examples = [{"prompt": p["prompt"], "output": o.outputs[0].text} for p, o in list(zip(test, outputs))[:6]]
    # the same prompts sampled at temperature 1, SAMPLES replies each, seeded per prompt: the whole distribution,
    # which greedy decoding hides when the most likely reply already follows the rule
    sampled = engine.generate(prompts, [SamplingParams(max_tokens=40, temperature=1.0, stop_token_ids=[end_id],
                                                       n=SAMPLES, seed=1000 * i) for i in range(len(prompts))])
    follows_sampled: dict[str, list[bool]] = {rule: [] for rule in RULES}
    for pair, out in zip(test, sampled):
        follows_sampled[pair["rule"]] += [follows_rule(pair, o.text) for o in out.outputs]
    return {**result, "rule_following": {rule: sum(v) / len(v) for rule, v in follows.items()},
            "rule_following_all": sum(sum(v) for v in follows.values()) / len(test), "examples": examples,
            "sampled_rule_following": {rule: sum(v) / len(v) for rule, v in follows_sampled.items()},
            "sampled_rule_following_all": sum(sum(v) for v in follows_sampled.values()) / (SAMPLES * len(test))}


def trajectory(run: Path, test: list[dict], sft: dict) -> list[dict]:
    """Per-rule held-out log-probabilities at step 0 (the SFT model) and at every kept checkpoint of ``run``."""
    from lmstack.checkpoint import load_checkpoint, step_checkpoints

    points = [{"step": 0, "logps": sft["logps"]}]
    for path in step_checkpoints(run / "checkpoints"):
        ckpt = load_checkpoint(path)
        points.append({"step": int(path.name.split("_")[-1]),
                       "logps": rule_logps(ckpt.model.eval(), ckpt.tokenizer, test)["logps"]})
    return points


def run_concurrently(runs: list[tuple[Path, dict, list[str]]], jobs: int, threads: int) -> None:
    """Run the ``lmstack`` commands of ``runs`` (run directory, settings, arguments), ``jobs`` at a time, each with
    ``threads`` intra-op threads; a finished run gets its bench_settings.json, a failed one stops the bench."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    waiting, active = list(runs), []
    while waiting or active:
        while waiting and len(active) < jobs:
            run, settings, args = waiting.pop(0)
            print("$ lmstack " + " ".join(args), file=sys.stderr, flush=True)
            active.append((run, settings, subprocess.Popen([sys.executable, "-m", "lmstack.cli", *args], env=env)))
        time.sleep(2)
        for entry in [e for e in active if e[2].poll() is not None]:
            run, settings, process = entry
            if process.returncode != 0:
                raise SystemExit(f"lmstack dpo for {run} failed (exit {process.returncode})")
            write_json_atomic(run / "bench_settings.json", settings)
            active.remove(entry)


def variant_name(weight: float) -> str:
    return "DPO" if weight == 0 else f"DPO + NLL (sft_weight {weight:g})"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(15, 9))
    (rules_axis, accuracy_axis), (chosen_axis, rejected_axis) = axes
    sft, variants = results["sft"], results["variants"]
    colors = ["tab:blue", "tab:green", "tab:purple", "tab:red"]
    labels = [*RULES, "all", "all, sampled\n(T=1, 4 per prompt)"]
    width = 0.8 / (len(variants) + 1)

    def rule_values(e: dict) -> list[float]:
        return [e["rule_following"][r] for r in RULES] + [e["rule_following_all"], e["sampled_rule_following_all"]]

    rules_axis.bar([i - 0.4 + width / 2 for i in range(5)], rule_values(sft), width, label="SFT (before)",
                   color="tab:gray")
    for k, (name, seeds) in enumerate(variants.items()):
        xs = [i - 0.4 + width * (k + 1.5) for i in range(5)]
        per_seed = [rule_values(e) for e in seeds.values()]
        rules_axis.bar(xs, [statistics.fmean(v) for v in zip(*per_seed)], width, color=colors[k % 4],
                       label=f"{name} (mean of {len(seeds)} seeds)")
        for x, values in zip(xs, zip(*per_seed)):
            rules_axis.scatter([x] * len(values), values, color="black", s=10, zorder=3)
    rules_axis.set_xticks(range(5), labels)
    rules_axis.set_ylabel("replies that follow the rule (greedy unless marked)")
    rules_axis.set_ylim(0, 1.4)
    rules_axis.set_title(f"rule-following on {results['n_test']} held-out prompts (dots: seeds)")
    rules_axis.legend(fontsize=8, ncol=2, loc="upper center")

    names, values, bar_colors = ["SFT\nlikelihood"], [sft["likelihood_accuracy"]], ["tab:gray"]
    for k, (name, seeds) in enumerate(variants.items()):
        short = name.replace(" (sft_weight ", "\n(w=").replace("DPO + NLL", "DPO+NLL").replace(
            CONTROL, "chosen-SFT\n(control)")
        names += [f"{short}\nlikelihood", f"{short}\nimplicit"]
        values += [statistics.fmean(e["likelihood_accuracy"] for e in seeds.values()),
                   statistics.fmean(e["implicit_accuracy"] for e in seeds.values())]
        bar_colors += [colors[k % 4]] * 2
    names.append("reward\nmodel")
    values.append(results["reward_model"]["accuracy"])
    bar_colors.append("tab:orange")
    accuracy_axis.bar(range(len(values)), values, color=bar_colors)
    for i, v in enumerate(values):
        accuracy_axis.text(i, v, f"{v:.1%}", ha="center", va="bottom", fontsize=8)
    accuracy_axis.set_xticks(range(len(values)), names, fontsize=7)
    accuracy_axis.axhline(0.5, color="black", lw=0.8, ls=":")
    accuracy_axis.set_ylim(0, 1.05)
    accuracy_axis.set_title("held-out preference accuracy (dotted: chance)")

    styles = {"arithmetic": "-", "concise": "--", "refusal": ":"}
    for axis, side in ((chosen_axis, "chosen"), (rejected_axis, "rejected")):
        for k, (name, runs) in enumerate(results["trajectories"].items()):
            for seed, points in runs.items():
                for rule in RULES:
                    axis.plot([p["step"] for p in points], [p["logps"][rule][side] for p in points], styles[rule],
                              color=colors[k % 4], marker="o", ms=3,
                              label=f"{name}, {rule}" if seed == next(iter(runs)) else None)
        axis.set_xlabel("DPO step (0: the SFT model)")
        axis.set_ylabel(f"mean summed log-prob of the {side} completion")
        axis.set_title(f"{side} completions of the held-out pairs, per rule (one line per seed)")
        axis.grid(alpha=0.3)
        if side == "rejected":
            axis.set_yscale("symlog", linthresh=10)
    chosen_axis.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def markdown(results: dict) -> str:
    sft = results["sft"]
    lines = [f"Command: `{results['command']}` ({results['wall_minutes']:.1f} min, {results['cpu_count']} CPUs)", "",
             "| model | likelihood pref. acc. | implicit-reward acc. | " + " | ".join(RULES) + " | all rules | "
             + " | ".join(f"log p chosen / rejected, {r}" for r in RULES) + " |",
             "|---|---|---|" + "---|" * (2 * len(RULES) + 1)]

    def row(name: str, e: dict) -> str:
        implicit = "-" if e["implicit_accuracy"] is None else f"{e['implicit_accuracy']:.1%}"
        return (f"| {name} | {e['likelihood_accuracy']:.1%} | {implicit} | "
                + " | ".join(f"{e['rule_following'][r]:.0%}" for r in RULES) + f" | {e['rule_following_all']:.1%} | "
                + " | ".join(f"{e['logps'][r]['chosen']:.1f} / {e['logps'][r]['rejected']:.1f}" for r in RULES)
                + " |")

    lines.append(row("SFT (before)", sft))
    for name, seeds in results["variants"].items():
        for seed, e in seeds.items():
            lines.append(row(f"{name}, seed {seed}", e))
    lines += ["", f"Sampled replies (temperature 1, {SAMPLES} per prompt, seeded), share that follow the rule:", "",
              "| model | " + " | ".join(RULES) + " | all rules |", "|---|" + "---|" * (len(RULES) + 1)]
    for name, e in [("SFT (before)", sft)] + [(f"{name}, seed {seed}", e) for name, seeds in
                                               results["variants"].items() for seed, e in seeds.items()]:
        lines.append(f"| {name} | " + " | ".join(f"{e['sampled_rule_following'][r]:.0%}" for r in RULES)
                     + f" | {e['sampled_rule_following_all']:.1%} |")
    lines += ["", "| model | greedy, all rules: mean over seeds (seeds) | sampled, all rules: mean (seeds) |",
              "|---|---|---|", (f"| SFT (before) | {sft['rule_following_all']:.1%} | "
                                f"{sft['sampled_rule_following_all']:.1%} |")]
    for name, seeds in results["variants"].items():
        cells = []
        for key in ("rule_following_all", "sampled_rule_following_all"):
            values = [e[key] for e in seeds.values()]
            cells.append(f"{statistics.fmean(values):.1%} ({', '.join(f'{v:.1%}' for v in values)})")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    rm = results["reward_model"]
    lines += ["", (f"Reward model (`lmstack reward`, {rm['steps']} steps, seed {rm['seed']}): held-out pair "
                   f"accuracy {rm['accuracy']:.1%} on {results['n_test']} pairs.")]
    return "\n".join(lines) + "\n"


def replot(out: Path) -> None:
    """Redraw OUT/dpo_effects.png and reprint the table from OUT/results.json."""
    results = json.loads((out / "results.json").read_text())
    plot(results, out / "dpo_effects.png")
    print(markdown(results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/dpo", help="results directory (default: %(default)s)")
    ap.add_argument("--work", default="runs/bench_dpo", help="runs and data (default: %(default)s)")
    ap.add_argument("--base-work", default="runs/bench_sft", help="bench_sft's work directory, for the base model "
                                                                  "(default: %(default)s)")
    ap.add_argument("--seeds", default="0,1", help="comma-separated DPO seeds (default: %(default)s)")
    ap.add_argument("--sft-weights", default="0,1", help="comma-separated dpo.sft_weight values, one set of runs "
                                                         "each; 0 is plain DPO (default: %(default)s)")
    ap.add_argument("--sft-steps", type=int, default=200, help="SFT steps (default: %(default)s)")
    ap.add_argument("--dpo-steps", type=int, default=120, help="DPO steps per seed (default: %(default)s)")
    ap.add_argument("--reward-steps", type=int, default=120, help="reward-model steps (default: %(default)s)")
    ap.add_argument("--n-train", type=int, default=2000, help="training pairs (default: %(default)s)")
    ap.add_argument("--n-test", type=int, default=200, help="held-out pairs (default: %(default)s)")
    ap.add_argument("--beta", type=float, default=0.1, help="dpo.beta (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=1e-4, help="DPO learning rate (default: %(default)s)")
    ap.add_argument("--reward-lr", type=float, default=5e-4, help="reward-model learning rate (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads per process (default: %(default)s)")
    ap.add_argument("--jobs", type=int, default=1, help="DPO runs trained at once (default: %(default)s)")
    ap.add_argument("--no-control", dest="control", action="store_false",
                    help="skip the control: SFT on the chosen completions alone, per seed (default: run it)")
    ap.add_argument("--replot", action="store_true", help="only redraw the plot from OUT/results.json")
    a = ap.parse_args()
    if a.replot:
        return replot(Path(a.out))
    torch.set_num_threads(a.threads)
    from lmstack.data.preference import make_preference_pairs, write_pairs
    from lmstack.train.loop import read_metrics

    t0 = time.time()
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    base_settings = SimpleNamespace(pretrain_steps=1000, classics_bytes=1_500_000, task_docs=1500, vocab_size=1024,
                                    threads=a.threads)  # bench_sft's defaults
    base = build_base(Path(a.base_work), base_settings)
    common = ["train.seq_len=128", "train.tensorboard=false", "train.max_minutes=0", "train.eval_batches=4",
              "optim.schedule=cosine"]
    if not _reusable(work / "sft", {"base": str(base), "sft_steps": a.sft_steps}):
        sft_data(work / "sft.jsonl", 1500, 600)
        lmstack("sft", "--model", str(base), "--data", str(work / "sft.jsonl"), "--out", str(work / "sft"),
                "--overwrite", f"train.max_steps={a.sft_steps}", "train.batch_size=32", "optim.lr=1e-3",
                f"optim.warmup_steps={a.sft_steps // 10}", f"train.eval_every={a.sft_steps}",
                f"train.ckpt_every={a.sft_steps}", *common, threads=a.threads)
        write_json_atomic(work / "sft" / "bench_settings.json", {"base": str(base), "sft_steps": a.sft_steps})
    sft_model = work / "sft" / "model"
    write_pairs(work / "pairs_train.jsonl", a.n_train, seed=0)
    test = make_preference_pairs(a.n_test, seed=1)
    results: dict[str, Any] = {"command": "python bench/bench_dpo.py " + " ".join(sys.argv[1:]),
                               "cpu_count": os.cpu_count(), "settings": vars(a), "n_test": a.n_test}
    print("evaluating the SFT model", file=sys.stderr, flush=True)
    results["sft"] = evaluate(sft_model, test, None)
    results["variants"], results["trajectories"], results["dpo_curves"] = {}, {}, {}
    planned, pending = [], []
    for weight in [float(w) for w in a.sft_weights.split(",") if w.strip()]:
        for seed in seeds:
            run = work / (f"dpo-seed{seed}" if weight == 0 else f"dpo-nll{weight:g}-seed{seed}")
            settings = {"sft_steps": a.sft_steps, "dpo_steps": a.dpo_steps, "lr": a.lr, "beta": a.beta,
                        "n_train": a.n_train, "sft_weight": weight, "seed": seed}
            planned.append((variant_name(weight), seed, run))
            if not _reusable(run, settings):
                pending.append((run, settings, [
                    "dpo", "--model", str(sft_model), "--data", str(work / "pairs_train.jsonl"), "--out", str(run),
                    "--overwrite", f"train.max_steps={a.dpo_steps}", "train.batch_size=16", f"optim.lr={a.lr}",
                    f"optim.warmup_steps={a.dpo_steps // 10}", f"train.eval_every={a.dpo_steps // 4}",
                    f"train.ckpt_every={a.dpo_steps // 4}", "train.keep_last=4", "train.log_every=10",
                    f"train.seed={seed}", f"dpo.beta={a.beta}", f"dpo.sft_weight={weight}", *common]))
    if a.control:  # the chosen-NLL term alone: SFT on the chosen completions, same steps, batch, lr and schedule
        chosen_only = work / "chosen_sft.jsonl"
        write_text_atomic(chosen_only, "".join(json.dumps({"messages": [
            {"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}]}) + "\n"
            for p in make_preference_pairs(a.n_train, seed=0)))
        for seed in seeds:
            run = work / f"chosen-sft-seed{seed}"
            settings = {"sft_steps": a.sft_steps, "dpo_steps": a.dpo_steps, "lr": a.lr, "n_train": a.n_train,
                        "seed": seed}
            planned.append((CONTROL, seed, run))
            if not _reusable(run, settings):
                pending.append((run, settings, [
                    "sft", "--model", str(sft_model), "--data", str(chosen_only), "--out", str(run), "--overwrite",
                    f"train.max_steps={a.dpo_steps}", "train.batch_size=16", f"optim.lr={a.lr}",
                    f"optim.warmup_steps={a.dpo_steps // 10}", f"train.eval_every={a.dpo_steps // 4}",
                    f"train.ckpt_every={a.dpo_steps // 4}", "train.keep_last=4", "train.log_every=10",
                    f"train.seed={seed}", *common]))
    run_concurrently(pending, a.jobs, a.threads)
    for name, seed, run in planned:
        results["variants"].setdefault(name, {})[str(seed)] = evaluate(run / "model", test, sft_model)
        results["trajectories"].setdefault(name, {})[str(seed)] = trajectory(run, test, results["sft"])
        results["dpo_curves"].setdefault(name, {})[str(seed)] = [r for r in read_metrics(run / "metrics.jsonl")
                                                                 if "reward_accuracy" in r and "val_loss" not in r]
        print(f"{name} seed {seed}: {results['variants'][name][str(seed)]['rule_following']}", file=sys.stderr,
              flush=True)
    rm_settings = {"sft_steps": a.sft_steps, "reward_steps": a.reward_steps, "lr": a.reward_lr, "seed": seeds[0],
                   "n_train": a.n_train}
    if not _reusable(work / "rm", rm_settings):
        lmstack("reward", "--model", str(sft_model), "--data", str(work / "pairs_train.jsonl"), "--out",
                str(work / "rm"), "--overwrite", f"train.max_steps={a.reward_steps}", "train.batch_size=16",
                f"optim.lr={a.reward_lr}", f"optim.warmup_steps={a.reward_steps // 10}",
                f"train.eval_every={a.reward_steps}", f"train.ckpt_every={a.reward_steps}",
                f"train.seed={seeds[0]}", *common, threads=a.threads)
        write_json_atomic(work / "rm" / "bench_settings.json", rm_settings)
    from lmstack.checkpoint import load_checkpoint
    from lmstack.data.preference import record_pair, render_pair
    from lmstack.stages.reward import pair_accuracy

    rm = load_checkpoint(work / "rm" / "model")
    held_out = [render_pair(rm.tokenizer, *record_pair(p)) for p in test]
    results["reward_model"] = {"accuracy": pair_accuracy(rm.model, held_out, rm.tokenizer.pad_id, 32),
                               "steps": a.reward_steps, "seed": seeds[0]}
    results["wall_minutes"] = (time.time() - t0) / 60
    write_json_atomic(out / "results.json", results, indent=1)
    plot(results, out / "dpo_effects.png")
    print(markdown(results))
    print(f"bench wall time {results['wall_minutes']:.1f} min; plot {out / 'dpo_effects.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
