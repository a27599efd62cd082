"""Every user mistake is one line: property-based probes of the command line with bad input.

Generated bad config values (nan, inf, negatives, huge numbers, wrong types, unknown keys) go to every
verb that takes a run or cleaning config; damaged files (a garbage meta.json, an empty data directory, a
truncated or random model.safetensors, a garbage tokenizer.json or config.json, a missing shard) go to
the verbs that read them. For each, the command must exit with status 2 and print exactly one line on
stderr, ``lmstack VERB: error: ...``, with no traceback, and leave no output directory behind.
The one exception is ``pretrain --resume`` over a damaged newest checkpoint: there the intended behaviour
is to recover, so the probes assert that it falls back to the newest intact checkpoint (or starts from
scratch when none is intact), names the damaged one, and trains to the end.

The verbs run in-process through ``lmstack.cli.main`` (capsys reads stderr), except ``serve``, which runs
as a subprocess with a timeout so that a server that wrongly starts cannot hang the test. Hypothesis is
derandomized (the same examples every run) and each property is capped at a few dozen examples, so the
file takes well under a minute on a small CPU.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmstack.checkpoint import checkpoint_problem, save_checkpoint
from lmstack.cli import main
from lmstack.config import OptimConfig, TrainConfig
from lmstack.data.shards import tokenize_to_shards
from lmstack.models import build_model
from lmstack.models.gpt import GPTConfig
from lmstack.tokenizer import Tokenizer

PROBE = settings(derandomize=True, deadline=None, max_examples=25, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TEXTS = [f"Document {i}: the quick brown fox jumps over the lazy dog, then rests {i} times." for i in range(60)]
SMALL_RUN = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.n_kv_head=2", "model.block_size=64",
             "train.batch_size=2", "train.seq_len=32", "train.max_steps=2", "train.tensorboard=false",
             "train.device=cpu"]


# ----------------------------------------------------------------------------- fixtures: tiny valid inputs

@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli_errors")


@pytest.fixture(scope="module")
def corpus(workdir: Path) -> Path:
    path = workdir / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    return path


@pytest.fixture(scope="module")
def shards(workdir: Path, corpus: Path, tokenizer: Tokenizer) -> Path:
    tokenize_to_shards([corpus], tokenizer, workdir / "shards", workers=0, val_fraction=0.1, progress=False)
    return workdir / "shards"


@pytest.fixture(scope="module")
def checkpoint(workdir: Path, tokenizer: Tokenizer) -> Path:
    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_kv_head=2,
                                  n_embd=32))
    return save_checkpoint(workdir / "checkpoint", model, {"model": vars(model.config)}, tokenizer=tokenizer)


def assert_one_line_error(code: int, err: str, command: str, *left_out: Path) -> None:
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lmstack {command}: error: "), err
    assert "Traceback" not in err
    for path in left_out:
        assert not path.exists(), f"{path} was left behind"


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


# ----------------------------------------------------------------------------- bad config values

def _numeric_fields() -> dict[str, tuple[type, float, float, bool, bool]]:
    """key -> (type, low, high, low_open, high_open): the valid range of every numeric optim/train field."""
    ranges = {
        "optim.lr": (0, math.inf, True, False), "optim.min_lr_ratio": (0, 1, False, False),
        "optim.weight_decay": (0, math.inf, False, False), "optim.beta1": (0, 1, False, True),
        "optim.beta2": (0, 1, False, True), "optim.eps": (0, math.inf, True, False),
        "optim.grad_clip": (0, math.inf, False, False), "optim.warmup_steps": (0, math.inf, False, False),
        "optim.decay_fraction": (0, 1, True, False), "train.max_minutes": (0, math.inf, False, False),
        "train.eval_every": (0, math.inf, False, False), "train.ckpt_every": (0, math.inf, False, False),
        "train.max_rollbacks": (0, math.inf, False, False), "train.spike_factor": (1, math.inf, True, False),
        "train.spike_min_gap": (0, math.inf, False, False),
        "train.seed": (0, 2**63, False, True),
    }
    for name in ("batch_size", "seq_len", "grad_accum", "max_steps", "log_every", "eval_batches", "keep_last"):
        ranges[f"train.{name}"] = (1, math.inf, False, False)
    types = {f"optim.{k}": type(v) for k, v in vars(OptimConfig()).items()}
    types |= {f"train.{k}": type(v) for k, v in vars(TrainConfig()).items()}
    return {key: (types[key], *bounds) for key, bounds in ranges.items()}


NUMERIC = _numeric_fields()


@st.composite
def bad_override(draw) -> str:
    """A KEY=VALUE the run config must refuse: out of range, not finite, wrong type or an unknown key."""
    kind = draw(st.sampled_from(["range", "nonfinite", "type", "unknown_key", "unknown_section"]))
    if kind == "unknown_key":
        section = draw(st.sampled_from(["optim", "train", "model"]))
        return f"{section}.{draw(st.from_regex(r'zz_[a-z]{1,8}', fullmatch=True))}=1"
    if kind == "unknown_section":
        return f"{draw(st.from_regex(r'zz[a-z]{1,6}', fullmatch=True))}.lr=1"
    key = draw(st.sampled_from(sorted(NUMERIC)))
    tp, low, high, low_open, high_open = NUMERIC[key]
    if kind == "nonfinite":
        return f"{key}={draw(st.sampled_from(['nan', 'inf', '-inf', 'NaN']))}"
    if kind == "type":
        garbage = draw(st.sampled_from(["abc", "1.5.2", "[1]", "{}", "0x", "one"] + (["2.5", "1e-3"] if tp is int else [])))
        return f"{key}={garbage}"
    below = draw(st.floats(min_value=-1e12, max_value=low, allow_nan=False, exclude_max=not low_open))
    if high == math.inf or draw(st.booleans()):
        value = math.floor(below) if tp is int else below
    else:
        above = draw(st.floats(min_value=high, max_value=1e30, allow_nan=False, exclude_min=not high_open))
        value = math.ceil(above) if tp is int else above
    return f"{key}={value!r}"


@PROBE
@given(override=bad_override())
def test_pretrain_refuses_bad_config_values_in_one_line(override, shards, workdir, capsys):
    out = workdir / "pretrain_out"
    code, err = run_cli(capsys, ["pretrain", "--data", str(shards), "--out", str(out), *SMALL_RUN, override])
    assert_one_line_error(code, err, "pretrain", out)
    key = override.split("=", 1)[0]
    assert key.split(".")[0] in err or "section" in err


@PROBE
@given(section=st.sampled_from(["optim", "train"]),
       value=st.one_of(st.lists(st.integers(), min_size=1, max_size=2), st.dictionaries(st.just("x"), st.integers(), min_size=1),
                       st.booleans(), st.none(), st.text(alphabet="xyz", min_size=1, max_size=4),
                       st.integers(min_value=10**30, max_value=10**40).map(lambda n: -n)))
def test_pretrain_refuses_bad_config_files_in_one_line(section, value, shards, workdir, capsys):
    name = {"optim": "lr", "train": "batch_size"}[section]
    config = workdir / "bad_config.json"
    config.write_text(json.dumps({section: {name: value}}))
    out = workdir / "pretrain_out"
    code, err = run_cli(capsys, ["pretrain", "--data", str(shards), "--out", str(out), "--config", str(config),
                                 *SMALL_RUN])
    assert_one_line_error(code, err, "pretrain", out)


@pytest.mark.parametrize("contents", ["{not json", "[1, 2]", "", "optim: [1, 2"])
def test_pretrain_refuses_unparseable_config_files(contents, shards, workdir, capsys):
    suffix = ".yaml" if contents.startswith("optim") else ".json"
    config = workdir / f"unparseable{suffix}"
    config.write_text(contents)
    out = workdir / "pretrain_out"
    code, err = run_cli(capsys, ["pretrain", "--data", str(shards), "--out", str(out), "--config", str(config)])
    assert_one_line_error(code, err, "pretrain", out)


@PROBE
@given(setting=st.sampled_from(["output.shard_docs=0", "output.shard_docs=-3", "output.shard_bytes=nan",
                                "zzsection.x=1", "output.zz_unknown=1", "output.format=xml", "output.shard_docs=abc"]))
def test_data_clean_refuses_bad_settings_in_one_line(setting, corpus, workdir, capsys):
    out = workdir / "clean_out"
    code, err = run_cli(capsys, ["data", "clean", str(corpus), "--out", str(out), "--set", setting, "--quiet"])
    assert_one_line_error(code, err, "data clean", out)


# ----------------------------------------------------------------------------- bad command-line arguments

@pytest.mark.parametrize("argv, command", [
    (["generate", "--model", "M", "--num-samples", "0"], "generate"),
    (["generate", "--model", "M", "--max-tokens", "-1"], "generate"),
    (["generate", "--model", "M", "--temperature", "nan"], "generate"),
    (["generate", "--model", "M", "--top-p", "1.5"], "generate"),
    (["generate", "--model", "M", "--device", "tpu"], "generate"),
    (["chat", "--model", "M", "--max-tokens", "0"], "chat"),
    (["serve", "--model", "M", "--port", "99999"], "serve"),
    (["serve", "--model", "M", "--port", "-1"], "serve"),
    (["serve", "--model", "M", "--max-num-seqs", "0"], "serve"),
    (["serve", "--model", "M", "--request-timeout", "inf"], "serve"),
    (["eval", "--model", "M", "--workers", "-2"], "eval"),
    (["eval", "--model", "M", "--batch-size", "0"], "eval"),
    (["speedrun", "--workers", "-1"], "speedrun"),
    (["speedrun", "--minutes", "-5"], "speedrun"),
    (["data", "tokenize", "x", "--tokenizer", "t", "--out", "o", "--val-fraction", "1.5"], "data tokenize"),
    (["data", "tokenize", "x", "--tokenizer", "t", "--out", "o", "--workers", "-1"], "data tokenize"),
    (["data", "train-classifier", "--positive", "p", "--negative", "n", "--out", "o", "--ngrams", "a,b"],
     "data train-classifier"),
    (["tokenizer", "train", "--input", "x", "--out", "o", "--vocab-size", "0"], "tokenizer train"),
    (["scaling", "sweep", "--sizes", "4x100"], "scaling sweep"),
    (["scaling", "sweep", "--tokens", "-5"], "scaling sweep"),
    (["pretrain", "--data", "d"], "pretrain"),  # a missing required option
])
def test_bad_arguments_are_one_line(argv, command, capsys):
    code, err = run_cli(capsys, argv)
    assert_one_line_error(code, err, command)


@PROBE
@given(value=st.one_of(st.integers(max_value=0), st.sampled_from(["nan", "1.5", "x", "", "1e3"])))
def test_num_samples_must_be_a_positive_integer(value, capsys):
    code, err = run_cli(capsys, ["generate", "--model", "M", "--num-samples", str(value)])
    assert_one_line_error(code, err, "generate")


# ----------------------------------------------------------------------------- damaged files

def _copy(source: Path, target: Path) -> Path:
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    return target


def _damage(checkpoint: Path, target: Path, how: str) -> Path:
    """A copy of the checkpoint with one file damaged in the way ``how`` names."""
    broken = _copy(checkpoint, target)
    if how == "truncated weights":
        data = (broken / "model.safetensors").read_bytes()
        (broken / "model.safetensors").write_bytes(data[: len(data) // 3])
    elif how == "random weights":
        (broken / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    elif how == "empty weights":
        (broken / "model.safetensors").write_bytes(b"")
    elif how == "missing weights":
        (broken / "model.safetensors").unlink()
    elif how == "garbage config":
        (broken / "config.json").write_text("{ this is not json")
    elif how == "config of the wrong shape":
        (broken / "config.json").write_text(json.dumps({"model": {"n_layer": "many"}}))
    elif how == "garbage tokenizer":
        (broken / "tokenizer.json").write_text("]]] not a tokenizer")
    elif how == "empty directory":
        shutil.rmtree(broken)
        broken.mkdir()
    return broken


DAMAGE = ["truncated weights", "random weights", "empty weights", "missing weights", "garbage config",
          "config of the wrong shape", "garbage tokenizer", "empty directory"]


@pytest.mark.parametrize("how", DAMAGE)
def test_generate_refuses_a_damaged_checkpoint(how, checkpoint, workdir, capsys):
    broken = _damage(checkpoint, workdir / "broken_generate", how)
    code, err = run_cli(capsys, ["generate", "--model", str(broken), "--prompt", "hi", "--device", "cpu",
                                 "--max-tokens", "2"])
    assert_one_line_error(code, err, "generate")


@PROBE
@given(cut=st.floats(min_value=0.0, max_value=0.99), noise=st.binary(max_size=64))
def test_generate_refuses_any_truncation_of_the_weights(cut, noise, checkpoint, workdir, capsys):
    broken = _copy(checkpoint, workdir / "truncated_generate")
    data = (checkpoint / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: int(len(data) * cut)] + noise)
    code, err = run_cli(capsys, ["generate", "--model", str(broken), "--prompt", "hi", "--device", "cpu",
                                 "--max-tokens", "2"])
    assert_one_line_error(code, err, "generate")


@pytest.mark.parametrize("how", DAMAGE)
def test_export_refuses_a_damaged_checkpoint(how, checkpoint, workdir, capsys):
    broken = _damage(checkpoint, workdir / "broken_export", how)
    out = workdir / "export_out"
    code, err = run_cli(capsys, ["export", str(broken), "--out", str(out)])
    assert_one_line_error(code, err, "export", out)


@pytest.mark.parametrize("how", DAMAGE)
def test_eval_refuses_a_damaged_checkpoint(how, checkpoint, corpus, workdir, capsys):
    broken = _damage(checkpoint, workdir / "broken_eval", how)
    out = workdir / "eval_out.json"
    code, err = run_cli(capsys, ["eval", "--model", str(broken), "--tasks", f"ppl:{corpus}", "--device", "cpu",
                                 "--limit", "2", "--out", str(out)])
    assert_one_line_error(code, err, "eval", out)


@pytest.mark.parametrize("how", ["random weights", "garbage config", "empty directory"])
def test_serve_refuses_a_damaged_checkpoint_before_binding(how, checkpoint, workdir):
    broken = _damage(checkpoint, workdir / f"broken_serve_{how.replace(' ', '_')}", how)
    result = subprocess.run([sys.executable, "-m", "lmstack.cli", "serve", "--model", str(broken), "--port", "0",
                             "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert_one_line_error(result.returncode, result.stderr, "serve")


def _hf_dir(root: Path, how: str) -> Path:
    """A directory that looks like a Hugging Face model but is damaged in the way ``how`` names."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir()
    if how == "empty directory":
        return root
    config = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 300, "max_position_embeddings": 64,
              "hidden_act": "silu", "rms_norm_eps": 1e-5}
    (root / "config.json").write_text("{ garbage" if how == "garbage config" else json.dumps(config))
    (root / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage" if how == "random weights"
                                             else b"")
    return root


@pytest.mark.parametrize("how", ["empty directory", "garbage config", "random weights", "empty weights"])
def test_import_refuses_a_damaged_hf_directory(how, workdir, capsys):
    source = _hf_dir(workdir / "hf_source", how)
    out = workdir / "import_out"
    code, err = run_cli(capsys, ["import", str(source), "--out", str(out), "--no-progress"])
    assert_one_line_error(code, err, "import", out)


@PROBE
@given(data=st.binary(max_size=256))
def test_import_refuses_a_garbage_gguf(data, workdir, capsys):
    source = workdir / "garbage.gguf"
    source.write_bytes(data)
    out = workdir / "import_gguf_out"
    code, err = run_cli(capsys, ["import", str(source), "--out", str(out), "--no-progress"])
    assert_one_line_error(code, err, "import", out)


def test_import_refuses_an_unknown_name(workdir, capsys):
    code, err = run_cli(capsys, ["import", "no-such-model-anywhere", "--out", str(workdir / "o"), "--no-progress"])
    assert_one_line_error(code, err, "import", workdir / "o")


def _damaged_shards(shards: Path, target: Path, how: str) -> Path:
    broken = _copy(shards, target)
    if how == "garbage meta.json":
        (broken / "meta.json").write_text("{ not json")
    elif how == "meta.json of the wrong shape":
        (broken / "meta.json").write_text(json.dumps({"splits": 3}))
    elif how == "empty data directory":
        shutil.rmtree(broken)
        broken.mkdir()
    elif how == "missing shard":
        next(broken.glob("train_*.bin")).unlink()
    elif how == "truncated shard":
        shard = next(broken.glob("train_*.bin"))
        shard.write_bytes(shard.read_bytes()[:3])
    elif how == "garbage tokenizer":
        (broken / "tokenizer.json").write_text("not a tokenizer")
    return broken


@pytest.mark.parametrize("how", ["garbage meta.json", "meta.json of the wrong shape", "empty data directory",
                                 "missing shard", "truncated shard", "garbage tokenizer"])
def test_pretrain_refuses_damaged_shards(how, shards, workdir, capsys):
    broken = _damaged_shards(shards, workdir / "broken_shards", how)
    out = workdir / "pretrain_out"
    code, err = run_cli(capsys, ["pretrain", "--data", str(broken), "--out", str(out), *SMALL_RUN])
    assert_one_line_error(code, err, "pretrain", out)


@pytest.fixture(scope="module")
def trained_run(shards: Path, workdir: Path) -> Path:
    """A finished two-step pretraining run: its one checkpoint is checkpoints/step_0000002."""
    run = workdir / "trained_run"
    assert main(["pretrain", "--data", str(shards), "--out", str(run), *SMALL_RUN]) == 0
    return run


def run_resume(capsys, shards: Path, run: Path) -> tuple[int, str]:
    """`pretrain --resume` into RUN up to step 4: the exit status and everything printed (stdout + stderr)."""
    capsys.readouterr()
    code = main(["pretrain", "--data", str(shards), "--out", str(run), "--resume", *SMALL_RUN, "train.max_steps=4"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


DAMAGES = ("random weights", "garbage config", "empty directory")  # empty: a kill during the checkpoint write


@pytest.mark.parametrize("how", DAMAGES)
def test_pretrain_resume_falls_back_past_a_damaged_newest_checkpoint(how, shards, trained_run, workdir, capsys):
    run = _copy(trained_run, workdir / "resume_run")
    _damage(run / "checkpoints" / "step_0000002", run / "checkpoints" / "step_0000010", how)
    code, printed = run_resume(capsys, shards, run)
    assert code == 0, printed
    assert "Traceback" not in printed
    assert "step_0000010" in printed and "falling back" in printed  # names the damaged one, says what it did
    assert f"resumed from {run / 'checkpoints' / 'step_0000002'} at step 2" in printed
    assert checkpoint_problem(run / "checkpoints" / "step_0000004") is None


@pytest.mark.parametrize("how", DAMAGES)
def test_pretrain_resume_starts_from_scratch_when_no_checkpoint_is_intact(how, shards, checkpoint, workdir, capsys):
    run = workdir / "resume_run"
    if run.exists():
        shutil.rmtree(run)
    _damage(checkpoint, run / "checkpoints" / "step_0000010", how)
    code, printed = run_resume(capsys, shards, run)
    assert code == 0, printed
    assert "Traceback" not in printed
    assert "step_0000010" in printed and "starting from scratch" in printed
    assert "resumed from" not in printed
    assert checkpoint_problem(run / "checkpoints" / "step_0000004") is None  # the run trained from step 0


@pytest.mark.parametrize("how", ["garbage tokenizer", "missing input", "empty input directory", "empty input file"])
def test_data_tokenize_refuses_bad_inputs(how, corpus, checkpoint, workdir, capsys):
    tokenizer, inputs = str(checkpoint / "tokenizer.json"), [str(corpus)]
    if how == "garbage tokenizer":
        garbage = workdir / "garbage_tokenizer.json"
        garbage.write_text("{ not a tokenizer")
        tokenizer = str(garbage)
    elif how == "missing input":
        inputs = [str(workdir / "no_such_file.jsonl")]
    elif how == "empty input directory":
        (workdir / "empty_inputs").mkdir(exist_ok=True)
        inputs = [str(workdir / "empty_inputs")]
    elif how == "empty input file":
        (workdir / "empty.jsonl").write_text("")
        inputs = [str(workdir / "empty.jsonl")]
    out = workdir / "tokenize_out"
    code, err = run_cli(capsys, ["data", "tokenize", *inputs, "--tokenizer", tokenizer, "--out", str(out),
                                 "--workers", "0"])
    assert_one_line_error(code, err, "data tokenize", out)
