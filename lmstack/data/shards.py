"""Text -> token shards: the on-disk format that pretraining reads.

    lmstack data tokenize classics my_notes/ --tokenizer runs/tok --out data/classics
    # or: tokenize_to_shards(["classics"], Tokenizer.load("runs/tok"), "data/classics")

Layout of OUT (written to a temporary sibling directory and renamed into place, so OUT is either
the old complete result or the new complete result, never half of one)::

    meta.json          format version, vocab_size, dtype, eot_id, tokenizer file, sources, read stats and,
                       per split: shard file names, tokens per shard, tokens, UTF-8 text bytes, documents
    tokenizer.json     the tokenizer (Tokenizer.save), so OUT alone is enough to train and decode
    train_00000.bin    raw little-endian uint16 token ids (uint32 when the vocabulary exceeds 65,536)
    val_00000.bin      ...

An existing OUT is replaced only when it holds nothing but what an earlier tokenize wrote there (the files
its meta.json lists); anything else (the user's notes, a cleaned corpus) makes the call refuse with one
line naming ``--overwrite`` (``overwrite=True``). An OUT that is, holds or lies inside an input is always
refused (lmstack.data.outputs).

Every document is preceded by the tokenizer's ``eot_id``, so the concatenated stream reads
``<eot> doc1 <eot> doc2 ...`` and a model learns where documents start. Documents may straddle shard
boundaries; the loader treats a split's shards as one stream.

The validation split is chosen per document by a keyed hash of ``Document.id`` (seed, id): adding or
removing other documents never moves a document between splits. If the hash picks no validation
document at all (a tiny corpus), the last document goes to validation so that the split exists; that
one choice is the exception to stability.

Tokenization runs in worker processes (``workers``; 0 = in this process, in batches big enough for
the tokenizer's own thread pool, which is also the default for inputs under 32 MB). Workers are started with
"spawn" (forking a process that runs rich's refresh thread or a Rust thread pool can deadlock) and
receive the tokenizer as a saved file, loaded by its own class's ``load``: any object with
``save/load/encode_batch/eot_id/vocab_size`` works. The main process reads documents, keeps a bounded
number of chunks in flight (memory stays bounded for any corpus size), and writes shards in document
order, so the output is identical for any number of workers.

``executor="ray"`` (``--executor ray [--ray-address HOST:PORT]``) runs the same chunk encoding as Ray tasks
through lmstack.data.executors (a local Ray cluster of ``workers`` CPUs, or an existing one): the tasks
finish in any order and a reorder buffer hands them to the writer in document order, so the shards are
byte-identical to the local run (a test compares them). Each Ray worker loads the tokenizer once from
the output's staging directory, so on a cluster of several machines that directory must be on storage
they all see (as for ``data clean``). The driver still reads the inputs and ships the texts: reading is
the ceiling at cluster scale.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from lmstack.atomic import make_staging_dir, swap_directory
from lmstack.data.corpora import resolve_inputs
from lmstack.data.executors import EXECUTORS, Executor, make_executor
from lmstack.data.outputs import claim_output_dir
from lmstack.data.readers import ReadStats, iter_documents, list_input_files
from lmstack.errors import DataError, UserError
from lmstack.progress import Progress

__all__ = ["SHARD_FORMAT_VERSION", "DEFAULT_SHARD_TOKENS", "tokenize_to_shards", "is_val_document", "token_dtype"]

SHARD_FORMAT_VERSION = 1
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB per uint16 shard
WORKER_CHUNK_BYTES = 1 << 16  # text per worker task: amortises pickling, small enough to balance the workers
INPROCESS_CHUNK_BYTES = 1 << 20  # in-process batches: big enough for encode_batch's own threads to pay off
CHUNK_DOCUMENTS = 4096
SMALL_INPUT_BYTES = 32 << 20  # workers=None below this: starting worker processes costs more than it saves


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 when every id fits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def is_val_document(doc_id: str, val_fraction: float, seed: int = 0) -> bool:
    """Whether DOC_ID belongs to the validation split: a keyed 64-bit hash compared with VAL_FRACTION."""
    digest = hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=8,
                             key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2.0**64


# ----------------------------------------------------------------------------- workers

_worker_tokenizer: Any = None


def _tokenizer_class_path(tokenizer: Any) -> tuple[str, str]:
    cls = type(tokenizer)
    return cls.__module__, cls.__qualname__


def _load_tokenizer(class_path: tuple[str, str], path: str) -> Any:
    module, qualname = class_path
    cls: Any = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    return cls.load(path)


def _init_worker(class_path: tuple[str, str], path: str) -> None:
    # One process per core: keep each worker's tokenizer single-threaded.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    global _worker_tokenizer
    _worker_tokenizer = _load_tokenizer(class_path, path)


def _encode_chunk(texts: list[str], tokenizer: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, lengths): each text's ids preceded by eot, concatenated in the shard dtype (which keeps
    what travels back from a worker small); lengths include the eot."""
    tok = tokenizer if tokenizer is not None else _worker_tokenizer
    encoded = tok.encode_batch(texts)
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    tokens = np.empty(int(lengths.sum()), dtype=np.int64)
    position = 0
    for ids in encoded:
        tokens[position] = tok.eot_id
        tokens[position + 1:position + 1 + len(ids)] = ids
        position += len(ids) + 1
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= tok.vocab_size):
        raise DataError(f"the tokenizer produced id {int(tokens.max())} outside its vocabulary of {tok.vocab_size}")
    return tokens.astype(token_dtype(tok.vocab_size)), lengths


def _encode_task(task: tuple[int, list[str]]) -> dict[str, Any]:
    """A chunk's encoding as an executor task: (chunk index, texts) -> the index with tokens and lengths."""
    index, texts = task
    tokens, lengths = _encode_chunk(texts)
    return {"index": index, "tokens": tokens, "lengths": lengths}


# ----------------------------------------------------------------------------- writing

class _SplitWriter:
    """Appends token arrays to SPLIT_00000.bin, SPLIT_00001.bin, ... of at most shard_tokens tokens each."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[str] = []
        self.shard_sizes: list[int] = []
        self.documents = 0
        self.text_bytes = 0
        self._file = None

    @property
    def tokens(self) -> int:
        return sum(self.shard_sizes)

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._file is None or self.shard_sizes[-1] == self.shard_tokens:
                self._next_shard()
            take = min(len(tokens), self.shard_tokens - self.shard_sizes[-1])
            self._file.write(tokens[:take].tobytes())
            self.shard_sizes[-1] += take
            tokens = tokens[take:]

    def _next_shard(self) -> None:
        if self._file is not None:
            self._file.close()
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self._file = open(self.out_dir / name, "wb")
        self.shards.append(name)
        self.shard_sizes.append(0)

    def pop_tail(self, count: int) -> np.ndarray:
        """Remove the last COUNT tokens written (they may span shards) and return them."""
        self.close()
        pieces = []
        while count:
            path = self.out_dir / self.shards[-1]
            take = min(count, self.shard_sizes[-1])
            keep = self.shard_sizes[-1] - take
            pieces.append(np.fromfile(path, dtype=self.dtype, offset=keep * self.dtype.itemsize))
            with open(path, "r+b") as f:
                f.truncate(keep * self.dtype.itemsize)
            self.shard_sizes[-1] = keep
            if keep == 0:
                path.unlink()
                self.shards.pop()
                self.shard_sizes.pop()
            count -= take
        return np.concatenate(pieces[::-1]) if pieces else np.empty(0, self.dtype)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def meta(self) -> dict:
        return {"shards": self.shards, "shard_tokens": self.shard_sizes, "tokens": self.tokens,
                "bytes": self.text_bytes, "documents": self.documents}


@dataclass
class _Chunk:
    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    text_bytes: list[int] = field(default_factory=list)
    position: int = 0  # input bytes read when this chunk closed (drives the progress bar)


def _chunks(paths: list[Path], text_field: str, on_bad_record: str, stats: ReadStats, file_sizes: list[int],
            chunk_bytes: int) -> Iterable[_Chunk]:
    """Group documents into chunks of about CHUNK_BYTES of text. Each chunk records how far through the
    input files (in disk bytes) reading had got, for the progress bar: the files finished so far plus the
    text read from the current one, capped at its size (compressed files hold more text than bytes)."""
    def size_of(index: int) -> int:  # tolerant of files appearing while we read
        return file_sizes[index] if index < len(file_sizes) else 0

    chunk, size = _Chunk(), 0
    seen_bytes, files_done, file_start_bytes, finished_bytes = 0, 0, 0, 0
    for doc in iter_documents(paths, text_field, stats, on_bad_record=on_bad_record):  # type: ignore[arg-type]
        # iter_documents has counted this document in stats before yielding it
        doc_bytes, seen_bytes = stats.text_bytes - seen_bytes, stats.text_bytes
        while files_done < stats.files - 1:  # a new file started: the ones before it are done
            finished_bytes += size_of(files_done)
            files_done += 1
            file_start_bytes = seen_bytes - doc_bytes
        chunk.ids.append(doc.id)
        chunk.texts.append(doc.text)
        chunk.text_bytes.append(doc_bytes)
        size += doc_bytes
        if size >= chunk_bytes or len(chunk.ids) >= CHUNK_DOCUMENTS:
            chunk.position = finished_bytes + min(seen_bytes - file_start_bytes, size_of(files_done))
            yield chunk
            chunk, size = _Chunk(), 0
    if chunk.ids:
        chunk.position = sum(file_sizes)
        yield chunk


def _result(chunk: _Chunk, future: Any) -> tuple[_Chunk, np.ndarray, np.ndarray]:
    from concurrent.futures.process import BrokenProcessPool

    try:
        return (chunk, *future.result())
    except BrokenProcessPool as e:
        raise UserError(f"a tokenizer worker process died ({e}). Workers are started with 'spawn', which "
                           "re-imports the main script: run from a script file or module (not stdin), or "
                           "pass workers=0 (--workers 0) to tokenize in this process") from e


def _owned_names(out_dir: Path) -> set[str] | None:
    """The entries an earlier tokenize wrote into OUT_DIR (meta.json lists them), or None when it holds no
    readable lmstack meta.json."""
    try:
        meta = json.loads((out_dir / "meta.json").read_text())
        splits = meta["splits"].values() if meta.get("format") == "lmstack-shards" else None
        if splits is None:
            return None
        return {"meta.json", *meta.get("tokenizer_files", [meta.get("tokenizer")]),
                *(name for split in splits for name in split["shards"])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _prepare_out_dir(out_dir: Path, inputs: list[Path], overwrite: bool) -> Path:
    """A fresh staging directory next to OUT_DIR, after checking that OUT_DIR may be replaced: it holds only
    what an earlier tokenize wrote (unless overwrite) and does not overlap an input (lmstack.data.outputs)."""
    claim_output_dir(out_dir, inputs, "data tokenize", _owned_names(out_dir), overwrite)
    return make_staging_dir(out_dir)


def tokenize_to_shards(inputs: str | os.PathLike | Iterable[str | os.PathLike], tokenizer: Any,
                       out_dir: str | os.PathLike, *, text_field: str = "text", val_fraction: float = 0.005,
                       workers: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS, seed: int = 0,
                       on_bad_record: str = "error", progress: bool = True,
                       cache_dir: str | os.PathLike | None = None, overwrite: bool = False,
                       executor: str = "local", ray_address: str | None = None) -> dict:
    """Tokenize INPUTS (files, directories or corpus names such as "classics") into shards in OUT_DIR.

    tokenizer: a Tokenizer (or anything with save/load/encode_batch/eot_id/vocab_size), or a path that
        ``lmstack.tokenizer.Tokenizer.load`` accepts.
    val_fraction: expected share of documents in the validation split, 0 < f < 1 (at least one document).
    workers: tokenizer processes; 0 = tokenize in this process (encode_batch may still use threads);
        None = one per CPU core, or 0 for inputs under 32 MB, where starting processes costs more than it saves.
    shard_tokens: tokens per shard file.
    seed: keys the split hash; the same seed gives the same split.
    on_bad_record: "error" or "skip" (count in meta["read_stats"]) JSONL/Parquet records without text.
    overwrite: replace OUT_DIR even when it holds files an earlier tokenize did not write (``--overwrite``);
        an OUT_DIR that is, holds or lies inside an input is refused regardless.
    executor: "local" (processes of this machine, above) or "ray" (Ray tasks; ``workers`` CPUs of a local
        cluster, one per core when None, or every CPU of the cluster at ``ray_address``). Same bytes either way.
    Returns the meta dict also written to OUT_DIR/meta.json.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
    if workers is not None and workers < 0:
        raise DataError(f"workers must be >= 0, got {workers}")
    if executor not in EXECUTORS:
        raise UserError(f"--executor={executor!r}: choose one of {', '.join(EXECUTORS)}")
    if ray_address and executor != "ray":
        raise UserError("--ray-address needs --executor ray")
    sources = [str(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    paths = resolve_inputs(sources, cache_dir, progress)
    file_sizes = [path.stat().st_size for path, _ in list_input_files(paths)]
    if workers is None:
        workers = 0 if sum(file_sizes) < SMALL_INPUT_BYTES else (os.cpu_count() or 1)
    if isinstance(tokenizer, (str, os.PathLike)):
        from lmstack.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(tokenizer)

    out_dir = Path(out_dir)
    runner: Executor | None = None
    if executor == "ray":  # Ray installed and the address reachable: checked before anything is written
        runner = make_executor("ray", workers or os.cpu_count() or 1, ray_address)
        workers = runner.parallelism
    staging, pool = None, None
    try:
        staging = _prepare_out_dir(out_dir, paths, overwrite)
        tokenizer.save(staging)
        tokenizer_files = sorted(p.name for p in staging.iterdir())
        dtype = token_dtype(tokenizer.vocab_size)
        writers = {split: _SplitWriter(staging, split, dtype, shard_tokens) for split in ("train", "val")}
        stats = ReadStats()
        last_train = (0, 0)  # (tokens, bytes) of the most recent train document, for the val fallback

        if runner is not None:
            runner.start(_init_worker, (_tokenizer_class_path(tokenizer), str(staging)))
        elif workers > 0:  # a worker that dies raises BrokenProcessPool here (multiprocessing.Pool would hang)
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_init_worker,
                                       initargs=(_tokenizer_class_path(tokenizer), str(staging)))

        started = time.time()
        with Progress(progress, bytes_mode=True) as bar:
            label = f"{workers} Ray workers" if runner is not None else f"{workers} workers" if workers else "in-process"
            task = bar.add(f"tokenize ({label})", total=sum(file_sizes))

            def consume(chunk: _Chunk, tokens: np.ndarray, lengths: np.ndarray) -> None:
                nonlocal last_train
                is_val = np.fromiter((is_val_document(i, val_fraction, seed) for i in chunk.ids), bool, len(chunk.ids))
                token_is_val = np.repeat(is_val, lengths)
                text_bytes = np.asarray(chunk.text_bytes, dtype=np.int64)
                for split, mask, token_mask in (("train", ~is_val, ~token_is_val), ("val", is_val, token_is_val)):
                    writers[split].write(tokens[token_mask])
                    writers[split].documents += int(mask.sum())
                    writers[split].text_bytes += int(text_bytes[mask].sum())
                if (~is_val).any():
                    last = np.flatnonzero(~is_val)[-1]
                    last_train = (int(lengths[last]), int(text_bytes[last]))
                bar.update(task, completed=chunk.position)

            chunk_bytes = INPROCESS_CHUNK_BYTES if workers == 0 else WORKER_CHUNK_BYTES
            chunks = _chunks(paths, text_field, on_bad_record, stats, file_sizes, chunk_bytes)
            if runner is not None:
                _encode_in_order(runner, chunks, consume)
            else:
                in_flight: deque = deque()
                for chunk in chunks:
                    if pool is None:
                        consume(chunk, *_encode_chunk(chunk.texts, tokenizer))
                        continue
                    in_flight.append((chunk, pool.submit(_encode_chunk, chunk.texts)))
                    chunk.texts = []  # the task holds the texts; keep main-process memory bounded
                    if len(in_flight) >= 4 * workers:
                        consume(*_result(*in_flight.popleft()))
                while in_flight:
                    consume(*_result(*in_flight.popleft()))
            bar.update(task, completed=sum(file_sizes))
            if stats.documents == 0:  # raised inside the bar's block, so the failed bar is erased
                raise DataError(f"no text found in {', '.join(sources)} ({stats.summary()}); "
                                "check --text-field and that the files are not empty")
        seconds = time.time() - started

        train, val = writers["train"], writers["val"]
        if val.documents == 0:  # tiny corpus: move the last training document to validation
            if train.documents < 2:
                raise DataError("the corpus has a single document; a train/val split needs at least two")
            val.write(train.pop_tail(last_train[0]))
            train.documents, val.documents = train.documents - 1, 1
            train.text_bytes, val.text_bytes = train.text_bytes - last_train[1], last_train[1]
        if train.documents == 0:
            raise DataError(f"every document landed in the validation split; lower val_fraction ({val_fraction})")
        for writer in writers.values():
            writer.close()

        meta = {
            "format": "lmstack-shards", "version": SHARD_FORMAT_VERSION,
            "vocab_size": int(tokenizer.vocab_size), "dtype": dtype.name, "byteorder": "little",
            "eot_id": int(tokenizer.eot_id),
            "tokenizer": "tokenizer.json" if "tokenizer.json" in tokenizer_files else tokenizer_files[0],
            "tokenizer_files": tokenizer_files,
            "splits": {split: writer.meta() for split, writer in writers.items()},
            "val_fraction": val_fraction, "seed": seed,
            "sources": sources, "resolved_sources": [str(p) for p in paths],
            "read_stats": {k: v for k, v in stats.to_dict().items() if k != "unsupported_files"}
            | {"unsupported_files": len(stats.unsupported_files)},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(seconds, 3),
            "text_mb_per_second": round(stats.text_bytes / 1e6 / max(seconds, 1e-9), 3),
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        swap_directory(staging, out_dir)
        return meta
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if runner is not None:
            runner.close()
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _encode_in_order(runner: Executor, chunks: Iterable[_Chunk],
                     consume: Callable[[_Chunk, np.ndarray, np.ndarray], None]) -> None:
    """Encode CHUNKS as executor tasks (a bounded number in flight) and hand each to CONSUME in chunk order:
    results that arrive early wait in a buffer until the ones before them are in."""
    waiting: dict[int, _Chunk] = {}
    done: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    next_index = 0

    def tasks() -> Iterator[tuple[int, list[str]]]:
        for index, chunk in enumerate(chunks):
            waiting[index] = chunk
            texts, chunk.texts = chunk.texts, []  # the task holds the texts
            yield index, texts

    def on_result(result: dict[str, Any]) -> None:
        nonlocal next_index
        done[result["index"]] = (result["tokens"], result["lengths"])
        while next_index in done:
            consume(waiting.pop(next_index), *done.pop(next_index))
            next_index += 1

    runner.imap(_encode_task, tasks(), on_result)

