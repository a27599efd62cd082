"""lmstack self-instruct: each filter rejects what it should, a run writes sft-readable JSONL whose counts add
up, seeded runs repeat, and the CLI's errors are one line."""

import dataclasses
import json

import pytest
import torch

from lmstack.cli import main
from lmstack.data.instruct import load_instruct
from lmstack.errors import DataError, UserError
from lmstack.stages.self_instruct import (
    FILTERS,
    Limits,
    Similarity,
    is_repetitive,
    load_seed_tasks,
    parse_instance,
    rejection,
    self_instruct,
)

POOL = ["Classify the sentiment of this review as positive or negative.", "List three fruits that are red."]


def _reason(instruction, output="a fine answer", pool=POOL, limits=None):
    seen = {" ".join(p.lower().split()) for p in pool}
    return rejection(instruction, output, pool, seen, Similarity(), limits or Limits())[0]


def test_filters_reject_each_kind_and_pass_a_new_task():
    assert _reason("Translate the sentence into French.") is None
    assert _reason("", "x") == "empty" and _reason("Translate the sentence into French.", "  ") == "empty"
    assert _reason("Translate it now.", limits=Limits(min_words=3)) is None
    assert _reason("Translate.", limits=Limits(min_words=3)) == "length"
    assert _reason("word " * 200) == "length"
    assert _reason("Translate the sentence into French.", "y" * 3000) == "length"
    assert _reason("go go go go go go go go go now") == "repetition"
    assert _reason("Translate the sentence into French.", "the cat sat " * 10) == "repetition"
    assert _reason("list  THREE fruits that are red.") == "duplicate"  # case and spacing folded
    assert _reason("List three fruits that are yellow.") == "similar"  # ROUGE-L 6/7 > 0.7
    assert _reason("List three fruits that are yellow.", limits=Limits(max_rouge=0.9)) is None


def test_repetition_and_parsing():
    assert not is_repetitive("Write a short poem about the sea and the wind at night.")
    assert is_repetitive("a b c a b c a b c a b c")
    assert parse_instance("Input: 2 + 2\nOutput: 4\n### next") == ("2 + 2", "4")
    assert parse_instance("Paris") == ("", "Paris")
    assert parse_instance("Input: only an input") == ("only an input", "")


def test_shipped_seed_tasks_and_bad_seed_files(tmp_path):
    seeds = load_seed_tasks()
    assert len(seeds) >= 30 and all(t.instruction and t.output for t in seeds)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no seed tasks"):
        load_seed_tasks(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        load_seed_tasks(bad)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained tiny GPT (logits left flat so sampling writes varied text)."""
    from lmstack.checkpoint import save_checkpoint
    from lmstack.models.gpt import GPT, GPTConfig
    from lmstack.tokenizer import Tokenizer

    seeds = load_seed_tasks()
    tokenizer = Tokenizer.train([f"{t.instruction} {t.input} {t.output}" for t in seeds] * 5, vocab_size=400)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=512, n_layer=1, n_head=2, n_embd=32)
    path = tmp_path_factory.mktemp("si") / "ckpt"
    save_checkpoint(path, GPT(cfg).eval(), {"model": dataclasses.asdict(cfg)}, tokenizer=tokenizer)
    return path


LOOSE = Limits(max_rouge=0.9, min_words=1, max_words=200, max_output_chars=5000)


def _run(checkpoint, out, **kw):
    return self_instruct(str(checkpoint), out, 6, seed=3, batch_size=6, max_tokens=16, num_demos=3, max_rounds=3,
                         limits=LOOSE, device="cpu", progress=False, **kw)


def test_end_to_end_writes_sft_data_and_seeded_runs_repeat(checkpoint, tmp_path):
    from lmstack.checkpoint import load_checkpoint

    summary = _run(checkpoint, tmp_path / "a.jsonl")
    assert summary["generated"] == summary["kept"] + sum(summary["rejected"].values())
    assert set(summary["rejected"]) == set(FILTERS) and summary["kept"] >= 1
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(records) == summary["kept"]
    for record in records:
        assert record["provenance"]["generator"] == "lmstack self-instruct"
        assert record["provenance"]["max_rouge_l"] < LOOSE.max_rouge
        assert len(record["provenance"]["demonstrations"]) == 3
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
    data = load_instruct([str(tmp_path / "a.jsonl")], load_checkpoint(checkpoint).tokenizer, max_tokens=512, val_fraction=0.0)
    assert len(data.train) == summary["kept"]

    again = _run(checkpoint, tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert again == {**summary, "out": str(tmp_path / "b.jsonl")}


def test_cli_help_and_one_line_errors(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["self-instruct", "--help"])
    assert exit_.value.code == 0 and "--max-rouge" in capsys.readouterr().out
    assert main(["self-instruct", "--model", str(checkpoint), "--out", str(tmp_path / "o.jsonl"), "--n", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--n" in err and len(err.splitlines()) == 1
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["self-instruct", "--model", str(checkpoint), "--out", str(tmp_path / "o.jsonl"), "--n", "2",
                 "--seed-tasks", str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no seed tasks" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.jsonl").exists()
    with pytest.raises(UserError, match="at least one"):
        self_instruct(str(checkpoint), tmp_path / "o.jsonl", 0)
