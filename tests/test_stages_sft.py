"""`lmstack sft` (lmstack/stages/sft.py): a tiny model fine-tuned on generated task conversations lowers its
held-out loss, the output is a normal checkpoint with the tokenizer, the data counts reach summary.json,
a resumed run matches an uninterrupted one weight for weight (in process and after SIGKILL), and the CLI
answers --help and user errors in one line."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lmstack.checkpoint import load_checkpoint
from lmstack.cli import main
from lmstack.errors import ConfigError
from lmstack.stages.sft import sft
from sft_helpers import held_out_loss, make_sft_base

SMALL = ["train.batch_size=8", "train.seq_len=64", "train.eval_batches=4", "train.log_every=5",
         "train.tensorboard=false", "train.device=cpu", "optim.lr=3e-3", "optim.warmup_steps=0",
         "optim.schedule=constant", "sft.val_fraction=0.1", "train.eval_every=0"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny untrained decoder checkpoint with a chat tokenizer, and task conversations to tune it on."""
    return make_sft_base(tmp_path_factory.mktemp("sft"))


def test_sft_lowers_held_out_loss_and_writes_a_normal_checkpoint(base, tmp_path):
    out = tmp_path / "run"
    summary = sft(base / "model", [str(base / "tasks.jsonl")], out, overrides=[*SMALL, "train.max_steps=40"],
                  progress=False)
    before, after = held_out_loss(base / "model", base / "tasks.jsonl"), held_out_loss(out / "model", base / "tasks.jsonl")
    assert after < 0.7 * before, (before, after)
    assert abs(summary["final_val_loss"] - after) < 0.05 * after
    data = json.loads((out / "summary.json").read_text())["data"]
    assert (data["read"], data["used"], data["skipped"], data["val_examples"]) == (400, 400, 0, 40)
    assert data["trainable_tokens"] > 0 and data["train_examples"] == 360
    tuned = load_checkpoint(out / "model")
    assert tuned.tokenizer is not None and tuned.config["sft"]["loss_on"] == "assistant"
    assert tuned.tokenizer.render_chat([{"role": "user", "content": "hi"}])[0]  # the chat format came along


def test_resume_matches_an_uninterrupted_run(base, tmp_path, capfd):
    data = [str(base / "tasks.jsonl")]
    sft(base / "model", data, tmp_path / "full", overrides=[*SMALL, "train.max_steps=12", "train.ckpt_every=6"],
        progress=False)
    sft(base / "model", data, tmp_path / "split", overrides=[*SMALL, "train.max_steps=6", "train.ckpt_every=6"],
        progress=False)
    capfd.readouterr()
    summary = sft(base / "model", None, tmp_path / "split", overrides=["train.max_steps=12"], resume=True,
                  progress=False)
    assert "at step 6" in capfd.readouterr().err  # continued from the checkpoint, with the run's own config
    assert summary["config"]["train"]["max_steps"] == 12 and summary["config"]["sft"]["data"] == data
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sft_cli_survives_sigkill_bit_identically(base, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = [*SMALL, "train.max_steps=30", "train.ckpt_every=10"]

    def cmd(out, *extra):
        return [sys.executable, "-m", "lmstack.cli", "sft", "--model", str(base / "model"), "--data",
                str(base / "tasks.jsonl"), "--out", str(out), *extra, *steps]

    full = subprocess.run(cmd(tmp_path / "full"), env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen(cmd(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (tmp_path / "killed" / "checkpoints" / "step_0000010" / "model.safetensors").exists():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "model").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(cmd(tmp_path / "killed", "--resume"), env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_sft_keys_and_bad_values_are_config_errors(base, tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'sft.loss'"):
        sft(base / "model", [str(base / "tasks.jsonl")], tmp_path / "o", overrides=["sft.loss=all"])
    with pytest.raises(ConfigError, match="sft.loss_on='prompt': choose one of assistant, all, last_turn"):
        sft(base / "model", [str(base / "tasks.jsonl")], tmp_path / "o", overrides=["sft.loss_on=prompt"])
    with pytest.raises(ConfigError, match=r"sft.val_fraction=0.0 must be a finite number in \(0, 1\)"):
        sft(base / "model", [str(base / "tasks.jsonl")], tmp_path / "o", overrides=["sft.val_fraction=0"])
    with pytest.raises(ConfigError, match="sft.weights has 2 value"):
        sft(base / "model", [str(base / "tasks.jsonl")], tmp_path / "o", overrides=["sft.weights=1,2"])


def test_cli_help_and_one_line_errors(base, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    assert "sft.loss_on" in capsys.readouterr().out
    (tmp_path / "empty.jsonl").write_text("")
    for data, expected in ((tmp_path / "empty.jsonl", "no usable conversation"),
                           (tmp_path / "missing.jsonl", "does not exist")):
        code = main(["sft", "--model", str(base / "model"), "--data", str(data), "--out", str(tmp_path / "o"),
                     "train.device=cpu"])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and err.count("\n") == 1 and "Traceback" not in err
    code = main(["sft", "--model", str(tmp_path / "nothing"), "--data", str(base / "tasks.jsonl"),
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1


def test_skipped_records_are_counted_and_named(base, tmp_path, capfd):
    lines = (base / "tasks.jsonl").read_text().splitlines()
    lines[3] = json.dumps({"messages": [{"role": "user", "content": "no answer"}]})
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    summary = sft(base / "model", [str(tmp_path / "mixed.jsonl")], tmp_path / "run",
                  overrides=[*SMALL, "train.max_steps=2", "sft.skip_bad_records=true"], progress=False)
    assert (summary["data"]["read"], summary["data"]["used"], summary["data"]["skipped"]) == (400, 399, 1)
    assert "skipped " in capfd.readouterr().err and "mixed.jsonl:4: no token to train on" in summary["data"]["problems"][0]
