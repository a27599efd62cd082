"""lmstack.data.shards: text -> token shards round trip, split stability, workers, atomic output, errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from lmstack.cli import main
from lmstack.data.shards import is_val_document, token_dtype, tokenize_to_shards
from lmstack.data.readers import iter_documents
from lmstack.errors import DataError
from lmstack.tokenizer import Tokenizer

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex jovial "
         "kings; café naïve Ünïcödé 東京 🙂 — ‘quotes’ 12345 tabs\tand\nnew lines").split(" ")


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def _make_corpus(root: Path, n_docs: int, seed: int = 0, prefix: str = "doc") -> Path:
    """A directory with .txt files and a .jsonl file of random multilingual text."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        (root / f"{prefix}_{i}.txt").write_text(_text(rng, rng.randint(20, 200)), encoding="utf-8")
    with open(root / f"{prefix}.jsonl", "w", encoding="utf-8") as f:
        for i in range(n_docs - 3):
            f.write(json.dumps({"id": f"{prefix}-{i}", "text": _text(rng, rng.randint(5, 120))}) + "\n")
    return root


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    rng = random.Random(1)
    return Tokenizer.train([_text(rng, 200) for _ in range(50)], vocab_size=400)


@pytest.fixture(scope="module")
def tokenizer_dir(tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    tokenizer.save(path)
    return path


def _read_split(out: Path, split: str) -> np.ndarray:
    meta = json.loads((out / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    return np.concatenate([np.fromfile(out / name, dtype=dtype) for name in meta["splits"][split]["shards"]])


def _documents_of(tokens: np.ndarray, eot: int) -> list[np.ndarray]:
    assert len(tokens) and tokens[0] == eot  # every document starts with the end-of-text token
    starts = np.flatnonzero(tokens == eot)
    return [tokens[a + 1:b] for a, b in zip(starts, list(starts[1:]) + [len(tokens)])]


def test_round_trip_decodes_every_document_in_order(tmp_path, tokenizer):
    corpus = _make_corpus(tmp_path / "corpus", 80)
    meta = tokenize_to_shards([corpus], tokenizer, tmp_path / "out", val_fraction=0.2, workers=0, progress=False)
    docs = list(iter_documents([corpus]))
    expected = {"train": [d for d in docs if not is_val_document(d.id, 0.2)],
                "val": [d for d in docs if is_val_document(d.id, 0.2)]}
    assert expected["val"] and expected["train"]
    for split, split_docs in expected.items():
        tokens = _read_split(tmp_path / "out", split)
        decoded = [tokenizer.decode(d.tolist()) for d in _documents_of(tokens, tokenizer.eot_id)]
        assert decoded == [d.text for d in split_docs]
        info = meta["splits"][split]
        assert info["tokens"] == len(tokens) == sum(info["shard_tokens"])
        assert info["documents"] == len(split_docs)
        assert info["bytes"] == sum(len(d.text.encode()) for d in split_docs)
    assert meta["vocab_size"] == tokenizer.vocab_size and meta["eot_id"] == tokenizer.eot_id
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == "tokenizer.json"
    assert meta == json.loads((tmp_path / "out" / "meta.json").read_text())
    assert Tokenizer.load(tmp_path / "out").encode("hex jovial kings") == tokenizer.encode("hex jovial kings")


def test_workers_give_identical_shards_and_shards_split_the_stream(tmp_path, tokenizer_dir):
    corpus = _make_corpus(tmp_path / "corpus", 150)
    one = tokenize_to_shards([corpus], tokenizer_dir, tmp_path / "inline", workers=0, progress=False)
    two = tokenize_to_shards([corpus], str(tokenizer_dir), tmp_path / "two", workers=2, shard_tokens=1000,
                             progress=False)
    assert len(two["splits"]["train"]["shards"]) > 3
    assert all(n == 1000 for n in two["splits"]["train"]["shard_tokens"][:-1])
    for split in ("train", "val"):
        assert np.array_equal(_read_split(tmp_path / "inline", split), _read_split(tmp_path / "two", split))
        assert {k: v for k, v in one["splits"][split].items() if "shard" not in k} == \
               {k: v for k, v in two["splits"][split].items() if "shard" not in k}
    train = two["splits"]["train"]
    sizes = [(tmp_path / "two" / name).stat().st_size for name in train["shards"]]
    assert sizes == [2 * n for n in train["shard_tokens"]]  # raw uint16, nothing else in the files


def test_split_is_stable_when_documents_are_added(tmp_path, tokenizer):
    small = _make_corpus(tmp_path / "small", 60, seed=1, prefix="a")
    extra = _make_corpus(tmp_path / "extra", 60, seed=2, prefix="b")
    tokenize_to_shards([small], tokenizer, tmp_path / "out1", val_fraction=0.25, workers=0, progress=False)
    tokenize_to_shards([small, extra], tokenizer, tmp_path / "out2", val_fraction=0.25, workers=0, progress=False)

    def split_texts(out: Path, split: str) -> set[str]:
        return {tokenizer.decode(d.tolist()) for d in _documents_of(_read_split(out, split), tokenizer.eot_id)}

    assert split_texts(tmp_path / "out1", "val") <= split_texts(tmp_path / "out2", "val")
    assert split_texts(tmp_path / "out1", "train") <= split_texts(tmp_path / "out2", "train")
    assert split_texts(tmp_path / "out2", "val") - split_texts(tmp_path / "out1", "val")  # new docs land in val too
    # the seed keys the hash: another seed gives another split
    ids = [f"doc-{i}" for i in range(400)]
    assert [is_val_document(i, 0.25, 0) for i in ids] != [is_val_document(i, 0.25, 1) for i in ids]
    assert 60 < sum(is_val_document(i, 0.25) for i in ids) < 140


def test_tiny_corpus_still_gets_one_val_document(tmp_path, tokenizer):
    corpus = tmp_path / "c"
    corpus.mkdir()
    texts = ["first document text", "second one, a bit longer than the first", "the third and last 🙂"]
    for i, text in enumerate(texts):
        (corpus / f"{i}.txt").write_text(text)
    assert not any(is_val_document(f"c/{i}.txt", 0.001) for i in range(3))  # the hash alone picks none
    meta = tokenize_to_shards([corpus], tokenizer, tmp_path / "out", val_fraction=0.001, workers=0,
                              shard_tokens=7, progress=False)  # the moved document spans shard files
    decode = lambda split: [tokenizer.decode(d.tolist())  # noqa: E731
                            for d in _documents_of(_read_split(tmp_path / "out", split), tokenizer.eot_id)]
    assert decode("train") == texts[:2] and decode("val") == texts[2:]
    assert meta["splits"]["val"]["documents"] == 1 and meta["splits"]["train"]["documents"] == 2
    assert meta["splits"]["val"]["bytes"] == len(texts[2].encode())
    for split in ("train", "val"):
        sizes = [(tmp_path / "out" / n).stat().st_size // 2 for n in meta["splits"][split]["shards"]]
        assert sizes == meta["splits"][split]["shard_tokens"] and all(sizes)


class _WideVocabulary:
    """Wraps a tokenizer to claim a vocabulary above 65,536 ids, to exercise uint32 shards."""

    def __init__(self, inner: Tokenizer):
        self.inner, self.vocab_size, self.eot_id = inner, 70_000, 69_999

    def encode_batch(self, texts):
        return [[i + 65_000 for i in ids] for ids in self.inner.encode_batch(texts)]

    def save(self, directory):
        self.inner.save(directory)


def test_large_vocabulary_uses_uint32(tmp_path, tokenizer):
    corpus = _make_corpus(tmp_path / "corpus", 20)
    meta = tokenize_to_shards([corpus], _WideVocabulary(tokenizer), tmp_path / "out", workers=0, progress=False)
    assert meta["dtype"] == "uint32" and token_dtype(70_000) == np.dtype("<u4") and token_dtype(65_536).itemsize == 2
    tokens = _read_split(tmp_path / "out", "train")
    assert tokens.max() >= 65_536 and (tokens == 69_999).sum() == meta["splits"]["train"]["documents"]


def test_output_is_atomic_and_replaces_only_shard_directories(tmp_path, tokenizer):
    corpus = _make_corpus(tmp_path / "corpus", 30)
    out = tmp_path / "out"
    first = tokenize_to_shards([corpus], tokenizer, out, workers=0, progress=False)

    broken = tmp_path / "broken"  # the second file fails halfway: the old output must survive untouched
    broken.mkdir()
    (broken / "a.jsonl").write_text('{"text": "fine"}\n')
    (broken / "b.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match="line 2"):
        tokenize_to_shards([corpus, broken], tokenizer, out, workers=0, progress=False)
    assert json.loads((out / "meta.json").read_text()) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "corpus", "out"]  # no temp dirs left

    tokenize_to_shards([corpus], tokenizer, out, workers=0, val_fraction=0.5, progress=False)  # replaces
    assert json.loads((out / "meta.json").read_text())["val_fraction"] == 0.5

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="notes.txt, not written by `lmstack data tokenize`.*--overwrite"):
        tokenize_to_shards([corpus], tokenizer, precious, workers=0, progress=False)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_a_shard_directory_with_the_users_files_is_not_replaced(tmp_path, tokenizer):
    corpus = _make_corpus(tmp_path / "corpus", 40)
    out = tmp_path / "out"
    first = tokenize_to_shards([corpus], tokenizer, out, workers=0, progress=False)
    (out / "notes.txt").write_text("my notes on this run")
    with pytest.raises(DataError, match=r"notes.txt.*--overwrite"):
        tokenize_to_shards([corpus], tokenizer, out, workers=0, val_fraction=0.5, progress=False)
    assert (out / "notes.txt").read_text() == "my notes on this run"
    assert json.loads((out / "meta.json").read_text()) == first
    (out / "meta.json").write_text("{garbled")  # an unreadable meta.json owns nothing either
    with pytest.raises(DataError, match="meta.json"):
        tokenize_to_shards([corpus], tokenizer, out, workers=0, progress=False)

    meta = tokenize_to_shards([corpus], tokenizer, out, workers=0, val_fraction=0.5, progress=False, overwrite=True)
    assert not (out / "notes.txt").exists() and meta["val_fraction"] == 0.5


def test_an_output_overlapping_an_input_is_refused_even_with_overwrite(tmp_path, tokenizer):
    corpus = _make_corpus(tmp_path / "corpus", 40)
    before = {p.name: p.read_bytes() for p in corpus.iterdir()}
    for out, where in ((corpus, "is the input"), (corpus / "tokens", "is inside the input"),
                       (tmp_path, "contains the input")):
        with pytest.raises(DataError, match=where):
            tokenize_to_shards([corpus], tokenizer, out, workers=0, progress=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in corpus.iterdir()} == before


def test_clear_errors(tmp_path, tokenizer):
    corpus = _make_corpus(tmp_path / "corpus", 10)
    with pytest.raises(DataError, match="neither an existing file"):
        tokenize_to_shards([tmp_path / "missing"], tokenizer, tmp_path / "o", progress=False)
    with pytest.raises(DataError, match="val_fraction"):
        tokenize_to_shards([corpus], tokenizer, tmp_path / "o", val_fraction=0.0, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("  \n")
    with pytest.raises(DataError, match="no text found"):
        tokenize_to_shards([empty], tokenizer, tmp_path / "o", workers=0, progress=False)
    (tmp_path / "one.txt").write_text("a single document")
    with pytest.raises(DataError, match="single document"):
        tokenize_to_shards([tmp_path / "one.txt"], tokenizer, tmp_path / "o", workers=0, progress=False)
    with pytest.raises(DataError, match="no 'body' field"):
        tokenize_to_shards([corpus], tokenizer, tmp_path / "o", text_field="body", workers=0, progress=False)
    assert not (tmp_path / "o").exists()


def test_cli_data_tokenize(tmp_path, tokenizer_dir, capsys):
    corpus = _make_corpus(tmp_path / "corpus", 40)
    out = tmp_path / "shards"
    assert main(["data", "tokenize", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(out),
                 "--workers", "0", "--val-fraction", "0.1"]) == 0
    printed = capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert f"{meta['splits']['train']['tokens']:,} tokens" in printed and meta["val_fraction"] == 0.1
    assert main(["data", "tokenize", str(tmp_path / "nope"), "--tokenizer", str(tokenizer_dir),
                 "--out", str(out)]) == 2
    assert "nope" in capsys.readouterr().err

    messy = tmp_path / "messy.jsonl"
    messy.write_bytes(b'{"text": "good one"}\n{"title": "no text"}\n{"text": "bad \xff byte"}\n{"text": "fine"}\n')
    args = ["data", "tokenize", str(messy), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "m"),
            "--workers", "0"]
    assert main(args) == 2
    assert "line 2: no 'text' field" in capsys.readouterr().err
    assert main(args + ["--skip-bad-records"]) == 0
    printed = capsys.readouterr().out
    assert "1 undecodable bytes replaced in 1 file(s)" in printed and "1 bad records skipped" in printed
    meta = json.loads((tmp_path / "m" / "meta.json").read_text())
    assert meta["read_stats"]["skipped_records"] == {str(messy): 1}
    assert sum(s["documents"] for s in meta["splits"].values()) == 3
