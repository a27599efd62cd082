"""Deduplication: MinHash and LSH parity with datasketch, keep-first exact/near/line decisions with
cluster ids, and precision/recall on a generated near-duplicate set."""

from __future__ import annotations

import numpy as np
import pytest

from lmstack.data.dedup import (EXACT, KEEP, NEAR, BandIndex, DatasketchIndex, DedupConfig, DedupIndex, MinHasher,
                                cut_spans, dedup_documents, dedup_keys, near_dedup_quality,
                                synthetic_near_duplicates, unit_spans)

BASE = ("the old man walked slowly along the shore of the quiet bay collecting shells and speaking softly to "
        "the gulls that followed him every morning since the storm had taken his boat and his brother away")


def test_minhash_signature_matches_datasketch():
    from datasketch import MinHash

    hasher = MinHasher(num_perm=64, seed=7, shingle_size=3)
    for text in [BASE, "one two", "", "a b c d e f g h " * 50]:
        shingles = hasher.shingles(text)
        reference = MinHash(num_perm=64, seed=7, scheme="affine32", hashfunc=int)
        reference.update_batch(shingles.tolist())
        assert np.array_equal(hasher.signature(text), reference.hashvalues)


def test_band_index_returns_the_same_candidates_as_datasketch_lsh():
    texts, _ = synthetic_near_duplicates(families=40, variants=3, seed=3)
    cfg = DedupConfig(bands=10, rows=4)
    hasher = MinHasher(cfg.num_perm, cfg.seed, cfg.shingle_size)
    sigs = np.stack([hasher.signature(t) for t in texts])
    fast, reference = BandIndex(cfg.bands, cfg.rows), DatasketchIndex(cfg)
    fast_keys = fast.band_keys(sigs).tolist()
    for i, sig in enumerate(sigs):
        assert fast.query(fast_keys[i]) == reference.query(sig)
        if i % 2 == 0:  # index only some, so queries see a partial index
            fast.insert(i, fast_keys[i])
            reference.insert(i, sig)


def test_keep_first_exact_and_near_with_cluster_representatives():
    variant = BASE.replace("slowly", "quietly")  # one word of 34: Jaccard of 5-shingles ~0.75-0.85
    texts = [BASE, "something else entirely, about trains and timetables and the weather in late spring " * 3,
             BASE.upper() + "  ", variant, BASE + " and then he went home to sleep"]
    cfg = DedupConfig(threshold=0.7, lines=False)
    kept, decisions = dedup_documents(texts, cfg)
    assert kept == [0, 1]
    assert decisions.status.tolist() == [KEEP, KEEP, EXACT, NEAR, NEAR]
    assert decisions.representative.tolist() == [-1, -1, 0, 0, 0]
    assert decisions.similarity[2] == 1.0 and 0.7 <= decisions.similarity[3] < 1.0


def test_exact_and_near_can_be_switched_off():
    texts = [BASE, BASE, BASE + " extra words at the end"]
    assert dedup_documents(texts, DedupConfig(exact=False, near=False, lines=False))[0] == [0, 1, 2]
    assert dedup_documents(texts, DedupConfig(near=False, lines=False))[0] == [0, 2]


def test_index_is_incremental_across_batches():
    cfg = DedupConfig(lines=False)
    index = DedupIndex(cfg)
    first = index.add_batch(dedup_keys([BASE, "unrelated text about cooking pasta with garlic and olive oil"], cfg))
    second = index.add_batch(dedup_keys(["a third unrelated note on birds", BASE], cfg))
    assert first.status.tolist() == [KEEP, KEEP]
    assert second.status.tolist() == [KEEP, EXACT] and second.representative[1] == 0
    assert index.clusters == 1 and index.cluster_sizes[0] == 2


def test_line_dedup_cuts_lines_seen_in_earlier_documents_only():
    boiler = "This text is distributed under the terms of the license found at the end of the volume."
    a = f"Chapter one begins here with a storm.\n{boiler}\nShort line.\nShort line."
    b = f"A different story starts in the desert.\n{boiler}\nShort line.\nThe camels were tired and thirsty."
    cfg = DedupConfig(near=False, line_min_chars=40)
    kept, decisions = dedup_documents([a, b], cfg)
    assert kept == [0, 1]
    assert 0 not in decisions.drop_spans  # repeats inside the first document stay
    spans = decisions.drop_spans[1]
    assert len(spans) == 1 and b[spans[0][0]:spans[0][1]] == boiler
    assert cut_spans(b, spans) == ("A different story starts in the desert.\nShort line.\n"
                                   "The camels were tired and thirsty.")


def test_sentence_units_and_cut_spans_keep_indentation():
    text = "One sentence here. Two sentence there! Three is last.\n    indented code line stays"
    spans = unit_spans(text, "sentence", 3)
    assert [text[s:e].strip() for s, e, _ in spans][:3] == ["One sentence here.", "Two sentence there!",
                                                             "Three is last."]
    middle = spans[1][:2]
    assert cut_spans(text, [middle]) == "One sentence here. Three is last.\n    indented code line stays"
    whole = unit_spans("first line\n    second line\nthird", "line", 1)
    assert cut_spans("first line\n    second line\nthird", [whole[0][:2]]) == "    second line\nthird"


def test_near_duplicate_precision_and_recall_on_generated_set():
    texts, families = synthetic_near_duplicates(families=120, variants=4, seed=11)
    result = near_dedup_quality(texts, families, DedupConfig(lines=False))
    assert result["true_duplicates"] > 100
    assert result["precision"] >= 0.9 and result["recall"] >= 0.85, result


@pytest.mark.parametrize("bad", [{"bands": 0}, {"threshold": 0}, {"line_unit": "word"}, {"lsh": "faiss"}])
def test_config_validation(bad):
    from lmstack.config import ConfigError

    with pytest.raises(ConfigError, match="dedup."):
        DedupConfig(**bad).validate()
