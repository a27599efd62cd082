"""The two encoding backends behind :class:`lmstack.tokenizer.Tokenizer`, with one interface.

- :class:`TiktokenBackend` (fast path): byte-level BPE with rank-consistent merges, encoded by
  ``tiktoken.Encoding`` built from the ranks. Our own BPE vocabularies, GPT-2, cl100k and every
  tokenizer.json that passes :func:`lmstack.tokenizer.bpe.tiktoken_ranks_from_hf` run here.
- :class:`HFBackend` (general path): any tokenizer.json, run by Hugging Face ``tokenizers`` (unigram,
  WordPiece, SentencePiece-style files with normalizers, non-special added tokens, ...).

Both encode special-token text as plain text (the ``Tokenizer`` splits out allowed special tokens itself),
decode ids to exact bytes when byte-level, and write themselves back as a tokenizer.json.

Non-obvious choice: tiktoken is given *no* special tokens. It builds per-thread copies of a regex over
all of them, about 6 KB per token, so a vocabulary topped up with a million ``<|reserved_N|>`` tokens cost
6 GB and 30 s to load. We never use tiktoken's special-token matching, so special ids are decoded here.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import tiktoken

from lmstack.errors import DataError
from lmstack.tokenizer.bpe import (BYTE_CHAR_TABLE, bytes_to_token_string, hf_bpe_spec, is_byte_level,
                                   split_pattern_of, token_string_to_bytes)


def _unknown_ids(ids: Sequence[int], known: Callable[[int], bool], vocab_size: int) -> DataError:
    bad = [i for i in ids if not isinstance(i, int) or not known(i)]
    return DataError(f"cannot decode token ids {bad[:5]}: not in this vocabulary of {vocab_size}")


class TiktokenBackend:
    """Byte-level BPE encoded by tiktoken: ``ranks`` maps token bytes to id (= merge priority)."""

    name = "tiktoken"
    byte_level = True

    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int], pattern: str,
                 label: str = "lmstack", hf_json: str | None = None):
        self.ranks = ranks
        self.pattern = pattern
        self.special_tokens = dict(special_tokens)
        self.encoding = tiktoken.Encoding(label, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        self.vocab_size = max(self.encoding.max_token_value, *self.special_tokens.values(), 0) + 1
        self.byte_ids = [ranks[bytes([b])] for b in range(256)]
        self._special_bytes = {i: s.encode() for s, i in self.special_tokens.items()}
        self._hf_json = hf_json  # the file we were loaded from, written back unchanged by save()
        self._id_to_bytes: dict[int, bytes] | None = None

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return threaded_map(self.encoding.encode_ordinary, texts)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        try:
            return self.encoding.decode_bytes(ids)
        except (KeyError, OverflowError, TypeError, ValueError):  # a special id (or a bad one): decode here
            pieces = [self.token_bytes(i) if isinstance(i, int) else None for i in ids]
            if any(piece is None for piece in pieces):
                raise _unknown_ids(ids, lambda i: self.token_bytes(i) is not None, self.vocab_size) from None
            return b"".join(pieces)  # type: ignore[arg-type]

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes | None:
        if self._id_to_bytes is None:
            table = {rank: token for token, rank in self.ranks.items()}
            table.update(self._special_bytes)
            self._id_to_bytes = table
        return self._id_to_bytes.get(token_id)

    def id_to_token(self, token_id: int) -> str | None:
        special = self._special_bytes.get(token_id)
        if special is not None:
            return special.decode()
        data = self.token_bytes(token_id)
        return None if data is None else bytes_to_token_string(data)

    def token_to_id(self, token: str) -> int | None:
        if token in self.special_tokens:
            return self.special_tokens[token]
        data = token_string_to_bytes(token)
        return None if data is None else self.ranks.get(data)

    def to_hf_json(self) -> str:
        if self._hf_json is None:
            self._hf_json = json.dumps(hf_bpe_spec(self.ranks, self.special_tokens, self.pattern), ensure_ascii=False)
        return self._hf_json


class HFBackend:
    """Any tokenizer.json, run by Hugging Face ``tokenizers`` (special-token text is never parsed by encode)."""

    name = "tokenizers"

    def __init__(self, hf_tokenizer: Any):
        self.hf = hf_tokenizer
        self.hf.encode_special_tokens = True  # plain encode: "<|user|>" in text is text, not a special token
        spec = json.loads(hf_tokenizer.to_str())
        self.added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        self.special_tokens = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        vocab = hf_tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        byte_chars = [vocab.get(c) for c in BYTE_CHAR_TABLE]
        self.byte_level = is_byte_level(spec) and all(i is not None for i in byte_chars)
        self.byte_ids = byte_chars if self.byte_level else None
        self.pattern = split_pattern_of(spec.get("pre_tokenizer"))
        self._id_to_bytes: list[bytes | None] | None = None

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        batch = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)  # _fast (no offsets) since 0.21
        return [e.ids for e in batch(list(texts), add_special_tokens=False)]

    def _byte_table(self) -> list[bytes | None]:
        if self._id_to_bytes is None:
            table: list[bytes | None] = [None] * self.vocab_size
            for token, i in self.hf.get_vocab(with_added_tokens=True).items():
                data = None if token in self.added else token_string_to_bytes(token)
                table[i] = token.encode() if data is None else data
            self._id_to_bytes = table
        return self._id_to_bytes

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        if not self.byte_level:
            return self.decode(ids).encode()
        table = self._byte_table()
        try:
            return b"".join([table[i] for i in ids])  # type: ignore[misc]
        except (IndexError, TypeError):
            raise _unknown_ids(ids, lambda i: 0 <= i < self.vocab_size and table[i] is not None,
                               self.vocab_size) from None

    def decode(self, ids: Sequence[int]) -> str:
        if self.byte_level:
            return self.decode_bytes(ids).decode("utf-8", errors="replace")
        if any(not isinstance(i, int) or not 0 <= i < self.vocab_size for i in ids):
            raise _unknown_ids(ids, lambda i: 0 <= i < self.vocab_size, self.vocab_size)
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes | None:
        if self.byte_level:
            table = self._byte_table()
            return table[token_id] if 0 <= token_id < len(table) else None
        token = self.hf.id_to_token(token_id)
        return None if token is None else token.encode()

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def to_hf_json(self) -> str:
        return self.hf.to_str()


Backend = TiktokenBackend | HFBackend

_pool: ThreadPoolExecutor | None = None
_pool_pid = -1
_pool_lock = threading.Lock()


def threaded_map(encode_one: Callable[[str], list[int]], texts: Sequence[str]) -> list[list[int]]:
    """Encode on all cores: one contiguous chunk of ``texts`` per thread (tiktoken releases the GIL).

    One task per chunk rather than per text: per-text tasks spend more time in the pool than in BPE when
    documents are short. The pool is recreated after a fork (a forked child has none of its threads).
    """
    global _pool, _pool_pid
    workers = min(os.cpu_count() or 1, 16)
    total_chars = sum(len(t) for t in texts)
    if workers == 1 or len(texts) < 2 or total_chars < 100_000:
        return [encode_one(t) for t in texts]
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool, _pool_pid = ThreadPoolExecutor(workers, thread_name_prefix="lmstack-tok"), os.getpid()
    step = -(-len(texts) // workers)
    chunks = [texts[i:i + step] for i in range(0, len(texts), step)]
    out: list[list[int]] = []
    for encoded in _pool.map(lambda chunk: [encode_one(t) for t in chunk], chunks):
        out.extend(encoded)
    return out
