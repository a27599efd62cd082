"""Reading the user's text: files and directories in, a stream of :class:`Document` records out.

``iter_documents(paths)`` streams documents from plain text, JSON Lines and Parquet files or whole
directories, with bounded memory (one document, one JSONL line or one Parquet batch at a time)::

    from lmstack.data.readers import ReadStats, iter_documents
    stats = ReadStats()
    for doc in iter_documents(["notes/", "crawl.jsonl.zst"], text_field="content", stats=stats):
        ...
    print(stats.summary())

Formats, chosen by file name: ``.txt`` (one document per file, or one per ``delimiter`` line), ``.jsonl``
(one JSON object per line, text in ``text_field``), each of those optionally compressed as ``.gz`` or
``.zst``, and ``.parquet`` (read batch by batch with pyarrow). Directories are walked recursively in sorted
order, so the document order is the same on every machine; hidden entries and files of other types are
skipped (and listed in ``ReadStats.unsupported_files``).

Bytes that are not valid UTF-8 become U+FFFD and are counted per file in ``ReadStats``; they never crash a
run. A JSONL record without the text field is an error naming the file, line and field, or is counted and
skipped with ``on_bad_record="skip"``. A file that cannot be read at all (permissions, a truncated
archive) raises :class:`DataError` naming the file.

A directory that an lmstack job is still writing (or that a killed job left half-written) carries an
``_INCOMPLETE`` marker (lmstack.data.outputs); reading it raises :class:`DataError` instead of silently
returning part of the data.

This is the API the rest of ``lmstack.data`` (cleaning, tokenization) builds on; keep it stable. Named
corpora ("classics") are resolved to directories by :func:`lmstack.data.corpora.resolve_inputs`.

``Document.source`` is the file a document was read from; ``Document.id`` is the record's own ``id`` when a
JSONL/Parquet record has one, otherwise the file's path relative to the input argument plus a
line/row/part number, so ids survive moving the whole input tree (the shard split hashes them).
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import os
import re
import threading
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator, Literal

from lmstack.data.outputs import refuse_incomplete
from lmstack.errors import DataError

__all__ = ["Document", "ReadStats", "SUPPORTED_SUFFIXES", "decode_utf8", "iter_documents", "list_input_files",
           "normalize_newlines"]



@dataclass(frozen=True)
class Document:
    """One document: ``id`` (stable, see the module docstring), ``text``, ``source`` (the file it came from)."""

    id: str
    text: str
    source: str


@dataclass
class ReadStats:
    """Counters filled in by :func:`iter_documents`; per-file dicts only hold files with a nonzero count."""

    files: int = 0
    documents: int = 0
    text_bytes: int = 0  # UTF-8 bytes of the yielded texts
    empty_documents: int = 0  # documents with no text, skipped
    undecodable_bytes: dict[str, int] = field(default_factory=dict)  # file -> bytes replaced by U+FFFD
    skipped_records: dict[str, int] = field(default_factory=dict)  # file -> bad records skipped
    unsupported_files: list[str] = field(default_factory=list)  # files of other types inside directories

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        parts = [f"{self.documents:,} documents from {self.files:,} files ({self.text_bytes / 1e6:.1f} MB of text)"]
        if self.empty_documents:
            parts.append(f"{self.empty_documents:,} empty documents skipped")
        if self.undecodable_bytes:
            parts.append(f"{sum(self.undecodable_bytes.values()):,} undecodable bytes replaced in "
                         f"{len(self.undecodable_bytes)} files")
        if self.skipped_records:
            parts.append(f"{sum(self.skipped_records.values()):,} bad records skipped in "
                         f"{len(self.skipped_records)} files")
        if self.unsupported_files:
            parts.append(f"{len(self.unsupported_files):,} files of unsupported types ignored")
        return "; ".join(parts)


# ----------------------------------------------------------------------------- decoding

_TEXT_FORMATS = ("txt", "jsonl")
_COMPRESSIONS = ("", ".gz", ".zst")
SUPPORTED_SUFFIXES = tuple(f".{fmt}{c}" for fmt in _TEXT_FORMATS for c in _COMPRESSIONS) + (".parquet",)

_replaced = threading.local()


def _replace_and_count(err: UnicodeError) -> tuple[str, int]:
    _replaced.bytes = getattr(_replaced, "bytes", 0) + (err.end - err.start)
    return "\ufffd", err.end


codecs.register_error("lmstack.replace_and_count", _replace_and_count)


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """UTF-8 decode with invalid bytes replaced by U+FFFD; returns (text, number of bytes replaced)."""
    _replaced.bytes = 0
    text = raw.decode("utf-8", "lmstack.replace_and_count")
    return text, _replaced.bytes


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _utf8_size(text: str) -> tuple[str, int, int]:
    """(text, UTF-8 size, replaced). JSON can smuggle in lone surrogates ("\\ud800"), which cannot be
    encoded; they are replaced like undecodable bytes so downstream encoders never fail."""
    try:
        return text, len(text.encode("utf-8")), 0
    except UnicodeEncodeError:
        replaced = len(_LONE_SURROGATE.findall(text))
        text = _LONE_SURROGATE.sub("\ufffd", text)
        return text, len(text.encode("utf-8")), replaced


def format_of(path: Path) -> tuple[str, str] | None:
    """('txt'|'jsonl'|'parquet', compression suffix) from the file name, or None when unsupported."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet", ""
    for fmt in _TEXT_FORMATS:
        for comp in _COMPRESSIONS:
            if name.endswith(f".{fmt}{comp}"):
                return fmt, comp
    return None


def open_binary(path: Path, compression: str) -> IO[bytes]:
    """The file's bytes, decompressed for a ``.gz`` / ``.zst`` suffix (as :func:`format_of` names it)."""
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".zst":
        import zstandard

        raw = open(path, "rb")
        reader = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
        return io.BufferedReader(reader, buffer_size=1 << 20)
    return open(path, "rb", buffering=1 << 20)


def _read_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, EOFError, zlib.error]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:  # pragma: no cover - zstandard is a dependency
        pass
    try:
        import pyarrow

        errors.append(pyarrow.ArrowException)
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        pass
    return tuple(errors)


# ----------------------------------------------------------------------------- walking inputs

def list_input_files(paths: str | os.PathLike | Iterable[str | os.PathLike],
                     stats: ReadStats | None = None) -> Iterator[tuple[Path, str]]:
    """Yield (file, label) for every readable input file, in a deterministic order.

    A file argument is used as given (an unsupported type is an error); a directory argument is walked
    recursively in sorted path order, skipping hidden entries and files of other types. ``label`` is the
    file's path relative to the argument's parent, the stable part of document ids.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise DataError("no input paths given")
    resolved = [Path(p).expanduser() for p in paths]
    for p in resolved:  # check all up front so a typo fails before hours of work, not after
        if not p.exists():
            raise DataError(f"input {p} does not exist; check the path")
        refuse_incomplete(p if p.is_dir() else p.parent)
    for p in resolved:
        if p.is_dir():
            found = 0
            for f in _walk_sorted(p, set()):
                if format_of(f) is None:
                    if stats is not None:
                        stats.unsupported_files.append(str(f))
                    continue
                found += 1
                yield f, (Path(p.name) / f.relative_to(p)).as_posix()
            if not found:
                raise DataError(f"directory {p} holds no readable files; supported types: "
                                f"{', '.join(SUPPORTED_SUFFIXES)}")
        else:
            if format_of(p) is None:
                raise DataError(f"{p}: unsupported file type; supported: {', '.join(SUPPORTED_SUFFIXES)} "
                                "(or a directory of them)")
            yield p, p.name


def _walk_sorted(directory: Path, visited: set[str]) -> Iterator[Path]:
    """Files under DIRECTORY in sorted path order (entries by name, sub-directories in place), skipping
    hidden entries; symlinked directories are followed once (a link loop is not followed again)."""
    real = os.path.realpath(directory)
    if real in visited:
        return
    visited.add(real)
    refuse_incomplete(directory)
    with os.scandir(directory) as it:
        entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    for entry in entries:
        if entry.is_dir():
            yield from _walk_sorted(Path(entry.path), visited)
        elif entry.is_file():
            yield Path(entry.path)


# ----------------------------------------------------------------------------- readers

BadRecordPolicy = Literal["error", "skip"]


def iter_documents(paths: str | os.PathLike | Iterable[str | os.PathLike], text_field: str = "text",
                   stats: ReadStats | None = None, *, delimiter: str | None = None,
                   on_bad_record: BadRecordPolicy = "error", id_field: str = "id") -> Iterator[Document]:
    """Stream documents from files and directories (formats and guarantees in the module docstring).

    text_field: the JSONL key / Parquet column holding the text.
    stats: a :class:`ReadStats` to fill in (files, documents, bytes, replacements, skips).
    delimiter: for .txt files, split into one document per run of lines between lines equal to this
        string (e.g. ``"%"`` for fortune files); None = the whole file is one document.
    on_bad_record: "error" (default) raises :class:`DataError` naming file, line and field when a
        record lacks the text field, holds a non-string, or a JSONL line is not a JSON object;
        "skip" counts it in ``stats.skipped_records`` and goes on.
    id_field: a record's own id (JSONL key / Parquet column), used for ``Document.id`` when present.
    """
    if on_bad_record not in ("error", "skip"):
        raise DataError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    stats = stats if stats is not None else ReadStats()
    errors = _read_errors()
    for path, label in list_input_files(paths, stats):
        fmt, compression = format_of(path)  # type: ignore[misc]
        stats.files += 1
        reader = {"txt": _read_txt, "jsonl": _read_jsonl, "parquet": _read_parquet}[fmt]
        options = dict(delimiter=delimiter) if fmt == "txt" else dict(
            text_field=text_field, on_bad_record=on_bad_record, id_field=id_field)
        try:
            for doc_id, text, replaced in reader(path, label, compression, stats, **options):
                text, size, surrogates = _utf8_size(text)
                replaced += surrogates
                if replaced:
                    stats.undecodable_bytes[str(path)] = stats.undecodable_bytes.get(str(path), 0) + replaced
                if not text.strip():
                    stats.empty_documents += 1
                    continue
                stats.documents += 1
                stats.text_bytes += size
                yield Document(doc_id, text, str(path))
        except errors as e:
            raise DataError(f"cannot read {path}: {e}") from e


def normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_txt(path: Path, label: str, compression: str, stats: ReadStats,
              delimiter: str | None) -> Iterator[tuple[str, str, int]]:
    with open_binary(path, compression) as f:
        if delimiter is None:
            text, replaced = decode_utf8(f.read())
            yield label, normalize_newlines(text).lstrip("\ufeff"), replaced
            return
        lines: list[str] = []
        replaced_total, part = 0, 0
        for raw_line in f:  # bytes lines: a UTF-8 sequence never contains b"\n"
            line, replaced = decode_utf8(raw_line)
            replaced_total += replaced
            line = normalize_newlines(line)
            if part == 0 and not lines:
                line = line.lstrip("\ufeff")
            if line.rstrip("\n") == delimiter:
                yield f"{label}#{part}", "".join(lines), replaced_total
                lines, replaced_total, part = [], 0, part + 1
            else:
                lines.append(line)
        if lines or replaced_total:
            yield f"{label}#{part}", "".join(lines), replaced_total


def _bad_record(path: Path, where: str, problem: str, policy: BadRecordPolicy, stats: ReadStats,
                fix: str) -> None:
    if policy == "skip":
        stats.skipped_records[str(path)] = stats.skipped_records.get(str(path), 0) + 1
        return
    raise DataError(f"{path}, {where}: {problem}; {fix}, or skip such records (on_bad_record='skip')")


def _record_id(value: object, fallback: str) -> str:
    return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else fallback


def _read_jsonl(path: Path, label: str, compression: str, stats: ReadStats, text_field: str,
                on_bad_record: BadRecordPolicy, id_field: str) -> Iterator[tuple[str, str, int]]:
    with open_binary(path, compression) as f:
        for line_no, raw_line in enumerate(f, start=1):
            if not raw_line.strip():
                continue
            line, replaced = decode_utf8(raw_line)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                _bad_record(path, f"line {line_no}", f"not valid JSON ({e.msg})", on_bad_record, stats,
                            "fix the line")
                continue
            if not isinstance(record, dict):
                _bad_record(path, f"line {line_no}", f"expected a JSON object, got {type(record).__name__}",
                            on_bad_record, stats, "write one object per line")
                continue
            text = record.get(text_field)
            if text is None:
                keys = ", ".join(list(record)[:8]) or "none"
                _bad_record(path, f"line {line_no}", f"no {text_field!r} field (keys: {keys})", on_bad_record,
                            stats, "choose the field with --text-field / text_field")
                continue
            if not isinstance(text, str):
                _bad_record(path, f"line {line_no}", f"field {text_field!r} is {type(text).__name__}, "
                            "not a string", on_bad_record, stats, "choose a text field")
                continue
            yield _record_id(record.get(id_field), f"{label}:{line_no}"), text, replaced


def _read_parquet(path: Path, label: str, compression: str, stats: ReadStats, text_field: str,
                  on_bad_record: BadRecordPolicy, id_field: str) -> Iterator[tuple[str, str, int]]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as pf:
        names = pf.schema_arrow.names
        if text_field not in names:
            if on_bad_record == "skip":
                stats.skipped_records[str(path)] = stats.skipped_records.get(str(path), 0) + pf.metadata.num_rows
                return
            raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(names[:12])}); choose "
                            "the column with --text-field / text_field")
        columns = [text_field] + ([id_field] if id_field in names and id_field != text_field else [])
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=columns):
            texts = batch.column(text_field).to_pylist()
            ids = batch.column(id_field).to_pylist() if len(columns) > 1 else [None] * len(texts)
            for value, record_id in zip(texts, ids):
                replaced = 0
                if isinstance(value, bytes):
                    value, replaced = decode_utf8(value)
                if not isinstance(value, str):
                    problem = "is null" if value is None else f"is {type(value).__name__}, not a string"
                    _bad_record(path, f"row {row}", f"column {text_field!r} {problem}", on_bad_record, stats,
                                "choose a text column")
                else:
                    yield _record_id(record_id, f"{label}:{row}"), value, replaced
                row += 1

