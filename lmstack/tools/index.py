"""A local document index for retrieval: passages with source ids, BM25, dense vectors, hybrid ranking.

    lmstack index build docs/ notes.jsonl --out runs/idx [--embed-model models/minilm]
    lmstack index search runs/idx "who wrote hamlet" --k 5 --mode hybrid

    from lmstack.tools.index import build_index, load_index
    build_index(["docs/"], "runs/idx", embed_model="models/minilm")
    index = load_index("runs/idx")
    for hit in index.search("who wrote hamlet", k=5, mode="hybrid"):
        hit.source_id, hit.score, hit.snippet

Building: documents are read with :func:`lmstack.data.readers.iter_documents` (txt / jsonl / parquet /
directories, compressed or not) and cut into passages of about ``passage_words`` words that overlap by
``overlap_words``; a passage records its document id, its file, and its character offsets ``[start, end)``
in the document's text, and its source id is ``DOC_ID#start-end``. A file whose text is mostly
undecodable bytes or control characters is refused as binary, and an index with no text at all is
refused, each with one line naming the file and the fix.

Three rankings:

* ``bm25``: Okapi BM25 by the ``bm25s`` library (Lucene's scoring variant, k1=1.5, b=0.75, lower-cased
  words of two or more letters, English stop words removed, no stemming). Passages that share no word
  with the query are never returned.
* ``dense``: cosine similarity of embeddings from a checkpoint (:func:`lmstack.engine.embed.embed`, mean
  pooling, unit vectors), e.g. the imported all-MiniLM-L6-v2 sentence encoder. The model is named at build
  time (``embed_model``) and recorded in the manifest; queries are embedded with the same model.
* ``hybrid``: reciprocal rank fusion (Cormack et al., 2009) of the two lists, score = Σ 1 / (60 + rank),
  over each ranking's top ``max(4k, 50)``. RRF needs no calibration between BM25's unbounded scores and
  cosines, which is why it is used instead of a normalised score mix.

On disk: ``IDX/manifest.json`` (format, version, settings, inputs, counts, the embedding model, and the
size and SHA-256 of every file), ``IDX/passages.jsonl``, ``IDX/bm25/`` (bm25s's own files, no pickles),
and ``IDX/dense.npy`` (float32, passages × dim) when built with a model. The directory is written in a
staging directory and renamed into place (:func:`lmstack.atomic.staged_directory`): a reader sees the old
index or the new one, never half of one. ``load_index`` checks the manifest and the files' sizes.

Caveat: everything is held in memory (10,000 passages take a few MB for BM25 and 15 MB for 384-dim
vectors); dense search is an exact matrix product, not an approximate-nearest-neighbour index.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from lmstack.atomic import staged_directory
from lmstack.errors import DataError, UserError
from lmstack.progress import Progress

FORMAT, VERSION = "lmstack-index", 1
MODES = ("bm25", "dense", "hybrid")
RRF_K = 60
BINARY_FRACTION = 0.10  # a document with more undecodable / control characters than this is binary
_WORD = re.compile(r"\S+")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")


@dataclass
class Passage:
    source_id: str   # DOC_ID#start-end
    doc_id: str
    source: str      # the file it came from
    start: int       # character offsets in the document's text
    end: int
    text: str


@dataclass
class Hit:
    rank: int
    score: float
    source_id: str
    source: str
    snippet: str
    text: str


def chunk_text(text: str, passage_words: int = 120, overlap_words: int = 20) -> Iterator[tuple[int, int]]:
    """Character spans ``(start, end)`` of passages of about PASSAGE_WORDS words overlapping by OVERLAP_WORDS."""
    if passage_words < 1 or not 0 <= overlap_words < passage_words:
        raise UserError(f"passage_words={passage_words}, overlap_words={overlap_words}: need passage_words >= 1 "
                        "and 0 <= overlap_words < passage_words")
    words = [m.span() for m in _WORD.finditer(text)]
    step = passage_words - overlap_words
    for first in range(0, len(words), step):
        window = words[first:first + passage_words]
        yield window[0][0], window[-1][1]
        if first + passage_words >= len(words):
            return


def _check_text(text: str, source: str) -> None:
    sample = text[:20_000]
    bad = len(_CONTROL.findall(sample))
    if sample and bad / len(sample) > BINARY_FRACTION:
        raise DataError(f"{source} looks binary ({bad / len(sample):.0%} of its first characters are undecodable "
                        "or control characters); index text files (txt, jsonl, parquet)")


def read_passages(inputs: Sequence[str | Path], text_field: str = "text", passage_words: int = 120,
                  overlap_words: int = 20) -> tuple[list[Passage], dict[str, Any]]:
    """Passages of every document in INPUTS and the reader's statistics."""
    from lmstack.data.readers import ReadStats, iter_documents

    stats = ReadStats()
    passages: list[Passage] = []
    for doc in iter_documents(inputs, text_field=text_field, stats=stats):
        _check_text(doc.text, doc.source)
        for start, end in chunk_text(doc.text, passage_words, overlap_words):
            passages.append(Passage(f"{doc.id}#{start}-{end}", doc.id, doc.source, start, end, doc.text[start:end]))
    if not passages:
        raise DataError(f"no text to index in {', '.join(map(str, inputs))} ({stats.summary()}); pass files "
                        "with text (txt, jsonl with a text field, parquet)")
    return passages, stats.to_dict()


def bm25_tokens(texts: list[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


def build_index(inputs: Sequence[str | Path], out: str | Path, *, embed_model: str | Path | None = None,
                text_field: str = "text", passage_words: int = 120, overlap_words: int = 20,
                batch_size: int = 64, progress: bool = True) -> dict[str, Any]:
    """Build the index of INPUTS into OUT (atomically); returns the manifest."""
    import bm25s

    if not inputs:
        raise UserError("no inputs: name files or directories to index")
    passages, read_stats = read_passages(inputs, text_field, passage_words, overlap_words)
    vectors = None
    model_info = None
    if embed_model is not None:
        model, tokenizer = _load_embedder(embed_model)
        vectors = _embed_texts(model, tokenizer, [p.text for p in passages], batch_size, progress)
        model_info = {"path": str(Path(embed_model).resolve()), "dim": int(vectors.shape[1]), "pooling": "mean"}
    retriever = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    retriever.index(bm25_tokens([p.text for p in passages]), show_progress=False)
    with staged_directory(out) as staging:
        with open(staging / "passages.jsonl", "w", encoding="utf-8") as f:
            for passage in passages:
                f.write(json.dumps(asdict(passage), ensure_ascii=False) + "\n")
        retriever.save(str(staging / "bm25"), show_progress=False)
        if vectors is not None:
            np.save(staging / "dense.npy", vectors)
        files = {str(path.relative_to(staging)): {"bytes": path.stat().st_size, "sha256": _sha256(path)}
                 for path in sorted(staging.rglob("*")) if path.is_file()}
        manifest = {"format": FORMAT, "version": VERSION, "passages": len(passages),
                    "documents": read_stats["documents"], "inputs": [str(p) for p in inputs],
                    "text_field": text_field, "passage_words": passage_words, "overlap_words": overlap_words,
                    "bm25": {"library": "bm25s", "method": "lucene", "k1": 1.5, "b": 0.75, "stopwords": "en"},
                    "embed_model": model_info, "modes": ["bm25", "dense", "hybrid"] if vectors is not None else ["bm25"],
                    "read": read_stats, "files": files}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_embedder(path: str | Path) -> tuple[Any, Any]:
    from lmstack.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(path)
    if checkpoint.tokenizer is None:
        raise UserError(f"{path} has no tokenizer.json, so passages cannot be embedded")
    checkpoint.model.eval()
    return checkpoint.model, checkpoint.tokenizer


def _embed_texts(model: Any, tokenizer: Any, texts: list[str], batch_size: int, progress: bool) -> np.ndarray:
    from lmstack.engine.embed import embed

    bar = Progress(enabled=progress)
    task = bar.add("embedding passages", total=len(texts), unit="passages")
    chunks = []
    with bar:
        for start in range(0, len(texts), batch_size):
            batch = texts[start:start + batch_size]
            chunks.append(embed(model, tokenizer, batch, pooling="mean", normalize=True).numpy())  # (B, C)
            bar.advance(task, len(batch))
    return np.concatenate(chunks).astype(np.float32)  # (N, C)


class Index:
    """A loaded index: ``search(query, k, mode)`` -> hits, best first."""

    def __init__(self, path: str | Path, embed_model: str | Path | None = None):
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            raise DataError(f"{self.path} is not an index (no manifest.json); build one with "
                            "`lmstack index build DOCS... --out IDX`")
        try:
            self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{manifest_path} is not valid JSON ({e.msg}); rebuild the index") from None
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise DataError(f"{self.path} is not a version-{VERSION} lmstack index; rebuild it with `lmstack index build`")
        for name, info in self.manifest["files"].items():
            file = self.path / name
            if not file.is_file() or file.stat().st_size != info["bytes"]:
                raise DataError(f"{self.path}: {name} is missing or damaged; rebuild the index")
        with open(self.path / "passages.jsonl", encoding="utf-8") as f:
            self.passages = [Passage(**json.loads(line)) for line in f]
        self._bm25 = None
        self._vectors = np.load(self.path / "dense.npy") if (self.path / "dense.npy").is_file() else None
        self._embed_model = embed_model or (self.manifest["embed_model"] or {}).get("path")
        self._embedder: tuple[Any, Any] | None = None

    @property
    def modes(self) -> list[str]:
        return list(MODES) if self._vectors is not None else ["bm25"]

    def search(self, query: str, k: int = 5, mode: str = "bm25") -> list[Hit]:
        if mode not in MODES:
            raise UserError(f"mode {mode!r} is unknown; choose one of {', '.join(MODES)}")
        if mode != "bm25" and self._vectors is None:
            raise UserError(f"{self.path} has no dense vectors, so mode {mode} is unavailable; rebuild it with "
                            "--embed-model (e.g. an imported all-minilm-l6-v2) or use --mode bm25")
        if k < 1:
            raise UserError(f"k={k} must be >= 1")
        if not query.strip():
            raise UserError("the query is empty")
        ranked = self.rank([query], k, mode)[0]
        return [self._hit(rank, i, score, query) for rank, (i, score) in enumerate(ranked, 1)]

    def rank(self, queries: list[str], k: int, mode: str) -> list[list[tuple[int, float]]]:
        """For each query, (passage index, score) pairs, best first (batched: the benchmark's entry point)."""
        depth = max(4 * k, 50) if mode == "hybrid" else k
        bm25 = self._rank_bm25(queries, depth) if mode in ("bm25", "hybrid") else None
        dense = self._rank_dense(queries, depth) if mode in ("dense", "hybrid") else None
        if mode == "bm25":
            return bm25  # type: ignore[return-value]
        if mode == "dense":
            return dense  # type: ignore[return-value]
        return [reciprocal_rank_fusion([a, b], k) for a, b in zip(bm25, dense)]  # type: ignore[arg-type]

    def _rank_bm25(self, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
        import bm25s

        if self._bm25 is None:
            self._bm25 = bm25s.BM25.load(str(self.path / "bm25"), show_progress=False)
        k = min(k, len(self.passages))
        documents, scores = self._bm25.retrieve(bm25_tokens(queries), k=k, show_progress=False)  # (Q, k) each
        return [[(int(i), float(s)) for i, s in zip(row_ids, row_scores) if s > 0]
                for row_ids, row_scores in zip(documents, scores)]

    def _rank_dense(self, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
        if self._embedder is None:
            if not self._embed_model:
                raise UserError(f"{self.path} does not name its embedding model; pass embed_model")
            self._embedder = _load_embedder(self._embed_model)
        query_vectors = _embed_texts(*self._embedder, queries, 64, progress=False)  # (Q, C)
        if query_vectors.shape[1] != self._vectors.shape[1]:
            raise UserError(f"the embedding model gives {query_vectors.shape[1]}-dim vectors but the index holds "
                            f"{self._vectors.shape[1]}-dim ones; use the model the index was built with")
        similarity = query_vectors @ self._vectors.T  # (Q, N) cosines of unit vectors
        k = min(k, similarity.shape[1])
        top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]  # (Q, k), unordered
        results = []
        for row, candidates in zip(similarity, top):
            ordered = candidates[np.argsort(-row[candidates], kind="stable")]
            results.append([(int(i), float(row[i])) for i in ordered])
        return results

    def _hit(self, rank: int, i: int, score: float, query: str) -> Hit:
        passage = self.passages[i]
        return Hit(rank, score, passage.source_id, passage.source, snippet(passage.text, query), passage.text)


def reciprocal_rank_fusion(rankings: Iterable[list[tuple[int, float]]], k: int, rrf_k: int = RRF_K
                           ) -> list[tuple[int, float]]:
    """Fuse ranked lists of (item, score): score(item) = Σ 1 / (rrf_k + rank); the top K, ties by item."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, (item, _) in enumerate(ranking, 1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (rrf_k + rank)
    return sorted(fused.items(), key=lambda pair: (-pair[1], pair[0]))[:k]


def snippet(text: str, query: str, width: int = 200) -> str:
    """About WIDTH characters of TEXT around its first word that the query shares (the start if none)."""
    words = {w.lower() for w in re.findall(r"\w\w+", query)}
    start = 0
    for match in re.finditer(r"\w\w+", text):
        if match.group().lower() in words:
            if match.start() > width // 2:  # start a few words before it, at a word boundary
                start = text.rfind(" ", 0, match.start() - width // 4) + 1
            break
    piece = " ".join(text[start:start + width].split())
    return ("…" if start > 0 else "") + piece + ("…" if start + width < len(text) else "")


def load_index(path: str | Path, embed_model: str | Path | None = None) -> Index:
    return Index(path, embed_model)


def search_tool(index: str | Path | Index, k: int = 3, mode: str | None = None, timeout_s: float = 30.0):
    """The search tool over an index (argument ``query``): the top K passages with their source ids.
    ``mode`` None = hybrid when the index has vectors, else bm25."""
    from lmstack.tools.base import Tool

    loaded = index if isinstance(index, Index) else load_index(index)
    chosen = mode or ("hybrid" if "hybrid" in loaded.modes else "bm25")

    def call(arguments: dict[str, Any]) -> str:
        hits = loaded.search(arguments["query"], k=arguments.get("k", k), mode=chosen)
        if not hits:
            return "no passage matches the query"
        return "\n".join(f"[{hit.rank}] ({hit.source_id}) {hit.snippet}" for hit in hits)

    return Tool(name="search", description="Search the local document index; returns passages with source ids.",
                parameters={"type": "object", "additionalProperties": False, "required": ["query"],
                            "properties": {"query": {"type": "string", "maxLength": 1000},
                                           "k": {"type": "integer", "minimum": 1, "maximum": 20}}},
                function=call, timeout_s=timeout_s)
