"""bench/bench_gpu.py --dry-run: the GPU benchmark's parts run on CPU with tiny shapes and write their results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(out: Path, parts: str) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--dry-run", "--out", str(out),
                           "--parts", parts], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().count("|") > 4
    return results


def test_gpu_bench_dry_run_train_fsdp_decode(tmp_path):
    results = _dry_run(tmp_path, "train,fsdp_1b,decode")
    for part in ("train", "fsdp_1b"):
        assert "error" not in results[part], results[part]
        assert results[part]["tokens_per_second"] > 0 and results[part]["loss"] > 0
    assert results["decode"]["batch_1"]["tokens_per_second"] > 0 and results["decode"]["batch_4"]["tokens_per_second"] > 0


@pytest.mark.slow
def test_gpu_bench_dry_run_compiled_parity(tmp_path):
    results = _dry_run(tmp_path, "parity")
    assert results["parity"]["logits_max_abs_diff"] < 1e-4
