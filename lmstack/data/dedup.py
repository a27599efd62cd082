"""De-duplication: exact (document and line/sentence level) and near-duplicate documents (MinHash LSH).

Deduplication is the one part of cleaning that needs to see the whole dataset, so it is split in two:

1. **map** (:func:`dedup_keys`, pure, runs in the workers next to the filters): for every document
   compute an exact-match hash of its normalized text, a MinHash signature of its word shingles, and a
   hash per line (or sentence). Nothing here depends on other documents.
2. **reduce** (:class:`DedupIndex`, sequential, in the main process): walk the documents in input order
   and decide. Keep-first policy: the first document of a group is kept and becomes the cluster's
   representative; later exact copies (``dedup_exact``) and near copies (``dedup_near``) are removed
   and recorded with the representative's id as ``cluster_id``. Lines/sentences of a kept document
   that already appeared in an earlier kept document are removed from it (``lines_removed``);
   repeats inside one document are left to the Gopher repetition rules.

Near duplicates: words are lower-cased ``\\w+`` tokens, shingles are word n-grams (``shingle_size``),
and a signature has ``bands * rows`` MinHash values. Signatures are computed exactly as datasketch's
``MinHash(scheme="affine32")`` would compute them from the same 32-bit shingle hashes (a test pins
this), but vectorized over all shingles of a document at once; the LSH index is datasketch's
``MinHashLSH`` with ``params=(bands, rows)``. A candidate pair from the index is confirmed only if
the signatures agree on at least ``threshold`` of their values (estimated Jaccard similarity), so
the band layout sets recall and the threshold sets precision.

Scale: the reduce step keeps one 64-bit hash per distinct document and line, plus the signatures of
kept documents (4 bytes x bands x rows each) -- about 0.5 KB per document with the defaults, i.e.
a few GB for ten million documents. ``data clean`` runs the same decisions as a shuffle of rank/world_size
tasks instead (lmstack.data.dedup_stages: keys partitioned by hash range and LSH bucket, candidate pairs,
one clustering task that replays this keep-first rule), so they run on worker processes or a Ray cluster;
a test pins them to :class:`DedupIndex`. The map step is the same for both.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from lmstack.config import ConfigError

# ----------------------------------------------------------------------------- stable hashing

_WORD_RE = re.compile(r"\w+")
_WORD_HASH_CACHE: dict[str, int] = {}
_WORD_HASH_CACHE_LIMIT = 2_000_000
_NGRAM_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (golden ratio)


def match_words(text: str) -> list[str]:
    """Lower-cased word tokens used for every matching purpose (dedup, decontamination, features)."""
    return _WORD_RE.findall(text.lower())


def stable_hash(text: str) -> int:
    """64-bit hash that is the same in every process and on every machine (unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def word_hashes(words: Sequence[str]) -> np.ndarray:
    """uint64 stable hash per word; a per-process cache makes repeated words cost one dict lookup."""
    cache = _WORD_HASH_CACHE
    out = []
    for w in words:
        h = cache.get(w)
        if h is None:
            h = stable_hash(w)
            if len(cache) < _WORD_HASH_CACHE_LIMIT:
                cache[w] = h
        out.append(h)
    return np.array(out, dtype=np.uint64)


@functools.lru_cache(maxsize=4096)
def text_word_hashes(text: str) -> np.ndarray:
    """``word_hashes(match_words(text))``, memoized (read-only): decontamination, MinHash and the quality
    classifier look at the same text one after another within a shard, and words are hashed once."""
    hashes = word_hashes(match_words(text))
    hashes.flags.writeable = False
    return hashes


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """uint64 hash of every run of ``n`` consecutive word hashes (polynomial, wrapping arithmetic)."""
    count = len(hashes) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    acc = hashes[:count].copy()
    for k in range(1, n):
        acc *= _NGRAM_MULT
        acc += hashes[k:k + count]
    return acc


def exact_key(text: str) -> int:
    """Hash of the text with case and whitespace runs normalized: equal keys = exact duplicates."""
    return stable_hash(" ".join(text.lower().split()))


# ----------------------------------------------------------------------------- MinHash


def _fmix32(hv: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, as datasketch applies it before its affine permutations."""
    hv = hv ^ (hv >> np.uint32(16))
    hv = hv * np.uint32(0x85EBCA6B)
    hv = hv ^ (hv >> np.uint32(13))
    hv = hv * np.uint32(0xC2B2AE35)
    return hv ^ (hv >> np.uint32(16))


class MinHasher:
    """MinHash signatures of word shingles, identical to datasketch's ``affine32`` scheme."""

    def __init__(self, num_perm: int = 128, seed: int = 1, shingle_size: int = 5, block: int = 4096):
        from datasketch import MinHash

        self.num_perm, self.seed, self.shingle_size, self.block = num_perm, seed, shingle_size, block
        a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
        self.a = np.asarray(a, dtype=np.uint32)  # (P,)
        self.b = np.asarray(b, dtype=np.uint32)

    def shingles(self, text: str) -> np.ndarray:
        """Distinct 32-bit shingle hashes; a text shorter than one shingle is one shingle of all its words."""
        h = text_word_hashes(text)
        n = min(self.shingle_size, len(h)) or 1
        grams = ngram_hashes(h, n) if len(h) else np.zeros(1, dtype=np.uint64)
        folded = (grams ^ (grams >> np.uint64(32))).astype(np.uint32)
        return np.unique(folded)

    def signature_of_shingles(self, shingles: np.ndarray) -> np.ndarray:
        hv = _fmix32(shingles.astype(np.uint32))
        sig = np.full(self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
        for start in range(0, len(hv), self.block):  # bounded memory on book-length documents
            phv = hv[start:start + self.block, None] * self.a + self.b  # (S, P), uint32 wraparound
            np.minimum(sig, phv.min(axis=0), out=sig)
        return sig

    def signature(self, text: str) -> np.ndarray:
        return self.signature_of_shingles(self.shingles(text))


# ----------------------------------------------------------------------------- config


@dataclass
class DedupConfig:
    """Exact, line-level and near-duplicate removal (keep-first)."""

    exact: bool = True  # [dedup_exact] same text up to case and whitespace
    near: bool = True  # [dedup_near] MinHash LSH
    shingle_size: int = 5  # words per shingle
    bands: int = 20  # LSH bands; bands * rows MinHash values per signature
    rows: int = 5  # values per band
    threshold: float = 0.8  # estimated Jaccard similarity needed to confirm a candidate pair
    seed: int = 1
    lsh: str = "fast"  # DedupIndex only: fast (numpy band keys) | datasketch (MinHashLSH; same candidates)
    lines: bool = True  # drop lines/sentences already seen in an earlier kept document
    line_unit: str = "line"  # line | sentence
    line_min_chars: int = 64  # shorter units are never dropped ("Exeunt.", "And God said,")
    min_chars_after_lines: int = 16  # [empty_after_line_dedup] a document shorter than this afterwards goes

    def validate(self) -> None:
        for name in ("shingle_size", "bands", "rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"dedup.{name}={getattr(self, name)} must be >= 1")
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"dedup.threshold={self.threshold} must be in (0, 1]")
        if self.lsh not in ("fast", "datasketch"):
            raise ConfigError(f"dedup.lsh={self.lsh!r}: choose fast or datasketch")
        if self.line_unit not in ("line", "sentence"):
            raise ConfigError(f"dedup.line_unit={self.line_unit!r}: choose line or sentence")
        if self.line_min_chars < 1 or self.min_chars_after_lines < 0:
            raise ConfigError("dedup.line_min_chars must be >= 1 and dedup.min_chars_after_lines >= 0")

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows


# ----------------------------------------------------------------------------- map: keys per document

_LINE_RE = re.compile(r"[^\n]+")
_SENTENCE_RE = re.compile(r"[^\n.!?]*[.!?]+[\"'\u201d\u2019)\]]*|[^\n.!?]+")


def unit_spans(text: str, unit: str, min_chars: int) -> list[tuple[int, int, int]]:
    """(start, end, hash) of every line or sentence with at least ``min_chars`` non-space characters."""
    pattern = _LINE_RE if unit == "line" else _SENTENCE_RE
    out = []
    for m in pattern.finditer(text):
        s = m.group(0)
        key = " ".join(s.lower().split())
        if len(key) >= min_chars:
            out.append((m.start(), m.end(), stable_hash(key)))
    return out


@dataclass
class DedupKeys:
    """Map output for one batch of documents (arrays aligned with the batch order)."""

    exact: np.ndarray  # (N,) uint64
    signatures: np.ndarray  # (N, P) uint32
    line_doc: np.ndarray  # (M,) int32: which document each unit belongs to
    line_start: np.ndarray  # (M,) int32
    line_end: np.ndarray  # (M,) int32
    line_hash: np.ndarray  # (M,) uint64

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {f"dedup_{k}": v for k, v in self.__dict__.items()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "DedupKeys":
        return cls(**{k[len("dedup_"):]: arrays[k] for k in arrays if k.startswith("dedup_")})


def dedup_keys(texts: Sequence[str], cfg: DedupConfig, hasher: MinHasher | None = None) -> DedupKeys:
    """The pure map step: exact keys, MinHash signatures and line/sentence hashes for a batch."""
    n = len(texts)
    exact = np.fromiter((exact_key(t) for t in texts), dtype=np.uint64, count=n) if cfg.exact \
        else np.zeros(n, dtype=np.uint64)
    if cfg.near:
        hasher = hasher or MinHasher(cfg.num_perm, cfg.seed, cfg.shingle_size)
        signatures = np.stack([hasher.signature(t) for t in texts]) if n else np.zeros((0, cfg.num_perm), np.uint32)
    else:
        signatures = np.zeros((n, 0), dtype=np.uint32)
    docs, starts, ends, hashes = [], [], [], []
    if cfg.lines:
        for i, t in enumerate(texts):
            for s, e, h in unit_spans(t, cfg.line_unit, cfg.line_min_chars):
                docs.append(i)
                starts.append(s)
                ends.append(e)
                hashes.append(h)
    return DedupKeys(exact=exact, signatures=signatures.astype(np.uint32),
                     line_doc=np.array(docs, dtype=np.int32), line_start=np.array(starts, dtype=np.int32),
                     line_end=np.array(ends, dtype=np.int32), line_hash=np.array(hashes, dtype=np.uint64))


# ----------------------------------------------------------------------------- reduce: decisions

KEEP, EXACT, NEAR = 0, 1, 2


@dataclass
class BatchDecisions:
    """What the reduce step decided for one batch (aligned with the batch order)."""

    status: np.ndarray  # (N,) int8: KEEP, EXACT or NEAR
    representative: np.ndarray  # (N,) int64: global ordinal of the cluster's kept document, -1 if unique
    similarity: np.ndarray  # (N,) float32: estimated Jaccard with the representative (1.0 for exact)
    drop_spans: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # doc -> line spans to cut


class BandIndex:
    """LSH banding: documents whose signatures agree on all ``rows`` values of any one band are candidates.

    The fast path of ``datasketch.MinHashLSH`` with ``params=(bands, rows)``: each band's values are folded
    into one 64-bit key with numpy, and each band is a dict from key to documents. A test checks that it
    returns the same candidates as datasketch on the same signatures.
    """

    def __init__(self, bands: int, rows: int):
        self.bands, self.rows = bands, rows
        self.tables: list[dict[int, list[int]]] = [{} for _ in range(bands)]

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """(N, P) uint32 signatures -> (N, bands) uint64 band keys."""
        n = len(signatures)
        sig = signatures[:, : self.bands * self.rows].astype(np.uint64).reshape(n, self.bands, self.rows)
        keys = sig[:, :, 0].copy()  # (N, bands)
        for r in range(1, self.rows):
            keys *= _NGRAM_MULT
            keys += sig[:, :, r]
        return keys

    def query(self, keys: Sequence[int]) -> set[int]:
        found: set[int] = set()
        for table, key in zip(self.tables, keys):
            hit = table.get(key)
            if hit:
                found.update(hit)
        return found

    def insert(self, item: int, keys: Sequence[int]) -> None:
        for table, key in zip(self.tables, keys):
            table.setdefault(key, []).append(item)


class DatasketchIndex:
    """The same interface over ``datasketch.MinHashLSH`` (the reference implementation)."""

    def __init__(self, cfg: "DedupConfig"):
        from datasketch import MinHashLSH

        self.seed = cfg.seed
        self.lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, params=(cfg.bands, cfg.rows))

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        return signatures  # datasketch bands the signature itself

    def _lean(self, sig: np.ndarray):
        from datasketch import LeanMinHash

        return LeanMinHash(seed=self.seed, hashvalues=np.asarray(sig, dtype=np.uint32), scheme="affine32")

    def query(self, sig) -> set[int]:
        return set(self.lsh.query(self._lean(sig)))

    def insert(self, item: int, sig) -> None:
        self.lsh.insert(item, self._lean(sig), check_duplication=False)


class DedupIndex:
    """Sequential keep-first deduplication over batches given in input order."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self.next_ordinal = 0
        self.exact_seen: dict[int, int] = {}  # exact key -> ordinal of the kept document
        self.lines_seen: set[int] = set()
        self.lsh: BandIndex | DatasketchIndex | None = None
        if cfg.near:
            self.lsh = BandIndex(cfg.bands, cfg.rows) if cfg.lsh == "fast" else DatasketchIndex(cfg)
        self.kept_signatures: dict[int, np.ndarray] = {}
        self.cluster_sizes: dict[int, int] = {}  # representative ordinal -> documents in its cluster
        self.counts = {"exact": 0, "near": 0, "lines_removed": 0, "line_chars_removed": 0, "candidates": 0}

    def _near_match(self, sig: np.ndarray, keys) -> tuple[int, float]:
        best, best_sim = -1, 0.0
        for cand in sorted(self.lsh.query(keys)):  # sorted: ties go to the earliest document
            self.counts["candidates"] += 1
            sim = float(np.mean(self.kept_signatures[cand] == sig))
            if sim > best_sim:
                best, best_sim = cand, sim
        if best >= 0 and best_sim >= self.cfg.threshold:
            return best, best_sim
        return -1, best_sim

    def add_batch(self, keys: DedupKeys) -> BatchDecisions:
        n = len(keys.exact)
        status = np.zeros(n, dtype=np.int8)
        rep = np.full(n, -1, dtype=np.int64)
        sim = np.zeros(n, dtype=np.float32)
        lines_of: dict[int, list[int]] = {}
        for j, d in enumerate(keys.line_doc.tolist()):
            lines_of.setdefault(d, []).append(j)
        drop: dict[int, list[tuple[int, int]]] = {}
        band_keys = None
        if self.lsh is not None and n:
            band_keys = self.lsh.band_keys(keys.signatures)
            band_keys = band_keys.tolist() if isinstance(self.lsh, BandIndex) else band_keys
        for i in range(n):
            ordinal = self.next_ordinal + i
            if self.cfg.exact:
                key = int(keys.exact[i])
                first = self.exact_seen.get(key)
                if first is not None:
                    status[i], rep[i], sim[i] = EXACT, first, 1.0
                    self._join(first)
                    self.counts["exact"] += 1
                    continue
                self.exact_seen[key] = ordinal
            if self.lsh is not None:
                sig = keys.signatures[i]
                match, similarity = self._near_match(sig, band_keys[i])
                if match >= 0:
                    status[i], rep[i], sim[i] = NEAR, match, similarity
                    self._join(match)
                    self.counts["near"] += 1
                    continue
                self.lsh.insert(ordinal, band_keys[i])
                self.kept_signatures[ordinal] = sig.copy()
            if self.cfg.lines and i in lines_of:
                fresh = []
                for j in lines_of[i]:
                    h = int(keys.line_hash[j])
                    if h in self.lines_seen:
                        drop.setdefault(i, []).append((int(keys.line_start[j]), int(keys.line_end[j])))
                        self.counts["lines_removed"] += 1
                        self.counts["line_chars_removed"] += int(keys.line_end[j] - keys.line_start[j])
                    else:
                        fresh.append(h)
                self.lines_seen.update(fresh)  # after the loop: repeats inside one document are kept
        self.next_ordinal += n
        return BatchDecisions(status=status, representative=rep, similarity=sim, drop_spans=drop)

    def _join(self, representative: int) -> None:
        self.cluster_sizes[representative] = self.cluster_sizes.get(representative, 1) + 1

    @property
    def clusters(self) -> int:
        return len(self.cluster_sizes)


def cut_spans(text: str, spans: Iterable[tuple[int, int]]) -> str:
    """``text`` without the given (start, end) spans. A span that fills its whole line takes its line
    break with it; a span inside a line leaves one space between its neighbours. Indentation elsewhere
    is untouched."""
    pieces: list[str] = []
    pos = 0
    for start, end in sorted(spans):
        if start < pos:
            continue
        line_begin = text.rfind("\n", 0, start) + 1
        line_end = text.find("\n", end)
        line_end = len(text) if line_end < 0 else line_end
        if not text[max(line_begin, pos):start].strip() and not text[end:line_end].strip():
            pieces.append(text[pos:max(line_begin, pos)])  # the whole line goes, with its line break
            pos = line_end + 1
        else:
            left = text[pos:start].rstrip(" \t")
            pieces.append(left)
            pos = end
            while pos < len(text) and text[pos] in " \t":
                pos += 1
            if left and not left.endswith("\n") and pos < len(text) and text[pos] != "\n":
                pieces.append(" ")
    pieces.append(text[pos:])
    return re.sub(r"\n{3,}", "\n\n", "".join(pieces)).strip("\n")


def dedup_documents(texts: Sequence[str], cfg: DedupConfig | None = None) -> tuple[list[int], BatchDecisions]:
    """Convenience for small in-memory lists: indices of the kept texts, and the decisions."""
    cfg = cfg or DedupConfig()
    index = DedupIndex(cfg)
    decisions = index.add_batch(dedup_keys(texts, cfg))
    return [i for i in range(len(texts)) if decisions.status[i] == KEEP], decisions


# ----------------------------------------------------------------------------- synthetic evaluation


def synthetic_near_duplicates(families: int = 200, variants: int = 4, seed: int = 0, vocab_size: int = 5000,
                              edit_rates: Sequence[float] = (0.0, 0.01, 0.03, 0.06, 0.1, 0.2, 0.35)
                              ) -> tuple[list[str], list[int]]:
    """A labelled near-duplicate set: ``families`` original documents (Zipfian pseudo-words, 80-400 words)
    each followed later by ``variants`` copies with word substitutions, insertions and deletions at a rate
    drawn from ``edit_rates``. Returns (texts in a shuffled order, family id per text)."""
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "vi", "so", "pe", "da", "gu", "ri", "fa", "zo", "be"]
    vocab = ["".join(rng.choice(syllables, size=int(rng.integers(1, 4)))) + str(i % 7 or "") for i in range(vocab_size)]
    weights = 1.0 / np.arange(1, vocab_size + 1)
    weights /= weights.sum()

    def sample(n: int) -> list[str]:
        return [vocab[i] for i in rng.choice(vocab_size, size=n, p=weights)]

    originals = [sample(int(rng.integers(80, 400))) for _ in range(families)]
    fresh = iter(sample(sum(len(w) for w in originals) * variants))  # words for substitutions and insertions
    docs: list[tuple[list[str], int]] = [(words, f) for f, words in enumerate(originals)]
    for f, words in enumerate(originals):
        for _ in range(variants):
            rate = float(rng.choice(edit_rates))
            out = []
            for w in words:
                r = rng.random()
                if r < rate / 3:
                    continue  # deletion
                if r < 2 * rate / 3:
                    out.append(next(fresh))  # substitution
                    continue
                out.append(w)
                if r < rate:
                    out.append(next(fresh))  # insertion
            docs.append((out, f))
    order = rng.permutation(len(docs))
    texts = [" ".join(docs[i][0]) for i in order]
    return texts, [docs[i][1] for i in order]


def _shingle_set(text: str, n: int) -> set[int]:
    h = text_word_hashes(text)
    return set(ngram_hashes(h, min(n, len(h)) or 1).tolist()) if len(h) else {0}


def near_dedup_quality(texts: Sequence[str], families: Sequence[int], cfg: DedupConfig | None = None) -> dict:
    """Precision and recall of near-duplicate removal against exact Jaccard similarity.

    A document is a true duplicate when its exact shingle Jaccard similarity with an earlier document
    of its family reaches ``cfg.threshold`` (documents of different families share no meaningful
    shingles by construction). Removed = dedup_exact or dedup_near.
    """
    import time

    cfg = cfg or DedupConfig()
    shingles = [_shingle_set(t, cfg.shingle_size) for t in texts]
    truth = np.zeros(len(texts), dtype=bool)
    seen: dict[int, list[int]] = {}
    for i, fam in enumerate(families):
        for j in seen.get(fam, []):
            a, b = shingles[i], shingles[j]
            if len(a & b) / len(a | b) >= cfg.threshold:
                truth[i] = True
                break
        seen.setdefault(fam, []).append(i)
    t0 = time.perf_counter()
    _, decisions = dedup_documents(texts, cfg)
    seconds = time.perf_counter() - t0
    removed = decisions.status != KEEP
    tp = int((removed & truth).sum())
    precision = tp / max(int(removed.sum()), 1)
    recall = tp / max(int(truth.sum()), 1)
    return {"documents": len(texts), "true_duplicates": int(truth.sum()), "removed": int(removed.sum()),
            "true_positives": tp, "precision": round(precision, 4), "recall": round(recall, 4),
            "f1": round(2 * precision * recall / max(precision + recall, 1e-9), 4), "seconds": round(seconds, 3),
            "docs_per_s": round(len(texts) / max(seconds, 1e-9), 1),
            "mb_per_s": round(sum(len(t) for t in texts) / 1e6 / max(seconds, 1e-9), 3)}
