"""The post-training stages under parallel layouts: `lmstack sft` and `lmstack dpo` through the real CLI under
torchrun (gloo, CPU) with tensor parallelism (tp=2, sequence parallel) and FSDP2 (dp_shard=2) follow the
one-process loss curve, gradient norms and final weights within 1e-5 (TP in the default suite; FSDP2, and
FSDP2 x TP on four processes, marked slow: a torchrun launch each).
Stages a layout does not serve (adapters, RL, the reward head under TP) are one line before any work.

The references run in this process. Under TP every process of the group must read the same batch (the
loaders shard by data-parallel replica, not by process), so the reference is the same batch size. Under
data parallelism each replica's loss is its own batch's mean and the gradients are averaged over replicas;
with fine-tuning's varying token counts per batch that is not the mean over the global batch, but it is
exactly what one process computes with ``train.grad_accum`` = the replicas (the loaders hand replica r of
w the batch that one process draws as micro-batch r), so that is the reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from parallel_helpers import run_cli, step_rows
from safetensors.torch import load_file
from sft_helpers import make_sft_base

from lmstack.data.preference import write_pairs
from lmstack.stages.dpo import dpo
from lmstack.stages.sft import sft

TOL = 1e-5
COMMON = ["train.batch_size=4", "train.log_every=1", "train.tensorboard=false", "train.device=cpu",
          "train.dtype=fp32", "optim.lr=3e-3", "optim.warmup_steps=0", "optim.schedule=constant",
          "train.eval_every=0", "train.eval_batches=1", "train.max_steps=4", "train.ckpt_every=0"]
STAGES = {  # verb: (overrides of the stage, the data file under the base directory)
    "sft": (["train.seq_len=64", "sft.val_fraction=0.1"], "tasks.jsonl"),
    "dpo": (["train.seq_len=128", "dpo.val_fraction=0.1", "dpo.overlong=drop"], "pairs.jsonl"),
}
LAYOUTS = {"tp": (["parallel.tp=2"], 1), "fsdp": (["parallel.dp_shard=2"], 2),  # name: (overrides, replicas)
           "ddp": ([], 2)}  # torchrun's default: DDP


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny chat checkpoint (2 heads, tied embeddings), task conversations and preference pairs."""
    root = make_sft_base(tmp_path_factory.mktemp("stages"), conversations=200, block_size=128)
    write_pairs(root / "pairs.jsonl", 300, seed=0)
    return root


def stage_args(verb: str, base: Path, out: Path, *extra: str) -> list[str]:
    overrides, data = STAGES[verb]
    return [verb, "--model", str(base / "model"), "--data", str(base / data), "--out", str(out), *COMMON, *overrides,
            *extra]


def reference(verb: str, base: Path, out: Path, replicas: int) -> Path:
    """One process: the same batches, ``replicas`` micro-batches per step."""
    overrides, data = STAGES[verb]
    run = sft if verb == "sft" else dpo
    run(base / "model", [str(base / data)], out, overrides=[*COMMON, *overrides, f"train.grad_accum={replicas}"],
        progress=False)
    return out


def assert_follows(run_dir: Path, reference_dir: Path) -> None:
    rows, expected = step_rows(run_dir), {r["step"]: r for r in step_rows(reference_dir)}
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        ref = expected[row["step"]]
        assert row["tokens"] == ref["tokens"], (row, ref)  # the same batches, each counted once
        assert abs(row["loss"] - ref["loss"]) <= TOL, (row["step"], row["loss"], ref["loss"])
        assert abs(row["grad_norm"] - ref["grad_norm"]) <= TOL * max(1.0, ref["grad_norm"]), (row, ref)
    weights, ref_weights = (load_file(str(d / "model" / "model.safetensors")) for d in (run_dir, reference_dir))
    assert set(weights) == set(ref_weights)
    for name, tensor in ref_weights.items():
        assert (weights[name] - tensor).abs().max() <= TOL, name


def run_and_reference(base: Path, root: Path, verbs: tuple[str, ...], layout: str) -> None:
    """ROOT/VERB_LAYOUT under torchrun (a launch per stage) and ROOT/VERB_LAYOUT_reference in this process."""
    overrides, replicas = LAYOUTS[layout]
    run_cli([stage_args(verb, base, root / f"{verb}_{layout}", *overrides) for verb in verbs], timeout=240)
    for verb in verbs:
        reference(verb, base, root / f"{verb}_{layout}_reference", replicas)


@pytest.fixture(scope="module")
def tp_runs(base, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tp_stages")
    run_and_reference(base, root, tuple(STAGES), "tp")
    return root


@pytest.mark.parametrize("verb", sorted(STAGES))
def test_stage_under_tensor_parallel_follows_one_process(tp_runs, verb):
    """tp=2 with sequence parallelism: both processes read the same batches; dpo's padded batches include odd
    lengths, which the TP plan pads to a multiple of tp (without that the run stops at the first one)."""
    assert_follows(tp_runs / f"{verb}_tp", tp_runs / f"{verb}_tp_reference")


@pytest.mark.slow
@pytest.mark.parametrize("verb", sorted(STAGES))
def test_stage_under_fsdp2_follows_one_process(base, tmp_path, verb):
    run_and_reference(base, tmp_path, (verb,), "fsdp")
    assert_follows(tmp_path / f"{verb}_fsdp", tmp_path / f"{verb}_fsdp_reference")
    if verb == "dpo":
        assert_same_held_out_metrics(tmp_path / "dpo_fsdp", tmp_path / "dpo_fsdp_reference")


def test_dpo_under_ddp_follows_one_process(base, tmp_path):
    """DDP with dpo's shared-prompt pass (a prompt forward, then the completions' forward, then one backward)."""
    run_and_reference(base, tmp_path, ("dpo",), "ddp")
    assert_follows(tmp_path / "dpo_ddp", tmp_path / "dpo_ddp_reference")


def test_dpo_held_out_metrics_from_the_consolidated_model(tp_runs):
    """The end-of-run implicit-reward metrics need the whole model: after a sharded run they are computed
    from RUN/model, and equal the one-process run's."""
    assert_same_held_out_metrics(tp_runs / "dpo_tp", tp_runs / "dpo_tp_reference")


def assert_same_held_out_metrics(run_dir: Path, reference_dir: Path) -> None:
    held, ref = (json.loads((d / "summary.json").read_text())["heldout"] for d in (run_dir, reference_dir))
    assert held.keys() == ref.keys() and all(abs(held[k] - ref[k]) <= 1e-4 for k in ref), (held, ref)


@pytest.mark.slow
def test_sft_fsdp_x_tp_on_four_processes(base, tmp_path):
    """dp_shard=2 x tp=2: two replicas, each a TP pair reading one batch."""
    run_cli([stage_args("sft", base, tmp_path / "fsdp_tp", "parallel.dp_shard=2", "parallel.tp=2")], nproc=4,
            timeout=400)
    assert_follows(tmp_path / "fsdp_tp", reference("sft", base, tmp_path / "reference", 2))


@pytest.mark.parametrize("verb, extra, world, message", [
    ("sft", ["parallel.dp_shard=2", "--lora"], 2, "lora runs train under data parallelism only"),
    ("dpo", ["parallel.tp=3"], 3, "parallel.tp=3 does not divide model.n_head=2"),
])
def test_a_stage_the_layout_does_not_serve_is_one_line_before_work(base, tmp_path, verb, extra, world, message):
    """WORLD_SIZE as torchrun sets it: the refusal comes before the process group exists (no peer needed)."""
    env = {**os.environ, "WORLD_SIZE": str(world), "RANK": "0", "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "lmstack.cli", *stage_args(verb, base, out, *extra)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()
