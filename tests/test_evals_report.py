"""Report card: curves, eval tables and samples of a run directory end up in report.md with real PNGs."""

from __future__ import annotations

import json
import math
from pathlib import Path

from lmstack.cli import main
from lmstack.evals.report import build_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_run(run: Path) -> None:
    (run / "train").mkdir(parents=True)
    lines = []
    for step in range(10, 210, 10):
        lines.append({"step": step, "loss": 5.0 * math.exp(-step / 100) + 2, "lr": 1e-3 * min(1, step / 50),
                      "tokens": step * 4096, "tokens_per_second": 20000 + step})
        if step % 50 == 0:
            lines.append({"step": step, "val_loss": 4.0 * math.exp(-step / 100) + 2.2, "val_bpb": 1.5 - step / 1000})
    (run / "train" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 2')
    (run / "report.json").write_text(json.dumps({
        "val_bpb": 1.31, "unigram_bpb": 2.4, "params": 3_500_000, "tokens": 819200, "steps": 200,
        "wall_seconds": 321.0, "timings": {"pretrain": 300.0}, "preset": "tiny",
        "samples": [{"prompt": "To be", "completion": " or not to be, that is the question"}]}))
    (run / "evals").mkdir()
    (run / "evals" / "eval.json").write_text(json.dumps({
        "model": "runs/x/model", "config": {"limit": 2, "num_fewshot": 0, "seed": 1234, "backend": "engine",
                                            "max_length": 256},
        "results": {"arc_easy": {"acc": 0.5, "acc_norm": 0.5, "n": 2, "num_fewshot": 0, "baseline": 0.25,
                                 "truncated": 3}},
        "primary_metrics": {"arc_easy": "acc"}, "core": {"core": 0.3333, "centered/arc_easy": 0.3333},
        "sandbox": {"humaneval": "landlock"},
        "records": {"arc_easy": [{"id": "q1", "prompt": "Question: Which is a gas?\nAnswer:", "choices": [" oxygen", " iron"],
                                  "gold": 0, "pred": 1, "acc": 0.0}]}}))


def test_report_collects_curves_evals_and_samples(tmp_path):
    run = tmp_path / "run"
    _fake_run(run)
    path = build_report(run)
    text = path.read_text()
    assert path == run / "report.md"
    for needle in ["## Summary", "validation bits / byte | 1.31", "unigram baseline bits / byte | 2.4",
                   "## Training", "![training curves](report_training.png)", "## Evaluation", "| arc_easy | acc | 0.5 |",
                   "CORE-style centered accuracy: 0.3333", "predicted: ' iron'; gold: ' oxygen'", "## Samples",
                   "To be or not to be", "| parameters | 3,500,000 |",
                   "longer than the model's 256-token context (their start was cut): arc_easy 3",
                   "Sandbox: `humaneval` programs ran in **landlock** isolation (contained: Landlock"]:
        assert needle in text, needle
    assert "| truncated |" not in text  # a count shown as a note, not a metric row
    for png in ("report_training.png", "report_evals.png"):
        data = (run / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_report_cli_and_empty_run(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 0
    assert "Nothing to report yet" in (empty / "report.md").read_text()
    assert "report.md" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2
