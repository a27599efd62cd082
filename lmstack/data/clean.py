"""Text normalization and heuristic quality filters: the cheap, per-document half of `lmstack data clean`.

Every stage here is a pure function over a batch of documents (see :class:`Stage`): it reads nothing but
its config and the batch, keeps no state between batches, and reports what it removed with a reason code.
That is what lets :mod:`lmstack.data.pipeline` run the same stages in one process, in N worker processes,
or (later) as a map step of a distributed engine.

Stages defined here:

* :class:`Normalize` -- Unicode NFC (or NFKC), ``\\r\\n`` -> ``\\n``, control and zero-width characters
  removed, exotic spaces mapped to a plain space, runs of spaces inside a line collapsed (leading
  indentation is kept so code and verse survive), trailing spaces stripped, at most one blank line in a
  row. Documents that end up empty are removed (``empty``).
* :class:`HeuristicFilter` -- the Gopher rules (Rae et al. 2021, table A1) plus a stop-word check and a
  keyword blocklist, each with its own threshold (``None`` switches a rule off) and reason code:
  length in words and characters, mean word length, symbol-to-word ratio (``#`` and ellipses),
  bullet-line and ellipsis-line shares, alphabetic-word ratio, stop words, duplicate line / paragraph
  fractions, top 2-4-gram character fractions and duplicated 5-10-gram character fractions.
* :class:`LanguageFilter` -- language identification with py3langid (its model ships inside the
  package, nothing is downloaded).

Non-obvious choices (and how they differ from datatrove's GopherQualityFilter/GopherRepetitionFilter):

* Words are whitespace tokens; the word-length and n-gram rules use them with surrounding punctuation
  stripped (``"be,"`` -> ``"be"``). datatrove runs a spaCy tokenizer, which is most of its cost; the
  alphabetic-word rule on whitespace tokens is closer to the paper's wording ("80% of words contain an
  alphabetic character") than counting punctuation marks as words.
* The ratio and repetition rules only judge documents of at least ``rules_min_words`` words (50, Gopher's
  own minimum document length); shorter ones -- a line of verse, a one-line fortune -- are judged by
  length, alphabetic ratio and the blocklist only. ``gopher_heuristics()`` sets it to 0.
* The top-n-gram rule only looks at n-grams that occur at least twice: a 3-word fortune has a "top
  2-gram" covering half of its characters, which is not repetition.
* The duplicated-n-gram rule is Gopher's greedy scan (a repeated n-gram's characters count once, the
  scan then jumps past it), as in datatrove. n-grams are hashed with numpy; the union of all repeated
  windows bounds the scan's result from above and shrinks as n grows, so one cheap bound usually
  clears all six rules and the exact scan runs only on documents near a threshold. That and doing
  the cheap rules first is where the speed comes from (tests pin the fast path to a plain version).

Run ``lmstack data clean --print-config`` to see every threshold with its default.
"""

from __future__ import annotations

import dataclasses
import re
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from lmstack.config import ConfigError

# ----------------------------------------------------------------------------- stage protocol


class Doc(Protocol):  # lmstack.data.readers.Document and CleanDoc satisfy this
    id: str
    text: str
    source: str


@dataclass(frozen=True)
class CleanDoc:
    """A document on its way through the pipeline: ``meta`` collects what stages add to the output record
    (``cluster_id``, ``contamination``, ``quality_score``, ``perplexity``)."""

    id: str
    text: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, doc: Doc) -> "CleanDoc":
        return doc if isinstance(doc, CleanDoc) else cls(str(doc.id), doc.text, str(doc.source))

    def record(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "source": self.source, **self.meta}


@dataclass
class StageStats:
    """What one stage did to the documents that reached it; mergeable across batches and workers."""

    name: str
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    removed: Counter = field(default_factory=Counter)  # reason code -> documents removed
    counters: Counter = field(default_factory=Counter)  # stage-specific counts (PII per type, ...)
    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # reason -> a few removed docs

    def remove(self, doc: Doc, reason: str, max_examples: int = 3, detail: str = "") -> None:
        self.removed[reason] += 1
        shelf = self.examples.setdefault(reason, [])
        if len(shelf) < max_examples:
            example = {"id": str(doc.id), "source": str(doc.source), "text": doc.text[:400]}
            if detail:
                example["detail"] = detail
            shelf.append(example)

    def merge(self, other: "StageStats", max_examples: int = 3) -> None:
        self.docs_in += other.docs_in
        self.docs_out += other.docs_out
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.seconds += other.seconds
        self.removed.update(other.removed)
        self.counters.update(other.counters)
        for reason, shelf in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(shelf[: max(0, max_examples - len(mine))])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "docs_in": self.docs_in, "docs_out": self.docs_out, "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "seconds": round(self.seconds, 4), "removed": dict(self.removed),
                "counters": dict(self.counters), "examples": self.examples}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StageStats":
        return cls(name=d["name"], docs_in=d["docs_in"], docs_out=d["docs_out"], bytes_in=d["bytes_in"],
                   bytes_out=d["bytes_out"], seconds=d["seconds"], removed=Counter(d["removed"]),
                   counters=Counter(d["counters"]), examples=d["examples"])


def text_bytes(docs: Sequence[Doc]) -> int:
    return sum(len(d.text.encode("utf-8", "surrogatepass")) for d in docs)


class Stage:
    """A pure function over a batch: ``stage(docs, stats) -> kept docs`` (possibly with new text).

    Subclasses implement :meth:`process`; :meth:`__call__` adds the accounting (documents and bytes in and
    out, time) so every stage is measured the same way.
    """

    name: str = "stage"
    max_examples: int = 3

    def process(self, docs: list[Doc], stats: StageStats) -> list[Doc]:
        raise NotImplementedError

    def __call__(self, docs: list[Doc], stats: StageStats) -> list[Doc]:
        t0 = time.perf_counter()
        stats.docs_in += len(docs)
        stats.bytes_in += text_bytes(docs)
        out = self.process(docs, stats)
        stats.docs_out += len(out)
        stats.bytes_out += text_bytes(out)
        stats.seconds += time.perf_counter() - t0
        return out


class FilterStage(Stage):
    """A stage that keeps or removes whole documents; subclasses implement ``reason(text)``."""

    def reason(self, text: str) -> str | None:
        raise NotImplementedError

    def process(self, docs: list[Doc], stats: StageStats) -> list[Doc]:
        kept = []
        for doc in docs:
            why = self.reason(doc.text)
            if why is None:
                kept.append(doc)
            else:
                stats.remove(doc, why, self.max_examples)
        return kept


def _check_fraction(section: str, name: str, value: float | None) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise ConfigError(f"{section}.{name}={value} must be a fraction in [0, 1] (or null to switch the rule off)")


def _check_nonnegative(section: str, name: str, value: float | None) -> None:
    if value is not None and value < 0:
        raise ConfigError(f"{section}.{name}={value} must be >= 0 (or null to switch the rule off)")


# ----------------------------------------------------------------------------- normalization


@dataclass
class NormalizeConfig:
    """Unicode and whitespace normalization; runs before every filter."""

    unicode_form: str = "NFC"  # NFC | NFKC | none
    remove_control: bool = True  # C0/C1 controls (except tab and newline), zero-width characters, BOM
    whitespace: bool = True  # exotic spaces -> ' ', collapse runs inside lines, strip line ends, <= 1 blank line

    def validate(self) -> None:
        if self.unicode_form not in ("NFC", "NFKC", "none"):
            raise ConfigError(f"normalize.unicode_form={self.unicode_form!r}: choose NFC, NFKC or none")


def _control_table() -> dict[int, None]:
    table: dict[int, None] = {}
    for cp in list(range(0x00, 0x20)) + list(range(0x7F, 0xA0)):
        if chr(cp) not in "\t\n":
            table[cp] = None
    for cp in (0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF, 0x00AD):  # zero-width, word joiner, BOM, soft hyphen
        table[cp] = None
    return table


_CONTROL_TABLE = _control_table()
_INNER_SPACES = re.compile(r"(?<=\S)[^\S\n]{2,}")  # runs of 2+ spaces after a non-space (indentation kept)
_EXOTIC_SPACES = re.compile(r"[^\S\n\t ]")  # nbsp, em space, ideographic space, vertical tab, ...
_TRAILING_SPACES = re.compile(r"[^\S\n]+(?=\n|\Z)")
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize_text(text: str, cfg: NormalizeConfig | None = None) -> str:
    """The normalized form of ``text`` (idempotent: normalizing twice changes nothing)."""
    cfg = cfg or NormalizeConfig()
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.isascii():
        if cfg.unicode_form != "none":
            text = unicodedata.normalize(cfg.unicode_form, text)
        if cfg.whitespace:
            text = _EXOTIC_SPACES.sub(" ", text)
    if cfg.remove_control:
        text = text.translate(_CONTROL_TABLE)
    if cfg.whitespace:
        text = _INNER_SPACES.sub(" ", text)
        text = _TRAILING_SPACES.sub("", text)
        text = _BLANK_RUNS.sub("\n\n", text)
        text = text.strip("\n")
    return text


class Normalize(Stage):
    name = "normalize"

    def __init__(self, cfg: NormalizeConfig):
        self.cfg = cfg

    def process(self, docs: list[Doc], stats: StageStats) -> list[Doc]:
        kept = []
        for doc in docs:
            text = normalize_text(doc.text, self.cfg)
            if "\ufffd" in text:  # the reader replaced undecodable bytes; counted per file there too
                stats.counters["docs_with_replacement_chars"] += 1
            if text != doc.text:
                stats.counters["docs_changed"] += 1
                doc = dataclasses.replace(doc, text=text)
            if not text.strip():
                stats.remove(doc, "empty", self.max_examples)
            else:
                kept.append(doc)
        return kept


# ----------------------------------------------------------------------------- heuristic filters

GOPHER_STOP_WORDS = ["the", "be", "to", "of", "and", "that", "have", "with"]
DEFAULT_BLOCKLIST = ["lorem ipsum", "click here to", "enable javascript", "accept cookies", "cookie policy",
                     "add to cart", "viagra", "online casino"]
# Stripped from both ends of a word before measuring it ("be," -> "be"); the ASCII set plus common
# typographic quotes, dashes and brackets.
_PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~" + "\u2018\u2019\u201c\u201d\u2013\u2014\u2026\u00ab\u00bb\u00bf\u00a1"
_BULLETS = ("-", "*", "\u2022", "\u00b7", "\u2023", "\u25e6", "\u25aa", "\u2013", "\u2014")
_ELLIPSES = ("...", "\u2026")
_NON_ALPHA_WORD = re.compile(r"(?<!\S)(?:[^\w\s]|[\d_])+(?!\S)")  # a whitespace token with no letter in it
_PARAGRAPH_SPLIT = re.compile(r"\n{2,}")
_P = re.escape(_PUNCT)
# a whitespace token with the punctuation at both ends stripped ("be," -> "be"); punctuation-only tokens vanish
_WORD = re.compile(rf"(?<!\S)[{_P}]*([^\s{_P}](?:\S*[^\s{_P}])?)[{_P}]*(?!\S)")
_NGRAM_MULT = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class HeuristicConfig:
    """Rule-based filters; each threshold is switched off with null/None. Reason codes in brackets.

    Defaults are tuned for mixed literary text (verse, scripture, short quotations); the ``gopher``
    values (Rae et al. 2021) are in :func:`gopher_heuristics` and stricter about length.
    """

    enabled: bool = True
    min_words: int | None = 3  # [too_few_words]
    max_words: int | None = 200_000  # [too_many_words]
    min_chars: int | None = 16  # [too_few_chars]
    max_chars: int | None = 2_000_000  # [too_many_chars]
    min_mean_word_length: float | None = 2.5  # [mean_word_length_low] letters per word, punctuation stripped
    max_mean_word_length: float | None = 12.0  # [mean_word_length_high]
    max_symbol_word_ratio: float | None = 0.1  # [symbol_word_ratio] '#' or ellipses per word
    max_bullet_lines_ratio: float | None = 0.9  # [bullet_lines] share of lines starting with a bullet
    max_ellipsis_lines_ratio: float | None = 0.3  # [ellipsis_lines] share of lines ending in an ellipsis
    min_alpha_words_ratio: float | None = 0.7  # [alpha_ratio] share of words with at least one letter
    min_stop_words: int | None = 2  # [stop_words] distinct stop words a document must contain
    rules_min_words: int = 50  # shorter documents are judged only by length, alphabetic ratio and blocklist
    stop_words: list[str] = field(default_factory=lambda: list(GOPHER_STOP_WORDS))
    max_duplicate_lines_fraction: float | None = 0.3  # [duplicate_lines]
    max_duplicate_line_chars_fraction: float | None = 0.2  # [duplicate_line_chars]
    max_duplicate_paragraphs_fraction: float | None = 0.3  # [duplicate_paragraphs]
    max_duplicate_paragraph_chars_fraction: float | None = 0.2  # [duplicate_paragraph_chars]
    top_ngram_sizes: list[int] = field(default_factory=lambda: [2, 3, 4])  # [top_Ngram]
    max_top_ngram_chars_fraction: list[float] = field(default_factory=lambda: [0.20, 0.18, 0.16])
    duplicate_ngram_sizes: list[int] = field(default_factory=lambda: [5, 6, 7, 8, 9, 10])  # [duplicate_Ngrams]
    max_duplicate_ngram_chars_fraction: list[float] = field(
        default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10])
    blocklist: list[str] = field(default_factory=lambda: list(DEFAULT_BLOCKLIST))  # [blocklist] case-insensitive
    blocklist_file: str | None = None  # more blocklist entries, one per line ('#' comments)
    max_blocklist_hits: int = 0  # remove a document with more hits than this

    def validate(self) -> None:
        s = "heuristics"
        for name in ("min_words", "max_words", "min_chars", "max_chars", "min_mean_word_length",
                     "max_mean_word_length", "max_symbol_word_ratio", "min_stop_words", "max_blocklist_hits",
                     "rules_min_words"):
            _check_nonnegative(s, name, getattr(self, name))
        for name in ("max_bullet_lines_ratio", "max_ellipsis_lines_ratio", "min_alpha_words_ratio",
                     "max_duplicate_lines_fraction", "max_duplicate_line_chars_fraction",
                     "max_duplicate_paragraphs_fraction", "max_duplicate_paragraph_chars_fraction"):
            _check_fraction(s, name, getattr(self, name))
        for lo, hi in (("min_words", "max_words"), ("min_chars", "max_chars"),
                       ("min_mean_word_length", "max_mean_word_length")):
            a, b = getattr(self, lo), getattr(self, hi)
            if a is not None and b is not None and a > b:
                raise ConfigError(f"{s}.{lo}={a} is larger than {s}.{hi}={b}")
        for sizes, fracs in (("top_ngram_sizes", "max_top_ngram_chars_fraction"),
                             ("duplicate_ngram_sizes", "max_duplicate_ngram_chars_fraction")):
            ns, fs = getattr(self, sizes), getattr(self, fracs)
            if len(ns) != len(fs):
                raise ConfigError(f"{s}.{sizes} has {len(ns)} entries but {s}.{fracs} has {len(fs)}; "
                                  "give one fraction per n-gram size")
            if any(n < 1 for n in ns):
                raise ConfigError(f"{s}.{sizes}={ns}: n-gram sizes must be >= 1")
            for f in fs:
                _check_fraction(s, fracs, f)
        if self.blocklist_file and not Path(self.blocklist_file).is_file():
            raise ConfigError(f"{s}.blocklist_file={self.blocklist_file!r} does not exist")


def gopher_heuristics() -> HeuristicConfig:
    """The thresholds of Gopher's table A1 as datatrove implements them (used by the benchmark)."""
    return HeuristicConfig(min_words=50, max_words=100_000, min_chars=None, max_chars=None,
                           min_mean_word_length=3, max_mean_word_length=10, min_alpha_words_ratio=0.8,
                           min_stop_words=2, rules_min_words=0, blocklist=[])


def load_blocklist(cfg: HeuristicConfig) -> list[str]:
    words = [w.strip() for w in cfg.blocklist if w.strip()]
    if cfg.blocklist_file:
        for line in Path(cfg.blocklist_file).read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                words.append(line)
    return words


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(repeated elements, characters in the repeats): every occurrence after the first counts."""
    counts = Counter(items)
    repeated = len(items) - len(counts)
    if not repeated:
        return 0, 0
    return repeated, sum(len(s) * (c - 1) for s, c in counts.items() if c > 1)


def _top_ngram_chars(keys: np.ndarray, word_len: np.ndarray, n: int) -> int:
    """Characters covered by the most frequent n-gram (only if it occurs twice or more).

    ``keys`` hashes the n-gram starting at each word. Ties go to the n-gram seen first, as with
    ``Counter.most_common``. Characters = its words plus the n-1 spaces between them, times its count.
    """
    _, first, counts = np.unique(keys, return_index=True, return_counts=True)
    top = counts.max()
    if top < 2:
        return 0
    start = int(first[counts == top].min())
    return (int(word_len[start:start + n].sum()) + n - 1) * int(top)


def _duplicate_ngram_bound(keys: np.ndarray, word_len: np.ndarray, n: int) -> int:
    """An upper bound on :func:`_duplicate_ngram_chars`, in a few numpy calls.

    The greedy scan only ever counts windows that are not first occurrences, and never two that
    overlap, so the characters under the union of all non-first windows bound it from above; the
    exact scan runs only when the bound could cross a threshold.
    """
    _, first = np.unique(keys, return_index=True)
    if len(first) == len(keys):
        return 0
    repeated = np.ones(len(keys), dtype=bool)
    repeated[first] = False
    starts = np.flatnonzero(repeated)
    cover = np.zeros(len(word_len) + 1, dtype=np.int32)
    np.add.at(cover, starts, 1)
    np.add.at(cover, starts + n, -1)
    return int(word_len[np.cumsum(cover[:-1]) > 0].sum())


def _duplicate_ngram_chars(keys: list[int], word_len: list[int], n: int) -> int:
    """Gopher's duplicated n-gram characters: a greedy scan that, at an n-gram seen before, counts its
    characters (words joined without spaces, as datatrove does) and jumps past it."""
    seen: set[int] = set()
    total, i, end = 0, 0, len(keys)
    while i < end:
        key = keys[i]
        if key in seen:
            total += sum(word_len[i:i + n])
            i += n
        else:
            seen.add(key)
            i += 1
    return total


def _ngram_keys(word_keys: np.ndarray, n: int) -> np.ndarray:
    """Per-document hash of the n-gram starting at each word (wrapping uint64 polynomial)."""
    count = len(word_keys) - n + 1
    acc = word_keys[:count].copy()
    for k in range(1, n):
        acc *= _NGRAM_MULT
        acc += word_keys[k:k + count]
    return acc


class HeuristicFilter(FilterStage):
    name = "heuristics"

    def __init__(self, cfg: HeuristicConfig):
        self.cfg = cfg
        self.stop_words = frozenset(w.lower() for w in cfg.stop_words)
        blocked = load_blocklist(cfg)
        self.blocklist_re = (re.compile(r"(?<!\w)(?:" + "|".join(re.escape(w) for w in blocked) + r")(?!\w)",
                                        re.IGNORECASE) if blocked else None)
        self.top_rules = [(n, f) for n, f in zip(cfg.top_ngram_sizes, cfg.max_top_ngram_chars_fraction)
                          if f is not None]
        self.dup_rules = sorted((n, f) for n, f in zip(cfg.duplicate_ngram_sizes, cfg.max_duplicate_ngram_chars_fraction)
                                if f is not None)

    def reason(self, text: str) -> str | None:  # noqa: C901 - one rule after another, cheapest first
        c = self.cfg
        n_chars = len(text)
        if n_chars == 0:
            return "empty"
        if c.min_chars is not None and n_chars < c.min_chars:
            return "too_few_chars"
        if c.max_chars is not None and n_chars > c.max_chars:
            return "too_many_chars"
        n_tokens = len(text.split())
        if n_tokens == 0:
            return "too_few_words"
        words = _WORD.findall(text)
        n_words = len(words)
        if c.min_words is not None and n_words < c.min_words:
            return "too_few_words"
        if c.max_words is not None and n_words > c.max_words:
            return "too_many_words"
        if c.min_alpha_words_ratio is not None:
            non_alpha = len(_NON_ALPHA_WORD.findall(text))
            if (n_tokens - non_alpha) / n_tokens < c.min_alpha_words_ratio:
                return "alpha_ratio"
        if self.blocklist_re is not None and len(self.blocklist_re.findall(text)) > c.max_blocklist_hits:
            return "blocklist"
        if n_words < c.rules_min_words:
            return None
        word_len = list(map(len, words))
        total_len = sum(word_len)
        if n_words:
            mean_len = total_len / n_words
            if c.min_mean_word_length is not None and mean_len < c.min_mean_word_length:
                return "mean_word_length_low"
            if c.max_mean_word_length is not None and mean_len > c.max_mean_word_length:
                return "mean_word_length_high"
        if c.max_symbol_word_ratio is not None:
            hashes = text.count("#")
            ellipses = text.count("...") + text.count("\u2026")
            if max(hashes, ellipses) / n_tokens > c.max_symbol_word_ratio:
                return "symbol_word_ratio"
        lines = [ln for ln in text.split("\n") if ln.strip()]
        if lines and c.max_bullet_lines_ratio is not None:
            bullets = sum(1 for ln in lines if ln.lstrip().startswith(_BULLETS))
            if bullets / len(lines) > c.max_bullet_lines_ratio:
                return "bullet_lines"
        if lines and c.max_ellipsis_lines_ratio is not None:
            ends = sum(1 for ln in lines if ln.rstrip().endswith(_ELLIPSES))
            if ends / len(lines) > c.max_ellipsis_lines_ratio:
                return "ellipsis_lines"
        if c.min_stop_words and len(self.stop_words.intersection(map(str.lower, words))) < c.min_stop_words:
            return "stop_words"
        return self._repetition_reason(text, lines, words, word_len)

    def _repetition_reason(self, text: str, lines: list[str], words: list[str], word_len: list[int]) -> str | None:
        c = self.cfg
        n_chars = len(text)
        if c.max_duplicate_paragraphs_fraction is not None or c.max_duplicate_paragraph_chars_fraction is not None:
            paragraphs = _PARAGRAPH_SPLIT.split(text)
            if len(paragraphs) > 1:
                dup, dup_chars = _duplicates(paragraphs)
                if c.max_duplicate_paragraphs_fraction is not None and \
                        dup / len(paragraphs) > c.max_duplicate_paragraphs_fraction:
                    return "duplicate_paragraphs"
                if c.max_duplicate_paragraph_chars_fraction is not None and \
                        dup_chars / n_chars > c.max_duplicate_paragraph_chars_fraction:
                    return "duplicate_paragraph_chars"
        if lines and (c.max_duplicate_lines_fraction is not None or c.max_duplicate_line_chars_fraction is not None):
            dup, dup_chars = _duplicates(lines)
            if c.max_duplicate_lines_fraction is not None and dup / len(lines) > c.max_duplicate_lines_fraction:
                return "duplicate_lines"
            if c.max_duplicate_line_chars_fraction is not None and \
                    dup_chars / n_chars > c.max_duplicate_line_chars_fraction:
                return "duplicate_line_chars"
        if len(words) < 2 or not (self.top_rules or self.dup_rules):
            return None
        # Python's str hash is stable within a process, which is all a per-document n-gram key needs
        word_keys = np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)
        if len(np.unique(_ngram_keys(word_keys, 2))) == len(words) - 1:
            return None  # no 2-gram repeats, so no longer n-gram does either
        lengths = np.array(word_len, dtype=np.int64)
        for n, limit in self.top_rules:
            if len(words) >= n and _top_ngram_chars(_ngram_keys(word_keys, n), lengths, n) / n_chars > limit:
                return f"top_{n}gram"
        if self.dup_rules and len(words) >= self.dup_rules[0][0]:
            # the bound shrinks as n grows (a repeated (n+1)-gram is made of repeated n-grams), so one
            # bound at the smallest n below the smallest threshold clears every rule at once
            smallest = self.dup_rules[0][0]
            bound = _duplicate_ngram_bound(_ngram_keys(word_keys, smallest), lengths, smallest) / n_chars
            if bound <= min(limit for _, limit in self.dup_rules):
                return None
            for n, limit in self.dup_rules:
                if len(words) < n:
                    break
                keys = _ngram_keys(word_keys, n)
                if n != smallest and _duplicate_ngram_bound(keys, lengths, n) / n_chars <= limit:
                    continue
                if _duplicate_ngram_chars(keys.tolist(), word_len, n) / n_chars > limit:
                    return f"duplicate_{n}grams"
        return None


# ----------------------------------------------------------------------------- language identification


@dataclass
class LanguageConfig:
    """Language identification with py3langid (model inside the package; no download)."""

    enabled: bool = True
    languages: list[str] = field(default_factory=lambda: ["en"])  # ISO 639-1 codes to keep
    min_score: float = 0.5  # [language] keep when the top language is allowed with at least this probability
    min_chars: int = 200  # shorter documents are not judged: identification is unreliable on a line of verse
    max_chars: int = 1000  # only this many leading characters are read (speed)

    def validate(self) -> None:
        _check_fraction("language", "min_score", self.min_score)
        if self.enabled and not self.languages:
            raise ConfigError("language.languages is empty; list the codes to keep (e.g. [en]) "
                              "or set language.enabled=false")
        if self.min_chars < 0 or self.max_chars < 1:
            raise ConfigError("language.min_chars must be >= 0 and language.max_chars >= 1")


_LANGID = None


def language_identifier():
    """The py3langid identifier with normalized probabilities (loaded once per process, ~0.4 s)."""
    global _LANGID
    if _LANGID is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        _LANGID = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return _LANGID


class LanguageFilter(FilterStage):
    name = "language"

    def __init__(self, cfg: LanguageConfig):
        self.cfg = cfg
        self.allowed = frozenset(cfg.languages)
        self.identifier = language_identifier()

    def process(self, docs: list[Doc], stats: StageStats) -> list[Doc]:
        kept = []
        for doc in docs:
            text = doc.text
            if len(text) < self.cfg.min_chars:
                stats.counters["too_short_to_judge"] += 1
                kept.append(doc)
                continue
            lang, score = self.identifier.classify(text[: self.cfg.max_chars])
            stats.counters[f"lang_{lang}"] += 1
            if lang in self.allowed and score >= self.cfg.min_score:
                kept.append(doc)
            else:
                stats.remove(doc, "language", self.max_examples, detail=f"{lang} p={score:.2f}")
        return kept
