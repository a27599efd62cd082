"""The report card of a run: ``lmstack report RUN_DIR`` writes RUN_DIR/report.md with PNG plots.

It collects whatever the run left behind (every source is optional, missing ones are skipped):

* training curves from ``metrics.jsonl`` (RUN_DIR/ or RUN_DIR/train/ or any direct subfolder): train loss and
  validation loss, validation bits per byte, learning rate, throughput -> ``report_training.png``;
* the run summary from ``report.json`` (speedrun) and ``summary.json`` (pretrain);
* evaluation results: every ``*.json`` written by ``lmstack eval --out`` in RUN_DIR, RUN_DIR/evals/ or
  RUN_DIR/eval/ -> a table per file, the CORE aggregate, a bar chart ``report_evals.png`` and a few
  per-item samples (prompt end, prediction, right answer), and for code tasks the sandbox isolation mode
  their programs ran in;
* generated samples from report.json's ``samples`` and any ``samples*.txt`` / ``samples*.jsonl``.

``build_report(run_dir) -> Path`` is what ``lmstack speedrun`` calls at its end. The file is written
atomically; plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lmstack.atomic import write_atomic, write_text_atomic
from lmstack.errors import UserError
from lmstack.evals.sandbox import describe_isolation

_EVAL_DIRS = ("", "evals", "eval")


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash mid-write
    return rows


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def find_metrics(run_dir: Path) -> Path | None:
    for candidate in [run_dir / "metrics.jsonl", run_dir / "train" / "metrics.jsonl",
                      *sorted(run_dir.glob("*/metrics.jsonl"))]:
        if candidate.is_file():
            return candidate
    return None


def find_eval_results(run_dir: Path) -> list[tuple[Path, dict]]:
    found = []
    for sub in _EVAL_DIRS:
        folder = run_dir / sub if sub else run_dir
        for path in sorted(folder.glob("*.json")):
            data = _read_json(path)
            if isinstance(data, dict) and isinstance(data.get("results"), dict) and "config" in data:
                found.append((path, data))
    return found


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot_evals(evals: list[tuple[Path, dict]], out_png: Path) -> bool:
    """Bar chart of each task's primary metric (latest eval file wins per task) with its random baseline."""
    rows: dict[str, tuple[float, float | None, str]] = {}
    for _, data in evals:
        primaries = data.get("primary_metrics", {})
        for task, metrics in data["results"].items():
            metric = primaries.get(task) or next((k for k in ("acc_norm", "acc", "exact_match", "pass@1",
                                                              "bits_per_byte") if k in metrics), None)
            if metric and _finite(metrics.get(metric)):
                rows[task] = (float(metrics[metric]), metrics.get("baseline"), metric)
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names) + 2), 4))
    ax.bar(range(len(names)), [rows[n][0] for n in names], color="#4c72b0", label="score")
    for i, n in enumerate(names):
        base = rows[n][1]
        if _finite(base):
            ax.hlines(base, i - 0.4, i + 0.4, colors="#c44e52", linestyles="--",
                      label="random baseline" if i == 0 else None)
        ax.text(i, rows[n][0], f"{rows[n][0]:.3f}", ha="center", va="bottom", fontsize=8)
    top = max([rows[n][0] for n in names] + [float(rows[n][1]) for n in names if _finite(rows[n][1])])
    ax.set_ylim(0, max(top, 1e-9) * 1.35)  # headroom: the value labels stay clear of the legend
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"{n}\n({rows[n][2]})" for n in names], fontsize=8)
    ax.set_title("evaluation (primary metric per task)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    write_atomic(out_png, lambda tmp: fig.savefig(tmp, dpi=110), suffix=".png")
    plt.close(fig)
    return True


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if 1e4 <= abs(v) < 1e12:
            return f"{v:,.0f}"  # throughput, token counts: 15,830 reads better than 1.583e+04
        return f"{v:,.4g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


def _summary_lines(report: dict | None, summary: dict | None) -> list[str]:
    facts: list[tuple[str, Any]] = []
    src = {**(summary or {}), **(report or {})}
    for key, label in [("preset", "preset"), ("params", "parameters"), ("vocab_size", "vocabulary"),
                       ("steps", "steps"), ("tokens", "tokens seen"), ("tokens_per_second", "tokens / s"),
                       ("wall_seconds", "wall seconds"), ("final_train_loss", "final train loss"),
                       ("val_loss", "validation loss"), ("final_val_loss", "validation loss"),
                       ("val_bpb", "validation bits / byte"), ("final_val_bpb", "validation bits / byte"),
                       ("unigram_bpb", "unigram baseline bits / byte"), ("documents_kept", "documents kept")]:
        if key in src and src[key] is not None and label not in [f[0] for f in facts]:
            facts.append((label, src[key]))
    if not facts:
        return []
    lines = ["## Summary", "", "| | |", "|---|---|"]
    lines += [f"| {label} | {_fmt(value)} |" for label, value in facts]
    timings = src.get("timings")
    if isinstance(timings, dict) and timings:
        lines.append(f"| stage seconds | {', '.join(f'{k} {v:.0f}' for k, v in timings.items())} |")
    return lines + [""]


def _eval_lines(path: Path, data: dict, run_dir: Path, samples_per_task: int = 2) -> list[str]:
    cfg = data.get("config", {})
    lines = [f"### {path.relative_to(run_dir)}", "",
             f"model `{data.get('model', '?')}`, limit {cfg.get('limit')}, few-shot {cfg.get('num_fewshot')}, "
             f"seed {cfg.get('seed')}, backend {cfg.get('backend')}", "",
             "| task | metric | value | n | shots | random baseline |", "|---|---|---|---|---|---|"]
    for task, metrics in data["results"].items():
        first = True
        for metric, value in metrics.items():
            if metric in ("n", "num_fewshot", "baseline", "tokens", "bytes", "truncated") or not _finite(value):
                continue
            lines.append(f"| {task if first else ''} | {metric} | {_fmt(float(value))} | "
                         f"{metrics.get('n', '') if first else ''} | {metrics.get('num_fewshot', '') if first else ''}"
                         f" | {_fmt(metrics.get('baseline')) if first and 'baseline' in metrics else ''} |")
            first = False
    cut = {t: m["truncated"] for t, m in data["results"].items() if _finite(m.get("truncated")) and m["truncated"]}
    if cut:
        lines += ["", f"Requests longer than the model's {cfg.get('max_length')}-token context (their start was cut): "
                      + ", ".join(f"{t} {n}" for t, n in cut.items())]
    for task, mode in (data.get("sandbox") or {}).items():
        lines += ["", f"Sandbox: `{task}` programs ran in **{mode}** isolation ({describe_isolation(str(mode))})."]
    core = data.get("core") or {}
    if "core" in core:
        lines += ["", f"**CORE-style centered accuracy: {core['core']:.4f}** (0 = chance, 1 = perfect; "
                      f"mean over {len(core) - 1} tasks)"]
    records = data.get("records") or {}
    shown = []
    for task, items in records.items():
        for item in items[:samples_per_task]:
            prompt = str(item.get("prompt", ""))[-300:].replace("```", "'''")
            if "response" in item:
                answer = f"generated: {str(item.get('response'))[:300]!r}; reference: {item.get('answers', [''])[:1]}"
            elif item.get("choices"):
                pred = item.get("pred", item.get("pred_norm"))
                choices = item["choices"]
                answer = (f"predicted: {choices[pred] if isinstance(pred, int) and pred < len(choices) else pred!r}; "
                          f"gold: {choices[item['gold']] if isinstance(item.get('gold'), int) and item['gold'] < len(choices) else item.get('gold')!r}")
            else:
                continue
            shown += [f"**{task}** `{item.get('id')}`", "", "```", "…" + prompt, "```", answer.replace("|", "\\|"), ""]
    if shown:
        lines += ["", "#### Sample items", ""] + shown
    return lines + [""]


def _sample_lines(run_dir: Path, report: dict | None) -> list[str]:
    lines: list[str] = []
    for s in (report or {}).get("samples") or []:
        if isinstance(s, dict):
            prompt = s.get("prompt") or ""
            lines += [f"**prompt:** `{prompt or '(start of document)'}`", "", "```",
                      (prompt + str(s.get("completion", ""))).replace("```", "'''"), "```", ""]
    for path in sorted(run_dir.glob("samples*.txt")) + sorted(run_dir.glob("samples*.jsonl")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".jsonl":
            text = "\n\n".join(str(r.get("text", r.get("completion", r))) for r in _read_jsonl(path))
        lines += [f"`{path.name}`", "", "```", text[:3000].replace("```", "'''"), "```", ""]
    return (["## Samples", ""] + lines) if lines else []


def build_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report.md (+ report_training.png, report_evals.png) and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; give the directory a speedrun, pretrain or eval "
                        "run wrote")
    report = _read_json(run_dir / "report.json")
    summary = _read_json(run_dir / "summary.json") or _read_json(run_dir / "train" / "summary.json")
    metrics_path = find_metrics(run_dir)
    evals = find_eval_results(run_dir)

    lines = [f"# Report card: {run_dir.resolve().name}", ""]
    lines += _summary_lines(report if isinstance(report, dict) else None, summary if isinstance(summary, dict) else None)
    if metrics_path is not None:
        records = _read_jsonl(metrics_path)
        from lmstack.plots import plot_training_curves

        if plot_training_curves(records, run_dir / "report_training.png"):
            lines += ["## Training", "", f"From `{metrics_path.relative_to(run_dir)}` ({len(records)} records).", "",
                      "![training curves](report_training.png)", ""]
        vals = [r for r in records if _finite(r.get("val_loss"))]
        if vals:
            lines += ["| step | val loss | val bits/byte |", "|---|---|---|"]
            stride = max(1, len(vals) // 12)
            for r in vals[::stride] + ([vals[-1]] if (len(vals) - 1) % stride else []):
                lines.append(f"| {r['step']} | {r['val_loss']:.4f} | {_fmt(r.get('val_bpb'))} |")
            lines.append("")
        events = [r for r in records if r.get("event")]
        if events:
            described = ", ".join(f"{e['event']} at step {e.get('step')}" for e in events)
            lines += [f"Events: {described}", ""]
    if evals:
        lines += ["## Evaluation", ""]
        if plot_evals(evals, run_dir / "report_evals.png"):
            lines += ["![evaluation](report_evals.png)", ""]
        for path, data in evals:
            lines += _eval_lines(path, data, run_dir)
    lines += _sample_lines(run_dir, report if isinstance(report, dict) else None)
    if len(lines) <= 2:
        lines += ["Nothing to report yet: no metrics.jsonl, report.json, summary.json or evaluation JSON found.", ""]

    return write_text_atomic(run_dir / "report.md", "\n".join(lines))
