"""Normalization, heuristic filters (with a parity test of the fast repetition rules against a plain
transcription of Gopher's), language identification and the clean config."""

from __future__ import annotations

import random
import unicodedata
from collections import Counter

import numpy as np
import pytest

from lmstack.config import ConfigError
from lmstack.data.clean import (CleanDoc, HeuristicConfig, HeuristicFilter, LanguageConfig, LanguageFilter,
                                NormalizeConfig, Normalize, StageStats, gopher_heuristics, normalize_text)
from lmstack.data.pipeline import build_stages, run_stages
from lmstack.data.pipeline_config import CleanConfig, apply_config_overrides, config_yaml, load_clean_config

PROSE = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
         "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
         "it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had "
         "everything before us, we had nothing before us, we were all going direct to Heaven, we were all "
         "going direct the other way.")
ENGLISH = ("The history of the island is long and complicated. Settlers arrived in the spring with cattle and "
           "seed, and within a generation they had cleared the forests of the northern valleys, built stone "
           "churches, and established a market town that traded wool and salted fish with the mainland. Storms "
           "wrecked the harbour twice before the council paid for a breakwater, and a school for the children of "
           "fishermen opened in the old customs house, where a retired sailor taught navigation by lamplight.")


# ----------------------------------------------------------------------------- normalization

def test_normalize_nfc_controls_and_whitespace():
    decomposed = "Cafe\u0301 na\u0131\u0308ve"  # e + combining acute
    text = f"  {decomposed}\u00a0and\u200b more\x07 text  \r\n\r\n\r\n\r\nnext\tline   here  \n"
    out = normalize_text(text)
    assert unicodedata.is_normalized("NFC", out)
    assert "\u0301" not in out and "Caf\u00e9" in out
    assert "\x07" not in out and "\u200b" not in out and "\r" not in out
    assert "\u00a0" not in out and "and more text" in out
    assert "\n\n\n" not in out and not out.endswith(" ")
    assert "next\tline here" in out  # interior runs collapse, a tab between words stays a tab
    assert normalize_text(out) == out  # idempotent


def test_normalize_keeps_indentation_and_removes_empty_docs():
    code = "def f(x):\n    if x:\n        return 1\n    return 2"
    assert normalize_text(code) == code
    stats = StageStats("normalize")
    kept = Normalize(NormalizeConfig())([CleanDoc("a", code, "s"), CleanDoc("b", " \x00\u200b \n\n ", "s")], stats)
    assert [d.id for d in kept] == ["a"]
    assert stats.removed == Counter({"empty": 1})


# ----------------------------------------------------------------------------- heuristics: each rule

def _reason(text: str, **overrides) -> str | None:
    return HeuristicFilter(HeuristicConfig(**overrides)).reason(text)


def test_real_prose_passes_default_and_gopher_rules():
    assert _reason(ENGLISH) is None
    assert HeuristicFilter(gopher_heuristics()).reason(ENGLISH) is None


@pytest.mark.parametrize("text, overrides, reason", [
    ("hi", {}, "too_few_chars"),
    ("x" * 100, {"max_chars": 50}, "too_many_chars"),
    ("just two", {"min_chars": 1}, "too_few_words"),
    (ENGLISH, {"max_words": 10}, "too_many_words"),
    (" ".join(["a b c de"] * 20) + " the and", {}, "mean_word_length_low"),
    (" ".join(["incomprehensibilities"] * 60) + " the and", {}, "mean_word_length_high"),
    (ENGLISH + " #tag" * 20, {}, "symbol_word_ratio"),
    ("\n".join(f"- item number {i} of the list and more" for i in range(12)), {}, "bullet_lines"),
    ("\n".join(f"and then the long story of the {w} went on and on through the night ..." for w in "abcdefgh"),
     {}, "ellipsis_lines"),
    (ENGLISH + " 12 34 56 78 90 11 12 13 14 15 16" * 10, {}, "alpha_ratio"),
    (" ".join(f"word{i} alpha beta gamma delta" for i in range(15)), {}, "stop_words"),
    (ENGLISH + " Click here to win.", {}, "blocklist"),
    ("\n".join(["the same line of text and more"] * 10 + [ENGLISH]), {}, "duplicate_lines"),
])
def test_each_rule_has_its_reason(text, overrides, reason):
    assert _reason(text, **overrides) == reason


def test_repetition_rules():
    para = "The quick brown fox and the lazy dog walked to the river together."
    assert _reason("\n\n".join([para] * 4 + [ENGLISH]), max_duplicate_lines_fraction=None,
                   max_duplicate_line_chars_fraction=None) == "duplicate_paragraphs"
    spam = " ".join(["buy the best shoes and hats"] * 40)
    assert _reason(spam) == "top_2gram"
    # a long passage repeated inside one line: duplicated n-grams but no repeated line
    assert _reason(ENGLISH.strip() + " " + PROSE + " " + PROSE, top_ngram_sizes=[], max_top_ngram_chars_fraction=[]
                   ) == "duplicate_5grams"
    # short documents are judged by length only: a repetitive fortune survives
    assert _reason("They used dogs. They used probes. They used bribery.") is None


def test_rules_switch_off_with_none():
    assert _reason("hi", min_chars=None, min_words=None) is None
    assert _reason(ENGLISH + " Click here to win.", blocklist=[]) is None


# ----------------------------------------------------------------------------- parity: fast vs plain rules

def _plain_top_ngram_chars(words, n):
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    if not grams:
        return 0
    gram, count = grams.most_common(1)[0]
    return 0 if count < 2 else (sum(map(len, gram)) + n - 1) * count


def _plain_duplicate_ngram_chars(words, n):  # Gopher / datatrove's greedy scan, verbatim in spirit
    seen, total, i = set(), 0, 0
    while i < len(words) - n + 1:
        gram = "\x00".join(words[i:i + n])
        if gram in seen:
            total += sum(len(w) for w in words[i:i + n])
            i += n
        else:
            seen.add(gram)
            i += 1
    return total


def test_fast_repetition_rules_match_the_plain_transcription():
    from lmstack.data.clean import (_duplicate_ngram_bound, _duplicate_ngram_chars, _ngram_keys,
                                    _top_ngram_chars)

    rng = random.Random(0)
    vocab = ["the", "a", "cat", "sat", "on", "mat", "and", "dog", "ran", "far", "away", "home"]
    for trial in range(300):
        size = rng.choice([3, 5, 8, 12, 30])  # small vocabularies force many repeats
        words = [rng.choice(vocab[:size]) for _ in range(rng.randint(2, 120))]
        keys = np.fromiter(map(hash, words), dtype=np.int64).view(np.uint64)
        lengths = np.array([len(w) for w in words])
        for n in (2, 3, 4):
            if len(words) >= n:
                assert _top_ngram_chars(_ngram_keys(keys, n), lengths, n) == _plain_top_ngram_chars(words, n)
        for n in (5, 6, 7, 8, 9, 10):
            if len(words) >= n:
                k = _ngram_keys(keys, n)
                exact = _duplicate_ngram_chars(k.tolist(), [len(w) for w in words], n)
                assert exact == _plain_duplicate_ngram_chars(words, n)
                assert _duplicate_ngram_bound(k, lengths, n) >= exact


def test_filter_decisions_match_a_plain_gopher_filter_on_random_documents():
    """The whole fast filter against a plain rule-by-rule implementation on generated documents."""
    from lmstack.data.clean import _WORD

    cfg = gopher_heuristics()
    fast = HeuristicFilter(cfg)
    rng = random.Random(1)
    vocab = ENGLISH.split() + ["#", "...", "-", "42", "foo"]

    def plain_repetition(text):
        words = _WORD.findall(text)
        for n, limit in zip(cfg.top_ngram_sizes, cfg.max_top_ngram_chars_fraction):
            if _plain_top_ngram_chars(words, n) / len(text) > limit:
                return f"top_{n}gram"
        for n, limit in zip(cfg.duplicate_ngram_sizes, cfg.max_duplicate_ngram_chars_fraction):
            if _plain_duplicate_ngram_chars(words, n) / len(text) > limit:
                return f"duplicate_{n}grams"
        return None

    agree = 0
    for _ in range(150):
        words = [rng.choice(vocab[: rng.choice([10, 40, len(vocab)])]) for _ in range(rng.randint(50, 200))]
        text = " ".join(words)
        got = fast.reason(text)
        if got is None or got.startswith(("top_", "duplicate_")) and "lines" not in got:
            assert got == plain_repetition(text)
            agree += 1
    assert agree > 50


# ----------------------------------------------------------------------------- language

def test_language_filter_keeps_english_drops_german_and_ignores_short_docs():
    german = ("Die Geschichte der Insel ist lang und kompliziert. Die Siedler kamen im Fruehling mit Vieh und "
              "Saatgut, und innerhalb einer Generation hatten sie die Waelder der noerdlichen Taeler gerodet.") * 2
    docs = [CleanDoc("en", ENGLISH, "s"), CleanDoc("de", german, "s"), CleanDoc("short", "Ich bin ein Berliner.", "s")]
    stats = StageStats("language")
    kept = LanguageFilter(LanguageConfig())(docs, stats)
    assert [d.id for d in kept] == ["en", "short"]
    assert stats.removed["language"] == 1
    assert stats.examples["language"][0]["detail"].startswith("de")
    assert stats.counters["too_short_to_judge"] == 1


# ----------------------------------------------------------------------------- config

def test_config_file_overrides_and_validation(tmp_path):
    f = tmp_path / "clean.yaml"
    f.write_text("heuristics:\n  min_words: 7\n  blocklist: [spam]\ndedup:\n  threshold: 0.6\n")
    cfg = load_clean_config(f, ["dedup.bands=10", "language.enabled=false"])
    assert cfg.heuristics.min_words == 7 and cfg.heuristics.blocklist == ["spam"]
    assert cfg.dedup.threshold == 0.6 and cfg.dedup.bands == 10 and cfg.language.enabled is False
    toml = tmp_path / "clean.toml"
    toml.write_text("[pii]\ntypes = ['email']\n")
    assert load_clean_config(toml).pii.types == ["email"]

    with pytest.raises(ConfigError, match=r"unknown key 'heuristics.min_word'.*min_words"):
        load_clean_config(None, ["heuristics.min_word=3"])
    with pytest.raises(ConfigError, match=r"unknown config section 'dedupe'.*dedup"):
        load_clean_config(None, ["dedupe.threshold=0.5"])
    with pytest.raises(ConfigError, match=r"dedup.threshold=1.5"):
        load_clean_config(None, ["dedup.threshold=1.5"])
    with pytest.raises(ConfigError, match=r"heuristics.max_duplicate_lines_fraction=2.0"):
        load_clean_config(None, ["heuristics.max_duplicate_lines_fraction=2"])
    with pytest.raises(ConfigError, match=r"expected a value of type int"):
        load_clean_config(None, ["heuristics.min_words=many"])
    with pytest.raises(ConfigError, match=r"min_words=500 is larger than heuristics.max_words=100"):
        load_clean_config(None, ["heuristics.min_words=500", "heuristics.max_words=100"])
    with pytest.raises(ConfigError, match=r"pii.types has unknown kind"):
        load_clean_config(None, ["pii.types=email,passport"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("heuristics: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml could not be parsed"):
        load_clean_config(bad)


def test_printed_config_round_trips():
    import yaml

    cfg = apply_config_overrides(CleanConfig(), ["dedup.threshold=0.65", "heuristics.min_chars=null"])
    text = config_yaml(cfg)
    again = CleanConfig.from_dict(yaml.safe_load(text))
    assert again.to_dict() == cfg.to_dict()


def test_run_stages_in_memory():
    cfg = CleanConfig()
    cfg.decontam.enabled = False
    docs = [CleanDoc("good", ENGLISH + " Write to jane@example.org.", "s"), CleanDoc("bad", "x", "s")]
    kept, stats = run_stages(docs, build_stages(cfg))
    assert [d.id for d in kept] == ["good"]
    assert "<EMAIL>" in kept[0].text
    by_name = {s.name: s for s in stats}
    assert by_name["heuristics"].removed == Counter({"too_few_chars": 1})
    assert by_name["pii"].counters["email"] == 1
    assert by_name["normalize"].docs_in == 2 and by_name["pii"].docs_out == 1
