"""The document index: passages keep their offsets, BM25 finds the passage that shares the query's words, a
passage's own text is its own nearest neighbour in dense search, RRF fuses as its formula says, the index is
written atomically with a manifest, and empty / binary / damaged inputs fail with one clear line."""

from __future__ import annotations

import json

import pytest

from lmstack.errors import DataError, UserError
from lmstack.tools.index import build_index, chunk_text, load_index, reciprocal_rank_fusion, search_tool

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = [
    {"id": "tower", "text": "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris."},
    {"id": "plants", "text": "Photosynthesis lets plants turn light energy into chemical energy stored in sugar."},
    {"id": "river", "text": "The Nile is a major north-flowing river in northeastern Africa."},
]


@pytest.fixture
def docs(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "facts.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    long_text = " ".join(f"word{i}" for i in range(300))
    (tmp_path / "docs" / "long.txt").write_text(long_text)
    return tmp_path


def test_chunks_cover_the_text_with_overlap():
    text = " ".join(f"w{i}" for i in range(25))
    spans = list(chunk_text(text, passage_words=10, overlap_words=3))
    words = [text[a:b].split() for a, b in spans]
    assert [w[0] for w in words] == ["w0", "w7", "w14", "w21"] and words[-1] == ["w21", "w22", "w23", "w24"]
    assert all(len(w) == 10 for w in words[:-1]) and words[0][-3:] == words[1][:3]
    with pytest.raises(UserError, match="overlap_words"):
        list(chunk_text(text, 5, 5))


def test_build_and_bm25_search(docs):
    manifest = build_index([docs / "docs"], docs / "idx", passage_words=120, overlap_words=20, progress=False)
    assert manifest["documents"] == 4 and manifest["passages"] == 3 + 3 and manifest["modes"] == ["bm25"]
    assert set(manifest["files"]) >= {"passages.jsonl", "bm25/params.index.json"}
    index = load_index(docs / "idx")
    [hit] = index.search("which river flows north", k=3)
    assert hit.source_id == f"river#0-{len(DOCS[2]['text'])}" and hit.rank == 1 and hit.score > 0
    passage = next(p for p in index.passages if p.source.endswith("long.txt") and p.start > 0)
    original = (docs / "docs" / "long.txt").read_text()
    assert original[passage.start:passage.end] == passage.text  # offsets point into the document
    assert search_tool(index).call({"query": "Eiffel Paris"}).startswith(f"[1] (tower#0-{len(DOCS[0]['text'])}) The Eiffel")
    assert search_tool(index).call({"query": "zebra"}) == "no passage matches the query"
    with pytest.raises(UserError, match="no dense vectors"):
        index.search("river", mode="dense")


def test_dense_and_hybrid(docs, tiny_checkpoint):
    build_index([docs / "docs" / "facts.jsonl"], docs / "idx", embed_model=tiny_checkpoint, progress=False)
    index = load_index(docs / "idx")
    assert index.modes == ["bm25", "dense", "hybrid"]
    for doc in DOCS:  # a passage's own text is its nearest neighbour (cosine 1), whatever the model
        [best, *_] = index.search(doc["text"], k=3, mode="dense")
        assert best.source_id.startswith(doc["id"] + "#") and best.score == pytest.approx(1.0, abs=1e-5)
        [fused, *_] = index.search(doc["text"], k=3, mode="hybrid")
        assert fused.source_id.startswith(doc["id"] + "#") and fused.score == pytest.approx(2 / 61)


def test_reciprocal_rank_fusion_follows_its_formula():
    fused = reciprocal_rank_fusion([[(7, 9.0), (3, 5.0)], [(3, 0.9), (8, 0.5), (7, 0.1)]], k=3)
    assert fused == [(3, pytest.approx(1 / 62 + 1 / 61)), (7, pytest.approx(1 / 61 + 1 / 63)),
                     (8, pytest.approx(1 / 62))]


def test_bad_inputs_fail_with_one_line_and_leave_the_old_index(docs):
    build_index([docs / "docs" / "facts.jsonl"], docs / "idx", progress=False)
    before = (docs / "idx" / "manifest.json").read_bytes()
    (docs / "empty.txt").write_text("  \n")
    (docs / "blob.txt").write_bytes(bytes(range(256)) * 20)
    with pytest.raises(DataError, match="no text to index"):
        build_index([docs / "empty.txt"], docs / "idx", progress=False)
    with pytest.raises(DataError, match="blob.txt looks binary"):
        build_index([docs / "blob.txt"], docs / "idx", progress=False)
    assert (docs / "idx" / "manifest.json").read_bytes() == before
    (docs / "idx" / "passages.jsonl").write_text("")
    with pytest.raises(DataError, match="passages.jsonl is missing or damaged; rebuild the index"):
        load_index(docs / "idx")
