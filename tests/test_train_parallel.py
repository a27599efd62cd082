"""Every parallel layout follows the one-process run: DDP, FSDP2 (+ activation checkpointing, + async DCP
saves), TP with and without sequence parallelism, PP GPipe / 1F1B / interleaved 1F1B, and on four
processes FSDP2 x TP and PP x FSDP2; DCP checkpoints resume exactly in the same layout and reshard into
others (one process, TP); bad layouts are one line before any process works.

All on CPU with gloo under torchrun (tests/parallel_helpers.py): the same tiny model from the same seed,
fp32, 4 steps. The one-process reference trains on the global batch (batch x data-parallel replicas),
so the losses, gradient norms (both logged every step) and final consolidated weights must agree to
1e-5 (the last is the gradients' integral: a wrong gradient anywhere moves it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from parallel_helpers import reference_run, run_plans, step_rows, tiny_config
from test_stages_pretrain import shards  # noqa: F401  (the tokenized-shards fixture)

from lmstack.config import apply_overrides
from lmstack.errors import ConfigError
from lmstack.train.parallel import resolve_layout

TOL = 1e-5
TWO_PROCESS_PLANS = {  # name: (overrides, data-parallel replicas)
    "ddp": ("", 2),
    "fsdp": ("parallel.dp_shard=2", 2),
    "fsdp_ac_full": ("parallel.dp_shard=2,train.activation_checkpointing=full", 2),
    "fsdp_async": ("parallel.dp_shard=2,parallel.async_checkpoint=true", 2),
    "tp_sp": ("parallel.tp=2", 1),
    "tp_ac_selective": ("parallel.tp=2,parallel.sequence_parallel=false,train.activation_checkpointing=selective", 1),
    "pp_gpipe": ("parallel.pp=2,parallel.pp_schedule=gpipe", 1),
    "pp_1f1b_ac": ("parallel.pp=2,parallel.pp_microbatches=4,train.activation_checkpointing=full", 1),
    "pp_interleaved": ("parallel.pp=2,parallel.pp_schedule=interleaved_1f1b", 1),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    refs = {dp: root / f"reference_dp{dp}" for dp in (1, 2)}
    for dp, path in refs.items():
        reference_run(path, dp=dp)
    run_plans([f"{name}:{spec}" for name, (spec, _) in TWO_PROCESS_PLANS.items()], root / "two", timeout=300)
    return root, refs


def assert_follows(run_dir: Path, reference: Path) -> None:
    rows, expected = step_rows(run_dir), {r["step"]: r for r in step_rows(reference)}
    assert len(rows) >= 2 and rows[-1]["step"] == 4  # a resumed run logs the steps after its checkpoint
    for row in rows:
        ref = expected[row["step"]]
        assert abs(row["loss"] - ref["loss"]) <= TOL, (row["step"], row["loss"], ref["loss"])
        assert abs(row["grad_norm"] - ref["grad_norm"]) <= TOL * max(1.0, ref["grad_norm"]), (row, ref)
    weights, ref_weights = (load_file(str(d / "model" / "model.safetensors")) for d in (run_dir, reference))
    assert set(weights) == set(ref_weights)  # one consolidated checkpoint, the same names
    for name, tensor in ref_weights.items():
        assert (weights[name] - tensor).abs().max() <= TOL, name


@pytest.mark.parametrize("plan", sorted(TWO_PROCESS_PLANS))
def test_two_process_plan_follows_one_process(runs, plan):
    root, refs = runs
    assert_follows(root / "two" / plan, refs[TWO_PROCESS_PLANS[plan][1]])


def test_sharded_checkpoints_are_dcp_and_ddp_stays_one_file(runs):
    root, _ = runs
    fsdp = root / "two" / "fsdp" / "checkpoints" / "step_0000002"
    assert (fsdp / "dcp" / ".metadata").is_file() and not (fsdp / "model.safetensors").exists()
    ddp = root / "two" / "ddp" / "checkpoints" / "step_0000002"
    assert (ddp / "model.safetensors").is_file() and not (ddp / "dcp").exists()


def test_dcp_exact_resume_and_resharding(runs, tmp_path):
    """From the FSDP run's step-2 checkpoint: FSDP again (bit-exact), TP=2 and one process (within 1e-5)."""
    root, refs = runs
    saved = root / "two" / "fsdp"
    for name in ("same_layout", "as_tp", "one_process"):
        shutil.copytree(saved / "checkpoints" / "step_0000002", tmp_path / name / "checkpoints" / "step_0000002")
    run_plans(["same_layout:parallel.dp_shard=2,resume=true", "as_tp:parallel.tp=2,train.batch_size=8,resume=true"],
              tmp_path, timeout=200)
    # exact: the resumed run's steps 3-4 and final weights are the uninterrupted run's, bit for bit
    resumed, uninterrupted = step_rows(tmp_path / "same_layout"), step_rows(saved)
    assert [(r["loss"], r["grad_norm"]) for r in resumed if r["step"] > 2] == \
        [(r["loss"], r["grad_norm"]) for r in uninterrupted if r["step"] > 2]
    a, b = (load_file(str(d / "model" / "model.safetensors")) for d in (tmp_path / "same_layout", saved))
    assert all(bool((a[k] == b[k]).all()) for k in b)
    # resharded: TP=2 over one replica with the global batch of 8, and one process, both follow the reference
    from parallel_helpers import train_once

    cfg = tiny_config()
    cfg.train.batch_size = 8
    train_once(cfg, tmp_path / "one_process", resume=True)
    for name in ("as_tp", "one_process"):
        assert_follows(tmp_path / name, refs[2])


def test_four_process_2d_meshes(tmp_path):
    """FSDP2 x TP and PP x FSDP2 on a (dp_shard=2, tp=2) and a (pp=2, dp_shard=2) mesh."""
    reference_run(tmp_path / "reference", dp=2)
    run_plans(["fsdp_tp:parallel.dp_shard=2,parallel.tp=2", "pp_fsdp:parallel.pp=2,parallel.dp_shard=2"],
              tmp_path / "four", nproc=4, timeout=300)
    for name in ("fsdp_tp", "pp_fsdp"):
        assert_follows(tmp_path / "four" / name, tmp_path / "reference")


@pytest.mark.slow
def test_four_process_hsdp_and_3d(tmp_path):
    """HSDP (replicate 2 x shard 2) and PP x TP (pp=2, tp=2)."""
    reference_run(tmp_path / "reference_dp4", dp=4)
    reference_run(tmp_path / "reference_dp1", dp=1)
    run_plans(["hsdp:parallel.dp_replicate=2,parallel.dp_shard=2", "pp_tp:parallel.pp=2,parallel.tp=2"],
              tmp_path / "four", nproc=4, timeout=400)
    assert_follows(tmp_path / "four" / "hsdp", tmp_path / "reference_dp4")
    assert_follows(tmp_path / "four" / "pp_tp", tmp_path / "reference_dp1")


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.dp_shard=2", "parallel.tp=2"], 2, "does not divide the 2 process"),
    (["parallel.dp_replicate=3"], 2, "but torchrun started 2"),
    (["parallel.tp=4"], 4, "does not divide model.n_kv_head=2"),
    (["parallel.tp=3"], 3, "does not divide model.n_head=4"),
    (["parallel.tp=2", "model.block_size=15"], 2, "which model.block_size=15 is not"),
    (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "model.n_layer=3"], 2, "needs 4 pipeline stages"),
    (["parallel.pp=2", "model.tie_embeddings=true"], 2, "tie_embeddings=false"),
    (["parallel.pp=2", "parallel.pp_microbatches=3"], 2, "does not divide train.batch_size"),
    (["model.family=bert", "parallel.tp=2"], 2, "not 'bert'"),
])
def test_bad_layouts_are_one_config_error(overrides, world, message):
    cfg = apply_overrides(tiny_config(), overrides)
    with pytest.raises(ConfigError, match=message):
        resolve_layout(cfg, world)


def test_cli_refuses_a_bad_layout_before_work(shards, tmp_path):  # noqa: F811 (the fixture)
    """One line, exit 2, nothing written: a layout that does not fit the world size is refused before the
    process group exists (WORLD_SIZE=2 as torchrun sets it; no second process is ever needed)."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "lmstack.cli", "pretrain", "--data", str(shards), "--out", str(out),
                           "parallel.tp=3"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "parallel.tp=3" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_resuming_another_models_checkpoint_is_one_checkpoint_error(runs):
    from lmstack.errors import CheckpointError
    from lmstack.train.stage import _check_same_model

    root, _ = runs
    checkpoint = root / "two" / "fsdp" / "checkpoints" / "step_0000002"
    _check_same_model(checkpoint, tiny_config())  # the same model: fine
    with pytest.raises(CheckpointError, match=r"another model: model.n_layer=4 \(now 6\)"):
        _check_same_model(checkpoint, apply_overrides(tiny_config(), ["model.n_layer=6"]))
