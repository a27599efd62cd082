"""`lmstack sft ... sft.packing=true` (lmstack/stages/sft.py with the packed loader of lmstack/data/instruct.py):
a run trains end to end on packed windows and counts the trained tokens of those windows; with
``sft.padding_free=true`` a run takes the padded run's steps with the same losses."""

import json

import pytest

from lmstack.checkpoint import load_checkpoint
from lmstack.data.instruct import InstructLoader, load_instruct
from lmstack.errors import ConfigError
from lmstack.stages.sft import sft
from sft_helpers import make_sft_base


def test_sft_with_packing_trains_end_to_end(tmp_path):
    make_sft_base(tmp_path, conversations=200)
    tok = load_checkpoint(tmp_path / "model").tokenizer
    summary = sft(tmp_path / "model", [str(tmp_path / "tasks.jsonl")], tmp_path / "run", progress=False,
                  overrides=["train.batch_size=2", "train.seq_len=64", "train.max_steps=6", "train.log_every=2",
                             "train.eval_every=3", "train.eval_batches=2", "train.tensorboard=false",
                             "train.device=cpu", "optim.warmup_steps=0", "sft.packing=true"])
    assert summary["config"]["sft"]["packing"] is True and summary["steps"] == 6
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    # the trained tokens counted are the labels of the packed windows the run drew, not padded slots
    data = load_instruct([tmp_path / "tasks.jsonl"], tok, 65, val_fraction=0.05, seed=0)
    loader = iter(InstructLoader(data.train, 2, seed=summary["config"]["train"]["seed"], pad_id=tok.pad_id,
                                 pack_len=64))
    batches = [next(loader) for _ in range(6)]
    assert all(int(b["document_ids"].max()) >= 1 for b in batches)  # several conversations per window
    assert summary["tokens"] == sum(int((b["labels"] != -1).sum()) for b in batches)


def _losses(run) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line and "step" in line]


def test_sft_padding_free_takes_the_padded_runs_steps(tmp_path):
    make_sft_base(tmp_path, conversations=120)
    common = ["train.batch_size=4", "train.seq_len=64", "train.max_steps=4", "train.log_every=1",
              "train.eval_every=0", "train.tensorboard=false", "train.device=cpu", "optim.warmup_steps=0"]
    runs = {}
    for layout in ("false", "true"):
        run = tmp_path / f"run-{layout}"
        runs[layout] = (sft(tmp_path / "model", [str(tmp_path / "tasks.jsonl")], run, progress=False,
                            overrides=[*common, f"sft.padding_free={layout}"]), run)
    (padded, padded_dir), (flat, flat_dir) = runs["false"], runs["true"]
    assert flat["config"]["sft"]["padding_free"] is True
    assert flat["tokens"] == padded["tokens"]  # the same conversations, so the same trained tokens
    a, b = _losses(padded_dir), _losses(flat_dir)
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4  # same batches, same loss, same updates
    with pytest.raises(ConfigError, match="choose one"):
        sft(tmp_path / "model", [str(tmp_path / "tasks.jsonl")], tmp_path / "both", progress=False,
            overrides=[*common, "sft.padding_free=true", "sft.packing=true"])
    assert not (tmp_path / "both").exists()
