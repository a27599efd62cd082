"""End to end: `clean_corpus` / `lmstack data clean` over mixed inputs -> shards, report, summary, funnel;
resuming, workers, parquet output, the perplexity cut, and clear errors for bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmstack.cli import main
from lmstack.config import ConfigError
from lmstack.data.pipeline import clean_corpus
from lmstack.data.pipeline_config import CleanConfig, apply_config_overrides
from lmstack.data.readers import iter_documents
from lmstack.errors import DataError

STORY = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, trimmed the wick, polished the "
         "great lens until it shone, and wrote in his log the state of the sea, the direction of the wind and the "
         "names of the ships that passed the point before the light went on. {n}")
EVAL_QUESTION = ("A train leaves the station at nine in the morning travelling at sixty miles an hour towards the "
                 "coast; how far has it gone by noon?")
LICENSE = "This electronic edition is provided for study only and may be copied freely with this notice intact."


def _write_inputs(root: Path) -> list[Path]:
    docs = [{"id": f"story-{i}", "text": STORY.format(n=f"Entry {i}: the {w} ship came in at {i} bells.")}
            for i, w in enumerate(["red", "grey", "swift", "silent", "broad", "black", "white", "small"])]
    docs.append({"id": "dup-exact", "text": docs[0]["text"].upper()})
    docs.append({"id": "dup-near", "text": docs[1]["text"].replace("spiral", "winding")})
    docs.append({"id": "spam", "text": "Click here to claim your prize! " * 3})
    docs.append({"id": "tiny", "text": "ok"})
    docs.append({"id": "pii", "text": STORY.format(n="Write to keeper@lighthouse.example or call +44 20 7946 0958.")})
    docs.append({"id": "leak", "text": "Quiz night notes. " + EVAL_QUESTION + " Answers on the back."})
    root.mkdir(parents=True, exist_ok=True)
    jsonl = root / "stories.jsonl.gz"
    with gzip.open(jsonl, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    pq.write_table(pa.table({"text": [STORY.format(n="From the parquet file.") + "\n" + LICENSE,
                                      "Der Leuchtturmwaerter stieg jeden Abend die Treppe hinauf, putzte die grosse "
                                      "Linse und schrieb in sein Buch den Zustand des Meeres und die Namen der "
                                      "Schiffe, die vor dem Licht am Kap vorbeifuhren. Im Winter war die Arbeit schwer, "
                                      "denn der Sturm blies oft tagelang."]}), root / "more.parquet")
    (root / "notes").mkdir(exist_ok=True)
    (root / "notes" / "a.txt").write_bytes((STORY.format(n="A note with a bad byte: \xff.") + "\n" + LICENSE)
                                           .encode("latin-1"))
    return [jsonl, root / "more.parquet", root / "notes"]


def _config(**overrides) -> CleanConfig:
    cfg = CleanConfig()
    cfg.decontam.benchmarks = []  # the real benchmarks are tested in test_data_decontam.py
    cfg.output.shard_docs = 4
    cfg.dedup.line_min_chars = 40
    return apply_config_overrides(cfg, {k.replace("__", "."): v for k, v in overrides.items()})


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(out.glob("shard_*.jsonl")) for line in f.read_text().splitlines()]


def test_clean_corpus_end_to_end(tmp_path):
    inputs = _write_inputs(tmp_path / "in")
    eval_file = tmp_path / "my_eval.jsonl"
    eval_file.write_text(json.dumps({"question": EVAL_QUESTION, "answer": "180 miles"}) + "\n")
    out = tmp_path / "out"
    report = clean_corpus(inputs, out, _config(decontam__files=[str(eval_file)]), progress=False)
    records = _records(out)
    ids = [r["id"] for r in records]
    assert report["documents_in"] == 17 and report["documents_out"] == len(records)
    assert "dup-exact" not in ids and "dup-near" not in ids and "spam" not in ids and "tiny" not in ids
    assert "leak" not in ids and report["decontamination"]["documents"] == {str(eval_file): 1}
    assert not any("Leuchtturm" in r["text"] for r in records)
    assert report["removed"]["dedup_exact"] == 1 and report["removed"]["dedup_near"] == 1
    assert report["removed"]["blocklist"] == 1 and report["removed"]["language"] == 1
    pii = next(r for r in records if r["id"] == "pii")
    assert "<EMAIL>" in pii["text"] and "<PHONE>" in pii["text"] and report["pii"] == {"email": 1, "phone": 1}
    # cluster ids: the kept representatives carry their own id
    by_id = {r["id"]: r for r in records}
    assert by_id["story-0"]["cluster_id"] == "story-0" and by_id["story-1"]["cluster_id"] == "story-1"
    assert "cluster_id" not in by_id["story-2"]
    dups = (out / "duplicates.tsv").read_text().splitlines()
    assert dups[0].startswith("id\tcluster_id") and {line.split("\t")[0] for line in dups[1:]} == {"dup-exact",
                                                                                                   "dup-near"}
    # the license line appears in two documents: cut from the second one only
    with_license = [r for r in records if LICENSE in r["text"]]
    assert len(with_license) == 1 and report["duplicates"]["units_removed"] == 1
    # the undecodable byte is counted per file, never a crash
    assert list(report["read"]["undecodable_bytes"].values()) == [1]
    # per-stage accounting chains: each stage starts where the previous one ended
    stages = [s for s in report["stages"] if s["name"] != "dedup_map"]
    assert stages[0]["docs_in"] == 17
    for a, b in zip(stages, stages[1:]):
        assert a["docs_out"] == b["docs_in"]
    assert stages[-1]["docs_out"] == len(records) and report["bytes_out"] == stages[-1]["bytes_out"]
    assert sum(report["removed"].values()) == 17 - len(records)
    # the readable outputs
    summary = (out / "summary.md").read_text()
    assert "## Removed documents per reason" in summary and "blocklist" in summary and "Click here" in summary
    assert (out / "funnel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "report.json").read_text())["documents_out"] == len(records)
    # the output directory reads back as a corpus: only the shards are documents
    assert [d.id for d in iter_documents([out])] == ids


def test_rerun_skips_finished_shards_and_config_change_redoes_them(tmp_path):
    inputs = _write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    first = clean_corpus(inputs, out, _config(), progress=False)
    shards = sorted(out.glob("shard_*.jsonl"))
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    done = sorted((out / ".work").glob("*.done.json"))
    done_stamps = {p: p.stat().st_mtime_ns for p in done}
    second = clean_corpus(inputs, out, _config(), progress=False)
    assert {p: p.stat().st_mtime_ns for p in shards} == stamps  # nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in done} == done_stamps
    assert second["documents_out"] == first["documents_out"] and second["removed"] == first["removed"]
    third = clean_corpus(inputs, out, _config(heuristics__blocklist=[]), progress=False)
    assert "blocklist" not in third["removed"] and third["documents_out"] == first["documents_out"] + 1


def test_workers_give_the_same_output_as_one_process(tmp_path):
    inputs = _write_inputs(tmp_path / "in")
    one = clean_corpus(inputs, tmp_path / "one", _config(), workers=1, progress=False)
    two = clean_corpus(inputs, tmp_path / "two", _config(), workers=2, progress=False)
    assert _records(tmp_path / "one") == _records(tmp_path / "two")
    assert one["removed"] == two["removed"] and two["workers"] == 2


def test_parquet_output_and_fewer_shards_remove_stale_files(tmp_path):
    inputs = _write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    first = clean_corpus(inputs, out, _config(), progress=False)
    assert len(list(out.glob("shard_*.jsonl"))) == -(-first["documents_in"] // 4) > 1  # shards follow input batches
    report = clean_corpus(inputs, out, _config(output__format="parquet", output__shard_docs=100), progress=False)
    assert not list(out.glob("shard_*.jsonl")) and [p.name for p in out.glob("shard_*.parquet")] == ["shard_00000.parquet"]
    table = pq.read_table(out / "shard_00000.parquet")
    assert table.num_rows == report["documents_out"] and {"id", "text", "source"} <= set(table.column_names)


def test_perplexity_cut_in_the_pipeline(tmp_path):
    from test_data_quality import prose

    from lmstack.config import apply_overrides, tiny
    from lmstack.models import build_model
    from lmstack.tokenizer import Tokenizer
    from lmstack.checkpoint import save_checkpoint
    import random
    import torch

    rng = random.Random(0)
    tokenizer = Tokenizer.train([prose(rng) for _ in range(100)], vocab_size=300)
    cfg = apply_overrides(tiny(), ["model.n_layer=1", "model.n_head=2", "model.n_kv_head=2", "model.n_embd=32",
                                   f"model.vocab_size={tokenizer.vocab_size}", "model.block_size=512"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    with torch.no_grad():  # a fresh model's logits are near-uniform; sharpen them so perplexities differ
        model.lm_head.weight.mul_(20)
    save_checkpoint(tmp_path / "ckpt", model, cfg.to_dict(), tokenizer=tokenizer)
    inputs = _write_inputs(tmp_path / "in")
    report = clean_corpus(inputs, tmp_path / "out", _config(quality__perplexity_model=str(tmp_path / "ckpt"),
                                                            quality__perplexity_high_quantile=0.25,
                                                            quality__perplexity_max_tokens=512),
                          progress=False)
    records = _records(tmp_path / "out")
    low, high = report["perplexity_cutoffs"]
    assert report["removed"]["perplexity_high"] >= 2 and "perplexity_low" not in report["removed"]
    assert all(r["perplexity"] <= high for r in records) and len({r["perplexity"] for r in records}) > 3


def test_bad_inputs_give_clear_errors(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="nope.jsonl"):
        clean_corpus([tmp_path / "nope.jsonl"], out, _config(), progress=False)
    missing_field = tmp_path / "records.jsonl"
    missing_field.write_text(json.dumps({"body": "text under another key"}) + "\n")
    with pytest.raises(DataError, match=r"records.jsonl.*'text'"):
        clean_corpus([missing_field], out, _config(), progress=False)
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00 definitely not gzip")
    with pytest.raises(DataError, match="broken.jsonl.gz"):
        clean_corpus([broken], out, _config(), progress=False)
    with pytest.raises(ConfigError, match="workers"):
        clean_corpus([missing_field], out, _config(), workers=0, progress=False)
    with pytest.raises(ConfigError, match="language.min_score"):
        clean_corpus([missing_field], out, _config(language__min_score=3), progress=False)
    assert not list(out.glob("shard_*"))  # nothing half-written


def test_cli_clean(tmp_path, capsys):
    inputs = _write_inputs(tmp_path / "in")
    cfg_file = tmp_path / "clean.yaml"
    cfg_file.write_text("decontam:\n  benchmarks: []\noutput:\n  shard_docs: 5\n")
    out = tmp_path / "out"
    assert main(["data", "clean", *map(str, inputs), "--out", str(out), "--config", str(cfg_file),
                 "--set", "dedup.line_min_chars=40", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "kept" in printed and "removed:" in printed and (out / "report.json").is_file()
    assert main(["data", "clean", "--print-config", "--config", str(cfg_file)]) == 0
    assert "benchmarks: []" in capsys.readouterr().out
    assert main(["data", "clean", str(inputs[0]), "--out", str(out), "--set", "dedup.bandz=3"]) == 2
    assert "valid dedup keys" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": 1}\n')
    assert main(["data", "clean", str(bad), "--out", str(out), "--config", str(cfg_file), "--quiet"]) == 2
    assert "bad.jsonl" in capsys.readouterr().err
    assert main(["data", "clean", "--out", str(out)]) == 2


# ----------------------------------------------------------------------------- the user's files are safe


def test_an_out_dir_with_files_clean_did_not_write_is_refused_and_left_alone(tmp_path):
    inputs = _write_inputs(tmp_path / "in")
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "shard_00007.jsonl").write_text('{"text": "the user\'s own shard"}\n')
    (out / "report.json").write_text('{"mine": true}\n')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError, match=r"shard_00007.jsonl.*not written by `lmstack data clean`.*--overwrite"):
        clean_corpus(inputs, out, _config(), progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing deleted, nothing added

    report = clean_corpus(inputs, out, _config(), progress=False, overwrite=True)
    assert not (out / "shard_00007.jsonl").exists() and json.loads((out / "report.json").read_text()) == report
    again = clean_corpus(inputs, out, _config(), progress=False)  # its own output: no flag needed
    assert again["documents_out"] == report["documents_out"]
    (out / "notes.md").write_text("added by the user afterwards")
    with pytest.raises(DataError, match="notes.md"):
        clean_corpus(inputs, out, _config(), progress=False)
    assert (out / "notes.md").read_text() == "added by the user afterwards"


def test_an_out_dir_overlapping_an_input_is_always_refused(tmp_path):
    inputs = _write_inputs(tmp_path / "in")
    first = tmp_path / "cleaned"
    clean_corpus(inputs, first, _config(), progress=False)
    shards = {p.name: p.read_bytes() for p in first.glob("shard_*")}
    for out in (first, first / "sub"):
        with pytest.raises(DataError, match="would overwrite its own input"):
            clean_corpus([first], out, _config(), progress=False, overwrite=True)
    with pytest.raises(DataError, match="contains the input"):
        clean_corpus([tmp_path / "in" / "notes"], tmp_path / "in", _config(), progress=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in first.glob("shard_*")} == shards
    assert not (first / "sub").exists()


def test_a_failed_run_is_visibly_incomplete_and_readers_refuse_it(tmp_path):
    inputs = _write_inputs(tmp_path / "in")
    bad = tmp_path / "in" / "zz_bad.jsonl"  # read last: shards before it are finished when the run fails
    bad.write_text(json.dumps({"text": STORY.format(n="fine")}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="zz_bad.jsonl, line 2"):
        clean_corpus([*inputs, bad], out, _config(), progress=False)
    assert (out / "_INCOMPLETE").is_file() and not (out / "report.json").exists()
    assert list((out / ".work").glob("shard_*.done.json"))  # some work was done before the failure
    with pytest.raises(DataError, match=r"out is incomplete: the `lmstack data clean` writing it"):
        list(iter_documents(out))

    clean_corpus(inputs, out, _config(), progress=False)  # finishing the job clears the marker
    assert not (out / "_INCOMPLETE").exists() and (out / "report.json").is_file()
    assert len(list(iter_documents(out))) == json.loads((out / "report.json").read_text())["documents_out"]


def test_a_killed_run_leaves_a_directory_that_tokenize_refuses(tmp_path):
    """The reported failure: a clean killed during its run, then `data tokenize` over its output."""
    import signal
    import subprocess
    import sys
    import time

    from lmstack.data.shards import tokenize_to_shards
    from lmstack.tokenizer import Tokenizer

    corpus = tmp_path / "big.jsonl"
    corpus.write_text("".join(json.dumps({"text": STORY.format(n=f"Entry {i} of the long log.")}) + "\n"
                              for i in range(3000)))
    out = tmp_path / "out"
    script = ("import sys; from lmstack.data.pipeline import clean_corpus; "
              "from lmstack.data.pipeline_config import CleanConfig; cfg = CleanConfig(); "
              "cfg.decontam.enabled = False; cfg.output.shard_docs = 5; "
              "clean_corpus([sys.argv[1]], sys.argv[2], cfg, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(corpus), str(out)])
    try:
        deadline = time.monotonic() + 120
        while not list((out / ".work").glob("shard_*.done.json")) and time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (out / "_INCOMPLETE").is_file() and not (out / "report.json").exists()
    tokenizer = Tokenizer.train([STORY.format(n=i) for i in range(20)], vocab_size=300)
    with pytest.raises(DataError, match="is incomplete.*re-run that command"):
        tokenize_to_shards([out], tokenizer, tmp_path / "tokens", workers=0, progress=False)
    assert not (tmp_path / "tokens").exists()
