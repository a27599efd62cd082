"""Scaling laws: the fit recovers a known law, compute-optimal allocation is optimal, fit CLI writes its outputs."""

from __future__ import annotations

import json
import math
import random

import pytest

from lmstack.cli import main
from lmstack.evals.scaling import ScalingLaw, ScalingPoint, fit_report, fit_scaling_law

TRUE = ScalingLaw(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28)  # Chinchilla's published fit


def _points(noise: float = 0.0, seed: int = 0) -> list[ScalingPoint]:
    rng = random.Random(seed)
    return [ScalingPoint(f"n{n:g}-d{d:g}", int(n), int(d), TRUE.predict(n, d) * math.exp(rng.gauss(0, noise)))
            for n in (1e5, 3e5, 1e6, 3e6) for d in (3e6, 1e7, 3e7)]


def test_fit_recovers_a_known_law():
    law = fit_scaling_law(_points())
    assert law.alpha == pytest.approx(TRUE.alpha, rel=0.02) and law.beta == pytest.approx(TRUE.beta, rel=0.02)
    assert law.E == pytest.approx(TRUE.E, rel=0.02)
    # extrapolation 10x beyond the largest run in both N and D
    assert law.predict(3e7, 3e8) == pytest.approx(TRUE.predict(3e7, 3e8), rel=1e-3)


def test_fit_is_robust_to_noise_and_an_outlier():
    pts = _points(noise=0.003, seed=1)
    pts[4].loss *= 1.3  # one broken run: Huber keeps it from dragging the law
    law = fit_scaling_law(pts)
    assert law.predict(1e7, 1e8) == pytest.approx(TRUE.predict(1e7, 1e8), rel=0.02)


def test_compute_optimal_split_is_the_constrained_minimum():
    C = 1e18
    n, d = TRUE.compute_optimal(C)
    assert 6 * n * d == pytest.approx(C, rel=1e-9)
    best = TRUE.predict(n, d)
    for factor in (0.5, 0.8, 1.25, 2.0):  # moving along 6ND = C only makes the loss worse
        assert TRUE.predict(n * factor, d / factor) > best
    with pytest.raises(ValueError):
        ScalingLaw(E=1, A=1, alpha=0.0, B=1, beta=0.3).compute_optimal(C)


def test_fit_needs_enough_varied_runs():
    with pytest.raises(ValueError, match="at least 5"):
        fit_scaling_law(_points()[:3])
    same_size = [ScalingPoint(f"p{i}", 1000, 10 ** (6 + i), 3.0 - 0.1 * i) for i in range(6)]
    with pytest.raises(ValueError, match="vary both"):
        fit_scaling_law(same_size)


def test_fit_report_predicts_the_held_out_run_and_plots(tmp_path, capsys):
    pts = _points()
    held = ScalingPoint("big", int(1e7), int(1e8), TRUE.predict(1e7, 1e8), heldout=True)
    (tmp_path / "points.jsonl").write_text("".join(json.dumps(p.__dict__) + "\n" for p in pts + [held]))
    result = fit_report(tmp_path, flops=1e17)
    assert abs(result["heldout"][0]["relative_error"]) < 0.01
    assert result["compute_optimal"]["params"] * result["compute_optimal"]["tokens"] * 6 == pytest.approx(1e17)
    assert (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "fit.json").read_text())["law"]["alpha"] == pytest.approx(TRUE.alpha, rel=0.05)
    assert main(["scaling", "fit", str(tmp_path), "--flops", "1e17"]) == 0
    out = capsys.readouterr().out
    assert "held-out big" in out and "compute-optimal" in out
    assert main(["scaling", "fit", str(tmp_path / "nowhere")]) == 2


def test_fit_holdout_leaves_named_runs_out_and_predicts_them(tmp_path, capsys):
    pts = _points()
    biggest = max(pts, key=lambda p: (p.params, p.tokens))
    biggest.loss *= 1.5  # were it fitted, this run would bend the law; held out, it only shows up as the error
    (tmp_path / "points.jsonl").write_text("".join(json.dumps(p.__dict__) + "\n" for p in pts))
    assert main(["scaling", "fit", str(tmp_path), "--holdout", f" {biggest.name} "]) == 0  # one fit, via the CLI
    assert f"held-out {biggest.name}" in capsys.readouterr().out
    result = json.loads((tmp_path / "fit.json").read_text())
    assert [h["name"] for h in result["heldout"]] == [biggest.name]
    assert result["heldout"][0]["predicted_loss"] == pytest.approx(TRUE.predict(biggest.params, biggest.tokens),
                                                                   rel=1e-3)
    assert result["heldout"][0]["relative_error"] == pytest.approx(1 / 1.5 - 1, rel=1e-2)
    assert result["law"]["alpha"] == pytest.approx(TRUE.alpha, rel=0.05)
    assert main(["scaling", "fit", str(tmp_path), "--holdout", "no-such-run"]) == 2
    assert "no run called no-such-run" in capsys.readouterr().err
    assert main(["scaling", "fit", str(tmp_path), "--predict-params", "1e7"]) == 2


def test_default_data_builds_shards_with_a_validation_split(tmp_path):
    from lmstack.stages.scaling import default_data

    data = default_data(tmp_path, vocab_size=300, max_mb=0.2)  # the classics corpus, a 0.2 MB slice
    meta = json.loads((data / "meta.json").read_text())
    assert meta["splits"]["train"]["documents"] > 1 and meta["splits"]["val"]["tokens"] > 0
    assert meta["vocab_size"] == 300
    assert default_data(tmp_path, vocab_size=300, max_mb=0.2) == data  # cached: the second call reuses it


def test_sweep_trains_the_grid_and_continues_an_interrupted_run(tmp_path):
    """A 2x2 grid of real (tiny) pretraining runs: points.jsonl holds one line per run, with N from the model
    and D from the steps; a run directory that a killed sweep left unfinished is continued, not refused."""
    import sysconfig
    from pathlib import Path

    from lmstack.data.shards import tokenize_to_shards
    from lmstack.stages.scaling import sweep
    from lmstack.tokenizer import Tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [chunk for name in ("textwrap.py", "shlex.py") for chunk in (stdlib / name).read_text().split("\n\n")
            if chunk.strip()]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tokenize_to_shards([tmp_path / "corpus.jsonl"], Tokenizer.train(docs, vocab_size=300), tmp_path / "data",
                       workers=0, val_fraction=0.05, progress=False)
    out = tmp_path / "sweep"
    killed = out / "runs" / "L1-C32-D2048"  # what a sweep killed during this run's first write leaves
    killed.mkdir(parents=True)
    (killed / "metrics.jsonl").write_text('{"step": 5, "loss": 5.0}\n')
    (killed / ".model.tmp-x1y2").mkdir()
    points = sweep(out, tmp_path / "data", sizes=[(1, 32, 1), (2, 32, 1)], token_budgets=[2048, 4096], heldout=None,
                   seq_len=32, batch_size=4, eval_batches=2, extra_overrides=["train.device=cpu"])
    assert [p.name for p in points] == ["L1-C32-D2048", "L1-C32-D4096", "L2-C32-D2048", "L2-C32-D4096"]
    assert [p.tokens for p in points] == [16 * 128, 32 * 128, 16 * 128, 32 * 128]  # steps x batch x seq_len
    assert points[2].params > points[0].params and all(math.isfinite(p.loss) for p in points)
    assert not (killed / ".model.tmp-x1y2").exists() and (killed / "model" / "model.safetensors").is_file()
    lines = (out / "points.jsonl").read_text().splitlines()
    assert [json.loads(line)["name"] for line in lines] == [p.name for p in points]


def test_compute_optimal_far_outside_the_grid_carries_caveats():
    from lmstack.evals.scaling import extrapolation_caveats

    grid = _points()
    assert extrapolation_caveats(grid, TRUE, 1e6, 1e7) == []  # inside the fitted ranges, a real floor
    caveats = extrapolation_caveats(grid, TRUE, 1e9, 1e7)
    assert len(caveats) == 1 and "N=1e+09" in caveats[0]
    floorless = ScalingLaw(E=0.001, A=TRUE.A, alpha=TRUE.alpha, B=TRUE.B, beta=TRUE.beta)
    assert any("irreducible" in c for c in extrapolation_caveats(grid, floorless, 1e6, 1e12))
    assert len(extrapolation_caveats(grid, floorless, 1e6, 1e12)) == 2
