"""`data clean` on different executors gives the same bytes: the dedup shuffle's task functions against the
sequential DedupIndex, the task functions run rank by rank in-process against the local executor, a local
Ray cluster against the local executor, and the one-line errors for a missing Ray or a dead address. `data
tokenize --executor ray` writes the local run's shards byte for byte, with the same one-line errors."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pytest

from lmstack.cli import main
from lmstack.data.dedup import (
    DedupConfig,
    DedupIndex,
    MinHasher,
    dedup_keys,
    synthetic_near_duplicates,
)
from lmstack.data.dedup_stages import run_ranks_inline, sharded_dedup
from lmstack.data.executors import make_executor
from lmstack.data.pipeline import clean_corpus
from lmstack.data.pipeline_config import CleanConfig
from lmstack.errors import DataError

SHARED_LINE = "All rights reserved by the harbour authority; reprinted with the keeper's kind permission."
WORDS = ("sea wind ship light keeper harbour storm rope lamp tide coast rock gull wave night morning boat "
         "sail anchor cliff fog bell deck mast lantern stair window log captain crew").split()


def _corpus(path: Path, n: int = 120, seed: int = 0) -> Path:
    """English-like stories with exact copies, near copies and a shared boilerplate line, as JSONL."""
    rng = np.random.default_rng(seed)
    docs: list[str] = []
    for i in range(n):
        r = rng.random()
        if docs and r < 0.15:
            docs.append(docs[int(rng.integers(len(docs)))].upper())  # exact duplicate
        elif docs and r < 0.35:
            words = docs[int(rng.integers(len(docs)))].split(" ")
            k = int(rng.integers(len(words)))
            words[k] = str(rng.choice(WORDS))  # near duplicate: one word changed
            docs.append(" ".join(words))
        else:
            sentences = [" ".join(["The"] + list(rng.choice(WORDS, size=12)) + ["again."]) for _ in range(6)]
            text = " ".join(sentences) + f" Story {i}."
            docs.append(text + ("\n" + SHARED_LINE if r > 0.7 else ""))
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(docs):
            f.write(json.dumps({"id": f"doc-{i}", "text": t}) + "\n")
    return path


def _config() -> CleanConfig:
    cfg = CleanConfig()
    cfg.decontam.benchmarks = []
    cfg.language.enabled = False  # the word salad is not a language; this test is about the executors
    cfg.output.shard_docs = 16
    cfg.output.plot = False
    cfg.dedup.line_min_chars = 40
    return cfg


def _outputs(out: Path) -> dict[str, Any]:
    """Everything the run decided: shard bytes, duplicates.tsv, and the report without timing and paths."""
    files = {p.name: p.read_bytes() for p in sorted(out.glob("shard_*.jsonl"))}
    files["duplicates.tsv"] = (out / "duplicates.tsv").read_bytes()
    report = json.loads((out / "report.json").read_text())
    for volatile in ("timing", "out_dir", "outputs", "workers"):
        report.pop(volatile)
    report["stages"] = [{k: v for k, v in s.items() if k != "seconds"} for s in report["stages"]]
    return {"files": files, "report": report}


class RankByRank:
    """The task functions in this process, one rank after another, with a world size of 3."""

    parallelism = 3

    def start(self, setup: Callable[..., None], setup_args: tuple) -> None:
        setup(*setup_args)

    def imap(self, fn: Callable, tasks: Iterable, on_result: Callable) -> None:
        for t in tasks:
            on_result(fn(t))

    def run_ranks(self, fn: Callable, world_size: int, inputs: dict, work_dir: str) -> list:
        return run_ranks_inline(fn, world_size, inputs, work_dir)

    def close(self) -> None:
        pass

    def terminate(self) -> None:
        pass


@pytest.mark.parametrize("variant", ["default", "no_exact", "no_near", "sentences_only"])
def test_the_shuffle_stages_equal_the_sequential_index(tmp_path, variant):
    texts, _ = synthetic_near_duplicates(families=30 if variant == "default" else 10, variants=4, seed=1)
    texts = texts + texts[:15]  # exact copies at the end
    texts = [t + "\n" + SHARED_LINE if i % 3 == 0 else t for i, t in enumerate(texts)]
    cfg = {"default": DedupConfig(line_min_chars=20), "no_exact": DedupConfig(exact=False, line_min_chars=20),
           "no_near": DedupConfig(near=False, line_min_chars=20),
           "sentences_only": DedupConfig(exact=False, near=False, line_unit="sentence", line_min_chars=20)}[variant]
    hasher = MinHasher(cfg.num_perm, cfg.seed, cfg.shingle_size)
    index, reference, files = DedupIndex(cfg), [], []
    for k in range(0, len(texts), 29):
        keys = dedup_keys(texts[k:k + 29], cfg, hasher)
        reference.append(index.add_batch(keys))
        files.append(tmp_path / f"keys_{k}.npz")
        np.savez(files[-1], **keys.to_arrays())
    assert index.counts["lines_removed"] and (index.counts["exact"] or not cfg.exact)
    assert index.counts["near"] or not cfg.near
    for world_size in (1, 2, 5):
        shards, summary = sharded_dedup(run_ranks_inline, tmp_path, files, cfg, world_size)
        for want, got in zip(reference, shards, strict=True):
            np.testing.assert_array_equal(got.status, want.status)
            np.testing.assert_array_equal(got.representative, want.representative)
            np.testing.assert_array_equal(got.similarity, want.similarity)
            assert got.drop_spans == want.drop_spans
        assert summary.counts == index.counts
        assert summary.cluster_sizes == index.cluster_sizes


def test_task_functions_rank_by_rank_equal_the_local_executor(tmp_path):
    corpus = _corpus(tmp_path / "corpus.jsonl")
    local = clean_corpus([corpus], tmp_path / "local", _config(), progress=False)
    ranks = clean_corpus([corpus], tmp_path / "ranks", _config(), progress=False, executor=RankByRank())
    assert local["duplicates"]["exact"] and local["duplicates"]["near"] and local["duplicates"]["units_removed"]
    assert len(list((tmp_path / "local").glob("shard_*.jsonl"))) > 3
    assert _outputs(tmp_path / "ranks") == _outputs(tmp_path / "local")
    assert ranks["duplicates"] == local["duplicates"]


def test_ray_executor_gives_the_local_bytes(tmp_path):
    ray = pytest.importorskip("ray")  # an optional extra: lmstack[ray]
    corpus = _corpus(tmp_path / "corpus.jsonl")
    clean_corpus([corpus], tmp_path / "local", _config(), progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    def bad_rank(rank: int, world_size: int, inputs: dict, work_dir: str) -> dict:
        if rank == 1:
            raise DataError(f"shard {rank} is unreadable")
        return {"rank": rank}

    try:
        report = clean_corpus([corpus], tmp_path / "ray", _config(), workers=2, progress=False, executor="ray")
        with pytest.raises(DataError, match="^shard 1 is unreadable$"):  # itself, not Ray's wrapped traceback
            make_executor("ray", 2).run_ranks(bad_rank, 2, {}, str(tmp_path))
    finally:
        ray.shutdown()
    assert report["documents_out"] > 0
    assert _outputs(tmp_path / "ray") == _outputs(tmp_path / "local")


def test_executor_ray_without_ray_is_one_line(tmp_path, monkeypatch, capsys):
    corpus = _corpus(tmp_path / "corpus.jsonl", n=10)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as when it is not installed
    code = main(["data", "clean", str(corpus), "--out", str(tmp_path / "out"), "--executor", "ray", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "pip install 'lmstack[ray]'" in err
    assert not (tmp_path / "out").exists()


def test_unreachable_ray_address_is_one_line_before_any_work(tmp_path, capsys):
    pytest.importorskip("ray")
    corpus = _corpus(tmp_path / "corpus.jsonl", n=10)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["data", "clean", str(corpus), "--out", str(tmp_path / "out"), "--executor", "ray",
                 "--ray-address", f"127.0.0.1:{port}", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"127.0.0.1:{port}" in err and "cannot connect" in err
    assert not (tmp_path / "out").exists()
    assert main(["data", "clean", str(corpus), "--out", str(tmp_path / "out"), "--ray-address", "1.2.3.4:1"]) == 2


# ----------------------------------------------------------------------------- tokenize on Ray


def _shards_and_meta(out: Path) -> tuple[dict[str, bytes], dict]:
    """Every shard's bytes, and meta.json without the timing fields."""
    meta = json.loads((out / "meta.json").read_text())
    for key in ("created", "seconds", "text_mb_per_second"):
        meta.pop(key)
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))}, meta


def test_tokenize_on_ray_writes_the_local_shards(tmp_path, monkeypatch):
    """Many small chunks, so Ray's tasks finish out of order and the reorder buffer is exercised; several
    shard files per split. The local run (two worker processes) is the reference, byte for byte."""
    ray = pytest.importorskip("ray")  # an optional extra: lmstack[ray]
    from lmstack.data import shards
    from lmstack.tokenizer import Tokenizer

    corpus = _corpus(tmp_path / "corpus.jsonl", n=200)
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    tokenizer = Tokenizer.train(texts, vocab_size=300)
    monkeypatch.setattr(shards, "WORKER_CHUNK_BYTES", 2048)  # ~60 chunks (the driver does the chunking)
    options = dict(workers=2, val_fraction=0.1, shard_tokens=5000, progress=False)
    local = shards.tokenize_to_shards([corpus], tokenizer, tmp_path / "local", **options)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = shards.tokenize_to_shards([corpus], tokenizer, tmp_path / "ray", executor="ray", **options)
    finally:
        ray.shutdown()
    assert len(local["splits"]["train"]["shards"]) > 3 and local["splits"]["val"]["documents"] > 0
    assert on_ray["splits"] == local["splits"]
    assert _shards_and_meta(tmp_path / "ray") == _shards_and_meta(tmp_path / "local")


def test_tokenize_executor_errors_are_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    corpus = _corpus(tmp_path / "corpus.jsonl", n=10)
    tok = tmp_path / "tok"
    from lmstack.tokenizer import Tokenizer

    Tokenizer.train([json.loads(line)["text"] for line in corpus.read_text().splitlines()], vocab_size=300).save(tok)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = ["data", "tokenize", str(corpus), "--tokenizer", str(tok), "--out", str(tmp_path / "out")]
    cases = [(["--ray-address", f"127.0.0.1:{port}"], "--ray-address needs --executor ray")]
    if importlib.util.find_spec("ray") is not None:
        cases.append((["--executor", "ray", "--ray-address", f"127.0.0.1:{port}"], "cannot connect"))
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert not (tmp_path / "out").exists()
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as when it is not installed
    assert main([*base, "--executor", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'lmstack[ray]'" in err
    assert not (tmp_path / "out").exists()
