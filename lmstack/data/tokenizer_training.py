"""The library side of ``lmstack tokenizer train|encode|info``: train a tokenizer on files, and describe one.

    from lmstack.data.tokenizer_training import train_from_files, describe, describe_encoding
    tok = train_from_files(["classics"], "runs/tok", vocab_size=8192)   # read, train, save
    print(describe(tok))                                                # `lmstack tokenizer info`
    print(describe_encoding(tok, "Hello"))                              # `lmstack tokenizer encode`

Training from files reads documents through ``lmstack.data`` (files, directories, corpus names), which is
why it lives here, above the tokenizer, rather than in ``lmstack.tokenizer``: the tokenizer imports nothing
from ``lmstack.data``. Before reading a byte, the arguments are checked and the memory training will need
is estimated from the size of the input files (capped by ``max_bytes``) and the vocabulary; a job that
cannot fit is refused with one ConfigError line instead of being killed by the kernel part way through.
The size on disk undercounts compressed inputs (.gz, .zst, .parquet), so the check errs towards running.
"""

from __future__ import annotations

import os
import time
from typing import Iterator, Sequence

from lmstack.data.corpora import resolve_inputs
from lmstack.data.readers import ReadStats, iter_documents, list_input_files
from lmstack.errors import ConfigError
from lmstack.progress import Progress
from lmstack.tokenizer import Tokenizer
from lmstack.tokenizer.training import TrainKind, check_train_args, check_training_memory


def train_from_files(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, vocab_size: int,
                     kind: TrainKind = "bpe", text_field: str = "text",
                     max_bytes: int | None = None, progress: bool = True) -> Tokenizer:
    """`lmstack tokenizer train`: read documents (files, directories or a corpus name such as "classics"),
    train, and save to ``out_dir``. ``max_bytes`` caps the UTF-8 text read (the last document is cut)."""
    check_train_args(vocab_size, kind)
    if max_bytes is not None and max_bytes <= 0:
        raise ConfigError(f"max_bytes must be positive, got {max_bytes}")
    paths = resolve_inputs(inputs, progress=progress)
    input_bytes = sum(path.stat().st_size for path, _ in list_input_files(paths))
    check_training_memory(input_bytes if max_bytes is None else min(input_bytes, max_bytes), vocab_size, kind)
    stats = ReadStats()
    started = time.perf_counter()
    with Progress(progress, bytes_mode=True) as bar:
        reading = bar.add("reading text", total=max_bytes)

        def documents() -> Iterator[str]:
            shown = 0
            for doc in iter_documents(paths, text_field=text_field, stats=stats):
                text = doc.text
                if max_bytes is not None and stats.text_bytes >= max_bytes:
                    excess = stats.text_bytes - max_bytes
                    text = text.encode()[:len(text.encode()) - excess].decode("utf-8", "ignore")
                    stats.text_bytes = max_bytes
                if stats.text_bytes - shown >= 1 << 20:  # redraw per MiB, not per document
                    bar.update(reading, completed=stats.text_bytes)
                    shown = stats.text_bytes
                yield text
                if max_bytes is not None and stats.text_bytes >= max_bytes:
                    break
            bar.update(reading, completed=stats.text_bytes, total=stats.text_bytes)
            bar.add(f"learning a {kind} vocabulary of {vocab_size:,}", total=None)

        tok = Tokenizer.train(documents(), vocab_size, kind)
        tok.save(out_dir)
    seconds = time.perf_counter() - started
    print(f"read {stats.summary()}\nsaved {tok} to {out_dir} in {seconds:.1f} s")
    return tok


def describe_encoding(tok: Tokenizer, text: str) -> str:
    """`lmstack tokenizer encode`: the ids, then one line per token with the text it stands for."""
    ids = tok.encode(text)
    lines = [f"{len(ids)} tokens, {len(text.encode()) / max(len(ids), 1):.2f} bytes per token",
             "ids: " + " ".join(map(str, ids))]
    for token_id in ids:
        piece = tok.token_bytes(token_id) or b""
        try:
            shown = repr(piece.decode("utf-8"))
        except UnicodeDecodeError:  # part of a multi-byte character
            shown = repr(piece)
        lines.append(f"{token_id:>8}  {shown}")
    return "\n".join(lines)


def describe(tok: Tokenizer) -> str:
    """`lmstack tokenizer info`: what this tokenizer is and how it will be run."""
    special = list(tok.special_tokens.items())
    shown = ", ".join(f"{t}={i}" for t, i in special[:12]) + (f", … ({len(special)} in all)" if len(special) > 12 else "")
    meta = tok.meta
    fallback = f" (tiktoken fast path not used: {tok.fast_path_reason})" if tok.fast_path_reason else ""
    chat = {"lmstack": "lmstack (<|system|>/<|user|>/<|assistant|> … <|end|>)",
            "jinja": f"Jinja chat template ({len(tok.chat_template or '')} characters)"}
    rows = [
        ("source", meta.source or "-"),
        ("kind", tok.kind),
        ("backend", tok.backend + fallback),
        ("vocab_size", f"{tok.vocab_size:,}"),
        ("split regex", tok.split_pattern or "-"),
        ("document boundary", f"{meta.eot_token}={tok.token_to_id(meta.eot_token)}" if meta.eot_token else "none"),
        ("stop tokens", ", ".join(f"{t}={tok.token_to_id(t)}" for t in meta.stop_tokens) or "none"),
        ("chat format", chat.get(tok.chat_format or "", "none")),
        ("special tokens", shown or "none"),
    ]
    return "\n".join(f"{name:>18}: {value}" for name, value in rows)
