"""`lmstack pretrain` end to end through the real CLI: shards on disk, a killed run resumed bit for
bit, and DDP with two processes under torchrun (gloo)."""

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
    corpus = root / "corpus.txt"
    import json

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
    steps = ["train.max_steps=40", "train.ckpt_every=10", "train.eval_every=20"]
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


def test_torchrun_ddp_two_processes(shards, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = torchrun + ["-m", "lmstack.cli"] + _cmd(shards, tmp_path / "ddp", "train.max_steps=10",
                                                 "train.eval_every=10")[3:]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    rows = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 10
    # two ranks x batch 4 x seq 32 tokens per step
    assert max(r["tokens"] for r in rows if "tokens" in r) == 10 * 2 * 4 * 32
    assert (tmp_path / "ddp" / "model" / "model.safetensors").is_file()
