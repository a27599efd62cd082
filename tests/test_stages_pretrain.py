"""`lmstack pretrain` end to end through the real CLI: shards on disk, a killed run resumed bit for
bit, DDP with two processes under torchrun (gloo), and the crashes a run directory must survive: a kill
during the first checkpoint write, a damaged newest checkpoint, a second run into the same directory,
and a directory of someone else's files."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmstack.data.shards import tokenize_to_shards
from lmstack.tokenizer import Tokenizer

SMALL = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.n_kv_head=2", "model.block_size=64",
         "train.batch_size=4", "train.seq_len=32", "train.eval_batches=2", "train.log_every=5",
         "optim.warmup_steps=5", "train.tensorboard=false", "train.device=cpu"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrain")
    import sysconfig

    # real text: a few modules of the Python standard library, split into documents
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / n).read_text() for n in ("textwrap.py", "shlex.py", "fnmatch.py", "glob.py")]
    docs = [chunk for t in texts for chunk in t.split("\n\n") if chunk.strip()]
    jsonl = root / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = Tokenizer.train(docs, vocab_size=512)
    tokenize_to_shards([jsonl], tok, root / "data", workers=0, val_fraction=0.05, progress=False)
    return root / "data"


def _cmd(data, out, *extra):
    return [sys.executable, "-m", "lmstack.cli", "pretrain", "--data", str(data), "--out", str(out), *SMALL, *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_pretrain_cli_kill_and_resume_is_bit_identical(shards, tmp_path):
    # log lines every 8 steps: the one at step 24 averages steps 17-24, across the checkpoint at 20
    steps = ["train.max_steps=40", "train.ckpt_every=10", "train.eval_every=20", "train.log_every=8"]
    full = subprocess.run(_cmd(shards, tmp_path / "full", *steps), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert full.returncode == 0, full.stderr
    # same run, killed with SIGKILL once its second checkpoint exists
    proc = subprocess.Popen(_cmd(shards, tmp_path / "killed", *steps), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (ckpts / "step_0000020" / "model.safetensors").exists():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "model").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(_cmd(shards, tmp_path / "killed", "--resume", *steps), env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)

    def logged(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows if "loss" in r or "val_loss" in r]

    assert logged(tmp_path / "killed") == logged(tmp_path / "full")  # the same averages, also across the resume


def test_torchrun_ddp_two_processes(shards, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = torchrun + ["-m", "lmstack.cli"] + _cmd(shards, tmp_path / "ddp", "train.max_steps=10",
                                                 "train.eval_every=10")[3:]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 10
    # two ranks x batch 4 x seq 32 tokens per step
    assert max(r["tokens"] for r in rows if "tokens" in r) == 10 * 2 * 4 * 32
    assert (tmp_path / "ddp" / "model" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- crashes and damaged checkpoints

# Runs the real CLI, but the process SIGKILLs itself right after writing the tokenizer into the staging
# directory of its first checkpoint: a kill in the middle of that write, at a moment chosen exactly.
DIE_DURING_FIRST_CHECKPOINT = """
import os, signal, sys
from lmstack.tokenizer import Tokenizer

save = Tokenizer.save

def save_then_die(self, directory):
    written = save(self, directory)
    if "checkpoints/.step_" in str(directory):
        os.kill(os.getpid(), signal.SIGKILL)
    return written

Tokenizer.save = save_then_die
from lmstack.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _weights(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


def test_a_kill_during_the_first_checkpoint_write_does_not_block_resume(shards, tmp_path):
    steps = ["train.max_steps=20", "train.ckpt_every=10", "train.eval_every=20"]
    driver = tmp_path / "die.py"
    driver.write_text(DIE_DURING_FIRST_CHECKPOINT)
    run = tmp_path / "run"
    killed = subprocess.run([sys.executable, str(driver), *_cmd(shards, run, *steps)[3:]], env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    leftovers = [p.name for p in (run / "checkpoints").iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".step_0000010.tmp-")  # a staging dir, no checkpoint

    resumed = subprocess.run(_cmd(shards, run, "--resume", *steps), env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "starting from scratch" in resumed.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000010", "step_0000020"]
    full = subprocess.run(_cmd(shards, tmp_path / "full", *steps), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert full.returncode == 0, full.stderr
    a, b = _weights(tmp_path / "full"), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _truncate_weights(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty_state(ckpt):
    (ckpt / "trainer_state" / "state.json").write_text("")


@pytest.mark.parametrize("damage", [_truncate_weights, _empty_state])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(shards, tmp_path, damage):
    """The newest checkpoint was damaged after it was written (a disk that filled up, a copy cut short):
    resume says so, continues from the one before, and still ends bit for bit where the first run ended."""
    steps = ["train.max_steps=30", "train.ckpt_every=10", "train.eval_every=30"]
    run = tmp_path / "run"
    first = subprocess.run(_cmd(shards, run, *steps), env=_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    finished = _weights(run)
    damage(run / "checkpoints" / "step_0000030")
    resumed = subprocess.run(_cmd(shards, run, "--resume", *steps), env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "step_0000030" in resumed.stderr and "falling back" in resumed.stderr
    assert f"resumed from {run / 'checkpoints' / 'step_0000020'}" in resumed.stderr
    # the damaged one is set aside (not pruned as "the newest" ahead of the good ones this run writes)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["damaged-step_0000030", "step_0000020",
                                                                       "step_0000030"]
    again = _weights(run)
    assert all(torch.equal(finished[k], again[k]) for k in finished)


def test_a_second_run_into_the_same_directory_is_refused_unless_resume_or_overwrite(shards, tmp_path, capsys):
    from lmstack.cli import main
    from lmstack.stages.pretrain import pretrain

    run = tmp_path / "run"
    pretrain(shards, run, overrides=SMALL + ["train.max_steps=10", "train.ckpt_every=5"], progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    assert main(["pretrain", "--data", str(shards), "--out", str(run), *SMALL, "train.max_steps=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--resume" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == before  # nothing touched

    summary = pretrain(shards, run, overrides=SMALL + ["train.max_steps=4", "train.ckpt_every=5"], progress=False,
                       overwrite=True)
    assert summary["steps"] == 4
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000004"]  # the old run's are gone
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 4


def test_a_directory_of_someone_elses_files_is_never_cleared(shards, tmp_path, capsys):
    from lmstack.cli import main

    out = tmp_path / "mine"
    (out / "model").mkdir(parents=True)
    (out / "model" / "notes.txt").write_text("my notes")
    (out / "metrics.jsonl").write_text("my own metrics\n")
    for extra in ([], ["--resume"]):
        assert main(["pretrain", "--data", str(shards), "--out", str(out), *extra, *SMALL, "train.max_steps=2"]) == 2
        assert "not from an lmstack training run" in capsys.readouterr().err
    assert (out / "model" / "notes.txt").read_text() == "my notes"
    assert (out / "metrics.jsonl").read_text() == "my own metrics\n"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "model"]
